"""Which packs a request asks for: the `X-Edit-Pack` header or an OpenAI `model` field of the
form `<base>:<pack>[@version][,<pack>...]`."""

from __future__ import annotations

from urllib.parse import quote

from server.api.errors import APIError
from server.packs.errors import InvalidPackRefError
from server.packs.names import PackRef

PACK_HEADER = "X-Edit-Pack"
EDITS_HEADER = "X-Edits-Applied"


def parse_pack_list(text: str, *, limit: int, source: str) -> list[PackRef]:
    """`a, b@3` -> [a, b@3]; malformed or too many packs -> 422 naming `source`."""
    parts = [p.strip() for p in text.split(",")]
    if not text.strip() or any(not p for p in parts):
        raise APIError(422, f"{source}: empty pack name in {text!r}", param=source)
    if len(parts) > limit:
        raise APIError(
            422, f"{source}: at most {limit} packs per request, got {len(parts)}", param=source
        )
    try:
        refs = [PackRef.parse(p) for p in parts]
    except InvalidPackRefError as exc:
        raise APIError(422, f"{source}: {exc}", param=source) from exc
    if len({r.name for r in refs}) != len(refs):
        raise APIError(422, f"{source}: a pack is named twice in {text!r}", param=source)
    return refs


def packs_from_model(model: str, base: str, *, limit: int) -> list[PackRef]:
    """The packs named by an OpenAI `model` field; 404 when it names another base model."""
    name, sep, packs = model.partition(":")
    if name != base:
        raise APIError(
            404,
            f"model {model!r} is not served here; use {base!r} or '{base}:<pack>[@version]'",
            param="model",
        )
    return parse_pack_list(packs, limit=limit, source="model") if sep else []


def choose_packs(header: str | None, model: str | None, base: str, *, limit: int) -> list[PackRef]:
    """Packs from the header and/or the model field; both may name packs only if they agree."""
    from_header = parse_pack_list(header, limit=limit, source=PACK_HEADER) if header else []
    from_model = packs_from_model(model, base, limit=limit) if model else []
    if from_header and from_model and from_header != from_model:
        raise APIError(
            422, f"the {PACK_HEADER} header and the model field name different packs", param="model"
        )
    return from_header or from_model


def edits_header(labels: list[str]) -> dict[str, str]:
    """`pack@version:subject` labels, percent-encoded so any subject fits in a header."""
    return {EDITS_HEADER: ",".join(quote(label, safe="@:/ ") for label in labels)}
