"""Generation on the resident backbone, one request at a time.

The first engine: a lock around Hugging Face `generate`. The batching scheduler of the serving
issue replaces it behind the same `Generator.generate` call.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Literal

import torch

from server.lks.apply import EditSet, plan_for_sets
from server.lks.hook import EditPlan
from server.model.backbone import Backbone

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0  # 0 is greedy
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        assert self.max_tokens >= 1, f"max_tokens must be >= 1, got {self.max_tokens}"
        assert self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}"
        assert 0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"


@dataclass(frozen=True)
class Generation:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: FinishReason
    edits_applied: list[str] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return len(self.token_ids)


class Generator:
    def __init__(self, backbone: Backbone) -> None:
        self.backbone = backbone
        self._lock = threading.Lock()  # one forward pass at a time on the shared model

    def prompt_text(self, prompt: str, *, chat: bool) -> str:
        return self.backbone.render_chat([{"role": "user", "content": prompt}]) if chat else prompt

    @torch.inference_mode()
    def generate(
        self,
        text: str,
        params: SamplingParams,
        *,
        templated: bool = False,
        edit_sets: Sequence[EditSet] = (),
    ) -> Generation:
        """Generate from `text` as the model sees it (`templated`: a rendered chat template,
        which already holds its special tokens), with the edits of `edit_sets` applied."""
        backbone = self.backbone
        tokenizer = backbone.tokenizer
        encoded = tokenizer(
            text,
            return_tensors="pt",
            add_special_tokens=not templated,
            return_offsets_mapping=bool(edit_sets),
        )
        input_ids = encoded["input_ids"].to(backbone.device)
        attention_mask = encoded["attention_mask"].to(backbone.device)
        planned = []
        if edit_sets:
            offsets = [tuple(o) for o in encoded["offset_mapping"][0].tolist()]
            planned = plan_for_sets(edit_sets, text, offsets)
        eos_ids = self.backbone.eos_token_ids
        sampling: dict[str, object] = {"do_sample": False}
        if params.temperature > 0:
            sampling = {"do_sample": True, "temperature": params.temperature, "top_p": params.top_p}
        with self._lock, ExitStack() as stack:
            for layer in sorted({e.layer for e in planned}):
                edits = [(0, e.position, e.delta) for e in planned if e.layer == layer]
                plan = EditPlan.build(
                    edits, hidden_size=backbone.hidden_size, device=backbone.device
                )
                stack.enter_context(backbone.edit_hooks.at(layer).plan(plan))
            if params.seed is not None:
                torch.manual_seed(params.seed)
            output = backbone.model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                max_new_tokens=params.max_tokens,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=eos_ids,
                top_k=None,
                **sampling,
            )
        new_ids = output[0, input_ids.shape[1] :].tolist()
        finish: FinishReason = "length"
        if new_ids and new_ids[-1] in eos_ids:
            new_ids, finish = new_ids[:-1], "stop"
        return Generation(
            text=tokenizer.decode(new_ids, skip_special_tokens=True),
            token_ids=new_ids,
            prompt_tokens=int(input_ids.shape[1]),
            finish_reason=finish,
            edits_applied=[e.label for e in planned],
        )
