"""The files that deploy tpx where no Docker engine runs here: validated as far as this machine can.

What is checked: the wheel carries the migrations, the demo's CMS tables and the dashboard's
styles; the Dockerfile's entrypoint, health check, port, signal and user; the compose file's
services and settings; the Grafana dashboard's and the Prometheus config's metrics; the CI
workflow runs README's test command.
What is not: building the image and starting the stack (no Docker engine on this machine).
"""

from __future__ import annotations

import importlib
import json
import re
import shlex
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
import yaml

from tpx.config import Settings, load
from tpx.course import PACKAGED_DDL

ROOT = Path(__file__).resolve().parent.parent
FIELDS = {f"TPX_{name.upper()}" for name in Settings.model_fields}


def dockerfile() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    out = []
    for raw in text.splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


@pytest.mark.slow  # builds a wheel: pip and hatchling in a subprocess
@pytest.mark.timeout(300)
def test_wheel_carries_migrations_and_styles(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=280,
    )
    wheel = next(tmp_path.glob("tpx-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    migrations = {p.name for p in (ROOT / "sql").glob("*.sql")}
    assert {f"tpx/sql/{m}" for m in migrations} <= names
    assert "tpx/tui/top.tcss" in names
    assert f"tpx/{PACKAGED_DDL}" in names  # `tpx demo`'s CMS tables, where tpx/course.py reads them
    assert not any(n.startswith("tpx/sql/") and "postgis" in n for n in names)  # never a migration
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "tpx = tpx.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
    assert {"tpx/cli/__init__.py", "tpx/cli/app.py"} <= names


def test_console_script_names_the_cli_main() -> None:
    """`tpx` (the console script) and `python -m tpx` run the same app."""
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, attr = scripts["tpx"].partition(":")
    main = getattr(importlib.import_module(module), attr)
    assert callable(main)
    assert "from tpx.cli import main" in (ROOT / "tpx" / "__main__.py").read_text()
    run = subprocess.run(
        [
            sys.executable,
            "-c",
            f"import sys; sys.argv = ['tpx', '--version']; from {module} import {attr}; {attr}()",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0 and run.stdout.startswith("tpx "), run


def test_dockerfile() -> None:
    instructions = dockerfile()
    froms = [rest for word, rest in instructions if word == "FROM"]
    assert len(froms) >= 2 and " AS " in froms[0].upper(), "multi-stage build"
    for word, rest in instructions:
        if word == "COPY" and not rest.startswith("--from"):
            for source in rest.split()[:-1]:
                assert (ROOT / source).exists(), source
    user = [rest for word, rest in instructions if word == "USER"][-1]
    assert user not in ("root", "0")
    assert ("STOPSIGNAL", "SIGTERM") in instructions
    env = " ".join(rest for word, rest in instructions if word == "ENV")
    port = re.search(r"TPX_HTTP_ADDR=\S+:(\d+)", env)
    assert port is not None
    assert ("EXPOSE", port.group(1)) in instructions
    health = next(rest for word, rest in instructions if word == "HEALTHCHECK")
    assert f"127.0.0.1:{port.group(1)}/healthz" in health
    entrypoint = json.loads(next(rest for word, rest in instructions if word == "ENTRYPOINT"))
    assert entrypoint == ["tpx", "serve"]
    help_run = subprocess.run(
        [sys.executable, "-m", "tpx", *entrypoint[1:], "--help"], capture_output=True, text=True, timeout=60
    )
    assert help_run.returncode == 0
    for assignment in re.findall(r"(TPX_\w+)=", env):
        assert assignment in FIELDS, assignment


def test_compose_file() -> None:
    compose = yaml.safe_load((ROOT / "deploy/compose.yaml").read_text())
    services = compose["services"]
    assert {"redis", "timescaledb", "tpx-1", "tpx-2", "prometheus", "grafana"} <= set(services)
    assert "timescale" in services["timescaledb"]["image"]
    for name in ("tpx-1", "tpx-2"):
        svc = services[name]
        assert svc["restart"] == "on-failure"
        env = svc["environment"]
        assert {k for k in env if k.startswith("TPX_")} <= FIELDS
        assert env["TPX_CONSUMER"] == name
        assert env["TPX_DATABASE_URL"].startswith("postgresql://")
    consumers = {services[n]["environment"]["TPX_CONSUMER"] for n in ("tpx-1", "tpx-2")}
    assert len(consumers) == 2
    mounts = " ".join(services["prometheus"]["volumes"] + services["grafana"]["volumes"])
    for path in re.findall(r"\./([\w/.-]+):", mounts):
        assert (ROOT / "deploy" / path).exists(), path
    prometheus = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    targets = prometheus["scrape_configs"][0]["static_configs"][0]["targets"]
    assert targets == ["tpx-1:9108", "tpx-2:9108"]
    domain = services["tpx-domain"]  # TPX_DOMAIN_DEFER's worker, scraped as a job of its own
    assert (domain["entrypoint"], domain["profiles"]) == (["tpx", "domain"], ["defer"])
    assert prometheus["scrape_configs"][1]["static_configs"][0]["targets"] == ["tpx-domain:9108"]
    assert prometheus["rule_files"] == ["/etc/prometheus/alerts.yml"]


def test_env_example_is_valid_configuration() -> None:
    values = dict(
        line.split("=", 1)
        for line in (ROOT / "deploy/.env.example").read_text().splitlines()
        if line and not line.startswith("#")
    )
    tpx_values = {k: v for k, v in values.items() if k.startswith("TPX_") and k != "TPX_IMAGE"}
    assert set(tpx_values) <= FIELDS
    load(**{k.removeprefix("TPX_").lower(): v for k, v in tpx_values.items()})


def test_grafana_dashboard_uses_documented_metrics() -> None:
    dashboard = json.loads((ROOT / "deploy/grafana/dashboards/tpx.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    titles = " ".join(p["title"] for p in dashboard["panels"]).lower()
    for needed in ("throughput", "lag", "pending", "dead letters", "latency", "per instance"):
        assert needed in titles, needed
    documented = set(re.findall(r"`(tpx_[a-z_]+)", (ROOT / "OPERATIONS.md").read_text()))
    for metric in {m for e in exprs for m in re.findall(r"\btpx_[a-z_]+", e)}:
        base = re.sub(r"_(bucket|sum|count)$", "", metric)
        assert metric in documented or base in documented, metric


def test_ci_workflow_runs_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- test-command -->\s*```sh\n(.*?)\n```", readme, re.S)
    assert block is not None
    command = block.group(1).strip()
    workflow = yaml.safe_load((ROOT / ".gitea/workflows/ci.yml").read_text())
    runs = [step.get("run", "").strip() for job in workflow["jobs"].values() for step in job["steps"]]
    assert command in runs
    assert shlex.split(command)[-2:] == [".venv/bin/pytest", "-q"]


def test_the_contract_in_the_repository_is_the_shared_one() -> None:
    """docs/CONTRACT.md is what a clone reads; where the platform's shared copy is beside the
    checkout (../shared/CONTRACT.md, as on the project machines), the two are identical."""
    ours = ROOT / "docs" / "CONTRACT.md"
    assert ours.is_file()
    shared = ROOT.parent / "shared" / "CONTRACT.md"
    if not shared.is_file():
        pytest.skip("no ../shared/CONTRACT.md beside this checkout to compare with")
    assert ours.read_text() == shared.read_text(), "docs/CONTRACT.md differs from ../shared/CONTRACT.md"
