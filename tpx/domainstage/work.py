"""What one transaction of the domain computes between its steps: the devices it read and the
work it did, applied to memory and counted once it has committed (the writers' batches and the
repair's passes alike); and where a stage runs (:class:`Role`)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from tpx.domain import Changes, DeviceState


class Role(enum.Enum):
    """Where a :class:`~tpx.domainstage.stage.DomainStage` runs, and so what it does."""

    #: ``tpx serve``: each writer's batch computes its timing records in its own transaction
    INLINE = "inline"
    #: ``tpx serve`` with TPX_DOMAIN_DEFER: each batch only queues its fixes for the worker
    QUEUE = "queue"
    #: ``tpx domain``: no engine; its repair thread takes every queued batch
    WORKER = "worker"


@dataclass(frozen=True, slots=True)
class DeviceRead:
    """A batch's devices as the store and memory hold them, under their locks."""

    #: Each device's (version, state), ready to advance.
    states: dict[str, tuple[int, DeviceState]]
    #: The devices a failed batch marked: the oldest fix missed (epoch µs).
    missed: dict[str, int]
    #: Devices left for the repair: their stored state is under a geofence set this instance
    #: has not loaded yet (another instance reloaded an edit first); advanced with the set here,
    #: they would go back to the old geofence.
    deferred: list[str]


@dataclass(slots=True)
class Work:
    """One batch's domain work, computed in the transaction, applied to memory after COMMIT."""

    states: list[tuple[str, int, DeviceState]] = field(default_factory=list)
    changes: list[Changes] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    replays: int = 0
    oldest_entry_ms: int | None = None
