"""OpenAI-compatible routes: /v1/completions, /v1/chat/completions, /v1/models.

A pack is chosen by the `model` field (`<base>:<pack>[@version]`) or the `X-Edit-Pack` header.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Header, Request
from fastapi.responses import JSONResponse, StreamingResponse

from server.api.openai_protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    ModelCard,
    ModelList,
    OpenAIRequest,
    Usage,
    envelope,
    new_id,
)
from server.api.protocol import sampling_params
from server.api.selection import PACK_HEADER, choose_packs, edits_header
from server.api.serving import GenerationService, ServiceDep, Started, sse
from server.api.state import ServingDep, StateDep
from server.engine.engine import Finished

router = APIRouter(prefix="/v1")
PackHeader = Annotated[str | None, Header(alias=PACK_HEADER)]


async def _start(
    service: GenerationService,
    body: OpenAIRequest,
    text: str,
    *,
    templated: bool,
    header: str | None,
    limit: int,
) -> Started:
    packs = choose_packs(header, body.model, service.model_name, limit=limit)
    return await service.start(text, sampling_params(body), templated=templated, packs=packs)


def _finish(reason: str) -> str:
    return "length" if reason == "length" else "stop"


@router.post("/completions", response_model=None)
async def completions(
    body: CompletionRequest,
    raw: Request,
    service: ServiceDep,
    state: StateDep,
    x_edit_pack: PackHeader = None,
) -> JSONResponse | StreamingResponse:
    limit = state.settings.max_packs_per_request
    started = await _start(
        service, body, body.text, templated=False, header=x_edit_pack, limit=limit
    )
    response_id, headers = new_id("cmpl"), edits_header(started.admitted.edits_applied)
    if body.stream:
        return StreamingResponse(
            _completion_chunks(service, started, body, response_id),
            media_type="text/event-stream",
            headers=headers,
        )
    result = await service.complete(started, raw)
    choice = {
        "index": 0,
        "text": result.text,
        "logprobs": None,
        "finish_reason": _finish(result.finish_reason),
    }
    content = envelope(
        "text_completion",
        response_id,
        body.model,
        [choice],
        usage=Usage.of(result.prompt_tokens, result.tokens).model_dump(),
        edits_applied=result.edits_applied,
    )
    return JSONResponse(content, headers=headers)


@router.post("/chat/completions", response_model=None)
async def chat_completions(
    body: ChatCompletionRequest,
    raw: Request,
    service: ServiceDep,
    state: StateDep,
    x_edit_pack: PackHeader = None,
) -> JSONResponse | StreamingResponse:
    text = service.render([m.model_dump() for m in body.messages])
    started = await _start(
        service,
        body,
        text,
        templated=True,
        header=x_edit_pack,
        limit=state.settings.max_packs_per_request,
    )
    response_id, headers = new_id("chatcmpl"), edits_header(started.admitted.edits_applied)
    if body.stream:
        return StreamingResponse(
            _chat_chunks(service, started, body, response_id),
            media_type="text/event-stream",
            headers=headers,
        )
    result = await service.complete(started, raw)
    choice = {
        "index": 0,
        "message": {"role": "assistant", "content": result.text},
        "logprobs": None,
        "finish_reason": _finish(result.finish_reason),
    }
    content = envelope(
        "chat.completion",
        response_id,
        body.model,
        [choice],
        usage=Usage.of(result.prompt_tokens, result.tokens).model_dump(),
        edits_applied=result.edits_applied,
    )
    return JSONResponse(content, headers=headers)


async def _chunks(
    service: GenerationService,
    started: Started,
    body: OpenAIRequest,
    response_id: str,
    kind: str,
    choice_of: Any,
) -> AsyncIterator[str]:
    """One SSE chunk per text delta, one with the finish reason, usage if asked, `[DONE]`."""
    include_usage = body.stream_options is not None and body.stream_options.include_usage
    async for event in service.deltas(started):
        if isinstance(event, Finished):
            result = event.generation
            chunk = envelope(
                kind,
                response_id,
                body.model,
                [choice_of(None, _finish(result.finish_reason))],
                edits_applied=result.edits_applied,
            )
            yield sse(json.dumps(chunk))
            if include_usage:
                usage = Usage.of(result.prompt_tokens, result.tokens).model_dump()
                yield sse(json.dumps(envelope(kind, response_id, body.model, [], usage=usage)))
        else:
            yield sse(
                json.dumps(envelope(kind, response_id, body.model, [choice_of(event.text, None)]))
            )
    yield sse("[DONE]")


def _completion_chunks(
    service: GenerationService, started: Started, body: OpenAIRequest, response_id: str
) -> AsyncIterator[str]:
    def choice(text: str | None, finish: str | None) -> dict[str, Any]:
        return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}

    return _chunks(service, started, body, response_id, "text_completion", choice)


def _chat_chunks(
    service: GenerationService, started: Started, body: OpenAIRequest, response_id: str
) -> AsyncIterator[str]:
    first = True

    def choice(text: str | None, finish: str | None) -> dict[str, Any]:
        nonlocal first
        delta: dict[str, str] = {"content": text} if text is not None else {}
        if first:
            delta, first = {"role": "assistant", **delta}, False
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}

    return _chunks(service, started, body, response_id, "chat.completion.chunk", choice)


@router.get("/models", response_model=ModelList)
async def models(serving: ServingDep) -> ModelList:
    """The base model, then `<base>:<pack>` for each live pack and `<base>:<pack>@<v>` for each
    loaded version."""
    base, now = serving.backbone.name, int(time.time())
    registry = serving.registry
    cards = [ModelCard(id=base, created=now, root=base)]
    cards += [
        ModelCard(id=f"{base}:{name}", created=now, root=base, parent=base)
        for name in sorted(registry.live())
    ]
    cards += [
        ModelCard(
            id=f"{base}:{p.ref}",
            created=int(p.manifest.created.timestamp()),
            root=base,
            parent=base,
        )
        for p in sorted(registry.loaded(), key=lambda p: str(p.ref))
    ]
    return ModelList(data=cards)
