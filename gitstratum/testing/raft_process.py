"""One Raft member as a real process, its client API, and helpers to run a group of them.

Run a member::

    python -m gitstratum.testing.raft_process --id 1 --data-dir D1 \\
        --listen tcp:7001:interface=127.0.0.1 \\
        --peers 1=tcp:host=127.0.0.1:port=7001,2=tcp:host=127.0.0.1:port=7002,3=... \\
        --client tcp:7101:interface=127.0.0.1

It runs a ``RaftNode`` with the KV state machine (``gitstratum.raft.kv``)
over ``AMPTransport`` and ``LMDBRaftLog``, and answers ``KVPut``, ``KVGet``,
``KVCas`` and ``NodeStatus`` on ``--client``.  A follower answers requests
with the ``NOT_LEADER`` error, whose description is the leader hint.

``BlockingClient`` speaks that API over a plain socket (no reactor), and
``RaftCluster`` starts, kills (``SIGKILL``) and restarts members as
subprocesses; the end-to-end tests and ``benchmarks/bench_raft.py`` use them.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Generator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import attrs
from twisted.internet import defer
from twisted.internet.interfaces import ITCPTransport
from twisted.internet.protocol import Factory
from twisted.protocols import amp
from twisted.python import usage
from twisted.python.failure import Failure

from gitstratum import cmdline
from gitstratum.raft import kv
from gitstratum.raft.node import LeadershipLost, NodeHalted, ProposalLost, RaftNode
from gitstratum.raft.types import NodeId, NotLeader, ProposalDropped

__all__ = [
    "KVPut",
    "KVGet",
    "KVCas",
    "NodeStatus",
    "LocalGet",
    "NotLeaderReply",
    "OutcomeUnknown",
    "Refused",
    "ClientAPI",
    "parse_peers",
    "Options",
    "main",
    "BlockingClient",
    "RaftCluster",
    "free_port",
]

ROOT = Path(__file__).resolve().parents[2]


# -- the client API -------------------------------------------------------------


class NotLeaderReply(Exception):
    """``NotLeader`` on the client API; the AMP description is the leader hint (0: none known)."""

    def __init__(self, hint: object = 0) -> None:
        if isinstance(hint, bytes):
            hint = hint.decode("ascii", "replace")
        text = str(hint)
        self.leader_hint: NodeId = int(text) if text.isdigit() else 0
        super().__init__(str(self.leader_hint))


class OutcomeUnknown(Exception):
    """The leader stepped down before the command was applied: it may or may not take effect."""


class Refused(Exception):
    """The command was not applied (dropped during a transfer, overwritten, bad input, node halted)."""


_ERRORS: dict[type[Exception], bytes] = {
    NotLeaderReply: b"NOT_LEADER",
    OutcomeUnknown: b"OUTCOME_UNKNOWN",
    Refused: b"REFUSED",
}


class KVPut(amp.Command):
    """Set a key (through the log)."""

    arguments = [(b"key", amp.String()), (b"value", amp.String())]
    response = []
    errors = _ERRORS


class KVGet(amp.Command):
    """A linearizable read of a key (ReadIndex on the leader)."""

    arguments = [(b"key", amp.String())]
    response = [(b"value", amp.String(optional=True))]
    errors = _ERRORS


class KVCas(amp.Command):
    """Compare-and-swap a key; no ``expected`` means "the key is absent"."""

    arguments = [
        (b"key", amp.String()),
        (b"expected", amp.String(optional=True)),
        (b"new", amp.String()),
    ]
    response = [(b"swapped", amp.Boolean())]
    errors = _ERRORS


class NodeStatus(amp.Command):
    """This member's view: role, leader, term, indexes, snapshot counters."""

    arguments = []
    response = [
        (b"id", amp.Integer()),
        (b"role", amp.Unicode()),
        (b"leader", amp.Integer()),
        (b"term", amp.Integer()),
        (b"commit", amp.Integer()),
        (b"applied", amp.Integer()),
        (b"snapshot_index", amp.Integer()),
        (b"snapshots_installed", amp.Integer()),
        (b"compactions", amp.Integer()),
    ]


class LocalGet(amp.Command):
    """This member's applied value of a key, leader or not: for tests, never linearizable."""

    arguments = [(b"key", amp.String())]
    response = [(b"value", amp.String(optional=True))]


def _client_error(failure: Failure) -> Failure:
    """Map the driver's errors onto the client API's (LeadershipLost first: it is a NotLeader)."""
    error = failure.value
    if isinstance(error, LeadershipLost):
        return Failure(OutcomeUnknown(str(error)))
    if isinstance(error, NotLeader):
        return Failure(NotLeaderReply(error.leader_hint))
    if isinstance(error, ProposalLost | ProposalDropped | NodeHalted | ValueError):
        return Failure(Refused(str(error)))
    return failure


class ClientAPI(amp.AMP):
    """The client side of a member: KV commands go through the node's log or ReadIndex."""

    def __init__(self, node: RaftNode) -> None:
        super().__init__()
        self.node = node

    def connectionMade(self) -> None:
        super().connectionMade()
        # Pipelined small answers: without this, Nagle holds each behind the
        # client's delayed ACK and commit latency measures TCP, not Raft.
        if ITCPTransport.providedBy(self.transport):
            self.transport.setTcpNoDelay(True)

    @KVPut.responder
    def put(self, key: bytes, value: bytes) -> defer.Deferred[dict[str, Any]]:
        d = self.node.propose(kv.encode_command(kv.Put(key, value)))
        return d.addCallbacks(lambda _: {}, _client_error)

    @KVGet.responder
    def get(self, key: bytes) -> defer.Deferred[dict[str, Any]]:
        d = self.node.read(kv.encode_command(kv.Get(key)))
        return d.addCallbacks(lambda value: {"value": value}, _client_error)

    @KVCas.responder
    def cas(self, key: bytes, new: bytes, expected: bytes | None = None) -> defer.Deferred[dict]:
        d = self.node.propose(kv.encode_command(kv.Cas(key, expected, new)))
        return d.addCallbacks(lambda swapped: {"swapped": bool(swapped)}, _client_error)

    @NodeStatus.responder
    def status(self) -> dict[str, Any]:
        node = self.node
        return {
            "id": node.config.id,
            "role": node.role.value,
            "leader": node.leader_id,
            "term": node.term,
            "commit": node.commit_index,
            "applied": node.applied_index,
            "snapshot_index": node.snapshot_index,
            "snapshots_installed": node.snapshots_installed,
            "compactions": node.compactions,
        }

    @LocalGet.responder
    def local_get(self, key: bytes) -> dict[str, Any]:
        return {"value": self.node.state_machine.query(kv.encode_command(kv.Get(key)))}


# -- the process ------------------------------------------------------------------


def parse_peers(text: str) -> dict[NodeId, str]:
    """``1=tcp:host=h:port=p,2=...`` as ``{1: "tcp:host=h:port=p", ...}``; ValueError if malformed."""
    peers: dict[NodeId, str] = {}
    for item in filter(None, text.split(",")):
        node, sep, endpoint = item.partition("=")
        if not sep or not node.strip().isdigit() or not endpoint:
            raise ValueError(f"bad peer {item!r}: expected ID=ENDPOINT")
        peers[int(node)] = endpoint
    return peers


PROG = "python -m gitstratum.testing.raft_process"


def _peers(text: str) -> dict[NodeId, str]:
    try:
        return parse_peers(text)
    except ValueError as e:
        raise usage.UsageError(f"--peers: {e}") from None


class Options(usage.Options):
    """The command line of one Raft member."""

    synopsis = (
        f"Usage: {PROG} --id N --data-dir DIR --listen ENDPOINT --peers ID=ENDPOINT,... [options]"
    )
    longdesc = "Run one Raft member with the KV state machine until SIGTERM or SIGINT."
    optParameters: ClassVar[list[list[Any]]] = [
        ["id", None, None, "This member's node id (required).", int],
        ["data-dir", None, None, "Directory for the Raft log (required)."],
        ["listen", None, None, "Server endpoint for Raft traffic (required)."],
        ["peers", None, None, "Every member as ID=ENDPOINT,... (required).", _peers],
        ["client", None, None, "Server endpoint for the client API."],
        ["tick-interval", None, None, "Seconds per Raft tick.", float],
        ["election-tick", None, None, "Ticks before a follower stands for election.", int],
        ["heartbeat-tick", None, None, "Ticks between a leader's heartbeats.", int],
        ["snapshot-every", None, 10_000, "Applied entries between snapshots.", int],
        ["seed", None, None, "Seed of the election-timeout RNG.", int],
    ]

    def parseArgs(self, *args: str) -> None:
        if args:
            raise usage.UsageError(f"unexpected argument {args[0]!r}")

    def postOptions(self) -> None:
        missing = [
            f"--{name}" for name in ("id", "data-dir", "listen", "peers") if self[name] is None
        ]
        if missing:
            raise usage.UsageError(f"missing {', '.join(missing)}")


def _arguments(argv: Sequence[str] | None) -> Options | int:
    """The parsed command line, or the exit status of --help (0) or a usage error (2)."""
    options = Options()
    status = cmdline.parse(options, argv, PROG)
    return options if status is None else status


def main(argv: Sequence[str] | None = None) -> int:
    """Run one member until SIGTERM/SIGINT (or SIGKILL, which is the point)."""
    args = _arguments(argv)
    if isinstance(args, int):
        return args
    from twisted.internet import reactor
    from twisted.internet.endpoints import serverFromString
    from twisted.logger import (
        FilteringLogObserver,
        Logger,
        LogLevel,
        LogLevelFilterPredicate,
        globalLogBeginner,
        textFileLogObserver,
    )

    from gitstratum.raft.core import Config
    from gitstratum.raft.log import LMDBRaftLog
    from gitstratum.raft.transport import AMPTransport

    # Raft's own lines at info; Twisted's per-connection chatter (every
    # client call, every redial of a dead peer) only from warn up.
    levels = LogLevelFilterPredicate(defaultLogLevel=LogLevel.warn)
    levels.setLogLevelForNamespace("gitstratum", LogLevel.info)
    levels.setLogLevelForNamespace("gitstratum.raft.transport._RaftFactory", LogLevel.warn)
    observer = FilteringLogObserver(textFileLogObserver(sys.stdout), [levels])
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)
    logger = Logger(namespace="gitstratum.testing.raft_process")
    data_dir = Path(args["data-dir"])
    data_dir.mkdir(parents=True, exist_ok=True)
    voters = frozenset(args["peers"]) | {args["id"]}
    config = Config(id=args["id"], voters=voters)
    if args["election-tick"] is not None:
        config = attrs.evolve(config, election_tick=args["election-tick"])
    if args["heartbeat-tick"] is not None:
        config = attrs.evolve(config, heartbeat_tick=args["heartbeat-tick"])
    raft_log = LMDBRaftLog(str(data_dir / "raft"))
    peers = {node: endpoint for node, endpoint in args["peers"].items() if node != args["id"]}
    transport = AMPTransport(args["id"], peers, reactor)
    extra: dict[str, Any] = {}
    if args["tick-interval"] is not None:
        extra["tick_interval"] = args["tick-interval"]

    exit_status = [0]

    def halted(failure: Failure) -> None:
        logger.error("Raft node halted; exiting")
        exit_status[0] = 1
        reactor.stop()  # type: ignore[attr-defined]

    node = RaftNode(
        config,
        raft_log,
        kv.KVStore(),
        transport,
        reactor,  # type: ignore[arg-type]
        random.Random(args["seed"]),
        snapshot_every=args["snapshot-every"],
        on_halt=halted,
        **extra,
    )

    @defer.inlineCallbacks
    def start() -> Generator[defer.Deferred[Any], Any, None]:
        yield transport.listen(serverFromString(reactor, args["listen"]))
        if args["client"]:
            factory = Factory.forProtocol(lambda: ClientAPI(node))
            yield serverFromString(reactor, args["client"]).listen(factory)
        transport.start()
        node.startService()
        logger.info(
            "Raft process {id} ready: raft on {listen}, clients on {client}, pid {pid}",
            id=args["id"],
            listen=args["listen"],
            client=args["client"],
            pid=os.getpid(),
        )

    def failed(failure: Failure) -> None:
        logger.failure("Raft process could not start", failure)
        exit_status[0] = 1
        reactor.stop()  # type: ignore[attr-defined]

    def shutdown() -> defer.Deferred[None]:
        node.stopService()  # syncs the log
        raft_log.close()
        return transport.stop()

    reactor.callWhenRunning(lambda: start().addErrback(failed))  # type: ignore[attr-defined]
    reactor.addSystemEventTrigger("before", "shutdown", shutdown)  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]
    return exit_status[0]


# -- a blocking client ------------------------------------------------------------------


class BlockingClient:
    """The client API over a plain socket: one call at a time, or pipelined with ``send``/``receive``."""

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 5.0) -> None:
        self._sock = socket.create_connection((host, port), timeout=timeout)
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._file = self._sock.makefile("rb")
        self._next = 0
        self._asked: dict[int, type[amp.Command]] = {}

    def close(self) -> None:
        self._file.close()
        self._sock.close()

    def __enter__(self) -> BlockingClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def outstanding(self) -> int:
        return len(self._asked)

    def send(self, command: type[amp.Command], **arguments: Any) -> int:
        """Send one command without waiting; its ask id."""
        self._next += 1
        box = command.makeArguments(arguments, None)
        box[b"_command"] = command.commandName
        box[b"_ask"] = str(self._next).encode()
        self._sock.sendall(box.serialize())
        self._asked[self._next] = command
        return self._next

    def receive(self) -> tuple[int, dict[str, Any] | Exception]:
        """The next answer: ``(ask id, response or the mapped error)``."""
        box = self._read_box()
        if b"_answer" in box:
            ask = int(box[b"_answer"])
            return ask, self._asked.pop(ask).parseResponse(box, None)
        if b"_error" in box:
            ask = int(box[b"_error"])
            command = self._asked.pop(ask)
            errors: dict[bytes, type[Exception]] = command.reverseErrors  # type: ignore[attr-defined]
            error_type = errors.get(box.get(b"_error_code", b""))
            description = box.get(b"_error_description", b"").decode("utf-8", "replace")
            if error_type is None:
                return ask, amp.UnknownRemoteError(description)
            return ask, error_type(description)
        raise ConnectionError(f"unexpected AMP box {box!r}")

    def call(self, command: type[amp.Command], **arguments: Any) -> dict[str, Any]:
        """Send one command and wait for its answer; raises its error."""
        ask = self.send(command, **arguments)
        while True:
            got, result = self.receive()
            if got == ask:
                break
        if isinstance(result, Exception):
            raise result
        return result

    def _read_box(self) -> dict[bytes, bytes]:
        box: dict[bytes, bytes] = {}
        while True:
            key = self._read_field()
            if not key:
                return box
            box[key] = self._read_field()

    def _read_field(self) -> bytes:
        length = self._read_exact(2)
        return self._read_exact(int.from_bytes(length, "big"))

    def _read_exact(self, n: int) -> bytes:
        data = self._file.read(n)
        if len(data) != n:
            raise ConnectionError("connection closed by the Raft process")
        return data


# -- a group of processes ---------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@attrs.define
class _Member:
    id: NodeId
    raft_port: int
    client_port: int
    data_dir: Path
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None


@attrs.define
class RaftCluster:
    """``size`` members on loopback in ``base`` (``node-N/`` data, ``node-N.log``), started as subprocesses."""

    base: Path
    size: int = 3
    snapshot_every: int = 10_000
    tick_interval: float | None = None
    election_tick: int | None = None
    members: dict[NodeId, _Member] = attrs.field(factory=dict)

    def __attrs_post_init__(self) -> None:
        for node in range(1, self.size + 1):
            self.members[node] = _Member(
                node,
                free_port(),
                free_port(),
                self.base / f"node-{node}",
                self.base / f"node-{node}.log",
            )

    @property
    def peers(self) -> str:
        return ",".join(
            f"{m.id}=tcp:host=127.0.0.1:port={m.raft_port}" for m in self.members.values()
        )

    def start(self, node: NodeId | None = None, wait: float = 20.0) -> None:
        """Start one member (or all); return once their client ports answer."""
        targets = [self.members[node]] if node is not None else list(self.members.values())
        for member in targets:
            argv = [
                sys.executable,
                "-m",
                "gitstratum.testing.raft_process",
                "--id",
                str(member.id),
                "--data-dir",
                str(member.data_dir),
                "--listen",
                f"tcp:{member.raft_port}:interface=127.0.0.1",
                "--peers",
                self.peers,
                "--client",
                f"tcp:{member.client_port}:interface=127.0.0.1",
                "--snapshot-every",
                str(self.snapshot_every),
            ]
            if self.tick_interval is not None:
                argv += ["--tick-interval", str(self.tick_interval)]
            if self.election_tick is not None:
                argv += ["--election-tick", str(self.election_tick)]
            # This checkout first, whatever copy of gitstratum is installed.
            path = [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
            with open(member.log_path, "ab") as log:
                member.proc = subprocess.Popen(
                    argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.base
                )
        deadline = time.monotonic() + wait
        for member in targets:
            while True:
                assert member.proc is not None
                if member.proc.poll() is not None:
                    raise RuntimeError(
                        f"node {member.id} exited: {self.log_text(member.id)[-3000:]}"
                    )
                try:
                    with BlockingClient(member.client_port, timeout=1.0) as c:
                        c.call(NodeStatus)
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"node {member.id} did not start") from None
                    time.sleep(0.02)

    def kill(self, node: NodeId) -> None:
        """``kill -9`` one member."""
        member = self.members[node]
        if member.proc is not None and member.proc.poll() is None:
            member.proc.send_signal(signal.SIGKILL)
            member.proc.wait(10)
        member.proc = None

    def stop(self) -> None:
        """Stop every member (SIGTERM, then SIGKILL for stragglers)."""
        for member in self.members.values():
            if member.proc is not None and member.proc.poll() is None:
                member.proc.terminate()
        for member in self.members.values():
            if member.proc is not None:
                try:
                    member.proc.wait(10)
                except subprocess.TimeoutExpired:
                    member.proc.kill()
                    member.proc.wait(10)
            member.proc = None

    def alive(self, node: NodeId) -> bool:
        proc = self.members[node].proc
        return proc is not None and proc.poll() is None

    def log_text(self, node: NodeId) -> str:
        path = self.members[node].log_path
        return path.read_text(errors="replace") if path.exists() else ""

    def client(self, node: NodeId, timeout: float = 5.0) -> BlockingClient:
        return BlockingClient(self.members[node].client_port, timeout=timeout)

    def status(self, node: NodeId) -> dict[str, Any] | None:
        """A member's NodeStatus, or ``None`` when it does not answer."""
        try:
            with self.client(node, timeout=1.0) as c:
                return c.call(NodeStatus)
        except OSError:
            return None

    def leader(self, timeout: float = 10.0, among: Sequence[NodeId] | None = None) -> NodeId:
        """The member that says it leads (polled until ``timeout``)."""
        nodes = list(among) if among is not None else list(self.members)
        deadline = time.monotonic() + timeout
        while True:
            for node in nodes:
                if not self.alive(node):
                    continue
                status = self.status(node)
                if status is not None and status["role"] == "leader":
                    return node
            if time.monotonic() > deadline:
                raise TimeoutError("no leader elected")
            time.sleep(0.02)

    def request(
        self,
        command: type[amp.Command],
        timeout: float = 10.0,
        **arguments: Any,
    ) -> tuple[NodeId, dict[str, Any]]:
        """Send ``command`` to whoever leads, following NotLeader hints and retrying until ``timeout``.

        ``OutcomeUnknown`` is raised, not retried: the caller decides what an
        ambiguous write means.  Returns ``(the node that answered, response)``.
        """
        deadline = time.monotonic() + timeout
        candidates = [n for n in self.members if self.alive(n)]
        target = candidates[0] if candidates else 1
        while True:
            try:
                with self.client(target, timeout=max(0.1, deadline - time.monotonic())) as c:
                    return target, c.call(command, **arguments)
            except NotLeaderReply as e:
                hint = e.leader_hint
                if hint and self.alive(hint):
                    target = hint
                    continue
            except (OSError, Refused):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{command.commandName!r} not answered in {timeout} s")
            alive = [n for n in self.members if self.alive(n)]
            if not alive:
                raise RuntimeError("no member of the group is running")
            target = alive[(alive.index(target) + 1) % len(alive)] if target in alive else alive[0]
            time.sleep(0.01)


if __name__ == "__main__":
    sys.exit(main())
