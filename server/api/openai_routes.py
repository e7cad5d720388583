"""OpenAI-compatible routes: /v1/completions, /v1/chat/completions, /v1/models. The serving
classes (`openai_serving.py`) do the work; a route hands them its parsed body."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import JSONResponse, StreamingResponse

from server.api.openai_protocol import ChatCompletionRequest, CompletionRequest, ModelList
from server.api.openai_serving import model_list
from server.api.selection import PACK_HEADER
from server.api.state import CallerDep, ChatDep, CompletionDep, RuntimeDep, get_caller

router = APIRouter(prefix="/v1", dependencies=[Depends(get_caller)])  # auth before all else
PackHeader = Annotated[str | None, Header(alias=PACK_HEADER)]


@router.post("/completions", response_model=None)
async def completions(
    body: CompletionRequest,
    raw: Request,
    serving: CompletionDep,
    caller: CallerDep,
    x_edit_pack: PackHeader = None,
) -> JSONResponse | StreamingResponse:
    return await serving.create(body, raw, caller, x_edit_pack)


@router.post("/chat/completions", response_model=None)
async def chat_completions(
    body: ChatCompletionRequest,
    raw: Request,
    serving: ChatDep,
    caller: CallerDep,
    x_edit_pack: PackHeader = None,
) -> JSONResponse | StreamingResponse:
    return await serving.create(body, raw, caller, x_edit_pack)


@router.get("/models", response_model=ModelList)
async def models(runtime: RuntimeDep, caller: CallerDep) -> ModelList:
    """The base model, then `<base>:<pack>` for each live pack and `<base>:<pack>@<v>` for each
    loaded version, of the packs the caller's key may use."""
    caller.require("read")
    return model_list(runtime, caller)
