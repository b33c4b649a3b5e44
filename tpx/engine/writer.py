"""Writer threads: the loop around :meth:`tpx.engine.commit.Committer.commit`.

Each writer takes batches from the queue (``get(timeout=GET_WAIT_S)``, so it
notices a stop within one timeout), commits each one with its own
:class:`~tpx.engine.commit.Committer` (dedupe, COPY or ON CONFLICT, COMMIT,
XACK, write-stage dead letters: the write rules live there), then calls the
post-commit stages with what was written. It keeps the in-flight bookkeeping
the reader's claim sweep and the panic dump read, and says in :meth:`Writer.health`
why it holds the pipeline up (writes failing, a batch in flight too long, Redis
refusing dead letters or acknowledgements).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Sequence

import redis
from psycopg_pool import ConnectionPool

from tpx.config import Settings
from tpx.engine.batch import Batch
from tpx.engine.commit import Committer
from tpx.engine.metrics import Metrics
from tpx.engine.stages import Committed, PostCommitStage, TransactionStage
from tpx.engine.state import DeviceStates

log = logging.getLogger(__name__)

#: Seconds a writer waits for a batch before it looks at the abort flag again.
GET_WAIT_S = 0.5


class Writer(threading.Thread):
    def __init__(
        self,
        index: int,
        settings: Settings,
        pool: ConnectionPool,
        client: redis.Redis,
        source: queue.Queue[Batch | None],
        states: DeviceStates,
        metrics: Metrics,
        stages: Sequence[PostCommitStage],
        abort: threading.Event,
        inflight: set[bytes],
        tx_stage: TransactionStage | None = None,
    ) -> None:
        super().__init__(name=f"tpx-writer-{index}", daemon=True)
        self.settings = settings
        self.committer = Committer(settings, pool, client, metrics, states, tx_stage)
        self.source = source
        self.metrics = metrics
        self.stages = stages
        self.abort = abort
        #: (monotonic start, records) of the batch being written, None between batches
        self.batch_since: tuple[float, int] | None = None
        self.in_flight: list[bytes] = []
        #: entry ids read but not finished, shared with the reader (its claim sweep skips them)
        self.inflight_ids = inflight

    @property
    def failing_since(self) -> float | None:
        """Monotonic time since which writes keep failing (None: healthy)."""
        return self.committer.health.failing_since

    def run(self) -> None:
        while True:
            try:
                batch = self.source.get(timeout=GET_WAIT_S)
            except queue.Empty:
                if self.abort.is_set():
                    break
                continue
            if batch is None:  # the engine's stop sentinel, queued after the last batch
                break
            ids = batch.entry_ids()
            self.in_flight = ids
            self.batch_since = (time.monotonic(), len(batch))
            try:
                outcome = self.committer.commit(batch, self.abort)
            except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError) as exc:
                log.warning(
                    "redis failed while finishing a batch (%s); its unacknowledged entries "
                    "stay pending for redelivery",
                    exc,
                )
            else:
                if outcome.aborted:
                    log.warning(
                        "gave up on a batch of %d at shutdown: %d committed, the rest stays pending",
                        len(batch),
                        outcome.acknowledged,
                    )
                if self.stages and (outcome.inserted or outcome.duplicates):
                    self._run_stages(Committed(outcome.inserted, outcome.duplicates))
            # an unexpected exception skips this on purpose: the panic dump shows what was in flight
            self.inflight_ids.difference_update(ids)
            self.in_flight = []
            self.batch_since = None
            self.source.task_done()
        log.info("writer stopped")

    def health(self) -> str | None:
        """Why this writer holds the pipeline up, in one line; None when it does not."""
        now = time.monotonic()
        health = self.committer.health
        if health.failing_since is not None:
            what = "cannot run its query" if health.query_failing else "failing"
            return f"{self.name} {what} for {now - health.failing_since:.0f}s: {health.last_error}"
        batch = self.batch_since
        stall_s = self.settings.writer_stall_s
        if batch is not None and now - batch[0] > stall_s:
            return (
                f"{self.name} has had a batch of {batch[1]} records in flight for {now - batch[0]:.0f}s "
                f"(over TPX_WRITER_STALL_S={stall_s:g}): waiting on PostgreSQL"
            )
        for problem in (health.dlq_problem, health.ack_problem):
            if problem is not None:
                return f"{self.name} {problem[1]} for {now - problem[0]:.0f}s"
        return None

    def _run_stages(self, committed: Committed) -> None:
        for stage in self.stages:
            try:
                stage.on_commit(committed)
            except Exception:  # a domain stage must never break the core path
                log.exception("post-commit stage %s failed", stage.name)
                self.metrics.stage_errors.labels(stage.name).inc()
