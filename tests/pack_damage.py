"""Damaging real packs the way a bad trainer, a bad copy or a hand edit would: a file is
replaced and the manifest's size and sha256 updated, so that validation, not the checksum, has
to catch it."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from server.packs import format as pack_format

Tensors = dict[str, torch.Tensor]


def edit_manifest(path: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    manifest_path = path / pack_format.MANIFEST_FILE
    manifest = json.loads(manifest_path.read_text())
    edit(manifest)
    manifest_path.write_text(json.dumps(manifest))


def rewrite(path: Path, filename: str, data: bytes) -> None:
    """Replace one file of the pack at `path` (a new file, as a copy would make) and record its
    size and sha256 in the manifest."""
    staged = path / f".{filename}.new"
    staged.write_bytes(data)
    os.replace(staged, path / filename)
    entry = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    edit_manifest(path, lambda manifest: manifest["files"].update({filename: entry}))


def rewrite_tensors(path: Path, filename: str, edit: Callable[[Tensors], None]) -> None:
    tensors = load_safetensors((path / filename).read_bytes())
    edit(tensors)
    rewrite(path, filename, save_safetensors({k: v.contiguous() for k, v in tensors.items()}))
