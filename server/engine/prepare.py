"""Preparing a request before the engine sees it: render, tokenise once, check every bound,
find the edited subjects once and plan their edits (gate queries encoded in one batch).

The server runs this off the event loop and off the engine thread (as vLLM's input processor
does), so a hostile prompt costs its own request's time, never a step that other requests
share. The engine receives token ids and an edit plan, nothing left to compute.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from server.engine.sampling import SamplingParams
from server.model.backbone import Backbone
from server.packs.edit_set import EditSet, PlannedEdit, TooManySubjectMatchesError, plan_edits
from server.settings import Settings

ChatMessages = Sequence[Mapping[str, str]]


class PromptRejected(ValueError):
    """The request cannot run as asked; `param` names the field to change."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


@dataclass(frozen=True)
class RequestLimits:
    """The bounds on one request's size, each an `LKS_` setting (the README lists them). None
    is no bound: in-process callers (the CLI, evaluation) are trusted; the model's context
    always applies."""

    max_prompt_chars: int | None = None
    max_chat_messages: int | None = None
    max_stop_strings: int | None = None
    max_stop_chars: int | None = None
    max_subject_matches: int | None = None
    max_request_tokens: int | None = None  # prompt + max_tokens

    @classmethod
    def from_settings(cls, settings: Settings) -> RequestLimits:
        return cls(
            max_prompt_chars=settings.max_prompt_chars,
            max_chat_messages=settings.max_chat_messages,
            max_stop_strings=settings.max_stop_strings,
            max_stop_chars=settings.max_stop_chars,
            max_subject_matches=settings.max_subject_matches,
            max_request_tokens=settings.max_batch_tokens,
        )

    def check_shape(self, params: SamplingParams, messages: int | None = None) -> None:
        """The cheap checks, before any rendering or tokenising."""
        if _over(messages, self.max_chat_messages):
            raise PromptRejected(
                f"{messages} chat messages; at most {self.max_chat_messages} "
                "(LKS_MAX_CHAT_MESSAGES)",
                "messages",
            )
        if _over(len(params.stop), self.max_stop_strings):
            raise PromptRejected(
                f"{len(params.stop)} stop strings; at most {self.max_stop_strings} "
                "(LKS_MAX_STOP_STRINGS)",
                "stop",
            )
        longest = max((len(s) for s in params.stop), default=0)
        if _over(longest, self.max_stop_chars):
            raise PromptRejected(
                f"a stop string of {longest} characters; at most {self.max_stop_chars} "
                "(LKS_MAX_STOP_CHARS)",
                "stop",
            )


@dataclass(frozen=True)
class PreparedPrompt:
    """What the engine runs: the prompt's token ids and the edits planned on them."""

    token_ids: list[int]
    edits: list[PlannedEdit]


def prepare_prompt(
    backbone: Backbone,
    prompt: str | ChatMessages,
    params: SamplingParams,
    *,
    templated: bool = False,
    edit_sets: Sequence[EditSet] = (),
    limits: RequestLimits | None = None,
) -> PreparedPrompt:
    """Render (a list of messages goes through the chat template), tokenise once, check the
    bounds (cheapest first: nothing is detected in a prompt that is refused for its length),
    then plan the edits. Raises `PromptRejected` with the field to change."""
    limits = limits or RequestLimits()
    messages = None if isinstance(prompt, str) else len(prompt)
    limits.check_shape(params, messages)
    if isinstance(prompt, str):
        text = prompt
    else:
        text, templated = backbone.render_chat([dict(m) for m in prompt]), True
    if _over(len(text), limits.max_prompt_chars):
        raise PromptRejected(
            f"the prompt is {len(text)} characters once rendered; at most "
            f"{limits.max_prompt_chars} (LKS_MAX_PROMPT_CHARS)",
            "messages" if messages is not None else "prompt",
        )
    encoded = backbone.tokenizer(
        text, add_special_tokens=not templated, return_offsets_mapping=bool(edit_sets)
    )
    token_ids = list(encoded["input_ids"])
    _check_tokens(backbone, len(token_ids), params.max_tokens, limits)
    edits: list[PlannedEdit] = []
    if edit_sets:
        offsets = [tuple(o) for o in encoded["offset_mapping"]]
        try:
            edits = plan_edits(edit_sets, text, offsets, max_matches=limits.max_subject_matches)
        except TooManySubjectMatchesError as exc:
            raise PromptRejected(str(exc), "prompt") from None
    return PreparedPrompt(token_ids, edits)


def _over(value: int | None, bound: int | None) -> bool:
    return value is not None and bound is not None and value > bound


def _check_tokens(
    backbone: Backbone, prompt_tokens: int, max_tokens: int, limits: RequestLimits
) -> None:
    if not prompt_tokens:
        raise PromptRejected("the prompt is empty once tokenized", "prompt")
    total = prompt_tokens + max_tokens
    context = backbone.context_length
    if context is not None and total > context:
        raise PromptRejected(
            f"the prompt ({prompt_tokens} tokens) plus max_tokens ({max_tokens}) exceeds the "
            f"model's context of {context} tokens",
            "max_tokens",
        )
    budget = limits.max_request_tokens
    if _over(total, budget):
        raise PromptRejected(
            f"the prompt ({prompt_tokens} tokens) plus max_tokens ({max_tokens}) exceeds the "
            f"server's token budget of {budget} (LKS_MAX_BATCH_TOKENS)",
            "max_tokens",
        )
