"""Training an edit pack from facts alone.

Every backbone computation that training does not change is done once: the feature states of
the subjects and the layer-L states of every training sequence. Each step then runs the
hypernetwork, writes the deltas into the cached states and runs layers L+1.. only.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from server.lks.facts import Fact
from server.lks.hook import EditPlan
from server.lks.hypernet import HypernetKind, Hypernetwork
from server.lks.scope import EncodedText, Scope, encode, pad_batch
from server.lks.tail import LayerTail
from server.model.backbone import Backbone

log = logging.getLogger(__name__)

# Contexts the edit must survive besides the bare prompt; the chat template is added separately.
DEFAULT_PREFIXES = ("Fact: {prompt}",)


@dataclass(frozen=True)
class TrainConfig:
    layer: int | None = None  # None: 60% of the depth (18 of 30 on the default model)
    hypernet: HypernetKind = "linear"
    lr: float = 2e-2  # the reference's 1e-4 does not move a zero-initialised hypernetwork here
    epochs: int = 10
    batch_size: int = 8
    seed: int = 0
    chat_variant: bool = True
    prefixes: tuple[str, ...] = DEFAULT_PREFIXES
    stop_loss: float = 0.02  # stop once an epoch's mean loss falls under this
    patience: int = 3  # ... or after this many epochs without improvement

    def resolve_layer(self, num_layers: int) -> int:
        layer = self.layer if self.layer is not None else round(0.6 * num_layers)
        assert 0 <= layer < num_layers - 1, f"edit layer {layer} must be in [0, {num_layers - 1})"
        return layer


@dataclass(frozen=True)
class Progress:
    epoch: int
    epochs: int
    step: int
    steps: int
    loss: float
    elapsed_s: float

    @property
    def fraction(self) -> float:
        return self.step / max(self.steps, 1)

    @property
    def eta_s(self) -> float:
        return self.elapsed_s / self.fraction - self.elapsed_s if self.fraction > 0 else math.nan


ProgressCallback = Callable[[Progress], None]


@dataclass
class TrainResult:
    layer: int
    scope: Scope
    deltas: torch.Tensor  # [S, H] the subject table
    hypernet: Hypernetwork
    config: TrainConfig
    epochs_run: int
    final_loss: float
    seconds: float
    history: list[float] = field(default_factory=list)

    def training_record(self) -> dict[str, object]:
        record: dict[str, object] = asdict(self.config)
        record.update(layer=self.layer, epochs_run=self.epochs_run, final_loss=self.final_loss)
        record["train_seconds"] = round(self.seconds, 2)
        return record


def training_contexts(
    backbone: Backbone, fact: Fact, config: TrainConfig
) -> list[tuple[str, bool]]:
    """(context, templated) pairs for one fact: the prompt, its prefixed forms, the chat form and
    the user's paraphrases."""
    contexts = [(fact.prompt, False)]
    contexts += [(p.format(prompt=fact.prompt), False) for p in config.prefixes]
    if config.chat_variant and backbone.has_chat_template:
        contexts.append((backbone.render_chat([{"role": "user", "content": fact.prompt}]), True))
    contexts += [(p, False) for p in fact.paraphrases]
    return contexts


@torch.inference_mode()
def layer_states(
    backbone: Backbone, sequences: Sequence[EncodedText], layer: int, batch_size: int = 32
) -> list[torch.Tensor]:
    """Output of decoder layer `layer` for every sequence, unpadded, in float32 on the device."""
    states: list[torch.Tensor] = []
    pad_id = int(backbone.tokenizer.pad_token_id)
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start : start + batch_size]
        ids, mask = pad_batch(chunk, pad_id, backbone.device)
        out = backbone.model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        hidden = out.hidden_states[layer + 1]  # [0] is the embeddings
        states.extend(hidden[i, : len(s.ids)].float().clone() for i, s in enumerate(chunk))
    return states


def feature_states(backbone: Backbone, scope: Scope, layer: int) -> torch.Tensor:
    """The hypernetwork's input: layer-L state of each subject's feature text's last token."""
    tokenizer = backbone.tokenizer
    sequences = [EncodedText(tokenizer(t)["input_ids"], [], [], []) for t in scope.feature_texts]
    states = layer_states(backbone, sequences, layer)
    return torch.stack([s[-1] for s in states])


class Trainer:
    def __init__(self, backbone: Backbone, config: TrainConfig | None = None) -> None:
        self.backbone = backbone
        self.config = config or TrainConfig()
        self.layer = self.config.resolve_layer(backbone.num_layers)
        self.tail = LayerTail(backbone.model, self.layer)

    def _sequences(self, facts: Sequence[Fact], scope: Scope) -> list[EncodedText]:
        index = scope.index()
        sequences = []
        for fact in facts:
            for context, templated in training_contexts(self.backbone, fact, self.config):
                encoded = encode(
                    self.backbone.tokenizer, index, context, fact.target, templated=templated
                )
                if encoded.edits:
                    sequences.append(encoded)
        return sequences

    def train(self, facts: Sequence[Fact], progress: ProgressCallback | None = None) -> TrainResult:
        assert facts, "no facts to train on"
        started = time.perf_counter()
        config, backbone = self.config, self.backbone
        torch.manual_seed(config.seed)
        rng = random.Random(config.seed)
        scope = Scope.from_facts(facts)
        sequences = self._sequences(facts, scope)
        features = feature_states(backbone, scope, self.layer)
        cached = layer_states(backbone, sequences, self.layer) if self.tail.direct else None
        log.info(
            "training %d subjects from %d facts on %d sequences at layer %d (precompute %.1f s)",
            len(scope.subjects),
            len(facts),
            len(sequences),
            self.layer,
            time.perf_counter() - started,
        )
        hypernet = Hypernetwork(backbone.hidden_size, config.hypernet).to(backbone.device)
        optimizer = torch.optim.AdamW(hypernet.parameters(), lr=config.lr, weight_decay=0.0)
        steps_per_epoch = math.ceil(len(sequences) / config.batch_size)
        total_steps = steps_per_epoch * config.epochs
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: max(0.0, 1.0 - step / total_steps)
        )
        order = list(range(len(sequences)))
        history: list[float] = []
        best, stale, step = math.inf, 0, 0
        for epoch in range(1, config.epochs + 1):
            rng.shuffle(order)
            losses = []
            for start in range(0, len(order), config.batch_size):
                batch = order[start : start + config.batch_size]
                loss = self._loss(hypernet, features, sequences, cached, batch)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                losses.append(loss.item())
                step += 1
                if progress is not None:
                    progress(
                        Progress(
                            epoch,
                            config.epochs,
                            step,
                            total_steps,
                            losses[-1],
                            time.perf_counter() - started,
                        )
                    )
            epoch_loss = sum(losses) / len(losses)
            history.append(epoch_loss)
            log.debug("epoch %d loss %.4f", epoch, epoch_loss)
            if epoch_loss < best - 1e-4:
                best, stale = epoch_loss, 0
            else:
                stale += 1
            if epoch_loss < config.stop_loss or stale >= config.patience:
                break
        with torch.no_grad():
            deltas = hypernet(features).detach()
        return TrainResult(
            layer=self.layer,
            scope=scope,
            deltas=deltas,
            hypernet=hypernet,
            config=config,
            epochs_run=len(history),
            final_loss=history[-1],
            seconds=time.perf_counter() - started,
            history=history,
        )

    def _loss(
        self,
        hypernet: Hypernetwork,
        features: torch.Tensor,
        sequences: Sequence[EncodedText],
        cached: list[torch.Tensor] | None,
        batch: Sequence[int],
    ) -> torch.Tensor:
        backbone = self.backbone
        chunk = [sequences[i] for i in batch]
        deltas = hypernet(features)
        rows, positions, subject_rows = [], [], []
        predict_rows, predict_at, targets = [], [], []
        for row, seq in enumerate(chunk):
            for subject_row, position in seq.edits:
                rows.append(row)
                positions.append(position)
                subject_rows.append(subject_row)
            predict_rows += [row] * len(seq.predict_at)
            predict_at += seq.predict_at
            targets += seq.target_ids
        device = backbone.device
        plan = EditPlan(
            torch.tensor(rows, device=device),
            torch.tensor(positions, device=device),
            deltas[torch.tensor(subject_rows, device=device)],
        )
        ids, mask = pad_batch(chunk, int(backbone.tokenizer.pad_token_id), device)
        if cached is not None:
            width = ids.shape[1]
            states = torch.zeros(len(chunk), width, backbone.hidden_size, device=device)
            for row, index in enumerate(batch):
                states[row, : cached[index].shape[0]] = cached[index]
            states = states.index_put((plan.rows, plan.positions), plan.deltas, accumulate=True)
            final = self.tail.hidden_states(states.to(backbone.dtype), mask)
        else:
            with backbone.edit_hooks.at(self.layer).plan(plan):
                base = backbone.model.base_model
                final = base(input_ids=ids, attention_mask=mask).last_hidden_state
        selected = final[
            torch.tensor(predict_rows, device=device), torch.tensor(predict_at, device=device)
        ]
        logits = backbone.model.get_output_embeddings()(selected).float()
        return F.cross_entropy(logits, torch.tensor(targets, device=device))
