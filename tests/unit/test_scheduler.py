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
