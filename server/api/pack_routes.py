"""Pack administration: what is in the store, what is live and loaded, roll forward or back.

A key sees and manages only the packs its allow-list names, whatever its role."""

from __future__ import annotations

import asyncio
from datetime import datetime

from fastapi import APIRouter, Depends
from pydantic import BaseModel

from server.api.state import CallerDep, RuntimeDep, StateDep, get_caller
from server.packs.errors import PackNotFoundError
from server.packs.names import PackRef, validate_name, validate_version

router = APIRouter(prefix="/v1/packs", tags=["packs"], dependencies=[Depends(get_caller)])


class PackSummary(BaseModel):
    name: str
    versions: list[int]
    live_version: int | None
    loaded_versions: list[int]


class PackVersion(BaseModel):
    version: int
    created: datetime
    subject_count: int
    fact_count: int
    metrics: dict[str, float]
    live: bool
    loaded: bool


class PackDetail(BaseModel):
    name: str
    live_version: int | None
    versions: list[PackVersion]


class Unloaded(BaseModel):
    name: str
    unloaded_versions: list[int]


def _loaded_versions(runtime: RuntimeDep, name: str) -> list[int]:
    return sorted(int(p.ref.version or 0) for p in runtime.registry.loaded() if p.ref.name == name)


@router.get("", response_model=list[PackSummary])
async def list_packs(runtime: RuntimeDep, state: StateDep, caller: CallerDep) -> list[PackSummary]:
    """The packs in the store that the caller's key may use."""
    caller.require("read")
    live = runtime.registry.live()
    return [
        PackSummary(
            name=name,
            versions=state.store.versions(name),
            live_version=live.get(name) or (state.store.versions(name) or [None])[-1],
            loaded_versions=_loaded_versions(runtime, name),
        )
        for name in state.store.names()
        if caller.allows(name)
    ]


@router.get("/{name}", response_model=PackDetail)
async def show_pack(
    name: str, runtime: RuntimeDep, state: StateDep, caller: CallerDep
) -> PackDetail:
    caller.require("read", [validate_name(name)])
    versions = state.store.versions(validate_name(name))
    if not versions:
        raise PackNotFoundError(f"no pack named {name!r}")
    live = runtime.registry.live().get(name, versions[-1])
    loaded = set(_loaded_versions(runtime, name))
    manifests = [state.store.manifest(PackRef(name, v)) for v in versions]
    return PackDetail(
        name=name,
        live_version=live,
        versions=[
            PackVersion(
                version=m.version,
                created=m.created,
                subject_count=m.subject_count,
                fact_count=m.fact_count,
                metrics=m.metrics,
                live=m.version == live,
                loaded=m.version in loaded,
            )
            for m in manifests
        ],
    )


@router.post("/{name}/versions/{version}:activate", response_model=PackSummary)
async def activate_version(
    name: str, version: str, runtime: RuntimeDep, state: StateDep, caller: CallerDep
) -> PackSummary:
    """Make a version live for new requests (roll forward or back); requests in flight keep
    the version they started with."""
    caller.require("admin", [validate_name(name)])
    ref = state.store.resolve(PackRef(validate_name(name), validate_version(version)))
    await asyncio.to_thread(runtime.registry.activate, ref)
    state.metrics.pack_swaps.inc()
    return PackSummary(
        name=name,
        versions=state.store.versions(name),
        live_version=ref.version,
        loaded_versions=_loaded_versions(runtime, name),
    )


@router.delete("/{name}", response_model=Unloaded)
async def unload_pack(name: str, runtime: RuntimeDep, caller: CallerDep) -> Unloaded:
    """Free a pack's memory; it stays in the store and loads again when asked for."""
    caller.require("admin", [validate_name(name)])
    return Unloaded(name=name, unloaded_versions=runtime.registry.unload(name))
