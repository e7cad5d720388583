"""Prometheus metrics (`GET /metrics`), one registry per app (no process-global state).

Names follow the project's conventions (`lks_` prefix, base units, `_total` counters); label
values are bounded: endpoint templates, status codes, pack names of loaded packs, job states.
Gauges that mirror state (queue, loaded packs) are read at scrape time from the callables the
app passes to `watch` (this module knows nothing of the server's state); the job counts come from
the database, so a scrape reads the last counts a background thread fetched and never waits on it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass

from fastapi import FastAPI, Request, Response
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128)
TRAINING_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1200, 2400, 4800)
JOB_COUNTS_MAX_AGE_SECONDS = 5.0


@dataclass(frozen=True)
class ServingStats:
    """The engine's and the pack registry's figures at one instant."""

    waiting: int
    running: int
    in_flight: int
    packs_loaded: int
    pack_bytes: int
    client_disconnects: int


ServingStatsSource = Callable[[], ServingStats | None]  # None: nothing serves yet
JobCountsSource = Callable[[], dict[str, int]]  # blocking (a database query)


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "lks_requests",
            "HTTP requests by endpoint and status",
            ["endpoint", "status"],
            registry=r,
        )
        self.request_duration = Histogram(
            "lks_request_duration_seconds",
            "HTTP request latency",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.time_to_first_token = Histogram(
            "lks_time_to_first_token_seconds",
            "From admission request to the first text",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.generated_tokens = Counter("lks_generated_tokens", "Tokens generated", registry=r)
        self.prompt_tokens = Counter("lks_prompt_tokens", "Prompt tokens prefilled", registry=r)
        self.batch_size = Histogram(
            "lks_batch_size",
            "Rows per decode step",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
            registry=r,
        )
        self.edits_applied = Counter(
            "lks_edits_applied", "Edits applied to requests, per pack", ["pack"], registry=r
        )
        self.edits_released = Counter(
            "lks_edits_released",
            "Edits released once the answer said their target, per pack",
            ["pack"],
            registry=r,
        )
        self.pack_swaps = Counter("lks_pack_swaps", "Live pack versions replaced", registry=r)
        self.training_duration = Histogram(
            "lks_training_duration_seconds",
            "Training jobs run by this process, start to end",
            buckets=TRAINING_BUCKETS,
            registry=r,
        )
        self.job_failures = Counter(
            "lks_job_failures", "Jobs of this process that failed", registry=r
        )

    def observe_job(self, succeeded: bool, seconds: float) -> None:
        self.training_duration.observe(seconds)
        if not succeeded:
            self.job_failures.inc()

    def watch(self, serving: ServingStatsSource, job_counts: JobCountsSource) -> None:
        """Report the figures these return at each scrape (`job_counts` from a thread)."""
        self.registry.register(_StatsCollector(serving, JobCounts(job_counts)))

    def install(self, app: FastAPI) -> None:
        """Count every request by its route template, and serve `/metrics`."""

        @app.middleware("http")
        async def _count(
            request: Request, call_next: Callable[[Request], Awaitable[Response]]
        ) -> Response:
            started = time.perf_counter()
            response = await call_next(request)
            route = request.scope.get("route")
            endpoint = getattr(route, "path", "unmatched")
            self.requests.labels(endpoint, str(response.status_code)).inc()
            self.request_duration.labels(endpoint).observe(time.perf_counter() - started)
            return response

        @app.get("/metrics", include_in_schema=False)
        async def _metrics() -> Response:
            return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)


class JobCounts:
    """The job store's counts by state, as last fetched off the event loop. A scrape that finds
    them older than `max_age` starts one fetch in a thread and answers with what it has: a slow
    or unreachable database never holds up `/metrics` (nor, through it, the event loop)."""

    def __init__(self, fetch: JobCountsSource, max_age: float = JOB_COUNTS_MAX_AGE_SECONDS) -> None:
        self.fetch = fetch
        self.max_age = max_age
        self._counts: dict[str, int] = {}
        self._fetched_at = float("-inf")
        self._fetching = threading.Lock()

    def read(self) -> dict[str, int]:
        stale = time.monotonic() - self._fetched_at > self.max_age
        if stale and self._fetching.acquire(blocking=False):
            threading.Thread(target=self._fetch, name="lks-metrics-jobs", daemon=True).start()
        return self._counts

    def _fetch(self) -> None:
        try:
            self._counts = self.fetch()
        except Exception as exc:  # no figures rather than stale ones while the database is down
            log.warning("job counts for /metrics unavailable: %s", exc)
            self._counts = {}
        finally:
            self._fetched_at = time.monotonic()
            self._fetching.release()


class _StatsCollector(Collector):
    """Gauges read from the stats sources at scrape time."""

    def __init__(self, serving: ServingStatsSource, job_counts: JobCounts) -> None:
        self.serving = serving
        self.job_counts = job_counts

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        stats = self.serving()
        queue = GaugeMetricFamily("lks_queue_depth", "Requests by where they are", labels=["where"])
        packs = GaugeMetricFamily("lks_packs_loaded", "Pack versions loaded in memory")
        memory = GaugeMetricFamily("lks_pack_memory_bytes", "Memory of loaded pack versions")
        if stats is not None:
            queue.add_metric(["waiting"], float(stats.waiting))
            queue.add_metric(["running"], float(stats.running))
            queue.add_metric(["in_flight"], float(stats.in_flight))
            packs.add_metric([], float(stats.packs_loaded))
            memory.add_metric([], float(stats.pack_bytes))
        disconnects = CounterMetricFamily(
            "lks_client_disconnects", "Generations cancelled because the client left"
        )
        disconnects.add_metric([], float(stats.client_disconnects if stats else 0))
        yield queue
        yield packs
        yield memory
        yield disconnects
        jobs = GaugeMetricFamily("lks_jobs", "Jobs in the store by state", labels=["state"])
        for job_state, count in self.job_counts.read().items():
            jobs.add_metric([job_state], float(count))
        yield jobs
