"""Exit codes that tell the restart policy the truth: 2 "fix the setup", 3 "retry later".

Each case runs the real command against the real servers and checks the code and the one line
the operator reads (no traceback, no password).
"""

from __future__ import annotations

import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from tests.helpers import Serve
from tests.test_serve import tpx
from tpx.config import Settings

pytestmark = pytest.mark.slow


def with_dsn(dsn: str, **changes: str) -> str:
    """The same server, another database, user or port."""
    return make_conninfo("", **{**conninfo_to_dict(dsn), **changes})


def one_line(out: str, needle: str) -> None:
    lines = [line for line in out.splitlines() if line.startswith("tpx: ")]
    assert len(lines) == 1, out
    assert needle in lines[0], out
    assert "Traceback" not in out, out


def serve_exit(env: dict[str, str], log: Path) -> tuple[int, str]:
    serve = Serve(env, log).start()
    code = serve.wait(30)
    return code, serve.logs()


@pytest.fixture
def missing_database(settings: Settings) -> str:
    return with_dsn(settings.database_url, dbname=f"tpx_missing_{uuid.uuid4().hex[:8]}")


@pytest.fixture
def missing_role(settings: Settings) -> str:
    return with_dsn(settings.database_url, user=f"tpx_nobody_{uuid.uuid4().hex[:8]}", password="s3cret")  # noqa: S106 (must not leak)


@pytest.fixture
def closed_port_dsn(settings: Settings) -> Iterator[str]:
    with socket.socket() as sock:  # a port nothing listens on: bound, never listening
        sock.bind(("127.0.0.1", 0))
        yield with_dsn(settings.database_url, host="127.0.0.1", port=str(sock.getsockname()[1]))


# --- PostgreSQL refuses: the setup is wrong (2) ---------------------------------


def test_serve_against_a_missing_database_exits_2(
    serve_env: dict[str, str], missing_database: str, tmp_path: Path
) -> None:
    code, out = serve_exit({**serve_env, "TPX_DATABASE_URL": missing_database}, tmp_path / "serve.log")
    assert code == 2, out
    one_line(out, 'database "tpx_missing_')
    assert "fix TPX_DATABASE_URL" in out


def test_migrate_against_a_missing_database_exits_2(settings: Settings, missing_database: str) -> None:
    result = tpx("migrate", "--database-url", missing_database, "--db-schema", settings.db_schema)
    assert result.returncode == 2, result
    one_line(result.stderr, 'database "tpx_missing_')


def test_serve_with_a_missing_role_exits_2(
    serve_env: dict[str, str], missing_role: str, tmp_path: Path
) -> None:
    code, out = serve_exit({**serve_env, "TPX_DATABASE_URL": missing_role}, tmp_path / "serve.log")
    assert code == 2, out
    one_line(out, 'role "tpx_nobody_')
    assert "s3cret" not in out


def test_migrate_with_a_missing_role_exits_2(settings: Settings, missing_role: str) -> None:
    result = tpx("migrate", "--database-url", missing_role, "--db-schema", settings.db_schema)
    assert result.returncode == 2, result
    one_line(result.stderr, 'role "tpx_nobody_')
    assert "s3cret" not in result.stderr


# --- PostgreSQL does not answer: retry later (3) --------------------------------


def test_serve_against_a_closed_port_exits_3(
    serve_env: dict[str, str], closed_port_dsn: str, tmp_path: Path
) -> None:
    code, out = serve_exit({**serve_env, "TPX_DATABASE_URL": closed_port_dsn}, tmp_path / "serve.log")
    assert code == 3, out
    one_line(out, "cannot reach PostgreSQL")


def test_migrate_against_a_closed_port_exits_3(settings: Settings, closed_port_dsn: str) -> None:
    result = tpx("migrate", "--database-url", closed_port_dsn, "--db-schema", settings.db_schema)
    assert result.returncode == 3, result
    one_line(result.stderr, "cannot reach PostgreSQL")


# --- the rest of the setup ------------------------------------------------------


def test_taken_http_port_exits_2(serve_env: dict[str, str], tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        code, out = serve_exit({**serve_env, "TPX_HTTP_ADDR": f"127.0.0.1:{port}"}, tmp_path / "serve.log")
    assert code == 2, out
    one_line(out, f"cannot listen on 127.0.0.1:{port}")


def test_stream_key_holding_a_string_exits_2(
    settings: Settings, rclient: redis.Redis, serve_env: dict[str, str], tmp_path: Path
) -> None:
    rclient.set(settings.stream, "not a stream")
    code, out = serve_exit(serve_env, tmp_path / "serve.log")
    assert code == 2, out
    one_line(out, "WRONGTYPE")
