"""A real Directus 11 on a fresh PostGIS database, for the tests.

`.ci/run` installs Node 22 and Directus (pinned there) outside the clone and exports
``TPX_TEST_NODE`` (the Node 22 binary) and ``TPX_TEST_DIRECTUS_BIN`` (Directus's CLI entry,
``@directus/api/dist/cli/run.js``: the ``directus`` wrapper's update check would call
registry.npmjs.org). Without them, or without PostGIS on the test server, `unavailable()` says why
and the fixtures skip.

Directus only ever talks to loopback here: telemetry off (and its URLs pointed at a closed local
port, in case a report slips through), no AI/MCP, no app, no project owner (whose registration is
a network call). One instance costs three Node start-ups (bootstrap, schema apply, start), ~10 s
each on a loaded 2-core machine, so the fixture is session-scoped.

``python -m tests.directus snapshot`` regenerates ``deploy/directus/snapshot.yaml`` the way a
platform team would: it creates the collections through the REST API (`create_collections`) on a
bootstrapped Directus, then runs ``directus schema snapshot``.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

REPO = Path(__file__).resolve().parent.parent
SNAPSHOT = REPO / "deploy" / "directus" / "snapshot.yaml"
NO_POSTGIS_DDL = REPO / "deploy" / "directus" / "no-postgis.sql"

ADMIN_EMAIL = "admin@example.com"
#: The tests' own throwaway admin, on a database dropped afterwards.
ADMIN_PASSWORD = "tpx-test-admin"  # noqa: S105
#: Directus start-up (Node loading ~600 modules, migrations check) on a shared 2-core machine.
BOOT_TIMEOUT_S = 90.0
#: One CLI run (bootstrap: seeds and ~120 migrations; schema apply).
CLI_TIMEOUT_S = 180.0
#: One REST call on loopback.
HTTP_TIMEOUT_S = 30.0
#: A port nothing listens on: where a telemetry report would go if one slipped through.
CLOSED_LOOPBACK_URL = "http://127.0.0.1:9"


def unavailable(server_url: str) -> str | None:
    """Why the Directus tests cannot run here, or None when they can."""
    node, cli = os.environ.get("TPX_TEST_NODE"), os.environ.get("TPX_TEST_DIRECTUS_BIN")
    if not node or not cli:
        return "TPX_TEST_NODE / TPX_TEST_DIRECTUS_BIN not set (.ci/run installs Node 22 and Directus 11)"
    if not Path(node).is_file() or not Path(cli).is_file():
        return f"TPX_TEST_NODE={node} or TPX_TEST_DIRECTUS_BIN={cli} does not exist"
    return postgis_unavailable(server_url)


def postgis_unavailable(server_url: str) -> str | None:
    """Why PostGIS cannot be used on this server, or None when it can."""
    try:
        with psycopg.connect(server_url, connect_timeout=5) as conn:
            row = conn.execute("SELECT 1 FROM pg_available_extensions WHERE name = 'postgis'").fetchone()
    except psycopg.OperationalError as exc:
        return f"test PostgreSQL unreachable: {exc}"
    if row is None:
        return "PostGIS is not installed on the test server (.ci/run installs postgresql-15-postgis-3)"
    return None


def database_url(server_url: str, dbname: str) -> str:
    """``server_url`` with its database name replaced."""
    parts = urllib.parse.urlsplit(server_url)
    return urllib.parse.urlunsplit(parts._replace(path=f"/{dbname}"))


@contextlib.contextmanager
def fresh_database(server_url: str, *, postgis: bool) -> Iterator[str]:
    """A database of its own on the test server (superuser), dropped afterwards; yields its URL."""
    name = f"tpx_directus_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = database_url(server_url, name)
    try:
        if postgis:
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute("CREATE EXTENSION postgis")
        yield url
    finally:
        with psycopg.connect(server_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def directus_env(db_url: str, port: int, workdir: Path) -> dict[str, str]:
    """Environment for one Directus on ``db_url``, listening on 127.0.0.1:``port``, loopback only."""
    parts = urllib.parse.urlsplit(db_url)
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(workdir),
        "CONFIG_PATH": str(workdir / "directus.env"),  # never exists: no stray .env is read
        "DB_CLIENT": "pg",
        "DB_HOST": parts.hostname or "127.0.0.1",
        "DB_PORT": str(parts.port or 5432),
        "DB_DATABASE": parts.path.lstrip("/"),
        "DB_USER": urllib.parse.unquote(parts.username or "postgres"),
        "DB_PASSWORD": urllib.parse.unquote(parts.password or ""),
        "KEY": str(uuid.uuid4()),
        "SECRET": secrets.token_hex(32),
        "ADMIN_EMAIL": ADMIN_EMAIL,
        "ADMIN_PASSWORD": ADMIN_PASSWORD,
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "PUBLIC_URL": f"http://127.0.0.1:{port}",
        "TELEMETRY": "false",
        "TELEMETRY_URL": CLOSED_LOOPBACK_URL,
        "COMPLIANCE_URL": CLOSED_LOOPBACK_URL,
        "AI_ENABLED": "false",
        "MCP_ENABLED": "false",
        "SERVE_APP": "false",
        "WEBSOCKETS_ENABLED": "false",
        # A collection `schema apply` creates from another process is seen at once.
        "CACHE_SCHEMA": "false",
        "EXTENSIONS_PATH": str(workdir / "extensions"),
        "STORAGE_LOCAL_ROOT": str(workdir / "uploads"),
        "TEMP_PATH": str(workdir / "tmp"),
        # Node 22 caches compiled code here: each of the three start-ups loads ~600 modules.
        "NODE_COMPILE_CACHE": os.environ.get(
            "TPX_TEST_NODE_COMPILE_CACHE", str(Path(tempfile.gettempdir()) / "tpx-directus-compile-cache")
        ),
        "LOG_LEVEL": "info",
        "LOG_STYLE": "raw",
    }


@dataclass
class Directus:
    """A running Directus: its base URL, an admin access token, its database, and REST helpers."""

    url: str
    token: str
    db_url: str
    env: dict[str, str] = field(repr=False)
    workdir: Path = field(repr=False)

    def request(self, method: str, path: str, body: Any = None) -> Any:
        """One REST call; returns the reply's ``data`` (None for 204). HTTP errors carry the body."""
        return request(self.url, method, path, body, token=self.token)

    def post(self, collection: str, item: dict[str, Any]) -> dict[str, Any]:
        """Create one item through ``POST /items/<collection>``; returns it as Directus stored it."""
        result: dict[str, Any] = self.request("POST", f"/items/{collection}", item)
        return result

    def items(self, collection: str, **filters: Any) -> list[dict[str, Any]]:
        """``GET /items/<collection>`` with ``field=value`` equality filters, all pages, sorted by id."""
        query = {"limit": "-1", "sort": "id"}
        if filters:
            query["filter"] = json.dumps({k: {"_eq": v} for k, v in filters.items()})
        result: list[dict[str, Any]] = self.request(
            "GET", f"/items/{collection}?{urllib.parse.urlencode(query)}"
        )
        return result

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run the Directus CLI against this instance's database."""
        return run_cli(self.env, self.workdir, *args)


def request(base: str, method: str, path: str, body: Any = None, token: str | None = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data, method=method)  # noqa: S310 (loopback http)
    req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=HTTP_TIMEOUT_S) as reply:  # noqa: S310
            raw = reply.read()
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")
        raise AssertionError(f"Directus {method} {path}: HTTP {exc.code}: {detail}") from None
    return json.loads(raw)["data"] if raw else None


def run_cli(env: dict[str, str], workdir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``directus <args>`` with Node 22; fails with its output when it exits non-zero."""
    cmd = [os.environ["TPX_TEST_NODE"], os.environ["TPX_TEST_DIRECTUS_BIN"], *args]
    done = subprocess.run(cmd, env=env, cwd=workdir, capture_output=True, text=True, timeout=CLI_TIMEOUT_S)
    if done.returncode != 0:
        raise AssertionError(
            f"directus {' '.join(args)} exited {done.returncode}:\n"
            f"{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
        )
    return done


def health(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/server/health", timeout=2) as reply:  # noqa: S310
            return bool(reply.status == 200)
    except OSError:
        return False


@contextlib.contextmanager
def running(db_url: str, workdir: Path, *, snapshot: Path | None = SNAPSHOT) -> Iterator[Directus]:
    """Bootstrap Directus into ``db_url`` (applying ``snapshot`` when given), start it, log in."""
    from tests.helpers import free_port, wait_for

    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = directus_env(db_url, port, workdir)
    run_cli(env, workdir, "bootstrap")
    if snapshot is not None:
        run_cli(env, workdir, "schema", "apply", "--yes", str(snapshot))
    url = f"http://127.0.0.1:{port}"
    log_path = workdir / "directus.log"
    with log_path.open("w") as log_file:
        proc = subprocess.Popen(
            [os.environ["TPX_TEST_NODE"], os.environ["TPX_TEST_DIRECTUS_BIN"], "start"],
            env=env,
            cwd=workdir,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + BOOT_TIMEOUT_S
        while not health(url):
            if proc.poll() is not None:
                raise AssertionError(
                    f"directus start exited {proc.returncode}:\n{log_path.read_text()[-4000:]}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"Directus not healthy after {BOOT_TIMEOUT_S}s:\n{log_path.read_text()[-4000:]}"
                )
            time.sleep(0.2)
        login = wait_for(
            lambda: request(url, "POST", "/auth/login", {"email": ADMIN_EMAIL, "password": ADMIN_PASSWORD}),
            timeout=HTTP_TIMEOUT_S,
            what="Directus admin login",
        )
        yield Directus(url=url, token=login["access_token"], db_url=db_url, env=env, workdir=workdir)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --- the two collections of issue 16, created the way a platform team would (REST) ---


def _field(name: str, ftype: str, schema: dict[str, Any] | None = None, **meta: Any) -> dict[str, Any]:
    return {"field": name, "type": ftype, "schema": schema or {}, "meta": meta}


def _choice_field(name: str, values: tuple[str, ...], **meta: Any) -> dict[str, Any]:
    """A NOT NULL string out of ``values``: a dropdown in the app, validated by the API."""
    return _field(
        name,
        "string",
        {"is_nullable": False},
        interface="select-dropdown",
        options={"choices": [{"text": v, "value": v} for v in values]},
        validation={"_and": [{name: {"_in": list(values)}}]},
        **meta,
    )


GEOFENCES: dict[str, Any] = {
    "collection": "geofences",
    "meta": {"icon": "fence", "note": "Zones, gates and circles tpx times devices against"},
    "schema": {},
    "fields": [
        _field(
            "id", "integer", {"is_primary_key": True, "has_auto_increment": True}, hidden=True, readonly=True
        ),
        _field("name", "string", {"is_nullable": False}, interface="input", required=True),
        _choice_field(
            "kind",
            ("zone", "gate", "circle"),
            required=True,
            note="zone: Polygon/MultiPolygon; gate: LineString; circle: Point + radius_m",
        ),
        _field(
            "geometry",
            "geometry",
            {"is_nullable": False},
            interface="map",
            note="GeoJSON, longitude first (EPSG:4326)",
            required=True,
        ),
        _field("radius_m", "float", {}, interface="input", note="circles: radius in metres"),
        _field(
            "exit_margin_m",
            "float",
            {"default_value": 0, "is_nullable": False},
            interface="input",
            note="a device leaves only beyond the area grown by this many metres",
        ),
        _field("active", "boolean", {"default_value": True, "is_nullable": False}, interface="boolean"),
        _field(
            "date_updated",
            "timestamp",
            {},
            special=["date-updated"],
            interface="datetime",
            readonly=True,
            hidden=True,
        ),
    ],
}

#: Latitude/longitude: Directus 11 has no double type (its `float` is PostgreSQL `real`, ~1e-5° at
#: 180°); `decimal` with scale 7 is exact to 1e-7° (~1 cm), precision 10 fits ±180.0000000.
COORDINATE = {"numeric_precision": 10, "numeric_scale": 7, "is_nullable": False}

TIMING_RECORDS: dict[str, Any] = {
    "collection": "timing_records",
    "meta": {"icon": "timer", "note": "Written by tpx (in SQL): enter/exit/cross events per device"},
    "schema": {},
    "fields": [
        # No default: tpx fills it deterministically (a replay writes the same id); Directus
        # generates one itself for items created through its API (special uuid).
        _field("id", "uuid", {"is_primary_key": True}, special=["uuid"], hidden=True, readonly=True),
        # Indexed: tpx rehydrates a device from its newest records.
        _field("device_id", "string", {"is_nullable": False, "is_indexed": True}, interface="input"),
        _choice_field("event", ("enter", "exit", "cross")),
        _field(
            "ts",
            "timestamp",
            {"is_nullable": False, "is_indexed": True},
            interface="datetime",
            note="when the event happened",
        ),
        _field("latitude", "decimal", COORDINATE, interface="input"),
        _field("longitude", "decimal", COORDINATE, interface="input"),
        _field("speed", "float", {}, interface="input", note="km/h"),
        _field(
            "direction", "integer", {}, interface="input", note="gates: 1 left to right, -1 right to left"
        ),
        _field("uncertainty_s", "float", {}, interface="input", note="seconds between the two fixes"),
        _field(
            "date_created",
            "timestamp",
            {},
            special=["date-created"],
            interface="datetime",
            readonly=True,
            hidden=True,
        ),
    ],
}

GEOFENCE_FIELD = _field(
    "geofence", "integer", {"is_nullable": False}, interface="select-dropdown-m2o", special=["m2o"]
)
GEOFENCE_RELATION = {
    "collection": "timing_records",
    "field": "geofence",
    "related_collection": "geofences",
    "schema": {"on_delete": "RESTRICT"},
}


def create_collections(directus: Directus) -> None:
    """The two collections of issue 16, through Directus's REST API."""
    directus.request("POST", "/collections", GEOFENCES)
    directus.request("POST", "/collections", TIMING_RECORDS)
    directus.request("POST", "/fields/timing_records", GEOFENCE_FIELD)
    directus.request("POST", "/relations", GEOFENCE_RELATION)


def regenerate_snapshot(server_url: str, out: Path = SNAPSHOT) -> None:
    """Bootstrap a Directus on a fresh database, create the collections, write its snapshot."""
    with (
        fresh_database(server_url, postgis=True) as db_url,
        tempfile.TemporaryDirectory() as tmp,
        running(db_url, Path(tmp), snapshot=None) as directus,
    ):
        create_collections(directus)
        target = Path(tmp) / "snapshot.yaml"
        directus.cli("schema", "snapshot", "--yes", "--format", "yaml", str(target))
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(target, out)


if __name__ == "__main__":
    if sys.argv[1:] != ["snapshot"]:
        sys.exit(
            "usage: python -m tests.directus snapshot"
            "   (needs TPX_TEST_DATABASE_URL, TPX_TEST_NODE, TPX_TEST_DIRECTUS_BIN)"
        )
    server = os.environ["TPX_TEST_DATABASE_URL"]
    reason = unavailable(server)
    if reason:
        sys.exit(reason)
    regenerate_snapshot(server)
    print(f"wrote {SNAPSHOT}")
