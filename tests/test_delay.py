"""The delay grid owns the delay pattern: each step's column completes the frame whose last codebook it holds,
and the grid's answers (completed frame, next column's first frame, frames per positions) agree with the layout."""

from __future__ import annotations

import pytest
import torch

from musicgen_core.delay import DelayGrid, build_delayed, columns_for, max_frames, revert_delayed

PAD = 2048
LAYOUTS = [pytest.param([0, 1, 2, 3], id="mono"), pytest.param([0, 0, 1, 1, 2, 2, 3, 3], id="stereo")]


def random_frames(codebooks: int, n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, PAD, (codebooks, n), generator=torch.Generator().manual_seed(seed))


def run(grid: DelayGrid, layout: torch.Tensor | None = None, seed: int = 2) -> list[tuple[int, int | None]]:
    """Place columns until the grid is finished (or full): `layout`'s columns if given, else random tokens.
    -> (column, completed frame) for each column placed."""
    sampler, placed = torch.Generator().manual_seed(seed), []
    while not grid.finished and grid.next_column < grid.capacity:
        column = grid.next_column
        tokens = layout[:, column] if layout is not None else torch.randint(0, PAD, (len(grid.delays),),
                                                                             generator=sampler)
        grid.place(tokens)
        placed.append((column, grid.completed_frame()))
    return placed


@pytest.mark.parametrize("delays", LAYOUTS)
@pytest.mark.parametrize("total", [1, 2, 3, 4, 11], ids=lambda n: f"{n}frames")
def test_a_frame_completes_at_the_column_holding_its_last_codebook(delays, total):
    frames = random_frames(len(delays), total)
    layout = build_delayed(frames, delays, PAD, total_frames=total)
    grid = DelayGrid.start(frames[:, :0], delays, PAD, capacity=columns_for(total, delays), total_frames=total)
    placed = run(grid, layout)
    completed = [(column, frame) for column, frame in placed if frame is not None]
    assert [frame for _, frame in completed] == list(range(total))
    assert all(column == frame + 1 + max(delays) for column, frame in completed)
    assert torch.equal(torch.stack([grid.frame(f) for f in range(total)], dim=1), revert_delayed(layout, delays, total))
    assert grid.finished and placed[-1][0] == columns_for(total, delays) - 1  # the last column is the last one


@pytest.mark.parametrize("delays", LAYOUTS)
@pytest.mark.parametrize("prompt", [0, 2, 5], ids=lambda n: f"prompt{n}")
def test_prompt_frames_are_kept_and_generated_ones_complete_in_order(delays, prompt):
    total = prompt + 7
    known = random_frames(len(delays), prompt, 1)
    grid = DelayGrid.start(known, delays, PAD, capacity=columns_for(total, delays), total_frames=total)
    completed = [frame for _, frame in run(grid) if frame is not None and frame >= prompt]
    assert completed == list(range(prompt, total))
    assert torch.equal(grid.frames(0, prompt), known)


@pytest.mark.parametrize("delays", LAYOUTS)
def test_the_next_column_first_touches_the_frame_after_the_last_completed(delays):
    grid = DelayGrid.start(random_frames(len(delays), 3), delays, PAD, capacity=40)
    assert grid.first_frame_of_next_column() == 3  # never a prompt frame
    for _ in range(10):
        grid.place(torch.zeros(len(delays), dtype=torch.long))
        last = grid.completed_frame()
        assert grid.first_frame_of_next_column() == max(3, (last if last is not None else -1) + 1)


def test_an_unbounded_grid_stopped_early_completes_only_whole_frames():
    delays = [0, 1, 2, 3]
    grid = DelayGrid.start(random_frames(4, 0), delays, PAD, capacity=9)
    completed = [frame for _, frame in run(grid) if frame is not None]
    assert completed == [0, 1, 2, 3, 4]  # columns 1..8: frames 5..7 have codebooks never generated
    with pytest.raises(ValueError, match="full"):
        grid.place(torch.zeros(4, dtype=torch.long))


@pytest.mark.parametrize("delays", LAYOUTS)
def test_frames_and_positions_convert_both_ways(delays):
    for frames in (1, 10, 1500):
        assert max_frames(columns_for(frames, delays), delays) == frames
    assert max_frames(2048, [0, 1, 2, 3]) == 2044  # musicgen-small: 2048 positions
