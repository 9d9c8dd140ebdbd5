"""The control plane's replicated state machine: membership and rings, driven by committed commands.

``ControlState`` implements ``IStateMachine`` for ``gitstratum.raft.node``:
``apply(index, data)`` decodes one command (``gitstratum.control.commands``),
checks it against the current state and either applies it or refuses it,
returning an ``Applied`` or a ``Refused`` value; ``query(request)`` answers
``GetTopology`` and ``GetMember``; ``snapshot``/``restore`` round-trip the
whole state. It is pure and deterministic: no clock (times arrive in the
commands, from the leader), no randomness, no I/O, so every replica that
applies the same log holds the same state, tokens included.

Each handler checks everything first and changes the state only after the
last check, so a refused command changes nothing (``applied_index`` apart).

Member states and what moves them::

    (none) or removed --Join--> joining --Heartbeat--> active
    joining, active --MarkDown--> down --MarkActive--> active
    joining, active, down --Join (same id and address: a restart)--> active
    joining, active, down --Drain--> draining
    any but removed --Remove / Leave--> removed   (if allowed, below)

- **Rings.** An object or metadata member gets its tokens on that ring when
  it first joins, by ``Ring.with_node`` inside ``apply`` (deterministic, so
  every replica allocates the same tokens). ``Drain`` takes it off with
  ``Ring.without_node``, which hands its tokens to other members. A ``down``
  member keeps its tokens. Every change of placement or of the ring config
  bumps ``epoch``; every change other than heartbeat times bumps
  ``version`` (what ``WatchTopology`` pushes on).
- **Remove and Leave** are refused for the last control node (counting
  every control member not removed) and for a node that *holds data*: an
  object or metadata member that is not draining or removed
  (``Member.holds_data``). Drain it first; the control plane cannot see
  the tier finish moving its ranges, so the operator's ``remove`` waits for
  the tier.
- **Re-joins.** A removed id may join again, as a new member. A member
  that joins again with the same address (a restart) keeps its tokens and
  becomes ``active`` (``draining`` stays ``draining``); its roles, weight
  and zone must be as before (``DUPLICATE_ID``), its public addresses may
  change.

Snapshot form: ``version u8 = 1``, ``applied_index u64``, then the
topology's wire form (``Topology.encode``), which holds everything else.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

import attrs
from zope.interface import implementer

from gitstratum.control.commands import (
    Applied,
    Command,
    Drain,
    GetMember,
    Heartbeat,
    Join,
    Leave,
    MarkActive,
    MarkDown,
    Remove,
    Result,
    SetConfig,
    decode_command,
    decode_query,
)
from gitstratum.control.errors import CommandRefused, Refusal, Refused
from gitstratum.control.topology import (
    RING_ROLES,
    Member,
    MemberState,
    RingConfig,
    Role,
    Topology,
    TopologyError,
    build_ring,
    canonical_address,
    check_id,
    check_time,
    check_weight,
    check_zone,
    pack_tokens,
    parse_roles,
)
from gitstratum.hashring.ring import Ring, RingError
from gitstratum.raft.interfaces import IStateMachine

__all__ = ["SNAPSHOT_VERSION", "ControlState"]

SNAPSHOT_VERSION = 1
_SNAPSHOT_HEADER = struct.Struct(">BQ")


@implementer(IStateMachine)
@attrs.define
class ControlState:
    """The membership, the ring config, the epoch and the version, as of ``applied_index``."""

    config: RingConfig = attrs.field(factory=RingConfig)
    members: dict[str, Member] = attrs.field(factory=dict)
    epoch: int = 0
    version: int = 0
    applied_index: int = 0
    # Each ring role's placement, kept between joins so a join costs one
    # with_node, not a rebuild. Its epoch is not kept up to date (the
    # Topology builds its own rings); only its tokens are used.
    _placement: dict[Role, Ring] = attrs.field(factory=dict, init=False, eq=False, repr=False)

    # -- IStateMachine ---------------------------------------------------------------------

    def apply(self, index: int, data: bytes) -> Result:
        """Apply the command in entry *index*: ``Applied``, ``Refused``, or ``None`` for a no-op entry."""
        if index <= self.applied_index:
            raise ValueError(f"entry {index} applied twice (already applied {self.applied_index})")
        self.applied_index = index
        if not data:
            return None
        try:
            command = decode_command(data)
        except CommandRefused as e:
            return e.refused
        return self.execute(command)

    def query(self, request: bytes) -> Topology | Member | None:
        """Answer an encoded ``GetTopology`` or ``GetMember``; ``ValueError`` for anything else."""
        query = decode_query(request)
        if isinstance(query, GetMember):
            return self.members.get(query.id)
        return self.topology()

    def snapshot(self) -> bytes:
        header = _SNAPSHOT_HEADER.pack(SNAPSHOT_VERSION, self.applied_index)
        return header + self.topology().encode()

    def restore(self, data: bytes) -> None:
        """Replace the whole state with a snapshot's; ``ValueError`` (and no change) if it is corrupt."""
        if len(data) < _SNAPSHOT_HEADER.size:
            raise TopologyError("truncated control snapshot")
        version, applied_index = _SNAPSHOT_HEADER.unpack_from(data)
        if version != SNAPSHOT_VERSION:
            raise TopologyError(f"unsupported control snapshot version {version}")
        topology = Topology.decode(data[_SNAPSHOT_HEADER.size :])
        self.config = topology.config
        self.members = {m.id: m for m in topology.members}
        self.epoch = topology.epoch
        self.version = topology.version
        self.applied_index = applied_index
        self._placement = {}

    # -- reading ---------------------------------------------------------------------------

    def topology(self) -> Topology:
        """The current topology, as a frozen value (safe to hand to other code and keep)."""
        members = tuple(self.members[i] for i in sorted(self.members))
        return Topology(self.epoch, self.version, self.config, members)

    # -- commands --------------------------------------------------------------------------

    def execute(self, command: Command) -> Applied | Refused:
        """Apply *command* (no log index involved): ``Applied``, or ``Refused`` and no change."""
        try:
            return self._dispatch(command)
        except CommandRefused as e:
            return e.refused

    def _dispatch(self, command: Command) -> Applied:
        if isinstance(command, Join):
            return self._join(command)
        if isinstance(command, Heartbeat):
            return self._heartbeat(command)
        if isinstance(command, MarkDown):
            return self._mark_down(command)
        if isinstance(command, MarkActive):
            return self._mark_active(command)
        if isinstance(command, Drain):
            return self._drain(command)
        if isinstance(command, Leave | Remove):
            return self._leave(command)
        if isinstance(command, SetConfig):
            return self._set_config(command)
        raise TypeError(f"not a control command: {command!r}")

    def _join(self, c: Join) -> Applied:
        self._check_epoch(c.expect_epoch)
        node_id = check_id(c.id)
        roles = parse_roles(c.roles)
        address = canonical_address(c.address)
        http = None if c.http is None else canonical_address(c.http)
        ssh = None if c.ssh is None else canonical_address(c.ssh)
        if (http is not None or ssh is not None) and Role.FRONTEND not in roles:
            raise CommandRefused(
                Refusal.BAD_ADDRESS, "only a frontend has public HTTP and SSH addresses"
            )
        weight = check_weight(c.weight)
        zone = check_zone(c.zone)
        at = check_time(c.at)
        mine = [a for a in (address, http, ssh) if a is not None]
        if len(set(mine)) != len(mine):
            raise CommandRefused(Refusal.DUPLICATE_ADDRESS, f"{node_id!r} gives one address twice")
        self._check_addresses_free(node_id, mine)
        old = self.members.get(node_id)
        if old is not None and old.state is not MemberState.REMOVED:
            return self._rejoin(old, roles, address, http, ssh, weight, zone, at)
        member = Member(
            id=node_id,
            roles=roles,
            address=address,
            state=MemberState.JOINING,
            last_heartbeat=at,
            weight=weight,
            zone=zone,
            http=http,
            ssh=ssh,
        )
        rings: dict[Role, Ring] = {}
        for role in RING_ROLES:
            if role in roles:
                try:
                    rings[role] = self._ring(role).with_node(member.ring_node())
                except RingError as e:
                    raise CommandRefused(Refusal.RING_FULL, str(e)) from None
                member = member.with_tokens(role, pack_tokens(rings[role].token_map()[node_id]))
        self.members[node_id] = member
        self._placement.update(rings)
        return self._changed(ring=bool(rings))

    def _rejoin(
        self,
        old: Member,
        roles: frozenset[Role],
        address: str,
        http: str | None,
        ssh: str | None,
        weight: float,
        zone: str | None,
        at: float,
    ) -> Applied:
        if old.address != address:
            raise CommandRefused(
                Refusal.DUPLICATE_ID, f"{old.id!r} is a member already, at {old.address}"
            )
        for name, was, now in (("roles", old.roles, roles), ("weight", old.weight, weight)):
            if was != now:
                raise CommandRefused(
                    Refusal.DUPLICATE_ID, f"{old.id!r} is a member already, with other {name}"
                )
        if old.zone != zone:
            raise CommandRefused(
                Refusal.DUPLICATE_ID, f"{old.id!r} is a member already, in zone {old.zone}"
            )
        state = MemberState.DRAINING if old.state is MemberState.DRAINING else MemberState.ACTIVE
        new = attrs.evolve(old, state=state, last_heartbeat=at, http=http, ssh=ssh)
        self.members[old.id] = new
        if attrs.evolve(new, last_heartbeat=old.last_heartbeat) == old:
            return self._unchanged()
        return self._changed()

    def _heartbeat(self, c: Heartbeat) -> Applied:
        at = check_time(c.at)
        ignored: list[str] = []
        activated = False
        for node_id in c.nodes:
            m = self.members.get(node_id)
            if m is None or m.state is MemberState.REMOVED:
                ignored.append(node_id)
                continue
            state = MemberState.ACTIVE if m.state is MemberState.JOINING else m.state
            activated = activated or state is not m.state
            self.members[node_id] = attrs.evolve(m, last_heartbeat=at, state=state)
        if activated:
            return attrs.evolve(self._changed(), ignored=tuple(ignored))
        return self._unchanged(ignored=tuple(ignored))

    def _mark_down(self, c: MarkDown) -> Applied:
        m = self._live_member(c.id)
        cutoff = check_time(c.cutoff)
        if m.state not in (MemberState.JOINING, MemberState.ACTIVE):
            raise CommandRefused(
                Refusal.BAD_STATE, f"{m.id!r} is {m.state.value}, not joining or active"
            )
        if m.last_heartbeat >= cutoff:
            raise CommandRefused(
                Refusal.STALE_HEARTBEAT, f"{m.id!r} was heard from at {m.last_heartbeat!r}"
            )
        self.members[m.id] = attrs.evolve(m, state=MemberState.DOWN)
        return self._changed()

    def _mark_active(self, c: MarkActive) -> Applied:
        m = self._live_member(c.id)
        cutoff = check_time(c.cutoff)
        if m.state is not MemberState.DOWN:
            raise CommandRefused(Refusal.BAD_STATE, f"{m.id!r} is {m.state.value}, not down")
        if m.last_heartbeat < cutoff:
            raise CommandRefused(
                Refusal.STALE_HEARTBEAT, f"{m.id!r} was last heard from at {m.last_heartbeat!r}"
            )
        self.members[m.id] = attrs.evolve(m, state=MemberState.ACTIVE)
        return self._changed()

    def _drain(self, c: Drain) -> Applied:
        self._check_epoch(c.expect_epoch)
        m = self._live_member(c.id)
        if m.state is MemberState.DRAINING:
            return self._unchanged()
        rings = {
            role: self._ring(role).without_node(m.id) for role in RING_ROLES if m.token_bytes(role)
        }
        updated = {m.id: attrs.evolve(m, state=MemberState.DRAINING)}
        for role, ring in rings.items():
            updated[m.id] = updated[m.id].with_tokens(role, b"")
            for node_id, tokens in ring.token_map().items():
                other = updated.get(node_id, self.members[node_id])
                # without_node only adds to the others' tokens: a count that
                # did not change is a member that did not change.
                if len(tokens) != len(other.token_bytes(role)) // 8:
                    updated[node_id] = other.with_tokens(role, pack_tokens(tokens))
        self.members.update(updated)
        self._placement.update(rings)
        return self._changed(ring=bool(rings))

    def _leave(self, c: Leave | Remove) -> Applied:
        self._check_epoch(c.expect_epoch)
        m = self._live_member(c.id)
        if Role.CONTROL in m.roles:
            control = [
                n
                for n in self.members.values()
                if Role.CONTROL in n.roles and n.state is not MemberState.REMOVED
            ]
            if len(control) == 1:
                raise CommandRefused(Refusal.LAST_CONTROL, f"{m.id!r} is the last control node")
        if m.holds_data:
            raise CommandRefused(
                Refusal.HOLDS_DATA,
                f"{m.id!r} ({m.state.value}) may hold the only copies of data: drain it first",
            )
        self.members[m.id] = attrs.evolve(m, state=MemberState.REMOVED)
        return self._changed()

    def _set_config(self, c: SetConfig) -> Applied:
        self._check_epoch(c.expect_epoch)
        config = RingConfig(
            vnodes=self.config.vnodes if c.vnodes is None else c.vnodes,
            replication=self.config.replication if c.replication is None else c.replication,
            partitions=self.config.partitions if c.partitions is None else c.partitions,
        ).check()
        if config == self.config:
            return self._unchanged()
        layout = (config.vnodes, config.partitions)
        if layout != (self.config.vnodes, self.config.partitions) and any(
            m.object_tokens or m.metadata_tokens for m in self.members.values()
        ):
            raise CommandRefused(
                Refusal.CONFIG_LOCKED, "vnodes and partitions are fixed once a member is on a ring"
            )
        self.config = config
        self._placement = {}
        return self._changed(ring=True)

    # -- helpers ---------------------------------------------------------------------------

    def _check_epoch(self, expected: int | None) -> None:
        if expected is not None and expected != self.epoch:
            raise CommandRefused(
                Refusal.STALE_EPOCH,
                f"the command expects epoch {expected}, the epoch is {self.epoch}",
            )

    def _live_member(self, node_id: str) -> Member:
        m = self.members.get(node_id)
        if m is None or m.state is MemberState.REMOVED:
            raise CommandRefused(Refusal.UNKNOWN_NODE, f"no member {node_id!r}")
        return m

    def _check_addresses_free(self, node_id: str, addresses: Iterable[str]) -> None:
        wanted = set(addresses)
        for other in self.members.values():
            if other.id == node_id or other.state is MemberState.REMOVED:
                continue
            taken = wanted.intersection(other.addresses)
            if taken:
                raise CommandRefused(
                    Refusal.DUPLICATE_ADDRESS, f"{min(taken)} is the address of {other.id!r}"
                )

    def _ring(self, role: Role) -> Ring:
        ring = self._placement.get(role)
        if ring is None:
            ring = build_ring(self.members.values(), role, self.config.vnodes, self.epoch)
            self._placement[role] = ring
        return ring

    def _changed(self, *, ring: bool = False) -> Applied:
        if ring:
            self.epoch += 1
        self.version += 1
        return Applied(self.epoch, self.version)

    def _unchanged(self, ignored: tuple[str, ...] = ()) -> Applied:
        return Applied(self.epoch, self.version, changed=False, ignored=ignored)
