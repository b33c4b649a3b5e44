"""`tpx domain`: the timing records of the batches `tpx serve` queued (``TPX_DOMAIN_DEFER``).

With ``TPX_DOMAIN_DEFER=true`` the writers of ``tpx serve`` do not compute the domain: each batch
inserts its valid fixes' keys as one row of ``tpx_domain_queue``, in the positions' own
transaction, and that is all (no device lock, no state: the positions never wait for the
domain). This process, with its own interpreter (the domain's CPU never competes with the
writers' for one GIL), moves those keys into ``tpx_domain_missed`` and runs what a failed batch's
fixes get in every instance: the repair (:mod:`tpx.domainstage.repair`), every
:data:`~tpx.domainstage.repair.WORKER_EVERY_S`, under each device's lock, each pass one
transaction that writes the records, the states and deletes the fixes it took. So a kill -9 of
either process at any moment loses and doubles nothing, and the records are those a sequential
replay gives, as in the writers.

The worker reloads the geofences as the writers do (``TPX_GEOFENCES_RELOAD_S``, and at once on
``tpx geofences --reload``: it listens on the stream's control channel as ``CONSUMER:domain``, and
beats a heartbeat of its own for ``tpx status`` (:class:`Presence`); a Redis away costs it only
those, with a WARNING) and serves ``/metrics``, ``/healthz`` and ``/readyz`` on ``TPX_HTTP_ADDR``
(give it its own port next to a ``tpx serve``). It never migrates: ``tpx serve`` (or ``tpx
migrate``) does.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

import redis
from prometheus_client import CollectorRegistry

from tpx import __version__, exitcodes, keys
from tpx.config import Settings
from tpx.connections import redis_client
from tpx.domainstage.stage import DomainStage
from tpx.engine.heartbeat import Beating, Control
from tpx.engine.http import HealthServer
from tpx.engine.service import StartupError, require_current_schema
from tpx.engine.stages import StageStartError
from tpx.engine.state import DeviceStates
from tpx.streams import group_lag

log = logging.getLogger(__name__)

#: While serve has a backlog, the share of its time `tpx domain` spends on passes (the rest it
#: waits), so that the positions go first: the operating system's priority (TPX_DOMAIN_NICE)
#: reaches this process, not the PostgreSQL backend doing most of its work; the passes are
#: smaller meanwhile (repair.BUSY_REPAIR_DEVICES). Measured (bench_domain_pipeline, 10,000
#: devices, full passes): with start-up counted, 0.25 kept serve at 0.54-0.74 x its pace with
#: the domain off, 0.1 at 0.79-0.84 x; without, 0.05 gave 0.74-1.21 x against 0.80-1.09 for 0.1,
#: the worker's pace unchanged. With the smaller passes, 0.1 gives 0.82-1.05 x.
BUSY_SHARE = 0.1
#: Seconds between two looks at serve's backlog (the group's lag, XINFO GROUPS).
BACKLOG_CHECK_S = 0.5

#: Seconds between the main thread's looks at its threads.
WATCH_INTERVAL_S = 1.0
#: Seconds the stop waits for its threads, all together (a repair pass is one transaction: cut,
#: it rolls back).
STOP_JOIN_S = 8.0
#: Seconds a look at serve's backlog may take (the repair thread waits for it).
BACKLOG_TIMEOUT_S = 0.5


def backlog_client(settings: Settings) -> redis.Redis:
    """A Redis client of its own for :class:`Backlog`, with short timeouts: a Redis away costs a
    pass :data:`BACKLOG_TIMEOUT_S` at most."""
    return redis.Redis.from_url(
        settings.redis_url, socket_timeout=BACKLOG_TIMEOUT_S, socket_connect_timeout=BACKLOG_TIMEOUT_S
    )


class Backlog:
    """Whether serve has a backlog: its group's lag on the stream above a batch (unknown, or
    Redis away, counts as none), looked at every :data:`BACKLOG_CHECK_S`."""

    def __init__(self, settings: Settings, client: redis.Redis) -> None:
        self.settings = settings
        self.client = client
        self._checked_at = -BACKLOG_CHECK_S
        self._busy = False

    def busy(self) -> bool:
        if time.monotonic() - self._checked_at >= BACKLOG_CHECK_S:
            self._busy = self._lag() > self.settings.batch_size
            # from the answer: a Redis that takes BACKLOG_TIMEOUT_S costs that once a look
            self._checked_at = time.monotonic()
        return self._busy

    def _lag(self) -> int:
        """The group's lag as the metrics read it (:func:`tpx.streams.group_lag`: a stale Redis
        7.0 counter does not count); 0 when Redis cannot tell."""
        s = self.settings
        try:
            pipe = self.client.pipeline(transaction=False)
            pipe.xinfo_groups(s.stream)
            pipe.xlen(s.stream)
            pipe.xinfo_stream(s.stream)
            groups, length, info = pipe.execute()
        except redis.RedisError:  # no stream yet, or Redis away: no backlog known
            return 0
        group = next((g for g in groups if g.get("name") in (s.group, s.group.encode())), None)
        lag = None if group is None else group_lag(group, info["last-generated-id"], length)
        return lag or 0

    def pause(self, spent_s: float) -> float:
        """Seconds to wait after a pass that took ``spent_s``: while serve has a backlog, enough to
        keep to :data:`BUSY_SHARE` of the time."""
        return spent_s * (1 - BUSY_SHARE) / BUSY_SHARE if self.busy() else 0.0

    def give_way(self, spent_s: float, stop: threading.Event) -> None:
        """Wait :meth:`pause` after a pass, or less: the wait ends once serve has caught up
        (looked at every :data:`BACKLOG_CHECK_S`), or at the stop."""
        until = time.monotonic() + self.pause(spent_s)
        while self.busy():
            left = until - time.monotonic()
            if left <= 0 or stop.wait(min(left, BACKLOG_CHECK_S)):
                return


class Presence(Beating):
    """`tpx domain`'s heartbeat (:func:`tpx.keys.domain_heartbeat`), so that `tpx status` tells a
    deferring serve whose fixes are taken from one whose fixes wait for nobody."""

    def __init__(
        self, settings: Settings, client: redis.Redis, stage: DomainStage, stop: threading.Event
    ) -> None:
        key = keys.domain_heartbeat(settings.stream, settings.consumer)
        super().__init__("tpx-domain-heartbeat", settings, client, stop, {key: keys.HEARTBEAT_TTL_S})
        self.stage = stage

    def document(self) -> dict[str, Any]:
        waiting, _ = self.stage.repair.missed
        return {
            **self.identity(),
            "waiting_devices": waiting,
            "waiting_s": self.stage.repair.waiting_s(),
            "problem": self.stage.repair.problem,
        }


class DomainWorker:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.stage = DomainStage(settings, worker=True)
        self.registry = CollectorRegistry()
        self.stop = threading.Event()
        self.http: HealthServer | None = None
        self.control: Control | None = None
        self.presence: Presence | None = None

    def start(self) -> None:
        s = self.settings
        if s.domain == "off":
            raise StartupError("TPX_DOMAIN=off: tpx domain has nothing to do", exitcodes.USAGE)
        require_current_schema(s, "tpx domain never migrates")
        if s.domain_nice:  # the positions first, from the first pass (0: e.g. on a host of its own)
            os.nice(s.domain_nice)
            self.stage.repair.yields_to = Backlog(s, backlog_client(s))
        try:
            line = self.stage.open(self.registry, self.stop)
        except StageStartError as exc:
            raise StartupError(str(exc), exitcodes.USAGE if exc.usage else exitcodes.UNAVAILABLE) from None
        if self.stage.tables is None:  # TPX_DOMAIN=auto without the CMS's tables
            raise StartupError(f"{line}: tpx domain has nothing to do", exitcodes.USAGE)
        listener = s.model_copy(update={"consumer": f"{s.consumer}:domain"})  # as the answers name it
        client = redis_client(listener)
        self.control = Control(listener, client, DeviceStates(1), self.stop, self.stage.request_reload)
        self.control.start()
        self.presence = Presence(listener, client, self.stage, self.stop)
        self.presence.start()
        bind = s.http_bind
        if bind is not None:
            try:
                self.http = HealthServer(bind, self.registry, self.alive, self.ready, access=s.http_access())
            except OSError as exc:
                self.stop.set()
                raise StartupError(
                    f"cannot listen on {s.http_addr} (TPX_HTTP_ADDR): {exc.strerror}", exitcodes.USAGE
                ) from None
            self.http.start()
            log.info("metrics and health on http://%s", self.http.address)
        log.info("%s", line)
        log.info("tpx %s domain worker: writing the timing records of the fixes queued for it", __version__)

    def alive(self) -> tuple[bool, dict[str, Any]]:
        dead = [t.name for t in self._threads() if not t.is_alive()]
        return not dead, {"dead_threads": dead}

    def _threads(self) -> list[threading.Thread]:
        mine = [t for t in (self.control, self.presence) if t is not None]
        return [*self.stage.threads(), *mine]

    def ready(self) -> tuple[bool, dict[str, Any]]:
        ok, detail = self.alive()
        if not ok:
            return False, {"problems": ["threads dead: " + ", ".join(detail["dead_threads"])]}
        note = self.stage.health()
        return True, {"problems": [], **({"notes": [note]} if note is not None else {})}

    def request_stop(self) -> None:
        """Ask for a stop (from the signal thread: it only sets a flag)."""
        self.stop.set()

    def run(self) -> int:
        """Until a stop is asked for, or a thread died (a bug: exit :data:`~tpx.exitcodes.CRASH`)."""
        code = exitcodes.OK
        while not self.stop.wait(WATCH_INTERVAL_S):
            ok, detail = self.alive()
            if not ok:
                log.critical("domain worker thread died: %s; exiting", ", ".join(detail["dead_threads"]))
                code = exitcodes.CRASH
                break
        self.stop.set()
        threads = [*self._threads(), *([self.http.stop()] if self.http is not None else [])]
        deadline = time.monotonic() + STOP_JOIN_S  # one for all: inside Docker's 10 s
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        left = [t.name for t in threads if t.is_alive()]
        if left:
            log.warning("left behind at exit, still blocked: %s", ", ".join(left))
        log.info("stopped")
        return code
