"""Measuring an edit: reliability, generality, locality (teacher-forced top-1, as in the LKS
paper), generation exact-match and fluency, with the unedited baseline on the same items."""

from __future__ import annotations

import inspect
import math
import time
from collections import Counter
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch

from server.lks.apply import EditSet
from server.lks.facts import Fact
from server.lks.hook import EditPlan
from server.lks.scope import EncodedText, length_batches, pad_batch
from server.model.backbone import Backbone


@dataclass(frozen=True)
class EvalItem:
    fact: Fact
    generality: str | None = None
    locality_prompt: str | None = None
    locality_target: str | None = None


@dataclass(frozen=True)
class GenerationSample:
    """One item's greedy generations, edited and unedited: what the exact-match and fluency
    figures are averaged from, kept so a drop can be read rather than guessed."""

    prompt: str
    target: str
    edited: str
    unedited: str
    fluency_edited: float
    fluency_unedited: float


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def _applied(
    backbone: Backbone, table: EditSet | None, edits: list[tuple[int, int, int]]
) -> AbstractContextManager[None]:
    """The next forward pass with `edits` (batch row, position, subject row) of `table`."""
    if table is None:
        return nullcontext()
    planned = [(row, position, table.deltas[subject]) for row, position, subject in edits]
    plan = EditPlan.build(planned, hidden_size=backbone.hidden_size, device=backbone.device)
    return backbone.edit_hooks.at(table.layer).plan(plan)


def _keeps_some_logits(model: torch.nn.Module) -> bool:
    """Whether the model's forward can skip the output head at positions nobody reads (the
    head is about a fifth of the default model's compute)."""
    return "logits_to_keep" in inspect.signature(model.forward).parameters


@torch.inference_mode()
def top1_predictions(
    backbone: Backbone,
    sequences: Sequence[EncodedText],
    table: EditSet | None,
    batch_size: int = 32,
) -> list[list[int]]:
    """The model's top-1 token at each sequence's `predict_at` positions, edited or not."""
    results: list[list[int]] = [[] for _ in sequences]
    pad_id = int(backbone.tokenizer.pad_token_id)
    keep_some = _keeps_some_logits(backbone.model)
    for batch in length_batches([len(s.ids) for s in sequences], batch_size):
        chunk = [sequences[i] for i in batch]
        ids, mask = pad_batch(chunk, pad_id, backbone.device)
        edits = [(r, p, s) for r, seq in enumerate(chunk) for s, p in seq.edits]
        positions = sorted({p for seq in chunk for p in seq.predict_at})
        column = {p: i for i, p in enumerate(positions)} if keep_some else None
        extra = (
            {"logits_to_keep": torch.tensor(positions, device=backbone.device)} if keep_some else {}
        )
        with _applied(backbone, table, edits):
            logits = backbone.model(input_ids=ids, attention_mask=mask, **extra).logits
        for row, (index, seq) in enumerate(zip(batch, chunk, strict=True)):
            at = [column[p] for p in seq.predict_at] if column is not None else seq.predict_at
            results[index] = logits[row, at].argmax(-1).tolist()
    return results


def _accuracy(predicted: Sequence[int], expected: Sequence[int]) -> float:
    return _mean([float(p == e) for p, e in zip(predicted, expected, strict=True)])


def says_target(generation: str, target: str) -> bool:
    """Generation exact match: the greedy continuation starts with the new target."""
    return generation.strip().startswith(target.strip())


def ngram_entropy(text: str) -> float:
    """ROME's fluency measure: weighted bi- and tri-gram entropy of a generation's words."""
    words = text.split()
    entropies, weights = [], [2 / 3, 4 / 3]
    for n in (2, 3):
        grams = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
        total = sum(grams.values())
        probs = [c / total for c in grams.values()] if total else []
        entropies.append(-sum(p * math.log2(p) for p in probs))
    return sum(w * e for w, e in zip(weights, entropies, strict=True)) / sum(weights)


@torch.inference_mode()
def greedy_generations(
    backbone: Backbone,
    prompts: Sequence[str],
    table: EditSet | None,
    max_new_tokens: int = 24,
    batch_size: int = 64,
) -> list[str]:
    """Batched greedy generation with LEFT padding: the plan's positions shift by each row's
    pad count, as a serving batch's do. Prompts of similar length share a batch; on the CPU a
    decode step of 64 rows costs little more than one of 16 (the weights are read once)."""
    tokenizer = backbone.tokenizer
    encoded = (
        table.encode_all(tokenizer, [(p, None) for p in prompts])
        if table is not None
        else [EncodedText(tokenizer(p)["input_ids"], [], [], []) for p in prompts]
    )
    outputs = [""] * len(prompts)
    for batch in length_batches([len(e.ids) for e in encoded], batch_size):
        width = max(len(encoded[i].ids) for i in batch)
        ids = torch.full((len(batch), width), int(tokenizer.pad_token_id), dtype=torch.long)
        mask = torch.zeros_like(ids)
        edits = []
        for row, index in enumerate(batch):
            enc = encoded[index]
            pad = width - len(enc.ids)
            ids[row, pad:] = torch.tensor(enc.ids)
            mask[row, pad:] = 1
            edits += [(row, pad + pos, s) for s, pos in enc.edits]
        with _applied(backbone, table, edits):
            out = backbone.model.generate(
                input_ids=ids.to(backbone.device),
                attention_mask=mask.to(backbone.device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                top_k=None,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=backbone.eos_token_ids,
            )
        texts = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
        for index, text in zip(batch, texts, strict=True):
            outputs[index] = text
    return outputs


def evaluate(
    backbone: Backbone,
    items: Sequence[EvalItem],
    table: EditSet,
    *,
    fluency: bool = True,
    generations: bool = True,
    samples: list[GenerationSample] | None = None,
) -> dict[str, float]:
    """Teacher-forced metrics; with `generations`, also greedy exact match (and `fluency`).
    `samples`, when given, receives each item's generations (it needs `fluency`)."""
    assert samples is None or (generations and fluency), "samples need generations and fluency"
    started = time.perf_counter()
    tokenizer = backbone.tokenizer

    rel = table.encode_all(tokenizer, [(it.fact.prompt, it.fact.target) for it in items])
    gen = table.encode_all(
        tokenizer, [(it.generality, it.fact.target) for it in items if it.generality]
    )
    loc = table.encode_all(
        tokenizer,
        [
            (it.locality_prompt, it.locality_target)
            for it in items
            if it.locality_prompt and it.locality_target
        ],
    )
    edited_rel = top1_predictions(backbone, rel, table)
    base_rel = top1_predictions(backbone, rel, None)
    edited_gen = top1_predictions(backbone, gen, table)
    edited_loc = top1_predictions(backbone, loc, table)
    base_loc = top1_predictions(backbone, loc, None)
    metrics = {
        "reliability": _mean(
            [_accuracy(p, s.target_ids) for p, s in zip(edited_rel, rel, strict=True)]
        ),
        "generality": _mean(
            [_accuracy(p, s.target_ids) for p, s in zip(edited_gen, gen, strict=True)]
        ),
        "locality": _mean([_accuracy(e, b) for e, b in zip(edited_loc, base_loc, strict=True)]),
        "baseline_reliability": _mean(
            [_accuracy(p, s.target_ids) for p, s in zip(base_rel, rel, strict=True)]
        ),
    }
    if not generations:
        metrics["eval_seconds"] = time.perf_counter() - started
        return metrics
    prompts = [it.fact.prompt for it in items]
    edited_text = greedy_generations(backbone, prompts, table)
    metrics["exact_match"] = _mean(
        [float(says_target(t, it.fact.target)) for t, it in zip(edited_text, items, strict=True)]
    )
    if fluency:
        base_text = greedy_generations(backbone, prompts, None)
        edited_fluency = [ngram_entropy(t) for t in edited_text]
        base_fluency = [ngram_entropy(t) for t in base_text]
        metrics["fluency_edited"] = _mean(edited_fluency)
        metrics["fluency_unedited"] = _mean(base_fluency)
        if samples is not None:
            samples += [
                GenerationSample(it.fact.prompt, it.fact.target, *generated)
                for it, *generated in zip(
                    items, edited_text, base_text, edited_fluency, base_fluency, strict=True
                )
            ]
    metrics["eval_seconds"] = time.perf_counter() - started
    return metrics
