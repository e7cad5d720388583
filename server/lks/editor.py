"""The editor end to end: facts -> trained subject table + scope gate -> pack content."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from server.lks.apply import EditSet
from server.lks.facts import Fact
from server.lks.gate import (
    ENCODER_NAME,
    RULE,
    GateTable,
    ScopeGate,
    SentenceEncoder,
    masked_prompts,
)
from server.lks.scope import Scope
from server.lks.train import (
    DEFAULT_CACHE_BUDGET_BYTES,
    ProgressCallback,
    TrainConfig,
    Trainer,
    TrainResult,
)
from server.model.backbone import Backbone
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
        if gate is not None and gate.prompt_embeddings.shape[0] == len(facts):
            masked = masked_prompts([f.prompt for f in facts], scope.fact_names())
            embeddings = dict(zip(masked, gate.prompt_embeddings, strict=True))
        return cls(dict(zip(scope.feature_texts, deltas, strict=True)), embeddings)


def train_edits(
    backbone: Backbone,
    facts: Sequence[Fact],
    encoder: SentenceEncoder,
    config: TrainConfig | None = None,
    progress: ProgressCallback | None = None,
    *,
    warm_start: dict[str, torch.Tensor] | None = None,
    train_on: Sequence[int] | None = None,
    apply_only: bool = False,
    known: KnownParts | None = None,
    cache_budget_bytes: int = DEFAULT_CACHE_BUDGET_BYTES,
) -> tuple[TrainResult, GateTable, EditSet]:
    """`apply_only` with `warm_start`: no training, the given weights build the subject table
    (a grown fact set first tries the previous version's hypernetwork as it is), reusing the
    `known` blocks computed with those weights. Gate embeddings are reused in every mode."""
    known = known or KnownParts()
    trainer = Trainer(backbone, config, cache_budget_bytes=cache_budget_bytes)
    if apply_only:
        assert warm_start is not None, "apply_only needs the weights to apply (warm_start)"
        result = trainer.apply_weights(facts, warm_start, known_blocks=known.blocks)
    else:
        result = trainer.train(facts, progress, warm_start=warm_start, train_on=train_on)
    gate_table = GateTable.build(
        encoder,
        [f.prompt for f in facts],
        result.scope.fact_names(),
        result.scope.fact_rows,
        known=known.prompt_embeddings,
    )
    edit_set = EditSet(
        subjects=result.scope.subjects,
        deltas=result.deltas.to(backbone.dtype),
        layer=result.layer,
        gate=ScopeGate(gate_table, encoder),
    )
    return result, gate_table, edit_set


def pack_content(
    result: TrainResult,
    gate_table: GateTable,
    facts: Sequence[Fact],
    metrics: dict[str, float] | None = None,
) -> PackContent:
    training = result.training_record()
    training["gate"] = {
        "encoder": ENCODER_NAME,
        "rule": RULE,
        "threshold": float(gate_table.threshold),
    }
    return PackContent(
        layer=result.layer,
        subjects=list(result.scope.subjects),
        table={BLOCKS_KEY: result.deltas.float().cpu(), **gate_table.to_tensors()},
        hypernet={k: v.detach().float().cpu() for k, v in result.hypernet.state_dict().items()},
        facts=[f.model_dump(exclude_defaults=True) for f in facts],
        training=training,
        metrics=metrics or {},
    )
