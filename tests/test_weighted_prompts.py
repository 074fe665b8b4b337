"""Weighted prompts over a real server on loopback: one conditional row per prompt, guidance
uncond + g * sum_i w_i (cond_i - uncond) with weights normalised to sum 1, changes of texts and weights while
a session plays, and timed transitions between them."""

from __future__ import annotations

import time

import numpy as np
import torch

from musicgen.v1 import musicgen_pb2 as pb
from musicgen_core import MusicGen, SamplingParams, WeightedPrompts
from musicgen_core.sampling import guided_logits
from server.engine import EngineConfig
from server_harness import RequestQueue, collect

LOFI, TECHNO, PADS = "warm lofi beat with piano", "dark techno", "ambient pad with long strings"
GREEDY = pb.Sampling(greedy=True, guidance_scale=3.0)
SEEDED = pb.Sampling(seed=7, guidance_scale=3.0)


def weighted(*pairs: tuple[str, float]) -> list[pb.WeightedPrompt]:
    return [pb.WeightedPrompt(text=text, weight=weight) for text, weight in pairs]


def generate(mono_server, frames: int = 24, **fields):
    request = pb.GenerateRequest(request=pb.StartSession(duration_frames=frames, return_codes=True, **fields))
    return collect(mono_server.stub().Generate(request))


@torch.inference_mode()
def reference(mono_model: MusicGen, prompts: WeightedPrompts, frames: int,
              switch: tuple[int, WeightedPrompts] | None = None, bounded: bool = False) -> np.ndarray:
    """Greedy with the core API, unbounded (a live session's first frames) or `frames` long (Generate): the
    guided logits written out here from the documented rule; at step switch[0] the prompts change (each new
    text continues the row `rows_from` names)."""
    params = mono_model.default_sampling(greedy=True, guidance_scale=3.0)
    encode = lambda p: [mono_model.encode_text([t])[0] for t in p.texts]  # noqa: E731
    state = mono_model.start_sequence(encode(prompts), params, weights=prompts.weights,
                                 total_frames=frames if bounded else None)
    step = 0
    while not state.finished and state.grid.first_frame_of_next_column() < frames:
        if switch is not None and step == switch[0]:
            new = switch[1]
            state.cache = state.cache.select_rows(new.rows_from(prompts) + [len(prompts)])
            state.cross = mono_model.cross_attention(encode(new), True)
            state.prompt_weights, prompts = new.weights, new
        rows = state.cache.rows
        logits = mono_model.decoder([state.pending_columns()], [state.cache], [state.cross])[0][:, :, -1]
        assert logits.shape[0] == rows == len(prompts) + 1
        unconditional = logits[-1]
        pull = sum((logits[i] - unconditional) * w for i, w in enumerate(prompts.weights))
        state.grid.place((unconditional + pull * params.guidance_scale).argmax(dim=-1))
        step += 1
    return state.grid.frames(0, frames).numpy()


def steered(mono_server, start: pb.StartSession, change: pb.SetPrompt, frames_after: int = 12, notices=None):
    """A paced session steered once after its first audio: (codes (codebooks, frames), the PROMPT_APPLIED
    frame, the chunks); the notices go to `notices` when given."""
    requests = RequestQueue(pb.SessionRequest(start=start))
    call = mono_server.stub().Session(iter(requests))
    chunks, applied = [], None
    notices = [] if notices is None else notices
    for event in call:
        kind = event.WhichOneof("event")
        if kind == "audio":
            chunks.append(event.audio)
            if len(chunks) == 1:
                time.sleep(0.5)  # the session fills its small lead and waits for acks
                requests.send(pb.SessionRequest(set_prompt=change))
            elif applied is not None and sum(c.frame_count for c in chunks) >= applied + frames_after:
                requests.send(pb.SessionRequest(stop=pb.Stop()))
                break
            last = chunks[-1]
            requests.send(pb.SessionRequest(ack=pb.Ack(samples_played=last.start_sample + last.sample_count)))
        elif kind == "notice":
            notices.append(event.notice)
            if event.notice.kind == pb.NOTICE_KIND_PROMPT_APPLIED:
                applied = event.notice.frame
    collect(call)
    codes = np.array([code for c in chunks for code in c.codes]).reshape(-1, 4).T
    return codes, applied, chunks


def paced_start(**fields) -> pb.StartSession:
    return pb.StartSession(sampling=GREEDY, return_codes=True, chunk_frames=1, max_lead_seconds=0.2, **fields)


def test_one_prompt_at_any_weight_is_plain_guidance_bit_for_bit(mono_server):
    plain = generate(mono_server, prompt=LOFI, sampling=SEEDED)
    one = generate(mono_server, prompts=weighted((LOFI, 0.3)), sampling=SEEDED)
    assert np.array_equal(one.codes, plain.codes)
    assert np.array_equal(one.pcm, plain.pcm)
    chunk = one.of("audio")[0]
    assert chunk.prompt == LOFI and [(p.text, p.weight) for p in chunk.prompts] == [(LOFI, 1.0)]


def test_two_prompts_weighted_one_and_zero_equal_the_first_alone(mono_server):
    # prompts of different token lengths: the shorter one's row attends through a padded, masked conditioning
    plain = generate(mono_server, prompt=TECHNO, sampling=SEEDED)
    pair = generate(mono_server, prompts=weighted((TECHNO, 1.0), (PADS, 0.0)), sampling=SEEDED)
    assert np.array_equal(pair.codes, plain.codes)
    assert np.array_equal(pair.pcm, plain.pcm)


def test_weighted_prompts_follow_the_documented_guidance_rule(mono_server, mono_model):
    prompts = WeightedPrompts.of([(LOFI, 0.7), (TECHNO, 0.3)])
    session = generate(mono_server, prompts=weighted((LOFI, 7.0), (TECHNO, 3.0)), sampling=GREEDY)
    assert np.array_equal(session.codes, reference(mono_model, prompts, 24, bounded=True))
    for only in (LOFI, TECHNO):
        assert not np.array_equal(session.codes, generate(mono_server, prompt=only, sampling=GREEDY).codes)
    chunk = session.of("audio")[0]
    assert [(p.text, round(p.weight, 6)) for p in chunk.prompts] == [(LOFI, 0.7), (TECHNO, 0.3)]
    assert chunk.prompt == f"{LOFI}=0.7 | {TECHNO}=0.3"


def test_guided_logits_of_one_prompt_are_the_two_row_expression():
    logits = torch.randn(2, 4, 64, generator=torch.Generator().manual_seed(3))
    params = SamplingParams(guidance_scale=3.0)
    expected = logits[1] + (logits[0] - logits[1]) * params.guidance_scale
    assert torch.equal(guided_logits(logits, params, (1.0,)), expected)
    assert torch.equal(guided_logits(logits, params), expected)


def test_new_weights_for_the_same_texts_apply_from_the_reported_frame(mono_server, mono_model):
    start = WeightedPrompts.of([(LOFI, 1.0), (TECHNO, 0.0)])
    codes, applied, chunks = steered(mono_server, paced_start(prompts=weighted((LOFI, 1.0), (TECHNO, 0.0))),
                                     pb.SetPrompt(prompts=weighted((LOFI, 0.25), (TECHNO, 0.75))))
    frames = codes.shape[1]
    switched = reference(mono_model, start, frames, switch=(applied + 3, start.with_weights((0.25, 0.75))))
    unchanged = reference(mono_model, start, frames)
    assert np.array_equal(codes, switched)
    assert np.array_equal(codes[:, :applied], unchanged[:, :applied])
    assert not np.array_equal(codes[:, applied:], unchanged[:, applied:])
    for chunk in chunks:  # each chunk reports the weights of its revision
        expected = [(LOFI, 1.0), (TECHNO, 0.0)] if chunk.first_frame < applied else [(LOFI, 0.25), (TECHNO, 0.75)]
        assert [(p.text, p.weight) for p in chunk.prompts] == expected


def test_one_text_to_two_continues_the_rows_history_like_a_text_change(mono_server, mono_model):
    """A new set's texts continue the history of the heaviest prompt before: one text replaced by the set
    (TECHNO at 1, PADS at 0) plays exactly as a plain change of text to TECHNO."""
    codes, applied, _ = steered(mono_server, paced_start(prompt=LOFI),
                                pb.SetPrompt(prompts=weighted((TECHNO, 1.0), (PADS, 0.0))))
    frames = codes.shape[1]
    plain_change = reference(mono_model, WeightedPrompts.single(LOFI), frames,
                             switch=(applied + 3, WeightedPrompts.single(TECHNO)))
    assert np.array_equal(codes, plain_change)


def test_two_texts_back_to_one_keeps_that_texts_row(mono_server, mono_model):
    start = WeightedPrompts.of([(LOFI, 0.5), (TECHNO, 0.5)])
    codes, applied, chunks = steered(mono_server, paced_start(prompts=weighted((LOFI, 0.5), (TECHNO, 0.5))),
                                     pb.SetPrompt(text=TECHNO))
    frames = codes.shape[1]
    assert np.array_equal(codes, reference(mono_model, start, frames,
                                           switch=(applied + 3, WeightedPrompts.single(TECHNO))))
    assert chunks[-1].prompt == TECHNO


@torch.inference_mode()
def transition_reference(mono_model: MusicGen, before: WeightedPrompts, frames: int, at_step: int,
                         target: WeightedPrompts, length: int) -> np.ndarray:
    """Greedy, unbounded, with the core API: from step `at_step` frame F + j (F the first frame the change
    touches) is completed under before.blend(target, min(1, (j + 1) / length)); after frame F + length - 1 only
    the target's texts are rows."""
    params = mono_model.default_sampling(greedy=True, guidance_scale=3.0)
    encode = lambda p: [mono_model.encode_text([t])[0] for t in p.texts]  # noqa: E731
    state = mono_model.start_sequence(encode(before), params, weights=before.weights)
    prompts, first, union = before, None, None

    def use(new: WeightedPrompts) -> None:
        nonlocal prompts
        if new.texts != prompts.texts:
            state.cache = state.cache.select_rows(new.rows_from(prompts) + [len(prompts)])
            state.cross = mono_model.cross_attention(encode(new), True)
        state.prompt_weights, prompts = new.weights, new

    step = 0
    while state.grid.first_frame_of_next_column() < frames:
        frame = state.grid.first_frame_of_next_column()
        if step == at_step:
            first, union = frame, prompts.blend(target, 0.0)
            use(union)
        if first is not None and frame > first + length - 1:
            use(target)
        elif first is not None:
            use(union.blend(target, min(1.0, (frame - first + 1) / length)))
        mono_model.step([state])
        step += 1
    return state.grid.frames(0, frames).numpy()


def test_a_timed_transition_moves_the_weights_linearly_over_its_frames(mono_server, mono_model):
    before, target, length = WeightedPrompts.single(LOFI), WeightedPrompts.of([(TECHNO, 1.0), (PADS, 1.0)]), 6
    notices = []
    codes, applied, chunks = steered(mono_server, paced_start(prompt=LOFI),
                                     pb.SetPrompt(prompts=weighted((TECHNO, 1.0), (PADS, 1.0)),
                                                  transition=pb.Transition(frames=length)),
                                     frames_after=length + 8, notices=notices)
    frames = codes.shape[1]
    assert np.array_equal(codes, transition_reference(mono_model, before, frames, applied + 3, target, length))
    ended = [n.frame for n in notices if n.kind == pb.NOTICE_KIND_TRANSITION_ENDED]
    assert ended == [applied + length - 1]
    for chunk in chunks:  # one frame each: every step of the ramp is reported
        j = chunk.first_frame - applied
        if j < 0:
            expected = [(LOFI, 1.0)]
        elif j < length:  # the last frame of the ramp is the first at the new weights (the old text's at 0)
            a = (j + 1) / length
            expected = [(LOFI, 1 - a), (TECHNO, 0.5 * a), (PADS, 0.5 * a)]
        else:  # then the old text's row is gone
            expected = [(TECHNO, 0.5), (PADS, 0.5)]
        got = [(p.text, p.weight) for p in chunk.prompts]
        assert [t for t, _ in got] == [t for t, _ in expected], chunk.first_frame
        assert np.allclose([w for _, w in got], [w for _, w in expected], atol=1e-12), chunk.first_frame


def test_a_transition_of_the_same_texts_changes_only_the_weights(mono_server, mono_model):
    start = WeightedPrompts.of([(LOFI, 1.0), (TECHNO, 0.0)])
    target = start.with_weights((0.0, 1.0))
    codes, applied, _ = steered(mono_server, paced_start(prompts=weighted((LOFI, 1.0), (TECHNO, 0.0))),
                                pb.SetPrompt(prompts=weighted((LOFI, 0.0), (TECHNO, 1.0)),
                                             transition=pb.Transition(seconds=0.1)), frames_after=12)
    assert np.array_equal(codes, transition_reference(mono_model, start, codes.shape[1], applied + 3, target, 5))


def test_transitions_begun_during_transitions_keep_the_rows_bounded(mono_model):
    """Each morph starts from the mix in effect over both sets' texts; texts the new set drops at weight 0 go,
    and past 2 x MAX_PROMPTS texts the running transition's target is the start (its ramp cut short)."""
    from server.engine import Engine
    from server.events import SessionSpec

    engine = Engine(mono_model, EngineConfig())
    handle = engine.open_session(SessionSpec(text=LOFI, params=mono_model.default_sampling(greedy=True),
                                             max_lead_seconds=None), lambda event: None)
    session = engine._sessions[handle.id]
    for round_ in range(4):
        texts = [f"set {round_} text {i}" for i in range(4)]
        handle.set_prompt(prompts=WeightedPrompts.of([(t, 1.0) for t in texts]), transition_frames=50)
        for _ in range(3):
            engine.turn()
        assert session.state.cache.rows <= 2 * 4 + 1
    handle.stop()
    engine.turn()
