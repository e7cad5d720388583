"""The async front of the engine: requests from the event loop, steps on one engine thread.

Requests are admitted into a bounded queue (full: `EngineOverloaded`, which the API turns into
503 with Retry-After instead of letting latency grow without limit); the engine thread runs
`BatchEngine.step` while there is work and sleeps otherwise; each request's events come back
to its own asyncio queue. A request whose client went away is aborted between two steps.

A failure inside a step fails the requests in that step (the engine sees to that); anything
else that escapes fails the requests in flight and the thread goes on. `health` says whether
the thread is alive and when a step last finished, which is what readiness reports.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from server.engine.engine import (
    BatchEngine,
    EngineEvent,
    EngineRequest,
    Failed,
    Finished,
    Rejected,
    step_failure,
)
from server.model.threads import pin_torch_threads

log = logging.getLogger(__name__)


class EngineOverloaded(Exception):
    """The queue is full; the client should retry after a moment."""


class EngineStopped(Exception):
    """The engine is shutting down or died; no more requests are taken."""


class RequestFailed(Exception):
    """This request failed in the engine (the others go on); `failure` says how."""

    def __init__(self, failure: Failed) -> None:
        super().__init__(failure.error)
        self.failure = failure


@dataclass(frozen=True)
class EngineHealth:
    """What readiness needs to know about the engine thread."""

    alive: bool
    failure: str | None  # why the thread died, if it did
    in_flight: int
    stalled_seconds: float  # how long work has waited without a step finishing (0 when idle)
    warming: bool = False  # compiling the decode step before the first request


@dataclass
class RequestStream:
    """The events of one request, in order; iterate to consume, `abort` to give up."""

    request_id: int
    _queue: asyncio.Queue[EngineEvent]
    _scheduler: Scheduler

    async def next(self) -> EngineEvent:
        event = await self._queue.get()
        if isinstance(event, Failed):
            raise RequestFailed(event)
        return event

    async def __aiter__(self) -> AsyncIterator[EngineEvent]:
        while True:
            event = await self.next()
            yield event
            if isinstance(event, Finished):
                return

    def abort(self) -> None:
        self._scheduler.abort(self.request_id)


class Scheduler:
    def __init__(
        self, engine: BatchEngine, *, max_queued: int = 256, cpu_threads: int | None = None
    ) -> None:
        """`cpu_threads`: the engine thread runs torch on this many (server/model/threads.py);
        None leaves the process's count."""
        self.engine = engine
        self.max_queued = max_queued
        self.cpu_threads = cpu_threads
        self._cond = threading.Condition()
        self._incoming: list[EngineRequest] = []
        self._aborts: set[int] = set()
        self._in_flight = 0
        self.aborted = 0  # requests cancelled because their client went away
        self._stopping = False
        self._failure: BaseException | None = None
        self._progress_at = time.monotonic()  # the last step's end, or when work arrived idle
        self._warming = engine.compiles_decode  # until `warm_up` has compiled the decode step
        # events of the current step, by event loop: one wake-up per loop per step, not one
        # per event (only the engine thread touches it)
        self._outbox: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, EngineEvent]]]
        self._outbox = {}
        self._thread = threading.Thread(target=self._run, name="lks-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def in_flight(self) -> int:
        """Requests queued or running."""
        return self._in_flight

    def health(self) -> EngineHealth:
        with self._cond:
            in_flight, progress_at, failure = self._in_flight, self._progress_at, self._failure
            warming = self._warming
        stalled = time.monotonic() - progress_at if in_flight and not warming else 0.0
        return EngineHealth(
            alive=self._thread.is_alive() and failure is None,
            failure=None if failure is None else f"{type(failure).__name__}: {failure}",
            in_flight=in_flight,
            stalled_seconds=stalled,
            warming=warming,
        )

    def submit(self, request: EngineRequest) -> RequestStream:
        """Queue `request`; its events arrive on the returned stream (call from the loop)."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[EngineEvent] = asyncio.Queue()

        def sink(event: EngineEvent) -> None:
            if isinstance(event, Finished | Failed | Rejected):  # the request's last event
                with self._cond:
                    self._in_flight -= 1
            self._outbox.setdefault(loop, []).append((queue, event))

        request.sink = sink
        with self._cond:
            if self._stopping or self._failure is not None:
                raise EngineStopped(str(self._failure or "the server is shutting down"))
            if self._in_flight >= self.max_queued:
                raise EngineOverloaded(f"{self._in_flight} requests are already queued or running")
            if self._in_flight == 0:
                self._progress_at = time.monotonic()  # idle until now: not a stall
            self._in_flight += 1
            self._incoming.append(request)
            self._cond.notify()
        return RequestStream(request.request_id, queue, self)

    def abort(self, request_id: int) -> None:
        with self._cond:
            self._aborts.add(request_id)
            self._cond.notify()

    def _run(self) -> None:
        if self.cpu_threads is not None:
            pin_torch_threads(self.cpu_threads, default=self.cpu_threads)
        engine = self.engine
        self._warm_up()
        try:
            while True:
                with self._cond:
                    while not (self._stopping or self._incoming or self._aborts):
                        if engine.has_work():
                            break
                        self._cond.wait()
                    if self._stopping:
                        return
                    incoming, self._incoming = self._incoming, []
                    aborts, self._aborts = self._aborts, set()
                try:
                    self._step(incoming, aborts)
                except Exception as exc:  # a bug outside any one step: fail what is in flight
                    log.exception("the engine loop failed; failing the requests in flight")
                    failure = step_failure(exc, "the engine loop")
                    for request in incoming:  # those not yet added, too (a no-op for the rest)
                        request.send(failure)
                    engine.fail_all(failure)
                self._deliver()
                with self._cond:
                    self._progress_at = time.monotonic()
        except BaseException as exc:  # the thread itself is going: fail every waiter loudly
            log.exception("the engine thread failed")
            with self._cond:
                self._failure = exc
                incoming, self._incoming = self._incoming, []
            failure = Failed(f"the engine stopped ({type(exc).__name__})")
            for request in incoming:
                request.send(failure)
            engine.fail_all(failure)
            self._deliver()

    def _warm_up(self) -> None:
        """Compile the decode step before the first request (requests queue meanwhile); a
        failure here leaves the step eager (`SlotDecoder`) or fails the first requests, logged."""
        if not self._warming:
            return
        log.info("compiling the decode step (LKS_COMPILE_DECODE); requests wait until it is done")
        try:
            log.info("the decode step compiled in %.1f s", self.engine.warm_up())
        except Exception:
            log.exception("warming up the compiled decode step failed")
        with self._cond:
            self._warming = False
            self._progress_at = time.monotonic()  # what queued meanwhile has not stalled

    def _deliver(self) -> None:
        """Hand each event loop the events of the step in one call."""
        outbox, self._outbox = self._outbox, {}
        for loop, items in outbox.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # that loop has closed: its clients are gone
                log.warning("%d events for a closed event loop dropped", len(items))

    def _step(self, incoming: list[EngineRequest], aborts: set[int]) -> None:
        engine = self.engine
        for request in incoming:
            engine.add(request)
        for request_id in aborts:
            if engine.abort(request_id):
                self.aborted += 1
                log.info("request %d aborted: its client went away", request_id)
        engine.step()


def _put_all(items: list[tuple[asyncio.Queue, EngineEvent]]) -> None:
    for queue, event in items:
        queue.put_nowait(event)
