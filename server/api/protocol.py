"""Request and response models of the native API."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from server.engine.sampling import SamplingParams


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str  # bounded once rendered (LKS_MAX_PROMPT_CHARS)


def stop_list(stop: str | list[str] | None) -> tuple[str, ...]:
    """Their number and length are bounded by settings (LKS_MAX_STOP_STRINGS, _CHARS)."""
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not all(stops):
        raise ValueError("stop: strings must not be empty")
    return tuple(stops)


class SamplingFields(BaseModel):
    """What every generation request shares (native and OpenAI)."""

    max_tokens: int = Field(default=16, ge=1)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0, description="0 is greedy.")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    stop: str | list[str] | None = Field(default=None, description="End before these strings.")
    stream: bool = False
    ignore_eos: bool = Field(default=False, description="Generate max_tokens even past EOS.")

    @model_validator(mode="after")
    def _check_stop(self) -> SamplingFields:
        stop_list(self.stop)
        return self


class GenerateRequest(SamplingFields):
    model_config = ConfigDict(extra="forbid")

    prompt: str | None = Field(
        default=None, min_length=1, description="The text to continue (LKS_MAX_PROMPT_CHARS)."
    )
    messages: list[ChatMessage] | None = Field(
        default=None, min_length=1, description="A chat, rendered with the model's template."
    )
    chat: bool = Field(default=False, description="Wrap `prompt` in the chat template.")

    @model_validator(mode="after")
    def _one_input(self) -> GenerateRequest:
        if self.prompt is not None and self.messages is not None:
            raise ValueError("give prompt or messages, not both")
        return self


class GenerateResponse(BaseModel):
    text: str
    tokens: int
    prompt_tokens: int
    finish_reason: Literal["stop", "length", "abort"]
    model: str
    edits_applied: list[str] = Field(
        default_factory=list, description="pack@version:subject for each edit used."
    )
    edits_released: list[str] = Field(
        default_factory=list,
        description="The edits that stopped steering once the answer said their target.",
    )


class EngineStatus(BaseModel):
    alive: bool = Field(description="The engine thread runs.")
    in_flight: int = Field(description="Requests queued or running.")
    stalled_seconds: float = Field(description="How long work has waited with no step ending.")


class JobsStatus(BaseModel):
    status: Literal["ok", "unavailable", "off"]
    detail: str | None = None


class HealthResponse(BaseModel):
    status: Literal["ok", "loading", "warming", "failed", "stalled"]
    model: str
    detail: str | None = Field(default=None, description="Why the status is not ok.")
    engine: EngineStatus | None = None
    jobs: JobsStatus | None = Field(
        default=None, description="The job store; generation stays ready without it."
    )


def sampling_params(fields: SamplingFields) -> SamplingParams:
    return SamplingParams(
        max_tokens=fields.max_tokens,
        temperature=fields.temperature,
        top_p=fields.top_p,
        seed=fields.seed,
        stop=stop_list(fields.stop),
        ignore_eos=fields.ignore_eos,
    )
