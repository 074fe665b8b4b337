"""The engine: one scheduler thread owns the model and advances every ready session in one batched step.

Transport code (any thread) opens sessions and steers them through `SessionHandle`, which queues typed commands
(`Open` first, then `SetPrompt`, `Ack`, ...) in one FIFO; the scheduler thread applies them between steps, so a
session's state is only ever touched by one thread. One turn: commands -> stalled sessions end -> one batched
decoder step -> each session's completed frame -> PCM -> chunks -> its sink.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np

from musicgen_core import MusicGen, SamplingParams, WeightedPrompts

from .events import (Event, Failure, Finished, FinishReason, ServerClosingError, SessionLimitError, SessionSpec,
                     SpecError)
from .headroom import EngineHeadroom
from .timeline import At, Tempo
from .session import Limits, Session, TextEncodings

log = logging.getLogger("musicgen.engine")


def call_in_fresh_thread(function: Callable, *args, **kwargs):
    """Run function(*args, **kwargs) in a new thread that ends when it returns; return its result or raise its
    exception. Load the model this way when the engine's thread will run it.

    Why: torch's OpenMP runtime (libgomp) keeps a worker pool for every thread that ever ran a parallel
    region, for as long as that thread lives. Once the pools hold more threads than there are CPUs, libgomp
    stops spinning between parallel regions, and each of the ~200 regions in a decoder step pays a wake-up:
    on the 2-core dev box, steps on the engine's thread ran ~30% slower (36-39 vs 27 ms, int8) after the model
    had been loaded on a thread that stayed alive. A thread that ends takes its pool with it.
    """
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            outcome["value"] = function(*args, **kwargs)
        except BaseException as error:  # handed to the caller
            outcome["error"] = error

    worker = threading.Thread(target=run, name=f"fresh-{getattr(function, '__name__', 'call')}")
    worker.start()
    worker.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


@dataclass(frozen=True)
class EngineConfig:
    max_sessions: int = 8
    context_frames: int | None = None  # decoder context per sequence; None: min(model limit, 30 s)
    reprime_keep_frames: int | None = None  # context kept at a re-prime; None: 40% of the window (12 s of 30 s)
    max_batch: int = 32  # sessions per decoder step
    # A session waiting at its lead this long with no ack (paced) or no delivery (unpaced) ends with ERROR: a
    # client that vanished without a cancel reaching us (or never acks) must not hold a slot for ever.
    stall_timeout_seconds: float = 10.0
    # Prompt columns a sequence reads per turn while other sessions are live (an audio prompt, an append, a
    # re-prime whose prepared cache was dropped): each turn the others wait for at most this much prefill.
    prefill_chunk_columns: int = 2


# -- commands: what the transport asks of a session, applied in order on the engine thread -------------------

@dataclass(frozen=True)
class Command:
    session: Session

    def apply(self, engine: "Engine") -> None:
        raise NotImplementedError


@dataclass(frozen=True)
class Open(Command):
    """A session's first command: begin it (encode its prompt, warm its codec, send Started)."""

    def apply(self, engine: "Engine") -> None:
        self.session.begin()


@dataclass(frozen=True)
class SetPrompt(Command):
    prompts: WeightedPrompts | None  # None = keep the prompts (change sampling only)
    params: SamplingParams | None
    transition_frames: int = 0  # > 0: the weights move to the new prompts over this many frames
    at: At | None = None  # None = from the next step
    sampling_changes: dict | None = None  # fields to merge onto the sampling in effect when it lands
    rollback_frames: int | None = None  # land at the first unplayed frame + this many, retracting sent audio
    transition_beats: float | None = None  # a transition's length in beats of the session tempo (when it lands)

    def apply(self, engine: "Engine") -> None:
        if self.rollback_frames is not None:
            self.session.rollback_and(self.at, self.rollback_frames, self._land)
        else:
            self.session.when(self.at, self._land)

    def _land(self) -> None:
        params = self.params
        if params is None and self.sampling_changes:
            params = replace(self.session.params, **self.sampling_changes)
        frames = self.transition_frames
        if self.transition_beats is not None:
            frames = self.session.frames_for_beats(self.transition_beats, "set_prompt.transition.beats")
            if frames is None:
                return
        self.session.set_prompt(self.prompts, params, frames)


@dataclass(frozen=True)
class AppendAudio(Command):
    audio: np.ndarray  # (channels, samples) float32 at the model's rate
    replace_context: bool
    at: At | None = None

    def apply(self, engine: "Engine") -> None:
        self.session.when(self.at, lambda: self.session.append_audio(self.audio, self.replace_context))


@dataclass(frozen=True)
class Ack(Command):
    samples: int  # paced: samples played; unpaced: samples the transport delivered

    def apply(self, engine: "Engine") -> None:
        self.session.ack(self.samples)


@dataclass(frozen=True)
class Pause(Command):
    at: At | None = None

    def apply(self, engine: "Engine") -> None:
        self.session.when(self.at, self.session.pause)


@dataclass(frozen=True)
class Resume(Command):
    def apply(self, engine: "Engine") -> None:
        self.session.resume()


@dataclass(frozen=True)
class Finish(Command):
    """End the session with Finished (stop, shutdown, or a bad request the transport found)."""

    reason: FinishReason
    message: str = ""
    failure: Failure | None = None
    at: At | None = None  # a scheduled stop

    def apply(self, engine: "Engine") -> None:
        self.session.when(self.at, lambda: self.session.finish(self.reason, self.message, self.failure))


@dataclass(frozen=True)
class Drain(Command):
    """The server is going away: the session's client should resume it elsewhere."""

    def apply(self, engine: "Engine") -> None:
        self.session.drain()


@dataclass(frozen=True)
class SetTempo(Command):
    tempo: Tempo

    def apply(self, engine: "Engine") -> None:
        self.session.tempo = self.tempo


@dataclass(frozen=True)
class Close(Command):
    """The client is gone: free the session without sending anything more."""

    def apply(self, engine: "Engine") -> None:
        self.session.release()


class SessionHandle:
    """Thread-safe steering of one session. Every method only queues a command; the engine applies it
    between steps."""

    def __init__(self, engine: "Engine", session: Session):
        self._engine = engine
        self._session = session
        self.id = session.id
        self.params = session.params  # the latest sampling asked for (changes compose across set_prompt)

    def set_prompt(self, text: str | None = None, params: SamplingParams | None = None, *,
                   prompts: WeightedPrompts | None = None, transition_frames: int = 0, at: At | None = None,
                   sampling_changes: dict | None = None, rollback_frames: int | None = None,
                   transition_beats: float | None = None) -> None:
        """A new text (or `prompts`, several weighted texts) and/or sampling (whole `params`, or
        `sampling_changes`: fields merged onto the sampling in effect when the change lands); None keeps what
        is in effect. transition_frames > 0: the weights move from the mix in effect to the new prompts over
        that many frames (linearly, `frames.Transition`). at: when it lands (None: the next step; `timeline`).
        rollback_frames: land at the first frame not yet played plus this many (or at `at` if later), rolling
        the session back to it when it was already generated (the audio sent from there is retracted)."""
        if text is not None and prompts is not None:
            raise ValueError("give text or prompts, not both")
        if transition_frames and text is None and prompts is None:
            raise ValueError("a transition needs text or prompts to move to")
        if params is not None:
            self.params = params
        if text is not None:
            prompts = WeightedPrompts.single(text)
        if sampling_changes and at is None:
            self.params = replace(self.params, **sampling_changes)  # the transport checks the next change on it
        self._engine.submit(SetPrompt(self._session, prompts, params, transition_frames, at, sampling_changes,
                                      rollback_frames, transition_beats))

    def append_audio(self, audio: np.ndarray, replace_context: bool = False, at: At | None = None) -> None:
        """audio: (channels, samples) float32 at the model's rate."""
        self._engine.submit(AppendAudio(self._session, audio, replace_context, at))

    def ack(self, samples: int) -> None:
        self._engine.submit(Ack(self._session, samples))

    def pause(self, at: At | None = None) -> None:
        self._engine.submit(Pause(self._session, at))

    def resume(self) -> None:
        self._engine.submit(Resume(self._session))

    def stop(self, at: At | None = None) -> None:
        self._engine.submit(Finish(self._session, FinishReason.STOPPED, at=at))

    def set_tempo(self, tempo: Tempo) -> None:
        """The session's tempo for commands scheduled at bars or beats (applies to those that follow)."""
        self._engine.submit(SetTempo(self._session, tempo))

    def fail(self, message: str) -> None:
        """A bad request: the session ends with Finished(ERROR, message) and the totals sent so far."""
        self._engine.submit(Finish(self._session, FinishReason.ERROR, message, Failure.REQUEST))

    def close(self) -> None:
        self._engine.submit(Close(self._session))


class Engine:
    def __init__(self, model: MusicGen, config: EngineConfig = EngineConfig()):
        self.model = model
        self.config = config
        self.limits = self._limits(model, config)
        self._sessions: dict[str, Session] = {}  # admitted, until finished (begun by their Open command)
        self._inbox: deque[Command] = deque()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._running = False
        self._closing = False
        self._thread: threading.Thread | None = None
        self._counter = itertools.count(1)
        self.steps = 0
        self.headroom = EngineHeadroom(1 / model.config.frame_rate)
        self.text_encodings = TextEncodings(model)  # shared by the sessions, used on the scheduler thread only

    @staticmethod
    def _limits(model: MusicGen, config: EngineConfig) -> Limits:
        most = model.max_frames
        window = min(most, 30 * model.config.frame_rate) if config.context_frames is None else config.context_frames
        if not 2 <= window <= most:
            raise ValueError(f"context_frames must be in [2, {most}] for this model, got {window}")
        if config.prefill_chunk_columns < 1:
            raise ValueError(f"prefill_chunk_columns must be >= 1, got {config.prefill_chunk_columns}")
        reprime = int(0.4 * window) if config.reprime_keep_frames is None else config.reprime_keep_frames
        if not 0 <= reprime < window:
            raise ValueError(f"reprime_keep_frames must be in [0, {window}), got {reprime}")
        return Limits(context_frames=window, reprime_keep_frames=reprime)

    def session_limits(self, spec: SessionSpec) -> Limits:
        """The engine's window and re-prime size, narrowed by what the session asked for."""
        window = self.limits.context_frames
        if spec.context_frames:
            if not 2 <= spec.context_frames <= window:
                raise SpecError("context_frames", f"must be in [2, {window}], got {spec.context_frames}")
            window = spec.context_frames
        reprime = min(self.limits.reprime_keep_frames, window - 1)
        if spec.reprime_keep_frames:
            if not 1 <= spec.reprime_keep_frames < window:
                raise SpecError("reprime_keep_frames", f"must be in [1, {window - 1}], got {spec.reprime_keep_frames}")
            reprime = spec.reprime_keep_frames
        if spec.resume is not None and spec.resume.codes.shape[1] > window:
            raise SpecError("resume.codes", f"{spec.resume.codes.shape[1]} frames exceed the session's context "
                                            f"window of {window} frames")
        return Limits(context_frames=window, reprime_keep_frames=reprime)

    # -- lifecycle ----------------------------------------------------------------------------------------

    def start(self) -> None:
        self._running = True
        self._thread = threading.Thread(target=self._loop, name="musicgen-engine", daemon=True)
        self._thread.start()

    def warm_up(self, timeout: float = 120.0) -> float:
        """Run one short unpaced session through the whole path (text encoder, decoder steps, streaming codec)
        on the engine's thread and wait for it; returns its seconds. The first client then does not pay the
        first-use costs (weights paged in from the checkpoint, kernels' first calls): a cold session's first
        audio took 275-373 ms against 211-344 ms warm for int8 musicgen-small on the dev box. After start()."""
        finished = threading.Event()
        spec = SessionSpec(text="warm up", params=self.model.default_sampling(greedy=True),
                           total_frames=self.model.config.decoder.max_delay + 6, chunk_frames=1,
                           max_lead_seconds=None, client_name="warm-up")
        started = time.perf_counter()
        self.open_session(spec, lambda event: finished.set() if isinstance(event, Finished) else None)
        if not finished.wait(timeout):
            raise TimeoutError(f"warm-up session did not finish within {timeout} s")
        while self.active_sessions:  # it is forgotten on the turn after it finished
            time.sleep(0.001)
        return time.perf_counter() - started

    def drain(self, timeout: float) -> None:
        """Tell every session to move (Notice SERVER_DRAINING) and wait up to `timeout` for their clients to go
        (a failover client resumes elsewhere and cancels this one); new sessions are already refused."""
        with self._lock:
            self._closing = True
            for session in self._sessions.values():
                self._inbox.append(Drain(session))
        self._wake.set()
        deadline = time.monotonic() + timeout
        while self.active_sessions and time.monotonic() < deadline:
            time.sleep(0.01)

    def shutdown(self, timeout: float = 10.0) -> None:
        """Every session receives Finished(SERVER_SHUTDOWN) with its audio tail, then the thread stops."""
        with self._lock:
            self._closing = True
            for session in self._sessions.values():
                self._inbox.append(Finish(session, FinishReason.SERVER_SHUTDOWN))
        self._wake.set()
        deadline = time.monotonic() + timeout
        while self.active_sessions and time.monotonic() < deadline:
            time.sleep(0.01)
        self._running = False
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=max(0.1, deadline - time.monotonic()))

    @property
    def active_sessions(self) -> int:
        with self._lock:
            return len(self._sessions)

    @property
    def sessions(self) -> list[Session]:
        """The sessions admitted and not yet finished. Read them only on the engine's thread (or, in a test,
        between calls to turn() on an engine that was not started)."""
        with self._lock:
            return list(self._sessions.values())

    def open_session(self, spec: SessionSpec, sink: Callable[[Event], None]) -> SessionHandle:
        """Admit a session (RESOURCE_EXHAUSTED past max_sessions); its Open command begins it on the engine."""
        with self._lock:
            if self._closing:
                raise ServerClosingError("the server is shutting down; no new sessions")
            if len(self._sessions) >= self.config.max_sessions:
                raise SessionLimitError(f"server is at its limit of {self.config.max_sessions} sessions; "
                                        "try again when one ends")
            session_id = f"{next(self._counter):06d}-{uuid.uuid4().hex[:8]}"
            session = Session(session_id, spec, self.model, self.session_limits(spec), sink, self.text_encodings)
            self._sessions[session.id] = session
            self._inbox.append(Open(session))
        self._wake.set()
        return SessionHandle(self, session)

    def submit(self, command: Command) -> None:
        """Queue a command (any thread); the engine applies commands in the order submitted."""
        with self._lock:
            self._inbox.append(command)
        self._wake.set()

    # -- the scheduler ------------------------------------------------------------------------------------

    def turn(self) -> bool:
        """One scheduler turn: apply the commands queued so far, end stalled sessions, then one batched decoder
        step over the ready sessions (past max_batch, the least-stepped go first). -> whether a step ran."""
        self._apply_commands()
        self._end_stalled()
        ready = [s for s in self.sessions if self._is_ready(s)]
        ready.sort(key=lambda s: s.stats.steps)
        ready = ready[: self.config.max_batch]
        if ready:
            self._step(ready)
        return bool(ready)

    def _loop(self) -> None:
        while self._running:
            try:
                stepped = self.turn()
            except Exception:  # never let one turn's surprise stop every session
                log.exception("scheduler turn failed")
                stepped = False
            if not stepped:
                self._wake.wait(timeout=0.05)
                self._wake.clear()
        with self._lock:
            leftover = list(self._sessions.values())
            self._sessions.clear()
        for session in leftover:  # still running at the deadline: tell the client, then free
            self._guard(session, lambda: session.finish(FinishReason.SERVER_SHUTDOWN, "server stopped"))
            session.release()

    def _apply_commands(self) -> None:
        """Apply the queued commands in order. A session closed in this batch gets only its Close: one
        closed before it began never begins."""
        with self._lock:
            commands, self._inbox = self._inbox, deque()
        closing = {id(c.session) for c in commands if isinstance(c, Close)}
        for command in commands:
            session = command.session
            if not isinstance(command, Close) and (session.finished or id(session) in closing):
                continue
            self._guard(session, lambda: command.apply(self))
        self._forget_finished()

    def _end_stalled(self) -> None:
        now, timeout = time.monotonic(), self.config.stall_timeout_seconds
        stalled = [s for s in self.sessions if s.stalled(now, timeout)]
        for session in stalled:
            log.info("session=%s event=stalled timeout_s=%g", session.id, timeout)
            self._guard(session, lambda: session.stall(timeout))
        if stalled:
            self._forget_finished()

    def _is_ready(self, session: Session) -> bool:
        try:
            return session.ready()
        except Exception as error:
            log.exception("session %s failed its readiness check", session.id)
            self._fail(session, error)
            return False

    def _step(self, ready: list[Session]) -> None:
        started = time.perf_counter()
        chunk = self.config.prefill_chunk_columns
        for session in ready:  # scheduled commands now due, a transition's weights for this step
            self._guard(session, session.before_step)
        ready = [s for s in ready if s.ready()]
        if not ready:
            self._forget_finished()
            return
        prefills = [p for p in (s.source.next_columns(chunk) for s in ready) if p is not None]
        try:
            results = self.model.step([s.state for s in ready], prefills=prefills,
                                      max_prefill_columns=chunk if len(self.sessions) > 1 else None)
        except Exception:  # one bad state must not take the others down: retry them one by one
            log.exception("batched step failed; stepping sessions alone")
            for session in ready:
                self._guard(session, lambda: self._step_alone(session))
            self._forget_finished()
            return
        seconds = time.perf_counter() - started
        self.steps += 1
        for session, result in zip(ready, results):
            self._guard(session, lambda: session.after_step(result, seconds, len(ready)))
        busy = time.perf_counter() - started  # the step and every stepped session's codec and chunks
        self.headroom.add_turn(busy, len(ready))
        for session in ready:
            session.rate.add(self.headroom.frame_seconds, busy)
        self._forget_finished()

    def _step_alone(self, session: Session) -> None:
        started = time.perf_counter()
        (result,) = self.model.step([session.state])
        session.after_step(result, time.perf_counter() - started)

    def _guard(self, session: Session, action: Callable[[], None]) -> None:
        """Run a session action; a failure ends that session with ERROR and leaves the others alone."""
        try:
            action()
        except Exception as error:
            log.exception("session %s failed", session.id)
            self._fail(session, error)

    @staticmethod
    def _fail(session: Session, error: Exception) -> None:
        if session.finished:
            return
        try:
            session.finish(FinishReason.ERROR, f"{type(error).__name__}: {error}")
        except Exception:
            session.release()

    def _forget_finished(self) -> None:
        with self._lock:
            for session_id in [i for i, s in self._sessions.items() if s.finished]:
                del self._sessions[session_id]
