"""Tab 1: the group's consumers with their instances' rates, and instances not in the group yet."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from tpx.format import ago, consumer_view_state, number
from tpx.ops.inspect import Instance
from tpx.tui.poller import Snapshot
from tpx.tui.tables.base import Column, SnapshotTable

#: The state of an instance whose heartbeat is up but which has not read from the group yet.
STARTING = "starting"


@dataclass(frozen=True)
class Member:
    """A consumer of the group, or a live instance not yet in it."""

    name: str
    state: str
    pending: int
    idle_s: float | None
    instance: Instance | None


def members(snap: Snapshot) -> list[Member]:
    st = snap.status
    if st is None:
        return []
    out = [
        Member(c.name, consumer_view_state(c), c.pending, c.idle_ms / 1000, c.instance) for c in st.consumers
    ]
    known = {c.name for c in st.consumers}
    out += [Member(i.consumer, STARTING, 0, None, i) for i in st.instances if i.consumer not in known]
    return out


def _instance_column(label: str, spec: str, get: Callable[[Instance], float]) -> Column[Member]:
    """A column of the member's instance (heartbeat) figures; '-' for a consumer with none."""

    def value(m: Member) -> float | None:
        return None if m.instance is None else get(m.instance)

    return Column(label, lambda m: number(value(m), spec), value)


MEMBER_COLUMNS: tuple[Column[Member], ...] = (
    Column("consumer", lambda m: m.name),
    Column("state", lambda m: m.state),
    Column("pending", lambda m: number(m.pending), lambda m: m.pending),
    Column("idle", lambda m: ago(m.idle_s), lambda m: m.idle_s),
    _instance_column("read/s", ",.0f", lambda i: i.read_per_s),
    _instance_column("written/s", ",.0f", lambda i: i.written_per_s),
    _instance_column("queue", "d", lambda i: i.queue_depth),
    _instance_column("cache", ",", lambda i: i.cache_size),
)


class InstancesTable(SnapshotTable[Member]):
    TAB = "instances"
    TITLE = "Instances"
    COLUMNS = MEMBER_COLUMNS

    def items(self, snap: Snapshot) -> Iterable[Member]:
        return members(snap)

    def key(self, item: Member) -> str:
        return item.name

    def member(self, name: str) -> Member | None:
        return next((m for m in members(self.snapshot) if m.name == name), None)
