"""The control plane's AMP server: writes through Raft or forwarded to the leader, reads from local state.

Every test runs on a ``Clock`` and ``iosim`` with a fake Raft node that
applies a proposal at once (or refuses it as a follower would).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import attrs
import pytest
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs
from twisted.protocols import amp
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.test.iosim import IOPump, connectedServerAndClient

from gitstratum.cluster import commands as wire
from gitstratum.cluster.auth import AuthenticationFailed, NodeAMP, NotAuthenticated
from gitstratum.control import tap
from gitstratum.control.commands import (
    Heartbeat,
    Join,
    MarkActive,
    MarkDown,
    Remove,
    decode_command,
    encode_command,
)
from gitstratum.control.service import ControlPlane, ControlServer, ObservedState
from gitstratum.control.state import ControlState
from gitstratum.control.topology import MemberState, Topology
from gitstratum.raft.types import NotLeader

SECRET = b"s" * 32


@attrs.define
class FakeRaft:
    """Applies each proposal at once when leading; refuses as a follower does otherwise."""

    machine: ObservedState
    is_leader: bool = True
    leader_id: int = 1
    term: int = 3
    index: int = 0
    proposed: list[Any] = attrs.Factory(list)

    def propose(self, data: bytes) -> Deferred[Any]:
        if not self.is_leader:
            return fail(NotLeader(self.leader_id))
        self.index += 1
        self.proposed.append(decode_command(data))
        return succeed(self.machine.apply(self.index, data))


@attrs.define
class Node:
    plane: ControlPlane
    raft: FakeRaft
    state: ControlState
    pumps: list[IOPump] = attrs.Factory(list)


def make_node(
    name: str,
    clock: Clock,
    *,
    leader: bool = True,
    leader_id: int = 1,
    dial: Callable[[str], Deferred[NodeAMP]] | None = None,
    window: float = 10.0,
) -> Node:
    state = ControlState()
    plane = ControlPlane(
        name=name,
        advertise=f"127.0.0.{2 if name == 'c1' else 3}:7100",
        state=state,
        raft=None,  # type: ignore[arg-type]
        clock=clock,
        names={1: "c1", 2: "c2"},
        dial=dial or (lambda address: fail(ConnectionRefusedError(address))),
        window=window,
        interval=0.5,
    )
    raft = FakeRaft(ObservedState(state, plane.changed), is_leader=leader, leader_id=leader_id)
    plane.raft = raft
    return Node(plane, raft, state)


def connect(
    node: Node, clock: Clock, *, client_secret: bytes | None = SECRET, name: str = "obj-1"
) -> tuple[NodeAMP, IOPump]:
    """A client connection to *node*'s server, authenticated when *client_secret* is given."""
    client, server, pump = connectedServerAndClient(
        lambda: ControlServer(node.plane, SECRET, clock),
        lambda: NodeAMP(client_secret or b"x" * 32, name, clock),
    )
    node.pumps.append(pump)
    if client_secret is not None:
        out: list[Any] = []
        client.authenticate().addBoth(out.append)
        pump.flush()
        value(out)
    return client, pump


def flush(*nodes: Node) -> None:
    moved = True
    while moved:
        moved = False
        for node in nodes:
            for pump in node.pumps:
                moved = pump.flush() or moved


def ask(client: NodeAMP, command: type[amp.Command], **kw: Any) -> list[Any]:
    """Send *command*; its outcome lands in the list (AMP wants errbacks before the answer)."""
    out: list[Any] = []
    client.callRemote(command, **kw).addBoth(out.append)
    return out


def value(out: list[Any]) -> Any:
    assert out, "no answer yet"
    if isinstance(out[0], Failure):
        out[0].raiseException()
    return out[0]


def result(d: Deferred[Any]) -> Any:
    out: list[Any] = []
    d.addBoth(out.append)
    return value(out)


def call(client: NodeAMP, nodes: list[Node], command: type[amp.Command], **kw: Any) -> Any:
    out = ask(client, command, **kw)
    flush(*nodes)
    return value(out)


def join_bytes(node_id: str = "obj-1", address: str = "127.0.1.1:9000", **kw: Any) -> bytes:
    return encode_command(Join(node_id, kw.pop("roles", ("object",)), address, 0.0, **kw))


# -- writes on the leader -----------------------------------------------------------------


def test_a_join_on_the_leader_is_proposed_with_the_leaders_clock() -> None:
    """Join is applied through Raft; its time is the leader's clock, not the member's."""
    clock = Clock()
    clock.advance(1000)
    node = make_node("c1", clock)
    client, _ = connect(node, clock)
    answer = call(client, [node], wire.Join, member=join_bytes())
    member = node.state.members["obj-1"]
    assert answer == {"epoch": node.state.epoch} and answer["epoch"] == 1
    assert member.state is MemberState.JOINING and member.last_heartbeat == 1000.0


@pytest.mark.parametrize(
    ("member", "tag"),
    [
        (b"garbage", "MALFORMED"),
        (encode_command(Remove("obj-1")), "MALFORMED"),
        (join_bytes("obj-2", "127.0.1.1:9000"), "DUPLICATE_ADDRESS"),
        (join_bytes("obj-1", "127.0.1.9:9000"), "DUPLICATE_ID"),
        (join_bytes("obj-3", "127.0.1.3:9000", roles=("wizard",)), "UNKNOWN_ROLE"),
        (join_bytes("obj-3", "not an address"), "BAD_ADDRESS"),
        (join_bytes("bad id!", "127.0.1.3:9000"), "BAD_ID"),
        (join_bytes("obj-3", "127.0.1.3:9000", expect_epoch=99), "STALE_EPOCH"),
    ],
)
def test_a_bad_join_gets_a_clear_error_and_changes_nothing(member: bytes, tag: str) -> None:
    """Every refused join names its reason, and the state's version does not move."""
    clock = Clock()
    node = make_node("c1", clock)
    client, _ = connect(node, clock)
    call(client, [node], wire.Join, member=join_bytes())
    before = node.state.topology()
    error = wire.StaleEpoch if tag == "STALE_EPOCH" else wire.Refused
    with pytest.raises(error, match="epoch" if tag == "STALE_EPOCH" else tag):
        call(client, [node], wire.Join, member=member)
    assert node.state.topology() == before


@pytest.mark.parametrize(
    ("command", "kw", "error", "match"),
    [
        (wire.Remove, {"node": "nobody"}, wire.Refused, "UNKNOWN_NODE"),
        (wire.Remove, {"node": "obj-1"}, wire.Refused, "HOLDS_DATA"),
        (wire.Drain, {"node": "obj-1", "expect_epoch": 7}, wire.StaleEpoch, "epoch"),
        (wire.Leave, {"node": "nobody"}, wire.Refused, "UNKNOWN_NODE"),
        (wire.Heartbeat, {"node": "nobody"}, wire.Refused, "UNKNOWN_NODE"),
        (wire.Heartbeat, {"node": "bad id!"}, wire.Refused, "BAD_ID"),
        (wire.GetTopology, {"epoch": -1, "offset": 0}, wire.Refused, "BAD_EPOCH"),
        (wire.GetTopology, {"epoch": 0, "offset": 10**9}, wire.Refused, "BAD_OFFSET"),
        (wire.WatchTopology, {"since": 0, "wait": -1.0}, wire.Refused, "BAD_WAIT"),
        (wire.WatchTopology, {"since": 0, "wait": float("nan")}, wire.Refused, "BAD_WAIT"),
        (wire.WatchTopology, {"since": -5, "wait": 1.0}, wire.Refused, "BAD_EPOCH"),
    ],
)
def test_every_bad_command_gets_a_clear_error_and_changes_nothing(
    command: type[amp.Command], kw: dict[str, Any], error: type[Exception], match: str
) -> None:
    """Operator and member commands with bad values are refused by name; nothing changes."""
    clock = Clock()
    node = make_node("c1", clock)
    client, _ = connect(node, clock)
    call(client, [node], wire.Join, member=join_bytes())
    before = node.state.topology()
    with pytest.raises(error, match=match):
        call(client, [node], command, **kw)
    assert node.state.topology() == before


def test_drain_and_remove_go_through_raft() -> None:
    """An operator drains a member (off the ring, epoch moves), then removes it."""
    clock = Clock()
    node = make_node("c1", clock)
    client, _ = connect(node, clock)
    joined = call(client, [node], wire.Join, member=join_bytes())["epoch"]
    drained = call(client, [node], wire.Drain, node="obj-1", expect_epoch=joined)["epoch"]
    assert drained == joined + 1
    call(client, [node], wire.Remove, node="obj-1")
    assert node.state.members["obj-1"].state is MemberState.REMOVED


# -- the secret ---------------------------------------------------------------------------


def test_a_command_without_the_secret_is_refused() -> None:
    """An unauthenticated peer's Join gets NOT_AUTHENTICATED and changes nothing."""
    clock = Clock()
    node = make_node("c1", clock)
    client, _ = connect(node, clock, client_secret=None)
    with pytest.raises(NotAuthenticated, match="prove the cluster secret"):
        call(client, [node], wire.Join, member=join_bytes())
    assert node.state.members == {} and node.raft.proposed == []


def test_a_peer_with_another_secret_cannot_authenticate() -> None:
    """A client holding a different secret fails the proof and is hung up on."""
    clock = Clock()
    node = make_node("c1", clock)
    client, server, pump = connectedServerAndClient(
        lambda: ControlServer(node.plane, SECRET, clock),
        lambda: NodeAMP(b"w" * 32, "obj-1", clock),
    )
    out: list[Any] = []
    client.authenticate().addBoth(out.append)
    pump.flush()
    with pytest.raises(AuthenticationFailed, match="secret"):
        value(out)
    assert server.peer_node is None


# -- followers ----------------------------------------------------------------------------


def leader_and_follower(clock: Clock) -> tuple[Node, Node]:
    leader = make_node("c1", clock)

    def dial(address: str) -> Deferred[NodeAMP]:
        assert address == leader.plane.advertise
        client, _ = connect(leader, clock, name="c2")
        return succeed(client)

    follower = make_node("c2", clock, leader=False, leader_id=1, dial=dial)
    # both know where c1 is: the leader has joined itself
    own = encode_command(Join("c1", ("control",), leader.plane.advertise, 0.0))
    for node in (leader, follower):
        node.state.apply(1, own)
    leader.raft.index = 1
    return leader, follower


def test_a_follower_forwards_writes_to_the_leader() -> None:
    """A member talking to a follower has its join applied by the leader; it never learns who leads."""
    clock = Clock()
    leader, follower = leader_and_follower(clock)
    client, _ = connect(follower, clock)
    answer = call(client, [leader, follower], wire.Join, member=join_bytes())
    assert "obj-1" in leader.state.members
    assert answer["epoch"] == leader.state.epoch
    # refusals come back through the follower unchanged
    with pytest.raises(wire.Refused, match="DUPLICATE_ADDRESS"):
        call(client, [leader, follower], wire.Join, member=join_bytes("obj-2"))
    heartbeat = call(client, [leader, follower], wire.Heartbeat, node="obj-1")
    assert heartbeat["epoch"] == leader.state.epoch


def test_no_leader_is_no_leader() -> None:
    """With no leader known the answer is NO_LEADER and nothing is proposed anywhere."""
    clock = Clock()
    node = make_node("c2", clock, leader=False, leader_id=0)
    client, _ = connect(node, clock)
    for command, kw in [
        (wire.Join, {"member": join_bytes()}),
        (wire.Heartbeat, {"node": "obj-1"}),
        (wire.Drain, {"node": "obj-1"}),
    ]:
        with pytest.raises(wire.NoLeader):
            call(client, [node], command, **kw)
    assert node.state.members == {}


def test_an_unreachable_leader_is_no_leader() -> None:
    """A follower that cannot dial the leader answers NO_LEADER rather than hanging."""
    clock = Clock()
    leader, _ = leader_and_follower(clock)
    follower = make_node("c2", clock, leader=False, leader_id=1)
    follower.state.apply(1, encode_command(Join("c1", ("control",), "127.0.0.2:7100", 0.0)))
    client, _ = connect(follower, clock)
    with pytest.raises(wire.NoLeader, match="could not reach the leader"):
        call(client, [follower], wire.Join, member=join_bytes())


def test_a_command_from_another_control_node_is_not_forwarded_again() -> None:
    """A follower does not pass on what another control node forwarded to it: no loops."""
    clock = Clock()
    leader, follower = leader_and_follower(clock)
    client, _ = connect(follower, clock, name="c1")
    with pytest.raises(wire.NoLeader, match="does not lead either"):
        call(client, [leader, follower], wire.Join, member=join_bytes())
    assert "obj-1" not in leader.state.members


# -- reads --------------------------------------------------------------------------------


def big_node(clock: Clock, members: int = 40) -> Node:
    node = make_node("c1", clock)
    for i in range(members):
        node.state.execute(Join(f"obj-{i:03}", ("object",), f"127.0.2.{i + 1}:9000", 0.0))
    return node


def fetch(client: NodeAMP, node: Node) -> tuple[int, bytes]:
    first = call(client, [node], wire.GetTopology, epoch=0, offset=0)
    data = first["page"]
    while len(data) < first["total"]:
        data += call(client, [node], wire.GetTopology, epoch=first["epoch"], offset=len(data))[
            "page"
        ]
    return first["epoch"], data


def test_get_topology_pages_a_topology_larger_than_one_value() -> None:
    """Forty object members are over one AMP value; the pages reassemble to the state's topology."""
    clock = Clock()
    node = big_node(clock)
    client, _ = connect(node, clock)
    epoch, data = fetch(client, node)
    assert len(data) > wire.PAGE_BYTES
    assert Topology.decode(data) == node.state.topology() and epoch == node.state.epoch


def test_a_fetch_keeps_its_bytes_when_the_version_moves() -> None:
    """A member marked down mid-fetch (same epoch, new version) does not tear the fetch."""
    clock = Clock()
    node = big_node(clock)
    client, _ = connect(node, clock)
    first = call(client, [node], wire.GetTopology, epoch=0, offset=0)
    node.state.execute(MarkDown("obj-000", 1.0))
    rest = call(client, [node], wire.GetTopology, epoch=first["epoch"], offset=len(first["page"]))
    data = first["page"] + rest["page"]
    while len(data) < first["total"]:
        data += call(client, [node], wire.GetTopology, epoch=first["epoch"], offset=len(data))[
            "page"
        ]
    assert Topology.decode(data).member("obj-000").state is MemberState.JOINING  # type: ignore[union-attr]


def test_a_page_of_a_past_epoch_is_stale() -> None:
    """Once the epoch has moved, a page of the old one fails with STALE_EPOCH on a new connection."""
    clock = Clock()
    node = big_node(clock)
    client, _ = connect(node, clock)
    old = call(client, [node], wire.GetTopology, epoch=0, offset=0)["epoch"]
    node.state.execute(Join("obj-new", ("object",), "127.0.3.1:9000", 0.0))
    other, _ = connect(node, clock)
    with pytest.raises(wire.StaleEpoch):
        call(other, [node], wire.GetTopology, epoch=old, offset=wire.PAGE_BYTES)


def test_watch_answers_when_the_epoch_passes() -> None:
    """A watch is held until a join moves the epoch, then answered at once with it."""
    clock = Clock()
    node = make_node("c1", clock)
    watcher, _ = connect(node, clock, name="obj-9")
    client, _ = connect(node, clock)
    d = ask(watcher, wire.WatchTopology, since=0, wait=30.0)
    flush(node)
    assert not d and node.plane.watching == 1
    call(client, [node], wire.Join, member=join_bytes())
    flush(node)
    assert value(d) == {"epoch": 1, "version": 1}
    assert node.plane.watching == 0


def test_watch_times_out_with_the_same_epoch() -> None:
    """With no change, the watch is answered after its wait (capped by max_watch) with the same epoch."""
    clock = Clock()
    node = make_node("c1", clock)
    watcher, _ = connect(node, clock)
    d = ask(watcher, wire.WatchTopology, since=0, wait=1e9)
    flush(node)
    clock.advance(node.plane.max_watch - 1)
    flush(node)
    assert not d
    clock.advance(1)
    flush(node)
    assert value(d)["epoch"] == 0


def test_watch_on_version_sees_a_member_go_down() -> None:
    """``since_version`` wakes a watcher on a state change that does not move the epoch."""
    clock = Clock()
    node = make_node("c1", clock)
    client, _ = connect(node, clock)
    call(client, [node], wire.Join, member=join_bytes())
    version = node.state.version
    d = ask(client, wire.WatchTopology, since=node.state.epoch, wait=30.0, since_version=version)
    flush(node)
    assert not d
    node.raft.propose(encode_command(MarkDown("obj-1", 1.0)))
    flush(node)
    assert value(d)["version"] == version + 1


def test_one_watch_per_connection_and_a_lost_connection_drops_it() -> None:
    """A second concurrent watch on a connection is refused; closing the connection frees the first."""
    clock = Clock()
    node = make_node("c1", clock)
    client, pump = connect(node, clock)
    ask(client, wire.WatchTopology, since=0, wait=30.0)
    flush(node)
    with pytest.raises(wire.Refused, match="BUSY"):
        call(client, [node], wire.WatchTopology, since=0, wait=30.0)
    with capturedLogs() as events:
        client.transport.loseConnection()
        flush(node)
    assert node.plane.watching == 0
    assert not [e for e in events if e["log_level"] in (LogLevel.critical, LogLevel.error)]


def test_cluster_status_lists_members_leader_and_term() -> None:
    """ClusterStatus is JSON with every member, the leader's name and the term."""
    clock = Clock()
    node = make_node("c1", clock)
    client, _ = connect(node, clock)
    call(client, [node], wire.Join, member=join_bytes())
    status = json.loads(call(client, [node], wire.ClusterStatus)["status"])
    assert status["leader"] == "c1" and status["term"] == 3 and status["epoch"] == 1
    assert [(n["name"], n["state"], n["role"]) for n in status["nodes"]] == [
        ("obj-1", "joining", "object")
    ]


# -- the leader's interval ------------------------------------------------------------------


def test_heartbeats_are_batched_into_one_proposal_per_interval() -> None:
    """Three members' heartbeats (and the leader's own) commit as one Heartbeat entry."""
    clock = Clock()
    node = make_node("c1", clock)
    node.plane.start()
    client, _ = connect(node, clock)
    clock.advance(0.5)  # the leader joins itself
    for i in range(3):
        call(client, [node], wire.Join, member=join_bytes(f"obj-{i}", f"127.0.1.{i + 1}:9000"))
    node.raft.proposed.clear()
    for i in range(3):
        assert call(client, [node], wire.Heartbeat, node=f"obj-{i}")["epoch"] == node.state.epoch
    assert node.raft.proposed == []
    clock.advance(0.5)
    assert node.raft.proposed == [Heartbeat(("c1", "obj-0", "obj-1", "obj-2"), clock.seconds())]
    assert node.state.members["obj-0"].state is MemberState.ACTIVE
    node.plane.stop()


def test_the_leader_marks_a_silent_member_down_and_active_again() -> None:
    """After the window (and the new leader's grace), silence is MarkDown; a heartbeat brings MarkActive."""
    clock = Clock()
    node = make_node("c1", clock, window=2.0)
    node.plane.start()
    client, _ = connect(node, clock)
    clock.advance(0.5)
    call(client, [node], wire.Join, member=join_bytes())
    for _ in range(5):
        clock.advance(0.5)
    assert node.state.members["obj-1"].state is MemberState.DOWN
    assert node.state.members["c1"].state is MemberState.ACTIVE
    assert any(isinstance(c, MarkDown) for c in node.raft.proposed)
    call(client, [node], wire.Heartbeat, node="obj-1")
    clock.advance(0.5)
    clock.advance(0.5)
    assert node.state.members["obj-1"].state is MemberState.ACTIVE
    assert any(isinstance(c, MarkActive) for c in node.raft.proposed)
    node.plane.stop()


def test_a_new_leader_waits_one_window_before_marking_anyone_down() -> None:
    """Heartbeats sent during an election went nowhere: no MarkDown until took_office + window."""
    clock = Clock()
    node = make_node("c1", clock, window=2.0)
    node.state.execute(Join("obj-1", ("object",), "127.0.1.1:9000", 0.0))
    clock.advance(100)
    node.plane.start()
    clock.advance(0.5)
    assert node.state.members["obj-1"].state is MemberState.JOINING
    for _ in range(5):
        clock.advance(0.5)
    assert node.state.members["obj-1"].state is MemberState.DOWN
    node.plane.stop()


def test_a_follower_joins_and_heartbeats_itself_through_the_leader() -> None:
    """Control nodes are members: a follower's own join and heartbeats reach the leader."""
    clock = Clock()
    leader, follower = leader_and_follower(clock)
    follower.plane.start()
    clock.advance(0.5)
    flush(leader, follower)
    assert leader.state.members["c2"].address == follower.plane.advertise
    follower.state.apply(2, encode_command(Join("c2", ("control",), follower.plane.advertise, 0.0)))
    clock.advance(0.5)
    flush(leader, follower)
    leader.plane.every_interval()
    assert leader.state.members["c2"].state is MemberState.ACTIVE
    follower.plane.stop()


def test_bad_intervals_are_refused() -> None:
    """The interval and the watch cap are positive numbers (options with defaults)."""
    with pytest.raises(ValueError, match="interval"):
        attrs.evolve(make_node("c1", Clock()).plane, interval=0)
    with pytest.raises(ValueError, match="max_watch"):
        attrs.evolve(make_node("c1", Clock()).plane, max_watch=float("inf"))


# -- the command line -----------------------------------------------------------------------

BASE = [
    "--data-dir",
    "/tmp/x",
    "--name",
    "c2",
    "--initial-cluster",
    "c1=127.0.0.2:7200,c2=127.0.0.3:7200,c3=127.0.0.4:7200",
    "--listen",
    "tcp:7100:interface=127.0.0.3",
]


def parse(*argv: str) -> tap.Options:
    options = tap.Options()
    options.parseOptions(list(argv))
    return options


def test_options_derive_the_raft_listener_and_the_advertised_address() -> None:
    """Node ids follow --initial-cluster order; Raft listens on this node's entry by default."""
    options = parse(*BASE)
    assert [n for n, _ in options["cluster"]] == ["c1", "c2", "c3"]
    assert options["raft-listen"] == "tcp:7200:interface=127.0.0.3"
    assert options["advertise"] == "127.0.0.3:7100"
    assert options["heartbeat-window"] == 10.0 and options["tick"] == 0.05


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--data-dir", "/tmp/x", "--name", "c1", "--join", "127.0.0.2:7100"], "not supported yet"),
        (["--data-dir", "/tmp/x", "--name", "c1"], "--initial-cluster is required"),
        ([*BASE[:3], "c9", *BASE[4:]], "not in --initial-cluster"),
        ([*BASE[:5], "c1=127.0.0.2:7200,c1=127.0.0.3:7200", *BASE[6:]], "twice"),
        ([*BASE[:5], "c1=nowhere", *BASE[6:]], "BAD_ADDRESS"),
        ([*BASE[:5], "c1", *BASE[6:]], "NAME=HOST:PORT"),
        ([*BASE, "--heartbeat-window", "0"], "positive"),
        ([*BASE[:7], "tcp:7100"], "--advertise"),
    ],
)
def test_bad_command_lines_are_refused_clearly(argv: list[str], message: str) -> None:
    """Each mistake on the command line gets a usage error that names it."""
    with pytest.raises(usage.UsageError, match=message):
        parse(*argv)
