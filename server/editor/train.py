"""Training an edit pack from facts alone: the trainer, its progress and its result.

Every backbone computation that training does not change is done once: the feature states of
the subjects and the layer-L states of every training sequence (precompute.py), and the
unedited answers to the facts' locality prompts (sequences.py, which says what the training
sequences are). Each step then runs the hypernetwork, writes the deltas into the cached
states and runs layers L+1.. only.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from server.editor.activation_cache import ActivationCache
from server.editor.config import TEACHER_CONTEXTS, TrainConfig
from server.editor.detect import SubjectIndex
from server.editor.facts import Fact, FactKey, fact_key
from server.editor.head_loss import HeadLoss, HeadTerms
from server.editor.hypernet import Hypernetwork
from server.editor.precompute import DEFAULT_CACHE_BUDGET_BYTES, feature_states, split_sequences
from server.editor.scope import EncodedText, Scope, encode, pad_batch
from server.editor.sequences import (
    TrainingSequence,
    after_target_sequences,
    locality_sequences,
    repeated_tokens,
    teacher_contexts,
    teacher_covers,
    teacher_sequences,
    training_contexts,
)
from server.editor.split import PrefixSkippingSplit
from server.model.backbone import Backbone
from server.model.cpu_layout import has_packed_linears
from server.model.hook import EditPlan

log = logging.getLogger(__name__)


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
    locality_prompts: int = 0  # locality prompts that supervised training (they name a subject)
    # CPU seconds the process spent (all its threads): on a machine shared with other work the
    # wall time says more about the others than about training
    cpu_seconds: float = math.nan
    # the epochs planned, as the log counts them ("epoch 1 of 40"): config.epochs, or more for a
    # small set (config.min_steps); 0 when the weights were applied without training
    epochs: int = 0

    def training_record(self) -> dict[str, object]:
        record: dict[str, object] = asdict(self.config)
        record.update(
            layer=self.layer,
            epochs=self.epochs,
            epochs_run=self.epochs_run,
            final_loss=self.final_loss,
        )
        record["locality_prompts"] = self.locality_prompts
        record["train_seconds"] = round(self.seconds, 2)
        return record


def growth_selection(
    facts: Sequence[Fact],
    learned: set[FactKey],
    *,
    replay_per_new: int = 4,
    min_replay: int = 256,
    seed: int = 0,
) -> list[int] | None:
    """What a warm-started run trains on when a fact set grows: every fact the previous
    version did not learn, plus a random replay sample of the learned ones, so that the shared
    hypernetwork keeps what it knew. None when the replay would be most of the set anyway."""
    new = [i for i, f in enumerate(facts) if fact_key(f) not in learned]
    old = [i for i, f in enumerate(facts) if fact_key(f) in learned]
    replay = max(min_replay, replay_per_new * len(new))
    if not new or len(new) + replay >= len(facts) // 2:
        return None
    return sorted(new + random.Random(seed).sample(old, replay))


def epoch_batches(
    widths: Sequence[int], batch_size: int, rng: random.Random, pool: int = 8
) -> list[list[int]]:
    """One epoch's batches: shuffled, then sorted by width within pools of `pool` batches, so
    that a batch pads its short sequences little (a step costs its widest sequence times its
    rows), and the batches shuffled again."""
    order = list(range(len(widths)))
    rng.shuffle(order)
    batches = []
    for start in range(0, len(order), batch_size * pool):
        members = sorted(order[start : start + batch_size * pool], key=widths.__getitem__)
        batches += [members[i : i + batch_size] for i in range(0, len(members), batch_size)]
    rng.shuffle(batches)
    return batches


class Trainer:
    def __init__(
        self,
        backbone: Backbone,
        config: TrainConfig | None = None,
        *,
        cache_budget_bytes: int = DEFAULT_CACHE_BUDGET_BYTES,
        spill_dir: Path | None = None,
    ) -> None:
        """`cache_budget_bytes`: the cached activations beyond this are mapped from a file in
        `spill_dir` (the system's temporary directory by default) instead of held in memory."""
        if has_packed_linears(backbone.model):
            raise ValueError(
                "this backbone's linears are packed for inference (no gradients flow through "
                "them): train on model.load_training_backbone(settings, backbone)"
            )
        self.backbone = backbone
        self.config = config or TrainConfig()
        self.cache_budget_bytes = cache_budget_bytes
        self.spill_dir = spill_dir
        self.layer = self.config.resolve_layer(backbone.num_layers)
        self.split = PrefixSkippingSplit(backbone.model, self.layer)
        self.skip_prefixes = PrefixSkippingSplit.supports(backbone.model)
        self.head_loss = HeadLoss(backbone.model.get_output_embeddings())

    def apply_weights(
        self,
        facts: Sequence[Fact],
        weights: dict[str, torch.Tensor],
        known_blocks: Mapping[str, torch.Tensor] | None = None,
    ) -> TrainResult:
        """The subject table of `facts` under given hypernetwork weights, without training: a
        grown pack's new subjects often need none, since the hypernetwork reads each subject's
        new targets from its feature text. `known_blocks` (feature text -> block under these
        same weights, from the previous version) are reused as they are, so only subjects
        that are new or gained a fact cost a forward pass."""
        started = time.perf_counter()
        scope = Scope.from_facts(facts)
        hypernet = Hypernetwork(self.backbone.hidden_size, self.config.hypernet)
        hypernet.load_start(weights)
        hypernet.to(self.backbone.device)
        known = known_blocks or {}
        deltas = torch.empty(len(scope.subjects), self.backbone.hidden_size)
        todo = []  # rows whose feature text no earlier version computed
        for row, text in enumerate(scope.feature_texts):
            if text in known:
                deltas[row] = known[text]
            else:
                todo.append(row)
        if todo:
            features = feature_states(self.backbone, self.split, scope, rows=todo)
            with torch.no_grad():
                deltas[todo] = hypernet(features).detach().float().cpu()
        deltas = deltas.to(self.backbone.device)
        log.info(
            "applying weights: %d of %d subjects computed, %d reused",
            len(todo),
            len(scope.subjects),
            len(scope.subjects) - len(todo),
        )
        seconds = time.perf_counter() - started
        return TrainResult(self.layer, scope, deltas, hypernet, self.config, 0, math.nan, seconds)

    def cross_entropy_sequences(
        self, facts: Sequence[Fact], index: SubjectIndex, *, covered: bool = False
    ) -> list[EncodedText]:
        """The cross-entropy sequences; `covered`: without those a forced teacher context
        trains together with its continuation."""
        taught = teacher_contexts(self.backbone, self.config.teacher_contexts)
        sequences = []
        for fact in facts:
            for context, templated in training_contexts(self.backbone, fact, self.config):
                if covered and teacher_covers(self.backbone, context, templated, fact, taught):
                    continue
                encoded = encode(
                    self.backbone.tokenizer, index, context, fact.target, templated=templated
                )
                if encoded.edits:
                    sequences.append(encoded)
        return sequences

    def train(
        self,
        facts: Sequence[Fact],
        progress: ProgressCallback | None = None,
        *,
        warm_start: dict[str, torch.Tensor] | None = None,
        train_on: Sequence[int] | None = None,
    ) -> TrainResult:
        """Train a pack's hypernetwork on `facts`; `warm_start` (a previous version's weights,
        when the fact set only grew) starts from what that version already learned.

        `train_on` (indices into `facts`, default all) limits the training sequences to those
        facts, as growth does with the new facts and a replay sample of the learned ones
        (`growth_selection`); the subject table still covers every fact."""
        assert facts, "no facts to train on"
        started, started_cpu = time.perf_counter(), time.process_time()
        config, backbone = self.config, self.backbone
        torch.manual_seed(config.seed)
        rng = random.Random(config.seed)
        scope = Scope.from_facts(facts)
        trained = facts if train_on is None else [facts[i] for i in train_on]
        assert trained, "train_on selects no facts"
        index = scope.index()  # one automaton for every kind of training sequence
        local, unedited = (
            locality_sequences(backbone, index, trained, config.locality_positions)
            if config.locality_weight > 0
            else ([], [])
        )
        after, continued = (
            after_target_sequences(backbone, index, trained, config.continuation_positions)
            if config.continuation_weight > 0 or config.repetition_weight > 0
            else ([], [])
        )
        # the token each after-target sequence must not predict again
        avoid: list[int | None] = (
            list(repeated_tokens(backbone, index, trained, after))
            if config.repetition_weight > 0
            else [None] * len(after)
        )
        teacher = config.teacher_weight > 0
        plain = self.cross_entropy_sequences(trained, index, covered=teacher)
        sequences = [TrainingSequence(s) for s in plain]
        if teacher:
            sequences += teacher_sequences(
                backbone,
                index,
                trained,
                config.teacher_contexts,
                config.teacher_tokens,
                {c: config.teacher_weight_in(c) for c in TEACHER_CONTEXTS},
                repetition_weight=config.teacher_repetition_weight,
            )
        sequences += [
            TrainingSequence(s, reference, config.locality_weight)
            for s, reference in zip(local, unedited, strict=True)
        ]
        sequences += [
            TrainingSequence(
                s, reference, config.continuation_weight, token, config.repetition_weight
            )
            for s, reference, token in zip(after, continued, avoid, strict=True)
        ]
        features = feature_states(backbone, self.split, scope)
        cached = (
            split_sequences(
                backbone,
                self.split,
                [s.text for s in sequences],
                memory_budget_bytes=self.cache_budget_bytes,
                spill_dir=self.spill_dir,
            )
            if self.skip_prefixes
            else None
        )
        log.info(
            "training %d subjects from %d of %d facts on %d sequences (%d locality, %d after "
            "the target) at layer %d "
            "(precompute %.1f s, activation cache %.2f GiB%s)",
            len(scope.subjects),
            len(trained),
            len(facts),
            len(sequences),
            len(local),
            len(after),
            self.layer,
            time.perf_counter() - started,
            cached.nbytes / 2**30 if cached is not None else 0.0,
            " on disk" if cached is not None and cached.on_disk else "",
        )
        hypernet = Hypernetwork(backbone.hidden_size, config.hypernet).to(backbone.device)
        if warm_start is not None:
            hypernet.load_start(warm_start)
        optimizer = torch.optim.AdamW(hypernet.param_groups(config.lr), weight_decay=0.0)
        widths = [len(s.text.ids) - s.text.first_edit for s in sequences]
        steps_per_epoch = len(epoch_batches(widths, config.batch_size, random.Random(0)))
        epochs = max(config.epochs, math.ceil(config.min_steps / steps_per_epoch))
        total_steps = steps_per_epoch * epochs
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: max(0.0, 1.0 - step / total_steps)
        )
        history: list[float] = []
        best, stale, step = math.inf, 0, 0
        for epoch in range(1, epochs + 1):
            losses = []
            for batch in epoch_batches(widths, config.batch_size, rng):
                loss = self.loss(hypernet, features, sequences, cached, batch)
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
            log.info(
                "epoch %d of %d: loss %.4f, step %d of %d, %.0f s",
                epoch,
                epochs,
                epoch_loss,
                step,
                total_steps,
                time.perf_counter() - started,
            )
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
            locality_prompts=len(local),
            cpu_seconds=time.process_time() - started_cpu,
            epochs=epochs,
        )

    def loss(
        self,
        hypernet: Hypernetwork,
        features: torch.Tensor,
        sequences: Sequence[TrainingSequence],
        cached: ActivationCache | None,
        batch: Sequence[int],
    ) -> torch.Tensor:
        """Cross-entropy on the edits' targets plus KL(unedited || edited) on the sequences with
        a reference, each weighted by its `kl_weight`, averaged over their positions; plus the
        unlikelihood -log(1 - p) of each sequence's `avoid` token at its KL positions (those
        where the unedited model does not predict it), weighted by its `avoid_weight` and
        averaged over the positions whose weight is not 0."""
        backbone = self.backbone
        chunk = [sequences[i] for i in batch]
        rows, positions, subject_rows = [], [], []
        # the head reads the cross-entropy positions first, then the KL positions (HeadTerms)
        ce_rows, ce_at, targets = [], [], []
        kl_rows, kl_at = [], []
        kept: list[torch.Tensor] = []  # unedited final states of the KL positions
        kept_weights: list[float] = []  # one per KL position
        avoid_at: list[int] = []  # KL positions where `avoid_token` is penalised
        avoid_token: list[int] = []
        avoid_weights: list[float] = []
        for row, sequence in enumerate(chunk):
            seq = sequence.text
            for subject_row, position in seq.edits:
                rows.append(row)
                positions.append(position)
                subject_rows.append(subject_row)
            held = sequence.kl_positions
            cross = len(seq.predict_at) - held  # the positions before the KL ones
            ce_rows += [row] * cross
            ce_at += seq.predict_at[:cross]
            targets += seq.target_ids[:cross]
            kl_rows += [row] * held
            kl_at += seq.predict_at[cross:]
            reference = sequence.reference
            if reference is not None:
                kept.append(reference)
                token = sequence.avoid
                if token is not None and sequence.avoid_weight > 0:
                    offset = len(kept_weights)
                    for j, said in enumerate(seq.target_ids[cross:]):
                        if said != token:  # the unedited model says it here: leave it
                            avoid_at.append(offset + j)
                            avoid_token.append(token)
                            avoid_weights.append(sequence.avoid_weight)
                kept_weights += [sequence.kl_weight] * held
        device = backbone.device
        # the hypernetwork runs on this batch's subjects only: its cost must not grow with
        # the pack (10,000 subjects would cost 10,000 rows per step)
        used, used_index = torch.tensor(subject_rows, device=device).unique(return_inverse=True)
        plan = EditPlan(
            torch.tensor(rows, device=device),
            torch.tensor(positions, device=device),
            hypernet(features[used])[used_index],
        )
        rows_t = torch.tensor(ce_rows + kl_rows, device=device)
        at_t = torch.tensor(ce_at + kl_at, device=device)
        if cached is not None:
            parts = [cached.get(i, device) for i in batch]
            cuts = torch.tensor([p.cut for p in parts], device=device)
            width = max(p.suffix_states.shape[0] for p in parts)
            states = torch.zeros(len(chunk), width, backbone.hidden_size, device=device)
            for row, part in enumerate(parts):
                states[row, : part.suffix_states.shape[0]] = part.suffix_states
            states = states.index_put(
                (plan.rows, plan.positions - cuts[plan.rows]), plan.deltas, accumulate=True
            )
            final = self.split.suffix_final_states(parts, states)
            selected = final[rows_t, at_t - cuts[rows_t]]
        else:
            texts = [s.text for s in chunk]
            ids, mask = pad_batch(texts, int(backbone.tokenizer.pad_token_id), device)
            with backbone.edit_hooks.at(self.layer).plan(plan):
                base = backbone.model.base_model
                final = base(input_ids=ids, attention_mask=mask).last_hidden_state
            selected = final[rows_t, at_t]
        kl_weights = torch.tensor(kept_weights, device=device)
        terms = HeadTerms(
            targets=torch.tensor(targets, device=device, dtype=torch.long),
            # averaged over the positions whose term is on: the after-target sequences that
            # only the repetition term uses (weight 0) must not dilute the locality KL
            kl_weights=kl_weights / (kl_weights > 0).sum().clamp(min=1),
            avoid_at=torch.tensor(avoid_at, device=device, dtype=torch.long),
            avoid_tokens=torch.tensor(avoid_token, device=device, dtype=torch.long),
            # averaged over the positions of every term that is on, as the KL is
            avoid_weights=torch.tensor(avoid_weights, device=device) / max(len(avoid_weights), 1),
        )
        references = torch.cat(kept) if kept else selected.new_zeros(0, selected.shape[-1])
        loss = self.head_loss(selected, references, terms)
        if self.config.delta_l2 > 0:
            loss = loss + self.config.delta_l2 * plan.deltas.pow(2).mean()
        return loss
