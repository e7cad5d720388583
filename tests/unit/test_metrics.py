"""`/metrics` figures come from the stats sources the app passes in, read at scrape time."""

from __future__ import annotations

import threading
import time

from prometheus_client import generate_latest

from server.api.metrics import ServerMetrics, ServingStats


def scrape(metrics: ServerMetrics) -> str:
    return generate_latest(metrics.registry).decode()


def test_gauges_read_the_stats_sources_at_each_scrape() -> None:
    stats: list[ServingStats | None] = [None]
    metrics = ServerMetrics()
    metrics.watch(lambda: stats[0], dict)
    before = scrape(metrics)
    assert "lks_queue_depth{" not in before  # nothing serves yet: no figures, not zeros
    assert "lks_client_disconnects_total 0.0" in before
    stats[0] = ServingStats(
        waiting=3, running=2, in_flight=5, packs_loaded=1, pack_bytes=4096, client_disconnects=7
    )
    after = scrape(metrics)
    assert 'lks_queue_depth{where="waiting"} 3.0' in after
    assert 'lks_queue_depth{where="running"} 2.0' in after
    assert 'lks_queue_depth{where="in_flight"} 5.0' in after
    assert "lks_packs_loaded 1.0" in after and "lks_pack_memory_bytes 4096.0" in after
    assert "lks_client_disconnects_total 7.0" in after


def test_job_counts_are_fetched_off_the_scrape() -> None:
    """A slow database never holds up a scrape: it answers with what it has, and the counts
    a background fetch brought appear in a later one."""
    release = threading.Event()

    def slow_counts() -> dict[str, int]:
        release.wait(10)
        return {"queued": 2}

    metrics = ServerMetrics()
    metrics.watch(lambda: None, slow_counts)
    started = time.monotonic()
    assert 'lks_jobs{state="queued"}' not in scrape(metrics)
    assert time.monotonic() - started < 5, "the scrape waited for the database"
    release.set()
    deadline = time.monotonic() + 10
    while 'lks_jobs{state="queued"} 2.0' not in scrape(metrics):
        assert time.monotonic() < deadline, "the fetched counts never appeared"
        time.sleep(0.01)
