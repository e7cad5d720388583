"""The OpenAI flavours: `/v1/completions` and `/v1/chat/completions` share everything but the
prompt (text or messages) and the shape of a choice; `/v1/models` lists what `model` may name.

A pack is chosen by the `model` field (`<base>:<pack>[@version]`) or the `X-Edit-Pack` header.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Generic, TypeVar

from fastapi.responses import JSONResponse, StreamingResponse
from starlette.requests import Request

from server.api.auth import Caller
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
from server.api.runtime import Runtime
from server.api.selection import edits_header
from server.api.serving import Serving, Started, sse
from server.engine.engine import Finished
from server.engine.prepare import ChatMessages

Body = TypeVar("Body", bound=OpenAIRequest)
ChunkChoice = Callable[[str | None, str | None], dict[str, Any]]  # (text, finish) -> choice


def finish_reason(reason: str) -> str:
    """OpenAI's two: "length" when max_tokens ended it, "stop" otherwise."""
    return "length" if reason == "length" else "stop"


class OpenAIServing(Serving, Generic[Body]):
    """Select, authorise, start; answer with one object or a stream of chunks, in OpenAI's
    envelope. A subclass says how its prompt is read and how its choices look."""

    id_prefix: str
    whole_object: str
    chunk_object: str

    def prompt(self, body: Body) -> str | ChatMessages:
        raise NotImplementedError

    def whole_choice(self, text: str, finish: str) -> dict[str, Any]:
        raise NotImplementedError

    def chunk_choices(self) -> ChunkChoice:
        """The choice of each chunk of one stream (a new one per stream: it may keep state)."""
        raise NotImplementedError

    async def create(
        self, body: Body, raw: Request, caller: Caller, header: str | None
    ) -> JSONResponse | StreamingResponse:
        packs = self.packs_for(caller, header, body.model)
        started = await self.start(self.prompt(body), sampling_params(body), packs=packs)
        response_id = new_id(self.id_prefix)
        headers = edits_header(started.admitted.edits_applied)
        if body.stream:
            chunks = self._chunks(started, body, response_id)
            return StreamingResponse(chunks, media_type="text/event-stream", headers=headers)
        result = await self.complete(started, raw)
        content = envelope(
            self.whole_object,
            response_id,
            body.model,
            [self.whole_choice(result.text, finish_reason(result.finish_reason))],
            usage=Usage.of(result.prompt_tokens, result.tokens).model_dump(),
            edits_applied=result.edits_applied,
            edits_released=result.edits_released,
        )
        return JSONResponse(content, headers=headers)

    async def _chunks(self, started: Started, body: Body, response_id: str) -> AsyncIterator[str]:
        """One SSE chunk per text delta, one with the finish reason, usage if asked, `[DONE]`."""
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        choice_of = self.chunk_choices()
        kind = self.chunk_object
        async for event in self.deltas(started):
            if isinstance(event, APIError):  # as OpenAI and vLLM send a failure mid-stream
                yield sse(json.dumps(event.body()))
            elif isinstance(event, Finished):
                result = event.generation
                finish = choice_of(None, finish_reason(result.finish_reason))
                chunk = envelope(
                    kind,
                    response_id,
                    body.model,
                    [finish],
                    edits_applied=result.edits_applied,
                    edits_released=result.edits_released,
                )
                yield sse(json.dumps(chunk))
                if include_usage:
                    usage = Usage.of(result.prompt_tokens, result.tokens).model_dump()
                    yield sse(json.dumps(envelope(kind, response_id, body.model, [], usage=usage)))
            else:
                chunk = envelope(kind, response_id, body.model, [choice_of(event.text, None)])
                yield sse(json.dumps(chunk))
        yield sse("[DONE]")


def _completion_choice(text: str | None, finish: str | None) -> dict[str, Any]:
    return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}


class OpenAIServingCompletion(OpenAIServing[CompletionRequest]):
    """`POST /v1/completions`: text to continue."""

    id_prefix = "cmpl"
    whole_object = chunk_object = "text_completion"

    def prompt(self, body: CompletionRequest) -> str:
        return body.text

    def whole_choice(self, text: str, finish: str) -> dict[str, Any]:
        return _completion_choice(text, finish)

    def chunk_choices(self) -> ChunkChoice:
        return _completion_choice


class OpenAIServingChat(OpenAIServing[ChatCompletionRequest]):
    """`POST /v1/chat/completions`: messages, rendered with the model's chat template."""

    id_prefix = "chatcmpl"
    whole_object = "chat.completion"
    chunk_object = "chat.completion.chunk"

    def prompt(self, body: ChatCompletionRequest) -> ChatMessages:
        return [m.model_dump() for m in body.messages]

    def whole_choice(self, text: str, finish: str) -> dict[str, Any]:
        message = {"role": "assistant", "content": text}
        return {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}

    def chunk_choices(self) -> ChunkChoice:
        """Chunk choices of one stream: the first delta carries the assistant role."""
        first = True

        def choice(text: str | None, finish: str | None) -> dict[str, Any]:
            nonlocal first
            delta: dict[str, str] = {"content": text} if text is not None else {}
            if first:
                delta, first = {"role": "assistant", **delta}, False
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}

        return choice


def model_list(runtime: Runtime, caller: Caller) -> ModelList:
    """The base model, then `<base>:<pack>` for each live pack and `<base>:<pack>@<v>` for each
    loaded version, of the packs the caller's key may use."""
    base, now = runtime.backbone.name, int(time.time())
    registry = runtime.registry
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
