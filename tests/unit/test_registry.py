"""The live pack registry: one load per version, LRU eviction within a budget, pinning, swaps
of newly published versions (and never of broken ones)."""

from __future__ import annotations

import logging
import threading
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from factories import publish_subject_pack
from pack_damage import rewrite_tensors

from server.builder.edits import backbone_info
from server.model import Backbone, load_backbone
from server.packs import (
    Manifest,
    Pack,
    PackContent,
    PackCorruptError,
    PackIncompatibleError,
    PackNotFoundError,
    PackRef,
    PackStore,
    SubjectEntry,
)
from server.packs.registry import PackRegistry
from server.settings import Settings


@pytest.fixture(scope="module")
def backbone(tiny_model_dirs: dict[str, Path]) -> Backbone:
    return load_backbone(Settings(model=tiny_model_dirs["llama"], device="cpu"))


def test_concurrent_gets_load_a_version_once(backbone: Backbone, tmp_path: Path) -> None:
    store = PackStore(tmp_path)
    publish_subject_pack(store, "a", backbone, ["france"], seed=1)
    registry = PackRegistry(store, backbone)
    loads: list[PackRef] = []
    original = registry._load

    def counting_load(ref: PackRef):  # type: ignore[no-untyped-def]
        loads.append(ref)
        return original(ref)

    registry._load = counting_load  # type: ignore[method-assign]
    results = []
    threads = [
        threading.Thread(target=lambda: results.append(registry.get(PackRef("a"))))
        for _ in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert loads == [PackRef("a", 1)]
    assert len({id(r) for r in results}) == 1
    assert results[0].edit_set.ref == "a@1"


def test_lru_eviction_within_budget_spares_pinned(backbone: Backbone, tmp_path: Path) -> None:
    store = PackStore(tmp_path)
    for seed, name in enumerate(["a", "b", "c"]):
        publish_subject_pack(store, name, backbone, ["france", "rome"], seed=seed)
    one_pack = 2 * backbone.hidden_size * 4  # two float32 blocks
    registry = PackRegistry(
        store, backbone, memory_budget_bytes=2 * one_pack, pinned=frozenset({"a"})
    )
    registry.get(PackRef("a"))
    registry.get(PackRef("b"))
    registry.get(PackRef("c"))  # over budget: b is the least recently used unpinned
    assert sorted(str(p.ref) for p in registry.loaded()) == ["a@1", "c@1"]
    registry.get(PackRef("b"))
    assert sorted(str(p.ref) for p in registry.loaded()) == ["a@1", "b@1"]
    assert registry.loaded_bytes <= 2 * one_pack


def test_refresh_swaps_in_new_versions_and_skips_broken_ones(
    backbone: Backbone, tmp_path: Path
) -> None:
    store = PackStore(tmp_path)
    publish_subject_pack(store, "a", backbone, ["france"], seed=1)
    registry = PackRegistry(store, backbone)
    assert registry.get(PackRef("a")).ref == PackRef("a", 1)
    assert registry.refresh() == []
    publish_subject_pack(store, "a", backbone, ["france"], seed=2)
    assert registry.get(PackRef("a")).ref == PackRef("a", 1), "no swap before a refresh"
    swaps = registry.refresh()
    assert [(s.name, s.old, s.new) for s in swaps] == [("a", 1, 2)]
    assert registry.get(PackRef("a")).ref == PackRef("a", 2)
    assert PackRef("a", 2) in [p.ref for p in registry.loaded()], "loaded before going live"

    manifest = publish_subject_pack(store, "a", backbone, ["france"], seed=3)
    (tmp_path / "a" / str(manifest.version) / "table.safetensors").write_bytes(b"broken")
    assert registry.refresh() == []
    assert registry.get(PackRef("a")).ref == PackRef("a", 2), "a broken version never goes live"

    registry.activate(PackRef("a", 1))
    assert registry.get(PackRef("a")).ref == PackRef("a", 1)
    assert registry.unload("a") == [1, 2]
    assert registry.loaded() == []
    with pytest.raises(PackNotFoundError):
        registry.unload("nothing")


def gate_tensors(width: int, *, head: torch.Tensor) -> dict[str, torch.Tensor]:
    """A one-fact gate table of `width`-wide embeddings, consistent but for what `head` breaks."""
    return {
        "gate.prompt_embeddings": torch.randn(1, width),
        "gate.fact_rows": torch.zeros(1, dtype=torch.long),
        "gate.prompt_hubness": torch.zeros(1),
        "gate.prompt_is_question": torch.zeros(1, dtype=torch.bool),
        "gate.question_probes": torch.randn(2, width),
        "gate.statement_probes": torch.randn(2, width),
        "gate.head": head,
        "gate.threshold": torch.tensor(0.0),
    }


def test_a_pack_whose_gate_head_cannot_score_its_table_is_refused(
    backbone: Backbone, tmp_path: Path
) -> None:
    """A damaged gate is a corrupt pack, named as such, not a crash inside serving."""
    store = PackStore(tmp_path)
    manifest = publish_subject_pack(store, "a", backbone, ["france"], seed=1)
    pack = store.load(PackRef("a", manifest.version))
    gate = gate_tensors(384, head=torch.zeros(384, 7))
    content = replace(pack.content, table={**pack.content.table, **gate})
    store.publish("b", content, backbone_info(backbone))
    registry = PackRegistry(store, backbone)
    with pytest.raises(
        PackCorruptError, match=r"pack b@1: table.safetensors: gate.head must be \[384, 384\]"
    ):
        registry.get(PackRef("b"))


# -- validation: a version that fails it never goes live ------------------------------------


def publish_nan_version(store: PackStore, name: str, backbone: Backbone) -> Manifest:
    """A version written by the project's own writer whose blocks hold a NaN (a diverged run)."""
    blocks = torch.randn(2, backbone.hidden_size, generator=torch.Generator().manual_seed(7))
    blocks[1, 0] = float("nan")
    content = PackContent(
        layer=backbone.num_layers // 2,
        subjects=[SubjectEntry("france"), SubjectEntry("rome")],
        table={"blocks": blocks},
        hypernet={"weight": torch.eye(backbone.hidden_size)},
        facts=[{"subject": s, "prompt": f"{s} is", "target": "x"} for s in ("france", "rome")],
    )
    return store.publish(name, content, backbone_info(backbone))


def test_a_version_that_fails_validation_never_goes_live(
    backbone: Backbone, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Today's main loads a NaN version, swaps it in and serves it."""
    store = PackStore(tmp_path)
    publish_subject_pack(store, "a", backbone, ["france"], seed=1)
    registry = PackRegistry(store, backbone)
    assert registry.get(PackRef("a")).ref == PackRef("a", 1)
    assert registry.refresh() == []
    assert publish_nan_version(store, "a", backbone).version == 2

    with caplog.at_level(logging.ERROR, logger="server.packs.registry"):
        assert registry.refresh() == []
        for _ in range(3):  # a request naming it gets the error, at once, every time
            with pytest.raises(PackCorruptError, match=r"pack a@2: table\.safetensors: .*NaN"):
                registry.get(PackRef("a", 2))
        with pytest.raises(PackCorruptError, match="pack a@2"):
            registry.activate(PackRef("a", 2))
    assert registry.live() == {"a": 1}
    assert registry.get(PackRef("a")).ref == PackRef("a", 1), "the previous version serves on"
    assert [str(p.ref) for p in registry.loaded()] == ["a@1"]
    refusals = [r for r in caplog.records if "refused" in r.getMessage()]
    assert len(refusals) == 1, "logged once, not once per request"
    assert "pack a@2" in refusals[0].getMessage() and refusals[0].levelno == logging.ERROR


class CountingStore(PackStore):
    """A real store that records which versions it reads."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.reads: list[PackRef] = []

    def load(self, ref: PackRef) -> Pack:
        self.reads.append(ref)
        return super().load(ref)


def test_a_refused_version_is_read_again_only_when_its_files_change(
    backbone: Backbone, tmp_path: Path
) -> None:
    """No hot loop: requests for a bad version do not re-read and re-hash it each time; once an
    operator restores its files, it loads."""
    store = CountingStore(tmp_path)
    publish_nan_version(store, "a", backbone)
    registry = PackRegistry(store, backbone)
    for _ in range(5):
        with pytest.raises(PackCorruptError, match="pack a@1"):
            registry.get(PackRef("a", 1))
    assert store.reads == [PackRef("a", 1)]

    path = store.path(PackRef("a", 1))
    rewrite_tensors(path, "table.safetensors", lambda t: t["blocks"].nan_to_num_(0.0))
    assert registry.get(PackRef("a", 1)).ref == PackRef("a", 1)
    assert store.reads == [PackRef("a", 1)] * 2


def test_first_use_serves_the_newest_version_that_passes_validation(
    backbone: Backbone, tmp_path: Path
) -> None:
    """Today's main makes the latest version live on first use, whatever it holds: a NaN one
    serves, a damaged one fails every request while a good version sits beside it."""
    store = PackStore(tmp_path)
    publish_subject_pack(store, "a", backbone, ["france"], seed=1)
    publish_nan_version(store, "a", backbone)
    damaged = publish_subject_pack(store, "a", backbone, ["france"], seed=3)
    (tmp_path / "a" / str(damaged.version) / "table.safetensors").write_bytes(b"broken")
    registry = PackRegistry(store, backbone)
    assert registry.get(PackRef("a")).ref == PackRef("a", 1)
    assert registry.live() == {"a": 1}

    only_bad = PackStore(tmp_path / "only-bad")
    publish_nan_version(only_bad, "b", backbone)
    with pytest.raises(PackCorruptError, match="pack b@1"):
        PackRegistry(only_bad, backbone).get(PackRef("b"))


# -- checks against the backbone and the gate encoder --------------------------------------


def test_a_gate_built_with_another_encoder_is_refused(backbone: Backbone, tmp_path: Path) -> None:
    """A gate table of 8-wide embeddings, consistent in itself: today's main loads it, and the
    first request naming its subject fails in the gate's matmul against 384-wide queries."""
    store = PackStore(tmp_path)
    manifest = publish_subject_pack(store, "a", backbone, ["france"], seed=1)
    content = store.load(PackRef("a", manifest.version)).content
    gate = gate_tensors(8, head=torch.eye(8))
    store.publish("b", replace(content, table={**content.table, **gate}), backbone_info(backbone))
    registry = PackRegistry(store, backbone)
    with pytest.raises(
        PackIncompatibleError,
        match="pack b@1: its scope gate holds 8-wide embeddings, this server's sentence "
        "encoder gives 384",
    ):
        registry.get(PackRef("b"))


def test_blocks_that_overflow_the_backbone_dtype_are_refused(
    tiny_model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    """Finite in the pack's float32, infinite in a float16 backbone: today's main loads them and
    the hook adds inf to the residual stream."""
    half = load_backbone(Settings(model=tiny_model_dirs["llama"], device="cpu", dtype="float16"))
    store = PackStore(tmp_path)
    publish_subject_pack(store, "a", half, ["france"], seed=1, scale=1e5)
    with pytest.raises(
        PackIncompatibleError, match=r"pack a@1: its blocks .* overflow the backbone's float16"
    ):
        PackRegistry(store, half).get(PackRef("a"))
    publish_subject_pack(store, "ok", half, ["france"], seed=1)
    assert PackRegistry(store, half).get(PackRef("ok")).edit_set.deltas.dtype == torch.float16


def test_a_loaded_pack_knows_each_subjects_targets(backbone: Backbone, tmp_path: Path) -> None:
    store = PackStore(tmp_path)
    publish_subject_pack(store, "a", backbone, ["france", "rome"], seed=1)
    loaded = PackRegistry(store, backbone).get(PackRef("a"))
    assert list(loaded.edit_set.targets) == [("x",), ("x",)]
