"""TPX_HTTP_TOKEN: live positions (/devices/*) need a bearer token; metrics stay open unless
TPX_HTTP_TOKEN_METRICS; the probes always answer; the token never reaches a log or `tpx config`."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.helpers import Serve, wait_for
from tpx.cli import app

pytestmark = pytest.mark.slow

TOKEN = "s3cr3t-t0ken-value"  # noqa: S105 (a test token)


def get(serve: Serve, path: str, token: str | None = None) -> int:
    request = urllib.request.Request(f"http://127.0.0.1:{serve.port}{path}")
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:  # noqa: S310 (http:// built here)
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:  # not listening yet
        return 0


@pytest.mark.parametrize("metrics_too", [False, True])
def test_devices_need_the_token(serve_env: dict[str, str], tmp_path: Path, metrics_too: bool) -> None:
    env = {**serve_env, "TPX_HTTP_TOKEN": TOKEN, "TPX_HTTP_TOKEN_METRICS": str(metrics_too).lower()}
    serve = Serve(env, tmp_path / "serve.log").start()
    try:
        wait_for(lambda: get(serve, "/readyz") == 200, what="ready")  # the probes stay open
        assert get(serve, "/healthz") == 200
        assert get(serve, "/devices/dev-1") == 401
        assert get(serve, "/devices/dev-1", "wrong") == 401
        assert get(serve, "/devices/dev-1", TOKEN) == 404  # authorised: not cached
        assert get(serve, "/metrics") == (401 if metrics_too else 200)
        assert get(serve, "/metrics", TOKEN) == 200
    finally:
        serve.stop()
    assert TOKEN not in serve.logs()


def test_config_masks_the_token() -> None:
    result = CliRunner().invoke(app, ["config", "--json"], env={"TPX_HTTP_TOKEN": TOKEN})
    assert result.exit_code == 0 and TOKEN not in result.output
    assert json.loads(result.stdout)["http_token"] == "***"  # noqa: S105
