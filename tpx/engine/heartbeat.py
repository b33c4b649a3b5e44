"""Presence and remote control: the heartbeat and control threads.

``tpx-heartbeat`` writes a small JSON document about this instance to Redis
every :data:`tpx.keys.HEARTBEAT_INTERVAL_S` with a TTL, so ops commands and the
dashboard see every live instance and can tell a dead consumer from a live
one. ``tpx-control`` listens on the stream's control channel and answers ops
requests (:mod:`tpx.controlproto`): ``rehydrate`` (drop a device's cached state;
it is reseeded from Postgres on its next record), ``device`` (report a device's
cached state), ``devices`` (the most recently active ones) and ``ping``. A
malformed request is one warning and ignored. Both threads survive Redis
outages: they log, wait, and try again.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any, assert_never

import redis

from tpx import __version__, controlproto, keys, logs
from tpx.config import Settings
from tpx.controlproto import ControlRequest
from tpx.engine.metrics import Metrics
from tpx.engine.state import DeviceStates

log = logging.getLogger(__name__)

#: Seconds the control thread waits for a message before it looks at the stop flag again.
CONTROL_POLL_S = 0.5
#: Seconds before the control thread subscribes again after losing the channel.
RESUBSCRIBE_WAIT_S = 1.0


class Beating(threading.Thread):
    """A thread that writes :meth:`document` as JSON to Redis every ``interval``, under each of
    ``ttls``'s keys with its TTL (seconds), and deletes them at a clean stop (it says so at once,
    not after the TTL); a Redis away costs a WARNING a beat."""

    def __init__(
        self,
        name: str,
        settings: Settings,
        client: redis.Redis,
        stop: threading.Event,
        ttls: dict[str, int],
        interval: float = keys.HEARTBEAT_INTERVAL_S,
    ) -> None:
        super().__init__(name=name, daemon=True)
        self.settings = settings
        self.client = client
        self.stop_event = stop
        self.ttls = ttls
        self.interval = interval
        self.started_at = time.time()

    def identity(self) -> dict[str, Any]:
        """What every document starts with: who, where, which version, since when, now."""
        return {
            "consumer": self.settings.consumer,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "version": __version__,
            "started_at": self.started_at,
            "at": time.time(),
        }

    def document(self) -> dict[str, Any]:
        raise NotImplementedError

    def beat(self) -> None:
        doc = json.dumps(self.document())
        pipe = self.client.pipeline(transaction=False)
        for key, ttl in self.ttls.items():
            pipe.set(key, doc, ex=ttl)
        pipe.execute()

    def run(self) -> None:
        while not self.stop_event.is_set():
            try:
                self.beat()
            except redis.RedisError as exc:
                log.warning("heartbeat failed: %s", exc)
            self.stop_event.wait(self.interval)
        with contextlib.suppress(redis.RedisError):
            self.client.delete(*self.ttls)


class Heartbeat(Beating):
    """Serve's: its consumer's live document (what `tpx status` and `tpx top` show of it), and
    the same kept for a day (:data:`~tpx.keys.LAST_SEEN_TTL_S`): when a dead consumer was last seen."""

    def __init__(
        self,
        settings: Settings,
        client: redis.Redis,
        metrics: Metrics,
        stop: threading.Event,
        extra: Callable[[], dict[str, Any]],
        interval: float = keys.HEARTBEAT_INTERVAL_S,
    ) -> None:
        key = keys.heartbeat(settings.stream, settings.consumer)
        seen_key = keys.last_seen(settings.stream, settings.consumer)
        super().__init__(
            "tpx-heartbeat",
            settings,
            client,
            stop,
            {key: keys.HEARTBEAT_TTL_S, seen_key: keys.LAST_SEEN_TTL_S},
            interval,
        )
        self.metrics = metrics
        self.extra = extra
        self._last: tuple[float, float, float] | None = None

    def document(self) -> dict[str, Any]:
        now = time.monotonic()
        read = self.metrics.count(self.metrics.read)
        written = self.metrics.count(self.metrics.written)
        rates = {"read_per_s": 0.0, "written_per_s": 0.0}
        if self._last is not None:
            then, read0, written0 = self._last
            elapsed = max(now - then, 1e-6)
            rates = {"read_per_s": (read - read0) / elapsed, "written_per_s": (written - written0) / elapsed}
        self._last = (now, read, written)
        return {
            **self.identity(),
            "records_read": read,
            "records_written": written,
            **rates,
            "recent_warnings": logs.recent_warnings(),
            **self.extra(),
        }


class Control(threading.Thread):
    def __init__(
        self,
        settings: Settings,
        client: redis.Redis,
        states: DeviceStates,
        stop: threading.Event,
        reload: Callable[[], bool] | None = None,
    ) -> None:
        super().__init__(name="tpx-control", daemon=True)
        self.settings = settings
        self.client = client
        self.states = states
        #: the domain stage's "reload the geofences now" (None: no stage runs)
        self.reload = reload
        self.stop_event = stop
        self.channel = keys.control_channel(settings.stream)

    def handle(self, request: ControlRequest) -> dict[str, Any]:
        """Do what a (well-formed) request asks; the answer to push to its ``reply_to``."""
        answer: dict[str, Any] = {"consumer": self.settings.consumer, "ok": True}
        match request.op:
            case "rehydrate":
                dropped = self.states.drop(request.device)
                log.info(
                    "rehydrate %s requested: %s",
                    request.device,
                    "dropped cached state" if dropped else "not cached",
                )
                answer["was_cached"] = dropped
            case "device":
                state = self.states.get(request.device)
                answer["state"] = None if state is None else state.to_dict()
            case "devices":
                answer["states"] = [s.to_dict() for s in self.states.snapshot(limit=request.limit)]
            case "reload":
                reloaded = self.reload() if self.reload is not None else False
                if reloaded:
                    log.info("geofence reload requested")
                answer["reloaded"] = reloaded
            case "ping":
                pass
            case unknown:
                assert_never(unknown)
        return answer

    def run(self) -> None:
        while not self.stop_event.is_set():
            pubsub = self.client.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
            try:
                pubsub.subscribe(self.channel)
                while not self.stop_event.is_set():
                    message = pubsub.get_message(timeout=CONTROL_POLL_S)
                    if message is None or message.get("type") != "message":
                        continue
                    self._answer_safely(message["data"])
            except redis.RedisError as exc:
                log.warning("control channel lost (%s); resubscribing", exc)
                self.stop_event.wait(RESUBSCRIBE_WAIT_S)
            finally:
                with contextlib.suppress(redis.RedisError):
                    pubsub.close()

    def _answer_safely(self, data: bytes) -> None:
        """Answer one message; a bug it meets is logged and the thread goes on with the next.

        Every instance receives every message, so one that trips an unforeseen error in
        ``handle`` must not stop the control thread, which would panic all of them at once (the
        worker loops of rq and dramatiq treat a job the same way). A Redis failure is not caught
        here: the loop resubscribes.
        """
        try:
            self._answer(data)
        except redis.RedisError:
            raise
        except Exception:
            log.exception("control message failed, ignored: %s", controlproto.excerpt(data))

    def _answer(self, data: bytes) -> None:
        """Answer one control message. A malformed one is one warning and ignored: every
        instance receives it, so it must not stop any of them."""
        try:
            request = controlproto.parse(data, self.settings.stream)
        except controlproto.BadRequestError as exc:
            log.warning("ignored a control message (%s): %s", exc, controlproto.excerpt(data))
            return
        reply = self.handle(request)
        if request.reply_to is None:
            return
        pipe = self.client.pipeline(transaction=False)
        pipe.rpush(request.reply_to, json.dumps(reply))
        pipe.expire(request.reply_to, controlproto.REPLY_TTL_S)
        try:
            pipe.execute()
        except redis.ResponseError as exc:  # OOM, READONLY, WRONGTYPE: this answer is lost, not the thread
            log.warning("could not answer control request %s %s: %s", request.op, request.id, exc)
