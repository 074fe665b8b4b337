"""`MusicGen`: load a checkpoint, condition on text, continue audio, generate codes and audio offline.

The sequence pieces (`start_sequence`, `step`) are the ones the server uses; `generate` steps sequences the same
way, then decodes their codes offline (`decode_audio`; the server streams them through `streaming_codec`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from .config import MusicGenConfig
from .cpu import has_bf16
from .decoder import MusicgenDecoder
from .delay import DelayGrid, columns_for, max_frames
from .encodec import Encodec
from .generation import SequenceState, step_sequences
from .modules import MusicGenModules
from .loading import check_and_load, read_config, read_state_dict, resolve_checkpoint
from .sampling import SamplingParams, make_generator
from .state import CrossAttentionKV
from .tokenizer import T5Tokenizer


@dataclass(frozen=True)
class TextConditioning:
    """A prompt's text-encoder states, projected to the decoder width: hidden (tokens, width).
    text None means unconditional (the null conditioning)."""

    text: str | None
    hidden: torch.Tensor | None


@dataclass
class GenerationOutput:
    codes: torch.Tensor  # (batch, codebooks, frames) new frames, delay reverted, prompt excluded
    prompt_codes: torch.Tensor | None  # (batch, codebooks, prompt_frames) or None
    audio: torch.Tensor  # (batch, channels, samples) of prompt + new frames, float32
    steps: int
    decode_seconds: float  # wall time of the decoder steps alone


KV_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.int8)


def default_kv_dtype(decoder, quantize: str | None) -> torch.dtype | None:
    """A quantized decoder's cache: int8 with our kernel (its fidelity against fp32 measured as bf16's, half of
    bf16's bytes, a quarter of fp32's), else bfloat16 on CPUs with bf16 instructions; a float decoder's: its
    weights' dtype (None)."""
    if quantize is None:
        return None
    if decoder.kv_quantizer is not None:
        return torch.int8
    return torch.bfloat16 if has_bf16() else None


class MusicGen:
    def __init__(self, config: MusicGenConfig, modules: MusicGenModules, tokenizer: T5Tokenizer,
                 cuda_graphs: bool = False):
        self.config = config
        self.modules = modules.eval()
        self.tokenizer = tokenizer
        self.modules.decoder.prepare()
        self.graphs = None
        if cuda_graphs:
            from .cuda_graphs import GraphCache
            self.graphs = GraphCache()

    # -- loading ------------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path_or_id: str | Path, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32, quantize: str | None = None,
                        cuda_graphs: bool | None = None, kv_dtype: torch.dtype | None = None) -> "MusicGen":
        """Load a checkpoint directory, a hub id from the local cache, or 'demo' (a random-weight model).
        quantize='int8' stores the decoder's linear weights as int8 (CPU), 'int4' (or int4-g32/g64/g128) as
        group-wise int4 (quantize.QUANTIZATIONS). cuda_graphs (default: on for CUDA
        devices) replays captured decoder steps. kv_dtype is the self-attention cache's dtype (default: the
        weights' dtype; with quantize, int8 through our kernel, else bfloat16 on CPUs with bf16 instructions):
        past ~10 s of context,
        reading the fp32 cache costs a CPU step more than reading the int8 weights (550 MB vs 344 MB per
        musicgen-small step at 28 s). kv_dtype int8 (with our kernel's quantized decoder) keeps each head vector
        of the cache as int8 with a float scale: half of bf16's bytes."""
        if kv_dtype is not None and kv_dtype not in KV_DTYPES:
            raise ValueError(f"kv_dtype must be one of {KV_DTYPES}, got {kv_dtype}")
        if str(path_or_id) == "demo":
            from .demo import demo_checkpoint
            path_or_id = demo_checkpoint()
        directory = resolve_checkpoint(path_or_id)
        config = read_config(directory)
        tokenizer = T5Tokenizer(directory / "spiece.model")
        with torch.device("meta"):
            modules = MusicGenModules(config)
        check_and_load(modules, read_state_dict(directory, dtype), directory)
        modules.to(device)
        modules.decoder.fuse_projections()
        if quantize is not None:
            from .quantize import quantize_decoder
            quantize_decoder(modules.decoder, quantize)
            _copy_out_of_the_checkpoint(modules)
        elif torch.device(device).type == "cpu" and config.decoder.ffn_dim >= 1024:
            from .int8_kernel import load_int8_kernel
            modules.decoder.choose_linear_forms()  # a prefill's linears
            modules.decoder.use_float_kernel_layers(load_int8_kernel())  # a step's: the C++ layers where it loads
        if kv_dtype == torch.int8 and modules.decoder.kv_quantizer is None:
            raise ValueError("an int8 KV cache needs our kernel's decoder (quantize int8 or int4 on a CPU with AVX2)")
        modules.decoder.kv_dtype = kv_dtype or default_kv_dtype(modules.decoder, quantize)
        modules.decoder.check_cache_for_kernel_layers()
        if cuda_graphs is None:
            cuda_graphs = torch.device(device).type == "cuda"
        if cuda_graphs and torch.device(device).type != "cuda":
            raise ValueError("cuda_graphs needs a CUDA device")
        return cls(config, modules, tokenizer, cuda_graphs=cuda_graphs)

    @property
    def device(self) -> torch.device:
        return self.modules.decoder.layer_norm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.modules.decoder.layer_norm.weight.dtype

    @property
    def max_frames(self) -> int:
        """Whole frames one sequence can hold (prompt included): the decoder's position limit."""
        decoder = self.config.decoder
        return max_frames(decoder.max_position_embeddings, decoder.delays)

    @property
    def decoder(self) -> MusicgenDecoder:
        return self.modules.decoder

    @property
    def codec(self) -> Encodec:
        return self.modules.audio_encoder

    def default_sampling(self, **overrides) -> SamplingParams:
        return SamplingParams.from_defaults(self.config.generation, **overrides)

    # -- conditioning -------------------------------------------------------------------------------------

    @torch.inference_mode()
    def encode_text(self, texts: list[str | None]) -> list[TextConditioning]:
        """Run the text encoder over the prompts as one padded batch; None or '' is unconditional."""
        real = [t for t in texts if t]
        hidden_by_text: dict[str, torch.Tensor] = {}
        if real:
            batch = self.tokenizer.batch(real)
            mask = batch.attention_mask.to(self.device)
            hidden = self.modules.text_encoder(batch.input_ids.to(self.device), mask)
            if hasattr(self.modules, "enc_to_dec_proj"):
                hidden = self.modules.enc_to_dec_proj(hidden)
            hidden = hidden * mask[..., None].to(hidden.dtype)
            for row, text in enumerate(real):
                hidden_by_text[text] = hidden[row, : int(batch.attention_mask[row].sum())]
        return [TextConditioning(t, hidden_by_text[t]) if t else TextConditioning(None, None) for t in texts]

    @torch.inference_mode()
    def cross_attention(self, conditioning: TextConditioning | Sequence[TextConditioning],
                        guidance: bool) -> CrossAttentionKV:
        """Rows: one conditional row per conditioning (weighted prompts), then the unconditional row under
        guidance. The unconditional row attends to nothing (zero states, fully masked), which is transformers'
        null conditioning; prompts of different lengths are padded with masked zero states."""
        if isinstance(conditioning, TextConditioning):
            conditioning = [conditioning]
        width = self.config.decoder.hidden_size
        hiddens = [torch.zeros(1, width, dtype=self.dtype, device=self.device) if c.hidden is None else c.hidden
                   for c in conditioning]
        masks = [torch.zeros(1, dtype=torch.long, device=self.device) if c.hidden is None
                 else torch.ones(c.hidden.shape[0], dtype=torch.long, device=self.device) for c in conditioning]
        if guidance:
            hiddens.append(torch.zeros_like(hiddens[0]))
            masks.append(torch.zeros_like(masks[0]))
        longest = max(h.shape[0] for h in hiddens)
        if any(h.shape[0] != longest for h in hiddens):
            hiddens = [F.pad(h, (0, 0, 0, longest - h.shape[0])) for h in hiddens]
            masks = [F.pad(m, (0, longest - m.shape[0])) for m in masks]
        return self.decoder.cross_attention_kv(torch.stack(hiddens), torch.stack(masks))

    # -- audio --------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def encode_audio(self, audio: torch.Tensor) -> torch.Tensor:
        """audio: (channels, samples) at the model's rate -> codes (codebooks, frames); stereo models encode
        left and right separately and interleave their codebooks (even = left, odd = right)."""
        channels = self.config.audio_channels
        if audio.dim() != 2 or audio.shape[0] != channels:
            raise ValueError(f"audio prompt must be (channels={channels}, samples), got {tuple(audio.shape)}")
        if audio.shape[1] == 0:
            raise ValueError("audio prompt is empty")
        if not torch.isfinite(audio).all():
            raise ValueError("audio prompt contains NaN or Inf samples")
        audio = audio.to(device=self.device, dtype=self.dtype)
        per_channel = [self.codec.encode(audio[c: c + 1][None])[0] for c in range(channels)]
        if channels == 1:
            return per_channel[0]
        codes = torch.stack(per_channel, dim=1)  # (quantizers, 2, frames)
        return codes.reshape(-1, codes.shape[-1])

    @torch.inference_mode()
    def decode_audio(self, codes: torch.Tensor) -> torch.Tensor:
        """codes: (codebooks, frames) -> audio (channels, frames * hop) float32."""
        channels = self.config.audio_channels
        streams = [codes[c::channels] for c in range(channels)]
        audio = [self.codec.decode(s[None].to(self.device))[0, 0] for s in streams]
        return torch.stack(audio).float()

    # -- generation ---------------------------------------------------------------------------------------

    def start_sequence(self, conditioning: TextConditioning | Sequence[TextConditioning], params: SamplingParams,
                       prompt_codes: torch.Tensor | None = None, total_frames: int | None = None,
                       capacity: int | None = None, weights: Sequence[float] | None = None) -> SequenceState:
        """A fresh sequence: `total_frames` counts prompt frames too (None = unbounded); `capacity` is the
        number of decoder positions to allocate (default: what total_frames needs, else the whole window).
        Several conditionings are weighted prompts, `weights` their normalised weights (prompts.py)."""
        if isinstance(conditioning, TextConditioning):
            conditioning = [conditioning]
        weights = tuple(weights) if weights is not None else (1.0,) * len(conditioning)
        if len(weights) != len(conditioning):
            raise ValueError(f"{len(weights)} weights for {len(conditioning)} prompts")
        decoder_config = self.config.decoder
        if prompt_codes is None:
            prompt_codes = torch.zeros(decoder_config.num_codebooks, 0, dtype=torch.long)
        limit = decoder_config.max_position_embeddings
        if capacity is None:
            capacity = limit if total_frames is None else columns_for(total_frames, decoder_config.delays)
        if capacity > limit:
            raise ValueError(f"{capacity} decoder positions requested; the model has {limit} "
                             f"(at most {max_frames(limit, decoder_config.delays)} frames per sequence)")
        if prompt_codes.shape[1] + 1 >= capacity:
            raise ValueError(f"audio prompt of {prompt_codes.shape[1]} frames leaves no room in {capacity} positions")
        rows = len(conditioning) + (1 if params.uses_guidance else 0)
        grid = DelayGrid.start(prompt_codes.cpu(), decoder_config.delays, decoder_config.pad_token_id,
                               capacity, total_frames)
        return SequenceState(grid=grid, cache=self.decoder.allocate_cache(rows, capacity),
                             cross=self.cross_attention(conditioning, params.uses_guidance), params=params,
                             generator=make_generator(params.seed, self.device), prompt_weights=weights)

    @torch.inference_mode()
    def step(self, states: list[SequenceState], max_prefill_columns: int | None = None,
             prefills: list[tuple[SequenceState, torch.Tensor]] = ()):
        """One column for each state; prompts cut into chunks, other caches fed alongside: step_sequences."""
        return step_sequences(self.decoder, states, self.graphs, max_prefill_columns, prefills)

    @torch.inference_mode()
    def generate(self, prompts: list[str | None] | str | None = None, *, frames: int | None = None,
                 duration: float | None = None, audio_prompt: torch.Tensor | list[torch.Tensor] | None = None,
                 params: SamplingParams | None = None, batch_size: int | None = None) -> GenerationOutput:
        """Generate `frames` new frames (or `duration` seconds) for each prompt, all prompts stepped together.

        prompts: a text, a list of texts (None or '' = unconditional), or None for one unconditional sample.
        audio_prompt: (channels, samples) to continue from, or one per prompt.
        """
        if prompts is None or isinstance(prompts, str):
            prompts = [prompts]
        new_frames = self.frames_for(frames, duration)
        params = (params or self.default_sampling()).validated()
        audio_prompts = self._per_prompt(audio_prompt, len(prompts))
        prompt_codes = [self.encode_audio(a) if a is not None else None for a in audio_prompts]
        states = []
        for index, conditioning in enumerate(self.encode_text(list(prompts))):
            codes = prompt_codes[index]
            prompt_frames = 0 if codes is None else codes.shape[1]
            seeded = params if params.seed is None else replace(params, seed=params.seed + index)
            states.append(self.start_sequence(conditioning, seeded, codes, total_frames=prompt_frames + new_frames))
        started = time.perf_counter()
        steps = 0
        while not all(s.finished for s in states):
            self.step([s for s in states if not s.finished])
            steps += 1
        decode_seconds = time.perf_counter() - started
        new_codes, prompts_out, audio = [], [], []
        for state, codes in zip(states, prompt_codes):
            grid = state.grid
            all_frames = grid.frames(0, grid.total_frames)
            new_codes.append(all_frames[:, grid.prompt_frames:])
            prompts_out.append(all_frames[:, : grid.prompt_frames])
            audio.append(self.decode_audio(all_frames))
        return GenerationOutput(
            codes=torch.stack(new_codes),
            prompt_codes=torch.stack(prompts_out) if any(c is not None for c in prompt_codes) else None,
            audio=_stack_padded(audio), steps=steps, decode_seconds=decode_seconds)

    def frames_for(self, frames: int | None, duration: float | None) -> int:
        if (frames is None) == (duration is None):
            raise ValueError("give exactly one of frames or duration")
        if frames is None:
            if not duration > 0:
                raise ValueError(f"duration must be > 0 seconds, got {duration}")
            frames = round(duration * self.config.frame_rate)
        if frames < 1:
            raise ValueError(f"frames must be >= 1, got {frames}")
        limit = self.max_frames
        if frames > limit:
            raise ValueError(f"{frames} frames exceed the model's window of {limit} frames "
                             f"({limit / self.config.frame_rate:.1f} s)")
        return frames

    @staticmethod
    def _per_prompt(audio_prompt, count: int) -> list[torch.Tensor | None]:
        if audio_prompt is None:
            return [None] * count
        if isinstance(audio_prompt, torch.Tensor):
            return [audio_prompt] * count
        if len(audio_prompt) != count:
            raise ValueError(f"{len(audio_prompt)} audio prompts for {count} text prompts")
        return list(audio_prompt)


def _copy_out_of_the_checkpoint(modules: nn.Module) -> None:
    """Give the float tensors that remain their own memory. Loaded tensors share the checkpoint file's memory
    map, and quantizing reads every decoder weight, so the whole file stayed resident (an int8 musicgen-small
    process sat at 3 GB RSS while holding 1.1 GB of tensors); once nothing points into the map, it goes."""
    for module in modules.modules():
        if type(module).__module__.startswith(("musicgen_core.int8_kernel", "torch.ao")):
            continue  # quantized layers were built in memory of their own
        for parameter in module.parameters(recurse=False):
            parameter.data = parameter.data.clone()
        for name, buffer in module.named_buffers(recurse=False):
            module._buffers[name] = buffer.clone()


def _stack_padded(audio: list[torch.Tensor]) -> torch.Tensor:
    """Stack (channels, samples) tensors, zero-padding shorter ones on the right."""
    length = max(a.shape[-1] for a in audio)
    return torch.stack([torch.nn.functional.pad(a, (0, length - a.shape[-1])) for a in audio])
