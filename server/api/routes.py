"""Native API routes: health and generation."""

from __future__ import annotations

import asyncio
import logging
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import JSONResponse, StreamingResponse

from server.api.protocol import (
    EngineStatus,
    GenerateRequest,
    GenerateResponse,
    HealthResponse,
    JobsStatus,
)
from server.api.selection import PACK_HEADER
from server.api.state import CallerDep, NativeDep, StateDep, get_caller

log = logging.getLogger(__name__)
router = APIRouter()


@router.get("/healthz", response_model=HealthResponse)
async def healthz(state: StateDep) -> HealthResponse:
    """Liveness: the process answers, whatever the model is doing."""
    status = "ok" if state.runtime else ("failed" if state.load_error else "loading")
    return HealthResponse(
        status=status, model=state.settings.model_name, detail=_load_detail(state)
    )


@router.get("/readyz", response_model=HealthResponse, responses={503: {"model": HealthResponse}})
async def readyz(state: StateDep) -> HealthResponse | JSONResponse:
    """Readiness: 200 only while requests can be served: the backbone is loaded, the engine
    thread is alive and past compiling its decode step, and no work has waited longer than
    LKS_READY_STALL_SECONDS for a step. The job store's state is reported beside it
    (generation does not need it)."""
    jobs = await jobs_status(state)
    runtime = state.runtime
    if runtime is None:
        body = HealthResponse(
            status="failed" if state.load_error else "loading",
            model=state.settings.model_name,
            detail=_load_detail(state),
            jobs=jobs,
        )
        return JSONResponse(body.model_dump(), status_code=503)
    health = runtime.scheduler.health()
    engine = EngineStatus(
        alive=health.alive,
        in_flight=health.in_flight,
        stalled_seconds=round(health.stalled_seconds, 3),
    )
    limit = state.settings.ready_stall_seconds
    status, detail = "ok", None
    if not health.alive:
        status, detail = "failed", f"the engine thread has stopped: {health.failure}"
    elif health.warming:
        status = "warming"
        detail = "compiling the decode step (LKS_COMPILE_DECODE); requests wait until it is done"
    elif health.stalled_seconds > limit:
        status = "stalled"
        detail = (
            f"{health.in_flight} requests wait and no engine step has ended for "
            f"{health.stalled_seconds:.0f} s (LKS_READY_STALL_SECONDS={limit:g})"
        )
    body = HealthResponse(
        status=status, model=runtime.backbone.name, detail=detail, engine=engine, jobs=jobs
    )
    return JSONResponse(body.model_dump(), status_code=200 if status == "ok" else 503)


def _load_detail(state: StateDep) -> str | None:
    """Why the model is not serving yet; the load error itself (paths) stays in the log."""
    if state.runtime is not None:
        return None
    if state.load_error:
        return "the model failed to load; see the server log"
    return "the model is loading"


JOBS_PROBE_SECONDS = 2.0


async def jobs_status(state: StateDep) -> JobsStatus:
    """Whether the job store answers a query now (off the event loop, bounded in time)."""
    jobs = state.training.jobs
    if jobs is None:
        return JobsStatus(status="off")
    try:
        async with asyncio.timeout(JOBS_PROBE_SECONDS):
            await asyncio.to_thread(jobs.count_by_state)
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
    serving: NativeDep,
    caller: CallerDep,
    x_edit_pack: Annotated[str | None, Header(alias=PACK_HEADER)] = None,
) -> JSONResponse | StreamingResponse:
    """Generate, with the edits of the packs named in `X-Edit-Pack` (none: the plain model)."""
    return await serving.generate(body, raw, caller, x_edit_pack)
