"""Training an edit pack from facts alone.

Every backbone computation that training does not change is done once: the feature states of
the subjects, the layer-L states of every training sequence and the unedited answers to the
facts' locality prompts. Each step then runs the hypernetwork, writes the deltas into the cached
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
import torch.nn.functional as F

from server.editor.activation_cache import ActivationCache
from server.editor.detect import SubjectIndex
from server.editor.facts import Fact, FactKey, fact_key
from server.editor.hypernet import HypernetKind, Hypernetwork
from server.editor.scope import (
    EncodedText,
    Scope,
    encode,
    join_target,
    length_batches,
    pad_batch,
)
from server.editor.split import LayerSplit, PrefixSkippingSplit
from server.model.backbone import Backbone
from server.model.hook import EditPlan

log = logging.getLogger(__name__)

DEFAULT_CACHE_BUDGET_BYTES = 4 * 2**30

# Contexts the edit must survive besides the bare prompt; the chat template is added separately.
DEFAULT_PREFIXES = ("Fact: {prompt}",)


@dataclass(frozen=True)
class TrainConfig:
    layer: int | None = None  # None: 60% of the depth (18 of 30 on the default model)
    hypernet: HypernetKind = "linear"
    lr: float = 2e-2  # the reference's 1e-4 does not move a zero-initialised hypernetwork here
    epochs: int = 10  # the teacher's answers need them (docs/results/natural_edits.md)
    min_steps: int = 80  # small fact sets get more epochs: Adam needs steps, not epochs
    batch_size: int = 8
    seed: int = 0
    chat_variant: bool = True
    prefixes: tuple[str, ...] = DEFAULT_PREFIXES
    delta_l2: float = 0.0  # penalty on the blocks' mean square: keeps them just large enough
    stop_loss: float = 0.02  # stop once an epoch's mean loss falls under this
    patience: int = 3  # ... or after this many epochs without improvement
    # KL(unedited || edited) on the facts' locality prompts (as the LKS reference's loss_loc),
    # over the positions that predict the unedited model's first tokens after the prompt.
    locality_weight: float = 1.0
    locality_positions: int = 3
    # KL(unedited || edited) after each fact's prompt + target, over the positions that predict
    # the unedited model's own continuation: once the new answer has been said, the block should
    # stop steering (without it, edited continuations repeat the target).
    continuation_weight: float = 0.0
    continuation_positions: int = 3
    # unlikelihood of the new target's first token at those same positions (where the unedited
    # model does not say it itself): a narrower cure for the repetition than the KL. Off by
    # default: the teacher cures the repetition, and the two pull against each other.
    repetition_weight: float = 0.0
    # KL(teacher || edited) over a teacher's answer: the unedited model, told the fact in its
    # context ("Fact: <prompt> <target>."), answers the question in its own words; the edited
    # model, asked the bare question, should answer as it does (its sentence, its end of turn).
    teacher_weight: float = 1.0
    teacher_tokens: int = 24  # the teacher's answer is cut here (its end of turn included)
    # where: "chat" (the chat template), "bare" (the prompt as it is); "free": in chat the
    # teacher answers freely (the target where it puts it) instead of after the target
    teacher_contexts: tuple[str, ...] = ("chat",)

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


@dataclass(frozen=True)
class TrainingSequence:
    """One sequence an epoch reads, with what its loss holds it to. A `reference` [P, H] holds
    its last P predict positions to those final states by KL, weighted by `kl_weight`
    (locality prompts, a teacher's answer, continuations after the target), with the
    unlikelihood of `avoid` there (the repetition term); the positions before them are
    cross-entropy on their targets (an edit to learn). A chat sequence holds both: the new
    target, then the teacher's answer after it."""

    text: EncodedText
    reference: torch.Tensor | None = None
    kl_weight: float = 0.0
    avoid: int | None = None

    @property
    def kl_positions(self) -> int:
        return 0 if self.reference is None else int(self.reference.shape[0])


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
def feature_states(
    backbone: Backbone,
    split: LayerSplit,
    scope: Scope,
    batch_size: int = 32,
    *,
    rows: Sequence[int] | None = None,
) -> torch.Tensor:
    """The hypernetwork's input: layer-L state of each subject's feature text's last token
    [S, H], or of the given subject `rows` only [len(rows), H]."""
    tokenizer = backbone.tokenizer
    wanted = scope.feature_texts if rows is None else [scope.feature_texts[r] for r in rows]
    texts = [EncodedText(tokenizer(t)["input_ids"], [], [], []) for t in wanted]
    features: list[torch.Tensor | None] = [None] * len(texts)
    for batch in length_batches([len(t.ids) for t in texts], batch_size):
        chunk = [texts[i] for i in batch]
        ids, mask = pad_batch(chunk, int(tokenizer.pad_token_id), backbone.device)
        hidden = split.states_at_layer(ids, mask)
        for row, index in enumerate(batch):
            features[index] = hidden[row, len(texts[index].ids) - 1].float()
    return torch.stack(features)  # type: ignore[arg-type]


def locality_sequences(
    backbone: Backbone,
    index: SubjectIndex,
    facts: Sequence[Fact],
    positions: int,
    batch_size: int = 32,
) -> tuple[list[EncodedText], list[torch.Tensor]]:
    """The facts' locality prompts that name an edited subject (only those can change), each
    extended by the unedited model's own greedy continuation, with the unedited final states
    [P, H] at the positions that predict it: what the KL term holds the edited model to.

    Labels are never needed, so a user's locality prompt is enough.
    """
    prompts = dict.fromkeys(p.prompt for fact in facts for p in fact.locality)
    return continued_sequences(backbone, index, list(prompts), positions, batch_size)


def after_target_sequences(
    backbone: Backbone,
    index: SubjectIndex,
    facts: Sequence[Fact],
    positions: int,
    batch_size: int = 32,
) -> tuple[list[EncodedText], list[torch.Tensor]]:
    """Each fact's prompt followed by its new target, extended by the unedited model's own
    continuation of that text: after the answer, the edited model should go on as the unedited
    one would."""
    texts = dict.fromkeys(join_target(f.prompt, f.target) for f in facts)
    return continued_sequences(backbone, index, list(texts), positions, batch_size)


TEACHER_FACT = "Fact: {prompt} {target}.\n"


def _teacher_texts(
    backbone: Backbone, fact: Fact, context: str
) -> tuple[str, bool, str, bool, bool]:
    """(student text, templated, teacher text, templated, forced) for one fact in one teacher
    context: the teacher's text holds the fact before the same question. `forced`: the
    teacher's text ends with the target, whose continuation it gives, and the student learns
    the target after its own text, then that continuation; otherwise the teacher answers the
    question from its start."""
    from server.editor.answers import user_message

    told = TEACHER_FACT.format(prompt=fact.prompt.strip(), target=fact.target.strip())
    if context == "bare":
        return fact.prompt, False, told + join_target(fact.prompt, fact.target), False, True
    message = user_message(fact.prompt)
    student = backbone.render_chat([{"role": "user", "content": message}])
    teacher = backbone.render_chat([{"role": "user", "content": told + message}])
    if context == "free":
        return student, True, teacher, True, False
    assert context == "chat", f"unknown teacher context {context!r}"
    return student, True, teacher + fact.target, True, True


def teacher_contexts(backbone: Backbone, contexts: Sequence[str]) -> list[str]:
    """The teacher contexts this backbone has: a model without a chat template is taught on
    the bare prompt instead of in chat."""
    if backbone.has_chat_template:
        return list(dict.fromkeys(contexts))
    return list(dict.fromkeys("bare" if c in ("chat", "free") else c for c in contexts))


def teacher_covers(
    backbone: Backbone, context: str, templated: bool, fact: Fact, contexts: Sequence[str]
) -> bool:
    """Whether a forced teacher context already trains this cross-entropy context (the very
    same text, the target after it): one sequence then holds both terms. A statement's chat
    form is not covered: the teacher asks it as "Complete the sentence: ...", and a user may
    send it as it is."""
    if templated:
        return "chat" in contexts and context == _teacher_texts(backbone, fact, "chat")[0]
    return "bare" in contexts and context == fact.prompt


@torch.inference_mode()
def teacher_sequences(
    backbone: Backbone,
    index: SubjectIndex,
    facts: Sequence[Fact],
    contexts: Sequence[str],
    max_tokens: int,
    weight: float,
    batch_size: int = 32,
) -> list[TrainingSequence]:
    """For each fact and teacher context, the student's text extended by the teacher's greedy
    answer (up to `max_tokens`, its end of turn included), held by KL to the teacher's final
    states at the positions that predict it. In a forced context the target comes first, by
    cross-entropy, in the same sequence. A free answer that does not say the target in its
    first sentence is dropped: it would teach the edit to keep the old answer."""
    from server.editor.answers import answer_hit, encode_texts, generate

    tokenizer = backbone.tokenizer
    contexts = teacher_contexts(backbone, contexts)
    jobs = [(fact, *_teacher_texts(backbone, fact, c)) for fact in facts for c in contexts]
    students = [
        encode(tokenizer, index, text, fact.target if forced else None, templated=templated)
        for fact, text, templated, _, _, forced in jobs
    ]
    teachers = encode_texts(backbone, [(t, tm) for *_, t, tm, _ in jobs], None)
    answers = generate(backbone, teachers, None, max_tokens, batch_size=64)
    eos = set(backbone.eos_token_ids)
    head_ids = [list(answer.tokens) for answer in answers]
    keep = [
        i
        for i, (job, student, answer) in enumerate(zip(jobs, students, answers, strict=True))
        if student.edits
        and (job[-1] or (answer.tokens and answer_hit(answer.text, [job[0].target])))
    ]
    sequences: list[TrainingSequence | None] = [None] * len(keep)
    base, pad_id = backbone.model.base_model, int(tokenizer.pad_token_id)
    full = [teachers[i].ids + head_ids[i] for i in keep]
    for batch in length_batches([len(f) for f in full], batch_size):
        chunk = [EncodedText(full[j], [], [], []) for j in batch]
        ids, mask = pad_batch(chunk, pad_id, backbone.device)
        final = base(input_ids=ids, attention_mask=mask).last_hidden_state
        for row, j in enumerate(batch):
            item = keep[j]
            said, start = head_ids[item], len(teachers[item].ids) - 1
            student = students[item]
            if not said:  # a forced context with no answer after the target: its target only
                sequences[j] = TrainingSequence(student)
                continue
            first = len(student.ids) - 1
            sequences[j] = TrainingSequence(
                EncodedText(
                    ids=student.ids + said[:-1],
                    edits=student.edits,
                    target_ids=student.target_ids + said,
                    predict_at=student.predict_at + list(range(first, first + len(said))),
                ),
                final[row, start : start + len(said)].float(),
                weight,
            )
    log.info(
        "teacher: %d of %d answers kept (%d end their turn)",
        len(keep),
        len(jobs),
        sum(1 for i in keep if head_ids[i] and head_ids[i][-1] in eos),
    )
    return sequences  # type: ignore[return-value]


def repeated_tokens(
    backbone: Backbone, index: SubjectIndex, facts: Sequence[Fact], after: Sequence[EncodedText]
) -> list[int]:
    """For each of `after_target_sequences`, the first token of the target it follows: what an
    edited model that keeps steering says again."""
    first: dict[tuple[int, ...], int] = {}
    for fact in facts:
        encoded = encode(backbone.tokenizer, index, fact.prompt, fact.target)
        first.setdefault(tuple(encoded.ids), encoded.target_ids[0])
    return [first[tuple(seq.ids[: seq.predict_at[0] + 1])] for seq in after]


@torch.inference_mode()
def continued_sequences(
    backbone: Backbone,
    index: SubjectIndex,
    texts: Sequence[str],
    positions: int,
    batch_size: int = 32,
) -> tuple[list[EncodedText], list[torch.Tensor]]:
    """Texts that name an edited subject, each extended by up to `positions` tokens of the
    unedited model's greedy continuation (stopping at end-of-sequence), with the unedited final
    states [P, H] at the positions that predict them."""
    tokenizer = backbone.tokenizer
    encoded = [e for e in (encode(tokenizer, index, t) for t in texts) if e.edits]
    if not encoded or positions < 1:
        return [], []
    pad_id, eos = int(tokenizer.pad_token_id), set(backbone.eos_token_ids)
    head, base = backbone.model.get_output_embeddings(), backbone.model.base_model
    sequences: list[EncodedText | None] = [None] * len(encoded)
    references: list[torch.Tensor | None] = [None] * len(encoded)
    for batch in length_batches([len(e.ids) for e in encoded], batch_size):
        grown = [list(encoded[i].ids) for i in batch]
        states: list[list[torch.Tensor]] = [[] for _ in batch]
        done = [False] * len(batch)
        for _ in range(positions):
            chunk = [EncodedText(ids, [], [], []) for ids in grown]
            ids, mask = pad_batch(chunk, pad_id, backbone.device)
            final = base(input_ids=ids, attention_mask=mask).last_hidden_state
            last = final[torch.arange(len(batch)), torch.tensor([len(g) - 1 for g in grown])]
            tokens = head(last).argmax(-1).tolist()
            for row, token in enumerate(tokens):
                if not done[row]:
                    states[row].append(last[row].float())
                    grown[row].append(token)
                    done[row] = token in eos
        for row, item in enumerate(batch):
            prompt = encoded[item]
            continuation = grown[row][len(prompt.ids) :]
            first = len(prompt.ids) - 1
            sequences[item] = EncodedText(
                ids=prompt.ids + continuation[:-1],
                edits=prompt.edits,
                target_ids=continuation,
                predict_at=list(range(first, first + len(continuation))),
            )
            references[item] = torch.stack(states[row])
    return sequences, references  # type: ignore[return-value]


def shared_prefix_groups(
    sequences: Sequence[EncodedText],
    cuts: Sequence[int],
    *,
    key_tokens: int = 8,
    min_group: int = 16,
) -> list[tuple[int, list[int]]]:
    """(prefix length, sequence indices) groups whose members all start with the same tokens
    before their first edit, such as every chat-template form of a fact set (about 30 tokens of
    system header on the default model). A group's prefix runs once; length 0 means no sharing."""
    buckets: dict[tuple[int, ...], list[int]] = {}
    for index, seq in enumerate(sequences):
        if cuts[index] >= key_tokens:
            buckets.setdefault(tuple(seq.ids[:key_tokens]), []).append(index)
    groups: list[tuple[int, list[int]]] = []
    grouped: set[int] = set()
    for members in buckets.values():
        if len(members) < min_group:
            continue
        first = sequences[members[0]].ids
        length = min(cuts[i] for i in members)
        for i in members:
            ids = sequences[i].ids
            while length > 0 and ids[:length] != first[:length]:
                length -= 1
        if length >= key_tokens:
            groups.append((length, members))
            grouped.update(members)
    rest = [i for i in range(len(sequences)) if i not in grouped]
    return ([(0, rest)] if rest else []) + groups


@torch.inference_mode()
def split_sequences(
    backbone: Backbone,
    split: PrefixSkippingSplit,
    sequences: Sequence[EncodedText],
    *,
    memory_budget_bytes: int = DEFAULT_CACHE_BUDGET_BYTES,
    spill_dir: Path | None = None,
    batch_size: int = 32,
) -> ActivationCache:
    """One unedited pass over every training sequence, cut at its first edited position."""
    cuts = [s.first_edit for s in sequences]
    cache = ActivationCache(
        split.cache_shape(),
        [(len(s.ids), cut) for s, cut in zip(sequences, cuts, strict=True)],
        device=backbone.device,
        model_dtype=backbone.dtype,
        memory_budget_bytes=memory_budget_bytes,
        spill_dir=spill_dir,
    )
    pad_id = int(backbone.tokenizer.pad_token_id)
    started, reported, done = time.perf_counter(), time.perf_counter(), 0
    for skipped, members in shared_prefix_groups(sequences, cuts):
        shared = split.prefix_cache(sequences[members[0]].ids[:skipped]) if skipped else None
        lengths = [len(sequences[i].ids) for i in members]
        for local in length_batches(lengths, batch_size):
            batch = [members[j] for j in local]
            rest = [EncodedText(sequences[i].ids[skipped:], [], [], []) for i in batch]
            ids, mask = pad_batch(rest, pad_id, backbone.device)
            parts = split.precompute(ids, mask, [cuts[i] for i in batch], shared)
            for index, part in zip(batch, parts, strict=True):
                cache.put(index, part)
            done += len(batch)
            if time.perf_counter() - reported > 60:  # large sets precompute for many minutes
                reported = time.perf_counter()
                log.info(
                    "precompute: %d of %d sequences, %.0f s",
                    done,
                    len(sequences),
                    reported - started,
                )
    return cache


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
        self.backbone = backbone
        self.config = config or TrainConfig()
        self.cache_budget_bytes = cache_budget_bytes
        self.spill_dir = spill_dir
        self.layer = self.config.resolve_layer(backbone.num_layers)
        self.split = PrefixSkippingSplit(backbone.model, self.layer)
        self.skip_prefixes = PrefixSkippingSplit.supports(backbone.model)

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
        hypernet.load_state_dict(weights)
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

    def _sequences(
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
        sequences = [TrainingSequence(s) for s in self._sequences(trained, index, covered=teacher)]
        if teacher:
            sequences += teacher_sequences(
                backbone,
                index,
                trained,
                config.teacher_contexts,
                config.teacher_tokens,
                config.teacher_weight,
            )
        sequences += [
            TrainingSequence(s, reference, config.locality_weight)
            for s, reference in zip(local, unedited, strict=True)
        ]
        sequences += [
            TrainingSequence(s, reference, config.continuation_weight, token)
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
            hypernet.load_state_dict(warm_start)
        optimizer = torch.optim.AdamW(hypernet.parameters(), lr=config.lr, weight_decay=0.0)
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

    def _loss(
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
        where the unedited model does not predict it), weighted by repetition_weight."""
        backbone = self.backbone
        chunk = [sequences[i] for i in batch]
        rows, positions, subject_rows = [], [], []
        predict_rows, predict_at, targets = [], [], []
        is_edit: list[bool] = []
        kept: list[torch.Tensor] = []  # unedited final states of the KL positions
        kept_weights: list[float] = []  # one per KL position
        avoid_at: list[int] = []  # KL positions where `avoid_token` is penalised
        avoid_token: list[int] = []
        for row, sequence in enumerate(chunk):
            seq = sequence.text
            for subject_row, position in seq.edits:
                rows.append(row)
                positions.append(position)
                subject_rows.append(subject_row)
            predict_rows += [row] * len(seq.predict_at)
            predict_at += seq.predict_at
            targets += seq.target_ids
            reference = sequence.reference
            held = sequence.kl_positions
            is_edit += [True] * (len(seq.predict_at) - held) + [False] * held
            if reference is not None:
                kept.append(reference)
                token = sequence.avoid
                if token is not None:
                    offset = len(kept_weights)
                    for j, said in enumerate(seq.target_ids[len(seq.target_ids) - held :]):
                        if said != token:  # the unedited model says it here: leave it
                            avoid_at.append(offset + j)
                            avoid_token.append(token)
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
        rows_t = torch.tensor(predict_rows, device=device)
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
            selected = final[rows_t, torch.tensor(predict_at, device=device) - cuts[rows_t]]
        else:
            texts = [s.text for s in chunk]
            ids, mask = pad_batch(texts, int(backbone.tokenizer.pad_token_id), device)
            with backbone.edit_hooks.at(self.layer).plan(plan):
                base = backbone.model.base_model
                final = base(input_ids=ids, attention_mask=mask).last_hidden_state
            selected = final[rows_t, torch.tensor(predict_at, device=device)]
        head = backbone.model.get_output_embeddings()
        logits = head(selected).float()
        edit = torch.tensor(is_edit, device=device)
        loss = logits.new_zeros(())
        if any(is_edit):  # a python test: no device sync
            loss = F.cross_entropy(logits[edit], torch.tensor(targets, device=device)[edit])
        if kept:
            with torch.no_grad():
                unedited = head(torch.cat(kept).to(selected.dtype)).float().log_softmax(-1)
            edited = logits[~edit].log_softmax(-1)
            kl = F.kl_div(edited, unedited, log_target=True, reduction="none").sum(-1)  # [P]
            weights = torch.tensor(kept_weights, device=device, dtype=kl.dtype)
            # averaged over the positions whose term is on: the after-target sequences that
            # only the repetition term uses (weight 0) must not dilute the locality KL
            loss = loss + (weights * kl).sum() / (weights > 0).sum().clamp(min=1)
            if avoid_at:
                said = edited[
                    torch.tensor(avoid_at, device=device), torch.tensor(avoid_token, device=device)
                ]
                unlikely = -torch.log1p(-said.exp().clamp(max=1 - 1e-6))
                loss = loss + self.config.repetition_weight * unlikely.mean()
        if self.config.delta_l2 > 0:
            loss = loss + self.config.delta_l2 * plan.deltas.pow(2).mean()
        return loss
