"""Faults stay with their request: a hostile sampling setting, a broken row, a failing forward
pass or a passed deadline fails that request alone, and the engine serves the next ones."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
import torch
from factories import TEST_DEVICE

from server.engine.engine import (
    BatchEngine,
    EngineEvent,
    EngineRequest,
    Failed,
    Finished,
    Generation,
)
from server.engine.sampling import SamplingParams, sample_rows
from server.engine.scheduler import RequestFailed, Scheduler
from server.model import Backbone, load_backbone
from server.packs.edit_set import EditSet
from server.packs.format import SubjectEntry
from server.settings import Settings

PROMPT = "the capital of france is"


@pytest.fixture(scope="module")
def backbone(tiny_model_dirs: dict[str, Path]) -> Backbone:
    return load_backbone(Settings(model=tiny_model_dirs["llama"], device=TEST_DEVICE))


def run(engine: BatchEngine, requests: list[EngineRequest]) -> dict[int, list[EngineEvent]]:
    """Every event of every request, by request id, running the engine to completion."""
    events: dict[int, list[EngineEvent]] = {r.request_id: [] for r in requests}
    for request in requests:
        request.sink = events[request.request_id].append
        engine.add(request)
    engine.run_until_done()
    return events


def last(events: list[EngineEvent]) -> EngineEvent:
    ends = [e for e in events if isinstance(e, Finished | Failed)]
    assert len(ends) == 1, f"exactly one last event expected, got {events}"
    assert events[-1] is ends[0]
    return ends[0]


def greedy(backbone: Backbone, prompt: str = PROMPT) -> Generation:
    params = SamplingParams(max_tokens=6)
    return BatchEngine(backbone).generate([EngineRequest(prompt, params)])[0]


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(max_tokens=6, temperature=1e-39),
        SamplingParams(max_tokens=6, temperature=5e-324, seed=1),
        SamplingParams(max_tokens=6, temperature=0.7, top_p=1e-45),
    ],
)
def test_denormal_temperature_and_top_p_act_as_greedy(
    backbone: Backbone, params: SamplingParams
) -> None:
    """Dividing logits by 1e-39 overflowed and `multinomial` killed the engine thread."""
    (result,) = BatchEngine(backbone).generate([EngineRequest(PROMPT, params)])
    assert result.token_ids == greedy(backbone).token_ids


def test_unusable_logits_fail_their_row_only() -> None:
    logits = torch.randn(4, 11)
    logits[1, 3] = float("nan")
    logits[2, 0] = float("inf")
    params = [SamplingParams(), SamplingParams(), SamplingParams(temperature=1.0), SamplingParams()]
    rngs = [None, None, torch.Generator().manual_seed(3), None]
    tokens = sample_rows(logits, params, rngs)
    assert isinstance(tokens[1], ValueError) and isinstance(tokens[2], ValueError)
    assert tokens[0] == int(logits[0].argmax()) and tokens[3] == int(logits[3].argmax())


def test_a_row_whose_edit_breaks_the_forward_pass_fails_alone(backbone: Backbone) -> None:
    """A malformed pack (a delta of the wrong width) fails its request; its batch companions
    get exactly what they get alone."""
    broken = EditSet([SubjectEntry("france")], torch.ones(1, backbone.hidden_size + 3), layer=1)
    good = EngineRequest(PROMPT, SamplingParams(max_tokens=6))
    other = EngineRequest("who was born in the city of rome", SamplingParams(max_tokens=5))
    bad = EngineRequest(PROMPT, SamplingParams(max_tokens=6), edit_sets=[broken])
    events = run(BatchEngine(backbone), [good, bad, other])
    failure = last(events[bad.request_id])
    assert isinstance(failure, Failed) and failure.kind == "error"
    assert "prefill" in failure.error and "Traceback" not in failure.error
    assert last(events[good.request_id]).generation == greedy(backbone)  # type: ignore[union-attr]
    alone = greedy(backbone, other.text)
    got = last(events[other.request_id]).generation  # type: ignore[union-attr]
    assert got.token_ids[:5] == alone.token_ids[:5]


def test_a_failing_decode_step_fails_its_rows_and_the_engine_goes_on(
    backbone: Backbone, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = BatchEngine(backbone)
    first = EngineRequest(PROMPT, SamplingParams(max_tokens=8, ignore_eos=True))
    events = {first.request_id: []}
    first.sink = events[first.request_id].append
    engine.add(first)
    engine.step()  # prefill: one token out

    def broken_decode() -> None:
        raise RuntimeError("a fault in the forward pass")

    monkeypatch.setattr(engine, "_decode", broken_decode)
    engine.step()
    failure = last(events[first.request_id])
    assert isinstance(failure, Failed) and "RuntimeError" in failure.error
    assert not engine.has_work()
    monkeypatch.undo()
    assert engine.generate([EngineRequest(PROMPT, SamplingParams(max_tokens=6))])[0] == greedy(
        backbone
    )


def test_a_passed_deadline_fails_queued_and_running_requests(backbone: Backbone) -> None:
    engine = BatchEngine(backbone)
    running = EngineRequest(PROMPT, SamplingParams(max_tokens=50, ignore_eos=True))
    events: dict[int, list[EngineEvent]] = {running.request_id: []}
    running.sink = events[running.request_id].append
    engine.add(running)
    engine.step()
    running.deadline = time.monotonic() - 1  # its time is up while it runs
    queued = EngineRequest(PROMPT, SamplingParams(max_tokens=4), deadline=time.monotonic() - 1)
    events[queued.request_id] = []
    queued.sink = events[queued.request_id].append
    engine.add(queued)
    engine.step()
    for request in (running, queued):
        failure = last(events[request.request_id])
        assert isinstance(failure, Failed) and failure.kind == "timeout"
    assert not engine.has_work()


def test_a_sink_that_raises_hurts_no_other_request(backbone: Backbone) -> None:
    """A client whose event loop went away must not stop the engine for everyone else."""

    def closed_loop(_: EngineEvent) -> None:
        raise RuntimeError("Event loop is closed")

    engine = BatchEngine(backbone)
    gone = EngineRequest(PROMPT, SamplingParams(max_tokens=6), sink=closed_loop)
    engine.add(gone)
    (result,) = engine.generate([EngineRequest(PROMPT, SamplingParams(max_tokens=6))])
    assert result == greedy(backbone)


def test_the_scheduler_serves_after_a_hostile_request(backbone: Backbone) -> None:
    """The request from the issue: temperature 1e-39 used to kill the engine thread and every
    later request got 503 while readiness said 200."""
    scheduler = Scheduler(BatchEngine(backbone))
    scheduler.start()

    async def scenario() -> None:
        hostile = scheduler.submit(
            EngineRequest("hi", SamplingParams(max_tokens=4, temperature=1e-39))
        )
        assert isinstance([e async for e in hostile][-1], Finished)
        broken = EditSet([SubjectEntry("hi")], torch.ones(1, backbone.hidden_size + 1), layer=1)
        bad = scheduler.submit(
            EngineRequest("hi", SamplingParams(max_tokens=4), edit_sets=[broken])
        )
        with pytest.raises(RequestFailed):
            _ = [e async for e in bad]
        ordinary = scheduler.submit(EngineRequest(PROMPT, SamplingParams(max_tokens=6)))
        assert isinstance([e async for e in ordinary][-1], Finished)

    try:
        asyncio.run(scenario())
        health = scheduler.health()
        assert health.alive and health.in_flight == 0 and health.stalled_seconds == 0
    finally:
        scheduler.stop()


def test_a_failure_outside_the_engine_step_fails_its_requests_and_the_loop_goes_on(
    backbone: Backbone, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fault between taking requests off the queue and adding them to the engine: they
    fail (none is left waiting forever) and the next request is served."""
    engine = BatchEngine(backbone)
    scheduler = Scheduler(engine)
    real_add = engine.add
    faults = iter([RuntimeError("a fault before the engine saw the request")])

    def add(request: EngineRequest) -> None:
        fault = next(faults, None)
        if fault is not None:
            raise fault
        real_add(request)

    monkeypatch.setattr(engine, "add", add)
    scheduler.start()

    async def scenario() -> None:
        first = scheduler.submit(EngineRequest(PROMPT, SamplingParams(max_tokens=4)))
        with pytest.raises(RequestFailed, match="engine loop"):
            await asyncio.wait_for(first.next(), 30)
        second = scheduler.submit(EngineRequest(PROMPT, SamplingParams(max_tokens=4)))
        events = [e async for e in second]
        assert isinstance(events[-1], Finished)

    try:
        asyncio.run(scenario())
        assert scheduler.health().alive and scheduler.in_flight == 0
    finally:
        scheduler.stop()
