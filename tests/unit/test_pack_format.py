import hashlib
import json
from pathlib import Path

import pytest
import torch
from factories import make_backbone_info, make_content
from pack_damage import edit_manifest

from server.packs import (
    PackCorruptError,
    PackIncompatibleError,
    PackNotFoundError,
    PackRef,
    PackStore,
)
from server.packs import format as pack_format
from server.packs.format import check_compatible, read_pack


@pytest.fixture
def store(tmp_path: Path) -> PackStore:
    return PackStore(tmp_path / "packs")


def test_round_trip_keeps_everything(store: PackStore) -> None:
    content = make_content(subjects=4)
    manifest = store.publish("demo", content, make_backbone_info())
    assert (manifest.name, manifest.version, manifest.subject_count) == ("demo", 1, 4)
    pack = store.load(PackRef("demo"))
    assert pack.ref == "demo@1"
    assert torch.equal(pack.content.table["blocks"], content.table["blocks"])
    assert torch.equal(pack.content.hypernet["weight"], content.hypernet["weight"])
    assert pack.content.subjects == content.subjects
    assert pack.content.facts == content.facts
    assert pack.manifest.metrics == {"reliability": 1.0}
    assert set(pack.manifest.files) == set(pack_format.DATA_FILES)
    assert sorted(p.name for p in pack.path.iterdir()) == sorted(
        [pack_format.MANIFEST_FILE, *pack_format.DATA_FILES]
    )


def test_publish_adds_versions_and_latest_resolves(store: PackStore) -> None:
    for _ in range(3):
        store.publish("demo", make_content(), make_backbone_info())
    assert store.versions("demo") == [1, 2, 3]
    assert store.resolve(PackRef("demo")) == PackRef("demo", 3)
    assert store.load(PackRef("demo", 2)).manifest.version == 2
    with pytest.raises(PackNotFoundError, match="no version 9"):
        store.resolve(PackRef("demo", 9))
    with pytest.raises(PackNotFoundError, match="no pack named 'other'"):
        store.resolve(PackRef("other"))


def test_corrupt_tensor_file_is_named(store: PackStore) -> None:
    store.publish("demo", make_content(), make_backbone_info())
    table = store.path(PackRef("demo")) / pack_format.TABLE_FILE
    data = bytearray(table.read_bytes())
    data[-1] ^= 0xFF
    table.write_bytes(bytes(data))
    with pytest.raises(PackCorruptError, match=r"table\.safetensors: corrupt"):
        store.load(PackRef("demo"))


def test_truncated_safetensors_with_matching_checksum_is_caught(store: PackStore) -> None:
    store.publish("demo", make_content(), make_backbone_info())
    path = store.path(PackRef("demo"))
    garbage = b"not safetensors"
    (path / pack_format.HYPERNET_FILE).write_bytes(garbage)
    manifest = json.loads((path / pack_format.MANIFEST_FILE).read_text())
    manifest["files"][pack_format.HYPERNET_FILE] = {
        "sha256": hashlib.sha256(garbage).hexdigest(),
        "bytes": len(garbage),
    }
    (path / pack_format.MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(PackCorruptError, match=r"hypernet\.safetensors: not a valid safetensors"):
        store.load(PackRef("demo"))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m.update(format_version=99), "unknown format_version 99"),
        (lambda m: m.pop("backbone"), "backbone: Field required"),
        (lambda m: m.update(subject_count=5), "manifest says"),
        (lambda m: m.update(version=2), "says demo@2 but lies in demo/1"),
        (lambda m: m["files"].pop(pack_format.FACTS_FILE), "lists no checksum for facts.jsonl"),
    ],
)
def test_inconsistent_manifest_is_refused(store: PackStore, edit, message: str) -> None:  # type: ignore[no-untyped-def]
    store.publish("demo", make_content(), make_backbone_info())
    manifest_path = store.path(PackRef("demo")) / pack_format.MANIFEST_FILE
    manifest = json.loads(manifest_path.read_text())
    edit(manifest)
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(PackCorruptError, match=message):
        store.load(PackRef("demo"))


def test_missing_file_is_named(store: PackStore) -> None:
    store.publish("demo", make_content(), make_backbone_info())
    (store.path(PackRef("demo")) / pack_format.SUBJECTS_FILE).unlink()
    with pytest.raises(PackCorruptError, match=r"subjects\.json: missing"):
        store.load(PackRef("demo"))


def test_crash_mid_write_leaves_no_visible_version(
    store: PackStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.publish("demo", make_content(), make_backbone_info())
    real_write = pack_format._write_synced
    calls = {"n": 0}

    def failing_write(path: Path, data: bytes) -> None:
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(28, "No space left on device")
        real_write(path, data)

    monkeypatch.setattr(pack_format, "_write_synced", failing_write)
    with pytest.raises(OSError, match="No space left"):
        store.publish("demo", make_content(), make_backbone_info())
    assert store.versions("demo") == [1]
    assert sorted(p.name for p in (store.root / "demo").iterdir()) == ["1"]
    assert store.load(PackRef("demo")).manifest.version == 1


def test_existing_version_is_never_overwritten(store: PackStore) -> None:
    store.publish("demo", make_content(), make_backbone_info())
    with pytest.raises(OSError):
        pack_format.write_pack(
            make_content(subjects=7),
            name="demo",
            version=1,
            backbone=make_backbone_info(),
            destination=store.root / "demo" / "1",
        )
    assert store.load(PackRef("demo", 1)).manifest.subject_count == 3


def test_compatibility_checks_name_the_problem(store: PackStore) -> None:
    store.publish("demo", make_content(hidden=32, layer=2), make_backbone_info("sha256:aaa"))
    manifest = read_pack(store.path(PackRef("demo"))).manifest
    check_compatible(manifest, fingerprint="sha256:aaa", hidden_size=32, num_layers=4)
    with pytest.raises(PackIncompatibleError, match="not the one loaded"):
        check_compatible(manifest, fingerprint="sha256:bbb", hidden_size=32, num_layers=4)
    with pytest.raises(PackIncompatibleError, match="hidden size 32, the backbone has 64"):
        check_compatible(manifest, fingerprint="sha256:aaa", hidden_size=64, num_layers=4)
    with pytest.raises(PackIncompatibleError, match="edits layer 2"):
        check_compatible(manifest, fingerprint="sha256:aaa", hidden_size=32, num_layers=2)


def test_store_ignores_staging_and_stray_entries(store: PackStore) -> None:
    store.publish("demo", make_content(), make_backbone_info())
    (store.root / "demo" / ".staging-2-abc").mkdir()
    (store.root / "demo" / "notes.txt").write_text("x")
    (store.root / "Bad Name").mkdir()
    assert store.names() == ["demo"]
    assert store.versions("demo") == [1]


def test_only_canonical_version_directories_are_versions(store: PackStore) -> None:
    """'²' passes str.isdigit but not int(): on today's main one such stray directory makes
    every lookup of the name raise ValueError; '01' would list version 1 twice."""
    store.publish("demo", make_content(), make_backbone_info())
    (store.root / "demo" / "²").mkdir()
    (store.root / "demo" / "01").mkdir()
    (store.root / "demo" / "0").mkdir()
    assert store.versions("demo") == [1]
    assert store.load(PackRef("demo")).manifest.version == 1


@pytest.mark.parametrize("name", ["../demo", "demo/../../etc", "Demo"])
def test_a_manifest_name_must_be_a_whole_pack_name(store: PackStore, name: str) -> None:
    """The name pattern must match the whole name (today's main accepts any name that merely
    contains a valid one, such as '../demo')."""
    store.publish("demo", make_content(), make_backbone_info())
    path = store.path(PackRef("demo"))
    edit_manifest(path, lambda m: m.update(name=name))
    with pytest.raises(PackCorruptError, match="name: String should match pattern"):
        store.manifest(PackRef("demo"))
