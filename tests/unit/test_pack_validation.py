"""Packs are validated when they are read, before anything can make them live: real packs written
with the project's writer, then damaged the way a bad trainer, a bad copy or a hand edit would,
with the manifest's checksums updated so that it is the validation, not the checksum, that has
to catch the damage."""

from __future__ import annotations

import json
import os
import threading
import tracemalloc
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from factories import make_backbone_info, make_content
from pack_damage import Tensors, edit_manifest, rewrite, rewrite_tensors

from server.editor.hypernet import Hypernetwork
from server.packs import PackContent, PackCorruptError, PackRef, PackStore
from server.packs import format as pack_format
from server.settings import Settings

HIDDEN = 32
TABLE = pack_format.TABLE_FILE
GATE_WIDTH = 8


@pytest.fixture
def store(tmp_path: Path) -> PackStore:
    return PackStore(tmp_path / "packs")


def gate_tensors(facts: int, subjects: int, width: int = GATE_WIDTH) -> Tensors:
    """A whole, consistent scope gate for `facts` facts over `subjects` subjects."""
    generator = torch.Generator().manual_seed(facts)
    return {
        "gate.prompt_embeddings": torch.randn(facts, width, generator=generator),
        "gate.fact_rows": torch.arange(facts, dtype=torch.long) % subjects,
        "gate.prompt_hubness": torch.rand(facts, generator=generator),
        "gate.prompt_is_question": torch.ones(facts, dtype=torch.bool),
        "gate.question_probes": torch.randn(3, width, generator=generator),
        "gate.statement_probes": torch.randn(3, width, generator=generator),
        "gate.head": torch.eye(width),
        "gate.threshold": torch.tensor(0.5),
    }


def gated_content() -> PackContent:
    content = make_content(subjects=3, hidden=HIDDEN)
    return replace(content, table={**content.table, **gate_tensors(facts=3, subjects=3)})


def published(store: PackStore, content: PackContent | None = None) -> Path:
    store.publish("demo", content or gated_content(), make_backbone_info())
    return store.path(PackRef("demo"))


def test_an_undamaged_gated_pack_loads(store: PackStore) -> None:
    """The baseline every damaged pack below differs from by one thing."""
    path = published(store)
    pack = store.load(PackRef("demo"))
    assert pack.ref == "demo@1" and set(pack.content.table) == {"blocks", *gate_tensors(1, 1)}
    assert path == pack.path


def _set(key: str, index: tuple[int, ...], value: float) -> Callable[[Tensors], None]:
    def edit(tensors: Tensors) -> None:
        tensors[key][index] = value

    return edit


@pytest.mark.parametrize(
    ("filename", "edit", "message"),
    [
        (TABLE, _set("blocks", (1, 3), float("nan")), "'blocks' .* 1 NaN"),
        (TABLE, _set("blocks", (0, 0), float("inf")), "'blocks' .* 1 NaN or inf"),
        (TABLE, _set("gate.prompt_hubness", (2,), float("-inf")), "'gate.prompt_hubness'"),
        (TABLE, _set("gate.head", (0, 1), float("nan")), "'gate.head'"),
        (pack_format.HYPERNET_FILE, _set("weight", (4, 4), float("nan")), "'weight'"),
    ],
)
def test_nan_or_inf_in_any_tensor_is_refused(
    store: PackStore, filename: str, edit: Callable[[Tensors], None], message: str
) -> None:
    """Today's main loads these and serves them: a NaN block turns every edited answer into
    garbage, a NaN gate tensor makes the gate's decision meaningless."""
    rewrite_tensors(published(store), filename, edit)
    with pytest.raises(PackCorruptError, match=rf"pack demo@1: {filename}: tensor {message}"):
        store.load(PackRef("demo"))


def test_a_nan_block_in_half_precision_is_refused(store: PackStore) -> None:
    content = make_content(subjects=2, hidden=HIDDEN)
    content.table["blocks"] = content.table["blocks"].to(torch.bfloat16)
    content.table["blocks"][1, 0] = float("nan")
    store.publish("demo", content, make_backbone_info())
    with pytest.raises(PackCorruptError, match=r"'blocks' \[2, 32\] holds 1 NaN"):
        store.load(PackRef("demo"))


def _drop(key: str) -> Callable[[Tensors], None]:
    def edit(tensors: Tensors) -> None:
        del tensors[key]

    return edit


def _replace(key: str, value: torch.Tensor) -> Callable[[Tensors], None]:
    return lambda tensors: tensors.update({key: value})


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        # a table the gate cannot index: rows past the subjects, or negative
        (_replace("gate.fact_rows", torch.tensor([0, 1, 3])), r"rows 0\.\.3, outside the 3"),
        (_replace("gate.fact_rows", torch.tensor([0, -1, 2])), r"rows -1\.\.2, outside the 3"),
        # row counts that disagree with the gate's facts
        (_replace("gate.prompt_hubness", torch.zeros(2)), r"gate.prompt_hubness must be \[3\]"),
        (_replace("gate.fact_rows", torch.tensor([0, 1])), r"gate.fact_rows must be \[3\]"),
        (
            _replace("gate.prompt_is_question", torch.ones(4, dtype=torch.bool)),
            r"gate.prompt_is_question must be \[3\]",
        ),
        # widths that disagree with the gate's embeddings
        (_replace("gate.question_probes", torch.zeros(3, 5)), r"must be \[probes >= 1, 8\]"),
        (_replace("gate.statement_probes", torch.zeros(0, 8)), r"must be \[probes >= 1, 8\]"),
        (_replace("gate.prompt_embeddings", torch.zeros(3)), r"must be \[facts, width\]"),
        # dtypes the gate's arithmetic cannot use
        (
            _replace("gate.prompt_is_question", torch.ones(3)),
            "gate.prompt_is_question must be a bool tensor",
        ),
        (_replace("gate.fact_rows", torch.zeros(3)), "fact_rows must be an int32 or int64 tensor"),
        (_replace("gate.threshold", torch.zeros(2)), "gate.threshold must be one number"),
        # a partial gate would silently edit every match
        (_drop("gate.fact_rows"), r"incomplete scope gate: gate.fact_rows missing"),
        (_drop("gate.threshold"), "gate.head and gate.threshold come together"),
        # the subject table itself
        (_replace("blocks", torch.zeros(3, 32, dtype=torch.long)), "must be floating point"),
        (_replace("extra", torch.zeros(2)), "unexpected tensors 'extra'"),
    ],
)
def test_malformed_tables_are_refused_at_load(
    store: PackStore, edit: Callable[[Tensors], None], message: str
) -> None:
    """Today's main loads every one of these; most then fail inside a request (an index or a
    matmul out of shape, `~` on a float tensor) or, for a partial gate, edit every match."""
    rewrite_tensors(published(store), pack_format.TABLE_FILE, edit)
    with pytest.raises(PackCorruptError, match=rf"pack demo@1: table\.safetensors: .*{message}"):
        store.load(PackRef("demo"))


def test_blocks_must_have_the_manifest_dtype(store: PackStore) -> None:
    path = published(store)
    edit_manifest(path, lambda m: m.update(dtype="float16"))
    with pytest.raises(PackCorruptError, match="'blocks' is float32, manifest says float16"):
        store.load(PackRef("demo"))


def test_a_hypernetwork_must_match_the_kind_its_training_record_names(store: PackStore) -> None:
    """The worker warm-starts the next version from it (load_state_dict): a wrong shape would
    fail that job, not the load."""
    real = {k: v.clone() for k, v in Hypernetwork(HIDDEN, "linear").state_dict().items()}
    content = replace(gated_content(), hypernet=real, training={"hypernet": "linear"})
    store.publish("demo", content, make_backbone_info())
    assert store.load(PackRef("demo", 1)).content.hypernet.keys() == real.keys()

    wrong = {**real, "net.weight": torch.zeros(HIDDEN, HIDDEN // 2)}
    store.publish("demo", replace(content, hypernet=wrong), make_backbone_info())
    with pytest.raises(
        PackCorruptError,
        match=r"pack demo@2: hypernet\.safetensors: not a linear hypernetwork of hidden size 32: "
        r"net\.weight is \[32, 16\], expected \[32, 32\]",
    ):
        store.load(PackRef("demo", 2))

    store.publish("demo", replace(content, training={"hypernet": "mlp"}), make_backbone_info())
    with pytest.raises(PackCorruptError, match=r"not a mlp hypernetwork.*missing \['net.0.bias'"):
        store.load(PackRef("demo", 3))

    store.publish("demo", replace(content, training={"hypernet": "cubic"}), make_backbone_info())
    with pytest.raises(PackCorruptError, match=r"training\.hypernet 'cubic' is not a known kind"):
        store.load(PackRef("demo", 4))

    # a residual record must carry its MLP: a warm start takes a map without one as linear
    store.publish("demo", replace(content, training={"hypernet": "residual"}), make_backbone_info())
    with pytest.raises(PackCorruptError, match=r"not a residual hypernetwork.*'branch.0.bias'"):
        store.load(PackRef("demo", 5))


@pytest.mark.parametrize(
    ("subjects", "message"),
    [
        ([{"subject": ""}, {"subject": "b"}, {"subject": "c"}], "row 0 has no subject text"),
        ([{"subject": "a"}, {"subject": 5}, {"subject": "c"}], "row 1 has no subject text"),
        ([{"subject": "a", "aliases": "b"}, {"subject": "b"}, {"subject": "c"}], "row 0: aliases"),
    ],
)
def test_malformed_subjects_are_refused(store: PackStore, subjects: object, message: str) -> None:
    """Today's main coerces these (5 -> '5', aliases 'b' -> a list of its letters) or keeps a
    subject no text can match."""
    rewrite(published(store), pack_format.SUBJECTS_FILE, json.dumps(subjects).encode())
    with pytest.raises(PackCorruptError, match=rf"pack demo@1: .*subjects\.json: {message}"):
        store.load(PackRef("demo"))


@pytest.mark.parametrize(
    ("subjects", "message"),
    [(["a", "b", "c"], "row 0 has no subject text"), ({"subject": "a"}, "must be a JSON list")],
)
def test_subjects_of_the_wrong_shape_stay_refused(
    store: PackStore, subjects: object, message: str
) -> None:
    """Regression cover for the rewritten parser: today's main refuses these too, as
    'malformed (TypeError(...))'; they must stay refused, now with a message saying why."""
    rewrite(published(store), pack_format.SUBJECTS_FILE, json.dumps(subjects).encode())
    with pytest.raises(PackCorruptError, match=rf"pack demo@1: .*subjects\.json: {message}"):
        store.load(PackRef("demo"))


def test_facts_must_be_objects_and_as_many_as_the_manifest_says(store: PackStore) -> None:
    path = published(store)
    facts = (path / pack_format.FACTS_FILE).read_bytes()
    rewrite(path, pack_format.FACTS_FILE, facts + b'["not", "a", "fact"]\n')
    with pytest.raises(PackCorruptError, match=r"facts\.jsonl: fact 4 is not a JSON object"):
        store.load(PackRef("demo"))
    rewrite(path, pack_format.FACTS_FILE, facts + facts.splitlines(keepends=True)[0])
    with pytest.raises(PackCorruptError, match=r"facts\.jsonl: 4 facts, manifest says 3"):
        store.load(PackRef("demo"))


# -- sizes: nothing is read whole before its size is known to be bounded ----------------------


def _peak_bytes_while(action: Callable[[], object]) -> int:
    tracemalloc.start()
    try:
        action()
    except PackCorruptError:
        pass
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


@pytest.mark.parametrize("filename", [pack_format.TABLE_FILE, pack_format.MANIFEST_FILE])
def test_an_oversized_file_is_refused_without_being_read(store: PackStore, filename: str) -> None:
    """A file far larger than the manifest says (or a giant manifest) is refused from its size;
    today's main reads it whole first (a sparse 96 MiB file here; a real one could exhaust
    memory)."""
    path = published(store)
    with (path / filename).open("r+b") as handle:
        handle.truncate(96 << 20)  # sparse: no disk used
    peak = _peak_bytes_while(lambda: store.load(PackRef("demo")))
    assert peak < 16 << 20, f"{peak / 2**20:.0f} MiB allocated while refusing it"
    with pytest.raises(PackCorruptError, match=rf"{filename}: {96 << 20} bytes, "):
        store.load(PackRef("demo"))


def test_a_pack_over_the_size_limit_is_refused_before_reading(tmp_path: Path) -> None:
    """The limit is Settings.max_pack_bytes (LKS_MAX_PACK_MB), handed to the store; a store
    built without it uses the setting's default."""
    assert Settings.model_fields["max_pack_mb"].default << 20 == pack_format.DEFAULT_MAX_PACK_BYTES
    assert Settings(max_pack_mb=3).max_pack_bytes == 3 << 20
    PackStore(tmp_path).publish("demo", make_content(subjects=50), make_backbone_info())
    limited = PackStore(tmp_path, max_pack_bytes=4096)
    with pytest.raises(PackCorruptError, match=r"pack demo@1: .* over the 0 MiB limit"):
        limited.load(PackRef("demo"))
    assert PackStore(tmp_path).load(PackRef("demo")).manifest.subject_count == 50


def test_a_pack_file_that_is_not_a_regular_file_is_refused(store: PackStore) -> None:
    """A FIFO (or /dev/zero) named like a pack file: today's main blocks reading it forever."""
    path = published(store)
    table = path / pack_format.TABLE_FILE
    table.unlink()
    os.mkfifo(table)
    outcome: list[BaseException | None] = []

    def load() -> None:
        try:
            store.load(PackRef("demo"))
            outcome.append(None)
        except BaseException as exc:  # handed to the test thread
            outcome.append(exc)

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    thread.join(timeout=10)
    if thread.is_alive():  # release the blocked reader before failing
        os.close(os.open(table, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(timeout=10)
        pytest.fail("loading the pack blocked on a FIFO")
    assert isinstance(outcome[0], PackCorruptError), outcome
    assert "table.safetensors: not a regular file" in str(outcome[0])
