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
``STALE_EPOCH`` and the caller starts again. The control node pins the
bytes a fetch started on (offset 0) to the connection, so every page of
one fetch comes from one encoding.

The contract, as ``gitstratum.control.service`` answers it:

- ``Join.member`` is ``gitstratum.control.commands.encode_command(Join(...))``:
  the member's id, roles, AMP address, public addresses, zone and weight;
  its ``at`` is replaced by the leader's clock. A second ``Join`` of the
  same member (same id and address) is how a restarted node becomes active
  again.
- Refusals: ``REFUSED`` with the description ``REASON: message`` (the reason
  is a ``gitstratum.control.errors.Refusal`` tag such as ``DUPLICATE_ID``,
  or ``UNKNOWN_NODE`` for a heartbeat from a node that must join again,
  or ``BAD_OFFSET``/``BAD_WAIT``/``BAD_EPOCH``/``BUSY``/``TOO_LARGE`` for
  a read), ``STALE_EPOCH``, ``NO_LEADER`` (retry shortly; also when the
  leader cannot be reached). Nothing changes on any of them.
- ``Heartbeat`` and ``WatchTopology`` also answer ``version``, which moves
  on every change but heartbeat times (a member marked down moves it, not
  the epoch); ``WatchTopology(since_version=V)`` also returns once the
  version passes ``V``. A watch is held at most the server's
  ``max_watch`` seconds, and one at a time per connection.
- ``ClusterStatus.status`` is JSON: ``{"nodes": [{"name", "roles", "role",
  "state", "address", "last_heartbeat", "zone", "http", "ssh"}], "epoch",
  "version", "leader", "term", "node"}``; ``leader`` is the leading
  control node's name (``null`` during an election), ``node`` the
  answering one's.
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
    response = [(b"epoch", amp.Integer()), (b"version", amp.Integer(optional=True))]
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
    errors = {StaleEpoch: b"STALE_EPOCH", Refused: b"REFUSED"}


class WatchTopology(NodeCommand):
    """Answered as soon as the epoch passes ``since``, or after ``wait`` seconds with the same one."""

    arguments = [
        (b"since", amp.Integer()),
        (b"wait", amp.Float()),
        (b"since_version", amp.Integer(optional=True)),
    ]
    response = [(b"epoch", amp.Integer()), (b"version", amp.Integer(optional=True))]
    errors = {Refused: b"REFUSED"}


class ClusterStatus(NodeCommand):
    """Every member with its role, state, address, zone and last heartbeat; leader and term."""

    arguments = []  # type: ignore[misc]
    response = [(b"status", amp.String())]
    errors = {Refused: b"REFUSED"}
