"""FrameResolver: each frame comes out at the column holding its last codebook, equal to the reverted grid."""

from __future__ import annotations

import pytest
import torch

from musicgen_core.delay import DelayGrid, build_delayed, revert_delayed
from musicgen_core.resolver import FrameResolver

PAD = 2048
LAYOUTS = [pytest.param([0, 1, 2, 3], id="mono"), pytest.param([0, 0, 1, 1, 2, 2, 3, 3], id="stereo")]


def random_frames(codebooks: int, n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, PAD, (codebooks, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("delays", LAYOUTS)
@pytest.mark.parametrize("total", [1, 2, 3, 4, 11], ids=lambda n: f"{n}frames")
def test_frames_come_out_when_their_last_codebook_arrives(delays, total):
    grid = build_delayed(random_frames(len(delays), total), delays, PAD, total_frames=total)
    resolver = FrameResolver.start(delays, total_frames=total)
    seen = []
    for column in range(1, grid.shape[1]):  # the last column, total + max_delay, completes the last frame
        for frame in resolver.push_column(grid[:, column], column):
            assert column == frame.index + 1 + max(delays)
            seen.append(frame)
    assert [f.index for f in seen] == list(range(total))
    assert torch.equal(torch.stack([f.codes for f in seen], dim=1), revert_delayed(grid, delays, total))
    assert resolver.end() == []  # a bounded stream run to its last column misses nothing


@pytest.mark.parametrize("delays", LAYOUTS)
@pytest.mark.parametrize("prompt", [0, 2, 5], ids=lambda n: f"prompt{n}")
def test_follows_the_generation_grid(delays, prompt):
    """Columns as DelayGrid.place returns them (prompt cells forced, pads after a bounded stream)."""
    total = prompt + 7
    codebooks = len(delays)
    grid = DelayGrid.start(random_frames(codebooks, prompt, 1), delays, PAD, capacity=total + 1 + max(delays),
                           total_frames=total)
    resolver = FrameResolver.start(delays, total_frames=total)
    out = resolver.push_frames(grid.frames(0, prompt))
    assert [f.index for f in out] == list(range(prompt))
    sampler = torch.Generator().manual_seed(2)
    while not grid.finished:
        index = grid.next_column
        column = grid.place(torch.randint(0, PAD, (codebooks,), generator=sampler))
        completed = resolver.push_column(column, index)
        assert [f.index for f in completed] == ([index - 1 - max(delays)] if index - 1 - max(delays) >= prompt else [])
        out += completed
    assert [f.index for f in out] == list(range(total))
    assert torch.equal(torch.stack([f.codes for f in out], dim=1), grid.frames(0, total))
    assert resolver.end() == []


@pytest.mark.parametrize("delays", LAYOUTS)
def test_end_of_an_unbounded_stream_drops_partial_frames(delays):
    frames = random_frames(len(delays), 10)
    grid = build_delayed(frames, delays, PAD)
    resolver = FrameResolver.start(delays)
    out = []
    for column in range(1, 9):  # columns 1..8: frames 0..4 complete, 5..7 have some codebooks
        out += resolver.push_column(grid[:, column])
    assert [f.index for f in out] == [0, 1, 2, 3, 4]
    assert resolver.end() == [5, 6, 7]
    with pytest.raises(ValueError):
        resolver.push_column(grid[:, 9])


def test_clone_is_independent():
    delays = [0, 1, 2, 3]
    grid = build_delayed(random_frames(4, 8), delays, PAD)
    resolver = FrameResolver.start(delays)
    for column in range(1, 6):
        resolver.push_column(grid[:, column])
    twin = resolver.clone()
    resolver.push_column(torch.zeros(4, dtype=torch.long))  # diverge the original
    frame = twin.push_column(grid[:, 6])[0]
    assert frame.index == 2 and torch.equal(frame.codes, grid[[0, 1, 2, 3], [3, 4, 5, 6]])


def test_misuse_is_refused():
    resolver = FrameResolver.start([0, 1, 2, 3])
    with pytest.raises(ValueError, match="expected column 1"):
        resolver.push_column(torch.zeros(4, dtype=torch.long), index=2)
    with pytest.raises(ValueError):
        resolver.push_column(torch.zeros(8, dtype=torch.long))
    resolver.push_column(torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="partly known"):
        resolver.push_frames(torch.zeros(4, 1, dtype=torch.long))
    with pytest.raises(ValueError):
        FrameResolver.start([1, 0])
