"""Request and response models of the native API."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, description="The text to continue, or the user's message.")
    max_tokens: int = Field(default=16, ge=1)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0, description="0 is greedy.")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = None
    chat: bool = Field(default=False, description="Wrap the prompt in the model's chat template.")


class GenerateResponse(BaseModel):
    text: str
    tokens: int
    prompt_tokens: int
    finish_reason: Literal["stop", "length"]
    model: str


class HealthResponse(BaseModel):
    status: Literal["ok", "loading", "failed"]
    model: str
    detail: str | None = None
