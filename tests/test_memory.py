"""Memory is bounded by bytes, not by record count (issue 13, item 7)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import redis

from tests.helpers import NOW_MS, Serve, add_entries, drained, record, wait_for, xrange
from tests.test_pipeline import running
from tpx.config import Settings


def big_record(device: str, ts: int, size: int) -> dict[str, str]:
    """A valid entry whose ``record`` field is about ``size`` bytes (one long io string)."""
    return record(device, ts=ts, io={"blob": "x" * size})


def test_a_record_above_the_max_size_is_dead_lettered_and_its_neighbours_written(
    settings: Settings, rclient: redis.Redis
) -> None:
    s = settings.model_copy(update={"max_record_bytes": 10_000})
    entries = [record("m", ts=NOW_MS - 1000 + i) for i in range(20)]
    entries[7] = big_record("m", NOW_MS - 5000, 20_000)
    size = len(entries[7]["record"].encode())
    add_entries(rclient, s.stream, entries)
    with running(s) as engine:
        wait_for(lambda: drained(rclient, s, 19), what="19 rows, nothing pending")
        assert engine.metrics.count(engine.metrics.dead_lettered, stage="decode") == 1
    [(_, letter)] = xrange(rclient, s.dlq_stream)
    assert letter[b"dlq_stage"] == b"decode"
    assert letter[b"dlq_error"].decode() == (
        f"record is {size} bytes, more than the 10000 allowed (TPX_MAX_RECORD_BYTES)"
    )
    assert letter[b"record"] == entries[7]["record"].encode()  # kept verbatim


def vm_hwm_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc/<pid>/status")


def documented_bound(s: Settings) -> int:
    from tpx.engine.budget import memory_bound

    return memory_bound(s)


@pytest.mark.slow
@pytest.mark.parametrize("pending", [False, True], ids=["new", "pending-after-a-crash"])
def test_peak_rss_stays_under_the_documented_bound_with_large_records(
    settings: Settings, serve_env: dict[str, str], rclient: redis.Redis, tmp_path: Path, pending: bool
) -> None:
    """40 valid records of 4 MB each (160 MB), read by a real `tpx serve` with small budgets, as
    new entries or as its own pending ones (what it re-reads after an OOM kill): the peak RSS
    (VmHWM) stays under README's bound for these settings."""
    limits = {"max_record_bytes": 8 << 20, "page_bytes": 8 << 20, "queue_bytes": 8 << 20}
    s = settings.model_copy(update=limits)
    env = {**serve_env, **{f"TPX_{k.upper()}": str(v) for k, v in limits.items()}}
    add_entries(rclient, s.stream, [big_record(f"big-{i}", NOW_MS - 100_000 + i, 4 << 20) for i in range(40)])
    if pending:  # delivered to this consumer before it died: the re-read at start finds them
        rclient.xgroup_create(s.stream, s.group, id="0")
        rclient.xreadgroup(s.group, env["TPX_CONSUMER"], {s.stream: ">"}, count=1000)
    serve = Serve(env, tmp_path / "serve.log").start()
    try:
        assert serve.proc is not None
        wait_for(lambda: serve.get("/healthz")[0] == 200, timeout=30, what="tpx serve up")
        wait_for(lambda: drained(rclient, s, 40), timeout=90, what="40 large rows written")
        peak = vm_hwm_bytes(serve.proc.pid)
    finally:
        assert serve.stop() == 0, serve.logs()
    bound = documented_bound(s)
    print(json.dumps({"peak_rss_mb": peak >> 20, "bound_mb": bound >> 20}))
    assert peak <= bound, (peak >> 20, bound >> 20)
