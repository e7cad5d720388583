"""The LKS reference training loop, re-implemented faithfully, as the baseline our trainer is
timed against (bench/massive.py compare).

What makes the reference slow, kept here on purpose: every step runs the feature texts of its
batch's subjects through the backbone (the reference never caches them), and every loss term is
its own full forward pass through all layers (the edit prompt's, then each paraphrase form's).
What is kept equal to our trainer, so that only the loop differs: the facts, the training
contexts (our `training_contexts`: the prompt, its prefixed forms, the chat form, its
rephrasings), the zero-initialised hypernetwork of the configured kind, AdamW with our learning
rates and linear schedule, and the loss (cross-entropy on the target tokens as they follow each
context).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from server.editor.config import TrainConfig
from server.editor.facts import Fact
from server.editor.hypernet import Hypernetwork
from server.editor.scope import EncodedText, Scope, encode, pad_batch
from server.editor.sequences import training_contexts
from server.model.backbone import Backbone
from server.model.hook import EditPlan

EpochCallback = Callable[[int, Hypernetwork, float], bool]  # (epoch, net, train s) -> stop?


@dataclass
class ReferenceRun:
    epochs_run: int
    train_seconds: float  # excludes whatever the epoch callback spends (evaluation)
    history: list[float]


class ReferenceLoopTrainer:
    def __init__(self, backbone: Backbone, config: TrainConfig) -> None:
        self.backbone = backbone
        self.config = config
        self.layer = config.resolve_layer(backbone.num_layers)

    def _feature_states(self, texts: Sequence[str]) -> torch.Tensor:
        """The reference's per-step feature pass: the whole model, all hidden states."""
        backbone = self.backbone
        encoded = [EncodedText(backbone.tokenizer(t)["input_ids"], [], [], []) for t in texts]
        ids, mask = pad_batch(encoded, int(backbone.tokenizer.pad_token_id), backbone.device)
        with torch.no_grad():
            out = backbone.model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        states = out.hidden_states[self.layer + 1]
        last = torch.tensor([len(e.ids) - 1 for e in encoded], device=backbone.device)
        return states[torch.arange(len(encoded), device=backbone.device), last].float()

    def _pass_loss(
        self, sequences: Sequence[EncodedText], deltas: torch.Tensor, local_rows: dict[int, int]
    ) -> torch.Tensor:
        """One full forward pass with the edits written by the hook, cross-entropy on targets."""
        backbone = self.backbone
        device = backbone.device
        ids, mask = pad_batch(sequences, int(backbone.tokenizer.pad_token_id), device)
        rows, positions, subjects = [], [], []
        predict_rows, predict_at, targets = [], [], []
        for row, seq in enumerate(sequences):
            for subject_row, position in seq.edits:
                rows.append(row)
                positions.append(position)
                subjects.append(local_rows[subject_row])
            predict_rows += [row] * len(seq.predict_at)
            predict_at += seq.predict_at
            targets += seq.target_ids
        plan = EditPlan(
            torch.tensor(rows, device=device),
            torch.tensor(positions, device=device),
            deltas[torch.tensor(subjects, device=device)],
        )
        with backbone.edit_hooks.at(self.layer).plan(plan):
            logits = backbone.model(input_ids=ids, attention_mask=mask).logits
        rows_t = torch.tensor(predict_rows, device=device)
        selected = logits[rows_t, torch.tensor(predict_at, device=device)]
        return F.cross_entropy(selected.float(), torch.tensor(targets, device=device))

    def train(
        self, facts: Sequence[Fact], on_epoch: EpochCallback | None = None, max_epochs: int = 20
    ) -> tuple[ReferenceRun, Hypernetwork, Scope]:
        config, backbone = self.config, self.backbone
        torch.manual_seed(config.seed)
        rng = random.Random(config.seed)
        scope = Scope.from_facts(facts)
        index = scope.index()
        # per fact: its context forms, each encoded with the target as it follows the context
        forms: list[list[EncodedText]] = []
        for fact in facts:
            encoded = [
                encode(backbone.tokenizer, index, context, fact.target, templated=templated)
                for context, templated in training_contexts(backbone, fact, config)
            ]
            forms.append([e for e in encoded if e.edits])
        hypernet = Hypernetwork(backbone.hidden_size, config.hypernet).to(backbone.device)
        optimizer = torch.optim.AdamW(hypernet.param_groups(config.lr), weight_decay=0.0)
        steps_per_epoch = math.ceil(len(facts) / config.batch_size)
        total_steps = steps_per_epoch * max_epochs
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: max(0.0, 1.0 - step / total_steps)
        )
        order = list(range(len(facts)))
        history: list[float] = []
        train_seconds = 0.0
        for epoch in range(1, max_epochs + 1):
            started = time.perf_counter()
            rng.shuffle(order)
            losses = []
            for start in range(0, len(order), config.batch_size):
                batch = order[start : start + config.batch_size]
                subject_rows = sorted({scope.fact_rows[i] for i in batch})
                local_rows = {row: k for k, row in enumerate(subject_rows)}
                features = self._feature_states([scope.feature_texts[r] for r in subject_rows])
                deltas = hypernet(features)
                loss = deltas.new_zeros(())
                width = max(len(forms[i]) for i in batch)
                for form in range(width):  # loss_edit, then one pass per paraphrase form
                    sequences = [forms[i][form] for i in batch if form < len(forms[i])]
                    loss = loss + self._pass_loss(sequences, deltas, local_rows)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                losses.append(loss.item() / width)
            if backbone.device.type == "cuda":
                torch.cuda.synchronize()
            train_seconds += time.perf_counter() - started
            history.append(sum(losses) / len(losses))
            if on_epoch is not None and on_epoch(epoch, hypernet, train_seconds):
                break
        return ReferenceRun(len(history), train_seconds, history), hypernet, scope
