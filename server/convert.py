"""Protobuf <-> engine conversions, with the validation that names the offending field.

The only place (with service.py) where protobuf types appear on the server side.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import replace

import numpy as np

from musicgen.v1 import musicgen_pb2 as pb
from musicgen_core import MusicGen, PromptTooLongError, SamplingParams, WeightedPrompts
from musicgen_core.prompts import PromptSetError
from musicgen_core.streaming_codec import decoder_lookahead_samples

from .events import (AudioChunk, Encoding, Event, Finished, FinishReason, Notice, NoticeKind, Retracted, ResumeFrom,
                     SessionSpec, SpecError, Started)
from .timeline import At, Tempo

SUPPORTED_OUTPUT_RATES = (44100, 48000)
DEFAULT_CHUNK_FRAMES = 5
MAX_CHUNK_FRAMES = 250
DEFAULT_LEAD_SECONDS = 2.0
MAX_LEAD_SECONDS = 60.0
MAX_AUDIO_PROMPT_SECONDS = 30.0
MAX_DURATION_SECONDS = 24 * 3600.0
UNPACED_LEAD_SECONDS = 60.0  # unpaced: most audio sent beyond what the client has read (see SessionSpec)
MIN_INPUT_RATE, MAX_INPUT_RATE = 8000, 192000
SERVER_SEED_BITS = 53  # seeds the server picks stay exact as a JavaScript number (a double)

ENCODINGS = {pb.AUDIO_ENCODING_FLOAT32_LE: Encoding.FLOAT32, pb.AUDIO_ENCODING_INT16_LE: Encoding.INT16}
TO_PB_ENCODING = {value: key for key, value in ENCODINGS.items()}
NOTICE_KINDS = {NoticeKind.PROMPT_APPLIED: pb.NOTICE_KIND_PROMPT_APPLIED,
                NoticeKind.CONTEXT_REPRIMED: pb.NOTICE_KIND_CONTEXT_REPRIMED,
                NoticeKind.AUDIO_APPENDED: pb.NOTICE_KIND_AUDIO_APPENDED,
                NoticeKind.PAUSED: pb.NOTICE_KIND_PAUSED, NoticeKind.RESUMED: pb.NOTICE_KIND_RESUMED,
                NoticeKind.TRANSITION_ENDED: pb.NOTICE_KIND_TRANSITION_ENDED,
                NoticeKind.SERVER_DRAINING: pb.NOTICE_KIND_SERVER_DRAINING}
FINISH_REASONS = {FinishReason.COMPLETED: pb.FINISH_REASON_COMPLETED, FinishReason.STOPPED: pb.FINISH_REASON_STOPPED,
                  FinishReason.SERVER_SHUTDOWN: pb.FINISH_REASON_SERVER_SHUTDOWN,
                  FinishReason.CANCELLED: pb.FINISH_REASON_STOPPED, FinishReason.ERROR: pb.FINISH_REASON_ERROR}


# -- requests -------------------------------------------------------------------------------------------------

def check_text(model: MusicGen, text: str, field: str) -> str:
    try:
        model.tokenizer.encode(text)
    except PromptTooLongError as error:
        raise SpecError(field, str(error)) from None
    return text


def prompts_from_pb(model: MusicGen, entries, field: str) -> WeightedPrompts:
    """Repeated WeightedPrompt -> validated, normalised prompts; SpecError naming the entry's field."""
    for index, entry in enumerate(entries):
        check_text(model, entry.text, f"{field}[{index}].text")
    try:
        return WeightedPrompts.of([(entry.text, entry.weight) for entry in entries], field)
    except PromptSetError as error:
        raise SpecError(error.field, error.detail) from None


MAX_TRANSITION_SECONDS = 600.0


def at_from_pb(message, field: str) -> At | None:
    """The `at` of a steering message (None when unset: at the next step)."""
    if not message.HasField("at"):
        return None
    kind = message.at.WhichOneof("when")
    if kind is None or (kind in ("next_bar", "next_beat") and not getattr(message.at, kind)):
        return None
    value = 0 if kind in ("next_bar", "next_beat") else getattr(message.at, kind)
    return At(kind, value, f"{field}.{kind}")


def rollback_frames(model: MusicGen, rollback: pb.Rollback, field: str) -> int:
    margin = rollback.margin_seconds
    if not math.isfinite(margin) or not 0 <= margin <= 10:
        raise SpecError(f"{field}.margin_seconds", f"must be in [0, 10], got {margin}")
    return math.ceil(margin * model.config.frame_rate - 1e-9)


def resume_from_pb(model: MusicGen, resume: pb.ResumeFrom, output_rate: int, field: str) -> ResumeFrom:
    """Codes and the sample to continue at, checked against the model (the window is the engine's check)."""
    decoder = model.config.decoder
    books, size = decoder.num_codebooks, decoder.vocab_size
    codes = np.asarray(resume.codes, dtype=np.int64)
    if codes.size == 0 or codes.size % books:
        raise SpecError(f"{field}.codes", f"must be whole frames of {books} codes (frame-major), got {codes.size}")
    if codes.max() >= size:
        raise SpecError(f"{field}.codes", f"every code must be in [0, {size}), got {int(codes.max())}")
    frames = codes.size // books
    spf = model.config.audio_encoder.hop_length * output_rate // model.config.sampling_rate
    if resume.at_sample % spf:
        raise SpecError(f"{field}.at_sample", f"must be a whole number of frames ({spf} samples each at "
                                              f"{output_rate} Hz), got {resume.at_sample}")
    first = resume.at_sample // spf
    if first < frames:
        raise SpecError(f"{field}.at_sample", f"the {frames} frames of codes end at frame {first}, so they would "
                                              f"start before frame 0")
    return ResumeFrom(codes.reshape(frames, books).T.copy(), first, resume.at_sample)


def tempo_from_pb(tempo: pb.Tempo, field: str) -> Tempo:
    if not math.isfinite(tempo.bpm) or not 1 <= tempo.bpm <= 1000:
        raise SpecError(f"{field}.bpm", f"must be in [1, 1000], got {tempo.bpm}")
    if not 1 <= tempo.beats_per_bar <= 64:
        raise SpecError(f"{field}.beats_per_bar", f"must be in [1, 64], got {tempo.beats_per_bar}")
    return Tempo(tempo.bpm, tempo.beats_per_bar, tempo.beat_one_sample)


def transition_frames(model: MusicGen, transition: pb.Transition, field: str) -> int | float:
    """A Transition's length in whole frames (0 = at once), or for `beats` the beats as a float (the engine
    turns them into frames at the session tempo); SpecError naming the field when out of range."""
    rate = model.config.frame_rate
    kind = transition.WhichOneof("length")
    if kind == "beats":
        if not math.isfinite(transition.beats) or not 0 <= transition.beats <= 1024:
            raise SpecError(f"{field}.beats", f"must be in [0, 1024], got {transition.beats}")
        return float(transition.beats)
    if kind == "seconds":
        seconds = transition.seconds
        if not math.isfinite(seconds) or not 0 <= seconds <= MAX_TRANSITION_SECONDS:
            raise SpecError(f"{field}.seconds", f"must be in [0, {MAX_TRANSITION_SECONDS:g}], got {seconds}")
        return round(seconds * rate)
    if kind == "frames":
        if transition.frames > MAX_TRANSITION_SECONDS * rate:
            raise SpecError(f"{field}.frames", f"must be in [0, {int(MAX_TRANSITION_SECONDS * rate)}], "
                                               f"got {transition.frames}")
        return transition.frames
    return 0


def prompts_to_pb(prompts: WeightedPrompts) -> list[pb.WeightedPrompt]:
    return [pb.WeightedPrompt(text=text, weight=weight) for text, weight in zip(prompts.texts, prompts.weights)]


def exact_lookahead_frames(model: MusicGen) -> int:
    """The decoder lookahead that makes streamed audio equal an offline decode, in whole frames."""
    codec = model.config.audio_encoder
    return math.ceil(decoder_lookahead_samples(codec) / codec.hop_length)


def sampling_changes(message: pb.Sampling) -> dict:
    """The fields a Sampling message sets (a change to merge onto what is in effect when it lands)."""
    return {name: getattr(message, name) for name in ("guidance_scale", "temperature", "top_k", "top_p", "greedy",
                                                       "seed") if message.HasField(name)}


def sampling_from_pb(model: MusicGen, message: pb.Sampling, base: SamplingParams, field: str) -> SamplingParams:
    """Fields set in the message override `base`; the result is validated with the field named."""
    params = replace(base, **sampling_changes(message))
    try:
        params.validated()
    except ValueError as error:
        name = str(error).split(" ", 1)[0]
        raise SpecError(f"{field}.{name}", str(error)) from None
    vocab = model.config.decoder.vocab_size
    if params.top_k > vocab:  # a -1 from a client whose language has no unsigned type arrives as 4294967295
        raise SpecError(f"{field}.top_k", f"must be in [0, {vocab}] (the codebook size), got {params.top_k}")
    return params


def sampling_to_pb(params: SamplingParams) -> pb.Sampling:
    message = pb.Sampling(guidance_scale=params.guidance_scale, temperature=params.temperature, top_k=params.top_k,
                          top_p=params.top_p, greedy=params.greedy)
    if params.seed is not None:
        message.seed = params.seed
    return message


def audio_from_pb(message: pb.AudioData, field: str) -> tuple[np.ndarray, int]:
    """-> ((channels, samples) float32, sample rate), every property checked."""
    encoding = ENCODINGS.get(message.encoding)
    if encoding is None:
        raise SpecError(f"{field}.encoding", "must be FLOAT32_LE or INT16_LE")
    if not MIN_INPUT_RATE <= message.sample_rate <= MAX_INPUT_RATE:
        raise SpecError(f"{field}.sample_rate", f"must be in [{MIN_INPUT_RATE}, {MAX_INPUT_RATE}] Hz, "
                                                f"got {message.sample_rate}")
    if message.channels not in (1, 2):
        raise SpecError(f"{field}.channels", f"must be 1 or 2, got {message.channels}")
    width = 4 if encoding is Encoding.FLOAT32 else 2
    frame_bytes = width * message.channels
    if len(message.pcm) == 0:
        raise SpecError(f"{field}.pcm", "is empty")
    if len(message.pcm) % frame_bytes:
        raise SpecError(f"{field}.pcm", f"{len(message.pcm)} bytes is not a whole number of "
                                        f"{message.channels}-channel {width}-byte samples")
    if encoding is Encoding.FLOAT32:
        samples = np.frombuffer(message.pcm, dtype="<f4")
        if not np.isfinite(samples).all():
            raise SpecError(f"{field}.pcm", "contains NaN or Inf samples")
    else:
        samples = np.frombuffer(message.pcm, dtype="<i2").astype(np.float32) / 32767.0
    audio = samples.reshape(-1, message.channels).T.astype(np.float32)
    return audio, message.sample_rate


def audio_for_model(model: MusicGen, audio: np.ndarray, rate: int, field: str,
                    max_seconds: float = MAX_AUDIO_PROMPT_SECONDS) -> np.ndarray:
    """Resample to the model's rate and map channels (mono duplicated for stereo models, stereo averaged for
    mono ones)."""
    if audio.shape[1] / rate > max_seconds:
        raise SpecError(f"{field}.pcm", f"{audio.shape[1] / rate:.1f} s of audio; at most {max_seconds:g} s")
    target = model.config.sampling_rate
    if rate != target:
        import soxr
        audio = np.ascontiguousarray(soxr.resample(audio.T, rate, target, quality="HQ").T, dtype=np.float32)
    channels = model.config.audio_channels
    if audio.shape[0] != channels:
        audio = np.repeat(audio.mean(axis=0, keepdims=True), channels, axis=0)
    if audio.shape[1] == 0:
        raise SpecError(f"{field}.pcm", "is shorter than one sample at the model's rate")
    return np.ascontiguousarray(audio)


def spec_from_pb(model: MusicGen, start: pb.StartSession, *, paced: bool, field: str = "start") -> SessionSpec:
    text = check_text(model, start.prompt, f"{field}.prompt")
    prompts = None
    if start.prompts:
        if text:
            raise SpecError(f"{field}.prompts", "give prompt or prompts, not both")
        prompts = prompts_from_pb(model, start.prompts, f"{field}.prompts")
    params = sampling_from_pb(model, start.sampling, model.default_sampling(), f"{field}.sampling")
    if params.seed is None:  # pick one, so Started can report it and the session can be replayed
        params = replace(params, seed=secrets.randbits(SERVER_SEED_BITS))
    audio_prompt = None
    if start.HasField("audio_prompt"):
        audio, rate = audio_from_pb(start.audio_prompt, f"{field}.audio_prompt")
        audio_prompt = audio_for_model(model, audio, rate, f"{field}.audio_prompt")
    total = _duration_frames(model, start, paced, field)
    chunk = start.chunk_frames or DEFAULT_CHUNK_FRAMES
    if not 1 <= chunk <= MAX_CHUNK_FRAMES:
        raise SpecError(f"{field}.chunk_frames", f"must be in [1, {MAX_CHUNK_FRAMES}], got {chunk}")
    encoding = Encoding.FLOAT32
    if start.output.encoding:
        if start.output.encoding not in ENCODINGS:
            raise SpecError(f"{field}.output.encoding", "must be FLOAT32_LE or INT16_LE")
        encoding = ENCODINGS[start.output.encoding]
    rate = start.output.sample_rate
    if rate and rate != model.config.sampling_rate and rate not in SUPPORTED_OUTPUT_RATES:
        raise SpecError(f"{field}.output.sample_rate", f"must be 0 (the model's {model.config.sampling_rate} Hz), "
                                                       f"44100 or 48000, got {rate}")
    if start.output.channels not in (0, 1, 2):
        raise SpecError(f"{field}.output.channels", f"must be 0 (the model's), 1 or 2, got {start.output.channels}")
    lookahead = None
    if start.HasField("decoder_lookahead_frames"):
        lookahead, exact = start.decoder_lookahead_frames, exact_lookahead_frames(model)
        if lookahead > exact:
            raise SpecError(f"{field}.decoder_lookahead_frames", f"must be in [0, {exact}] (the exact value), "
                                                                 f"got {lookahead}")
        lookahead = float(lookahead)
    lead = start.max_lead_seconds
    if not math.isfinite(lead) or lead < 0 or lead > MAX_LEAD_SECONDS:
        raise SpecError(f"{field}.max_lead_seconds", f"must be in [0, {MAX_LEAD_SECONDS:g}], got {lead}")
    if len(start.client_name) > 128:
        raise SpecError(f"{field}.client_name", "at most 128 characters")
    unpaced = start.unpaced or not paced
    resume = None
    if start.HasField("resume"):
        if audio_prompt is not None:
            raise SpecError(f"{field}.resume", "give audio_prompt or resume, not both")
        resume = resume_from_pb(model, start.resume, rate or model.config.sampling_rate, f"{field}.resume")
    return SessionSpec(
        text=text or None, params=params, total_frames=total, audio_prompt=audio_prompt, chunk_frames=chunk,
        output_rate=rate if rate != model.config.sampling_rate else 0, encoding=encoding,
        output_channels=start.output.channels,
        lookahead_frames=lookahead, max_lead_seconds=None if unpaced else (lead or DEFAULT_LEAD_SECONDS),
        delivery_lead_seconds=UNPACED_LEAD_SECONDS if unpaced else None,
        client_name=start.client_name, context_frames=start.context_frames,
        reprime_keep_frames=start.reprime_keep_frames, start_paused=start.start_paused and paced, prompts=prompts,
        tempo=tempo_from_pb(start.tempo, f"{field}.tempo") if start.HasField("tempo") else None, resume=resume)


def _duration_frames(model: MusicGen, start: pb.StartSession, paced: bool, field: str) -> int | None:
    which = start.WhichOneof("duration")
    if which == "duration_seconds":
        seconds = start.duration_seconds
        if not math.isfinite(seconds) or not 0 < seconds <= MAX_DURATION_SECONDS:
            raise SpecError(f"{field}.duration_seconds", f"must be in (0, {MAX_DURATION_SECONDS:g}], got {seconds}")
        return math.ceil(seconds * model.config.frame_rate - 1e-9)
    if which == "duration_frames":
        most = int(MAX_DURATION_SECONDS * model.config.frame_rate)
        if not 0 < start.duration_frames <= most:
            raise SpecError(f"{field}.duration_frames", f"must be in [1, {most}] ({MAX_DURATION_SECONDS:g} s), "
                                                        f"got {start.duration_frames}")
        return start.duration_frames
    if not paced:
        raise SpecError(f"{field}.duration", "Generate needs a finite duration (duration_seconds or "
                                             "duration_frames)")
    return None


# -- events -----------------------------------------------------------------------------------------------------

def map_channels(pcm: np.ndarray, channels: int) -> np.ndarray:
    """(model channels, samples) -> (channels, samples): mono duplicated, stereo averaged; 0 keeps them."""
    if channels in (0, pcm.shape[0]):
        return pcm
    if channels == 1:
        return pcm.mean(axis=0, keepdims=True)
    return np.repeat(pcm, channels, axis=0)


def encode_planar_pcm(pcm: np.ndarray, encoding: Encoding) -> bytes:
    """(channels, samples) float32 -> interleaved little-endian bytes; int16 = round(x * 32767), clipped (full
    scale 32767, as the protocol says)."""
    interleaved = np.ascontiguousarray(pcm.T)
    if encoding is Encoding.INT16:
        return np.clip(np.round(interleaved * 32767.0), -32768, 32767).astype("<i2").tobytes()
    return interleaved.astype("<f4").tobytes()


def event_to_pb(event: Event, spec: SessionSpec, started: Started | None, return_codes: bool) -> pb.SessionEvent:
    if isinstance(event, Started):
        return pb.SessionEvent(started=_started_to_pb(event, spec))
    if isinstance(event, AudioChunk):
        chunk = pb.AudioChunk(sequence=event.sequence, start_sample=event.start_sample,
                              sample_count=event.pcm.shape[1], first_frame=event.first_frame,
                              frame_count=event.frame_count,
                              pcm=encode_planar_pcm(map_channels(event.pcm, spec.output_channels), spec.encoding),
                              prompt=event.prompt, prompt_revision=event.prompt_revision,
                              sampling=sampling_to_pb(event.params),
                              realtime_factor=event.realtime_factor or 0.0,
                              prompts=prompts_to_pb(event.prompts or WeightedPrompts.single(event.prompt)))
        if return_codes:
            chunk.codes.extend(event.codes.T.reshape(-1).tolist())
        return pb.SessionEvent(audio=chunk)
    if isinstance(event, Retracted):
        return pb.SessionEvent(retracted=pb.Retracted(frame=event.frame, sample=event.sample))
    if isinstance(event, Notice):
        spf = started.samples_per_frame if started else 0
        return pb.SessionEvent(notice=pb.Notice(kind=NOTICE_KINDS[event.kind], frame=event.frame,
                                                sample=event.frame * spf, prompt_revision=event.revision,
                                                message=event.message))
    if isinstance(event, Finished):
        stats = pb.SessionStats(steps=event.steps, mean_step_ms=event.mean_step_ms)
        if event.stats is not None:
            s, audio_seconds = event.stats, event.total_samples / (started.sample_rate if started else 1)
            stats.max_step_ms = 1000 * s.max_step_seconds
            stats.mean_batch_sessions = s.batch_sessions / max(s.steps, 1)
            stats.mean_decode_ms_per_frame = 1000 * s.decode_seconds / max(s.frames, 1)
            stats.wall_seconds = s.wall_seconds
            stats.waiting_seconds = max(0.0, s.wall_seconds - s.step_seconds - s.decode_seconds)
            stats.realtime_factor = audio_seconds / max(s.step_seconds + s.decode_seconds, 1e-9)
            stats.reprimes = s.reprimes
        return pb.SessionEvent(finished=pb.Finished(reason=FINISH_REASONS[event.reason],
                                                    total_frames=event.total_frames,
                                                    total_samples=event.total_samples, message=event.message,
                                                    stats=stats))
    raise TypeError(f"unknown event {event!r}")


def _started_to_pb(event: Started, spec: SessionSpec) -> pb.Started:
    message = pb.Started(
        session_id=event.session_id,
        output=pb.AudioFormat(encoding=TO_PB_ENCODING[event.encoding], sample_rate=event.sample_rate,
                              channels=spec.output_channels or event.channels),
        frame_rate=event.frame_rate, samples_per_frame=event.samples_per_frame,
        latency_samples=event.latency_samples,
        latency=pb.Latency(codebook_delay_samples=event.latency_codebook_delay_samples,
                           decoder_lookahead_samples=event.latency_decoder_lookahead_samples,
                           resampler_samples=event.latency_resampler_samples,
                           chunk_samples=spec.chunk_frames * event.samples_per_frame),
        context_frames=event.context_frames, reprime_keep_frames=event.reprime_keep_frames,
        sampling=sampling_to_pb(spec.params), chunk_frames=spec.chunk_frames,
        decoder_lookahead_frames=event.lookahead_frames, exact_decoding=event.exact_decoding,
        max_lead_seconds=spec.max_lead_seconds or 0.0, unpaced=spec.max_lead_seconds is None,
        audio_prompt_frames=event.prompt_frames, prompt=spec.weighted_prompts.label, paused=event.paused,
        prompts=prompts_to_pb(spec.weighted_prompts), first_sample=event.first_frame * event.samples_per_frame)
    if spec.total_frames is not None:
        message.duration_frames = spec.total_frames
    return message
