"""The engine: one scheduler thread owns the model and advances every ready session in one batched step.

Transport code (any thread) opens sessions and sends them commands through `SessionHandle`; commands are queued
and applied on the scheduler thread between steps, so a session's state is only ever touched by one thread.
Events go out through the sink callback each session was opened with.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass
from typing import Callable

import numpy as np

from musicgen_core import MusicGen, SamplingParams

from .events import (Event, Finished, FinishReason, OrderError, ServerClosingError, SessionLimitError, SessionSpec,
                     SpecError)
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
    window_frames: int | None = None  # decoder context per sequence; None: min(model limit, 30 s)
    reprime_frames: int | None = None  # context kept at a re-prime; None: 40% of the window (12 s of 30 s)
    max_batch: int = 32  # sessions per decoder step
    # A session waiting at its lead this long with no ack (paced) or no delivery (unpaced) ends with ERROR: a
    # client that vanished without a cancel reaching us (or never acks) must not hold a slot for ever.
    stall_timeout_seconds: float = 10.0


class SessionHandle:
    """Thread-safe steering of one session. Every method only queues; the engine applies between steps."""

    def __init__(self, engine: "Engine", session: Session):
        self._engine = engine
        self._session = session
        self.id = session.id
        self.params = session.params  # the latest sampling asked for (changes compose across set_prompt)

    def set_prompt(self, text: str | None, params: SamplingParams | None = None) -> None:
        if params is not None:
            self.params = params
        self._engine._command(self._session, "set_prompt", (text, params))

    def append_audio(self, audio: np.ndarray, replace_context: bool = False) -> None:
        """audio: (channels, samples) float32 at the model's rate."""
        self._engine._command(self._session, "append_audio", (audio, replace_context))

    def ack(self, samples_played: int) -> None:
        self._engine._command(self._session, "ack", samples_played)

    def pause(self) -> None:
        self._engine._command(self._session, "pause")

    def resume(self) -> None:
        self._engine._command(self._session, "resume")

    def stop(self) -> None:
        self._engine._command(self._session, "stop")

    def error_totals(self, message: str) -> Finished:
        """A Finished(ERROR) with the session's totals so far, for a call that ends on a bad request."""
        session = self._session
        mean = 1000 * session.stats.step_seconds / max(session.stats.steps, 1)
        return Finished(FinishReason.ERROR, session.frames_sent, session.stats.samples, session.stats.steps,
                        mean, message, session.stats)

    def close(self) -> None:
        """The client is gone: free the session without sending anything more."""
        self._engine._command(self._session, "close")


class Engine:
    def __init__(self, model: MusicGen, config: EngineConfig = EngineConfig()):
        self.model = model
        self.config = config
        self.limits = self._limits(model, config)
        self._sessions: dict[str, Session] = {}
        self._joining: deque[Session] = deque()
        self._commands: deque[tuple[Session, str, object]] = deque()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._running = False
        self._closing = False
        self._thread: threading.Thread | None = None
        self._counter = itertools.count(1)
        self.steps = 0
        self.text_encodings = TextEncodings(model)  # shared by the sessions, used on the scheduler thread only

    @staticmethod
    def _limits(model: MusicGen, config: EngineConfig) -> Limits:
        decoder = model.config.decoder
        most = decoder.max_position_embeddings - 1 - decoder.max_delay
        window = min(most, 30 * model.config.frame_rate) if config.window_frames is None else config.window_frames
        if not 2 <= window <= most:
            raise ValueError(f"window_frames must be in [2, {most}] for this model, got {window}")
        reprime = int(0.4 * window) if config.reprime_frames is None else config.reprime_frames
        if not 0 <= reprime < window:
            raise ValueError(f"reprime_frames must be in [0, {window}), got {reprime}")
        return Limits(window_frames=window, reprime_frames=reprime)

    def session_limits(self, spec: SessionSpec) -> Limits:
        """The engine's window and re-prime size, narrowed by what the session asked for."""
        window = self.limits.window_frames
        if spec.context_frames:
            if not 2 <= spec.context_frames <= window:
                raise SpecError("context_frames", f"must be in [2, {window}], got {spec.context_frames}")
            window = spec.context_frames
        reprime = min(self.limits.reprime_frames, window - 1)
        if spec.reprime_frames:
            if not 1 <= spec.reprime_frames < window:
                raise SpecError("reprime_keep_frames", f"must be in [1, {window - 1}], got {spec.reprime_frames}")
            reprime = spec.reprime_frames
        return Limits(window_frames=window, reprime_frames=reprime)

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

    def shutdown(self, timeout: float = 10.0) -> None:
        """Every session receives Finished(SERVER_SHUTDOWN) with its audio tail, then the thread stops."""
        with self._lock:
            self._closing = True
            for session in list(self._sessions.values()) + list(self._joining):
                self._commands.append((session, "shutdown", None))
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
            return len(self._sessions) + len(self._joining)

    def open_session(self, spec: SessionSpec, sink: Callable[[Event], None]) -> SessionHandle:
        """Admit a session (RESOURCE_EXHAUSTED past max_sessions); it starts on the next scheduler turn."""
        with self._lock:
            if self._closing:
                raise ServerClosingError("the server is shutting down; no new sessions")
            if len(self._sessions) + len(self._joining) >= self.config.max_sessions:
                raise SessionLimitError(f"server is at its limit of {self.config.max_sessions} sessions; "
                                        "try again when one ends")
            session_id = f"{next(self._counter):06d}-{uuid.uuid4().hex[:8]}"
            session = Session(session_id, spec, self.model, self.session_limits(spec), sink, self.text_encodings)
            self._joining.append(session)
        self._wake.set()
        return SessionHandle(self, session)

    def _command(self, session: Session, name: str, argument: object = None) -> None:
        with self._lock:
            self._commands.append((session, name, argument))
        self._wake.set()

    # -- the scheduler ------------------------------------------------------------------------------------

    def _loop(self) -> None:
        while self._running:
            try:
                self._turn()
            except Exception:  # never let one turn's surprise stop every session
                log.exception("scheduler turn failed")
        with self._lock:
            leftover = list(self._sessions.values()) + list(self._joining)
            self._sessions.clear()
            self._joining.clear()
        for session in leftover:  # still running at the deadline: tell the client, then free
            self._guard(session, lambda: session.finish(FinishReason.SERVER_SHUTDOWN, "server stopped"))
            session.release()

    def _turn(self) -> None:
        self._admit()
        self._apply_commands()
        self._end_stalled()
        ready = [s for s in self._sessions.values() if self._is_ready(s)]
        ready.sort(key=lambda s: s.stats.steps)  # past max_batch, the least-stepped go first
        ready = ready[: self.config.max_batch]
        if not ready:
            self._wake.wait(timeout=0.05)
            self._wake.clear()
            return
        self._step(ready)

    def _end_stalled(self) -> None:
        now, timeout = time.monotonic(), self.config.stall_timeout_seconds
        stalled = [s for s in self._sessions.values() if s.stalled(now, timeout)]
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

    def _admit(self) -> None:
        while True:
            with self._lock:
                if not self._joining:
                    return
                session = self._joining.popleft()
                if session.finished:  # closed before it began
                    continue
                self._sessions[session.id] = session
            self._guard(session, session.begin)

    def _apply_commands(self) -> None:
        """Apply queued commands in order. A session admitted after this turn's `_admit` keeps its commands
        for the next turn (it must begin first); a close before it began drops it unstarted."""
        with self._lock:
            commands, self._commands = self._commands, deque()
        deferred = []
        for session, name, argument in commands:
            if session.id not in self._sessions and not session.finished:  # not begun yet
                if name == "close":
                    with self._lock:
                        if session in self._joining:
                            self._joining.remove(session)
                    session.release()
                else:
                    deferred.append((session, name, argument))
                continue
            if session.finished and name != "close":
                continue
            self._guard(session, lambda: self._apply(session, name, argument))
        if deferred:
            with self._lock:
                self._commands.extendleft(reversed(deferred))
        self._forget_finished()

    @staticmethod
    def _apply(session: Session, name: str, argument: object) -> None:
        if name == "close":
            session.release()
        elif name == "stop":
            session.finish(FinishReason.STOPPED)
        elif name == "shutdown":
            session.finish(FinishReason.SERVER_SHUTDOWN)
        elif name == "ack":
            session.ack(int(argument))
        elif name in ("pause", "resume"):
            getattr(session, name)()
        elif name in ("set_prompt", "append_audio"):
            getattr(session, name)(argument)
        else:
            raise OrderError(f"unknown command {name}")

    def _step(self, ready: list[Session]) -> None:
        started = time.perf_counter()
        try:
            results = self.model.step([s.state for s in ready])
        except Exception:  # one bad state must not take the others down: retry them one by one
            log.exception("batched step failed; stepping sessions alone")
            for session in ready:
                self._guard(session, lambda: self._step_alone(session))
            self._forget_finished()
            return
        seconds = time.perf_counter() - started
        self.steps += 1
        for session, result in zip(ready, results):
            self._guard(session, lambda: session.after_step(result.completed_frame, seconds, len(ready)))
        self._forget_finished()

    def _step_alone(self, session: Session) -> None:
        started = time.perf_counter()
        (result,) = self.model.step([session.state])
        session.after_step(result.completed_frame, time.perf_counter() - started)

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
