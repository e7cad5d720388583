"""Measuring an edit: reliability, generality, locality (teacher-forced top-1, as in the LKS
paper), generation exact-match and fluency, with the unedited baseline on the same items."""

from __future__ import annotations

import inspect
import math
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from server.editor.answers import (
    CONTEXTS,
    MAX_ANSWER_TOKENS,
    Context,
    answer_hit,
    answer_pairs,
    applied_edits,
    degenerate,
    encode_texts,
    generate,
    render,
    target_repeats,
)
from server.editor.facts import Fact
from server.editor.scope import EncodedText, length_batches, pad_batch
from server.model.backbone import Backbone
from server.packs.edit_set import EditSet

Kind = Literal["question", "paraphrase", "locality"]
KINDS: tuple[Kind, ...] = ("question", "paraphrase", "locality")


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
        with applied_edits(backbone, table, edits):
            logits = backbone.model(input_ids=ids, attention_mask=mask, **extra).logits
        for row, (index, seq) in enumerate(zip(batch, chunk, strict=True)):
            at = [column[p] for p in seq.predict_at] if column is not None else seq.predict_at
            results[index] = logits[row, at].argmax(-1).tolist()
    return results


def token_accuracy(predicted: Sequence[int], expected: Sequence[int]) -> float:
    """The share of positions whose top-1 token is the expected one (teacher-forced)."""
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


def greedy_generations(
    backbone: Backbone,
    prompts: Sequence[str],
    table: EditSet | None,
    max_new_tokens: int = 24,
    batch_size: int = 64,
    *,
    release: bool = False,
) -> list[str]:
    """Batched greedy continuations of bare prompts (the exact-match and fluency figures)."""
    encoded = encode_texts(backbone, [(p, False) for p in prompts], table)
    answers = generate(backbone, encoded, table, max_new_tokens, batch_size, release=release)
    return [a.text for a in answers]


def _continuation_metrics(
    backbone: Backbone,
    items: Sequence[EvalItem],
    table: EditSet,
    fluency: bool,
    samples: list[GenerationSample] | None,
    release: bool = False,
) -> dict[str, float]:
    """Bare-prompt continuations (24 tokens): exact match, and n-gram entropy with `fluency`."""
    metrics: dict[str, float] = {}
    prompts = [it.fact.prompt for it in items]
    edited_text = greedy_generations(backbone, prompts, table, release=release)
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
    return metrics


def evaluate(
    backbone: Backbone,
    items: Sequence[EvalItem],
    table: EditSet,
    *,
    fluency: bool = True,
    generations: bool = True,
    samples: list[GenerationSample] | None = None,
    contexts: Sequence[Context] = (),
    answer_samples: list[dict[str, Any]] | None = None,
    release: bool = False,
) -> dict[str, float]:
    """Teacher-forced metrics; with `generations`, also greedy exact match (and `fluency`).
    `samples`, when given, receives each item's generations (it needs `fluency`). `contexts`
    (answers.CONTEXTS: what users see) adds the answer metrics of answers.py in each, and
    `answer_samples` receives their per-answer records. `release`: answers are generated as
    an engine with `release_answered_edits` serves them."""
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
            [token_accuracy(p, s.target_ids) for p, s in zip(edited_rel, rel, strict=True)]
        ),
        "generality": _mean(
            [token_accuracy(p, s.target_ids) for p, s in zip(edited_gen, gen, strict=True)]
        ),
        "locality": _mean(
            [token_accuracy(e, b) for e, b in zip(edited_loc, base_loc, strict=True)]
        ),
        "baseline_reliability": _mean(
            [token_accuracy(p, s.target_ids) for p, s in zip(base_rel, rel, strict=True)]
        ),
    }
    if generations:
        metrics.update(_continuation_metrics(backbone, items, table, fluency, samples, release))
    if contexts:
        metrics.update(
            answer_metrics(
                backbone, items, table, contexts, samples=answer_samples, release=release
            )
        )
    metrics["eval_seconds"] = time.perf_counter() - started
    return metrics


# ---------------------------------------------------------------------------------------------
# The metrics over a benchmark's items


def _prompt(item: EvalItem, kind: Kind) -> str | None:
    if kind == "question":
        return item.fact.prompt
    if kind == "paraphrase":
        return item.generality
    return item.locality_prompt


def answer_metrics(
    backbone: Backbone,
    items: Sequence[EvalItem],
    table: EditSet,
    contexts: Sequence[Context] = CONTEXTS,
    *,
    max_new_tokens: int = MAX_ANSWER_TOKENS,
    samples: list[dict[str, Any]] | None = None,
    release: bool = False,
) -> dict[str, float]:
    """`{context}_{kind}_{metric}` for each context; kinds question and paraphrase get
    answer_hit (edited and `_unedited`), degenerate (both), target_repeats, stops (both) and
    `edited` (the share the gate opened for); `{context}_locality` is the share of same-subject
    other questions whose answer is unchanged (with `{context}_locality_edited`, the share the
    gate wrongly opened for). `samples` receives one record per item, context and kind."""
    jobs: list[tuple[int, Context, Kind, str]] = []
    for index, item in enumerate(items):
        for context in contexts:
            for kind in KINDS:
                prompt = _prompt(item, kind)
                if prompt:
                    jobs.append((index, context, kind, prompt))
    texts = [render(backbone, context, prompt) for _, context, _, prompt in jobs]
    edited, unedited = answer_pairs(backbone, texts, table, max_new_tokens, release=release)
    per: dict[tuple[Context, Kind], list[dict[str, Any]]] = {}
    for (index, context, kind, prompt), new, old in zip(jobs, edited, unedited, strict=True):
        targets = (items[index].fact.target,)
        record: dict[str, Any] = {
            "item": index,
            "context": context,
            "kind": kind,
            "prompt": prompt,
            "target": targets[0],
            "edited": new.text,
            "unedited": old.text,
            "edit_applied": new.edited,
            "degenerate_edited": degenerate(new.text),
            "degenerate_unedited": degenerate(old.text),
            "stops_edited": new.stopped,
            "stops_unedited": old.stopped,
        }
        if kind == "locality":
            record["unchanged"] = new.text == old.text
        else:
            record["answer_hit"] = answer_hit(new.text, targets)
            record["answer_hit_unedited"] = answer_hit(old.text, targets)
            record["target_repeats"] = target_repeats(new.text, targets)
        per.setdefault((context, kind), []).append(record)
        if samples is not None:
            samples.append(record)
    metrics: dict[str, float] = {}
    for (context, kind), records in per.items():

        def share(key: str, rows: list[dict[str, Any]] = records) -> float:
            return _mean([float(r[key]) for r in rows])

        if kind == "locality":
            metrics[f"{context}_locality"] = share("unchanged")
            metrics[f"{context}_locality_edited"] = share("edit_applied")
            continue
        prefix = f"{context}_{kind}"
        metrics[f"{prefix}_answer_hit"] = share("answer_hit")
        metrics[f"{prefix}_answer_hit_unedited"] = share("answer_hit_unedited")
        metrics[f"{prefix}_degenerate"] = share("degenerate_edited")
        metrics[f"{prefix}_degenerate_unedited"] = share("degenerate_unedited")
        metrics[f"{prefix}_target_repeats"] = share("target_repeats")
        metrics[f"{prefix}_stops"] = share("stops_edited")
        metrics[f"{prefix}_stops_unedited"] = share("stops_unedited")
        metrics[f"{prefix}_edited"] = share("edit_applied")
    return metrics
