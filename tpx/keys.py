"""Redis key and channel names shared by the engine and the ops commands.

Everything tpx keeps in Redis besides the contract's streams lives under
``tpx:{<stream>}:`` (the braces make it one Redis Cluster hash slot with the
stream itself).
"""

from __future__ import annotations

#: Seconds between heartbeats; an instance whose heartbeat is older than
#: HEARTBEAT_TTL_S has expired and counts as dead.
HEARTBEAT_INTERVAL_S = 5.0
HEARTBEAT_TTL_S = 15
#: Seconds an instance's last heartbeat is kept after it expires: long enough for an operator to
#: learn, a day later, when a dead consumer was last seen and where its HTTP listener was.
LAST_SEEN_TTL_S = 86_400


def prefix(stream: str) -> str:
    return f"tpx:{{{stream}}}"


def heartbeat(stream: str, consumer: str) -> str:
    """A JSON document describing one live instance; expires when it stops refreshing it."""
    return f"{prefix(stream)}:instance:{consumer}"


def last_seen(stream: str, consumer: str) -> str:
    """The instance's newest heartbeat document, kept for :data:`LAST_SEEN_TTL_S` after it stops."""
    return f"{prefix(stream)}:seen:{consumer}"


#: Seconds the last write error of a pending entry is kept (`tpx pending` shows it): a day covers
#: every redelivery of an entry the database keeps refusing.
REFUSALS_TTL_S = 86_400


def refusals(stream: str) -> str:
    """Hash: pending entry id -> the database's last reason for refusing its row."""
    return f"{prefix(stream)}:refused"


def heartbeat_pattern(stream: str) -> str:
    return f"{prefix(stream)}:instance:*"


def domain_heartbeat(stream: str, consumer: str) -> str:
    """A JSON document describing one live `tpx domain` (``consumer``: its ``TPX_CONSUMER``); it is
    no consumer of the group, so it stays out of :func:`heartbeat_pattern`."""
    return f"{prefix(stream)}:domain:{consumer}"


def domain_heartbeat_pattern(stream: str) -> str:
    return f"{prefix(stream)}:domain:*"


def control_channel(stream: str) -> str:
    """Pub/sub channel the instances listen on for ops requests (:mod:`tpx.controlproto`)."""
    return f"{prefix(stream)}:control"


def reply_list(stream: str, request_id: str) -> str:
    """Where the instances push their answers to one control request; the only key a control
    request may name as ``reply_to`` (see :mod:`tpx.controlproto`)."""
    return f"{prefix(stream)}:reply:{request_id}"
