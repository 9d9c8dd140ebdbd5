"""The member service against a fake control plane: join, heartbeat, watch, failover, the disk copy.

The fake control plane is one :class:`ControlState` (as if Raft had
replicated it) answered by :class:`FakeControl` connections, one per dial,
over iosim pumps on a :class:`Clock`; an address can be taken down (its
connections drop, new dials are refused) and brought back.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import attrs
import pytest
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.protocol import Factory
from twisted.internet.task import Clock
from twisted.test import iosim

from gitstratum.cluster import commands as wire
from gitstratum.cluster.auth import NodeAMP
from gitstratum.cluster.member import MemberService, control_endpoint, parse_join
from gitstratum.control import commands as ctl
from gitstratum.control.state import ControlState
from gitstratum.control.topology import RingConfig, Topology

SECRET = b"s" * 32
ME = "object-1"


class ControlPlane:
    """The replicated state every fake control node answers from, and the watches waiting on it."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.state = ControlState(config=RingConfig(vnodes=8))
        self.watches: list[tuple[tuple[int, int], Deferred[dict[str, Any]]]] = []
        self.heartbeats: list[str] = []
        self.joins: list[str] = []
        self.no_leader = 0
        self.page_bytes = 200
        #: called with the offset of each GetTopology page served (to tear a fetch)
        self.on_page: Any = None

    def execute(self, command: ctl.Command) -> ctl.Applied:
        result = self.state.execute(command)
        if isinstance(result, ctl.Applied):
            self._wake()
            return result
        raise wire.Refused(f"{result.reason.value}: {result.message}")

    def join(self, node_id: str, host: int) -> None:
        """Another node joins (a new epoch, since it takes object tokens)."""
        self.execute(
            ctl.Join(node_id, ("object",), f"127.0.0.{host}:7000", at=self.clock.seconds())
        )

    def _wake(self) -> None:
        waiting, self.watches = self.watches, []
        for since, d in waiting:
            if d.called:
                continue
            if since != self.now():
                d.callback(self.answer())
            else:
                self.watches.append((since, d))

    def now(self) -> tuple[int, int]:
        return self.state.epoch, self.state.version

    def answer(self) -> dict[str, int]:
        """What the control service answers a watch or a heartbeat with."""
        return {"epoch": self.state.epoch, "version": self.state.version}


class FakeControl(NodeAMP):
    """One control node's end of a connection: the cluster commands, answered from the plane."""

    def __init__(self, plane: ControlPlane, secret: bytes = SECRET) -> None:
        super().__init__(secret, "control-1", plane.clock)
        self.plane = plane

    @wire.Join.responder
    def join(self, member: bytes) -> dict[str, Any]:
        if self.plane.no_leader:
            self.plane.no_leader -= 1
            raise wire.NoLeader("election under way")
        command = ctl.decode_command(member)
        assert isinstance(command, ctl.Join)
        self.plane.joins.append(command.id)
        applied = self.plane.execute(attrs.evolve(command, at=self.plane.clock.seconds()))
        return {"epoch": applied.epoch}

    @wire.Heartbeat.responder
    def heartbeat(self, node: str) -> dict[str, Any]:
        self.plane.heartbeats.append(node)
        self.plane.execute(ctl.Heartbeat((node,), self.plane.clock.seconds()))
        return self.plane.answer()

    @wire.WatchTopology.responder
    def watch(self, since: int, wait: float, since_version: int | None = None) -> Any:
        seen = (since, since_version if since_version is not None else self.plane.state.version)
        if seen != self.plane.now():
            return self.plane.answer()
        d: Deferred[dict[str, Any]] = Deferred()
        self.plane.watches.append((seen, d))
        call = self.plane.clock.callLater(wait, lambda: d.called or d.callback(self.plane.answer()))
        d.addBoth(lambda r: (call.active() and call.cancel(), r)[1])
        return d

    @wire.GetTopology.responder
    def get_topology(self, epoch: int, offset: int) -> dict[str, Any]:
        state = self.plane.state
        if epoch not in (0, state.epoch):
            raise wire.StaleEpoch(f"epoch {epoch} is gone; it is {state.epoch}")
        blob = state.topology().encode()
        page = blob[offset : offset + self.plane.page_bytes]
        answer = {"epoch": state.epoch, "total": len(blob), "page": page}
        if self.plane.on_page is not None:
            self.plane.on_page(offset)
        return answer


class Endpoint:
    """A client endpoint to one address of the fake network."""

    def __init__(self, net: Net, address: str) -> None:
        self.net = net
        self.address = address

    def connect(self, factory: Factory) -> Deferred[Any]:
        net = self.net
        if self.address not in net.up:
            return fail(ConnectionRefusedError(self.address))
        client = factory.buildProtocol(None)
        server = FakeControl(net.plane, net.up[self.address])
        pump = iosim.connect(
            server,
            iosim.makeFakeServer(server),
            client,
            iosim.makeFakeClient(client),
            greet=False,
            clock=net.clock,
        )
        net.pumps.append((self.address, pump))
        return succeed(client)


class Net:
    """Loopback addresses to fake control nodes, pumped while the clock runs."""

    def __init__(self, clock: Clock, plane: ControlPlane, *addresses: str) -> None:
        self.clock = clock
        self.plane = plane
        #: the addresses that answer, each with the secret its control node holds
        self.up: dict[str, bytes] = {a: SECRET for a in addresses}
        self.pumps: list[tuple[str, iosim.IOPump]] = []
        self.dials: list[str] = []

    def endpoint(self, address: str) -> Endpoint:
        self.dials.append(address)
        return Endpoint(self, address)

    def flush(self) -> None:
        moved = True
        while moved:
            moved = False
            for _, pump in list(self.pumps):
                moved = pump.flush() or moved
            self.pumps = [(a, p) for a, p in self.pumps if not p.clientIO.disconnected]

    def run(self, seconds: float, step: float = 0.1) -> None:
        self.flush()
        for _ in range(round(seconds / step)):
            self.clock.advance(step)
            self.flush()

    def down(self, address: str) -> None:
        """The control node at *address* dies: its connections drop, dials are refused."""
        self.up.pop(address, None)
        for a, pump in self.pumps:
            if a == address:
                pump.server.transport.loseConnection()
        self.flush()

    def connections(self, address: str) -> int:
        return sum(1 for a, p in self.pumps if a == address and not p.clientIO.disconnected)


def describe(node_id: str = ME, host: int = 5) -> bytes:
    return ctl.encode_command(ctl.Join(node_id, ("object",), f"127.0.0.{host}:7000", at=0.0))


@attrs.define
class World:
    clock: Clock
    plane: ControlPlane
    net: Net
    tmp: Path

    def member(self, *control: str, secret: bytes = SECRET, **kw: Any) -> MemberService[Topology]:
        service: MemberService[Topology] = MemberService(
            reactor=self.clock,
            control=control or ("127.0.0.2:7000",),
            secret=secret,
            node_id=ME,
            member=describe(),
            data_dir=str(self.tmp),
            decode=Topology.decode,
            endpoint=self.net.endpoint,
            blocking=lambda f, *a: succeed(f(*a)),
            **{"heartbeat_interval": 1.0, "watch_wait": 30.0, **kw},
        )
        return service


@pytest.fixture
def world(tmp_path: Path) -> World:
    clock = Clock()
    plane = ControlPlane(clock)
    plane.execute(ctl.Join("control-1", ("control",), "127.0.0.2:7000", at=0.0))
    plane.join("object-0", 4)
    net = Net(clock, plane, "127.0.0.2:7000", "127.0.0.3:7000")
    return World(clock, plane, net, tmp_path)


def started(world: World, *control: str, **kw: Any) -> MemberService[Topology]:
    service = world.member(*control, **kw)
    service.startService()
    world.net.run(0.5)
    return service


def test_a_member_joins_heartbeats_and_watches(world: World) -> None:
    """It joins, fetches the topology (which holds it), heartbeats each second, and sees new epochs.

    Observers hear of every new topology, a new version (a member's state)
    as well as a new epoch.
    """
    seen: list[tuple[int, int]] = []
    service = world.member()
    service.subscribe(lambda t: seen.append((t.epoch, t.version)))
    service.startService()
    world.net.run(0.5)
    assert world.plane.joins == [ME]
    topology = service.current()
    assert topology is not None and topology.member(ME) is not None
    assert topology.epoch == world.plane.state.epoch
    assert service.connected_to == "127.0.0.2:7000"

    world.net.run(5)
    assert 4 <= world.plane.heartbeats.count(ME) <= 6
    member = world.plane.state.members[ME]
    assert member.state.value == "active"

    before = topology.epoch
    world.plane.join("object-2", 6)
    world.net.run(0.1)
    now = service.current()
    assert now is not None and now.epoch == before + 1 and now.member("object-2") is not None
    # every new topology is told, epochs and versions only ever move forward
    assert seen == sorted(set(seen)) and sorted({e for e, _ in seen}) == [before, before + 1]
    service.stopService()
    world.net.flush()
    assert world.net.connections("127.0.0.2:7000") == 0


def test_a_member_sees_changes_that_keep_the_epoch(world: World) -> None:
    """A node marked down moves the version, not the epoch; the member still fetches it."""
    service = started(world)
    world.net.run(2)
    before = service.current()
    assert before is not None and before.member("object-0") is not None
    world.plane.execute(ctl.MarkDown("object-0", cutoff=world.clock.seconds() + 1))
    world.net.run(0.1)
    after = service.current()
    assert after is not None and after.epoch == before.epoch
    assert after.version > before.version
    member = after.member("object-0")
    assert member is not None and member.state.value == "down"
    service.stopService()


def test_the_disk_copy_is_the_latest_topology(world: World) -> None:
    """Each new topology is stored under the data dir, as the control plane sent it."""
    service = started(world)
    world.plane.join("object-2", 6)
    world.net.run(0.1)
    stored = (world.tmp / "topology.bin").read_bytes()
    assert world.plane.state.topology().encode() in stored
    assert oct(os.stat(world.tmp / "topology.bin").st_mode & 0o777) == "0o600"
    service.stopService()


def test_join_retries_while_there_is_no_leader(world: World) -> None:
    """NO_LEADER is an election: the member asks again and joins once there is a leader."""
    world.plane.no_leader = 3
    service = started(world)
    assert world.plane.joins == []
    world.net.run(5)
    assert world.plane.joins == [ME]
    assert service.current() is not None
    service.stopService()


def test_it_fails_over_to_another_control_node(world: World) -> None:
    """With the first control address down it joins through the next; it moves again when that dies."""
    world.net.down("127.0.0.2:7000")
    service = started(world, "127.0.0.2:7000", "127.0.0.3:7000")
    world.net.run(1)
    assert service.connected_to == "127.0.0.3:7000"
    assert service.current() is not None
    assert world.net.dials[:2] == ["127.0.0.2:7000", "127.0.0.3:7000"]

    world.net.up["127.0.0.2:7000"] = SECRET
    world.net.down("127.0.0.3:7000")
    world.net.run(2)
    assert service.connected_to == "127.0.0.2:7000"
    hb = len(world.plane.heartbeats)
    world.net.run(3)
    assert len(world.plane.heartbeats) > hb
    service.stopService()


def test_with_the_control_plane_down_it_keeps_its_topology_and_resumes(world: World) -> None:
    """Every control node gone: current() keeps the last topology; a new epoch arrives on return."""
    service = started(world, "127.0.0.2:7000", "127.0.0.3:7000", retry_max=4.0)
    known = service.current()
    assert known is not None
    world.net.down("127.0.0.2:7000")
    world.net.down("127.0.0.3:7000")
    world.net.run(60)
    assert service.current() is known
    assert service.connected_to is None
    assert service.last_error is not None and "127.0.0" in service.last_error
    # the backoff is capped: about 60 / 4 dials, not 60 / 0.5
    dials = len(world.net.dials)
    world.net.run(40)
    assert 8 <= len(world.net.dials) - dials <= 12

    world.plane.join("object-2", 6)
    world.net.up["127.0.0.3:7000"] = SECRET
    world.net.run(10)
    now = service.current()
    assert now is not None and now.epoch == known.epoch + 1
    assert service.connected_to == "127.0.0.3:7000"
    service.stopService()


def test_a_restart_starts_on_the_disk_copy(world: World) -> None:
    """A restarted member has its last topology at once, before (and without) any control node."""
    first = started(world)
    known = first.current()
    first.stopService()
    world.net.down("127.0.0.2:7000")
    world.net.down("127.0.0.3:7000")

    second = world.member()
    seen: list[Topology] = []
    second.subscribe(seen.append)
    second.startService()
    assert second.current() == known
    assert seen == [known]
    world.net.run(5)
    assert second.current() == known
    second.stopService()


def test_a_torn_disk_copy_is_ignored(world: World) -> None:
    """A damaged topology file is not trusted: the member starts with nothing and fetches."""
    (world.tmp / "topology.bin").write_bytes(b"GSTOPO1\n" + b"\0" * 30)
    world.net.down("127.0.0.2:7000")
    service = world.member()
    service.startService()
    assert service.current() is None
    world.net.up["127.0.0.2:7000"] = SECRET
    world.net.run(3)
    assert service.current() is not None
    service.stopService()


def test_a_wrong_secret_fails_clearly_and_joins_nothing(world: World) -> None:
    """A member whose secret differs from the control node's never joins, and says why."""
    service = started(world, secret=b"w" * 32)
    world.net.run(3)
    assert world.plane.joins == []
    assert ME not in world.plane.state.members
    assert service.current() is None
    assert service.last_error is not None and "cluster secret" in service.last_error
    service.stopService()


def test_a_refused_join_is_reported_and_retried(world: World) -> None:
    """A join the control plane refuses (the address is taken) says why and changes nothing."""
    world.plane.execute(ctl.Join("squatter", ("object",), "127.0.0.5:7000", at=0.0))
    version = world.plane.state.version
    service = started(world)
    assert service.last_error is not None and "DUPLICATE_ADDRESS" in service.last_error
    assert ME not in world.plane.state.members
    assert world.plane.state.version == version
    service.stopService()


def test_a_torn_paged_fetch_starts_again(world: World) -> None:
    """The epoch moves between pages: STALE_EPOCH, and the member fetches the new epoch whole."""
    service = started(world)
    known = service.current()
    assert known is not None
    total = len(world.plane.state.topology().encode())
    assert total > 2 * world.plane.page_bytes, "the topology spans several pages"
    torn = []

    def tear(offset: int) -> None:
        if offset == 0 and not torn:
            torn.append(offset)
            world.plane.join("object-9", 9)

    world.plane.join("object-2", 6)
    world.plane.on_page = tear
    world.net.run(0.5)
    now = service.current()
    assert torn
    assert now is not None and now.epoch == known.epoch + 2
    assert now.encode() == world.plane.state.topology().encode()
    service.stopService()


def test_a_topology_over_the_limit_is_not_fetched(world: World) -> None:
    """``max_topology_bytes`` bounds what a control node can make a member hold."""
    service = started(world, max_topology_bytes=100, retry_max=4.0)
    world.net.run(40)
    assert service.current() is None
    # it hangs up and dials again, backing off: it does not spin on the refused fetch
    assert 8 <= len(world.net.dials) <= 16
    service.stopService()


def test_join_addresses_are_checked() -> None:
    """``--join`` takes HOST:PORT[,...] or endpoint strings, and names a bad one."""
    assert parse_join("127.0.0.2:7000, [::1]:7001") == ("127.0.0.2:7000", "[::1]:7001")
    assert parse_join("ssl:host=127.0.0.2:port=7000") == ("ssl:host=127.0.0.2:port=7000",)
    for bad in ("", "127.0.0.2", "127.0.0.2:0", "127.0.0.2:99999", "a:b:c"):
        with pytest.raises(ValueError):
            parse_join(bad)
    endpoint = control_endpoint(Clock(), "[::1]:7001")
    assert endpoint._port == 7001  # type: ignore[attr-defined]


def test_bad_intervals_are_refused(world: World) -> None:
    """Every timing option must be positive."""
    with pytest.raises(ValueError, match="heartbeat_interval"):
        world.member(heartbeat_interval=0)
    with pytest.raises(ValueError, match="control address"):
        MemberService(
            reactor=world.clock,
            control=(),
            secret=SECRET,
            node_id=ME,
            member=describe(),
            data_dir=str(world.tmp),
            decode=Topology.decode,
        )
