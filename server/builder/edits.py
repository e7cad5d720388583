"""The editor end to end: facts -> trained subject table + scope gate -> pack content."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from server.editor.config import TrainConfig
from server.editor.facts import Fact
from server.editor.precompute import DEFAULT_CACHE_BUDGET_BYTES
from server.editor.scope import Scope
from server.editor.train import ProgressCallback, Trainer, TrainResult
from server.gate.encoder import ENCODER_NAME, SentenceEncoder
from server.gate.rule import RULE, gate_rows
from server.gate.scope_gate import ScopeGate
from server.gate.table import GateTable
from server.model.backbone import Backbone
from server.packs.edit_set import EditSet, release_targets
from server.packs.format import BLOCKS_KEY, BackboneInfo, PackContent


def backbone_info(backbone: Backbone) -> BackboneInfo:
    return BackboneInfo(
        name=backbone.name, fingerprint=backbone.fingerprint, model_type=backbone.model_type
    )


@dataclass(frozen=True)
class KnownParts:
    """What a published version already computed: the block of each subject's feature text and
    the gate embedding of each masked prompt. Applying the same weights to a grown fact set
    reuses them, so only new or changed subjects cost a forward pass."""

    blocks: dict[str, torch.Tensor] = field(default_factory=dict)
    prompt_embeddings: dict[str, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def from_content(cls, content: PackContent) -> KnownParts:
        facts = [Fact.model_validate(record) for record in content.facts]
        scope = Scope.from_facts(facts)
        deltas = content.table[BLOCKS_KEY]
        if deltas.shape[0] != len(scope.feature_texts):  # not this editor's table: reuse nothing
            return cls()
        gate = GateTable.from_tensors(content.table)
        embeddings: dict[str, torch.Tensor] = {}
        if gate is not None:
            prompts, names = [f.prompt for f in facts], scope.fact_names()
            rows, _ = gate_rows(prompts, names, [f.target for f in facts])
            if gate.prompt_embeddings.shape[0] != len(rows):  # before answer rows: prompts only
                rows, _ = gate_rows(prompts, names)
            if gate.prompt_embeddings.shape[0] == len(rows):
                embeddings = dict(zip(rows, gate.prompt_embeddings, strict=True))
        return cls(dict(zip(scope.feature_texts, deltas, strict=True)), embeddings)


@dataclass(frozen=True)
class Edits:
    """A subject table with its scope gate: what training (or applying given weights) made of
    a fact set, ready to check (`edit_set`) and to publish (`content`)."""

    result: TrainResult
    gate_table: GateTable
    edit_set: EditSet

    def content(
        self, facts: Sequence[Fact], metrics: dict[str, float] | None = None
    ) -> PackContent:
        """The version's files: blocks and gate table, hypernetwork, facts, training record."""
        result = self.result
        training = result.training_record()
        training["gate"] = {
            "encoder": ENCODER_NAME,
            "rule": RULE,
            "threshold": float(self.gate_table.threshold),
        }
        return PackContent(
            layer=result.layer,
            subjects=list(result.scope.subjects),
            table={BLOCKS_KEY: result.deltas.float().cpu(), **self.gate_table.to_tensors()},
            hypernet={k: v.detach().float().cpu() for k, v in result.hypernet.state_dict().items()},
            facts=[f.model_dump(exclude_defaults=True) for f in facts],
            training=training,
            metrics=metrics or {},
        )


def train_edits(
    backbone: Backbone,
    facts: Sequence[Fact],
    encoder: SentenceEncoder,
    config: TrainConfig | None = None,
    progress: ProgressCallback | None = None,
    *,
    warm_start: dict[str, torch.Tensor] | None = None,
    train_on: Sequence[int] | None = None,
    known: KnownParts | None = None,
    cache_budget_bytes: int = DEFAULT_CACHE_BUDGET_BYTES,
) -> Edits:
    """Train the hypernetwork on `facts` (from `warm_start` weights if given; on the `train_on`
    facts only, as growth does), then build the subject table and the gate table, reusing the
    `known` gate embeddings."""
    trainer = Trainer(backbone, config, cache_budget_bytes=cache_budget_bytes)
    result = trainer.train(facts, progress, warm_start=warm_start, train_on=train_on)
    return _with_gate(backbone, facts, encoder, result, known or KnownParts())


def apply_edits(
    backbone: Backbone,
    facts: Sequence[Fact],
    encoder: SentenceEncoder,
    weights: dict[str, torch.Tensor],
    config: TrainConfig | None = None,
    *,
    known: KnownParts | None = None,
) -> Edits:
    """No training: the given hypernetwork weights build the subject table (a grown fact set
    first tries the previous version's weights as they are), reusing the `known` blocks and
    gate embeddings computed with those weights."""
    known = known or KnownParts()
    result = Trainer(backbone, config).apply_weights(facts, weights, known_blocks=known.blocks)
    return _with_gate(backbone, facts, encoder, result, known)


def fact_gate_table(
    encoder: SentenceEncoder,
    facts: Sequence[Fact],
    scope: Scope,
    known: Mapping[str, torch.Tensor] | None = None,
) -> GateTable:
    """The gate table a pack version stores for its facts (benchmarks build theirs here too, so
    they measure what the server builds)."""
    return GateTable.build(
        encoder,
        [f.prompt for f in facts],
        scope.fact_names(),
        scope.fact_rows,
        known=known,
        targets=[f.target for f in facts],
    )


def _with_gate(
    backbone: Backbone,
    facts: Sequence[Fact],
    encoder: SentenceEncoder,
    result: TrainResult,
    known: KnownParts,
) -> Edits:
    gate_table = fact_gate_table(encoder, facts, result.scope, known.prompt_embeddings)
    edit_set = EditSet(
        subjects=result.scope.subjects,
        deltas=result.deltas.to(backbone.dtype),
        layer=result.layer,
        gate=ScopeGate(gate_table, encoder),
        targets=release_targets(
            result.scope.subjects, [(f.subject, f.prompt, f.target) for f in facts]
        ),
    )
    return Edits(result, gate_table, edit_set)
