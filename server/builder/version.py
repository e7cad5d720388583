"""One way to build a pack version: a fact set (and the version before it) in, a checked
candidate out. The worker, `lks train` and the benchmarks all call `build_version`; only what
they do with the candidate (publish it, print it, time it) differs.

A version is built under a `BuildPolicy`:

- warm start: when the fact set only grew since the previous version, start from that version's
  hypernetwork instead of from zero;
- growth: a grown set first tries those weights as they are (the hypernetwork reads new targets
  from the feature texts), and trains only when they miss the quality gate, on the new facts
  plus a replay sample of the learned ones;
- reuse: blocks and gate embeddings the previous version computed with the same weights are
  taken as they are, so only new or changed subjects cost a forward pass;
- quality gate: reliability on the pack's own facts, locality on the facts' own locality prompts
  where they have any and on held-out probes; a candidate under the minimums is refused.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from server.builder.edits import Edits, KnownParts, apply_edits, train_edits
from server.editor.config import TrainConfig
from server.editor.facts import Fact, FactKey, fact_key
from server.editor.hypernet import starts_from
from server.editor.precompute import DEFAULT_CACHE_BUDGET_BYTES
from server.editor.scope import Scope
from server.editor.train import ProgressCallback, growth_selection
from server.evaluation.evaluate import EvalItem, evaluate, top1_predictions
from server.gate.encoder import SentenceEncoder
from server.gate.rule import PLACEHOLDER, STATEMENT_PROBES
from server.model.backbone import Backbone
from server.packs.edit_set import EditSet
from server.packs.errors import PackError, PackIncompatibleError
from server.packs.format import Pack, PackContent, check_compatible
from server.packs.names import PackRef
from server.settings import Settings

if TYPE_CHECKING:
    from server.packs.store import PackStore

log = logging.getLogger(__name__)

LOCALITY_PROBE_TARGET = " the"  # one token: compares the predictions right after the prompt


@dataclass(frozen=True)
class BuildPolicy:
    """How a version is built; every step can be turned off (`lks train --no-...`)."""

    warm_start: bool = True
    growth: bool = True
    reuse: bool = True
    quality_gate: bool = True
    min_reliability: float = 0.9
    min_locality: float = 0.8  # on the facts' own locality prompts and on held-out probes
    probe_limit: int = 120
    # Growth that reuses the previous version's blocks checks the new or changed subjects' facts
    # and this many of the unchanged ones (their blocks and gate rows are bit-identical).
    growth_check_sample: int = 256
    train: TrainConfig = field(default_factory=TrainConfig)
    cache_budget_bytes: int = DEFAULT_CACHE_BUDGET_BYTES

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: object) -> BuildPolicy:
        values: dict[str, object] = {
            "min_reliability": settings.publish_min_reliability,
            "min_locality": settings.publish_min_locality,
            "cache_budget_bytes": settings.train_cache_mb << 20,
        }
        return cls(**{**values, **overrides})  # type: ignore[arg-type]


@dataclass(frozen=True)
class StartingPoint:
    """What a build can start from: a hypernetwork trained on this backbone (same layer, same
    kind), the facts it learned, and the parts it computed with those weights."""

    weights: dict[str, torch.Tensor]
    learned: frozenset[FactKey]
    known: KnownParts = field(default_factory=KnownParts)
    source: str = "given weights"  # for the log: "pack@version"

    @classmethod
    def of(cls, previous: Pack, backbone: Backbone, config: TrainConfig) -> StartingPoint | None:
        """The version's weights, or None when they cannot serve here: an empty version, another
        backbone (`format.check_compatible`), another layer or another hypernetwork."""
        learned = frozenset(fact_key(Fact.model_validate(f)) for f in previous.content.facts)
        if not learned:  # an empty version: no weights
            return None
        try:
            check_compatible(
                previous.manifest,
                fingerprint=backbone.fingerprint,
                hidden_size=backbone.hidden_size,
                num_layers=backbone.num_layers,
            )
        except PackIncompatibleError as exc:
            log.info("no warm start: %s", exc)
            return None
        if previous.content.layer != config.resolve_layer(backbone.num_layers):
            return None
        if not starts_from(config.hypernet, previous.content.training.get("hypernet")):
            return None
        return cls(
            previous.content.hypernet,
            learned,
            KnownParts.from_content(previous.content),
            source=previous.ref,
        )


def latest_start(
    store: PackStore, pack: str, backbone: Backbone, config: TrainConfig
) -> StartingPoint | None:
    """The pack's latest version as a starting point, if it has a usable one."""
    versions = store.versions(pack)
    if not versions:
        return None
    try:
        previous = store.load(PackRef(pack, versions[-1]))
    except PackError as exc:
        log.warning("pack %s@%d unreadable, training from scratch: %s", pack, versions[-1], exc)
        return None
    return StartingPoint.of(previous, backbone, config)


@dataclass(frozen=True)
class Candidate:
    """A built version: its content (what publishing writes), its metrics, and the quality
    gate's refusal if it was refused (nothing to publish then)."""

    edits: Edits
    content: PackContent
    metrics: dict[str, float]
    rejection: str | None = None


def build_version(
    backbone: Backbone,
    facts: Sequence[Fact],
    encoder: SentenceEncoder,
    start: StartingPoint | None = None,
    policy: BuildPolicy | None = None,
    *,
    training: Backbone | None = None,
    progress: ProgressCallback | None = None,
    checkpoint: Callable[[], None] | None = None,
) -> Candidate:
    """Build a version of `facts` from `start` (the previous version) under `policy`: trained
    on `training` (the copy training runs on, `load_training_backbone`; default the backbone
    itself), checked on `backbone`, as it will serve. `progress` receives the training steps;
    `checkpoint` runs after each attempt's training, before its check (the worker's lease stops
    a cancelled job there)."""
    assert facts, "a version with no facts is `empty_content`"
    policy = policy or BuildPolicy()
    trainer = training or backbone
    wanted = {fact_key(f) for f in facts}
    if start is not None and not (policy.warm_start and start.learned <= wanted):
        start = None  # asked not to, or a fact it learned is no longer wanted
    if start is not None:
        log.info(
            "warm start from %s (%d of %d facts learned)",
            start.source,
            len(start.learned),
            len(wanted),
        )
    known = start.known if start is not None and policy.reuse else KnownParts()
    # (apply the weights as they are?, the facts to train on: None for all)
    attempts: list[tuple[bool, list[int] | None]] = [(False, None)]
    if start is not None and policy.growth:
        attempts = [(True, None), (False, growth_selection(facts, set(start.learned)))]
    for apply_only, train_on in attempts:
        if apply_only:
            assert start is not None
            edits = apply_edits(trainer, facts, encoder, start.weights, policy.train, known=known)
        else:
            edits = train_edits(
                trainer,
                facts,
                encoder,
                policy.train,
                progress,
                warm_start=start.weights if start is not None else None,
                train_on=train_on,
                known=known,
                cache_budget_bytes=policy.cache_budget_bytes,
            )
        trained = 0 if apply_only else len(facts) if train_on is None else len(train_on)
        checked: list[Fact] = []
        if policy.quality_gate:
            checked = (
                facts_to_check(facts, edits.result.scope, known, policy.growth_check_sample)
                if apply_only
                else list(facts)
            )
        if checkpoint is not None:
            checkpoint()
        metrics = {
            **(
                check_quality(backbone, checked, edits.edit_set, policy.probe_limit)
                if policy.quality_gate
                else {}
            ),
            "warm_start": 1.0 if start is not None else 0.0,
            "trained_facts": float(trained),
            "checked_facts": float(len(checked)),
        }
        rejection = quality_rejection(metrics, policy) if policy.quality_gate else None
        if rejection is None:
            break
        if apply_only:
            log.info("the previous weights miss the quality gate; training")
    return Candidate(edits, edits.content(facts, metrics), metrics, rejection)


def quality_rejection(metrics: dict[str, float], policy: BuildPolicy) -> str | None:
    """Why the quality gate refuses these figures, or None when they pass."""
    passed = (
        metrics["reliability"] >= policy.min_reliability
        and metrics.get("locality", 1.0) >= policy.min_locality
        and metrics["probe_locality"] >= policy.min_locality
    )
    if passed:
        return None
    return (
        f"quality gate: reliability {metrics['reliability']:.2f} "
        f"(min {policy.min_reliability}), locality "
        f"{metrics.get('locality', float('nan')):.2f} and on held-out probes "
        f"{metrics['probe_locality']:.2f} (min {policy.min_locality}); the live "
        "version stays"
    )


def facts_to_check(
    facts: Sequence[Fact], scope: Scope, known: KnownParts, sample: int, seed: int = 0
) -> list[Fact]:
    """The quality gate's facts when the previous version's blocks were reused: every fact of a
    new or changed subject, and a seeded sample of the rest, whose blocks and gate rows are the
    ones the previous version was checked with. A 10,000-fact pack grown by 100 facts checks
    ~360 facts, not 10,100."""
    reused = [scope.feature_texts[row] in known.blocks for row in scope.fact_rows]
    changed = [f for f, was in zip(facts, reused, strict=True) if not was]
    unchanged = [f for f, was in zip(facts, reused, strict=True) if was]
    return changed + random.Random(seed).sample(unchanged, min(sample, len(unchanged)))


def check_quality(
    backbone: Backbone, facts: Sequence[Fact], edit_set: EditSet, probe_limit: int
) -> dict[str, float]:
    """The quality gate's figures: reliability on the pack's own facts (teacher-forced
    top-1), and locality as the share of the facts' locality prompts whose next-token
    prediction the edit leaves unchanged (only when the facts carry any)."""
    items = [EvalItem(fact) for fact in facts]
    items += [
        EvalItem(fact, locality_prompt=local.prompt, locality_target=LOCALITY_PROBE_TARGET)
        for fact in facts
        for local in fact.locality
    ]
    metrics = evaluate(backbone, items, edit_set, fluency=False, generations=False)
    metrics["probe_locality"] = probe_locality(backbone, facts, edit_set, probe_limit)
    return {k: round(v, 4) for k, v in metrics.items() if v == v}  # NaN: nothing to measure


def probe_locality(
    backbone: Backbone, facts: Sequence[Fact], edit_set: EditSet, limit: int
) -> float:
    """Held-out locality: generic prompts about OTHER relations of the edited subjects
    ("X was born in", ...), which training never saw; the share whose next-token prediction
    the pack leaves unchanged. A sample of at most `limit`, seeded."""
    rng = random.Random(0)
    subjects = sorted({f.subject for f in facts})
    pairs = [(s, p) for s in subjects for p in STATEMENT_PROBES]
    prompts = [p.replace(PLACEHOLDER, s) for s, p in rng.sample(pairs, min(len(pairs), limit))]
    tokenizer = backbone.tokenizer
    sequences = edit_set.encode_all(tokenizer, [(p, LOCALITY_PROBE_TARGET) for p in prompts])
    edited = top1_predictions(backbone, sequences, edit_set)
    unedited = top1_predictions(backbone, sequences, None)
    return sum(e == u for e, u in zip(edited, unedited, strict=True)) / max(len(prompts), 1)
