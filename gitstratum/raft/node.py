"""The Raft driver: the one module that ties the pure core to the reactor, the log and the network.

``RaftNode`` owns a ``RaftCore`` and feeds it ticks (a ``LoopingCall`` on
an injected clock), messages from the transport and the application's
proposals and reads.  After every input it drains the core's ``Ready``
batches in etcd's order: persist (one sync), send, apply, advance.  The
drain runs once per reactor turn (``callLater(0)``), so every proposal and
message that arrived in that turn shares one ``Ready`` and one fsync: that
is the batching that gives throughput.

The application sees Deferreds: ``propose`` fires with the state machine's
result once the entry is applied, ``read`` with a linearizable answer
(ReadIndex).  Both fail at once with ``NotLeader(leader_hint)`` on a
follower, and every pending one fails with ``LeadershipLost`` (a
``NotLeader``) when the leader steps down.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import attrs
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from gitstratum.raft.core import Config, RaftCore
from gitstratum.raft.interfaces import IRaftLog, IRaftTransport, IStateMachine
from gitstratum.raft.types import (
    NONE,
    ConfChange,
    ConfChangeType,
    Entry,
    EntryType,
    Message,
    NodeId,
    NotLeader,
    RaftError,
    Ready,
    Role,
)

__all__ = [
    "RaftNode",
    "LeadershipLost",
    "ProposalLost",
    "NodeHalted",
    "TransferFailed",
    "DEFAULT_TICK_INTERVAL",
]

#: 50 ms ticks: with the core's election_tick of 10 a dead leader is
#: noticed after 0.5-1.0 s, well inside the 1.5 s failover budget on a LAN,
#: and heartbeats (every tick) stay cheap.
DEFAULT_TICK_INTERVAL = 0.05


class LeadershipLost(NotLeader):
    """The node stepped down (or stopped) before the request finished; a proposal may or may not be applied."""

    def __init__(self, leader_hint: NodeId = NONE) -> None:
        super().__init__(leader_hint)
        self.args = (
            "leadership lost before the request finished; the outcome is unknown "
            + (f"(leader is now {leader_hint})" if leader_hint else "(no leader known)"),
        )


class ProposalLost(RaftError):
    """The entry at the proposal's index belongs to another term: the proposal was not applied."""


class NodeHalted(RaftError):
    """The driver stopped after a failure it cannot recover from (for example the log could not be written)."""


class TransferFailed(RaftError):
    """A leadership transfer did not complete in time."""


@attrs.define(eq=False)
class _Proposal:
    term: int
    deferred: defer.Deferred[Any]


@attrs.define(eq=False)
class _Read:
    request: bytes
    deferred: defer.Deferred[Any]
    #: the read index, once the leader has confirmed it
    index: int | None = None


@attrs.define(eq=False)
class _Transfer:
    to: NodeId
    deferred: defer.Deferred[None]
    ticks_left: int


@attrs.define(eq=False)
class RaftNode(Service):
    """One Raft member: a core driven by ticks, messages and requests, persisting to ``log``.

    The node does not own ``log``, ``state_machine`` or ``transport``: it
    loads the log in ``startService`` and the caller closes it after
    ``stopService``.
    """

    config: Config
    log: IRaftLog
    state_machine: IStateMachine
    transport: IRaftTransport
    clock: IReactorTime
    rng: random.Random
    tick_interval: float = attrs.field(
        default=DEFAULT_TICK_INTERVAL, validator=attrs.validators.gt(0)
    )
    #: compact the log into a snapshot once this many entries were applied since the last one
    snapshot_every: int = attrs.field(default=10_000, validator=attrs.validators.ge(1))
    #: called with the failure when the driver halts (the process may want to exit)
    on_halt: Callable[[Failure], None] | None = None

    _core: RaftCore | None = attrs.field(default=None, init=False)
    _ticker: LoopingCall | None = attrs.field(default=None, init=False)
    _drain_call: IDelayedCall | None = attrs.field(default=None, init=False)
    _applied: int = attrs.field(default=0, init=False)
    _role: Role = attrs.field(default=Role.FOLLOWER, init=False)
    _leader: NodeId = attrs.field(default=NONE, init=False)
    _proposals: dict[int, _Proposal] = attrs.field(factory=dict, init=False)
    _reads: dict[bytes, _Read] = attrs.field(factory=dict, init=False)
    _read_prefix: bytes = attrs.field(default=b"", init=False)
    _read_seq: int = attrs.field(default=0, init=False)
    _transfer: _Transfer | None = attrs.field(default=None, init=False)
    _unreachable_nodes: set[NodeId] = attrs.field(factory=set, init=False)
    # Deferreds are fired only after advance(): a callback may propose again,
    # and the core must not be stepped between ready() and advance().
    _to_fire: list[tuple[defer.Deferred[Any], object]] = attrs.field(factory=list, init=False)
    _halted: Failure | None = attrs.field(default=None, init=False)
    #: how many snapshots came from the leader (InstallSnapshot) and were restored
    snapshots_installed: int = attrs.field(default=0, init=False)
    #: how many times the log was compacted here
    compactions: int = attrs.field(default=0, init=False)

    logger = Logger()

    # -- service ------------------------------------------------------------

    def startService(self) -> None:
        hard_state, snapshot, entries = self.log.load()
        if snapshot is not None and not snapshot.is_empty:
            self.state_machine.restore(snapshot.data)
            self._applied = snapshot.metadata.index
        else:
            self._applied = 0
        self._core = RaftCore(
            self.config, self.rng, hard_state=hard_state, snapshot=snapshot, entries=entries
        )
        self._role = self._core.role
        self._leader = self._core.leader_id
        self._read_prefix = self.rng.getrandbits(64).to_bytes(8, "big")
        self.transport.set_receiver(self._receive)
        self.transport.unreachable = self._unreachable
        Service.startService(self)
        self.logger.info(
            "Raft node {id} started at term {term}, commit {commit}, {count} entries after "
            "snapshot {snapshot}",
            id=self.config.id,
            term=hard_state.term,
            commit=hard_state.commit,
            count=len(entries),
            snapshot=self._applied,
        )
        ticker = LoopingCall(self._tick)
        ticker.clock = self.clock
        ticker.start(self.tick_interval, now=False)
        self._ticker = ticker
        # A restarted node re-applies the committed entries after its snapshot.
        self._schedule_drain()

    def stopService(self) -> defer.Deferred[None] | None:
        Service.stopService(self)
        if self._ticker is not None and self._ticker.running:
            self._ticker.stop()
        self._ticker = None
        if self._drain_call is not None and self._drain_call.active():
            self._drain_call.cancel()
        self._drain_call = None
        if self._core is not None and self._halted is None:
            # The commit index is written without a sync (Raft does not need
            # it durable); a clean stop keeps it so a restart re-applies all.
            self.log.sync()
        self._fail_pending(LeadershipLost(NONE))
        self._fire()
        return None

    # -- properties -----------------------------------------------------------

    @property
    def leader_id(self) -> NodeId:
        return self._leader

    @property
    def is_leader(self) -> bool:
        core = self._running_core()
        return core is not None and core.role is Role.LEADER

    @property
    def term(self) -> int:
        return self._core.term if self._core is not None else 0

    @property
    def role(self) -> Role:
        return self._core.role if self._core is not None else Role.FOLLOWER

    @property
    def commit_index(self) -> int:
        return self._core.commit_index if self._core is not None else 0

    @property
    def applied_index(self) -> int:
        return self._applied

    @property
    def snapshot_index(self) -> int:
        return self._core.snapshot_metadata.index if self._core is not None else 0

    # -- requests ---------------------------------------------------------------

    def propose(self, data: bytes) -> defer.Deferred[Any]:
        """Replicate ``data``; fires with ``state_machine.apply``'s result once it is applied here.

        Fails at once with ``NotLeader`` on a non-leader (or
        ``ProposalDropped`` during a leadership transfer); later with
        ``LeadershipLost`` if this node steps down first (outcome unknown) or
        ``ProposalLost`` if another leader's entry took its index.
        """
        if not data:
            # An empty NORMAL entry is a new leader's no-op, not a command.
            return defer.fail(ValueError("a proposal must not be empty"))
        core = self._running_core()
        if core is None:
            return defer.fail(self._unavailable())
        try:
            term, index = core.propose(data)
        except RaftError as e:
            return defer.fail(e)
        return self._track(term, index)

    def read(self, request: bytes) -> defer.Deferred[Any]:
        """A linearizable read: fires with ``state_machine.query(request)`` once the read index is applied."""
        core = self._running_core()
        if core is None:
            return defer.fail(self._unavailable())
        self._read_seq += 1
        context = self._read_prefix + self._read_seq.to_bytes(8, "big")
        try:
            core.read_index(context)
        except RaftError as e:
            return defer.fail(e)
        d: defer.Deferred[Any] = defer.Deferred()
        self._reads[context] = _Read(request, d)
        self._schedule_drain()
        return d

    def add_learner(self, node_id: NodeId) -> defer.Deferred[Any]:
        """Add a non-voting member; fires once the change is applied here.

        The transport must know the new node's address first (``set_peers``).
        """
        return self._propose_conf_change(ConfChange(ConfChangeType.ADD_LEARNER, node_id))

    def add_voter(self, node_id: NodeId) -> defer.Deferred[Any]:
        """Add a voter, or promote a learner; fires once the change is applied here."""
        return self._propose_conf_change(ConfChange(ConfChangeType.ADD_VOTER, node_id))

    def remove_node(self, node_id: NodeId) -> defer.Deferred[Any]:
        """Remove a voter or learner; fires once the change is applied here."""
        return self._propose_conf_change(ConfChange(ConfChangeType.REMOVE_NODE, node_id))

    def transfer_leadership(self, to: NodeId) -> defer.Deferred[None]:
        """Hand leadership to ``to``; fires when this node sees ``to`` lead.

        Fails with ``NotLeader`` here, ``ValueError`` for a node that cannot
        lead, ``TransferFailed`` when no new leader appears within two
        election timeouts, and ``NotLeader(other)`` when another node wins.
        """
        core = self._running_core()
        if core is None:
            return defer.fail(self._unavailable())
        if self._transfer is not None:
            return defer.fail(TransferFailed("a leadership transfer is already in progress"))
        try:
            core.transfer_leader(to)
        except (RaftError, ValueError) as e:
            return defer.fail(e)
        d: defer.Deferred[None] = defer.Deferred()
        if to == self.config.id:
            d.callback(None)
            return d
        self._transfer = _Transfer(to, d, 2 * self.config.election_tick)
        self._schedule_drain()
        return d

    # -- inputs -------------------------------------------------------------------

    def _receive(self, message: Message) -> None:
        core = self._running_core()
        if core is None:
            return
        if message.to != self.config.id:
            self.logger.warn(
                "Raft node {id} dropped a {type} for node {to} from {sender}: peers misconfigured?",
                id=self.config.id,
                type=message.type.name,
                to=message.to,
                sender=message.from_,
            )
            return
        core.step(message)
        self._schedule_drain()

    def _unreachable(self, node: NodeId) -> None:
        # The transport says so from inside send(), between ready() and
        # advance(); the core hears it at the start of the next drain.
        self._unreachable_nodes.add(node)
        self._schedule_drain()

    def _tick(self) -> None:
        core = self._running_core()
        if core is None:
            return
        core.tick()
        transfer = self._transfer
        if transfer is not None:
            transfer.ticks_left -= 1
            if transfer.ticks_left <= 0:
                self._transfer = None
                transfer.deferred.errback(
                    TransferFailed(f"leadership did not move to node {transfer.to} in time")
                )
        self._schedule_drain()

    # -- the Ready loop ----------------------------------------------------------------

    def _schedule_drain(self) -> None:
        if self._drain_call is None and self.running and self._halted is None:
            self._drain_call = self.clock.callLater(0, self._drain)

    def _drain(self) -> None:
        self._drain_call = None
        core = self._running_core()
        if core is None:
            return
        try:
            while True:
                self._step_held_inputs(core)
                if not core.has_ready():
                    break
                ready = core.ready()
                self._handle_ready(core, ready)
                core.advance(ready)
                self._fire()
            self._maybe_compact(core)
        except Exception:
            # The core cannot be stepped past a Ready it could not persist;
            # the only safe thing is to stop taking part (as etcd panics).
            self._halt(Failure())
        self._fire()

    def _step_held_inputs(self, core: RaftCore) -> None:
        """Reports the transport made from inside send(): the core takes none until advance()."""
        unreachable, self._unreachable_nodes = self._unreachable_nodes, set()
        for node in unreachable:
            core.report_unreachable(node)

    def _handle_ready(self, core: RaftCore, ready: Ready) -> None:
        # 1. persist, with one sync for the whole batch
        if ready.snapshot is not None:
            self.log.apply_snapshot(ready.snapshot)
        if ready.entries:
            self.log.append(ready.entries)
        if ready.hard_state is not None:
            self.log.set_hard_state(ready.hard_state)
        if ready.must_sync or ready.entries or ready.snapshot is not None:
            # The core sets must_sync for these; syncing on them regardless
            # costs nothing and keeps "durable before sent" independent of it.
            self.log.sync()
        # 2. send
        if ready.messages:
            self.transport.send(ready.messages)
        # 3. apply
        if ready.snapshot is not None:
            self.state_machine.restore(ready.snapshot.data)
            self._applied = ready.snapshot.metadata.index
            self.snapshots_installed += 1
            # A snapshot covering a proposal says nothing about whether it
            # was applied (only a deposed leader can still have one pending).
            for index in [i for i in self._proposals if i <= self._applied]:
                self._fire_later(self._proposals.pop(index).deferred, LeadershipLost(self._leader))
        for entry in ready.committed_entries:
            self._apply(entry)
        for read_state in ready.read_states:
            pending = self._reads.get(read_state.context)
            if pending is not None:
                pending.index = read_state.index
        self._answer_reads()
        if ready.soft_state is not None:
            self._soft_state_changed(core, ready.soft_state.role, ready.soft_state.leader)

    def _apply(self, entry: Entry) -> None:
        if entry.index <= self._applied:
            return
        result: object = None
        if entry.type is EntryType.NORMAL:
            try:
                result = self.state_machine.apply(entry.index, entry.data)
            except ValueError as e:
                # Every replica refuses the same bytes the same way, so the
                # state stays identical; the proposer gets the error.
                self.logger.warn(
                    "Raft node {id} could not apply entry {index}: {error}",
                    id=self.config.id,
                    index=entry.index,
                    error=e,
                )
                result = Failure(e)
        elif entry.type is EntryType.CONF_CHANGE:
            try:
                result = ConfChange.decode(entry.data)
            except ValueError:
                result = None  # the core ignores a malformed change too
            self.logger.info(
                "Raft node {id} applied membership change {change} at {index}",
                id=self.config.id,
                change=result,
                index=entry.index,
            )
        self._applied = entry.index
        proposal = self._proposals.pop(entry.index, None)
        if proposal is None:
            return
        if proposal.term != entry.term:
            self._fire_later(
                proposal.deferred,
                ProposalLost(
                    f"entry {entry.index} was taken by term {entry.term}, not {proposal.term}: "
                    "leadership was lost and the proposal was not applied"
                ),
            )
        else:
            self._fire_later(proposal.deferred, result)

    def _answer_reads(self) -> None:
        ready_reads = [
            (context, pending)
            for context, pending in self._reads.items()
            if pending.index is not None and pending.index <= self._applied
        ]
        for context, pending in ready_reads:
            del self._reads[context]
            try:
                answer: object = self.state_machine.query(pending.request)
            except ValueError as e:
                answer = Failure(e)
            self._fire_later(pending.deferred, answer)

    def _soft_state_changed(self, core: RaftCore, role: Role, leader: NodeId) -> None:
        was_leader = self._role is Role.LEADER
        self._role = role
        if leader != self._leader:
            self._leader = leader
            if role is Role.LEADER:
                self.logger.info(
                    "Raft node {id} elected leader for term {term}",
                    id=self.config.id,
                    term=core.term,
                )
            elif leader != NONE:
                self.logger.info(
                    "Raft node {id} follows leader {leader} in term {term}",
                    id=self.config.id,
                    leader=leader,
                    term=core.term,
                )
        if was_leader and role is not Role.LEADER:
            self.logger.info(
                "Raft node {id} stepped down in term {term}", id=self.config.id, term=core.term
            )
            # A transfer in progress is settled below, when the new leader is known.
            self._fail_pending(LeadershipLost(leader), transfer=False)
        transfer = self._transfer
        if transfer is not None and leader not in (NONE, self.config.id):
            self._transfer = None
            if leader == transfer.to:
                self._fire_later(transfer.deferred, None)
            else:
                self._fire_later(transfer.deferred, NotLeader(leader))

    def _maybe_compact(self, core: RaftCore) -> None:
        if self._applied - core.snapshot_metadata.index < self.snapshot_every:
            return
        snapshot = core.compact(self._applied, self.state_machine.snapshot())
        self.log.compact(snapshot)
        self.log.sync()
        self.compactions += 1

    # -- helpers ------------------------------------------------------------------------

    def _propose_conf_change(self, change: ConfChange) -> defer.Deferred[Any]:
        core = self._running_core()
        if core is None:
            return defer.fail(self._unavailable())
        try:
            term, index = core.propose_conf_change(change)
        except (RaftError, ValueError) as e:
            return defer.fail(e)
        return self._track(term, index)

    def _track(self, term: int, index: int) -> defer.Deferred[Any]:
        d: defer.Deferred[Any] = defer.Deferred()
        stale = self._proposals.get(index)
        if stale is not None:
            # Only possible if we lost and regained leadership unseen; the old
            # entry at this index was overwritten.
            self._fire_later(
                stale.deferred, ProposalLost(f"entry {index} was overwritten in term {term}")
            )
        self._proposals[index] = _Proposal(term, d)
        self._schedule_drain()
        return d

    def _running_core(self) -> RaftCore | None:
        if not self.running or self._halted is not None:
            return None
        return self._core

    def _unavailable(self) -> RaftError:
        if self._halted is not None:
            return NodeHalted(
                f"raft node {self.config.id} halted: {self._halted.getErrorMessage()}"
            )
        return NotLeader(NONE)

    def _fail_pending(self, error: Exception, *, transfer: bool = True) -> None:
        proposals, self._proposals = self._proposals, {}
        reads, self._reads = self._reads, {}
        for proposal in proposals.values():
            self._fire_later(proposal.deferred, error)
        for read in reads.values():
            self._fire_later(read.deferred, error)
        if transfer and self._transfer is not None:
            self._fire_later(self._transfer.deferred, error)
            self._transfer = None

    def _fire_later(self, d: defer.Deferred[Any], result: object) -> None:
        self._to_fire.append((d, result))

    def _fire(self) -> None:
        while self._to_fire:
            batch, self._to_fire = self._to_fire, []
            for d, result in batch:
                if isinstance(result, Failure):
                    d.errback(result)
                elif isinstance(result, BaseException):
                    d.errback(Failure(result))
                else:
                    d.callback(result)

    def _halt(self, failure: Failure) -> None:
        self.logger.failure(
            "Raft node {id} halted: its Ready could not be handled", failure, id=self.config.id
        )
        self._halted = failure
        if self._ticker is not None and self._ticker.running:
            self._ticker.stop()
        self._fail_pending(NodeHalted(f"raft node {self.config.id} halted"))
        if self.on_halt is not None:
            self.on_halt(failure)
