"""The control plane's state machine: commands, refusals, rings, topology wire form and snapshots."""

from __future__ import annotations

import json
import math
import struct
import zlib
from typing import Any

import attrs
import pytest
import snappy
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from zope.interface.verify import verifyObject

from gitstratum.control.commands import (
    COMMAND_VERSION,
    COMPRESS_OVER,
    Applied,
    Command,
    Drain,
    GetMember,
    GetTopology,
    Heartbeat,
    Join,
    Leave,
    MarkActive,
    MarkDown,
    Remove,
    SetConfig,
    decode_command,
    decode_query,
    encode_command,
    encode_query,
    unwrap,
)
from gitstratum.control.errors import CommandRefused, Refusal, Refused
from gitstratum.control.state import ControlState
from gitstratum.control.topology import (
    RING_ROLES,
    TOPOLOGY_VERSION,
    Member,
    MemberState,
    RingConfig,
    Role,
    Topology,
    TopologyError,
    build_ring,
    canonical_address,
    pack_tokens,
)
from gitstratum.hashring.ring import Node, Ring
from gitstratum.raft.interfaces import IStateMachine

FAST = RingConfig(vnodes=8)


class Log:
    """A ControlState fed through the real byte form, as a Raft log would feed it."""

    def __init__(self, state: ControlState | None = None) -> None:
        self.state = state if state is not None else ControlState(config=FAST)
        self.index = self.state.applied_index

    def raw(self, data: bytes) -> Any:
        self.index += 1
        return self.state.apply(self.index, data)

    def __call__(self, command: Command) -> Any:
        return self.raw(encode_command(command))

    def ok(self, command: Command) -> Applied:
        return unwrap(self(command))

    def refused(self, command: Command | bytes, reason: Refusal) -> Refused:
        """Apply *command*, check it is refused for *reason*, and that nothing else changed."""
        before = self.state.snapshot()
        result = self.raw(command) if isinstance(command, bytes) else self(command)
        assert isinstance(result, Refused), result
        assert result.reason is reason, result
        assert result.message
        after = self.state.snapshot()
        # the applied index moves on; nothing else does
        assert after[9:] == before[9:]
        assert struct.unpack(">Q", after[1:9])[0] == self.index
        return result


def join(node_id: str, *roles: str, host: int = 0, at: float = 1.0, **kw: Any) -> Join:
    address = kw.pop("address", f"127.0.{host // 250}.{host % 250 + 2}:7000")
    return Join(node_id, roles or ("object",), address, at=at, **kw)


@pytest.fixture
def log() -> Log:
    return Log()


@pytest.fixture
def cluster(log: Log) -> Log:
    """One control node, three object nodes, one metadata node and a frontend."""
    log.ok(join("control-1", "control", host=1))
    for i in range(3):
        log.ok(join(f"object-{i}", "object", host=10 + i, zone=f"z{i}"))
    log.ok(join("meta-0", "metadata", host=20))
    log.ok(join("front-0", "frontend", host=30, http="127.0.0.99:8080", ssh="127.0.0.99:2222"))
    return log


# -- the interface and the plain paths ---------------------------------------------------


def test_it_is_a_raft_state_machine() -> None:
    """ControlState provides IStateMachine, so a RaftNode can drive it."""
    assert verifyObject(IStateMachine, ControlState())


def test_an_empty_entry_is_a_no_op(log: Log) -> None:
    """A leader's empty no-op entry changes nothing and returns None."""
    assert log.raw(b"") is None
    assert log.state.version == 0 and log.state.applied_index == 1


def test_an_entry_applied_twice_is_a_driver_bug(log: Log) -> None:
    """Applying an index at or below the applied one raises instead of applying twice."""
    log.ok(join("a", "control"))
    with pytest.raises(ValueError, match="applied twice"):
        log.state.apply(1, encode_command(join("b", "control", host=1)))


def test_a_new_member_joins_joining_and_its_first_heartbeat_makes_it_active(log: Log) -> None:
    """Join records the member (joining, heard from at the join); its first heartbeat activates it."""
    result = log.ok(join("front-0", "frontend", at=5.0, http="127.0.0.9:80", ssh="127.0.0.9:22"))
    assert result == Applied(epoch=0, version=1)
    m = log.state.members["front-0"]
    assert (m.state, m.last_heartbeat, m.roles) == (MemberState.JOINING, 5.0, {Role.FRONTEND})
    assert (m.http, m.ssh) == ("127.0.0.9:80", "127.0.0.9:22")
    assert log.ok(Heartbeat(("front-0",), at=7.5)) == Applied(0, 2)
    m = log.state.members["front-0"]
    assert (m.state, m.last_heartbeat) == (MemberState.ACTIVE, 7.5)


def test_heartbeats_move_times_without_a_new_version(cluster: Log) -> None:
    """A heartbeat of active members records the leader's time but is not a topology change."""
    cluster.ok(Heartbeat(("object-0", "meta-0"), at=2.0))
    version = cluster.state.version
    result = cluster.ok(Heartbeat(("object-0", "meta-0", "object-0"), at=3.0))
    assert result.version == version and not result.changed
    assert cluster.state.members["object-0"].last_heartbeat == 3.0


def test_heartbeats_of_strangers_are_ignored_and_listed(cluster: Log) -> None:
    """Ids that are not members (or were removed) are skipped, named in the result, and change nothing."""
    cluster.ok(Remove("front-0"))
    result = cluster.ok(Heartbeat(("nobody", "front-0", "meta-0"), at=9.0))
    assert result.ignored == ("nobody", "front-0")
    assert cluster.state.members["front-0"].last_heartbeat == 1.0
    assert cluster.state.members["meta-0"].last_heartbeat == 9.0


def test_a_large_heartbeat_batch_is_compressed_and_round_trips() -> None:
    """A batch past COMPRESS_OVER bytes is snappy-compressed, and decodes to the same command."""
    batch = Heartbeat(tuple(f"object-{i:04d}" for i in range(1000)), at=12.25)
    data = encode_command(batch)
    assert data[:2] == bytes([COMMAND_VERSION, 1])
    assert len(data) < len(json.dumps(list(batch.nodes))) // 2
    assert decode_command(data) == batch
    small = encode_command(Heartbeat(("a",), at=1.0))
    assert small[1] == 0 and len(small) < COMPRESS_OVER


# -- the ring -------------------------------------------------------------------------------


def test_ring_members_get_tokens_in_apply_and_each_join_bumps_the_epoch(log: Log) -> None:
    """An object or metadata join allocates its tokens with Ring.with_node and bumps the epoch."""
    log.ok(join("control-1", "control"))
    assert log.state.epoch == 0
    ring = Ring([], {}, vnodes=FAST.vnodes)
    for i in range(5):
        result = log.ok(join(f"object-{i}", "object", host=i + 1))
        ring = ring.with_node(Node(f"object-{i}"))
        assert result.epoch == i + 1
    topology = log.state.topology()
    assert topology.ring(Role.OBJECT) == ring
    assert topology.ring(Role.METADATA).token_map() == {}
    assert len(log.state.members["object-4"].tokens(Role.OBJECT)) == FAST.vnodes


def test_a_member_with_both_ring_roles_is_on_both_rings_with_one_epoch_bump(log: Log) -> None:
    """An object+metadata member gets tokens on each ring; the join bumps the epoch once."""
    result = log.ok(join("both", "object", "metadata", weight=2.0))
    assert result.epoch == 1
    m = log.state.members["both"]
    assert len(m.tokens(Role.OBJECT)) == len(m.tokens(Role.METADATA)) == 2 * FAST.vnodes
    topology = log.state.topology()
    assert (
        set(topology.ring(Role.OBJECT).nodes) == set(topology.ring(Role.METADATA).nodes) == {"both"}
    )


def test_a_down_member_keeps_its_place_on_the_ring(cluster: Log) -> None:
    """MarkDown changes the state, not the ring: the epoch and every token stay."""
    before = cluster.state.topology()
    result = cluster.ok(MarkDown("object-1", cutoff=2.0))
    assert result.epoch == before.epoch and result.version == before.version + 1
    after = cluster.state.topology()
    assert after.member("object-1").state is MemberState.DOWN  # type: ignore[union-attr]
    assert after.ring(Role.OBJECT) == before.ring(Role.OBJECT)


def test_drain_takes_a_member_off_its_ring_and_hands_its_tokens_on(cluster: Log) -> None:
    """Drain moves the member to draining and off the ring by Ring.without_node; the epoch bumps."""
    before = cluster.state.topology()
    result = cluster.ok(Drain("object-1"))
    assert result.epoch == before.epoch + 1
    after = cluster.state.topology()
    assert after.member("object-1").state is MemberState.DRAINING  # type: ignore[union-attr]
    assert after.member("object-1").object_tokens == b""  # type: ignore[union-attr]
    expected = before.ring(Role.OBJECT).without_node("object-1")
    assert after.ring(Role.OBJECT) == expected
    # every token stays on the ring, with another owner
    assert sum(map(len, after.ring(Role.OBJECT).token_map().values())) == 3 * FAST.vnodes
    again = cluster.ok(Drain("object-1"))
    assert not again.changed and again.epoch == result.epoch


def test_a_frontend_drains_without_a_ring_change(cluster: Log) -> None:
    """Draining a member that is on no ring bumps the version but not the epoch."""
    epoch = cluster.state.epoch
    assert cluster.ok(Drain("front-0")).epoch == epoch


def test_join_is_deterministic_on_every_replica() -> None:
    """Two replicas applying the same log hold byte-identical state, tokens included."""
    replica, other = Log(), Log()
    commands: list[Command] = [
        join("a", "object", "metadata", host=1, weight=0.5, zone="x"),
        join("b", "object", host=2),
        join("c", "metadata", host=3, weight=3.0),
        Drain("a"),
        join("d", "object", host=4),
    ]
    for command in commands:
        replica(command)
        other(command)
    assert replica.state.snapshot() == other.state.snapshot()
    assert replica.state.members["d"].object_tokens


def test_a_restored_replica_allocates_the_same_tokens(cluster: Log) -> None:
    """A replica restored from a snapshot (no cached rings) joins and drains exactly as the original."""
    restored = ControlState()
    restored.restore(cluster.state.snapshot())
    twin = Log(restored)
    commands: list[Command] = [join("object-9", "object", host=99, weight=1.5), Drain("object-0")]
    for command in commands:
        cluster(command)
        twin(command)
    assert twin.state == cluster.state
    assert twin.state.snapshot() == cluster.state.snapshot()


def test_a_snapshot_installed_over_newer_state_forgets_it(cluster: Log) -> None:
    """restore() replaces everything, cached placement included: the next join matches a fresh replica."""
    older = cluster.state.snapshot()
    cluster.ok(join("object-8", "object", host=80))
    cluster.state.restore(older)
    fresh = ControlState()
    fresh.restore(older)
    command = encode_command(join("object-9", "object", host=90))
    cluster.state.apply(cluster.state.applied_index + 1, command)
    fresh.apply(fresh.applied_index + 1, command)
    assert cluster.state == fresh


# -- refusals: every bad input, and nothing changes -------------------------------------------


BAD_ADDRESSES = [
    "",
    "127.0.0.2",
    "127.0.0.2:",
    "127.0.0.2:0",
    "127.0.0.2:65536",
    "127.0.0.2:07000",
    "127.0.0.2:7x",
    "127.0.0.2: 70",
    "127.0.0.02:7000",
    "0.0.0.0:7000",
    "[::]:7000",
    "[::1:7000",
    "::1:7000",
    "[zz::1]:7000",
    "999.1.1.1:7000",
    "-bad.example:7000",
    "bad_name.example:7000",
    "a..b:7000",
    "x" * 64 + ".example:7000",
    "tcp:127.0.0.2:7000",
    "127.0.0.2:7000\n",
    "127.0.0.2:\u0667",
]


@pytest.mark.parametrize("address", BAD_ADDRESSES)
def test_a_malformed_address_is_refused(cluster: Log, address: str) -> None:
    """A join whose AMP, HTTP or SSH address is not a dialable HOST:PORT is refused: BAD_ADDRESS."""
    cluster.refused(join("new", "object", address=address), Refusal.BAD_ADDRESS)
    cluster.refused(
        join("new", "frontend", host=70, http=address, ssh="127.0.0.70:22"), Refusal.BAD_ADDRESS
    )


@pytest.mark.parametrize(
    ("given", "canonical"),
    [
        ("127.0.0.2:7000", "127.0.0.2:7000"),
        ("Node-1.Example.COM.:22", "node-1.example.com:22"),
        ("[::1]:7000", "[::1]:7000"),
        ("[0:0:0:0:0:0:0:1]:7000", "[::1]:7000"),
        ("localhost:65535", "localhost:65535"),
    ],
)
def test_addresses_are_stored_canonical(given: str, canonical: str) -> None:
    """Addresses are normalised, so two spellings of one address are one address."""
    assert canonical_address(given) == canonical


def test_two_spellings_of_one_address_are_a_duplicate(cluster: Log) -> None:
    """The duplicate check compares canonical forms: [0::1] is [::1]."""
    cluster.ok(join("six", "frontend", address="[::1]:7000"))
    cluster.refused(join("seven", "frontend", address="[0:0::1]:7000"), Refusal.DUPLICATE_ADDRESS)


def test_a_duplicate_id_at_another_address_is_refused(cluster: Log) -> None:
    """A join with a member's id and another address is refused: DUPLICATE_ID."""
    cluster.refused(join("object-1", "object", host=77), Refusal.DUPLICATE_ID)


@pytest.mark.parametrize(
    "change",
    [{"weight": 2.0}, {"zone": "elsewhere"}, {"roles": ("object", "frontend")}],
    ids=["weight", "zone", "roles"],
)
def test_a_rejoin_with_other_settings_is_refused(cluster: Log, change: dict[str, Any]) -> None:
    """Same id and address but another weight, zone or roles is not a restart: DUPLICATE_ID."""
    cluster.refused(
        attrs.evolve(join("object-1", "object", host=11, zone="z1"), **change), Refusal.DUPLICATE_ID
    )


@pytest.mark.parametrize(
    "command",
    [
        join("new", "object", host=11),
        join("new", "frontend", host=70, http="127.0.0.13:7000"),
        join("new", "frontend", host=70, ssh="127.0.0.99:8080"),
        join("new", "frontend", host=70, http="127.0.0.71:1", ssh="127.0.0.71:1"),
        join("new", "frontend", address="127.0.0.99:2222"),
    ],
    ids=["amp", "http-vs-amp", "ssh-vs-http", "own-twice", "amp-vs-ssh"],
)
def test_a_duplicate_address_is_refused(cluster: Log, command: Join) -> None:
    """An address any live member (or this member's other service) uses is refused: DUPLICATE_ADDRESS."""
    cluster.refused(command, Refusal.DUPLICATE_ADDRESS)


@pytest.mark.parametrize("roles", [("storage",), (), ("object", "Object"), ("",)])
def test_an_unknown_role_is_refused(cluster: Log, roles: tuple[str, ...]) -> None:
    """A role that is not control, metadata, object or frontend (or none at all): UNKNOWN_ROLE."""
    cluster.refused(Join("new", roles, "127.0.0.88:1", at=1.0), Refusal.UNKNOWN_ROLE)


@pytest.mark.parametrize("weight", [0.0, -1.0, 1000.5, 1e-320 * 0, 10**400])
def test_a_bad_weight_is_refused(cluster: Log, weight: float) -> None:
    """A weight outside (0, 1000]: BAD_WEIGHT (a number no float holds is MALFORMED)."""
    if isinstance(weight, int):
        cluster.refused(raw_command(join("new", host=88), weight=weight), Refusal.MALFORMED)
    else:
        cluster.refused(join("new", "object", host=88, weight=weight), Refusal.BAD_WEIGHT)


@pytest.mark.parametrize("constant", ["Infinity", "-Infinity", "NaN"])
def test_a_weight_that_is_not_finite_is_malformed(cluster: Log, constant: str) -> None:
    """JSON's non-standard Infinity and NaN are not numbers here: MALFORMED."""
    data = raw_command(join("new", host=88), weight=1.25).replace(b"1.25", constant.encode())
    cluster.refused(data, Refusal.MALFORMED)


def raw_command(command: Command, **fields: Any) -> bytes:
    """*command*'s wire form with *fields* replaced, written by hand (json allows what we refuse)."""
    body = json.loads(encode_command(command)[2:])
    body.update(fields)
    return bytes([COMMAND_VERSION, 0]) + json.dumps(body).encode()


def test_a_weight_that_is_a_boolean_is_malformed(cluster: Log) -> None:
    """JSON true is not a number, whatever Python thinks: MALFORMED, not a weight of 1."""
    cluster.refused(raw_command(join("new", host=88), weight=True), Refusal.MALFORMED)


@pytest.mark.parametrize("node_id", ["", "-lead", "a b", "é", "x" * 129, "a/b", "a\n"])
def test_a_bad_id_is_refused(cluster: Log, node_id: str) -> None:
    """An id that is not 1 to 128 of A-Za-z0-9._- starting alphanumeric: BAD_ID."""
    cluster.refused(join(node_id, "object", host=88), Refusal.BAD_ID)


@pytest.mark.parametrize("zone", ["", " z", "z" * 65, "a/b"])
def test_a_bad_zone_is_refused(cluster: Log, zone: str) -> None:
    """A zone that is not 1 to 64 of A-Za-z0-9._-: BAD_ZONE."""
    cluster.refused(join("new", "object", host=88, zone=zone), Refusal.BAD_ZONE)


@pytest.mark.parametrize("at", [-1.0, -0.001])
def test_a_bad_time_is_refused(cluster: Log, at: float) -> None:
    """A join or heartbeat stamped before time zero: BAD_TIME."""
    cluster.refused(join("new", "object", host=88, at=at), Refusal.BAD_TIME)
    cluster.refused(Heartbeat(("object-0",), at=at), Refusal.BAD_TIME)
    cluster.refused(MarkDown("object-0", cutoff=at), Refusal.BAD_TIME)


def test_public_addresses_are_only_for_frontends(cluster: Log) -> None:
    """An object node with an HTTP or SSH address is refused: BAD_ADDRESS."""
    cluster.refused(join("new", "object", host=88, http="127.0.0.88:80"), Refusal.BAD_ADDRESS)
    cluster.refused(join("new", "control", host=88, ssh="127.0.0.88:22"), Refusal.BAD_ADDRESS)


@pytest.mark.parametrize(
    "command",
    [
        join("new", "object", host=88, expect_epoch=0),
        Leave("front-0", expect_epoch=3),
        Drain("object-0", expect_epoch=99),
        Remove("front-0", expect_epoch=0),
        SetConfig(replication=2, expect_epoch=1),
    ],
    ids=["join", "leave", "drain", "remove", "set_config"],
)
def test_a_stale_epoch_is_refused(cluster: Log, command: Command) -> None:
    """A command carrying an expect_epoch that is not the epoch: STALE_EPOCH."""
    assert cluster.state.epoch == 4
    cluster.refused(command, Refusal.STALE_EPOCH)
    assert unwrap(cluster(attrs.evolve(command, expect_epoch=4)))  # type: ignore[arg-type, misc]


def test_removing_the_last_control_node_is_refused(cluster: Log) -> None:
    """Remove or Leave of the only control member that is not removed: LAST_CONTROL."""
    cluster.refused(Remove("control-1"), Refusal.LAST_CONTROL)
    cluster.refused(Leave("control-1"), Refusal.LAST_CONTROL)
    cluster.ok(join("control-2", "control", host=2))
    cluster.ok(MarkDown("control-2", cutoff=5.0))
    cluster.ok(Remove("control-1"))
    cluster.refused(Remove("control-2"), Refusal.LAST_CONTROL)


@pytest.mark.parametrize("node_id", ["object-0", "meta-0"])
def test_removing_a_node_that_holds_data_is_refused_until_drained(
    cluster: Log, node_id: str
) -> None:
    """Remove of an object or metadata node that is not drained: HOLDS_DATA; after Drain it goes."""
    cluster.refused(Remove(node_id), Refusal.HOLDS_DATA)
    cluster.ok(MarkDown(node_id, cutoff=5.0))
    cluster.refused(Remove(node_id), Refusal.HOLDS_DATA)
    cluster.refused(Leave(node_id), Refusal.HOLDS_DATA)
    cluster.ok(Drain(node_id))
    result = cluster.ok(Remove(node_id))
    assert cluster.state.members[node_id].state is MemberState.REMOVED
    cluster.refused(Remove(node_id), Refusal.UNKNOWN_NODE)
    assert result.changed


def test_a_removed_members_address_and_id_can_be_used_again(cluster: Log) -> None:
    """Removal frees the member's addresses; its id may join again as a new member."""
    cluster.ok(Leave("front-0"))
    cluster.ok(join("front-1", "frontend", host=30, http="127.0.0.99:8080"))
    cluster.ok(Drain("object-2"))
    cluster.ok(Remove("object-2"))
    result = cluster.ok(join("object-2", "object", host=55))
    m = cluster.state.members["object-2"]
    assert m.state is MemberState.JOINING and m.address == "127.0.0.57:7000"
    assert len(m.tokens(Role.OBJECT)) == FAST.vnodes and result.epoch == cluster.state.epoch


@pytest.mark.parametrize(
    "command",
    [
        Leave("ghost"),
        Remove("ghost"),
        Drain("ghost"),
        MarkDown("ghost", 1.0),
        MarkActive("ghost", 1.0),
    ],
    ids=lambda c: type(c).__name__,
)
def test_commands_for_an_unknown_node_are_refused(cluster: Log, command: Command) -> None:
    """A command naming no member: UNKNOWN_NODE."""
    cluster.refused(command, Refusal.UNKNOWN_NODE)


def test_mark_down_and_active_recheck_the_heartbeat(cluster: Log) -> None:
    """MarkDown is refused for a member heard from at or after its cutoff, MarkActive before it."""
    cluster.ok(Heartbeat(("object-0",), at=10.0))
    cluster.refused(MarkDown("object-0", cutoff=10.0), Refusal.STALE_HEARTBEAT)
    cluster.ok(MarkDown("object-0", cutoff=10.5))
    cluster.refused(MarkActive("object-0", cutoff=10.5), Refusal.STALE_HEARTBEAT)
    cluster.ok(Heartbeat(("object-0",), at=20.0))
    assert cluster.state.members["object-0"].state is MemberState.DOWN
    cluster.ok(MarkActive("object-0", cutoff=15.0))
    assert cluster.state.members["object-0"].state is MemberState.ACTIVE


def test_mark_down_and_active_only_from_their_states(cluster: Log) -> None:
    """MarkDown needs joining or active, MarkActive needs down: BAD_STATE otherwise."""
    cluster.refused(MarkActive("object-0", cutoff=0.0), Refusal.BAD_STATE)
    cluster.ok(Drain("object-0"))
    cluster.refused(MarkDown("object-0", cutoff=5.0), Refusal.BAD_STATE)
    cluster.ok(MarkDown("object-1", cutoff=5.0))
    cluster.refused(MarkDown("object-1", cutoff=5.0), Refusal.BAD_STATE)


def test_a_restart_rejoin_is_idempotent_and_marks_active(cluster: Log) -> None:
    """Same id and address again (a restart) keeps the tokens and the epoch and marks it active."""
    before = cluster.state.members["object-1"]
    cluster.ok(MarkDown("object-1", cutoff=5.0))
    result = cluster.ok(join("object-1", "object", host=11, zone="z1", at=30.0))
    after = cluster.state.members["object-1"]
    assert after.state is MemberState.ACTIVE and after.last_heartbeat == 30.0
    assert after.object_tokens == before.object_tokens and result.epoch == 4
    again = cluster.ok(join("object-1", "object", host=11, zone="z1", at=31.0))
    assert not again.changed


def test_a_draining_member_that_restarts_stays_draining(cluster: Log) -> None:
    """A rejoin does not undo an operator's drain."""
    cluster.ok(Drain("object-1"))
    cluster.ok(join("object-1", "object", host=11, zone="z1", at=30.0))
    assert cluster.state.members["object-1"].state is MemberState.DRAINING


def test_a_frontend_may_change_its_public_addresses_on_restart(cluster: Log) -> None:
    """A rejoin may move a frontend's HTTP and SSH addresses (not to a taken one)."""
    cluster.ok(join("front-0", "frontend", host=30, http="127.0.0.98:80"))
    m = cluster.state.members["front-0"]
    assert (m.http, m.ssh) == ("127.0.0.98:80", None)
    cluster.refused(
        join("front-0", "frontend", host=30, http="127.0.0.12:7000"), Refusal.DUPLICATE_ADDRESS
    )


# -- config ------------------------------------------------------------------------------------


def test_config_defaults() -> None:
    """vnodes 256, three replicas, 64 metadata partitions, epoch 0."""
    state = ControlState()
    assert state.config == RingConfig(vnodes=256, replication=3, partitions=64)
    assert state.epoch == 0


def test_set_config_before_the_first_ring_member(log: Log) -> None:
    """Every value may change while no member is on a ring; a change bumps the epoch."""
    result = log.ok(SetConfig(vnodes=16, partitions=128))
    assert log.state.config == RingConfig(16, 3, 128) and result.epoch == 1
    log.ok(join("a", "object"))
    assert len(log.state.members["a"].tokens(Role.OBJECT)) == 16
    same = log.ok(SetConfig(vnodes=16))
    assert not same.changed


def test_vnodes_unlock_when_the_rings_empty_again(log: Log) -> None:
    """Once every ring member is drained, vnodes may change, and the next joiner gets the new count."""
    log.ok(join("a", "object"))
    log.refused(SetConfig(vnodes=16), Refusal.CONFIG_LOCKED)
    log.ok(Drain("a"))
    log.ok(SetConfig(vnodes=16))
    log.ok(join("b", "object", host=1))
    assert len(log.state.members["b"].tokens(Role.OBJECT)) == 16


def test_vnodes_and_partitions_are_locked_once_a_member_is_on_a_ring(cluster: Log) -> None:
    """Changing vnodes or partitions after the first ring member: CONFIG_LOCKED; replication may change."""
    cluster.refused(SetConfig(vnodes=16), Refusal.CONFIG_LOCKED)
    cluster.refused(SetConfig(partitions=8), Refusal.CONFIG_LOCKED)
    epoch = cluster.state.epoch
    assert cluster.ok(SetConfig(replication=5)).epoch == epoch + 1


@pytest.mark.parametrize(
    "command",
    [
        SetConfig(vnodes=0),
        SetConfig(vnodes=4097),
        SetConfig(replication=0),
        SetConfig(partitions=65537),
    ],
    ids=["vnodes-0", "vnodes-big", "replication-0", "partitions-big"],
)
def test_a_config_out_of_range_is_refused(log: Log, command: SetConfig) -> None:
    """Each config value has a range: BAD_CONFIG outside it."""
    log.refused(command, Refusal.BAD_CONFIG)


# -- the command codec -----------------------------------------------------------------------

ids = st.text("abcxyz-0", min_size=1, max_size=8)
times = st.floats(0, 1e9, allow_nan=False)
epochs = st.none() | st.integers(0, 2**62)
commands = st.one_of(
    st.builds(
        Join,
        ids,
        st.lists(st.sampled_from(["object", "metadata", "control", "frontend", "x"])).map(tuple),
        st.text(max_size=20),
        times,
        st.none() | st.text(max_size=5),
        st.none() | st.text(max_size=5),
        st.none() | st.text(max_size=5),
        st.floats(allow_nan=False, allow_infinity=False),
        epochs,
    ),
    st.builds(Leave, ids, epochs),
    st.builds(Heartbeat, st.lists(ids, max_size=300).map(tuple), times),
    st.builds(MarkDown, ids, times),
    st.builds(MarkActive, ids, times),
    st.builds(Drain, ids, epochs),
    st.builds(Remove, ids, epochs),
    st.builds(
        SetConfig,
        st.none() | st.integers(),
        st.none() | st.integers(),
        st.none() | st.integers(),
        epochs,
    ),
)


@settings(max_examples=200, deadline=None)
@given(commands)
def test_every_command_round_trips_its_wire_form(command: Command) -> None:
    """decode(encode(c)) == c for every command and field value, and the bytes are deterministic."""
    data = encode_command(command)
    assert decode_command(data) == command
    assert encode_command(attrs.evolve(command)) == data


def test_every_field_is_encoded() -> None:
    """A command with no field left at its default survives the round trip whole."""
    full = Join("a", ("object",), "h:1", 2.5, "h:2", "h:3", "z", 1.5, 7)
    assert all(getattr(full, f.name) != f.default for f in attrs.fields(Join))
    assert decode_command(encode_command(full)) == full
    assert decode_command(encode_command(SetConfig(1, 2, 3, 4))) == SetConfig(1, 2, 3, 4)


def _json(body: object) -> bytes:
    return bytes([COMMAND_VERSION, 0]) + json.dumps(body).encode()


MALFORMED = {
    "empty": b"\x01",
    "version": bytes([COMMAND_VERSION + 1, 0]) + b"{}",
    "flag": bytes([COMMAND_VERSION, 2]) + b"{}",
    "not json": _json(None)[:2] + b"{nope",
    "not utf-8": _json(None)[:2] + b'{"op":"\xff"}',
    "array": _json([]),
    "no op": _json({"id": "a"}),
    "op not a string": _json({"op": ["join"]}),
    "unknown op": _json({"op": "explode", "id": "a"}),
    "query as command": _json({"op": "get_topology"}),
    "missing field": _json({"op": "leave"}),
    "extra field": _json({"op": "leave", "id": "a", "expect_epoch": None, "why": "x"}),
    "wrong type": _json({"op": "leave", "id": 5, "expect_epoch": None}),
    "float epoch": _json({"op": "leave", "id": "a", "expect_epoch": 1.0}),
    "nan": _json(None)[:2] + b'{"op":"heartbeat","nodes":[],"at":NaN}',
    "roles not a list": raw_command(join("a"), roles="object"),
    "bad snappy": bytes([COMMAND_VERSION, 1]) + b"\x05garbage",
    "snappy bomb": bytes([COMMAND_VERSION, 1]) + b"\xff\xff\xff\xff\x0f" + b"\x00" * 8,
}


@pytest.mark.parametrize("data", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_bytes_are_refused(cluster: Log, data: bytes) -> None:
    """Bytes that are not exactly one command of this version: MALFORMED, and no change."""
    cluster.refused(data, Refusal.MALFORMED)


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=1, max_size=200))
def test_random_bytes_never_break_apply(data: bytes) -> None:
    """Whatever bytes reach apply, it returns a result and only what a command allows changes."""
    log = Log()
    log.ok(join("c", "control"))
    result = log.raw(data)
    assert isinstance(result, Applied | Refused)


def test_encode_refuses_what_is_not_a_command() -> None:
    """encode_command takes commands only; encode_query queries only."""
    with pytest.raises(TypeError):
        encode_command(GetTopology())  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        encode_query(Leave("a"))  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        encode_command(Heartbeat((), at=math.nan))


def test_unwrap_raises_the_refusal() -> None:
    """unwrap passes Applied through and raises CommandRefused carrying the reason."""
    assert unwrap(Applied(1, 2)) == Applied(1, 2)
    with pytest.raises(CommandRefused) as caught:
        unwrap(Refused(Refusal.HOLDS_DATA, "drain it"))
    assert caught.value.reason is Refusal.HOLDS_DATA and "HOLDS_DATA: drain it" in str(caught.value)
    with pytest.raises(TypeError):
        unwrap(None)


# -- queries -----------------------------------------------------------------------------------


def test_queries_answer_from_the_applied_state(cluster: Log) -> None:
    """GetTopology gives the frozen topology; GetMember one member or None; junk raises ValueError."""
    topology = cluster.state.query(encode_query(GetTopology()))
    assert topology == cluster.state.topology()
    member = cluster.state.query(encode_query(GetMember("meta-0")))
    assert isinstance(member, Member) and member.roles == {Role.METADATA}
    assert cluster.state.query(encode_query(GetMember("ghost"))) is None
    with pytest.raises(ValueError):
        cluster.state.query(encode_command(Leave("a")))
    assert decode_query(encode_query(GetMember("x"))) == GetMember("x")


# -- topology and snapshots -----------------------------------------------------------------------


def test_topology_round_trips_its_wire_form(cluster: Log) -> None:
    """decode(encode(t)) == t, rings included; the first byte is the version."""
    cluster.ok(MarkDown("object-2", cutoff=5.0))
    cluster.ok(Drain("meta-0"))
    topology = cluster.state.topology()
    data = topology.encode()
    assert data[0] == TOPOLOGY_VERSION
    decoded = Topology.decode(data)
    assert decoded == topology
    for role in RING_ROLES:
        assert decoded.ring(role) == topology.ring(role)
    assert decoded.ring(Role.OBJECT).epoch == topology.epoch


def test_topology_helpers(cluster: Log) -> None:
    """member() finds by id, with_role() filters by role and state, a role without a ring raises."""
    topology = cluster.state.topology()
    assert topology.member("ghost") is None
    assert [m.id for m in topology.with_role(Role.OBJECT)] == ["object-0", "object-1", "object-2"]
    assert list(topology.with_role(Role.OBJECT, [MemberState.DOWN])) == []
    assert [m.id for m in topology.members] == sorted(m.id for m in topology.members)
    with pytest.raises(ValueError):
        topology.ring(Role.FRONTEND)


def test_a_corrupt_topology_is_refused(cluster: Log) -> None:
    """A flipped bit, a truncation, another version or trailing bytes: TopologyError."""
    data = cluster.state.topology().encode()
    for bad in [
        data[:-1],
        data[:8],
        bytes([TOPOLOGY_VERSION + 1]) + data[1:],
        data[:20] + bytes([data[20] ^ 1]) + data[21:],
        data + b"\0",
        b"",
    ]:
        with pytest.raises(TopologyError):
            Topology.decode(bad)


def reencode(topology_bytes: bytes, edit: Any) -> bytes:
    """The topology with its JSON header changed by *edit*, with a valid checksum."""
    (length,) = struct.unpack_from(">I", topology_bytes, 1)
    header = json.loads(snappy.uncompress(topology_bytes[5 : 5 + length]))
    tokens = topology_bytes[5 + length : -4]
    tokens = edit(header, tokens) or tokens
    packed = snappy.compress(json.dumps(header).encode())
    body = bytes([TOPOLOGY_VERSION]) + struct.pack(">I", len(packed)) + packed + tokens
    return body + struct.pack(">I", zlib.crc32(body))


def _set(key: str, value: object, member: int | None = 0) -> Any:
    def edit(header: dict[str, Any], tokens: bytes) -> None:
        (header if member is None else header["members"][member])[key] = value

    return edit


INVALID = {
    "bad address": _set("address", "nowhere"),
    "bad state": _set("state", "asleep"),
    "bad role": _set("roles", ["wizard"]),
    "duplicate address": _set("address", "127.0.0.12:7000"),
    "ids out of order": _set("id", "zzz"),
    "tokens on a draining member": _set("state", "draining", 3),
    "tokens on a frontend": lambda h, t: (
        h["members"][1].update(object_tokens=8) or h["members"][3].update(object_tokens=0)
    ),
    "negative epoch": _set("epoch", -1, None),
    "bad config": _set("config", {"vnodes": 0, "replication": 3, "partitions": 64}, None),
    "extra key": _set("extra", 1, None),
    "tokens out of order": lambda h, t: t[8:16] + t[:8] + t[16:],
}


@pytest.mark.parametrize("edit", INVALID.values(), ids=INVALID.keys())
def test_a_topology_that_breaks_an_invariant_is_refused(cluster: Log, edit: Any) -> None:
    """A well-formed topology whose content is impossible is refused, so decoded rings always build."""
    data = cluster.state.topology().encode()
    assert Topology.decode(reencode(data, lambda h, t: None)) == cluster.state.topology()
    with pytest.raises(TopologyError):
        Topology.decode(reencode(data, edit))


def test_topology_size_limit_is_an_option(cluster: Log) -> None:
    """max_bytes bounds the form and what its header decompresses to."""
    data = cluster.state.topology().encode()
    with pytest.raises(TopologyError, match="over the"):
        Topology.decode(data, max_bytes=len(data) - 1)
    header_length = struct.unpack_from(">I", data, 1)[0]
    raw_length = len(snappy.uncompress(data[5 : 5 + header_length]))
    assert raw_length > len(data)
    with pytest.raises(TopologyError, match="decompress past"):
        Topology.decode(data, max_bytes=raw_length - 1)
    Topology.decode(data, max_bytes=raw_length)


def test_a_token_held_by_two_members_is_refused(cluster: Log) -> None:
    """Two members holding one token on a ring cannot be decoded (the ring could not be built)."""
    topology = cluster.state.topology()
    a, b = (topology.member(i) for i in ("object-0", "object-1"))
    assert a is not None and b is not None
    stolen = sorted({*b.tokens(Role.OBJECT), a.tokens(Role.OBJECT)[0]})
    members = tuple(
        m.with_tokens(Role.OBJECT, pack_tokens(stolen)) if m.id == b.id else m
        for m in topology.members
    )
    with pytest.raises(TopologyError, match="held twice"):
        Topology.decode(attrs.evolve(topology, members=members).encode())


def test_snapshot_restores_the_whole_state(cluster: Log) -> None:
    """restore(snapshot()) gives an equal state: members, tokens, config, epoch, version, index."""
    cluster.ok(SetConfig(replication=2))
    cluster.ok(MarkDown("object-0", cutoff=3.0))
    cluster.ok(Drain("object-1"))
    restored = ControlState()
    restored.restore(cluster.state.snapshot())
    assert restored == cluster.state
    assert restored.snapshot() == cluster.state.snapshot()


def test_a_corrupt_snapshot_changes_nothing(cluster: Log) -> None:
    """restore of bad bytes raises ValueError and leaves the state as it was."""
    snapshot = cluster.state.snapshot()
    state = ControlState()
    state.restore(snapshot)
    for bad in [b"", b"\x02" + snapshot[1:], snapshot[:-3]]:
        with pytest.raises(ValueError):
            state.restore(bad)
        assert state == cluster.state


def test_tokens_travel_packed() -> None:
    """250 members at 256 vnodes: 8 bytes a token, plus a small header (1,000 is in the report)."""
    ring = Ring.build([Node(f"object-{i:04d}", zone=f"zone-{i % 3}") for i in range(250)])
    tokens = ring.token_map()
    members = tuple(
        Member(
            id=f"object-{i:04d}",
            roles=frozenset({Role.OBJECT}),
            address=f"127.0.{i // 200}.{i % 200 + 2}:7000",
            state=MemberState.ACTIVE,
            last_heartbeat=1234567.5,
            zone=f"zone-{i % 3}",
            object_tokens=pack_tokens(tokens[f"object-{i:04d}"]),
        )
        for i in range(250)
    )
    topology = Topology(epoch=1, version=250, config=RingConfig(), members=members)
    data = topology.encode()
    assert 64_000 * 8 < len(data) < 64_000 * 8 + 25_000
    decoded = Topology.decode(data)
    assert decoded == topology
    assert build_ring(decoded.members, Role.OBJECT, 256, 1) == ring


# -- random command sequences ---------------------------------------------------------------------

POOL = [f"n{i}" for i in range(7)]
HOSTS = [f"127.0.0.{i}:7000" for i in range(2, 9)]
ROLE_SETS = [("control",), ("object",), ("metadata",), ("frontend",), ("object", "metadata")]


class ControlMachine(RuleBasedStateMachine):
    """Random joins, heartbeats, failures, drains, removals and config changes, checked after each step."""

    def __init__(self) -> None:
        super().__init__()
        self.log = Log()
        # the rings replayed with with_node / without_node alone, from what was applied
        self.model = {role: Ring([], {}, vnodes=FAST.vnodes) for role in RING_ROLES}
        self.last_epoch = 0
        self.last_version = 0
        self.had_control = False
        self.now = 1.0

    def step(self, command: Command) -> Any:
        before = self.log.state.snapshot()
        old = dict(self.log.state.members)
        result = self.log(command)
        if isinstance(result, Refused):
            assert self.log.state.snapshot()[9:] == before[9:], result
            return result
        assert isinstance(result, Applied)
        for role in RING_ROLES:
            for node_id, m in self.log.state.members.items():
                had = old.get(node_id)
                had_tokens = had is not None and bool(had.token_bytes(role))
                if m.token_bytes(role) and not had_tokens:
                    self.model[role] = self.model[role].with_node(m.ring_node())
                elif had_tokens and not m.token_bytes(role):
                    self.model[role] = self.model[role].without_node(node_id)
        return result

    @rule(
        i=st.integers(0, 6),
        h=st.integers(0, 6),
        roles=st.sampled_from(ROLE_SETS),
        w=st.sampled_from([0.5, 1.0, 2.0]),
    )
    def join(self, i: int, h: int, roles: tuple[str, ...], w: float) -> None:
        self.step(Join(POOL[i], roles, HOSTS[h], at=self.now, weight=w))

    @rule(i=st.integers(0, 6))
    def rejoin(self, i: int) -> None:
        m = self.log.state.members.get(POOL[i])
        if m is not None:
            roles = tuple(r.value for r in m.roles)
            result = self.step(
                Join(m.id, roles, m.address, at=self.now, weight=m.weight, zone=m.zone)
            )
            assert isinstance(result, Applied) or m.state is MemberState.REMOVED

    @rule(nodes=st.lists(st.integers(0, 6), max_size=4), dt=st.floats(0, 20))
    def heartbeat(self, nodes: list[int], dt: float) -> None:
        self.now += dt
        self.step(Heartbeat(tuple(POOL[i] for i in nodes), at=self.now))

    @rule(i=st.integers(0, 6), up=st.booleans())
    def mark(self, i: int, up: bool) -> None:
        cutoff = max(0.0, self.now - 10.0)
        self.step(MarkActive(POOL[i], cutoff) if up else MarkDown(POOL[i], cutoff))

    @rule(i=st.integers(0, 6), kind=st.sampled_from([Drain, Remove, Leave]))
    def operator(self, i: int, kind: type) -> None:
        self.step(kind(POOL[i]))

    @rule(r=st.integers(1, 4), v=st.sampled_from([None, 4, 8]), stale=st.booleans())
    def config(self, r: int, v: int | None, stale: bool) -> None:
        epoch = self.log.state.epoch + (1 if stale else 0)
        result = self.step(SetConfig(vnodes=v, replication=r, expect_epoch=epoch))
        if stale:
            assert isinstance(result, Refused) and result.reason is Refusal.STALE_EPOCH
        elif isinstance(result, Refused):
            assert result.reason is Refusal.CONFIG_LOCKED
        else:
            for role in RING_ROLES:
                # the model ring takes the new vnodes too (for the next join)
                old = self.model[role]
                vnodes = self.log.state.config.vnodes
                self.model[role] = Ring(old.nodes.values(), old.token_map(), vnodes=vnodes)

    @rule(data=st.binary(min_size=1, max_size=40))
    def garbage(self, data: bytes) -> None:
        before = self.log.state.snapshot()
        assert isinstance(self.log.raw(data), Refused)
        assert self.log.state.snapshot()[9:] == before[9:]

    @precondition(lambda self: self.log.index > 0)
    @rule()
    def restart_from_snapshot(self) -> None:
        restored = ControlState()
        restored.restore(self.log.state.snapshot())
        assert restored == self.log.state
        self.log = Log(restored)

    @invariant()
    def ids_and_addresses_unique_epoch_and_version_monotonic(self) -> None:
        state = self.log.state
        live = [m for m in state.members.values() if m.state is not MemberState.REMOVED]
        addresses = [a for m in live for a in m.addresses]
        assert len(addresses) == len(set(addresses))
        assert all(node_id == m.id for node_id, m in state.members.items())
        assert state.epoch >= self.last_epoch and state.version >= self.last_version
        self.last_epoch, self.last_version = state.epoch, state.version
        # once there is a control node, one always remains
        has_control = any(Role.CONTROL in m.roles for m in live)
        assert has_control or not self.had_control
        self.had_control = has_control

    @invariant()
    def the_ring_from_state_is_the_ring_replayed(self) -> None:
        topology = self.log.state.topology()
        for role in RING_ROLES:
            ring = topology.ring(role)
            assert ring.token_map() == self.model[role].token_map()
            assert dict(ring.nodes) == dict(self.model[role].nodes)
            on_ring = {
                m.id
                for m in topology.members
                if role in m.roles
                and m.state in {MemberState.JOINING, MemberState.ACTIVE, MemberState.DOWN}
            }
            assert set(ring.nodes) == on_ring

    @invariant()
    def the_topology_round_trips(self) -> None:
        topology = self.log.state.topology()
        assert Topology.decode(topology.encode()) == topology


TestControlMachine = ControlMachine.TestCase
TestControlMachine.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)


# -- under the real Raft driver -----------------------------------------------------------------


@pytest.fixture
def raft_cluster(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    """test_raft_node's three RaftNodes (Clock, memory network, LMDB logs), running ControlState."""
    import types

    import test_raft_node

    monkeypatch.setattr(
        test_raft_node, "kv", types.SimpleNamespace(KVStore=lambda: ControlState(config=FAST))
    )
    c = test_raft_node.Cluster(tmp_path, snapshot_every=5)
    yield c
    c.stop_all()


def test_a_raft_group_replicates_the_state_through_snapshots_and_restarts(
    raft_cluster: Any,
) -> None:
    """Proposals return Applied or Refused; a lagging follower catches up by InstallSnapshot and a
    restarted node from its snapshot and log, each to the leader's exact state."""
    c = raft_cluster
    leader = c.leader()
    lagging = c.followers()[0]
    c.network.isolated.add(lagging.config.id)
    for i in range(8):
        result = c.settle(leader.propose(encode_command(join(f"object-{i}", "object", host=i))))
        assert unwrap(result).epoch == i + 1
    refused = c.settle(leader.propose(encode_command(join("object-0", "object", host=50))))
    assert isinstance(refused, Refused) and refused.reason is Refusal.DUPLICATE_ID
    assert leader.snapshot_index > lagging.applied_index
    c.network.isolated.clear()
    c.run_until(lambda: lagging.applied_index >= leader.applied_index)
    assert lagging.snapshots_installed >= 1
    assert lagging.state_machine == leader.state_machine
    c.settle(leader.propose(encode_command(Drain("object-3"))))
    c.run(0.5)
    expected = leader.state_machine.snapshot()
    c.stop_all()
    restarted = c.start(lagging.config.id)
    c.clock.advance(0)
    assert restarted.state_machine.snapshot() == expected
    topology = restarted.state_machine.query(encode_query(GetTopology()))
    assert (
        "object-3" not in topology.ring(Role.OBJECT).nodes and len(topology.ring(Role.OBJECT)) == 7
    )
