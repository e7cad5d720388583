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
from server.lks.split import LayerSplit, PrefixSkippingSplit, SplitSequence
from server.model.backbone import Backbone

log = logging.getLogger(__name__)

# Contexts the edit must survive besides the bare prompt; the chat template is added separately.
DEFAULT_PREFIXES = ("Fact: {prompt}",)


@dataclass(frozen=True)
class TrainConfig:
    layer: int | None = None  # None: 60% of the depth (18 of 30 on the default model)
    hypernet: HypernetKind = "linear"
    lr: float = 2e-2  # the reference's 1e-4 does not move a zero-initialised hypernetwork here
    epochs: int = 5
    min_steps: int = 80  # small fact sets get more epochs: Adam needs steps, not epochs
    batch_size: int = 8
    seed: int = 0
    chat_variant: bool = True
    prefixes: tuple[str, ...] = DEFAULT_PREFIXES
    delta_l2: float = 0.0  # penalty on the blocks' mean square: keeps them just large enough
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


def _length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Index batches of similar lengths: padding a 15-token prompt to a 50-token chat form
    would triple the work of a precompute pass."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


@torch.inference_mode()
def feature_states(
    backbone: Backbone, split: LayerSplit, scope: Scope, batch_size: int = 32
) -> torch.Tensor:
    """The hypernetwork's input: layer-L state of each subject's feature text's last token."""
    tokenizer = backbone.tokenizer
    texts = [EncodedText(tokenizer(t)["input_ids"], [], [], []) for t in scope.feature_texts]
    features: list[torch.Tensor | None] = [None] * len(texts)
    for batch in _length_batches([len(t.ids) for t in texts], batch_size):
        chunk = [texts[i] for i in batch]
        ids, mask = pad_batch(chunk, int(tokenizer.pad_token_id), backbone.device)
        hidden = split.states_at_layer(ids, mask)
        for row, index in enumerate(batch):
            features[index] = hidden[row, len(texts[index].ids) - 1].float()
    return torch.stack(features)  # type: ignore[arg-type]


@torch.inference_mode()
def split_sequences(
    backbone: Backbone,
    split: PrefixSkippingSplit,
    sequences: Sequence[EncodedText],
    batch_size: int = 32,
) -> list[SplitSequence]:
    """One unedited pass over every training sequence, cut at its first edited position."""
    result: list[SplitSequence | None] = [None] * len(sequences)
    for batch in _length_batches([len(s.ids) for s in sequences], batch_size):
        chunk = [sequences[i] for i in batch]
        ids, mask = pad_batch(chunk, int(backbone.tokenizer.pad_token_id), backbone.device)
        cuts = [min(p for _, p in s.edits) for s in chunk]
        for index, part in zip(batch, split.precompute(ids, mask, cuts), strict=True):
            result[index] = part
    return result  # type: ignore[return-value]


class Trainer:
    def __init__(self, backbone: Backbone, config: TrainConfig | None = None) -> None:
        self.backbone = backbone
        self.config = config or TrainConfig()
        self.layer = self.config.resolve_layer(backbone.num_layers)
        self.split = PrefixSkippingSplit(backbone.model, self.layer)
        self.skip_prefixes = PrefixSkippingSplit.supports(backbone.model)

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
        features = feature_states(backbone, self.split, scope)
        cached = split_sequences(backbone, self.split, sequences) if self.skip_prefixes else None
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
        epochs = max(config.epochs, math.ceil(config.min_steps / steps_per_epoch))
        total_steps = steps_per_epoch * epochs
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: max(0.0, 1.0 - step / total_steps)
        )
        order = list(range(len(sequences)))
        history: list[float] = []
        best, stale, step = math.inf, 0, 0
        for epoch in range(1, epochs + 1):
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
                            epochs,
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
        cached: list[SplitSequence] | None,
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
        rows_t = torch.tensor(predict_rows, device=device)
        if cached is not None:
            parts = [cached[i] for i in batch]
            cuts = torch.tensor([p.cut for p in parts], device=device)
            width = max(p.suffix_states.shape[0] for p in parts)
            states = torch.zeros(len(chunk), width, backbone.hidden_size, device=device)
            for row, part in enumerate(parts):
                states[row, : part.suffix_states.shape[0]] = part.suffix_states
            states = states.index_put(
                (plan.rows, plan.positions - cuts[plan.rows]), plan.deltas, accumulate=True
            )
            final = self.split.suffix_final_states(parts, states)
            selected = final[rows_t, torch.tensor(predict_at, device=device) - cuts[rows_t]]
        else:
            ids, mask = pad_batch(chunk, int(backbone.tokenizer.pad_token_id), device)
            with backbone.edit_hooks.at(self.layer).plan(plan):
                base = backbone.model.base_model
                final = base(input_ids=ids, attention_mask=mask).last_hidden_state
            selected = final[rows_t, torch.tensor(predict_at, device=device)]
        logits = backbone.model.get_output_embeddings()(selected).float()
        loss = F.cross_entropy(logits, torch.tensor(targets, device=device))
        if self.config.delta_l2 > 0:
            loss = loss + self.config.delta_l2 * plan.deltas.pow(2).mean()
        return loss
