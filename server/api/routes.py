"""Native API routes: health and generation."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import JSONResponse, StreamingResponse

from server.api.errors import APIError
from server.api.protocol import (
    EngineStatus,
    GenerateRequest,
    GenerateResponse,
    HealthResponse,
    JobsStatus,
    sampling_params,
)
from server.api.selection import PACK_HEADER, choose_packs, edits_header
from server.api.serving import ServiceDep, Started, sse
from server.api.state import CallerDep, StateDep, get_caller
from server.engine.engine import Finished
from server.engine.prepare import ChatMessages

log = logging.getLogger(__name__)
router = APIRouter()


@router.get("/healthz", response_model=HealthResponse)
async def healthz(state: StateDep) -> HealthResponse:
    """Liveness: the process answers, whatever the model is doing."""
    status = "ok" if state.backbone else ("failed" if state.load_error else "loading")
    return HealthResponse(
        status=status, model=state.settings.model_name, detail=_load_detail(state)
    )


@router.get("/readyz", response_model=HealthResponse, responses={503: {"model": HealthResponse}})
async def readyz(state: StateDep) -> HealthResponse | JSONResponse:
    """Readiness: 200 only while requests can be served: the backbone is loaded, the engine
    thread is alive, and no work has waited longer than LKS_READY_STALL_SECONDS for a step.
    The job store's state is reported beside it (generation does not need it)."""
    jobs = await jobs_status(state)
    if state.serving is None:
        body = HealthResponse(
            status="failed" if state.load_error else "loading",
            model=state.settings.model_name,
            detail=_load_detail(state),
            jobs=jobs,
        )
        return JSONResponse(body.model_dump(), status_code=503)
    health = state.serving.scheduler.health()
    engine = EngineStatus(
        alive=health.alive,
        in_flight=health.in_flight,
        stalled_seconds=round(health.stalled_seconds, 3),
    )
    limit = state.settings.ready_stall_seconds
    status, detail = "ok", None
    if not health.alive:
        status, detail = "failed", f"the engine thread has stopped: {health.failure}"
    elif health.stalled_seconds > limit:
        status = "stalled"
        detail = (
            f"{health.in_flight} requests wait and no engine step has ended for "
            f"{health.stalled_seconds:.0f} s (LKS_READY_STALL_SECONDS={limit:g})"
        )
    body = HealthResponse(
        status=status, model=state.serving.backbone.name, detail=detail, engine=engine, jobs=jobs
    )
    return JSONResponse(body.model_dump(), status_code=200 if status == "ok" else 503)


def _load_detail(state: StateDep) -> str | None:
    """Why the model is not serving yet; the load error itself (paths) stays in the log."""
    if state.backbone is not None:
        return None
    if state.load_error:
        return "the model failed to load; see the server log"
    return "the model is loading"


JOBS_PROBE_SECONDS = 2.0


async def jobs_status(state: StateDep) -> JobsStatus:
    """Whether the job store answers a query now (off the event loop, bounded in time)."""
    if state.jobs is None:
        if state.jobs_error is None:
            return JobsStatus(status="off")
        return JobsStatus(status="unavailable", detail="the job store could not be opened")
    try:
        async with asyncio.timeout(JOBS_PROBE_SECONDS):
            await asyncio.to_thread(state.jobs.count_by_state)
    except TimeoutError:
        return JobsStatus(status="unavailable", detail="the database did not answer in time")
    except Exception as exc:
        log.warning("readiness: the job store did not answer: %s", exc)
        return JobsStatus(status="unavailable", detail="the database did not answer")
    return JobsStatus(status="ok")


# the key is checked first: before the model is asked for (503) or the prompt is rendered
@router.post("/v1/generate", response_model=GenerateResponse, dependencies=[Depends(get_caller)])
async def generate(
    body: GenerateRequest,
    raw: Request,
    service: ServiceDep,
    state: StateDep,
    caller: CallerDep,
    x_edit_pack: Annotated[str | None, Header(alias=PACK_HEADER)] = None,
) -> GenerateResponse | JSONResponse | StreamingResponse:
    """Generate, with the edits of the packs named in `X-Edit-Pack` (none: the plain model)."""
    packs = choose_packs(
        x_edit_pack, None, service.model_name, limit=state.settings.max_packs_per_request
    )
    caller.require("read", [p.name for p in packs])
    if body.prompt is None and body.messages is None:
        raise APIError(422, "give a prompt (text to continue) or messages (a chat)", param="prompt")
    prompt: str | ChatMessages
    if body.messages is not None:
        prompt = [m.model_dump() for m in body.messages]
    elif body.chat:
        prompt = [{"role": "user", "content": body.prompt or ""}]
    else:
        prompt = body.prompt or ""
    started = await service.start(prompt, sampling_params(body), packs=packs)
    headers = edits_header(started.admitted.edits_applied)
    if body.stream:
        return StreamingResponse(
            _native_events(service, started), media_type="text/event-stream", headers=headers
        )
    result = await service.complete(started, raw)
    response = GenerateResponse(
        text=result.text,
        tokens=result.tokens,
        prompt_tokens=result.prompt_tokens,
        finish_reason=result.finish_reason,
        model=service.model_name,
        edits_applied=result.edits_applied,
    )
    return JSONResponse(response.model_dump(), headers=headers)


async def _native_events(service: ServiceDep, started: Started) -> AsyncIterator[str]:
    """`data: {"text": ...}` per delta, then one with the result fields, then `[DONE]`."""
    async for event in service.deltas(started):
        if isinstance(event, APIError):
            yield sse(json.dumps(event.body()))
        elif isinstance(event, Finished):
            result = event.generation
            yield sse(
                json.dumps(
                    {
                        "text": "",
                        "finish_reason": result.finish_reason,
                        "tokens": result.tokens,
                        "prompt_tokens": result.prompt_tokens,
                        "edits_applied": result.edits_applied,
                    }
                )
            )
        else:
            yield sse(json.dumps({"text": event.text}))
    yield sse("[DONE]")
