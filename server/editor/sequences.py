"""What the training sequences are: for each fact, the texts an epoch reads and what the loss
holds each to. Cross-entropy on the new target in every context the edit must survive (the
prompt, its prefixed and chat forms, the user's paraphrases); KL to the unedited model on the
facts' locality prompts and after the target (its own greedy continuation); KL to a teacher (the
unedited model told the fact) over its answer to the bare question.

Building the KL sequences runs the unedited model once, before training; the trainer
(train.py) only reads them. Which contexts are used comes from `TrainConfig` (config.py).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from server.editor.answers import (
    Answer,
    answer_hit,
    degenerate,
    encode_texts,
    first_sentence,
    generate,
    target_repeats,
    user_message,
)
from server.editor.config import TrainConfig
from server.editor.detect import SubjectIndex
from server.editor.facts import Fact, is_question
from server.editor.rephrase import rephrasings
from server.editor.scope import EncodedText, encode, join_target
from server.model.backbone import Backbone

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainingSequence:
    """One sequence an epoch reads, with what its loss holds it to. A `reference` [P, H] holds
    its last P predict positions to those final states by KL, weighted by `kl_weight`
    (locality prompts, a teacher's answer, continuations after the target), with the
    unlikelihood of `avoid` there, weighted by `avoid_weight` (the repetition terms); the
    positions before them are cross-entropy on their targets (an edit to learn). A chat
    sequence holds both: the new target, then the teacher's answer after it."""

    text: EncodedText
    reference: torch.Tensor | None = None
    kl_weight: float = 0.0
    avoid: int | None = None
    avoid_weight: float = 0.0

    @property
    def kl_positions(self) -> int:
        return 0 if self.reference is None else int(self.reference.shape[0])


def training_contexts(
    backbone: Backbone, fact: Fact, config: TrainConfig
) -> list[tuple[str, bool]]:
    """(context, templated) pairs for one fact: the prompt, its prefixed forms, the chat form,
    the prompt's rephrasings (rephrase.py; bare, the target only) and the user's paraphrases."""
    contexts = [(fact.prompt, False)]
    contexts += [(p.format(prompt=fact.prompt), False) for p in config.prefixes]
    if config.chat_variant and backbone.has_chat_template:
        contexts.append((backbone.render_chat([{"role": "user", "content": fact.prompt}]), True))
    if config.rephrase:
        contexts += [(p, False) for p in rephrasings(fact.subject, fact.prompt)]
    contexts += [(p, False) for p in fact.paraphrases]
    return list(dict.fromkeys(contexts))  # a rephrasing a user also gave is trained once


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


def end_token(backbone: Backbone, answers: Sequence[tuple[int, ...]]) -> int:
    """The token the model ends its answers with in a context: the commonest last token of the
    `answers` that ended (the chat template's end of turn, or the end of sequence)."""
    eos = set(backbone.eos_token_ids)
    ends = Counter(a[-1] for a in answers if a and a[-1] in eos)
    return ends.most_common(1)[0][0] if ends else backbone.eos_token_ids[0]


def one_sentence(
    tokenizer: PreTrainedTokenizerBase, target: str, said: Sequence[int]
) -> int | None:
    """How many of an answer's tokens (said after the forced `target`) make up its first
    sentence; None when the answer has no sentence end, or its first sentence says the target
    again."""

    def text(k: int) -> str:
        return (target + tokenizer.decode(said[:k], skip_special_tokens=True)).lstrip()

    whole = text(len(said))
    sentence = first_sentence(whole, [target])
    if len(sentence) >= len(whole.rstrip()) or target_repeats(sentence, [target]):
        return None
    return next(k for k in range(len(said) + 1) if len(text(k)) >= len(sentence))


def taught_answer(
    tokenizer: PreTrainedTokenizerBase,
    context: str,
    target: str,
    answer: Answer,
    *,
    question: bool = True,
) -> tuple[list[int], bool]:
    """(answer tokens to distil, whether an end of turn follows them) for a teacher's answer
    after the forced target. An answer that says the target again or repeats itself is cut
    after its first sentence and ends there; so is every bare answer, since its told answer
    goes on to restate the fact ("German. The native language of X is German. ..."). A bare
    `question` ends there, as the instruct model ends a bare question at once; a bare statement
    does not (the model goes on after a statement, and teaching it to stop cost generality:
    natural_edits.md 2g; served, its edit is released once its answer is said). An answer
    whose first sentence cannot be cut clean teaches the target only."""
    said = list(answer.tokens)
    whole = target + answer.text
    flawed = target_repeats(whole, [target]) or degenerate(whole)
    if context != "bare" and not flawed:
        return said, False
    cut = one_sentence(tokenizer, target, said)
    if cut is None:
        return ([], False) if flawed else (said, False)
    return said[:cut], context != "bare" or question


@torch.inference_mode()
def teacher_sequences(
    backbone: Backbone,
    index: SubjectIndex,
    facts: Sequence[Fact],
    contexts: Sequence[str],
    max_tokens: int,
    weights: Mapping[str, float],
    batch_size: int = 64,
    *,
    repetition_weight: float = 0.0,
) -> list[TrainingSequence]:
    """For each fact and teacher context, the student's text extended by the teacher's greedy
    answer (up to `max_tokens`, its end of turn included), held by KL to the teacher's final
    states at the positions that predict it. In a forced context the target comes first, by
    cross-entropy, in the same sequence, and an answer cut short (`taught_answer`) learns its
    end of turn by cross-entropy too. `weights`: the KL weight of each context taught in (a
    model without a chat template is taught on the bare prompt: `teacher_contexts`). A free
    answer that does not say the target in its first sentence is dropped: it would teach the
    edit to keep the old answer. `repetition_weight`: the unlikelihood of the target's first
    token (after a space, as a second mention says it) at a chat answer's KL positions where
    the teacher does not say it."""
    tokenizer = backbone.tokenizer
    contexts = teacher_contexts(backbone, contexts)
    unweighted = [c for c in contexts if c not in weights]
    if unweighted:
        why = (
            ""
            if backbone.has_chat_template
            else "; this model has no chat template: its chat is taught on the bare prompt"
        )
        raise ValueError(
            f"no KL weight for teacher context(s) {unweighted} (weights has {sorted(weights)}{why})"
        )
    jobs = [(fact, c, *_teacher_texts(backbone, fact, c)) for fact in facts for c in contexts]
    students = [
        encode(tokenizer, index, text, fact.target if forced else None, templated=templated)
        for fact, _, text, templated, _, _, forced in jobs
    ]
    teachers = encode_texts(backbone, [(t, tm) for *_, t, tm, _ in jobs], None)
    answers = generate(
        backbone, teachers, None, max_tokens, batch_size, final_states=True, share_prefix=True
    )
    ends = {
        c: end_token(
            backbone, [a.tokens for job, a in zip(jobs, answers, strict=True) if job[1] == c]
        )
        for c in contexts
    }
    taught = [
        taught_answer(tokenizer, job[1], job[0].target, answer, question=is_question(job[0].prompt))
        if job[-1]
        else (list(answer.tokens), False)
        for job, answer in zip(jobs, answers, strict=True)
    ]
    keep = [
        i
        for i, (job, student, answer) in enumerate(zip(jobs, students, answers, strict=True))
        if student.edits
        and (job[-1] or (answer.tokens and answer_hit(answer.text, [job[0].target])))
    ]
    sequences: list[TrainingSequence] = []
    for item in keep:
        (said, ended), answer = taught[item], answers[item]
        student = students[item]
        first = len(student.ids) - 1
        # the end of turn is cross-entropy, listed before the KL positions (the loss reads a
        # sequence's last `kl_positions` predictions as KL, whatever their order)
        end = [ends[jobs[item][1]]] if ended else []
        if not said and not end:  # a forced context with no answer: its target only
            sequences.append(TrainingSequence(student))
            continue
        assert answer.states is not None  # generated with final_states
        fact, context = jobs[item][0], jobs[item][1]
        avoid = (
            second_mention_token(encode(tokenizer, index, fact.prompt, fact.target))
            if repetition_weight > 0 and context == "chat" and said
            else None
        )
        sequences.append(
            TrainingSequence(
                EncodedText(
                    ids=student.ids + (said if ended else said[:-1]),
                    edits=student.edits,
                    target_ids=student.target_ids + end + said,
                    predict_at=student.predict_at
                    + [first + len(said)] * len(end)
                    + list(range(first, first + len(said))),
                ),
                answer.states[: len(said)].float() if said else None,
                weights[context],
                avoid,
                repetition_weight if avoid is not None else 0.0,
            )
        )
    eos = set(backbone.eos_token_ids)
    log.info(
        "teacher: %d of %d answers kept (%d end their turn, %d cut after their first sentence)",
        len(keep),
        len(jobs),
        sum(1 for i in keep if taught[i][1] or (taught[i][0] and taught[i][0][-1] in eos)),
        sum(1 for i in keep if taught[i][1]),
    )
    return sequences


def repeated_tokens(
    backbone: Backbone, index: SubjectIndex, facts: Sequence[Fact], after: Sequence[EncodedText]
) -> list[int]:
    """For each of `after_target_sequences`, the first token of the target it follows: what an
    edited model that keeps steering says again."""
    first: dict[tuple[int, ...], int] = {}
    for fact in facts:
        encoded = encode(backbone.tokenizer, index, fact.prompt, fact.target)
        first.setdefault(tuple(encoded.ids), second_mention_token(encoded))
    return [first[tuple(seq.ids[: seq.predict_at[0] + 1])] for seq in after]


def second_mention_token(prompt_and_target: EncodedText) -> int:
    """The token a second mention of the target starts with: its first token after the
    prompt (encode(prompt, target)), what the repetition terms make unlikely."""
    return prompt_and_target.target_ids[0]


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
    encoded = [e for e in (encode(backbone.tokenizer, index, t) for t in texts) if e.edits]
    if not encoded or positions < 1:
        return [], []
    answers = generate(
        backbone, encoded, None, positions, batch_size, final_states=True, share_prefix=True
    )
    sequences, references = [], []
    for prompt, answer in zip(encoded, answers, strict=True):
        continuation, first = list(answer.tokens), len(prompt.ids) - 1
        assert answer.states is not None  # generated with final_states
        sequences.append(
            EncodedText(
                ids=prompt.ids + continuation[:-1],
                edits=prompt.edits,
                target_ids=continuation,
                predict_at=list(range(first, first + len(continuation))),
            )
        )
        references.append(answer.states.float())
    return sequences, references
