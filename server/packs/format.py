"""Pack format v1: a directory of JSON and safetensors, written atomically, validated on load.

    packs/<name>/<version>/
        manifest.json        format version, identity, backbone, shapes, training config, metrics,
                             and the sha256 of every other file
        table.safetensors    the subject table (one row per subject) and the gate's tensors
        hypernet.safetensors the trained hypernetwork's weights
        subjects.json        row -> subject and its aliases
        facts.jsonl          the facts the pack was trained from

Never pickle: tensors go through safetensors, everything else through JSON.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from server.editor.scope import SubjectEntry
from server.packs.errors import PackCorruptError, PackIncompatibleError
from server.packs.names import NAME_PATTERN
from server.packs.validate import BLOCKS_KEY, check_hypernet, check_table, check_tensors_finite

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
TABLE_FILE = "table.safetensors"
HYPERNET_FILE = "hypernet.safetensors"
SUBJECTS_FILE = "subjects.json"
FACTS_FILE = "facts.jsonl"
DATA_FILES = (TABLE_FILE, HYPERNET_FILE, SUBJECTS_FILE, FACTS_FILE)
# Bounds on what is read whole into memory: a pack's files together (the server passes
# Settings.max_pack_bytes) and its manifest, which is read before any size is known.
DEFAULT_MAX_PACK_BYTES = 2048 << 20
MAX_MANIFEST_BYTES = 4 << 20


class BackboneInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    fingerprint: str
    model_type: str


class FileEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sha256: str
    bytes: int = Field(ge=0)


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format_version: int
    name: str = Field(pattern=f"^(?:{NAME_PATTERN.pattern})$")  # anchored: the whole name
    version: int = Field(ge=1)
    created: datetime
    backbone: BackboneInfo
    layer: int = Field(ge=0)
    hidden_size: int = Field(ge=1)
    dtype: str
    subject_count: int = Field(ge=0)
    fact_count: int = Field(default=0, ge=0)  # absent in packs written before it existed
    training: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, float] = Field(default_factory=dict)
    files: dict[str, FileEntry]


@dataclass
class PackContent:
    """What the editor produces and a pack stores, before it has a name and version."""

    layer: int
    subjects: list[SubjectEntry]
    table: dict[str, torch.Tensor]
    hypernet: dict[str, torch.Tensor]
    facts: list[dict[str, Any]]
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        blocks = self.table.get(BLOCKS_KEY)
        assert blocks is not None and blocks.ndim == 2, "table needs a 2-D 'blocks' tensor"
        assert blocks.shape[0] == len(self.subjects), (
            f"{blocks.shape[0]} blocks for {len(self.subjects)} subjects"
        )


@dataclass
class Pack:
    """A loaded, validated pack. Immutable by convention once loaded."""

    manifest: Manifest
    content: PackContent
    path: Path

    @property
    def ref(self) -> str:
        return f"{self.manifest.name}@{self.manifest.version}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _write_synced(path: Path, data: bytes) -> None:
    with path.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _contiguous_cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}


def write_pack(
    content: PackContent,
    *,
    name: str,
    version: int,
    backbone: BackboneInfo,
    destination: Path,
) -> Manifest:
    """Write a pack so that `destination` appears whole or not at all.

    Files go to a hidden staging directory beside `destination`, are fsynced, and the directory
    is renamed into place; a rename onto an existing version fails, so versions are never
    overwritten.
    """
    blocks = content.table[BLOCKS_KEY]
    staging = destination.parent / f".staging-{destination.name}-{uuid.uuid4().hex[:8]}"
    staging.mkdir(parents=True)
    try:
        payloads = {
            TABLE_FILE: save_safetensors(_contiguous_cpu(content.table)),
            HYPERNET_FILE: save_safetensors(_contiguous_cpu(content.hypernet)),
            SUBJECTS_FILE: json.dumps(
                [{"subject": s.subject, "aliases": list(s.aliases)} for s in content.subjects],
                ensure_ascii=False,
            ).encode(),
            FACTS_FILE: "".join(
                json.dumps(fact, ensure_ascii=False) + "\n" for fact in content.facts
            ).encode(),
        }
        for filename, data in payloads.items():
            _write_synced(staging / filename, data)
        manifest = Manifest(
            format_version=FORMAT_VERSION,
            name=name,
            version=version,
            created=datetime.now(UTC),
            backbone=backbone,
            layer=content.layer,
            hidden_size=int(blocks.shape[1]),
            dtype=str(blocks.dtype).removeprefix("torch."),
            subject_count=len(content.subjects),
            fact_count=len(content.facts),
            training=content.training,
            metrics=content.metrics,
            files={
                filename: FileEntry(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
                for filename, data in payloads.items()
            },
        )
        _write_synced(staging / MANIFEST_FILE, manifest.model_dump_json(indent=2).encode())
        _fsync_dir(staging)
        os.rename(staging, destination)
        _fsync_dir(destination.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def _where(file_path: Path, ref: str | None) -> str:
    return f"pack {ref}: {file_path}" if ref else str(file_path)


def _read_bounded(file_path: Path, *, bound: int, exact: bool, ref: str | None = None) -> bytes:
    """Read a whole file only after its size is known to be bounded: `bound` bytes exactly (the
    manifest's word, `exact`) or at most `bound`. It must be a regular file: a device or a FIFO
    named like a pack file would be read forever. Reads at most one byte past the bound, so a
    file that grows between the check and the read cannot exhaust memory either."""
    where = _where(file_path, ref)
    try:
        info = file_path.stat()
    except FileNotFoundError:
        raise PackCorruptError(f"{where}: missing") from None
    if not stat.S_ISREG(info.st_mode):
        raise PackCorruptError(f"{where}: not a regular file")
    if exact and info.st_size != bound:
        raise PackCorruptError(
            f"{where}: {info.st_size} bytes, the manifest says {bound} "
            "(truncated or replaced); restore it or publish a new version"
        )
    if info.st_size > bound:
        raise PackCorruptError(f"{where}: {info.st_size} bytes, more than the {bound} allowed")
    with file_path.open("rb") as handle:
        data = handle.read(bound + 1)
    if len(data) > bound or (exact and len(data) != bound):
        raise PackCorruptError(f"{where}: changed size while being read; try again")
    return data


def read_manifest(path: Path) -> Manifest:
    manifest_path = path / MANIFEST_FILE
    data = _read_bounded(manifest_path, bound=MAX_MANIFEST_BYTES, exact=False)
    try:
        raw = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PackCorruptError(f"{manifest_path}: not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise PackCorruptError(f"{manifest_path}: not a JSON object")
    found = raw.get("format_version")
    if found != FORMAT_VERSION:
        raise PackCorruptError(
            f"{manifest_path}: unknown format_version {found!r} "
            f"(this server reads format {FORMAT_VERSION})"
        )
    try:
        return Manifest.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        raise PackCorruptError(f"{manifest_path}: {problems}") from None


def _check_declared_size(path: Path, manifest: Manifest, max_bytes: int) -> None:
    """Refuse a pack whose files together are over the limit before reading any of them."""
    ref = f"{manifest.name}@{manifest.version}"
    missing = [f for f in DATA_FILES if f not in manifest.files]
    if missing:
        raise PackCorruptError(
            f"pack {ref}: {path / MANIFEST_FILE}: lists no checksum for {', '.join(missing)}"
        )
    total = sum(manifest.files[f].bytes for f in DATA_FILES)
    if total > max_bytes:
        raise PackCorruptError(
            f"pack {ref}: its files declare {total / 2**20:.1f} MiB, "
            f"over the {max_bytes / 2**20:.0f} MiB limit (LKS_MAX_PACK_MB); raise the limit "
            "if the pack is genuine"
        )


def _read_checked(path: Path, manifest: Manifest, filename: str) -> bytes:
    entry = manifest.files[filename]
    file_path = path / filename
    ref = f"{manifest.name}@{manifest.version}"
    data = _read_bounded(file_path, bound=entry.bytes, exact=True, ref=ref)
    if hashlib.sha256(data).hexdigest() != entry.sha256:
        raise PackCorruptError(
            f"{_where(file_path, ref)}: corrupt (sha256 differs from the manifest); "
            "restore it or publish a new version"
        )
    return data


def _parse_tensors(file_path: Path, data: bytes, ref: str) -> dict[str, torch.Tensor]:
    try:
        return load_safetensors(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise PackCorruptError(
            f"{_where(file_path, ref)}: not a valid safetensors file ({exc})"
        ) from None


def _parse_subjects(file_path: Path, data: bytes, ref: str) -> list[SubjectEntry]:
    """subjects.json: a list of {"subject": non-empty text, "aliases": [text, ...]}."""
    where = _where(file_path, ref)
    try:
        raw = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PackCorruptError(f"{where}: malformed ({exc})") from None
    if not isinstance(raw, list):
        raise PackCorruptError(f"{where}: must be a JSON list of subjects")
    subjects = []
    for row, item in enumerate(raw):
        subject = item.get("subject") if isinstance(item, dict) else None
        aliases = item.get("aliases", []) if isinstance(item, dict) else None
        if not isinstance(subject, str) or not subject.strip():
            raise PackCorruptError(f"{where}: row {row} has no subject text")
        if not isinstance(aliases, list) or not all(isinstance(a, str) for a in aliases):
            raise PackCorruptError(f"{where}: row {row}: aliases must be a list of text")
        subjects.append(SubjectEntry(subject, tuple(aliases)))
    return subjects


def _parse_facts(file_path: Path, data: bytes, ref: str) -> list[dict[str, Any]]:
    """facts.jsonl: one JSON object per line (the worker trains the next version from them)."""
    where = _where(file_path, ref)
    try:
        facts = [json.loads(line) for line in data.decode().splitlines() if line.strip()]
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PackCorruptError(f"{where}: malformed ({exc})") from None
    for number, fact in enumerate(facts, 1):
        if not isinstance(fact, dict):
            raise PackCorruptError(f"{where}: fact {number} is not a JSON object")
    return facts


def read_pack(path: Path, *, max_bytes: int = DEFAULT_MAX_PACK_BYTES) -> Pack:
    """Load and validate a pack directory; every failure names the pack, the file and the
    problem. Nothing is read whole before its size is checked, and nothing that would fail later
    (NaN/inf, shapes, out-of-range rows) gets past here."""
    manifest = read_manifest(path)
    ref = f"{manifest.name}@{manifest.version}"
    if path.name != str(manifest.version) or path.parent.name != manifest.name:
        raise PackCorruptError(
            f"{path / MANIFEST_FILE}: says {ref} but lies in {path.parent.name}/{path.name}"
        )
    _check_declared_size(path, manifest, max_bytes)
    table = _parse_tensors(path / TABLE_FILE, _read_checked(path, manifest, TABLE_FILE), ref)
    hypernet = _parse_tensors(
        path / HYPERNET_FILE, _read_checked(path, manifest, HYPERNET_FILE), ref
    )
    subjects = _parse_subjects(
        path / SUBJECTS_FILE, _read_checked(path, manifest, SUBJECTS_FILE), ref
    )
    facts = _parse_facts(path / FACTS_FILE, _read_checked(path, manifest, FACTS_FILE), ref)

    check_tensors_finite(ref, TABLE_FILE, table)
    check_tensors_finite(ref, HYPERNET_FILE, hypernet)
    check_table(
        ref,
        TABLE_FILE,
        table,
        subject_count=manifest.subject_count,
        hidden_size=manifest.hidden_size,
        dtype=manifest.dtype,
    )
    check_hypernet(
        ref, HYPERNET_FILE, hypernet, training=manifest.training, hidden_size=manifest.hidden_size
    )
    if len(subjects) != manifest.subject_count:
        raise PackCorruptError(
            f"pack {ref}: {SUBJECTS_FILE}: {len(subjects)} subjects, "
            f"manifest says {manifest.subject_count}"
        )
    if "fact_count" in manifest.model_fields_set and len(facts) != manifest.fact_count:
        raise PackCorruptError(
            f"pack {ref}: {FACTS_FILE}: {len(facts)} facts, manifest says {manifest.fact_count}"
        )
    content = PackContent(
        layer=manifest.layer,
        subjects=subjects,
        table=table,
        hypernet=hypernet,
        facts=facts,
        training=manifest.training,
        metrics=manifest.metrics,
    )
    return Pack(manifest=manifest, content=content, path=path)


def check_compatible(
    manifest: Manifest, *, fingerprint: str, hidden_size: int, num_layers: int
) -> None:
    """Refuse a pack trained on another backbone: its blocks would be meaningless here."""
    ref = f"pack {manifest.name}@{manifest.version}"
    if manifest.hidden_size != hidden_size:
        raise PackIncompatibleError(
            f"{ref} has hidden size {manifest.hidden_size}, the backbone has {hidden_size}"
        )
    if manifest.layer >= num_layers:
        raise PackIncompatibleError(
            f"{ref} edits layer {manifest.layer}, the backbone has {num_layers} layers"
        )
    if manifest.backbone.fingerprint != fingerprint:
        raise PackIncompatibleError(
            f"{ref} was built for backbone {manifest.backbone.name} "
            f"({manifest.backbone.fingerprint}), not the one loaded ({fingerprint}); "
            "retrain it on this backbone"
        )
