"""The serving classes behind the generation routes, one per API flavour (as vLLM's
`entrypoints/openai/serving_*.py`): `Serving` chooses a request's packs, checks the caller may
use them, queues the request and follows it to its end or its client's departure;
`NativeServing` (here) and the OpenAI classes (`openai_serving.py`) shape the answers. A route
only hands its parsed body to one of them.

Every request has a deadline (`LKS_REQUEST_TIMEOUT_SECONDS`). The engine fails a request that
passes it; should the engine itself hang, the wait here ends a moment later anyway (504) and
the request is aborted, so no client waits forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from fastapi.responses import JSONResponse, StreamingResponse
from starlette.requests import Request

from server.api.auth import Caller
from server.api.errors import APIError
from server.api.metrics import ServerMetrics
from server.api.protocol import GenerateRequest, GenerateResponse, sampling_params
from server.api.runtime import Runtime
from server.api.selection import choose_packs, edits_header
from server.engine.engine import (
    TIMED_OUT,
    Admitted,
    EngineEvent,
    EngineRequest,
    Failed,
    Finished,
    Generation,
    Rejected,
    TextDelta,
)
from server.engine.prepare import ChatMessages, PromptRejected, RequestLimits, prepare_prompt
from server.engine.sampling import SamplingParams
from server.engine.scheduler import EngineOverloaded, EngineStopped, RequestFailed, RequestStream
from server.packs.names import PackRef
from server.packs.registry import LoadedPack
from server.settings import Settings

# How long past its deadline a request is waited for before the wait itself gives up (the
# engine fails late requests between steps; this covers an engine that hangs inside one).
DEADLINE_GRACE_SECONDS = 5.0


@dataclass
class Started:
    """A request that the engine admitted: what it applied, and its remaining events."""

    admitted: Admitted
    stream: RequestStream
    submitted_at: float
    deadline: float  # time.monotonic()

    async def next(self) -> EngineEvent:
        """The next event; `APIError` when the request failed or its deadline passed."""
        try:
            async with asyncio.timeout_at(_loop_time(self.deadline + DEADLINE_GRACE_SECONDS)):
                return await self.stream.next()
        except TimeoutError:
            self.stream.abort()
            raise failure_error(TIMED_OUT) from None
        except RequestFailed as exc:
            raise failure_error(exc.failure) from None

    async def events(self) -> AsyncIterator[EngineEvent]:
        while True:
            event = await self.next()
            yield event
            if isinstance(event, Finished):
                return


def failure_error(failure: Failed) -> APIError:
    """The HTTP error for a request the engine failed: 504 past its deadline, 503 (retry) when
    memory ran short, 500 otherwise."""
    if failure.kind == "timeout":
        return APIError(504, failure.error)
    if failure.kind == "overloaded":
        return APIError(503, failure.error, retry_after=1)
    return APIError(500, failure.error)


def _loop_time(monotonic_deadline: float) -> float:
    """A `time.monotonic()` instant on the running loop's clock."""
    return asyncio.get_running_loop().time() + (monotonic_deadline - time.monotonic())


class Serving:
    """What every API flavour does with a generation request; a subclass shapes the answer."""

    def __init__(self, runtime: Runtime, settings: Settings, metrics: ServerMetrics) -> None:
        self.runtime = runtime
        self.settings = settings
        self.metrics = metrics

    @property
    def model_name(self) -> str:
        return self.runtime.backbone.name

    def packs_for(self, caller: Caller, header: str | None, model: str | None) -> list[PackRef]:
        """The packs a request names (`X-Edit-Pack` and/or the OpenAI `model` field), once the
        caller is known to be allowed every one of them (403 otherwise)."""
        limit = self.settings.max_packs_per_request
        packs = choose_packs(header, model, self.model_name, limit=limit)
        caller.require("read", [p.name for p in packs])
        return packs

    async def resolve(self, refs: Sequence[PackRef]) -> list[LoadedPack]:
        """Pin each reference to a loaded version (loading it off the event loop)."""
        registry = self.runtime.registry
        return [await asyncio.to_thread(registry.get, ref) for ref in refs]

    async def start(
        self, prompt: str | ChatMessages, params: SamplingParams, *, packs: Sequence[PackRef]
    ) -> Started:
        """Prepare the request (a list of messages is a chat) off the event loop, queue it, and
        wait for its admission."""
        settings = self.settings
        if params.max_tokens > settings.max_tokens_limit:
            raise APIError(
                422, f"max_tokens must be <= {settings.max_tokens_limit}", param="max_tokens"
            )
        limits = RequestLimits.from_settings(settings)
        deadline = time.monotonic() + settings.request_timeout_seconds
        try:
            limits.check_shape(params, None if isinstance(prompt, str) else len(prompt))
            loaded = await self.resolve(packs)
            edit_sets = [p.edit_set for p in loaded]
            prepared = await asyncio.to_thread(
                prepare_prompt,
                self.runtime.backbone,
                prompt,
                params,
                edit_sets=edit_sets,
                limits=limits,
            )
        except PromptRejected as exc:
            raise APIError(422, exc.message, param=exc.param) from None
        request = EngineRequest(
            "",  # the engine runs the prepared token ids
            params,
            edit_sets=edit_sets,
            prompt=prepared,
            deadline=deadline,
        )
        submitted_at = time.perf_counter()
        try:
            stream = self.runtime.scheduler.submit(request)
        except EngineOverloaded as exc:
            raise APIError(503, f"server busy: {exc}; retry shortly", retry_after=1) from exc
        except EngineStopped as exc:
            raise APIError(503, f"server unavailable: {exc}") from exc
        pending = Started(Admitted(0, []), stream, submitted_at, deadline)
        try:
            first = await pending.next()
        except BaseException:
            stream.abort()
            raise
        if isinstance(first, Rejected):  # prepared above, so only a bound the engine checks
            raise APIError(422, first.message, param=first.param)
        if not isinstance(first, Admitted):
            raise APIError(500, f"the engine answered {type(first).__name__} before admitting")
        self.metrics.prompt_tokens.inc(first.prompt_tokens)
        for label in first.edits_applied:
            self.metrics.edits_applied.labels(label.partition("@")[0]).inc()
        pending.admitted = first
        return pending

    def _observe(self, started: Started, event: object, first_text: bool) -> bool:
        """Record time to first token and generated tokens; returns whether text was seen."""
        if isinstance(event, TextDelta) and not first_text:
            self.metrics.time_to_first_token.observe(time.perf_counter() - started.submitted_at)
            return True
        if isinstance(event, Finished):
            self.metrics.generated_tokens.inc(event.generation.tokens)
            for label in event.generation.edits_released:
                self.metrics.edits_released.labels(label.partition("@")[0]).inc()
        return first_text

    async def complete(self, started: Started, request: Request) -> Generation:
        """The whole generation; aborted if the client disconnects first."""

        async def finish() -> Generation:
            seen_text = False
            async for event in started.events():
                seen_text = self._observe(started, event, seen_text)
                if isinstance(event, Finished):
                    return event.generation
            raise APIError(500, "generation ended without a result")

        result = asyncio.ensure_future(finish())
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({result, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if not result.done():
            started.stream.abort()
            result.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await result
            raise APIError(499, "client closed the request")
        return result.result()

    async def deltas(self, started: Started) -> AsyncIterator[TextDelta | Finished | APIError]:
        """Text as it is generated, then the result, or an `APIError` as the last item if the
        request fails mid-stream (the status line has gone: the route sends it as an event);
        aborts the request if abandoned."""
        finished = seen_text = False
        try:
            async for event in started.events():
                seen_text = self._observe(started, event, seen_text)
                if isinstance(event, TextDelta | Finished):
                    finished = isinstance(event, Finished)
                    yield event
        except APIError as exc:
            finished = True  # the engine has let go of it
            yield exc
        finally:
            if not finished:
                started.stream.abort()


async def _disconnected(request: Request) -> None:
    """Returns when the client hangs up (the ASGI server sends `http.disconnect`)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def sse(payload: str) -> str:
    return f"data: {payload}\n\n"


class NativeServing(Serving):
    """`POST /v1/generate`: packs from `X-Edit-Pack`, a JSON answer or `data:` events."""

    async def generate(
        self, body: GenerateRequest, raw: Request, caller: Caller, header: str | None
    ) -> JSONResponse | StreamingResponse:
        packs = self.packs_for(caller, header, None)
        started = await self.start(_native_prompt(body), sampling_params(body), packs=packs)
        headers = edits_header(started.admitted.edits_applied)
        if body.stream:
            events = self._events(started)
            return StreamingResponse(events, media_type="text/event-stream", headers=headers)
        result = await self.complete(started, raw)
        response = GenerateResponse(
            text=result.text,
            tokens=result.tokens,
            prompt_tokens=result.prompt_tokens,
            finish_reason=result.finish_reason,
            model=self.model_name,
            edits_applied=result.edits_applied,
            edits_released=result.edits_released,
        )
        return JSONResponse(response.model_dump(), headers=headers)

    async def _events(self, started: Started) -> AsyncIterator[str]:
        """`data: {"text": ...}` per delta, then one with the result fields, then `[DONE]`."""
        async for event in self.deltas(started):
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
                            "edits_released": result.edits_released,
                        }
                    )
                )
            else:
                yield sse(json.dumps({"text": event.text}))
        yield sse("[DONE]")


def _native_prompt(body: GenerateRequest) -> str | ChatMessages:
    """Text to continue, or a chat: `messages`, or `prompt` as one user turn with `chat`."""
    if body.prompt is None and body.messages is None:
        raise APIError(422, "give a prompt (text to continue) or messages (a chat)", param="prompt")
    if body.messages is not None:
        return [m.model_dump() for m in body.messages]
    if body.chat:
        return [{"role": "user", "content": body.prompt or ""}]
    return body.prompt or ""
