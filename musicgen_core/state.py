"""Per-sequence decoder state: the self-attention KV cache and the cross-attention keys/values.

Both are plain tensors owned by one sequence (one session in the server). The decoder's step function takes
a batch of them and writes into the caches in place, so their storage never moves between steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class KVCache:
    """Self-attention keys and values for every layer of one sequence's rows (one conditional row a prompt
    [, unconditional]).

    keys, values: (layers, rows, heads, capacity, head_dim), preallocated; `length` positions are valid. An int8
    cache keeps each head vector as int8 with a float scale (key_scales, value_scales: (layers, rows, heads,
    capacity)); a float cache has none.
    """

    keys: torch.Tensor
    values: torch.Tensor
    length: int = 0
    key_scales: torch.Tensor | None = None
    value_scales: torch.Tensor | None = None

    @classmethod
    def allocate(cls, layers: int, rows: int, heads: int, head_dim: int, capacity: int,
                 dtype: torch.dtype, device: torch.device | str, zeroed: bool = True) -> "KVCache":
        """zeroed=False leaves the memory as the allocator gives it: for a step that reads only the first
        `length` positions, it spares filling (and on the CPU, faulting in) the whole capacity up front, which
        for a 10 s musicgen-small session is 200 MB and 120-170 ms of its time to first audio."""
        shape = (layers, rows, heads, capacity, head_dim)
        make = torch.zeros if zeroed else torch.empty
        cache = cls(make(shape, dtype=dtype, device=device), make(shape, dtype=dtype, device=device))
        if dtype == torch.int8:
            cache.key_scales = make(shape[:4], dtype=torch.float32, device=device)
            cache.value_scales = make(shape[:4], dtype=torch.float32, device=device)
        return cache

    @property
    def capacity(self) -> int:
        return self.keys.shape[3]

    @property
    def rows(self) -> int:
        return self.keys.shape[1]

    @property
    def nbytes(self) -> int:
        scales = 0 if self.key_scales is None else self.key_scales.numel() * self.key_scales.element_size() * 2
        return self.keys.numel() * self.keys.element_size() * 2 + scales

    def select_rows(self, rows: list[int]) -> "KVCache":
        """A cache of these rows, in this order (a row may repeat): the history a new set of prompts continues.
        Only the `length` positions in use are copied: at 6 s of a musicgen-small window that is ~60 ms instead
        of ~160-290 ms. The rest is left unset on the CPU, whose eager step reads only written positions, and
        zeroed elsewhere (the static step attends over the whole capacity under a mask: see allocate_cache)."""
        index = torch.tensor(rows, device=self.keys.device)
        used = slice(0, self.length)
        make = torch.empty if self.keys.device.type == "cpu" else torch.zeros

        def take(tensor: torch.Tensor) -> torch.Tensor:
            out = make((tensor.shape[0], len(rows), *tensor.shape[2:]), dtype=tensor.dtype, device=tensor.device)
            out[:, :, :, used] = tensor[:, :, :, used].index_select(1, index)
            return out

        scales = (None, None) if self.key_scales is None else (take(self.key_scales), take(self.value_scales))
        return KVCache(take(self.keys), take(self.values), self.length, *scales)

    def clone(self) -> "KVCache":
        scales = (None, None) if self.key_scales is None else (self.key_scales.clone(), self.value_scales.clone())
        return KVCache(self.keys.clone(), self.values.clone(), self.length, *scales)


@dataclass
class CrossAttentionKV:
    """Cross-attention keys/values of one conditioning, computed once and reused by every step.

    keys, values: (layers, rows, heads, text_len, head_dim); mask: (rows, 1, 1, text_len) additive
    (0 where the row attends, the dtype's minimum where it does not, as transformers masks padding).
    """

    keys: torch.Tensor
    values: torch.Tensor
    mask: torch.Tensor

    @property
    def rows(self) -> int:
        return self.keys.shape[1]
