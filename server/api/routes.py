"""Native API routes."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from server.api.errors import APIError
from server.api.protocol import GenerateRequest, GenerateResponse, HealthResponse
from server.api.state import GeneratorDep, StateDep
from server.engine.generate import SamplingParams

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


@router.post("/v1/generate", response_model=GenerateResponse)
async def generate(
    request: GenerateRequest, state: StateDep, generator: GeneratorDep
) -> GenerateResponse:
    limit = state.settings.max_tokens_limit
    if request.max_tokens > limit:
        raise APIError(422, f"max_tokens must be <= {limit}", param="max_tokens")
    params = SamplingParams(
        max_tokens=request.max_tokens,
        temperature=request.temperature,
        top_p=request.top_p,
        seed=request.seed,
    )
    text = generator.prompt_text(request.prompt, chat=request.chat)
    result = await asyncio.to_thread(generator.generate, text, params, templated=request.chat)
    return GenerateResponse(
        text=result.text,
        tokens=result.tokens,
        prompt_tokens=result.prompt_tokens,
        finish_reason=result.finish_reason,
        model=generator.backbone.name,
    )
