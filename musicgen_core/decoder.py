"""The MusicGen decoder language model: summed codebook embeddings, sinusoidal positions, pre-norm layers
with a KV-cached self-attention and a precomputed cross-attention, one head per codebook.

Parameter names follow transformers' `MusicgenForCausalLM` with the `model.decoder.` level removed.
"""

from __future__ import annotations

import contextlib
import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import DecoderConfig
from .state import CrossAttentionKV, KVCache
from .threads import pooled_step


def _attention_backends(device: torch.device):
    """On CUDA, keep SDPA off its cuDNN backend: it builds a plan per new key length, about 1 ms of CPU per call
    in an eager step (measured on an H100), while flash / memory-efficient attention need none."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def sinusoidal_positions(num_positions: int, width: int) -> torch.Tensor:
    """(num_positions, width) table, cos half first then sin half (the tensor2tensor layout MusicGen uses)."""
    half = width // 2
    rate = math.log(10000) / (half - 1)
    frequencies = torch.exp(torch.arange(half, dtype=torch.int64).float() * -rate)
    angles = torch.arange(num_positions, dtype=torch.int64).float()[:, None] * frequencies[None, :]
    table = torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)
    if width % 2:
        table = torch.cat([table, torch.zeros(num_positions, 1)], dim=1)
    return table


def linear(x: torch.Tensor, weight: torch.Tensor, transposed_rows: frozenset[int] = frozenset(),
           kernel_rows: frozenset[int] = frozenset(), kernel=None) -> torch.Tensor:
    """x @ weight.T, as `weight @ x.T` when the row count is in `transposed_rows`, or through our kernel's
    streaming `linear_f32` when it is in `kernel_rows` (each measured faster on this CPU by
    `calibrate_linear`), else F.linear. The three agree to float rounding."""
    rows = x.numel() // x.shape[-1]
    if x.device.type == "cpu" and weight.dtype == x.dtype:
        if kernel is not None and rows in kernel_rows and x.dtype == torch.float32:
            return kernel.linear_f32(x, weight)
        if rows in transposed_rows:
            flat = x.reshape(rows, x.shape[-1])
            return (weight @ flat.T).T.reshape(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight)


# linear_f32 is chosen while within this factor of torch's best form timed alone: a step on the kernel's pool
# runs torch single-threaded, so no OpenMP team wakes for each small op between the linears. On the AVX2 EPYC
# at 2 rows it was 10% slower alone (23.3 vs 21.1 ms over 24 fc1 weights) and 1.6x faster in the step (93 vs
# 155 ms).
KERNEL_CREDIT = 1.25


def calibrate_linear(weights: torch.Tensor | list[torch.Tensor], rows_options=(1, 2, 4, 6, 8, 12, 16),
                     repeats: int = 3, kernel=None) -> tuple[frozenset[int], frozenset[int]]:
    """Time the small-batch forms for each row count over `weights` -> (rows where weight @ x.T wins, rows
    where the kernel's linear_f32 wins), each by 10% over F.linear. Pass distinct weights with more bytes than
    the last-level cache (the decoder's fc1s): a step streams every weight once, and timing one weight over and
    over measured cache speed (a 16 MB weight sits in the AVX2 EPYC's 32 MB L3). Small-batch F.linear is 2-4x
    slow on some CPUs (AMD EPYC) and the faster of torch's two forms on others (a Xeon with AVX-512: 0.70 vs
    1.16 ms at 2 rows), so the choice is measured, not assumed."""
    import time

    weights = [weights] if isinstance(weights, torch.Tensor) else list(weights)
    forms = {"linear": lambda x, w: F.linear(x, w), "transposed": lambda x, w: w @ x.T}
    if kernel is not None and all(w.dtype == torch.float32 and w.is_contiguous() for w in weights):
        forms["kernel"] = lambda x, w: kernel.linear_f32(x, w)
    chosen: dict[str, set[int]] = {"transposed": set(), "kernel": set()}
    for rows in rows_options:
        inputs = {w.shape[1]: torch.randn(rows, w.shape[1], dtype=w.dtype) for w in weights}  # per input width
        timings = dict.fromkeys(forms, float("inf"))
        for form in forms.values():
            form(inputs[weights[0].shape[1]], weights[0])
        for _ in range(repeats):  # the forms in turn, so a noisy moment does not land on one of them only
            for name, form in forms.items():
                started = time.perf_counter()
                for weight in weights:
                    form(inputs[weight.shape[1]], weight)
                timings[name] = min(timings[name], time.perf_counter() - started)
        if "kernel" in timings:  # see KERNEL_CREDIT
            timings["kernel"] /= KERNEL_CREDIT
        winner = min(timings, key=timings.get)
        if winner != "linear" and timings[winner] < 0.9 * timings["linear"]:
            chosen[winner].add(rows)
    return frozenset(chosen["transposed"]), frozenset(chosen["kernel"])


def _join(parts: list[torch.Tensor]) -> torch.Tensor:
    """torch.cat, without its copy in the usual case of one sequence."""
    return parts[0] if len(parts) == 1 else torch.cat(parts)


class FastLinear(nn.Linear):
    """nn.Linear (no bias) whose forward takes the small-batch CPU path of `linear`."""

    transposed_rows: frozenset[int] = frozenset()  # set for a whole decoder by use_transposed_rows
    kernel_rows: frozenset[int] = frozenset()  # rows that take the kernel's linear_f32 (use_linear_forms)
    kernel = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.transposed_rows, self.kernel_rows, self.kernel)


class Attention(nn.Module):
    def __init__(self, config: DecoderConfig):
        super().__init__()
        width = config.hidden_size
        self.heads, self.head_dim = config.num_attention_heads, config.head_dim
        self.q_proj = FastLinear(width, width, bias=False)
        self.k_proj = FastLinear(width, width, bias=False)
        self.v_proj = FastLinear(width, width, bias=False)
        self.out_proj = FastLinear(width, width, bias=False)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(rows, time, width) -> (rows, heads, time, head_dim)"""
        return x.view(x.shape[0], x.shape[1], self.heads, self.head_dim).transpose(1, 2)

    def fuse_qkv(self) -> None:
        """Replace q/k/v by one (3 x width, width) projection: one matmul reads the three weights per step
        (2 ms less per musicgen-small step in int8 on the dev box). For self-attention only: cross-attention
        projects its keys/values once per conditioning."""
        width = self.q_proj.in_features
        fused = FastLinear(width, 3 * width, bias=False, device=self.q_proj.weight.device,
                           dtype=self.q_proj.weight.dtype)
        with torch.no_grad():
            fused.weight.copy_(torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight]))
        self.qkv = fused
        del self.q_proj, self.k_proj, self.v_proj

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if hasattr(self, "qkv"):
            q, k, v = self.qkv(x).chunk(3, dim=-1)
            return self.split_heads(q), self.split_heads(k), self.split_heads(v)
        return (self.split_heads(self.q_proj(x)),) + self.project_kv(x)

    def project_kv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.split_heads(self.k_proj(x)), self.split_heads(self.v_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: DecoderConfig):
        super().__init__()
        width = config.hidden_size
        self.self_attn = Attention(config)
        self.self_attn_layer_norm = nn.LayerNorm(width)
        self.encoder_attn = Attention(config)
        self.encoder_attn_layer_norm = nn.LayerNorm(width)
        self.fc1 = FastLinear(width, config.ffn_dim, bias=False)
        self.fc2 = FastLinear(config.ffn_dim, width, bias=False)
        self.final_layer_norm = nn.LayerNorm(width)
        if config.activation_function != "gelu":
            raise ValueError(f"decoder activation {config.activation_function!r} is not supported")


class MusicgenDecoder(nn.Module):
    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.ModuleList(
            [nn.Embedding(config.vocab_size + 1, config.hidden_size) for _ in range(config.num_codebooks)])
        self.layers = nn.ModuleList([DecoderLayer(config) for _ in range(config.num_hidden_layers)])
        self.layer_norm = nn.LayerNorm(config.hidden_size)
        self.lm_heads = nn.ModuleList(
            [FastLinear(config.hidden_size, config.vocab_size, bias=False) for _ in range(config.num_codebooks)])
        self.embed_scale = math.sqrt(config.hidden_size) if config.scale_embedding else 1.0
        self.positions: torch.Tensor | None = None  # built by `prepare` once the weights are in place
        self.kv_dtype: torch.dtype | None = None  # self-attention cache dtype; None: the norms' (weights') dtype
        self.layer_steps = None  # the kernel's C++ one-column step (use_kernel_layers), or None
        self.float_kernel = None  # the kernel, when layer_steps runs a float decoder's linears (float32 / bfloat16)
        # With our kernel's layers, attention (a step's in C++ and in Python, and a prefill's) is the kernel's
        # attend_one instead of scaled_dot_product_attention: query by query, so a prefill in chunks, in one go
        # or column by column gives the same bits (use_kernel_layers).
        self.one_query_attention = None
        self.layer_norm_op = None  # with our kernel's layers: its layer norm, the C++ step's arithmetic
        self.kv_quantizer = None  # with our kernel's layers: its per-vector int8 quantizer, for an int8 cache
        self.kernel_rows: frozenset[int] = frozenset()  # row counts whose linears take linear_f32 (use_linear_forms)

    def use_transposed_rows(self, rows: frozenset[int]) -> None:
        """Every linear layer of this decoder takes `weight @ x.T` for these row counts (calibrate_linear)."""
        self.use_linear_forms(rows)

    def choose_linear_forms(self) -> None:
        """A float decoder's small-batch matmul form per row count, timed at load over its own weights for
        torch's two forms and, for float32, our kernel's streaming linear_f32 (built on first use like the int8
        kernel; without it, torch's forms only). The weights: every linear of the first layers (each shape a
        step streams), ~220 MB for musicgen-small, more than a last-level cache; fc1 alone chose weight @ x.T at
        2 rows on the EPYC, where over the whole step linear_f32 was 1.6x faster."""
        from .int8_kernel import load_int8_kernel

        kernel = load_int8_kernel() if self.layer_norm.weight.dtype == torch.float32 else None
        weights = [linear.weight for layer in self.layers[:4] for linear in
                   (layer.self_attn.qkv, layer.self_attn.out_proj, layer.encoder_attn.q_proj,
                    layer.encoder_attn.out_proj, layer.fc1, layer.fc2)]
        # 3 and 5: one session with 2 or 4 weighted prompts under guidance
        transposed, kernel_rows = calibrate_linear(weights, rows_options=(1, 2, 3, 4, 5, 6, 8), kernel=kernel)
        self.use_linear_forms(transposed, kernel_rows, kernel)

    def use_linear_forms(self, transposed_rows: frozenset[int], kernel_rows: frozenset[int] = frozenset(),
                         kernel=None) -> None:
        """Every linear layer takes `weight @ x.T` for `transposed_rows` and the kernel's linear_f32 for
        `kernel_rows` (calibrate_linear's choice), F.linear otherwise."""
        self.kernel_rows = kernel_rows if kernel is not None else frozenset()
        for module in self.modules():
            if isinstance(module, FastLinear):
                module.transposed_rows, module.kernel_rows = transposed_rows, kernel_rows
                module.kernel = kernel if kernel_rows else None

    def use_kernel_layers(self, kernel, python_layers: bool = True) -> None:
        """Step one column through the kernel's C++ `DecoderStack` (`layer_steps`): the layers' ~40 small
        operations between linears are plain loops there instead of ATen calls (~200 us a layer on the 2-core
        Xeon). The stack holds the layers' current tensors and flags: call again after changing a layer (or set
        `layer_steps = None` to step through Python). A head_dim the kernel's attention does not vectorize (not
        a multiple of 8, or over 128) keeps the Python layers.

        Quantized decoders (python_layers): the Python layers (a prefill) also take the kernel's attention,
        layer norm and int8 cache quantizer, so that a prefill and a step compute the same bits. A float decoder
        (float32 or bfloat16 weights, `use_float_kernel_layers`) keeps torch in its Python layers and agrees
        with them to float rounding; its step keeps float32 activations, bfloat16 weights widened as read."""
        if python_layers:
            self.one_query_attention = kernel.attend_one
            self.layer_norm_op = kernel.layer_norm
            self.kv_quantizer = kernel.quantize_kv
        head_dim = self.config.head_dim
        if head_dim % 8 or head_dim > 128:
            self.layer_steps = None
            return
        float_weights = -1  # DecoderLayerStep::kFloatWeights
        empty = torch.empty(0)
        steps = []
        for layer in self.layers:
            norms = [layer.self_attn_layer_norm, layer.encoder_attn_layer_norm, layer.final_layer_norm]
            linears = [layer.self_attn.qkv, layer.self_attn.out_proj, layer.encoder_attn.q_proj,
                       layer.encoder_attn.out_proj, layer.fc1, layer.fc2]
            tensors, groups = [], []
            for linear_layer in linears:
                if isinstance(linear_layer, FastLinear):
                    tensors += [linear_layer.weight, empty, empty]
                    groups.append(float_weights)
                else:  # our int8 (group 0) or int4 layers
                    tensors += [linear_layer.packed, linear_layer.rowsum, linear_layer.scale]
                    groups.append(getattr(linear_layer, "group", 0))
            steps.append(kernel.DecoderLayerStep(
                # the parameters themselves, not views: a later `param.data = ...` (the copy out of the
                # checkpoint's memory map after quantizing) must reach the stack too
                [t for norm in norms for t in (norm.weight, norm.bias)], [norm.eps for norm in norms],
                tensors, [m.in_features for m in linears], [m.out_features for m in linears],
                [getattr(m, "applies_gelu", False) for m in linears], groups, self.config.num_attention_heads))
        self.layer_steps = kernel.DecoderStack(steps)
        self.float_kernel = kernel if float_weights in groups else None

    def check_cache_for_kernel_layers(self) -> None:
        """The C++ step reads float32, bfloat16 or int8 caches: with another cache dtype (float16) the decoder
        steps through its Python layers, and says so."""
        cache = self.kv_dtype or self.layer_norm.weight.dtype
        if self.layer_steps is None or cache in (torch.float32, torch.bfloat16, torch.int8):
            return
        logging.getLogger(__name__).warning("a %s KV cache: the decoder steps through its Python layers (the C++ "
                                            "step reads float32, bfloat16 or int8 caches)", cache)
        self.layer_steps = self.float_kernel = None

    def use_float_kernel_layers(self, kernel) -> bool:
        """A float32 or bfloat16 CPU decoder's one-column step through the kernel's C++ layers over its float
        linear (`linear_f32`), the final layer norm and output heads too. -> whether it took them (not for
        another dtype or device)."""
        weight = self.layer_norm.weight
        if kernel is None or weight.device.type != "cpu" or weight.dtype not in (torch.float32, torch.bfloat16):
            return False
        self.use_kernel_layers(kernel, python_layers=False)
        return self.layer_steps is not None

    def fuse_projections(self) -> None:
        """After loading: fuse each self-attention's q/k/v projections (see Attention.fuse_qkv), and the
        codebooks' output heads into one (codebooks x vocab, width) projection: one matmul instead of four."""
        for layer in self.layers:
            layer.self_attn.fuse_qkv()
        first = self.lm_heads[0].weight
        fused = FastLinear(first.shape[1], first.shape[0] * len(self.lm_heads), bias=False, device=first.device,
                           dtype=first.dtype)
        with torch.no_grad():
            fused.weight.copy_(torch.cat([head.weight for head in self.lm_heads]))
        self.lm_head = fused
        del self.lm_heads

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        """(rows, time, width) -> logits (rows, codebooks, time, vocab) in float32."""
        if hasattr(self, "lm_heads"):  # not fused (yet)
            return torch.stack([head(x) for head in self.lm_heads], dim=1).float()
        rows, time, _ = x.shape
        logits = self.lm_head(x).view(rows, time, self.config.num_codebooks, self.config.vocab_size)
        return logits.transpose(1, 2).float()

    def prepare(self) -> None:
        """Build the non-persistent position table on the weights' device and dtype (after loading)."""
        weight = self.layer_norm.weight
        table = sinusoidal_positions(self.config.max_position_embeddings, self.config.hidden_size)
        self.positions = table.to(device=weight.device, dtype=weight.dtype)

    # -- per-sequence state -------------------------------------------------------------------------------

    def allocate_cache(self, rows: int, capacity: int, zeroed: bool | None = None) -> KVCache:
        """zeroed (default: everywhere but the CPU) must be True for `forward_static`, which attends over the
        whole capacity under a mask: masked garbage could be NaN, and NaN times a zero weight is NaN. The
        eager step reads only written positions, so on the CPU the fill is skipped."""
        if zeroed is None:
            zeroed = self.layer_norm.weight.device.type != "cpu"
        if capacity > self.config.max_position_embeddings:
            raise ValueError(f"cache capacity {capacity} exceeds the model's "
                             f"{self.config.max_position_embeddings} positions")
        weight = self.layer_norm.weight  # the norms stay float even when the linear layers are int8
        return KVCache.allocate(self.config.num_hidden_layers, rows, self.config.num_attention_heads,
                                self.config.head_dim, capacity, self.kv_dtype or weight.dtype, weight.device, zeroed)

    def cross_attention_kv(self, hidden: torch.Tensor, mask: torch.Tensor) -> CrossAttentionKV:
        """Keys/values of the conditioning for every layer. hidden: (rows, text_len, width), already projected
        and zeroed where masked; mask: (rows, text_len), 1 where a row may attend."""
        # All-zero rows (guidance's unconditional row) project to exact zeros (no bias): project only the rest.
        live = hidden.flatten(1).any(dim=1)
        projected = hidden if bool(live.all()) else hidden[live]
        keys, values = [], []
        for layer in self.layers:
            k, v = layer.encoder_attn.project_kv(projected)
            keys.append(k)
            values.append(v)
        keys, values = torch.stack(keys), torch.stack(values)
        if projected is not hidden:
            shape = (keys.shape[0], hidden.shape[0], *keys.shape[2:])
            full_keys, full_values = keys.new_zeros(shape), values.new_zeros(shape)
            full_keys[:, live], full_values[:, live] = keys, values
            keys, values = full_keys, full_values
        additive = (1.0 - mask.to(hidden.dtype))[:, None, None, :] * torch.finfo(hidden.dtype).min
        return CrossAttentionKV(keys, values, additive)

    # -- forward ------------------------------------------------------------------------------------------

    def embed(self, tokens: torch.Tensor, start: int) -> torch.Tensor:
        """tokens: (codebooks, time) -> (time, width) summed embeddings plus positions start..start+time."""
        summed = sum(self.embed_tokens[k](tokens[k]) for k in range(self.config.num_codebooks))
        if start + tokens.shape[1] > self.positions.shape[0]:
            raise ValueError(f"position {start + tokens.shape[1]} is past the model's "
                             f"{self.positions.shape[0]} positions")
        return summed * self.embed_scale + self.positions[start: start + tokens.shape[1]]

    def forward(self, tokens: list[torch.Tensor], caches: list[KVCache], crosses: list[CrossAttentionKV],
                last_only: bool = True) -> list[torch.Tensor]:
        """Advance a batch of sequences. tokens[i]: (codebooks, time) new input columns of sequence i, all
        sequences with the same `time`; caches[i] is extended in place. Returns logits[i]:
        (rows_i, codebooks, time or 1, vocab) in float32."""
        # A step, or a short prefill chunk, runs on the kernel's pool with torch single-threaded: torch's team
        # woke for every small op (100-200 us each for a layer norm or a mask of a 4-column chunk here).
        # So does a float decoder's step whose linears take the kernel's linear_f32 at this row count.
        rows = sum(c.rows for c in caches)
        if self.float_kernel is None:
            pooled = self.layer_steps is not None and all(t.shape[1] <= POOLED_COLUMNS for t in tokens)
        else:  # a float prefill, or a step of many rows, runs torch's team
            pooled = self._takes_cpp_step(tokens[0].shape[1], rows)
        if not pooled and self.kernel_rows:
            pooled = rows * tokens[0].shape[1] in self.kernel_rows
        with _attention_backends(self.layer_norm.weight.device), \
                pooled_step() if pooled else contextlib.nullcontext():
            return self._forward(tokens, caches, crosses, last_only)

    def _forward(self, tokens, caches, crosses, last_only):
        times = {t.shape[1] for t in tokens}
        if len(times) != 1:
            raise ValueError("every sequence in a batched step must feed the same number of columns")
        time = times.pop()
        rows = [cache.rows for cache in caches]
        x = torch.cat([self.embed(t, c.length)[None].expand(r, -1, -1) for t, c, r in zip(tokens, caches, rows)])
        bounds = [0]
        for r in rows:
            bounds.append(bounds[-1] + r)
        if self._takes_cpp_step(time, bounds[-1]):
            x = self._fused_layers(x, bounds, caches, crosses)
            if self.float_kernel is not None:
                for cache in caches:
                    cache.length += time
                logits = self._kernel_heads(x)
                return [logits[bounds[i]: bounds[i + 1]] for i in range(len(caches))]
        else:
            for index, layer in enumerate(self.layers):
                x = self._layer(layer, index, x, bounds, caches, crosses, time)
        for cache in caches:
            cache.length += time
        x = self.layer_norm(x)
        if last_only:
            x = x[:, -1:]
        logits = self.heads(x)
        return [logits[bounds[i]: bounds[i + 1]] for i in range(len(caches))]

    def forward_static(self, tokens: torch.Tensor, lengths: torch.Tensor, caches: list[KVCache],
                       crosses: list[CrossAttentionKV]) -> torch.Tensor:
        """One column per sequence with every shape fixed, for CUDA graphs: tokens (sequences, codebooks, 1),
        lengths (sequences,) int64 on the device = each cache's length. Attention runs over the whole cache
        capacity with a mask (so the caches must be zero-filled: `allocate_cache(zeroed=True)`), writes go
        to index `lengths`. The caller advances `cache.length` (and `lengths`)
        afterwards. Returns logits (rows, codebooks, 1, vocab) float32 for all rows in order."""
        with _attention_backends(self.layer_norm.weight.device):
            return self._forward_static(tokens, lengths, caches, crosses)

    def _forward_static(self, tokens, lengths, caches, crosses):
        rows = [cache.rows for cache in caches]
        embedded = sum(self.embed_tokens[k](tokens[:, k]) for k in range(self.config.num_codebooks))
        embedded = embedded * self.embed_scale + self.positions[lengths][:, None]  # (sequences, 1, width)
        x = torch.cat([embedded[i: i + 1].expand(r, -1, -1) for i, r in enumerate(rows)])
        bounds = [0]
        for r in rows:
            bounds.append(bounds[-1] + r)
        for index, layer in enumerate(self.layers):
            x = self._layer(layer, index, x, bounds, caches, crosses, 1, lengths)
        x = self.layer_norm(x)
        return self.heads(x)

    def _fused_layers(self, x: torch.Tensor, bounds: list[int], caches: list[KVCache],
                      crosses: list[CrossAttentionKV]) -> torch.Tensor:
        """Every layer of a one-column step in one call to the kernel's C++ `DecoderStack` (`layer_steps`): the
        same arithmetic as `_layer`, bit for bit, without Python or ATen between the linears."""
        for cache in caches:
            if cache.length + 1 > cache.capacity:
                raise ValueError(f"KV cache full: {cache.length + 1} positions > capacity {cache.capacity}")
        empty = x.new_empty(0)
        return self.layer_steps.step(x.float(), bounds, [c.keys for c in caches], [c.values for c in caches],
                                     [empty if c.key_scales is None else c.key_scales for c in caches],
                                     [empty if c.value_scales is None else c.value_scales for c in caches],
                                     [c.length for c in caches], [kv.keys for kv in crosses],
                                     [kv.values for kv in crosses], [kv.mask for kv in crosses])

    def _takes_cpp_step(self, columns: int, rows: int) -> bool:
        """One column through the C++ layers: always for a quantized decoder; for a float one while its rows
        fit one pass of `linear_f32` over the weights (FLOAT_STEP_ROWS), past which torch's matmul on its team
        reads them once for all rows."""
        if columns != 1 or self.layer_steps is None:
            return False
        return self.float_kernel is None or rows <= FLOAT_STEP_ROWS

    def _kernel_heads(self, x: torch.Tensor) -> torch.Tensor:
        """A float stack's float32 output (rows, 1, width) -> logits (rows, codebooks, 1, vocab): the final layer
        norm in float32 and the output heads through the kernel's linear (on its pool: torch runs single-threaded
        during the step)."""
        norm = self.layer_norm
        x = F.layer_norm(x, norm.normalized_shape, norm.weight.float(), norm.bias.float(), norm.eps)
        logits = self.float_kernel.linear_f32(x, self.lm_head.weight)
        return logits.view(x.shape[0], 1, self.config.num_codebooks, self.config.vocab_size).transpose(1, 2)

    def _norm(self, norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
        if self.layer_norm_op is not None:
            return self.layer_norm_op(x, norm.weight, norm.bias, norm.eps)
        return norm(x)

    def _layer(self, layer: DecoderLayer, index: int, x: torch.Tensor, bounds: list[int],
               caches: list[KVCache], crosses: list[CrossAttentionKV], time: int,
               lengths: torch.Tensor | None = None) -> torch.Tensor:
        attn = layer.self_attn
        h = self._norm(layer.self_attn_layer_norm, x)
        q, k, v = attn.project_qkv(h)
        outputs = []
        for i, cache in enumerate(caches):
            rows = slice(bounds[i], bounds[i + 1])
            if lengths is not None:
                outputs.append(self._static_attention(index, q[rows], k[rows], v[rows], cache, lengths[i: i + 1]))
                continue
            start, end = cache.length, cache.length + time
            if end > cache.capacity:
                raise ValueError(f"KV cache full: {end} positions > capacity {cache.capacity}")
            if cache.key_scales is not None:  # int8: each head vector with its scale (the C++ step's quantizer)
                for data, scales, new in ((cache.keys, cache.key_scales, k[rows]),
                                          (cache.values, cache.value_scales, v[rows])):
                    data[index, :, :, start:end], scales[index, :, :, start:end] = self.kv_quantizer(new)
            else:
                cache.keys[index, :, :, start:end] = k[rows]
                cache.values[index, :, :, start:end] = v[rows]
            keys, values = cache.keys[index, :, :, :end], cache.values[index, :, :, :end]
            if self.one_query_attention is not None:  # causal: query t sees the cache up to start + t
                scales = {} if cache.key_scales is None else dict(
                    key_scales=cache.key_scales[index, :, :, :end], value_scales=cache.value_scales[index, :, :, :end])
                outputs.append(self.one_query_attention(q[rows], keys, values, None, start, **scales))
                continue
            mask = None
            if time > 1:  # prefill: causal within the new columns, everything before them visible
                mask = torch.ones(time, end, dtype=torch.bool, device=x.device).tril(diagonal=start)
            outputs.append(F.scaled_dot_product_attention(q[rows].to(cache.keys.dtype), keys, values, attn_mask=mask))
        x = x + self._merge(attn, _join(outputs).to(x.dtype))

        cross = layer.encoder_attn
        h = self._norm(layer.encoder_attn_layer_norm, x)
        q = cross.split_heads(cross.q_proj(h))
        attend = self.one_query_attention or _sdpa
        outputs = [attend(q[bounds[i]: bounds[i + 1]], kv.keys[index], kv.values[index], kv.mask)
                   for i, kv in enumerate(crosses)]
        x = x + self._merge(cross, _join(outputs))

        h = self._norm(layer.final_layer_norm, x)
        hidden = layer.fc1(h)
        if not getattr(layer.fc1, "applies_gelu", False):  # int8 kernel layers may apply it themselves
            hidden = F.gelu(hidden)
        return x + layer.fc2(hidden)

    @staticmethod
    def _static_attention(index: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: KVCache,
                          length: torch.Tensor) -> torch.Tensor:
        """Write k, v (rows, heads, 1, head_dim) at position `length` (a 1-element device tensor) and attend
        over the full capacity, masking positions past it."""
        keys, values = cache.keys[index], cache.values[index]
        keys.index_copy_(2, length, k.to(keys.dtype))
        values.index_copy_(2, length, v.to(values.dtype))
        visible = torch.arange(cache.capacity, device=q.device) <= length
        return F.scaled_dot_product_attention(q.to(keys.dtype), keys, values,
                                              attn_mask=visible[None, None, None, :]).to(q.dtype)

    @staticmethod
    def _merge(attn: Attention, heads: torch.Tensor) -> torch.Tensor:
        """(rows, heads, time, head_dim) -> out_proj of (rows, time, width)"""
        rows, _, time, _ = heads.shape
        return attn.out_proj(heads.transpose(1, 2).reshape(rows, time, -1))


POOLED_COLUMNS = 16  # new columns per sequence up to which a quantized forward runs on the kernel's pool
FLOAT_STEP_ROWS = 4  # rows linear_f32 computes in one pass over the weights (f32_gemv.h's row groups)


def _sdpa(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
