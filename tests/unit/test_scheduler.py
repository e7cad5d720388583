"""The scheduler's queue bound and aborts, with real requests on a tiny model."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from factories import TEST_DEVICE

from server.engine.engine import BatchEngine, EngineRequest, Finished
from server.engine.sampling import SamplingParams
from server.engine.scheduler import EngineOverloaded, Scheduler
from server.model import load_backbone
from server.settings import Settings


def test_queue_bound_abort_and_completion(tiny_model_dirs: dict[str, Path]) -> None:
    backbone = load_backbone(Settings(model=tiny_model_dirs["llama"], device=TEST_DEVICE))
    scheduler = Scheduler(BatchEngine(backbone), max_queued=2)  # not started: requests wait

    async def scenario() -> None:
        params = SamplingParams(max_tokens=4)
        first = scheduler.submit(EngineRequest("who was", params))
        second = scheduler.submit(EngineRequest("the capital of", params))
        with pytest.raises(EngineOverloaded):
            scheduler.submit(EngineRequest("who", params))
        second.abort()
        scheduler.start()
        events = [event async for event in first]
        assert isinstance(events[-1], Finished)
        assert events[-1].generation.finish_reason in ("stop", "length")
        aborted = [event async for event in second]
        assert isinstance(aborted[-1], Finished)
        assert aborted[-1].generation.finish_reason == "abort"
        assert scheduler.in_flight == 0 and scheduler.aborted == 1
        third = scheduler.submit(EngineRequest("who", params))  # room again
        assert isinstance([e async for e in third][-1], Finished)

    try:
        asyncio.run(scenario())
    finally:
        scheduler.stop()


def test_a_compiled_decode_step_compiles_before_the_first_request(
    tiny_model_dirs: dict[str, Path],
) -> None:
    """Readiness says "warming" from the start until the step is compiled; a request queued
    meanwhile waits (not a stall) and is then served by the compiled step, compiling nothing."""
    from torch._dynamo.utils import counters

    backbone = load_backbone(
        Settings(model=tiny_model_dirs["llama"], device=TEST_DEVICE, dtype="float32")
    )
    engine = BatchEngine(backbone, max_batch_size=4, compile_decode=True)
    scheduler = Scheduler(engine, max_queued=4)
    assert scheduler.health().warming
    assert not Scheduler(BatchEngine(backbone), max_queued=1).health().warming

    async def scenario() -> None:
        params = SamplingParams(max_tokens=4, ignore_eos=True)
        queued = scheduler.submit(EngineRequest("who was", params))
        assert scheduler.health().stalled_seconds == 0.0, "waiting for the compiler"
        scheduler.start()
        events = [event async for event in queued]
        assert isinstance(events[-1], Finished) and events[-1].generation.tokens == 4
        health = scheduler.health()
        assert not health.warming and health.alive

    try:
        asyncio.run(scenario())
    finally:
        scheduler.stop()
    decoder = engine.slot_decoder
    assert engine.compiles_decode and decoder is not None
    assert (1, 64) in decoder.compiled_shapes, "warmed up at one row (on a CPU, the one graph)"
    compiled = counters["stats"]["unique_graphs"]
    rows = [EngineRequest("the capital of", SamplingParams(max_tokens=3)) for _ in range(3)]
    engine.generate(rows)
    assert counters["stats"]["unique_graphs"] == compiled


def test_a_warm_up_that_fails_leaves_the_engine_serving(
    tiny_model_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    backbone = load_backbone(
        Settings(model=tiny_model_dirs["llama"], device=TEST_DEVICE, dtype="float32")
    )
    engine = BatchEngine(backbone, max_batch_size=2, compile_decode=True)

    def broken() -> float:
        raise RuntimeError("the compiler crashed")

    monkeypatch.setattr(engine, "warm_up", broken)
    scheduler = Scheduler(engine, max_queued=2)

    async def scenario() -> None:
        scheduler.start()
        stream = scheduler.submit(EngineRequest("who was", SamplingParams(max_tokens=3)))
        assert isinstance([event async for event in stream][-1], Finished)
        health = scheduler.health()
        assert health.alive and not health.warming

    try:
        asyncio.run(scenario())
    finally:
        scheduler.stop()
