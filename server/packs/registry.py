"""The live packs of a running server: which version of each name is live, which versions are
loaded in memory, and swapping in newly published versions.

Loading is idempotent (one load per version, however many requests ask at once) and bounded by
a memory budget with least-recently-used eviction; pinned names are never evicted. A request
holds the `LoadedPack` it resolved, so a swap or an eviction never changes a request in flight.

A version that fails validation (`PackError` from the store or against the backbone) is never
made live: the name keeps (or falls back to) its newest good version, the refusal is logged once
and remembered until the version's files change, so requests naming it get the same error at
once instead of re-reading the files in a loop.

Several servers can share one pack store: an activation (roll forward or back) is then recorded
in a `LiveVersions` record (the job store's database) that every `refresh` follows, so all of
them serve the same version within one poll, and a restart keeps it. As on one server, a
version published after the activation supersedes it. A recorded version that does not load is
tried again at the next refresh.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from server.gate.encoder import SentenceEncoder
from server.gate.table import GateTable
from server.model.backbone import Backbone
from server.packs.edit_set import EditSet, load_edit_set
from server.packs.errors import PackError, PackNotFoundError
from server.packs.format import Manifest
from server.packs.live import Activation, LiveVersions
from server.packs.names import PackRef, validate_name
from server.packs.store import FileSignature, PackStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedPack:
    ref: PackRef  # always with a version
    manifest: Manifest
    edit_set: EditSet
    nbytes: int
    load_seconds: float


@dataclass(frozen=True)
class Swap:
    name: str
    old: int | None
    new: int


@dataclass
class PackRegistry:
    store: PackStore
    backbone: Backbone
    memory_budget_bytes: int = 1 << 30
    pinned: frozenset[str] = frozenset()
    encoder_factory: Callable[[], SentenceEncoder] = SentenceEncoder
    live_record: LiveVersions | None = None  # None: this server alone decides
    _record_down: bool = False
    _loaded: OrderedDict[PackRef, LoadedPack] = field(default_factory=OrderedDict)
    _live: dict[str, int] = field(default_factory=dict)  # name -> the version new requests get
    _seen_latest: dict[str, int] = field(default_factory=dict)  # what the last refresh saw
    _loading: dict[PackRef, threading.Lock] = field(default_factory=dict)
    _refused: dict[PackRef, tuple[FileSignature, PackError]] = field(default_factory=dict)
    _lock: threading.RLock = field(default_factory=threading.RLock)
    _encoder: SentenceEncoder | None = None

    # -- resolving ---------------------------------------------------------------------------

    def live_version(self, name: str) -> int:
        """The version new requests get. On first use: the newest version that loads, so a
        broken latest version never becomes live in place of a good older one."""
        with self._lock:
            version = self._live.get(validate_name(name))
        if version is not None:
            return version
        versions = self.store.versions(name)
        if not versions:
            raise PackNotFoundError(f"no pack named {name!r} in {self.store.root}")
        recorded = self._recorded_version(name, versions)
        candidates = list(reversed(versions))
        if recorded in versions:  # the recorded version first, then the newest that loads
            candidates.remove(recorded)
            candidates.insert(0, recorded)
        first_error: PackError | None = None
        for candidate in candidates:
            try:
                self.get(PackRef(name, candidate))
            except PackError as exc:
                first_error = first_error or exc
                continue
            if candidate not in (versions[-1], recorded):
                log.error(
                    "pack %s: serving version %d, the newest that passes validation",
                    name,
                    candidate,
                )
            with self._lock:
                return self._live.setdefault(name, candidate)
        assert first_error is not None
        raise first_error

    def get(self, ref: PackRef) -> LoadedPack:
        """The loaded pack for `ref` (the live version when it names none), loading it once."""
        resolved = PackRef(ref.name, ref.version or self.live_version(ref.name))
        with self._lock:
            loaded = self._loaded.get(resolved)
            if loaded is not None:
                self._loaded.move_to_end(resolved)
                return loaded
            gate = self._loading.setdefault(resolved, threading.Lock())
        try:
            with gate:  # one thread loads; the others wait for it and find it loaded
                with self._lock:
                    loaded = self._loaded.get(resolved)
                if loaded is None:
                    loaded = self._load_checked(resolved)
                    with self._lock:
                        self._loaded[resolved] = loaded
                        self._evict()
        finally:
            with self._lock:
                self._loading.pop(resolved, None)
        return loaded

    def _load_checked(self, ref: PackRef) -> LoadedPack:
        """Load a version, or refuse it with the error remembered from the last attempt while
        its files are unchanged (a bad version is read and logged once, not per request)."""
        signature = self.store.signature(ref)
        with self._lock:
            refused = self._refused.get(ref)
        if refused is not None and refused[0] == signature:
            error = refused[1]
            raise type(error)(str(error))
        try:
            loaded = self._load(ref)
        except PackError as exc:
            with self._lock:
                self._refused[ref] = (signature, exc)
            log.error("pack %s refused, it will not go live: %s", ref, exc)
            raise
        with self._lock:
            self._refused.pop(ref, None)
        return loaded

    def _load(self, ref: PackRef) -> LoadedPack:
        started = time.perf_counter()
        pack = self.store.load(ref)
        gated = GateTable.in_tensors(pack.content.table)
        edit_set = load_edit_set(pack, self.backbone, self.gate_encoder() if gated else None)
        nbytes = sum(t.numel() * t.element_size() for t in pack.content.table.values())
        seconds = time.perf_counter() - started
        log.info(
            "loaded pack %s: %d subjects, %.1f MiB, %.2f s",
            ref,
            len(pack.content.subjects),
            nbytes / 2**20,
            seconds,
        )
        return LoadedPack(ref, pack.manifest, edit_set, nbytes, seconds)

    def gate_encoder(self) -> SentenceEncoder:
        """The one sentence encoder of this server (loaded on first use), shared with training."""
        with self._lock:
            if self._encoder is None:
                self._encoder = self.encoder_factory()
            return self._encoder

    def _evict(self) -> None:
        """Drop least recently used versions over budget; pinned names and live versions that
        were used last stay."""
        total = sum(p.nbytes for p in self._loaded.values())
        for ref in list(self._loaded):
            if total <= self.memory_budget_bytes or len(self._loaded) == 1:
                return
            if ref.name in self.pinned:
                continue
            total -= self._loaded.pop(ref).nbytes
            log.info(
                "evicted pack %s from memory (over the %d MiB budget)",
                ref,
                self.memory_budget_bytes // 2**20,
            )

    # -- administration ----------------------------------------------------------------------

    def activate(self, ref: PackRef) -> LoadedPack:
        """Make `ref` the live version of its name (roll forward or back); loads it first, then
        records it for every server (a failure to record fails the activation)."""
        assert ref.version is not None, "activate a concrete version"
        loaded = self.get(ref)
        if self.live_record is not None:
            newest = self.store.versions(ref.name)[-1]
            self.live_record.record_activation(ref.name, Activation(ref.version, newest))
        with self._lock:
            old = self._live.get(ref.name)
            self._live[ref.name] = ref.version
        log.info("pack %s: live version %s -> %d", ref.name, old, ref.version)
        return loaded

    def unload(self, name: str) -> list[int]:
        """Free every loaded version of `name`; it is loaded again if a request asks for it."""
        validate_name(name)
        with self._lock:
            dropped = [ref for ref in self._loaded if ref.name == name]
            for ref in dropped:
                del self._loaded[ref]
            self._live.pop(name, None)
            for ref in [ref for ref in self._refused if ref.name == name]:
                del self._refused[ref]  # an operator's way to have refused versions read again
        if not dropped and not self.store.versions(name):
            raise PackNotFoundError(f"no pack named {name!r}")
        return sorted(int(ref.version or 0) for ref in dropped)

    def loaded(self) -> list[LoadedPack]:
        with self._lock:
            return list(self._loaded.values())

    def live(self) -> dict[str, int]:
        with self._lock:
            return dict(self._live)

    @property
    def loaded_bytes(self) -> int:
        with self._lock:
            return sum(p.nbytes for p in self._loaded.values())

    def _recorded(self) -> dict[str, Activation]:
        """The recorded activations; none (this server's own view) while the record is
        unreachable."""
        if self.live_record is None:
            return {}
        try:
            activations = self.live_record.activations()
        except Exception as exc:
            if not self._record_down:  # once per outage, not once per poll
                log.warning("the live pack versions could not be read (%s); keeping ours", exc)
            self._record_down = True
            return {}
        if self._record_down:
            log.info("the live pack versions can be read again")
        self._record_down = False
        return activations

    def _recorded_version(
        self, name: str, versions: list[int], recorded: dict[str, Activation] | None = None
    ) -> int | None:
        """The activated version of `name`, unless a newer one was published since."""
        activation = (self._recorded() if recorded is None else recorded).get(name)
        if activation is None or activation.version not in versions:
            return None
        return activation.version if versions[-1] <= activation.newest else None

    def refresh(self) -> list[Swap]:
        """Look at the store and the live record: a recorded version, or else a newly
        published one, is loaded, then made live. Called by the watcher (blocking: run it off
        the event loop)."""
        swaps = []
        recorded = self._recorded()
        for name in self.store.names():
            versions = self.store.versions(name)
            if not versions:
                continue
            latest = versions[-1]
            with self._lock:
                seen = self._seen_latest.get(name)
                self._seen_latest[name] = latest
                in_use = name in self._live  # names nobody asked for yet load on first use
                current = self._live.get(name)
            if not in_use:
                continue
            target = self._recorded_version(name, versions, recorded)
            if target is not None:
                if target != current:
                    swaps += self._swap_to(name, target)
                continue
            if seen == latest:
                continue
            try:
                self.get(PackRef(name, latest))  # load before the swap: no request waits on it
            except PackError:  # refused and logged by get(); keep serving the old version
                with self._lock:
                    current = self._live.get(name)
                log.warning(
                    "pack %s: keeps version %s, %d was not swapped in", name, current, latest
                )
                continue
            except Exception as exc:  # a bad pack never goes live; keep serving the old one
                log.error("new version %s@%d not swapped in: %s", name, latest, exc)
                continue
            with self._lock:
                old = self._live.get(name)
                if old is None or latest > old:
                    self._live[name] = latest
                    if old is not None:
                        swaps.append(Swap(name, old, latest))
        for swap in swaps:
            log.info("pack %s: swapped in version %d (was %s)", swap.name, swap.new, swap.old)
        return swaps

    def _swap_to(self, name: str, version: int) -> list[Swap]:
        """Make the recorded `version` live here; on a load failure keep the current one (the
        next refresh tries again)."""
        try:
            self.get(PackRef(name, version))
        except Exception as exc:
            log.error("pack %s: recorded live version %d does not load: %s", name, version, exc)
            return []
        with self._lock:
            old = self._live.get(name)
            self._live[name] = version
        return [Swap(name, old, version)] if old is not None and old != version else []
