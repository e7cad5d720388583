"""Research prototype (issue 20): an edit steers until its answer is said.

`lks eval` with its answer metrics computed twice: as served today, and "released": at the first
generated token after which the answer contains the fact's target, the row goes on WITHOUT the
edit, re-reading its prompt and the answer so far unedited (as if the input itself had said the
new fact). Reported keys: the released metrics under their usual names, today's under
`unreleased_*`. Evaluation only: the server does not release edits.

    PYTHONPATH=. python bench/release_after_target.py eval --dataset counterfact --split dev \
        --n 100 --offset 0 --contexts bare,chat --teacher-contexts chat --json
"""

from __future__ import annotations

from server.editor import answers as A
from server.editor.scope import EncodedText
from server.evaluation import evaluate as E

_TARGETS: list[tuple[str, ...]] = []


def released_pairs(backbone, texts, table, max_new_tokens=A.MAX_ANSWER_TOKENS):
    edited, unedited = ORIGINAL_PAIRS(backbone, texts, table, max_new_tokens)
    tok = backbone.tokenizer
    eos = set(backbone.eos_token_ids)
    todo = []  # (index, prefix tokens)
    for i, answer in enumerate(edited):
        if not answer.edited:
            continue
        said = list(answer.tokens)
        targets = [t.lower() for t in _TARGETS[i]]
        for k in range(1, len(said) + 1):
            if said[k - 1] in eos:
                break
            text = tok.decode(said[:k], skip_special_tokens=True).lower()
            if any(t in text for t in targets):
                if k < len(said):
                    todo.append((i, said[:k]))
                break
    if not todo:
        return edited, unedited
    plain = A.encode_texts(backbone, [texts[i] for i, _ in todo], None)
    extended = [
        EncodedText(p.ids + prefix, [], [], []) for p, (_, prefix) in zip(plain, todo, strict=True)
    ]
    rest = A.generate(backbone, extended, None, max_new_tokens)
    for (i, prefix), cont in zip(todo, rest, strict=True):
        budget = max_new_tokens - len(prefix)
        more = list(cont.tokens)[:budget]
        tokens = prefix + more
        stopped = any(t in eos for t in more)
        text = tok.decode(tokens, skip_special_tokens=True)
        edited[i] = A.Answer(text, stopped, True, tuple(tokens))
    return edited, unedited


ORIGINAL_PAIRS = E.answer_pairs


def install() -> None:
    original_metrics = E.answer_metrics

    def answer_metrics(backbone, items, table, contexts=A.CONTEXTS, **kw):
        _TARGETS.clear()
        for item in items:  # in answer_metrics' order: item, context, kind
            kinds = [kind for kind in E.KINDS if E._prompt(item, kind)]
            _TARGETS.extend([(item.fact.target,)] * (len(kinds) * len(contexts)))
        E.answer_pairs = ORIGINAL_PAIRS
        before = original_metrics(backbone, items, table, contexts)
        E.answer_pairs = released_pairs
        after = original_metrics(backbone, items, table, contexts, **kw)
        return {**after, **{f"unreleased_{k}": v for k, v in before.items()}}

    E.answer_metrics = answer_metrics
    E.answer_pairs = released_pairs


if __name__ == "__main__":
    import sys

    import server.cli as cli

    install()
    sys.exit(cli.main(sys.argv[1:]))
