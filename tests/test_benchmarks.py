"""The benchmark scripts run from a clean checkout and report what README's speed table quotes.

A smoke run on a few thousand records: it checks the scripts work and that each contender
wrote exactly its input (the scripts assert it), not how fast anything is.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent


pytestmark = pytest.mark.slow  # a smoke run of the benchmark script, in a subprocess


def bench(script: str, redis_url: str, database_url: str, *args: str) -> dict[str, Any]:
    """A benchmark script's JSON summary, run against the test servers (it exited 0)."""
    run = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / script),
            *args,
            *("--redis-url", redis_url, "--database-url", database_url),
        ],
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    summary: dict[str, Any] = json.loads(run.stdout)
    return summary


def test_pipeline_benchmark_reports_every_contender(redis_server_url: str, pg_server_url: str) -> None:
    summary = bench(
        "bench_pipeline.py",
        redis_server_url,
        pg_server_url,
        *("--records", "3000", "--devices", "40", "--json"),
    )
    assert set(summary["rates"]) == {"tpx", "naive", "db"}
    assert all(rate > 0 for rate in summary["rates"].values())
    assert summary["tpx_vs_naive"] > 0 and summary["tpx_vs_db_alone"] > 0
    for contender in ("tpx", "naive", "db"):
        cpu = summary["cpu_us_per_record"][contender]
        assert set(cpu) == {"client", "postgres", "redis"} and cpu["client"] > 0


def test_domain_pipeline_benchmark_runs_tpx_with_the_domain_off_and_on(
    redis_server_url: str, pg_server_url: str
) -> None:
    summary = bench(
        "bench_domain_pipeline.py",
        redis_server_url,
        pg_server_url,
        *("--devices", "200", "--rounds", "3", "--geofences", "50", "--repeat", "1"),
    )
    assert summary["records"] == 800 and summary["geofences"] == 50
    assert summary["rates_off"][0] > 0 and summary["rates_on"][0] > 0
    assert summary["cpu_us_on"]["client"] > 0
