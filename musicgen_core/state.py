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
        """A cache of these rows, in this order (a row may repeat): the history a new set of prompts continues."""
        index = torch.tensor(rows, device=self.keys.device)
        scales = (None, None) if self.key_scales is None else (self.key_scales.index_select(1, index),
                                                               self.value_scales.index_select(1, index))
        return KVCache(self.keys.index_select(1, index), self.values.index_select(1, index), self.length, *scales)

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
