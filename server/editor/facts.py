"""Facts: the user's input. Parsed and validated line by line, so every problem is reported with
its line number and what to fix, not just the first one."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

MAX_TEXT_CHARS = 1000
MIN_SUBJECT_CHARS = 2

FactKey = tuple[str, str, str]  # (subject, prompt, target)


def fact_key(record: Fact | dict[str, Any]) -> FactKey:
    """What makes two facts the same edit, for a parsed fact or one stored in a pack."""
    if isinstance(record, Fact):
        return (record.subject, record.prompt, record.target)
    return (record["subject"], record["prompt"], record["target"])


class LocalityPrompt(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: str = Field(min_length=1, max_length=MAX_TEXT_CHARS)


class Fact(BaseModel):
    """One edit: `prompt` (which names `subject`) should now be answered with `target`."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=False)

    subject: str = Field(min_length=1, max_length=200)
    prompt: str = Field(min_length=1, max_length=MAX_TEXT_CHARS)
    target: str = Field(min_length=1, max_length=200)
    paraphrases: list[str] = Field(default_factory=list, max_length=32)
    aliases: list[str] = Field(default_factory=list, max_length=32)
    locality: list[LocalityPrompt] = Field(default_factory=list, max_length=32)

    @model_validator(mode="before")
    @classmethod
    def _accept_easyedit_spelling(cls, data: Any) -> Any:
        # EasyEdit / ROME call the new answer `target_new` (sometimes {"str": ...}).
        if isinstance(data, dict) and "target_new" in data and "target" not in data:
            data = dict(data)
            target = data.pop("target_new")
            data["target"] = target.get("str") if isinstance(target, dict) else target
        return data

    @field_validator("subject", "prompt", "target")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be blank")
        return value

    @field_validator("subject")
    @classmethod
    def _subject_long_enough(cls, value: str) -> str:
        if len(value.strip()) < MIN_SUBJECT_CHARS:
            raise ValueError(
                f"a subject needs at least {MIN_SUBJECT_CHARS} characters: a one-character "
                "subject would match almost every prompt"
            )
        return value

    @field_validator("paraphrases", "aliases")
    @classmethod
    def _items_not_blank(cls, values: list[str]) -> list[str]:
        if any(not v.strip() or len(v) > MAX_TEXT_CHARS for v in values):
            raise ValueError(f"items must be non-blank and at most {MAX_TEXT_CHARS} characters")
        return values

    @field_validator("aliases")
    @classmethod
    def _aliases_long_enough(cls, values: list[str]) -> list[str]:
        if any(len(v.strip()) < MIN_SUBJECT_CHARS for v in values):
            raise ValueError(
                f"an alias needs at least {MIN_SUBJECT_CHARS} characters, as a subject does"
            )
        return values

    @model_validator(mode="after")
    def _subject_in_prompts(self) -> Fact:
        names = [self.subject, *self.aliases]
        if self.subject not in self.prompt:
            raise ValueError(f"prompt does not contain the subject {self.subject!r}")
        for paraphrase in self.paraphrases:
            if not any(name in paraphrase for name in names):
                raise ValueError(
                    f"paraphrase {paraphrase!r} names neither the subject nor an alias"
                )
        return self

    @property
    def key(self) -> tuple[str, str]:
        return (self.subject, self.prompt)


@dataclass(frozen=True)
class FactProblem:
    line: int
    reason: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.reason}"


@dataclass
class ParsedFacts:
    facts: list[Fact] = field(default_factory=list)
    errors: list[FactProblem] = field(default_factory=list)
    conflicts: list[FactProblem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors and not self.conflicts


def _describe(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors():
        loc = ".".join(str(p) for p in error["loc"])
        message = str(error["msg"]).removeprefix("Value error, ")
        parts.append(f"{loc}: {message}" if loc else message)
    return "; ".join(parts)


def parse_fact(raw: Any) -> Fact:
    return Fact.model_validate(raw)


def collect_facts(records: Iterable[tuple[int, Any]], *, later_wins: bool = False) -> ParsedFacts:
    """Validate (line number, raw record) pairs; a conflict is the same subject and prompt with
    another target: an error, unless `later_wins`, when the later fact replaces the earlier."""
    result = ParsedFacts()
    seen: dict[tuple[str, str], tuple[int, int]] = {}  # key -> (line, index in result.facts)
    for line, raw in records:
        try:
            fact = parse_fact(raw)
        except ValidationError as exc:
            result.errors.append(FactProblem(line, _describe(exc)))
            continue
        if fact.key in seen:
            first_line, index = seen[fact.key]
            earlier = result.facts[index]
            if earlier.target == fact.target:
                continue  # an exact repeat adds nothing
            if not later_wins:
                result.conflicts.append(
                    FactProblem(
                        line,
                        f"conflicts with line {first_line}: same subject and prompt, "
                        f"target {fact.target!r} vs {earlier.target!r} "
                        "(drop one, or let the later one win)",
                    )
                )
                continue
            result.facts[index] = fact
            seen[fact.key] = (line, index)
            continue
        seen[fact.key] = (line, len(result.facts))
        result.facts.append(fact)
    return result


def parse_facts_jsonl(text: str, *, later_wins: bool = False) -> ParsedFacts:
    records: list[tuple[int, Any]] = []
    bad_json: list[FactProblem] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append((number, json.loads(line)))
        except json.JSONDecodeError as exc:
            bad_json.append(FactProblem(number, f"not valid JSON ({exc.msg})"))
    result = collect_facts(records, later_wins=later_wins)
    result.errors = sorted(bad_json + result.errors, key=lambda p: p.line)
    return result


def is_question(text: str) -> bool:
    """A question ("Who wrote Hamlet?"), not a statement to complete ("Hamlet was written by"):
    the instruct model ends its answer to a bare question and goes on after a statement."""
    return text.rstrip().endswith("?")
