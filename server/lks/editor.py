"""The editor end to end: facts -> trained subject table + scope gate -> pack content."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from server.lks.apply import EditSet
from server.lks.facts import Fact
from server.lks.gate import ENCODER_NAME, RULE, THRESHOLD, GateTable, ScopeGate, SentenceEncoder
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
    cache_budget_bytes: int = DEFAULT_CACHE_BUDGET_BYTES,
) -> tuple[TrainResult, GateTable, EditSet]:
    """`apply_only` with `warm_start`: no training, the given weights build the subject table
    (a grown fact set first tries the previous version's hypernetwork as it is)."""
    trainer = Trainer(backbone, config, cache_budget_bytes=cache_budget_bytes)
    if apply_only:
        assert warm_start is not None, "apply_only needs the weights to apply (warm_start)"
        result = trainer.apply_weights(facts, warm_start)
    else:
        result = trainer.train(facts, progress, warm_start=warm_start, train_on=train_on)
    names = [(s.subject, *s.aliases) for s in result.scope.subjects]
    gate_table = GateTable.build(
        encoder,
        [f.prompt for f in facts],
        [names[row] for row in result.scope.fact_rows],
        result.scope.fact_rows,
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
    training["gate"] = {"encoder": ENCODER_NAME, "rule": RULE, "threshold": THRESHOLD}
    return PackContent(
        layer=result.layer,
        subjects=list(result.scope.subjects),
        table={BLOCKS_KEY: result.deltas.float().cpu(), **gate_table.to_tensors()},
        hypernet={k: v.detach().float().cpu() for k, v in result.hypernet.state_dict().items()},
        facts=[f.model_dump(exclude_defaults=True) for f in facts],
        training=training,
        metrics=metrics or {},
    )
