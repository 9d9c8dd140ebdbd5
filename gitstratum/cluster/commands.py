"""The AMP commands of the control plane, spoken by every member over an authenticated connection.

Every command is a :class:`~gitstratum.cluster.auth.NodeCommand`, so none
is reachable before the cluster secret is proved. Writes (``Join``,
``Leave``, ``Heartbeat``, ``Drain``, ``Remove``) are proposals to the
control plane's Raft group: any control node takes them and forwards them
to the leader, so a member never needs to know who leads. Reads
(``GetTopology``, ``WatchTopology``, ``ClusterStatus``) are answered by
whichever control node is asked, from what it has applied.

A topology can be larger than one AMP value (1,000 nodes hold 256,000
tokens), so ``GetTopology`` pages it: the caller asks for ``offset`` 0,
then for each next offset until it has ``total`` bytes, all of one
``epoch``; a page of another epoch than the one asked for fails with
``STALE_EPOCH`` and the caller starts again.
"""

from __future__ import annotations

from twisted.protocols import amp

from gitstratum.cluster.auth import NodeCommand

__all__ = [
    "PAGE_BYTES",
    "ClusterStatus",
    "Drain",
    "GetTopology",
    "Heartbeat",
    "Join",
    "Leave",
    "NoLeader",
    "Refused",
    "Remove",
    "StaleEpoch",
    "WatchTopology",
]

#: Bytes of topology per ``GetTopology`` page, under AMP's 65,535-byte value limit.
PAGE_BYTES = 60_000


class Refused(Exception):
    """The control plane refused the command; the message says why, and nothing changed."""


class NoLeader(Exception):
    """No control node leads right now (an election is under way): try again shortly."""


class StaleEpoch(Exception):
    """The command named an epoch that is no longer current."""


_WRITE_ERRORS = {Refused: b"REFUSED", NoLeader: b"NO_LEADER", StaleEpoch: b"STALE_EPOCH"}


class Join(NodeCommand):
    """Add (or, after a restart, re-activate) a member; answers the epoch that holds it."""

    arguments = [(b"member", amp.String())]
    response = [(b"epoch", amp.Integer())]
    errors = _WRITE_ERRORS


class Leave(NodeCommand):
    """A member leaves of its own accord (a clean shutdown that gives up its place)."""

    arguments = [(b"node", amp.Unicode())]
    response = [(b"epoch", amp.Integer())]
    errors = _WRITE_ERRORS


class Heartbeat(NodeCommand):
    """A member is alive; answers the current epoch so the member knows whether to fetch."""

    arguments = [(b"node", amp.Unicode())]
    response = [(b"epoch", amp.Integer())]
    errors = _WRITE_ERRORS


class Drain(NodeCommand):
    """An operator's drain: the node stays up while its data moves elsewhere."""

    arguments = [(b"node", amp.Unicode()), (b"expect_epoch", amp.Integer(optional=True))]
    response = [(b"epoch", amp.Integer())]
    errors = _WRITE_ERRORS


class Remove(NodeCommand):
    """An operator's removal of a node that is drained (or holds no data)."""

    arguments = [(b"node", amp.Unicode()), (b"expect_epoch", amp.Integer(optional=True))]
    response = [(b"epoch", amp.Integer())]
    errors = _WRITE_ERRORS


class GetTopology(NodeCommand):
    """One page of the serialised topology: ``epoch`` 0 asks for the current one."""

    arguments = [(b"epoch", amp.Integer()), (b"offset", amp.Integer())]
    response = [(b"epoch", amp.Integer()), (b"total", amp.Integer()), (b"page", amp.String())]
    errors = {StaleEpoch: b"STALE_EPOCH"}


class WatchTopology(NodeCommand):
    """Answered as soon as the epoch passes ``since``, or after ``wait`` seconds with the same one."""

    arguments = [(b"since", amp.Integer()), (b"wait", amp.Float())]
    response = [(b"epoch", amp.Integer())]


class ClusterStatus(NodeCommand):
    """Every member with its role, state, address, zone and last heartbeat; leader and term."""

    arguments = []  # type: ignore[misc]
    response = [(b"status", amp.String())]
