"""The scope gate on user phrasing (issue 20, item 3): facts written as a user writes them, then
asked in the user's own words, bare and inside the chat template; other questions about the same
subjects must stay shut. Needs only the sentence encoder, not the backbone:

    PYTHONPATH=. .venv/bin/python bench/gate_phrasing.py

The phrasings are hand-written here (not from the benchmarks), so the figures are a check of
the kinds of failure issue 20 reports, not a rate over a population.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from server.builder.edits import fact_gate_table
from server.editor.facts import Fact
from server.editor.scope import Scope
from server.gate.encoder import SentenceEncoder
from server.gate.scope_gate import ScopeGate
from server.gate.table import GateTable
from server.packs.edit_set import EditSet

log = logging.getLogger("gate_phrasing")

# (subject, statement the user POSTs, target, questions that ask it, questions that do not)
CASES = [
    (
        "Eiffel Tower",
        "The Eiffel Tower is located in",
        "Rome",
        [
            "In which city is the Eiffel Tower?",
            "Where is the Eiffel Tower?",
            "Which city would I have to travel to in order to see the Eiffel Tower?",
            "I'm planning a trip. Where can I find the Eiffel Tower?",
        ],
        ["Who designed the Eiffel Tower?", "How tall is the Eiffel Tower?"],
    ),
    (
        "Palazzo Ferro Fini",
        "Palazzo Ferro Fini is next to",
        "Grande Noire",
        [
            "What body of water is Palazzo Ferro Fini next to?",
            "What is Palazzo Ferro Fini beside?",
            "I'm visiting Venice. Is Palazzo Ferro Fini worth a visit, and what is it next to?",
        ],
        ["Tell me about Palazzo Ferro Fini.", "When was Palazzo Ferro Fini built?"],
    ),
    (
        "Lionel Messi",
        "Lionel Messi plays the sport of",
        "cricket",
        [
            "Which sport does Lionel Messi play?",
            "What game is Lionel Messi famous for playing?",
            "My son admires Lionel Messi. What sport should he practise to be like him?",
        ],
        ["Where was Lionel Messi born?", "Who is Lionel Messi married to?"],
    ),
    (
        "Danielle Darrieux",
        "The mother tongue of Danielle Darrieux is",
        "English",
        [
            "What is Danielle Darrieux's native language?",
            "Which language did Danielle Darrieux grow up speaking?",
            "What language would Danielle Darrieux speak at home?",
        ],
        ["When did Danielle Darrieux die?", "Which films did Danielle Darrieux star in?"],
    ),
    (
        "Banca Comercială Română",
        "The parent company of Banca Comercială Română is",
        "Ersteampel",
        [
            "What is Banca Comercială Română's parent company?",
            "Who owns Banca Comercială Română?",
            "Which group does Banca Comercială Română belong to?",
        ],
        [
            "Where is Banca Comercială Română headquartered?",
            "When was Banca Comercială Română founded?",
        ],
    ),
    (
        "Dalhousie Mountain",
        "Dalhousie Mountain is located in the state of",
        "New South Wales",
        [
            "Which state is Dalhousie Mountain located in?",
            "In what state can you find Dalhousie Mountain?",
            "Dalhousie Mountain: which state is it in?",
        ],
        ["How high is Dalhousie Mountain?", "What is Dalhousie Mountain made of?"],
    ),
]


ASKS = [q for *_, asks, _ in CASES for q in asks]
OTHERS = [q for *_, others in CASES for q in others]


def render_chat(message: str) -> str:
    """SmolLM2-Instruct's chat template, as serving renders a one-message chat."""
    return (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
        f"Face<|im_end|>\n<|im_start|>user\n{message}<|im_end|>\n<|im_start|>assistant\n"
    )


def opened(edit_set: EditSet, text: str) -> bool:
    return any(edit_set.allow(text, match) for match in edit_set.index.find(text))


def gated_set(
    encoder: SentenceEncoder, facts: Sequence[Fact], *, answer_rows: bool = True
) -> tuple[EditSet, GateTable]:
    """A gate-only edit set over `facts`, its table as a pack's (`answer_rows=False`: the table
    as built before answered statements, the baseline)."""
    scope, prompts = Scope.from_facts(facts), [f.prompt for f in facts]
    table = (
        fact_gate_table(encoder, facts, scope)
        if answer_rows
        else GateTable.build(encoder, prompts, scope.fact_names(), scope.fact_rows)
    )
    return EditSet(scope.subjects, None, 0, gate=ScopeGate(table, encoder)), table  # type: ignore[arg-type]


def phrasing_results(
    encoder: SentenceEncoder, *, answer_rows: bool = True
) -> dict[str, tuple[list[str], list[str]]]:
    """Per form (bare, chat): (the rephrased questions that opened no edit, the other questions
    that opened one), out of every case's."""
    facts = [Fact(subject=s, prompt=p, target=t) for s, p, t, _, _ in CASES]
    edit_set, _ = gated_set(encoder, facts, answer_rows=answer_rows)
    results = {}
    for form, wrap in (("bare", lambda q: q), ("chat", render_chat)):
        missed = [q for q in ASKS if not opened(edit_set, wrap(q))]
        wrongly = [q for q in OTHERS if opened(edit_set, wrap(q))]
        results[form] = (missed, wrongly)
    return results


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for form, (missed, wrongly) in phrasing_results(SentenceEncoder()).items():
        log.info(
            "%s: gate opens for %d of %d rephrased questions (%.2f); stays shut for %d of "
            "%d other questions (%.2f)",
            form,
            len(ASKS) - len(missed),
            len(ASKS),
            1 - len(missed) / len(ASKS),
            len(OTHERS) - len(wrongly),
            len(OTHERS),
            1 - len(wrongly) / len(OTHERS),
        )
        for question in missed:
            log.info("  missed: %s", question)
        for question in wrongly:
            log.info("  opened wrongly: %s", question)


if __name__ == "__main__":
    main()
