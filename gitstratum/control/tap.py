"""``twistd gitstratum-control``: one control node's options and service tree.

Bootstrap the first control nodes etcd's way: every one is started with
the same ``--initial-cluster NAME=RAFTHOST:PORT,...`` and its own
``--name``. Raft node ids are the 1-based positions in that list (the
first name is node 1), so the list must be given in the same order to
every node and never reordered. Members reach a control node on
``--listen`` (AMP, the cluster secret required); control nodes reach each
other's Raft on ``--raft-listen`` (the address in ``--initial-cluster``).

``--join`` for a *control* node (adding a control node to a running
group) is not implemented yet: it is accepted only together with
``--initial-cluster`` naming this node, and refused otherwise.
"""

from __future__ import annotations

import os
import random
import re
from typing import Any

from twisted.application import strports
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import clientFromString, serverFromString
from twisted.internet.protocol import Factory
from twisted.python import usage

from gitstratum.cluster import secret as secret_file
from gitstratum.cluster.auth import NodeAMP
from gitstratum.control.failure import DEFAULT_WINDOW
from gitstratum.control.service import (
    DEFAULT_INTERVAL,
    ControlPlane,
    ControlServer,
    ControlService,
    ObservedState,
)
from gitstratum.control.state import ControlState
from gitstratum.control.topology import canonical_address
from gitstratum.raft.core import Config
from gitstratum.raft.log import LMDBRaftLog
from gitstratum.raft.node import DEFAULT_TICK_INTERVAL, RaftNode
from gitstratum.raft.transport import AMPTransport

__all__ = ["Options", "makeService", "parse_initial_cluster"]

_HOST_PORT = re.compile(r"^(?:\[([0-9A-Fa-f:.]+)\]|([^:\[\]]+)):([0-9]{1,5})$")


def _endpoint(address: str) -> str:
    """The client endpoint string of ``HOST:PORT``."""
    match = _HOST_PORT.match(address)
    if match is None:
        raise ValueError(f"{address!r} is not HOST:PORT")
    host = (match.group(1) or match.group(2)).replace(":", r"\:")
    return f"tcp:host={host}:port={match.group(3)}"


def parse_initial_cluster(text: str) -> list[tuple[str, str]]:
    """``NAME=HOST:PORT,...`` as ``[(name, canonical HOST:PORT)]``, in order; ``UsageError`` if bad."""
    pairs: list[tuple[str, str]] = []
    for item in (i.strip() for i in text.split(",")):
        name, sep, address = item.partition("=")
        if not sep or not name or not address:
            raise usage.UsageError(f"--initial-cluster: {item!r} is not NAME=HOST:PORT")
        try:
            pairs.append((name, canonical_address(address)))
        except ValueError as e:
            raise usage.UsageError(f"--initial-cluster: {item!r}: {e}") from None
    names = [n for n, _ in pairs]
    if len(set(names)) != len(names):
        raise usage.UsageError("--initial-cluster names a node twice")
    return pairs


def _advertised(listen: str) -> str | None:
    """``HOST:PORT`` of a ``tcp:PORT:interface=HOST`` listen string, if it names both."""
    parts = listen.split(":")
    if len(parts) < 2 or parts[0] not in ("tcp", "ssl"):
        return None
    port = parts[1]
    interface = next((p.split("=", 1)[1] for p in parts[2:] if p.startswith("interface=")), None)
    if interface is None or not port.isdigit():
        return None
    return f"{interface}:{port}"


class Options(usage.Options):
    """The command line of ``twistd gitstratum-control``."""

    synopsis = (
        "--data-dir DIR --name NAME --initial-cluster NAME=HOST:PORT,... "
        "--listen tcp:PORT:interface=HOST --raft-listen tcp:PORT:interface=HOST"
    )
    optParameters = [
        ["data-dir", "d", None, "Directory for the Raft log and the cluster secret."],
        ["listen", "l", "tcp:7100:interface=127.0.0.1", "Endpoint members connect to (AMP)."],
        [
            "raft-listen",
            None,
            None,
            "Endpoint for the Raft peers (default: from --initial-cluster).",
        ],
        ["advertise", None, None, "HOST:PORT members dial (default: from --listen's interface)."],
        ["name", "n", None, "This control node's name, as in --initial-cluster."],
        [
            "initial-cluster",
            None,
            None,
            "NAME=RAFTHOST:PORT,... of the first control nodes, in order.",
        ],
        [
            "join",
            None,
            None,
            "HOST:PORT,... of a running control plane (not yet for control nodes).",
        ],
        [
            "cluster-secret-file",
            None,
            None,
            "The cluster secret (default DATA_DIR/cluster-secret).",
        ],
        [
            "heartbeat-window",
            None,
            DEFAULT_WINDOW,
            "Seconds without a heartbeat before a member is down.",
            float,
        ],
        [
            "heartbeat-interval",
            None,
            DEFAULT_INTERVAL,
            "Seconds between the leader's heartbeat batches.",
            float,
        ],
        [
            "tick",
            None,
            DEFAULT_TICK_INTERVAL,
            "Seconds per Raft tick (elections take 10-20 ticks).",
            float,
        ],
    ]

    def postOptions(self) -> None:
        if not self["data-dir"]:
            raise usage.UsageError("--data-dir is required")
        if not self["name"]:
            raise usage.UsageError("--name is required")
        if not self["initial-cluster"]:
            if self["join"]:
                raise usage.UsageError(
                    "--join for a control node (joining a running control plane) is not "
                    "supported yet; start every control node with the same --initial-cluster"
                )
            raise usage.UsageError("--initial-cluster is required")
        cluster = parse_initial_cluster(self["initial-cluster"])
        names = [n for n, _ in cluster]
        if self["name"] not in names:
            raise usage.UsageError(f"--name {self['name']!r} is not in --initial-cluster")
        for what in ("heartbeat-window", "heartbeat-interval", "tick"):
            if not self[what] > 0:
                raise usage.UsageError(f"--{what} must be a positive number of seconds")
        self["cluster"] = cluster
        if self["raft-listen"] is None:
            host_port = dict(cluster)[self["name"]]
            host, _, port = host_port.rpartition(":")
            self["raft-listen"] = f"tcp:{port}:interface={host.strip('[]')}"
        if self["raft-listen"] == self["listen"]:
            raise usage.UsageError(
                f"--listen and --raft-listen are both {self['listen']}: give Raft its own port"
            )
        advertise = self["advertise"] or _advertised(self["listen"])
        if advertise is None:
            raise usage.UsageError("give --advertise HOST:PORT, or --listen with an interface=")
        try:
            self["advertise"] = canonical_address(advertise)
        except ValueError as e:
            raise usage.UsageError(f"--advertise: {e}") from None


def makeService(options: Options) -> ControlService:
    from twisted.internet import reactor

    data_dir = os.path.abspath(options["data-dir"])
    os.makedirs(data_dir, mode=0o700, exist_ok=True)
    secret_path = options["cluster-secret-file"] or os.path.join(data_dir, "cluster-secret")
    secret = secret_file.load_or_create(secret_path)
    cluster: list[tuple[str, str]] = options["cluster"]
    names = {i: name for i, (name, _) in enumerate(cluster, start=1)}
    me = next(i for i, name in names.items() if name == options["name"])
    peers = {i: _endpoint(address) for i, (_, address) in enumerate(cluster, start=1) if i != me}
    transport = AMPTransport(me, peers, reactor, secret=secret)  # type: ignore[arg-type]
    raft_log = LMDBRaftLog(os.path.join(data_dir, "raft"))
    state = ControlState()
    clock: Any = reactor

    def dial(address: str) -> Deferred[NodeAMP]:
        factory = Factory.forProtocol(lambda: NodeAMP(secret, options["name"], clock))
        d = clientFromString(reactor, _endpoint(address)).connect(factory)
        return d.addCallback(lambda proto: proto.authenticate().addCallback(lambda _: proto))

    plane = ControlPlane(
        name=options["name"],
        advertise=options["advertise"],
        state=state,
        raft=None,  # type: ignore[arg-type]  # set below: the node needs the observed state
        clock=clock,
        names=names,
        dial=dial,
        window=options["heartbeat-window"],
        interval=options["heartbeat-interval"],
    )
    node = RaftNode(
        Config(id=me, voters=frozenset(names)),
        raft_log,
        ObservedState(state, plane.changed),
        transport,
        clock,
        random.Random(),
        tick_interval=options["tick"],
        on_halt=lambda failure: reactor.stop(),  # type: ignore[attr-defined]
    )
    plane.raft = node
    service = ControlService(
        plane=plane,
        raft=node,
        transport=transport,
        raft_listen=serverFromString(reactor, options["raft-listen"]),
        close_log=raft_log.close,
    )
    factory = Factory.forProtocol(lambda: ControlServer(plane, secret, clock))
    strports.service(options["listen"], factory).setServiceParent(service)
    return service
