"""The control plane service: ``ControlState`` under Raft, and the AMP server members talk to.

:class:`ControlPlane` is the logic, with its Raft node, clock and leader
dialler injected so a test steps it with a ``Clock`` and ``iosim``;
:class:`ControlServer` is one authenticated AMP connection (a
:class:`~gitstratum.cluster.auth.NodeAMP`, so nothing is answered before
the cluster secret is proved); :class:`ControlService` wires them to a
real ``RaftNode`` over ``LMDBRaftLog`` and ``AMPTransport`` and to the
listening ports.

- **Writes** (``Join``, ``Leave``, ``Drain``, ``Remove``) are proposed to
  Raft on the leader and answered once applied. A follower forwards them
  to the leader over an authenticated connection of its own, so members
  never need to know who leads; with no leader (or a leader it cannot
  reach yet) the answer is ``NO_LEADER``. A command that arrives from
  another control node is never forwarded again (no loops): it gets
  ``NO_LEADER`` if this node does not lead either.
- **Heartbeats** are not proposed one by one: the leader answers at once
  (from its applied state; an unknown or removed node gets ``REFUSED`` so
  it joins again) and proposes one ``Heartbeat`` batch per
  ``interval``. A ``Join``'s ``at`` is replaced by the leader's clock.
- **The failure detector** runs on the leader on the same interval, after
  the batch, so a heartbeat always commits before a ``MarkDown`` decided
  after it; a new leader waits one window (``grace_until``) before marking
  anyone down.
- **Control nodes are members too**: each joins itself (role ``control``,
  its ``advertise`` address) and heartbeats itself through the same write
  path. That is also how a follower finds the leader's AMP address: Raft
  node ids map to names by ``--initial-cluster`` order, names to members.
- **Reads** are served from the local applied state, never through Raft:
  ``GetTopology`` pages the topology's wire form (encoded once per
  ``version``; a fetch that starts at offset 0 pins those bytes on the
  connection, so later pages of the same epoch come from the same bytes
  even if the version moves); ``WatchTopology`` long-polls;
  ``ClusterStatus`` is JSON. Heartbeat times inside a fetched topology are
  as of its version; ``ClusterStatus`` has the live ones.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any, Protocol, cast

import attrs
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.failure import Failure
from zope.interface import implementer

from gitstratum.cluster import commands as wire
from gitstratum.cluster.auth import NodeAMP
from gitstratum.control.commands import (
    Applied,
    Command,
    Drain,
    Heartbeat,
    Join,
    Leave,
    MarkActive,
    MarkDown,
    Remove,
    decode_command,
    encode_command,
)
from gitstratum.control.errors import CommandRefused, Refusal, Refused
from gitstratum.control.failure import DEFAULT_WINDOW, FailureDetector
from gitstratum.control.state import ControlState
from gitstratum.control.topology import MemberState, check_id
from gitstratum.raft.interfaces import IStateMachine
from gitstratum.raft.types import NONE, RaftError

__all__ = [
    "DEFAULT_INTERVAL",
    "DEFAULT_MAX_WATCH",
    "ControlPlane",
    "ControlServer",
    "ObservedState",
    "RaftLike",
]

_log = Logger()

#: seconds between heartbeat batches (and failure-detector looks) on the leader
DEFAULT_INTERVAL = 0.5
#: the longest a ``WatchTopology`` is held open, whatever it asks for
DEFAULT_MAX_WATCH = 60.0
#: seconds a forwarded command may take before the member is told ``NO_LEADER``
DEFAULT_FORWARD_TIMEOUT = 5.0


class RaftLike(Protocol):
    """What the control plane needs of its Raft node (``RaftNode`` has it)."""

    @property
    def is_leader(self) -> bool: ...

    @property
    def leader_id(self) -> int: ...

    @property
    def term(self) -> int: ...

    def propose(self, data: bytes) -> Deferred[Any]: ...


@implementer(IStateMachine)
@attrs.define(eq=False)
class ObservedState:
    """``ControlState`` as the ``IStateMachine``, calling ``changed`` after each apply and restore."""

    state: ControlState
    changed: Callable[[], None] = lambda: None

    def apply(self, index: int, data: bytes) -> Any:
        result = self.state.apply(index, data)
        self.changed()
        return result

    def query(self, request: bytes) -> Any:
        return self.state.query(request)

    def snapshot(self) -> bytes:
        return self.state.snapshot()

    def restore(self, data: bytes) -> None:
        self.state.restore(data)
        self.changed()


def _answer(result: object) -> dict[str, Any]:
    """An applied command's AMP answer; a refusal as the AMP error members know."""
    if isinstance(result, Refused):
        if result.reason is Refusal.STALE_EPOCH:
            raise wire.StaleEpoch(result.message)
        raise wire.Refused(f"{result.reason.value}: {result.message}")
    if not isinstance(result, Applied):
        raise TypeError(f"not a control command's result: {result!r}")
    return {"epoch": result.epoch}


def _no_leader(failure: Failure) -> Failure:
    """Raft's "not now" errors become ``NO_LEADER``; anything else stays what it is."""
    if failure.check(RaftError):
        raise wire.NoLeader(f"no leader took the command ({failure.getErrorMessage()}); retry")
    return failure


def _refusal(e: CommandRefused) -> Exception:
    if e.reason is Refusal.STALE_EPOCH:
        return wire.StaleEpoch(e.message)
    return wire.Refused(f"{e.reason.value}: {e.message}")


def _hang_up(proto: NodeAMP) -> None:
    if proto.transport is not None:
        proto.transport.loseConnection()


@attrs.define(eq=False)
class _Watch:
    since: int
    since_version: int | None
    deferred: Deferred[dict[str, Any]]
    timer: IDelayedCall | None = None


@attrs.define(eq=False)
class ControlPlane:
    """One control node's logic: the write path, the reads, the leader's interval work.

    *names* maps Raft node ids to control node names (``--initial-cluster``
    order, 1..n); *name* is this node's, *advertise* its AMP ``HOST:PORT``.
    *dial* connects and authenticates to a control node's AMP address.
    """

    name: str
    advertise: str
    state: ControlState
    raft: RaftLike
    clock: IReactorTime
    names: dict[int, str]
    dial: Callable[[str], Deferred[NodeAMP]]
    window: float = DEFAULT_WINDOW
    interval: float = DEFAULT_INTERVAL
    max_watch: float = DEFAULT_MAX_WATCH
    forward_timeout: float = DEFAULT_FORWARD_TIMEOUT

    _detector: FailureDetector = attrs.field(init=False)
    _batch: set[str] = attrs.field(init=False, factory=set)
    _watches: list[_Watch] = attrs.field(init=False, factory=list)
    _blob: tuple[int, int, bytes] | None = attrs.field(init=False, default=None)
    _seen: tuple[int, int] = attrs.field(init=False, default=(0, 0))
    _was_leader: bool = attrs.field(init=False, default=False)
    _took_office: float = attrs.field(init=False, default=0.0)
    _in_flight: set[str] = attrs.field(init=False, factory=set)
    _leader_link: tuple[str, Deferred[NodeAMP]] | None = attrs.field(init=False, default=None)
    _ticker: LoopingCall | None = attrs.field(init=False, default=None)

    def __attrs_post_init__(self) -> None:
        for what, value in (("interval", self.interval), ("max_watch", self.max_watch)):
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{what} must be a positive number of seconds, not {value!r}")
        self._detector = FailureDetector(self.window)

    @property
    def control_names(self) -> frozenset[str]:
        return frozenset(self.names.values())

    # -- the interval --------------------------------------------------------------------

    def start(self) -> None:
        ticker = LoopingCall(self.every_interval)
        ticker.clock = self.clock
        ticker.start(self.interval, now=False).addErrback(
            lambda f: _log.failure("the control interval stopped", f)
        )
        self._ticker = ticker

    def stop(self) -> None:
        if self._ticker is not None and self._ticker.running:
            self._ticker.stop()
        self._ticker = None
        for watch in list(self._watches):
            self._finish_watch(watch)
        self._drop_link()

    def every_interval(self) -> None:
        """Join and heartbeat ourselves; on the leader, propose the batch and the detector's verdicts."""
        now = self.clock.seconds()
        leader = self.raft.is_leader
        if leader and not self._was_leader:
            self._took_office = now
            _log.info(
                "control node {name} leads at term {term}", name=self.name, term=self.raft.term
            )
        self._was_leader = leader
        me = self.state.members.get(self.name)
        joined = (
            me is not None and me.state is not MemberState.REMOVED and me.address == self.advertise
        )
        if not joined:
            self._quietly("join", self.join(self._my_join(now), from_control=False))
        elif not leader:
            self._quietly("heartbeat", self.heartbeat(self.name, from_control=False))
        if not leader:
            self._batch.clear()
            return
        if joined:
            self._batch.add(self.name)
        if self._batch:
            nodes, self._batch = tuple(sorted(self._batch)), set()
            self._quietly("heartbeat batch", self._propose(Heartbeat(nodes, now)))
        verdicts = self._detector.check(
            self.state.members.values(), now, grace_until=self._took_office + self.window
        )
        for verdict in verdicts:
            self._verdict(verdict)

    def _verdict(self, verdict: MarkDown | MarkActive) -> None:
        if verdict.id in self._in_flight:
            return
        self._in_flight.add(verdict.id)
        what = "down" if isinstance(verdict, MarkDown) else "active"

        def done(result: object) -> None:
            self._in_flight.discard(verdict.id)
            if isinstance(result, Applied) and result.changed:
                _log.info("marked {id} {what}", id=verdict.id, what=what)

        self._propose(verdict).addBoth(done)

    def _my_join(self, now: float) -> bytes:
        return encode_command(Join(self.name, ("control",), self.advertise, now))

    def _quietly(self, what: str, d: Deferred[Any]) -> None:
        d.addErrback(lambda f: _log.debug("{what}: {f}", what=what, f=f.getErrorMessage()))

    # -- writes --------------------------------------------------------------------------

    def _propose(self, command: Command) -> Deferred[Any]:
        d = self.raft.propose(encode_command(command))
        return d.addErrback(_no_leader)

    def _write(
        self,
        amp_command: type[amp.Command],
        arguments: dict[str, Any],
        build: Callable[[], Command],
        from_control: bool,
    ) -> Deferred[dict[str, Any]]:
        if self.raft.is_leader:
            try:
                command = build()
            except CommandRefused as e:
                return fail(_refusal(e))
            return self._propose(command).addCallback(_answer)
        if from_control:
            return fail(wire.NoLeader("this control node does not lead either; retry"))
        return self._forward(amp_command, arguments)

    def join(self, member: bytes, *, from_control: bool) -> Deferred[dict[str, Any]]:
        def build() -> Command:
            command = decode_command(member)
            if not isinstance(command, Join):
                raise CommandRefused(Refusal.MALFORMED, "the member is an encoded Join")
            return attrs.evolve(command, at=self.clock.seconds())

        return self._write(wire.Join, {"member": member}, build, from_control)

    def leave(self, node: str, *, from_control: bool) -> Deferred[dict[str, Any]]:
        return self._write(wire.Leave, {"node": node}, lambda: Leave(node), from_control)

    def drain(
        self, node: str, expect_epoch: int | None, *, from_control: bool
    ) -> Deferred[dict[str, Any]]:
        arguments = {"node": node, "expect_epoch": expect_epoch}
        return self._write(wire.Drain, arguments, lambda: Drain(node, expect_epoch), from_control)

    def remove(
        self, node: str, expect_epoch: int | None, *, from_control: bool
    ) -> Deferred[dict[str, Any]]:
        arguments = {"node": node, "expect_epoch": expect_epoch}
        return self._write(wire.Remove, arguments, lambda: Remove(node, expect_epoch), from_control)

    def heartbeat(self, node: str, *, from_control: bool) -> Deferred[dict[str, Any]]:
        """The leader batches it and answers at once; a follower forwards it."""
        if not self.raft.is_leader:
            if from_control:
                return fail(wire.NoLeader("this control node does not lead either; retry"))
            return self._forward(wire.Heartbeat, {"node": node})
        try:
            check_id(node)
        except CommandRefused as e:
            return fail(_refusal(e))
        member = self.state.members.get(node)
        if member is None or member.state is MemberState.REMOVED:
            return fail(wire.Refused(f"UNKNOWN_NODE: no member {node!r}; join first"))
        self._batch.add(node)
        return succeed({"epoch": self.state.epoch, "version": self.state.version})

    # -- forwarding ----------------------------------------------------------------------

    def leader_address(self) -> str | None:
        """The leader's AMP address, once it has joined itself; ``None`` if unknown."""
        leader = self.raft.leader_id
        name = self.names.get(leader) if leader != NONE else None
        member = self.state.members.get(name) if name is not None else None
        if member is None or member.state is MemberState.REMOVED:
            return None
        return member.address

    def _forward(
        self, amp_command: type[amp.Command], arguments: dict[str, Any]
    ) -> Deferred[dict[str, Any]]:
        address = self.leader_address()
        if address is None or address == self.advertise:
            return fail(wire.NoLeader("no control node leads right now; retry"))
        if self._leader_link is None or self._leader_link[0] != address:
            self._drop_link()
            link = self.dial(address)
            self._leader_link = (address, link)

            def lost(f: Failure) -> Failure:
                if self._leader_link is not None and self._leader_link[1] is link:
                    self._leader_link = None
                return f

            link.addErrback(lost)
        else:
            link = self._leader_link[1]

        def call(proto: NodeAMP) -> Deferred[dict[str, Any]]:
            if proto.transport is None or getattr(proto, "closed", False):
                self._leader_link = None
                raise wire.NoLeader("the connection to the leader closed; retry")
            return cast("Deferred[dict[str, Any]]", proto.callRemote(amp_command, **arguments))

        # a fresh Deferred per call: the link's own result stays the protocol
        d: Deferred[NodeAMP] = Deferred()

        def ready(proto: NodeAMP) -> NodeAMP:
            d.callback(proto)
            return proto

        def failed(f: Failure) -> None:
            d.errback(f)

        link.addCallbacks(ready, failed)
        result = d.addCallback(call)
        result.addTimeout(self.forward_timeout, self.clock)

        def unreachable(f: Failure) -> Failure:
            if f.check(wire.Refused, wire.NoLeader, wire.StaleEpoch):
                return f
            self._drop_link()
            raise wire.NoLeader(f"could not reach the leader at {address}: {f.getErrorMessage()}")

        return result.addErrback(unreachable)

    def _drop_link(self) -> None:
        link, self._leader_link = self._leader_link, None
        if link is not None:
            link[1].addCallbacks(_hang_up, lambda _: None)

    # -- reads ---------------------------------------------------------------------------

    def changed(self) -> None:
        """After every apply: wake the watches the state has moved past."""
        now = (self.state.epoch, self.state.version)
        if now == self._seen:
            return
        self._seen = now
        for watch in list(self._watches):
            if self._moved(watch):
                self._finish_watch(watch)

    def _moved(self, watch: _Watch) -> bool:
        if self.state.epoch > watch.since:
            return True
        return watch.since_version is not None and self.state.version > watch.since_version

    def blob(self) -> tuple[int, bytes]:
        """``(epoch, wire form)`` of the current topology, encoded once per version."""
        if self._blob is None or self._blob[0] != self.state.version:
            topology = self.state.topology()
            self._blob = (topology.version, topology.epoch, topology.encode())
        return self._blob[1], self._blob[2]

    def watch(self, since: int, wait: float, since_version: int | None) -> Deferred[dict[str, Any]]:
        if since < 0 or (since_version is not None and since_version < 0):
            return fail(wire.Refused("BAD_EPOCH: since is a non-negative epoch"))
        if not (math.isfinite(wait) and wait >= 0):
            return fail(wire.Refused(f"BAD_WAIT: wait is a non-negative number, not {wait!r}"))
        d: Deferred[dict[str, Any]] = Deferred(lambda _: self._cancel_watch(watch))
        watch = _Watch(since, since_version, d)
        if self._moved(watch) or wait == 0:
            self._finish_watch(watch)
            return d
        watch.timer = self.clock.callLater(min(wait, self.max_watch), self._finish_watch, watch)
        self._watches.append(watch)
        return d

    def release(self, d: Deferred[dict[str, Any]]) -> None:
        """Answer the watch *d* now (its connection closed), if it is still held."""
        for watch in self._watches:
            if watch.deferred is d:
                self._finish_watch(watch)
                return

    def _finish_watch(self, watch: _Watch) -> None:
        self._cancel_watch(watch)
        if not watch.deferred.called:
            watch.deferred.callback({"epoch": self.state.epoch, "version": self.state.version})

    def _cancel_watch(self, watch: _Watch) -> None:
        if watch in self._watches:
            self._watches.remove(watch)
        if watch.timer is not None and watch.timer.active():
            watch.timer.cancel()
        watch.timer = None

    @property
    def watching(self) -> int:
        """Watches held open now (for tests and metrics)."""
        return len(self._watches)

    def status(self) -> dict[str, Any]:
        """The ``ClusterStatus`` document (see ``gitstratum.cluster.commands``)."""
        leader = self.raft.leader_id
        nodes = [
            {
                "name": m.id,
                "roles": sorted(r.value for r in m.roles),
                "role": ",".join(sorted(r.value for r in m.roles)),
                "state": m.state.value,
                "address": m.address,
                "last_heartbeat": m.last_heartbeat,
                "zone": m.zone,
                "http": m.http,
                "ssh": m.ssh,
            }
            for m in self.state.topology().members
        ]
        return {
            "nodes": nodes,
            "epoch": self.state.epoch,
            "version": self.state.version,
            "leader": self.names.get(leader) if leader != NONE else None,
            "term": self.raft.term,
            "node": self.name,
        }


class ControlServer(NodeAMP):
    """One authenticated AMP connection to a control node, answering ``cluster.commands``."""

    def __init__(self, plane: ControlPlane, secret: bytes, clock: IReactorTime) -> None:
        super().__init__(secret, plane.name, clock)
        self._plane = plane
        #: the (epoch, bytes) a paged fetch on this connection started on
        self._pinned: tuple[int, bytes] | None = None
        self._watch: Deferred[dict[str, Any]] | None = None

    @property
    def _from_control(self) -> bool:
        return self.peer_node in self._plane.control_names

    def connectionLost(self, reason: Any = None) -> None:
        # answered, not cancelled: a cancelled responder is logged as a
        # failure, and the answer to a closed connection goes nowhere
        watch, self._watch = self._watch, None
        if watch is not None:
            self._plane.release(watch)
        super().connectionLost(reason)

    @wire.Join.responder
    def _join(self, member: bytes) -> Deferred[dict[str, Any]]:
        return self._plane.join(member, from_control=self._from_control)

    @wire.Leave.responder
    def _leave(self, node: str) -> Deferred[dict[str, Any]]:
        return self._plane.leave(node, from_control=self._from_control)

    @wire.Heartbeat.responder
    def _heartbeat(self, node: str) -> Deferred[dict[str, Any]]:
        return self._plane.heartbeat(node, from_control=self._from_control)

    @wire.Drain.responder
    def _drain(self, node: str, expect_epoch: int | None = None) -> Deferred[dict[str, Any]]:
        return self._plane.drain(node, expect_epoch, from_control=self._from_control)

    @wire.Remove.responder
    def _remove(self, node: str, expect_epoch: int | None = None) -> Deferred[dict[str, Any]]:
        return self._plane.remove(node, expect_epoch, from_control=self._from_control)

    @wire.GetTopology.responder
    def _get_topology(self, epoch: int, offset: int) -> dict[str, Any]:
        if epoch < 0:
            raise wire.Refused(f"BAD_EPOCH: an epoch is non-negative, not {epoch}")
        if offset == 0 or epoch == 0:
            self._pinned = self._plane.blob()
        pinned = self._pinned
        if pinned is None or (epoch != 0 and pinned[0] != epoch):
            current = self._plane.blob()
            if current[0] != epoch:
                raise wire.StaleEpoch(f"the epoch is {current[0]}, not {epoch}; fetch again")
            pinned = self._pinned = current
        at, data = pinned
        if not 0 <= offset < max(len(data), 1):
            raise wire.Refused(f"BAD_OFFSET: {offset} is outside the topology's {len(data)} bytes")
        return {
            "epoch": at,
            "total": len(data),
            "page": data[offset : offset + wire.PAGE_BYTES],
        }

    @wire.WatchTopology.responder
    def _watch_topology(
        self, since: int, wait: float, since_version: int | None = None
    ) -> Deferred[dict[str, Any]]:
        if self._watch is not None and not self._watch.called:
            raise wire.Refused("BUSY: one WatchTopology at a time per connection")
        d = self._plane.watch(since, wait, since_version)
        self._watch = d
        return d

    @wire.ClusterStatus.responder
    def _cluster_status(self) -> dict[str, Any]:
        text = json.dumps(self._plane.status(), sort_keys=True, separators=(",", ":"))
        data = text.encode("utf-8")
        if len(data) > amp.MAX_VALUE_LENGTH:
            raise wire.Refused("TOO_LARGE: the status is over one AMP value; use GetTopology")
        return {"status": data}


class ControlService(MultiService):
    """A control node: its Raft node, its interval work and its two listening ports.

    Built by ``gitstratum.control.tap.makeService``; the children are the
    Raft node and the AMP server's port. ``transport`` is the Raft
    ``AMPTransport`` (already given its peers and the secret), which this
    service listens with on *raft_listen*, starts and stops.
    """

    def __init__(
        self,
        *,
        plane: ControlPlane,
        raft: Any,
        transport: Any,
        raft_listen: Any,
        close_log: Callable[[], None],
    ) -> None:
        super().__init__()
        self.plane = plane
        self.raft = raft
        self._transport = transport
        self._raft_listen = raft_listen
        self._close_log = close_log

    def startService(self) -> Deferred[None]:  # type: ignore[override]
        super().startService()

        def listening(_: object) -> None:
            self._transport.start()
            self.raft.startService()
            self.plane.start()

        return cast(
            Deferred[None], self._transport.listen(self._raft_listen).addCallback(listening)
        )

    def stopService(self) -> Deferred[None]:  # type: ignore[override]
        # members first (no new commands), then Raft (syncs the log), then
        # its connections; the log is closed last, when nothing can reach it
        self.plane.stop()
        d = super().stopService() or succeed(None)

        def raft_down(_: object) -> Deferred[None]:
            self.raft.stopService()
            return cast(Deferred[None], self._transport.stop())

        def close(_: object) -> None:
            self._close_log()

        return cast(Deferred[None], d.addCallback(raft_down).addCallback(close))
