"""What a user reads: greedy answers, edited and unedited, in the contexts users ask in.

Teacher-forced scores (evaluate.py) say whether the target's tokens are the top-1 after a prompt;
they say nothing about what follows. An edit whose answer says the target and then repeats it
("Ersteampelteampelteampel...") scores 1.0 there. This module generates answers the way a user
gets them and judges them with plain, checkable rules:

- `answer_hit`: the target (or an alias) appears in the answer's first sentence;
- `degenerate`: the answer repeats itself (a 3-word sequence three times, a word of four or more
  letters five times, or a character pattern three times in a row);
- `target_repeats`: the target is said more than once;
- `stops`: the answer ends (end of turn / end of sequence) within the token budget;
- locality: the answer to another question about the same subject is unchanged.

Contexts: the bare prompt, a question-answer instruction and the chat template. A statement-style
prompt (CounterFact's cloze "The mother tongue of X is") becomes the user message "Complete the
sentence: ...": the unedited default model answers it with the finished sentence, where a bare
"Complete: ..." more often gets a description of the subject (docs/results/natural_edits.md).

Training's teacher term generates with these functions; the metrics over a benchmark's items
(`answer_metrics`) are in server/evaluation/evaluate.py.
"""

from __future__ import annotations

import functools
import re
from collections import Counter
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch
from transformers import DynamicCache, PreTrainedTokenizerBase

from server.editor.facts import is_question
from server.editor.scope import EncodedText, common_prefix, length_batches, shared_prefix_groups
from server.editor.split import prefix_cache
from server.model import kv_cache
from server.model.backbone import Backbone
from server.model.hook import EditPlan

Context = Literal["bare", "qa", "chat"]
CONTEXTS: tuple[Context, ...] = ("bare", "qa", "chat")
MAX_ANSWER_TOKENS = 40  # what issue 20's trial through /v1/chat/completions used
# a request's edits are released in at most this many prefills (each re-reads its context):
# the last releases every edit still steering
MAX_RELEASES = 4
CLOZE_INSTRUCTION = "Complete the sentence: "
# a batch's common first tokens (such as the chat template's system header) are read once when
# there are at least this many of them: below it, a pass of its own costs more than it saves
MIN_SHARED_PREFIX = 8


class EditTable(Protocol):
    """What generating with edits needs of a set of them (the packs' `EditSet` is one): the
    subject deltas, their layer, and texts tokenised with the gated edits placed."""

    deltas: torch.Tensor  # [S, H]
    layer: int
    targets: Sequence[tuple[str, ...]]  # each subject row's targets; empty: not known

    def encode_all(
        self,
        tokenizer: PreTrainedTokenizerBase,
        pairs: Sequence[tuple[str, str | None]],
        chunk: int = 512,
        *,
        templated: Sequence[bool] | None = None,
    ) -> list[EncodedText]: ...


# ---------------------------------------------------------------------------------------------
# The rules, on text alone


def user_message(prompt: str) -> str:
    """What a user would type for a benchmark prompt: a question as it is, a cloze statement as
    an instruction to complete it."""
    return prompt if is_question(prompt) else CLOZE_INSTRUCTION + prompt


def render(backbone: Backbone, context: Context, prompt: str) -> tuple[str, bool]:
    """(text the model reads, whether it is already templated) for `prompt` in `context`."""
    if context == "bare":
        return prompt, False
    if context == "qa":
        return f"Question: {user_message(prompt)}\nAnswer:", False
    if context == "chat":
        return backbone.render_chat([{"role": "user", "content": user_message(prompt)}]), True
    raise ValueError(f"unknown context {context!r}; choose one of {', '.join(CONTEXTS)}")


@functools.lru_cache(maxsize=4096)
def _target_pattern(target: str) -> re.Pattern[str]:
    """The target as a phrase: case-insensitive, any run of spaces, and word boundaries on the
    sides where it starts or ends with a letter or digit ("Ersteampelteampel" does not say
    "Ersteampel"; "C++" may be followed by anything)."""
    words = [re.escape(w) for w in target.split()]
    body = r"\s+".join(words)
    left = r"(?<!\w)" if target.strip()[:1].isalnum() else ""
    right = r"(?!\w)" if target.strip()[-1:].isalnum() else ""
    return re.compile(left + body + right, re.IGNORECASE)


def target_spans(text: str, targets: Sequence[str]) -> list[tuple[int, int]]:
    """Where any of `targets` is said in `text` (non-overlapping per target)."""
    spans = []
    for target in targets:
        if target.strip():
            spans += [m.span() for m in _target_pattern(target).finditer(text)]
    return sorted(spans)


# a period after one of these (or after a single capital letter: "J. R. R. Tolkien", "U.S.")
# does not end a sentence
ABBREVIATIONS = frozenset(
    {"mr", "mrs", "ms", "dr", "st", "mt", "jr", "sr", "co", "inc", "ltd", "vs", "etc", "no"}
    | {"fr", "gen", "gov", "sen", "rep", "prof", "ft"}
)
_SENTENCE_END = re.compile(r"[.!?](?=\s|$)|\n")


def first_sentence(text: str, targets: Sequence[str] = ()) -> str:
    """The answer up to its first sentence end: a newline, or . ! ? followed by a space or the
    end, except after an abbreviation or initial, or inside a target ("Washington, D.C.")."""
    text = text.lstrip()
    protected = target_spans(text, targets)
    for match in _SENTENCE_END.finditer(text):
        at = match.start()
        if any(start <= at < end for start, end in protected):
            continue
        if match.group() == ".":
            before = re.search(r"(\w+)$", text[:at])
            word = before.group(1) if before else ""
            if word.lower() in ABBREVIATIONS or (len(word) == 1 and word.isupper()):
                continue
        return text[: at + (match.group() != "\n")]
    return text


def target_said(text: str, targets: Sequence[str], since: int = 0) -> bool:
    """Whether `text` says one of `targets` in a match that ends after character `since` (the
    text before it was checked already: a growing answer is checked in its new tail only)."""
    for target in targets:
        if target.strip():
            start = max(0, since - 2 * len(target) - 8)  # room for a match ending after since
            if any(m.end() > since for m in _target_pattern(target).finditer(text, start)):
                return True
    return False


def answer_hit(answer: str, targets: Sequence[str]) -> bool:
    """The target, or one of its aliases, appears in the answer's first sentence."""
    return bool(target_spans(first_sentence(answer, targets), targets))


def target_repeats(answer: str, targets: Sequence[str]) -> bool:
    """The target (any of its names) is said more than once in the whole answer."""
    return len(target_spans(answer, targets)) > 1


_REPEATED_PATTERN = re.compile(r"(?=(.{2,}?)\1\1)", re.DOTALL)


def degeneration(answer: str) -> str | None:
    """Why the answer repeats itself, or None: a 3-word sequence three times, a word of four or
    more letters five times, or a pattern of two or more characters (with a letter in it) three
    times in a row ("teampelteampelteampel")."""
    words = [w.lower() for w in re.findall(r"\w+", answer)]
    trigrams = Counter(zip(words, words[1:], words[2:], strict=False))
    if trigrams and max(trigrams.values()) >= 3:
        gram = trigrams.most_common(1)[0][0]
        return f"3-word sequence {' '.join(gram)!r} three times"
    long_words = Counter(w for w in words if len(w) >= 4 and w.isalpha())
    if long_words and max(long_words.values()) >= 5:
        return f"word {long_words.most_common(1)[0][0]!r} five times"
    for match in _REPEATED_PATTERN.finditer(answer):
        unit = match.group(1)
        if any(c.isalpha() for c in unit):
            return f"pattern {unit!r} three times in a row"
    return None


def degenerate(answer: str) -> bool:
    return degeneration(answer) is not None


# ---------------------------------------------------------------------------------------------
# Generating answers


@dataclass(frozen=True)
class Answer:
    text: str
    stopped: bool  # an end-of-turn / end-of-sequence token came within the budget
    edited: bool = False  # an edit was applied to the prompt (the gate opened)
    tokens: tuple[int, ...] = ()  # what was generated, up to and with the end of turn
    # with `final_states`: [len(tokens), hidden], the base model's final states that predicted
    # each of `tokens` (the prompt's last position, then each generated token but the last)
    states: torch.Tensor | None = field(default=None, compare=False, repr=False)


def applied_edits(
    backbone: Backbone, table: EditTable | None, edits: list[tuple[int, int, int]]
) -> AbstractContextManager[None]:
    """The next forward pass with `edits` (batch row, position, subject row) of `table`."""
    if table is None or not edits:
        return nullcontext()
    planned = [(row, position, table.deltas[subject]) for row, position, subject in edits]
    plan = EditPlan.build(planned, hidden_size=backbone.hidden_size, device=backbone.device)
    return backbone.edit_hooks.at(table.layer).plan(plan)


def generate(
    backbone: Backbone,
    encoded: Sequence[EncodedText],
    table: EditTable | None,
    max_new_tokens: int = MAX_ANSWER_TOKENS,
    batch_size: int = 64,
    *,
    release: bool = False,
    final_states: bool = False,
    share_prefix: bool = False,
) -> list[Answer]:
    """Greedy answers. With `release` (the engine's `release_answered_edits`; `encoded` must
    then be completions, as the engine releases no chat), as the engine serves them: an edit
    with release targets steers until the answer says one. With `final_states`, each answer
    keeps the final states that predicted its tokens (`Answer.states`): what a distillation
    target needs, without a second forward pass over prompt and answer (not with `release`:
    a released answer's later tokens come from other passes). With `share_prefix` (training's
    unedited passes; no `table`), texts that start alike batch together and read their common
    first tokens once, such as the chat template's system header: the same answers up to
    rounding, which in bfloat16 flips near-ties, so evaluation, whose edited and unedited
    answers are compared, keeps the one path for both."""
    if release and final_states:
        raise ValueError("final_states are kept for answers generated in one pass, not released")
    if share_prefix and table is not None:
        raise ValueError("a shared prefix is read unedited: share_prefix needs no edit table")
    answers = _generate(
        backbone, encoded, table, max_new_tokens, batch_size, final_states, share_prefix
    )
    if release and table is not None:
        answers = release_answered(backbone, encoded, table, answers, max_new_tokens, batch_size)
    return answers


def release_answered(
    backbone: Backbone,
    encoded: Sequence[EncodedText],
    table: EditTable,
    answers: Sequence[Answer],
    max_new_tokens: int = MAX_ANSWER_TOKENS,
    batch_size: int = 64,
) -> list[Answer]:
    """`answers` as the engine's release makes them (engine.py: an edit is released once the
    answer says one of its subject's targets). At the first token after which the answer says
    a steering subject's target, every subject whose target is said stops steering and the
    answer goes on from the prompt and the answer so far, re-read with the remaining edits
    alone; repeated while edits with release targets remain and tokens are left, at most
    `MAX_RELEASES` times (the last releases every edit)."""
    tokenizer, eos = backbone.tokenizer, set(backbone.eos_token_ids)
    answers = list(answers)
    targets = table.targets
    # tokens already released, for the answers an edit with release targets steers
    prefixes = {
        i: 0 for i, enc in enumerate(encoded) if targets and any(targets[s] for s, _ in enc.edits)
    }
    steering = {i: list(encoded[i].edits) for i in prefixes}
    releases = dict.fromkeys(prefixes, 0)
    while prefixes:
        resumed: list[tuple[int, int, EncodedText]] = []  # (index, release point, encoding)
        for index, done in prefixes.items():
            said = answers[index].tokens
            end = next((k for k, t in enumerate(said) if t in eos), len(said))
            for k in range(done + 1, end + 1):
                text = tokenizer.decode(said[:k], skip_special_tokens=True)
                released = {s for s, _ in steering[index] if target_said(text, targets[s])}
                if released:
                    break
            else:
                continue
            if k >= max_new_tokens:
                continue
            releases[index] += 1
            if releases[index] >= MAX_RELEASES:
                released = {s for s, _ in steering[index]}
            steering[index] = [(s, p) for s, p in steering[index] if s not in released]
            enc = encoded[index]
            resumed.append(
                (index, k, EncodedText(enc.ids + list(said[:k]), steering[index], [], []))
            )
        budget = max((max_new_tokens - k for _, k, _ in resumed), default=0)
        more = _generate(backbone, [enc for *_, enc in resumed], table, budget, batch_size)
        for (index, k, _), answer in zip(resumed, more, strict=True):
            tokens = answers[index].tokens[:k] + answer.tokens[: max_new_tokens - k]
            stopped = any(t in eos for t in tokens)
            text = tokenizer.decode(tokens, skip_special_tokens=True)
            answers[index] = Answer(text, stopped, True, tokens)
        prefixes = {
            index: k for index, k, _ in resumed if any(targets[s] for s, _ in steering[index])
        }
    return answers


@torch.inference_mode()
def _generate(
    backbone: Backbone,
    encoded: Sequence[EncodedText],
    table: EditTable | None,
    max_new_tokens: int,
    batch_size: int,
    final_states: bool = False,
    share_prefix: bool = False,
) -> list[Answer]:
    """Batched greedy generation, padded on the left (after a shared prefix): the plan's
    positions shift by each row's pad count, as a serving batch's do. Texts of similar length
    share a batch; a decode step of 64 rows costs far less than 64 steps of one (the weights
    are read once a step). `share_prefix`: a batch's common first tokens run once and the
    padding goes after them (position ids follow the attention mask)."""
    tokenizer = backbone.tokenizer
    pad_id, eos = int(tokenizer.pad_token_id), set(backbone.eos_token_ids)
    answers: list[Answer | None] = [None] * len(encoded)
    lasts = [len(e.ids) - 1 for e in encoded]
    groups = (
        shared_prefix_groups(encoded, lasts, key_tokens=MIN_SHARED_PREFIX)
        if share_prefix
        else [(0, list(range(len(encoded))))]
    )
    batches = [
        [members[j] for j in local]
        for _, members in groups
        for local in length_batches([len(encoded[i].ids) for i in members], batch_size)
    ]
    for batch in batches:
        width = max(len(encoded[i].ids) for i in batch)
        # the rows' common first tokens run once, before the padding: [prefix, pads, rest]
        shared = common_prefix([encoded[i].ids for i in batch]) if share_prefix else 0
        shared = shared if shared >= MIN_SHARED_PREFIX and len(batch) > 1 else 0
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        edits = []
        for row, index in enumerate(batch):
            enc = encoded[index]
            pad = width - len(enc.ids)
            ids[row, :shared] = torch.tensor(enc.ids[:shared], dtype=torch.long)
            ids[row, shared + pad :] = torch.tensor(enc.ids[shared:])
            mask[row, :shared] = 1
            mask[row, shared + pad :] = 1
            if table is not None:
                edits += [(row, pad + pos, s) for s, pos in enc.edits]
        cache = None
        if shared:
            cache = prefix_cache(backbone.model, ids[0, :shared].tolist())
            cache.batch_repeat_interleave(len(batch))
        with applied_edits(backbone, table, edits):
            said, states = _greedy(
                backbone, ids, mask, cache, shared, max_new_tokens, eos, final_states
            )
        for row, index in enumerate(batch):
            edited = table is not None and bool(encoded[index].edits)
            tokens = tuple(said[row])
            text = tokenizer.decode(tokens, skip_special_tokens=True)
            stopped = bool(tokens) and tokens[-1] in eos
            answers[index] = Answer(text, stopped, edited, tokens, states[row])
    return answers  # type: ignore[return-value]


def _greedy(
    backbone: Backbone,
    ids: torch.Tensor,
    mask: torch.Tensor,
    cache: DynamicCache | None,
    cached: int,
    max_new_tokens: int,
    eos: set[int],
    final_states: bool,
) -> tuple[list[list[int]], list[torch.Tensor | None]]:
    """Greedy decoding of a left-padded batch whose first `cached` tokens are in `cache`: each
    row's tokens (its end token included) and, with `final_states`, the final states that
    predicted them [len(tokens), H]. A row that ends leaves the batch, so a step costs the rows
    still answering: a batch's short answers do not run on at the pace of its longest. Any
    edit plan in place applies to the first pass (the prompt's), as the engine's prefill."""
    model, device = backbone.model, backbone.device
    rows = ids.shape[0]
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    if cache is None:
        cache = DynamicCache(config=model.config)
    said: list[list[int]] = [[] for _ in range(rows)]
    kept: list[list[torch.Tensor]] = [[] for _ in range(rows)]
    live = list(range(rows))  # the batch's rows, as indices into the original rows
    step_ids, step_positions = ids[:, cached:], positions[:, cached:]
    last: list[torch.Tensor] = []  # with final_states: this pass's last final states
    handle = (
        model.base_model.register_forward_hook(
            lambda _m, _a, out: last.append(out.last_hidden_state[:, -1])
        )
        if final_states
        else None
    )
    try:
        for _ in range(max_new_tokens):
            last.clear()
            logits = model(
                input_ids=step_ids,
                attention_mask=mask,
                position_ids=step_positions,
                cache=cache,
                use_cache=True,
                logits_to_keep=1,
            ).logits[:, -1]
            tokens = logits.argmax(-1).tolist()
            going = []
            for slot, (row, token) in enumerate(zip(live, tokens, strict=True)):
                said[row].append(token)
                if final_states:
                    kept[row].append(last[-1][slot].float())
                if token not in eos:
                    going.append(slot)
            if not going:
                break
            if len(going) < len(live):
                chosen = torch.tensor(going, device=device)
                mask = kv_cache.keep_rows(cache, mask, chosen)
                step_positions = step_positions[chosen]
                live = [live[slot] for slot in going]
                tokens = [tokens[slot] for slot in going]
            step_ids = torch.tensor(tokens, device=device)[:, None]
            mask = torch.cat([mask, mask.new_ones(len(live), 1)], dim=1)
            step_positions = step_positions[:, -1:] + 1
    finally:
        if handle is not None:
            handle.remove()
    return said, [torch.stack(k) if k else None for k in kept]


def encode_texts(
    backbone: Backbone, texts: Sequence[tuple[str, bool]], table: EditTable | None
) -> list[EncodedText]:
    """(text, templated) pairs tokenised, with `table`'s gated edits placed (none without one).
    A templated text carries its special tokens already."""
    tokenizer = backbone.tokenizer
    if table is not None:
        return table.encode_all(
            tokenizer, [(t, None) for t, _ in texts], templated=[tm for _, tm in texts]
        )
    return [
        EncodedText(tokenizer(t, add_special_tokens=not tm)["input_ids"], [], [], [])
        for t, tm in texts
    ]


def answer_pairs(
    backbone: Backbone,
    texts: Sequence[tuple[str, bool]],
    table: EditTable,
    max_new_tokens: int = MAX_ANSWER_TOKENS,
    *,
    release: bool = False,
) -> tuple[list[Answer], list[Answer]]:
    """(edited, unedited) answers to each (text, templated). A text the table edits nowhere
    (no subject, or the gate stays shut) is computed once: its edited answer IS the unedited
    one, as in serving, where such a request runs with no edit at all. With `release`, edits
    are released in completions as the engine releases them (not in a templated chat)."""
    plain = encode_texts(backbone, texts, None)
    unedited = generate(backbone, plain, None, max_new_tokens)
    encoded = encode_texts(backbone, texts, table)
    touched = [i for i, e in enumerate(encoded) if e.edits]
    edited = list(unedited)
    redone = generate(backbone, [encoded[i] for i in touched], table, max_new_tokens)
    for index, answer in zip(touched, redone, strict=True):
        edited[index] = answer
    completions = [i for i in touched if not texts[i][1]]
    if release and completions:
        released = release_answered(
            backbone,
            [encoded[i] for i in completions],
            table,
            [edited[i] for i in completions],
            max_new_tokens,
        )
        for index, answer in zip(completions, released, strict=True):
            edited[index] = answer
    return edited, unedited
