"""Re-primes and long prompts without a stall: the next sequence's cache is filled while the current one plays,
and a long prompt is read a chunk per turn while other sessions play. Neither may change a code: with our
kernel's attention every query is computed on its own, so how a prompt is cut does not change a bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from musicgen_core import MusicGen, WeightedPrompts
from server.engine import Engine, EngineConfig
from server.events import AudioChunk, Finished, Notice, NoticeKind, SessionSpec
from server.frames import FrameSource

WINDOW = EngineConfig(context_frames=40, reprime_keep_frames=16)


@pytest.fixture(scope="module")
def model(mono_checkpoint):
    return MusicGen.from_pretrained(mono_checkpoint, quantize="int8")


def session_spec(model, frames: int, seed: int = 7, **fields) -> SessionSpec:
    fields = {"text": "warm lofi beat", **fields}
    return SessionSpec(params=model.default_sampling(seed=seed), total_frames=frames, max_lead_seconds=None,
                       **fields)


class ColumnsRead:
    """Wraps model.step: the most columns any stepping sequence read in one turn, per turn."""

    def __init__(self, model: MusicGen, monkeypatch):
        self.per_turn: list[int] = []
        step = model.step

        def recording(states, **options):
            cap = options.get("max_prefill_columns")
            widths = [min(s.pending_columns().shape[1], cap or 1 << 30) for s in states]
            self.per_turn.append(max(widths, default=0))
            return step(states, **options)

        monkeypatch.setattr(model, "step", recording)


def run(engine: Engine, *specs: SessionSpec, steer=None) -> list[list]:
    """Every session to its end, turn by turn; -> each session's events. steer(turn, handles) may act."""
    events = [[] for _ in specs]
    handles = [engine.open_session(spec, sink.append) for spec, sink in zip(specs, events)]
    turn = 0
    while engine.sessions or turn == 0:
        engine.turn()
        if steer is not None:
            steer(turn, handles)
        turn += 1
        assert turn < 5000, "the sessions never finished"
    assert all(isinstance(e[-1], Finished) for e in events)
    return events


def codes_of(events: list) -> np.ndarray:
    return np.concatenate([e.codes for e in events if isinstance(e, AudioChunk)], axis=1)


def reprimes_of(events: list) -> int:
    return sum(isinstance(e, Notice) and e.kind == NoticeKind.CONTEXT_REPRIMED for e in events)


def without_preparation(monkeypatch) -> None:
    monkeypatch.setattr(FrameSource, "next_columns", lambda self, most: None)


@pytest.fixture(scope="module")
def int8_cache_model(mono_checkpoint):
    return MusicGen.from_pretrained(mono_checkpoint, quantize="int8", kv_dtype=torch.int8)


@pytest.mark.parametrize("cache", ["default-cache", "int8-cache"])
def test_a_prepared_reprime_gives_the_codes_of_a_reprime_that_prefills_at_the_switch(request, cache, monkeypatch):
    model = request.getfixturevalue("model" if cache == "default-cache" else "int8_cache_model")
    prepared = run(Engine(model, WINDOW), session_spec(model, 150))[0]
    with monkeypatch.context() as patch:
        without_preparation(patch)
        plain = run(Engine(model, WINDOW), session_spec(model, 150))[0]
    assert reprimes_of(prepared) == reprimes_of(plain) >= 4
    assert np.array_equal(codes_of(prepared), codes_of(plain))


def test_after_a_prepared_reprime_the_first_step_reads_at_most_two_columns(model, monkeypatch):
    columns = ColumnsRead(model, monkeypatch)
    events = run(Engine(model, WINDOW), session_spec(model, 150))[0]
    assert reprimes_of(events) >= 4
    assert max(columns.per_turn) <= 2  # the unprepared re-prime reads all 17 columns of its prompt at once

    columns.per_turn.clear()
    without_preparation(monkeypatch)
    run(Engine(model, WINDOW), session_spec(model, 150))
    assert max(columns.per_turn) == 17


def test_a_text_change_while_the_next_sequence_is_prepared_still_gives_the_plain_reprimes_codes(model, monkeypatch):
    """The prepared cache was computed under the old text: it is dropped and rebuilt a chunk per turn."""
    def steer(turn, handles):
        if turn in (30, 95):  # inside the next sequence's preparation (it starts 16 frames before the switch)
            handles[0].set_prompt("dark techno", None)

    prepared = run(Engine(model, WINDOW), session_spec(model, 150), steer=steer)[0]
    with monkeypatch.context() as patch:
        without_preparation(patch)
        plain = run(Engine(model, WINDOW), session_spec(model, 150), steer=steer)[0]
    assert np.array_equal(codes_of(prepared), codes_of(plain))


def test_weighted_prompts_changing_while_the_next_sequence_is_prepared_give_the_plain_reprimes_codes(
        model, monkeypatch):
    """New weights keep the prepared cache (they act after the decoder); new texts drop it. Either way the codes
    are those of re-primes that prefill at the switch, with three rows in the kernel's step."""
    start = WeightedPrompts.of([("warm lofi beat", 0.6), ("dark techno with a long acid line", 0.4)])

    def steer(turn, handles):
        if turn == 30:
            handles[0].set_prompt(prompts=start.with_weights((0.1, 0.9)))
        if turn == 95:
            handles[0].set_prompt(prompts=WeightedPrompts.of([("ambient pads", 1.0), ("warm lofi beat", 2.0)]))

    spec = session_spec(model, 150, text=None, prompts=start)
    prepared = run(Engine(model, WINDOW), spec, steer=steer)[0]
    with monkeypatch.context() as patch:
        without_preparation(patch)
        plain = run(Engine(model, WINDOW), spec, steer=steer)[0]
    assert reprimes_of(prepared) >= 4
    assert np.array_equal(codes_of(prepared), codes_of(plain))
    labels = {chunk.prompt for chunk in prepared if isinstance(chunk, AudioChunk)}
    assert labels == {"warm lofi beat=0.6 | dark techno with a long acid line=0.4",
                      "warm lofi beat=0.1 | dark techno with a long acid line=0.9",
                      "ambient pads=0.333 | warm lofi beat=0.667"}


def test_a_timed_transition_across_reprimes_gives_the_plain_reprimes_codes(model, monkeypatch):
    """A transition's union of texts is prepared like any set of prompts, its weights move every step, and at
    its end the rows of the old text go: the codes are those of re-primes that prefill at the switch."""
    def steer(turn, handles):
        if turn == 20:
            handles[0].set_prompt(prompts=WeightedPrompts.of([("dark techno", 1.0), ("ambient pads", 0.5)]),
                                  transition_frames=50)

    prepared = run(Engine(model, WINDOW), session_spec(model, 150), steer=steer)[0]
    with monkeypatch.context() as patch:
        without_preparation(patch)
        plain = run(Engine(model, WINDOW), session_spec(model, 150), steer=steer)[0]
    assert reprimes_of(prepared) >= 4
    assert np.array_equal(codes_of(prepared), codes_of(plain))
    ended = [e for e in prepared if isinstance(e, Notice) and e.kind == NoticeKind.TRANSITION_ENDED]
    applied = [e for e in prepared if isinstance(e, Notice) and e.kind == NoticeKind.PROMPT_APPLIED]
    assert [e.frame for e in ended] == [applied[0].frame + 49]


def test_a_long_audio_prompt_is_read_a_chunk_per_turn_while_another_session_plays(model, monkeypatch):
    prompt_codes = torch.randint(0, model.config.decoder.vocab_size, (model.config.decoder.num_codebooks, 30),
                                 generator=torch.Generator().manual_seed(1))
    audio = model.decode_audio(prompt_codes).numpy()  # (channels, samples): 30 frames of audio to continue
    alone = run(Engine(model), session_spec(model, 20, audio_prompt=audio))[0]
    columns = ColumnsRead(model, monkeypatch)
    config = EngineConfig(prefill_chunk_columns=3)
    beside, _ = run(Engine(model, config), session_spec(model, 20, audio_prompt=audio), session_spec(model, 60))
    assert max(columns.per_turn) == 3
    assert np.array_equal(codes_of(beside), codes_of(alone))


def test_prefill_chunk_columns_must_be_positive(model):
    with pytest.raises(ValueError, match="prefill_chunk_columns"):
        Engine(model, EngineConfig(prefill_chunk_columns=0))
