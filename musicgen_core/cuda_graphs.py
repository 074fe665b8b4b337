"""CUDA graphs over the decoder step: one capture per set of sequences, replayed while the set stays the same.

A step of musicgen-small launches a few hundred small kernels; on a GPU their launch overhead, not the math,
bounds the step. `forward_static` keeps every shape and address fixed (attention over the whole cache with a
mask, writes at a device-side index), so the step can be captured once and replayed. A set changes when a
sequence joins, leaves, is re-primed or gets new conditioning; the next step then runs eagerly, and the one
after captures the new set.
"""

from __future__ import annotations

import torch

from .decoder import MusicgenDecoder
from .generation import SequenceState


def _key(states: list[SequenceState]) -> tuple:
    return tuple((id(s.cache), id(s.cross)) for s in states)


class GraphedStep:
    """One captured step for a fixed list of sequences, each reading one column."""

    def __init__(self, decoder: MusicgenDecoder, states: list[SequenceState]):
        device = decoder.layer_norm.weight.device
        codebooks = decoder.config.num_codebooks
        self.key = _key(states)
        # the captured addresses belong to these objects: holding them keeps their ids from being reused
        self.captured = [(s.cache, s.cross) for s in states]
        self.rows = [s.cache.rows for s in states]
        self.tokens = torch.zeros(len(states), codebooks, 1, dtype=torch.long, device=device)
        self.lengths = torch.zeros(len(states), dtype=torch.long, device=device)
        self._load(states)
        caches, crosses = [s.cache for s in states], [s.cross for s in states]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up (writes the same cache slots the real step will overwrite)
            for _ in range(2):
                decoder.forward_static(self.tokens, self.lengths, caches, crosses)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = decoder.forward_static(self.tokens, self.lengths, caches, crosses)

    def _load(self, states: list[SequenceState]) -> None:
        self.tokens.copy_(torch.stack([s.pending_columns() for s in states]), non_blocking=True)
        self.lengths.copy_(torch.tensor([s.cache.length for s in states]), non_blocking=True)

    def run(self, states: list[SequenceState]) -> list[torch.Tensor]:
        self._load(states)
        self.graph.replay()
        for state in states:
            state.cache.length += 1
        out, start = [], 0
        for rows in self.rows:
            out.append(self.logits[start: start + rows])
            start += rows
        return out


class GraphCache:
    """The graph of the current set of sequences; captured once a set repeats on consecutive steps."""

    def __init__(self):
        self.graph: GraphedStep | None = None
        self.last_key: tuple | None = None

    def logits(self, decoder: MusicgenDecoder, states: list[SequenceState]) -> list[torch.Tensor] | None:
        """Logits (rows, codebooks, 1, vocab) per state via a graph, or None when the step should run eagerly."""
        if any(s.pending_columns().shape[1] != 1 for s in states):
            return None
        key = _key(states)
        if self.graph is not None and self.graph.key == key and all(
                cache is s.cache and cross is s.cross for (cache, cross), s in zip(self.graph.captured, states)):
            return self.graph.run(states)
        seen_before, self.last_key = self.last_key == key, key
        if not seen_before:
            return None
        self.graph = None  # free the old capture's memory pool first
        self.graph = GraphedStep(decoder, states)
        return self.graph.run(states)
