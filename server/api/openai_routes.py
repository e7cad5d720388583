"""OpenAI-compatible routes: /v1/completions, /v1/chat/completions, /v1/models.

A pack is chosen by the `model` field (`<base>:<pack>[@version]`) or the `X-Edit-Pack` header.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import JSONResponse, StreamingResponse

from server.api.errors import APIError
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
from server.api.state import CallerDep, ServingDep, StateDep, get_caller
from server.engine.engine import Finished
from server.engine.prepare import ChatMessages

router = APIRouter(prefix="/v1", dependencies=[Depends(get_caller)])  # auth before all else
PackHeader = Annotated[str | None, Header(alias=PACK_HEADER)]


@dataclass(frozen=True)
class _Flavor:
    """What differs between completions and chat completions: ids, object names, choices."""

    id_prefix: str
    whole_object: str
    chunk_object: str
    whole_choice: Callable[[str, str], dict[str, Any]]  # (text, finish) -> choice
    chunk_choices: Callable[[], Callable[[str | None, str | None], dict[str, Any]]]


def _completion_choice(text: str | None, finish: str | None) -> dict[str, Any]:
    return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}


def _chat_chunk_choices() -> Callable[[str | None, str | None], dict[str, Any]]:
    """Chunk choices of one stream: the first delta carries the assistant role."""
    first = True

    def choice(text: str | None, finish: str | None) -> dict[str, Any]:
        nonlocal first
        delta: dict[str, str] = {"content": text} if text is not None else {}
        if first:
            delta, first = {"role": "assistant", **delta}, False
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}

    return choice


COMPLETION = _Flavor(
    "cmpl", "text_completion", "text_completion", _completion_choice, lambda: _completion_choice
)
CHAT = _Flavor(
    "chatcmpl",
    "chat.completion",
    "chat.completion.chunk",
    lambda text, finish: {
        "index": 0,
        "message": {"role": "assistant", "content": text},
        "logprobs": None,
        "finish_reason": finish,
    },
    _chat_chunk_choices,
)


def _finish(reason: str) -> str:
    return "length" if reason == "length" else "stop"


async def _serve(
    flavor: _Flavor,
    body: OpenAIRequest,
    prompt: str | ChatMessages,
    *,
    raw: Request,
    service: GenerationService,
    state: StateDep,
    header: str | None,
    caller: CallerDep,
) -> JSONResponse | StreamingResponse:
    limit = state.settings.max_packs_per_request
    packs = choose_packs(header, body.model, service.model_name, limit=limit)
    caller.require("read", [p.name for p in packs])
    started = await service.start(prompt, sampling_params(body), packs=packs)
    response_id = new_id(flavor.id_prefix)
    headers = edits_header(started.admitted.edits_applied)
    if body.stream:
        chunks = _chunks(service, started, body, response_id, flavor)
        return StreamingResponse(chunks, media_type="text/event-stream", headers=headers)
    result = await service.complete(started, raw)
    choice = flavor.whole_choice(result.text, _finish(result.finish_reason))
    content = envelope(
        flavor.whole_object,
        response_id,
        body.model,
        [choice],
        usage=Usage.of(result.prompt_tokens, result.tokens).model_dump(),
        edits_applied=result.edits_applied,
    )
    return JSONResponse(content, headers=headers)


@router.post("/completions", response_model=None)
async def completions(
    body: CompletionRequest,
    raw: Request,
    service: ServiceDep,
    state: StateDep,
    caller: CallerDep,
    x_edit_pack: PackHeader = None,
) -> JSONResponse | StreamingResponse:
    return await _serve(
        COMPLETION,
        body,
        body.text,
        raw=raw,
        service=service,
        state=state,
        header=x_edit_pack,
        caller=caller,
    )


@router.post("/chat/completions", response_model=None)
async def chat_completions(
    body: ChatCompletionRequest,
    raw: Request,
    service: ServiceDep,
    state: StateDep,
    caller: CallerDep,
    x_edit_pack: PackHeader = None,
) -> JSONResponse | StreamingResponse:
    return await _serve(
        CHAT,
        body,
        [m.model_dump() for m in body.messages],
        raw=raw,
        service=service,
        state=state,
        header=x_edit_pack,
        caller=caller,
    )


async def _chunks(
    service: GenerationService,
    started: Started,
    body: OpenAIRequest,
    response_id: str,
    flavor: _Flavor,
) -> AsyncIterator[str]:
    """One SSE chunk per text delta, one with the finish reason, usage if asked, `[DONE]`."""
    include_usage = body.stream_options is not None and body.stream_options.include_usage
    choice_of = flavor.chunk_choices()
    kind = flavor.chunk_object
    async for event in service.deltas(started):
        if isinstance(event, APIError):  # as OpenAI and vLLM send a failure mid-stream
            yield sse(json.dumps(event.body()))
        elif isinstance(event, Finished):
            result = event.generation
            finish = choice_of(None, _finish(result.finish_reason))
            chunk = envelope(
                kind, response_id, body.model, [finish], edits_applied=result.edits_applied
            )
            yield sse(json.dumps(chunk))
            if include_usage:
                usage = Usage.of(result.prompt_tokens, result.tokens).model_dump()
                yield sse(json.dumps(envelope(kind, response_id, body.model, [], usage=usage)))
        else:
            chunk = envelope(kind, response_id, body.model, [choice_of(event.text, None)])
            yield sse(json.dumps(chunk))
    yield sse("[DONE]")


@router.get("/models", response_model=ModelList)
async def models(serving: ServingDep, caller: CallerDep) -> ModelList:
    """The base model, then `<base>:<pack>` for each live pack and `<base>:<pack>@<v>` for each
    loaded version, of the packs the caller's key may use."""
    caller.require("read")
    base, now = serving.backbone.name, int(time.time())
    registry = serving.registry
    cards = [ModelCard(id=base, created=now, root=base)]
    cards += [
        ModelCard(id=f"{base}:{name}", created=now, root=base, parent=base)
        for name in sorted(registry.live())
        if caller.allows(name)
    ]
    cards += [
        ModelCard(
            id=f"{base}:{p.ref}",
            created=int(p.manifest.created.timestamp()),
            root=base,
            parent=base,
        )
        for p in sorted(registry.loaded(), key=lambda p: str(p.ref))
        if caller.allows(p.ref.name)
    ]
    return ModelList(data=cards)
