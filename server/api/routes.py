"""Native API routes: health and generation."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import JSONResponse, StreamingResponse

from server.api.errors import APIError
from server.api.protocol import (
    GenerateRequest,
    GenerateResponse,
    HealthResponse,
    sampling_params,
)
from server.api.selection import PACK_HEADER, choose_packs, edits_header
from server.api.serving import ServiceDep, Started, sse
from server.api.state import CallerDep, StateDep, get_caller
from server.engine.engine import Finished

router = APIRouter()


@router.get("/healthz", response_model=HealthResponse)
async def healthz(state: StateDep) -> HealthResponse:
    """Liveness: the process answers, whatever the model is doing."""
    status = "ok" if state.backbone else ("failed" if state.load_error else "loading")
    return HealthResponse(status=status, model=state.settings.model_name, detail=state.load_error)


@router.get("/readyz", response_model=HealthResponse, responses={503: {"model": HealthResponse}})
async def readyz(state: StateDep) -> HealthResponse | JSONResponse:
    """Readiness: 200 only once the backbone is loaded and requests can be served."""
    if state.backbone is not None:
        return HealthResponse(status="ok", model=state.backbone.name)
    body = HealthResponse(
        status="failed" if state.load_error else "loading",
        model=state.settings.model_name,
        detail=state.load_error,
    )
    return JSONResponse(body.model_dump(), status_code=503)


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
    if body.messages is not None:
        text, templated = service.render([m.model_dump() for m in body.messages]), True
    elif body.chat:
        text, templated = service.render([{"role": "user", "content": body.prompt or ""}]), True
    else:
        text, templated = body.prompt or "", False
    started = await service.start(text, sampling_params(body), templated=templated, packs=packs)
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
        if isinstance(event, Finished):
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
