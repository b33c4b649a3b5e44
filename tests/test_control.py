"""The control channel against hostile input (issue 13, item 3).

Every instance subscribes to the same channel, so one message that breaks the
``tpx-control`` thread takes the whole fleet down (exit 70 on every instance at
once), and a ``reply_to`` that names any key lets a publisher make every
instance write wherever it likes. The parser is tested on its own, then a real
``tpx serve`` is fed the issue's payloads and hypothesis' garbage while it
processes a load of valid records.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from typer.testing import CliRunner

from tests.helpers import Serve, add_entries, record, row_count, wait_for
from tpx import keys
from tpx.cli import app
from tpx.config import Settings
from tpx.controlproto import (
    DEVICES_LIMIT_DEFAULT,
    DEVICES_LIMIT_MAX,
    MAX_REQUEST_BYTES,
    OPS,
    REPLY_TTL_S,
    BadRequestError,
    ControlRequest,
    parse,
)
from tpx.engine.state import DeviceStates
from tpx.ops.control import ask
from tpx.schema import migrate

STREAM = "telemetry:t"
OWN = keys.reply_list(STREAM, "abc")  # the one reply key a request with id "abc" may name

#: The payloads issue 13 names, each of which killed every instance.
ISSUE_PAYLOADS: dict[str, bytes] = {
    "limit is a string": b'{"op":"devices","limit":"x"}',
    "limit is null": b'{"op":"devices","limit":null}',
    "limit is Infinity": b'{"op":"devices","limit":Infinity}',
    "100,000-deep array": b"[" * 100_000 + b"]" * 100_000,
}

#: What is wrong with each, as the warning must say it (with an id, so only that is wrong).
MALFORMED: dict[str, tuple[bytes, str]] = {
    "limit string": (b'{"op":"devices","id":"abc","limit":"x"}', "limit: Input should be a valid integer"),
    "limit null": (b'{"op":"devices","id":"abc","limit":null}', "limit: Input should be a valid integer"),
    "limit Infinity": (
        b'{"op":"devices","id":"abc","limit":Infinity}',
        "limit: Input should be a valid integer",
    ),
    "limit -Infinity": (
        b'{"op":"devices","id":"abc","limit":-Infinity}',
        "limit: Input should be a valid integer",
    ),
    "limit NaN": (b'{"op":"devices","id":"abc","limit":NaN}', "limit: Input should be a valid integer"),
    "limit float": (b'{"op":"devices","id":"abc","limit":5.0}', "limit: Input should be a valid integer"),
    "limit numeric string": (
        b'{"op":"devices","id":"abc","limit":"5"}',
        "limit: Input should be a valid integer",
    ),
    "limit bool": (b'{"op":"devices","id":"abc","limit":true}', "limit: Input should be a valid integer"),
    "limit 0": (
        b'{"op":"devices","id":"abc","limit":0}',
        "limit: Input should be greater than or equal to 1",
    ),
    "limit negative": (
        b'{"op":"devices","id":"abc","limit":-5}',
        "limit: Input should be greater than or equal to 1",
    ),
    "limit above max": (
        b'{"op":"devices","id":"abc","limit":%d}' % (DEVICES_LIMIT_MAX + 1),
        f"limit: Input should be less than or equal to {DEVICES_LIMIT_MAX}",
    ),
    "limit huge": (
        b'{"op":"devices","id":"abc","limit":1' + b"0" * 400 + b"}",
        f"limit: Input should be less than or equal to {DEVICES_LIMIT_MAX}",
    ),
    "deep array": (b"[" * 100_000 + b"]" * 100_000, f"more than the {MAX_REQUEST_BYTES} a request may have"),
    "deep array within the size bound": (b"[" * 2000 + b"]" * 2000, "recursion limit exceeded"),
    "deep value inside a request": (
        b'{"op":"ping","id":"abc","x":' + b"[" * 1500 + b"]" * 1500 + b"}",
        "recursion limit exceeded",
    ),
    "too large": (b'{"op":"ping","id":"abc","pad":"' + b"x" * 5000 + b'"}', "more than the 4096"),
    "not UTF-8": (b'{"op":"ping","id":"abc","device":"\xff\xfe"}', "not UTF-8 (byte 34)"),
    "not JSON": (b"hello", "Invalid JSON"),
    "trailing garbage": (b'{"op":"ping","id":"abc"} x', "Invalid JSON: trailing characters"),
    "empty": (b"", "Invalid JSON"),
    "a list": (b'["ping"]', "Input should be an object"),
    "a string": (b'"ping"', "Input should be an object"),
    "a number": (b"1e999", "Input should be an object"),
    "unknown op": (b'{"op":"flushall","id":"abc"}', "op: Input should be 'rehydrate', 'device', 'devices'"),
    "op missing": (b'{"id":"abc"}', "op: Field required"),
    "op not a string": (b'{"op":1,"id":"abc"}', "op: Input should be"),
    "id missing": (b'{"op":"ping"}', "id: Field required"),
    "id not a token": (b'{"op":"ping","id":"a/../b"}', "id: not a request id"),
    "id too long": (b'{"op":"ping","id":"%s"}' % (b"a" * 65), "id: not a request id"),
    "device missing": (b'{"op":"rehydrate","id":"abc"}', "op rehydrate needs a device"),
    "device empty": (b'{"op":"device","id":"abc","device":""}', "op device needs a device"),
    "device not a device_id": (b'{"op":"rehydrate","id":"abc","device":"a b"}', "device: not a device_id"),
    "device too long": (
        b'{"op":"rehydrate","id":"abc","device":"%s"}' % (b"1" * 65),
        "device: not a device_id",
    ),
    "device a number": (b'{"op":"device","id":"abc","device":356307042441013}', "device: Input should be"),
    "reply_to foreign key": (
        b'{"op":"ping","id":"abc","reply_to":"victim"}',
        f"reply_to b'victim' is not this stream's {OWN}",
    ),
    "reply_to another stream's reply key": (
        b'{"op":"ping","id":"abc","reply_to":"tpx:{other}:reply:abc"}',
        "is not this stream's",
    ),
    "reply_to another request's reply key": (
        b'{"op":"ping","id":"abc","reply_to":"tpx:{telemetry:t}:reply:abd"}',
        "is not this stream's",
    ),
    "reply_to the stream itself": (
        b'{"op":"ping","id":"abc","reply_to":"telemetry:t"}',
        "is not this stream's",
    ),
    "reply_to not a string": (b'{"op":"ping","id":"abc","reply_to":["x"]}', "reply_to: Input should be"),
}


# --- the parser ---------------------------------------------------------------------------------


@pytest.mark.parametrize("payload", ISSUE_PAYLOADS.values(), ids=ISSUE_PAYLOADS.keys())
def test_the_issue_payloads_are_refused(payload: bytes) -> None:
    with pytest.raises(BadRequestError) as caught:
        parse(payload, STREAM)
    assert "\n" not in str(caught.value) and len(str(caught.value)) < 200


@pytest.mark.parametrize(("payload", "reason"), MALFORMED.values(), ids=MALFORMED.keys())
def test_each_malformed_request_is_refused_with_its_reason(payload: bytes, reason: str) -> None:
    with pytest.raises(BadRequestError) as caught:
        parse(payload, STREAM)
    message = str(caught.value)
    assert reason in message
    assert "\n" not in message and len(message) < 200  # one short line, never the payload


def test_well_formed_requests_parse() -> None:
    ping = parse(b'{"op":"ping","id":"abc"}', STREAM)
    assert (ping.op, ping.device, ping.limit, ping.reply_to) == ("ping", "", DEVICES_LIMIT_DEFAULT, None)
    for limit in (1, DEVICES_LIMIT_MAX):  # the bounds are inclusive
        text = json.dumps({"op": "devices", "id": "abc", "limit": limit, "reply_to": OWN})
        assert parse(text.encode(), STREAM).limit == limit
    newer = b'{"op":"rehydrate","id":"abc","device":"356307042441013","since":"v2"}'
    assert parse(newer, STREAM).device == "356307042441013"  # unknown keys: a newer ops client


@pytest.mark.parametrize("op", OPS)
def test_the_ops_side_builds_what_the_engine_parses(op: Any) -> None:
    request = ControlRequest.new(STREAM, op, "dev-1", limit=7)
    assert request.reply_to == keys.reply_list(STREAM, request.id)
    assert parse(request.to_json().encode(), STREAM) == request


def test_the_ops_side_refuses_a_request_the_engine_would_refuse() -> None:
    with pytest.raises(BadRequestError, match="device: not a device_id"):
        ControlRequest.new(STREAM, "rehydrate", "no spaces allowed")
    with pytest.raises(BadRequestError, match="limit: Input should be less than or equal"):
        ControlRequest.new(STREAM, "devices", limit=DEVICES_LIMIT_MAX + 1)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
request_shaped = st.fixed_dictionaries(
    {"op": st.sampled_from([*OPS, "nuke", "", None])},
    optional={
        "id": st.one_of(st.just("abc"), st.text(max_size=70), st.integers()),
        "device": st.one_of(st.text(max_size=70), st.integers(), st.none()),
        "limit": st.one_of(
            st.integers(-(10**30), 10**30), st.floats(), st.text(max_size=5), st.none(), st.booleans()
        ),
        "reply_to": st.one_of(st.just(OWN), st.text(max_size=40), st.none(), json_values),
    },
)
garbage = st.one_of(
    st.binary(max_size=300),
    json_values.map(lambda v: json.dumps(v).encode()),
    request_shaped.map(lambda v: json.dumps(v).encode()),
    st.sampled_from([*ISSUE_PAYLOADS.values(), *(p for p, _ in MALFORMED.values())]),
    st.integers(1, 5000).map(lambda n: b"[" * n + b"]" * n),
)


@hsettings(max_examples=500, deadline=None)
@given(garbage)
def test_the_parser_raises_nothing_but_bad_request(data: bytes) -> None:
    try:
        request = parse(data, STREAM)
    except BadRequestError as exc:
        assert "\n" not in str(exc) and len(str(exc)) < 300
        return
    assert request.reply_to in (None, keys.reply_list(STREAM, request.id))
    assert 1 <= request.limit <= DEVICES_LIMIT_MAX


def test_the_cli_refuses_a_device_the_instances_would_refuse(serve_env: dict[str, str]) -> None:
    result = CliRunner().invoke(app, ["rehydrate", "no spaces allowed"], env=serve_env)
    assert result.exit_code == 2
    assert result.stderr.strip() == "tpx: device: not a device_id (1-64 of A-Z a-z 0-9 . _ : -)"


def test_the_runbook_states_the_bounds_the_code_enforces() -> None:
    runbook = (Path(__file__).parent.parent / "OPERATIONS.md").read_text()
    for bound in (
        f"at most {DEVICES_LIMIT_MAX:,} states",
        f"larger than {MAX_REQUEST_BYTES:,}",
        f"outside 1\N{EN DASH}{DEVICES_LIMIT_MAX:,}",
    ):
        assert bound in runbook, bound
    assert f"expires after {REPLY_TTL_S} s" in runbook


# --- a running instance ---------------------------------------------------------------------------


@pytest.fixture
def serve(
    settings: Settings, serve_env: dict[str, str], tmp_path: Path, rclient: redis.Redis
) -> Iterator[Serve]:
    migrate(settings.database_url, settings.db_schema)
    proc = Serve(serve_env, tmp_path / "serve.log").start()
    wait_for(lambda: proc.get("/readyz")[0] == 200, what="serve ready")
    channel = keys.control_channel(settings.stream)
    wait_for(lambda: rclient.pubsub_numsub(channel)[0][1] >= 1, what="control thread subscribed")
    yield proc
    if proc.proc is not None and proc.proc.poll() is None:
        proc.stop()


def warnings(proc: Serve, start: str) -> list[str]:
    lines = [json.loads(line) for line in proc.logs().splitlines() if line.startswith("{")]
    return [x["message"] for x in lines if x["level"] == "WARNING" and x["message"].startswith(start)]


def still_serving(rclient: redis.Redis, settings: Settings, proc: Serve, tmp_path: Path) -> None:
    """Alive, no panic dump, and a well-formed request still gets its answer."""
    assert proc.proc is not None and proc.proc.poll() is None, proc.logs()[-3000:]
    assert not (tmp_path / "panic").exists() or not any((tmp_path / "panic").iterdir())
    assert "Traceback" not in proc.logs()
    assert ask(rclient, settings, "ping", timeout=5).confirmed == ["serve-1"]


@pytest.mark.slow
def test_the_issue_payloads_leave_the_instance_serving(
    settings: Settings, rclient: redis.Redis, serve: Serve, tmp_path: Path
) -> None:
    channel = keys.control_channel(settings.stream)
    for payload, _ in MALFORMED.values():
        assert rclient.publish(channel, payload) == 1
    for payload in ISSUE_PAYLOADS.values():
        assert rclient.publish(channel, payload) == 1
    expected = len(MALFORMED) + len(ISSUE_PAYLOADS)
    wait_for(
        lambda: len(warnings(serve, "ignored a control message")) >= expected,
        what="one warning per bad message",
    )
    ignored = warnings(serve, "ignored a control message")
    assert len(ignored) == expected  # one line each
    assert all(len(line) < 400 for line in ignored), max(ignored, key=len)  # a bounded excerpt
    assert any("limit: Input should be a valid integer" in line for line in ignored)
    still_serving(rclient, settings, serve, tmp_path)


@pytest.mark.slow
def test_a_reply_goes_only_to_this_streams_reply_key(
    settings: Settings, rclient: redis.Redis, serve: Serve, tmp_path: Path
) -> None:
    token = uuid.uuid4().hex
    request_id = uuid.uuid4().hex
    foreign = [
        f"victim:{token}",
        f"tpx:{{other-{token}}}:reply:{request_id}",  # another stream's reply key
        keys.reply_list(settings.stream, token),  # this stream's, but not this request's
    ]
    channel = keys.control_channel(settings.stream)
    for key in [*foreign, settings.stream, settings.dlq_stream]:
        message = {"op": "ping", "id": request_id, "reply_to": key}
        assert rclient.publish(channel, json.dumps(message)) == 1
    still_serving(rclient, settings, serve, tmp_path)  # answered after the five: they were handled
    assert rclient.exists(*foreign) == 0
    assert rclient.type(settings.stream) == b"stream"
    assert rclient.exists(settings.dlq_stream) == 0  # not even a list where the DLQ goes
    ignored = warnings(serve, "ignored a control message")
    assert len(ignored) == 5 and all("is not this stream's" in line for line in ignored)


@pytest.mark.slow
def test_a_reply_redis_refuses_is_a_warning(
    settings: Settings, rclient: redis.Redis, serve: Serve, tmp_path: Path
) -> None:
    # someone put a string where the answer goes: Redis answers RPUSH with
    # "WRONGTYPE Operation against a key holding the wrong kind of value"
    request = ControlRequest.new(settings.stream, "ping")
    assert request.reply_to is not None
    rclient.set(request.reply_to, "not a list", ex=60)
    assert rclient.publish(keys.control_channel(settings.stream), request.to_json()) == 1
    still_serving(rclient, settings, serve, tmp_path)
    refused = warnings(serve, "could not answer control request")
    assert len(refused) == 1 and "WRONGTYPE" in refused[0]
    assert warnings(serve, "control channel lost") == []  # the subscription was never in question
    rclient.delete(request.reply_to)


#: Records loaded while the fuzz runs (and devices they come from).
LOAD_RECORDS = 3000
LOAD_DEVICES = 30


@pytest.mark.slow
def test_garbage_on_the_control_channel_under_load(
    settings: Settings, rclient: redis.Redis, serve: Serve, tmp_path: Path
) -> None:
    token = uuid.uuid4().hex  # every foreign key the fuzz names contains it
    channel = keys.control_channel(settings.stream)
    foreign_keys = st.one_of(
        st.integers(0, 20).map(lambda n: f"victim:{token}:{n}"),
        st.just(f"tpx:{{other-{token}}}:reply:abc"),
        st.just(keys.reply_list(settings.stream, token)),
        st.sampled_from([settings.stream, settings.dlq_stream, keys.heartbeat(settings.stream, "serve-1")]),
    )
    aimed = st.builds(
        lambda op, key, limit: json.dumps({"op": op, "id": "abc", "reply_to": key, "limit": limit}).encode(),
        st.sampled_from(["ping", "devices"]),
        foreign_keys,
        st.one_of(st.just(10), st.integers(-(10**30), 10**30)),
    )
    huge_limits = st.integers(DEVICES_LIMIT_MAX + 1, 10**400).map(
        lambda n: b'{"op":"devices","id":"abc","limit":%d}' % n
    )

    base = int(time.time() * 1000) - 3_600_000
    entries = [record(f"fuzz-{i % LOAD_DEVICES}", ts=base + i) for i in range(LOAD_RECORDS)]

    def load() -> None:
        with redis.Redis.from_url(settings.redis_url) as client:
            for start in range(0, LOAD_RECORDS, 200):
                add_entries(client, settings.stream, entries[start : start + 200])
                time.sleep(0.02)  # spread the load over the fuzz

    loader = threading.Thread(target=load, name="test-load")
    loader.start()

    @hsettings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(st.one_of(garbage, aimed, huge_limits))
    def publish(data: bytes) -> None:
        rclient.publish(channel, data)

    try:
        publish()
    finally:
        loader.join(30)
    wait_for(
        lambda: row_count(settings.database_url, settings.db_schema) == LOAD_RECORDS,
        what=f"{LOAD_RECORDS} rows",
    )
    still_serving(rclient, settings, serve, tmp_path)
    devices = ask(rclient, settings, "devices", timeout=5, limit=LOAD_DEVICES)
    assert len(devices.replies[0]["states"]) == LOAD_DEVICES
    assert list(rclient.scan_iter(match=f"*{token}*")) == []  # no foreign reply_to was written
    assert rclient.type(settings.stream) == b"stream"
    assert rclient.exists(settings.dlq_stream) == 0  # every record was valid, and no list took its place
    assert rclient.type(keys.heartbeat(settings.stream, "serve-1")) == b"string"


class _BrokenStates(DeviceStates):
    """Device state whose snapshot hits a bug (stands in for any error ``handle`` did not foresee)."""

    def snapshot(self, limit: int | None = None) -> list[Any]:
        raise RuntimeError("a bug in the devices answer")


def test_a_request_that_trips_a_bug_is_logged_and_the_thread_goes_on(
    settings: Settings, rclient: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """Every instance receives every message: one that makes ``handle`` raise must not stop the
    control thread (the engine panics, exit 70, when a thread dies)."""
    from tpx.engine.heartbeat import Control

    stop = threading.Event()
    control = Control(settings, rclient, _BrokenStates(10), stop)
    control.start()
    try:
        wait_for(
            lambda: rclient.pubsub_numsub(keys.control_channel(settings.stream))[0][1] == 1, what="subscribed"
        )
        with caplog.at_level("ERROR"):
            broken = ask(rclient, settings, "devices", timeout=1.0, alive=[])
            assert broken.replies == [] and control.is_alive()
            assert ask(rclient, settings, "ping", timeout=3.0, alive=[]).confirmed == [settings.consumer]
        assert any("control message failed" in r.getMessage() for r in caplog.records)
    finally:
        stop.set()
        control.join(5)
