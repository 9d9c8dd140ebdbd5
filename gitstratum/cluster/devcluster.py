"""``dev-cluster``: a whole cluster on one machine, each node its own ``twistd`` on its own loopback address.

``up --dir D`` plans the nodes (control, metadata, object, frontend, in
that order, on 127.0.0.2, 127.0.0.3, ...), makes the cluster secret, starts
each node as ``twistd -n TAP ...`` in its own session with its log under
``D/NAME/``, waits until each listens, and writes ``D/cluster.json``. ``up``
on a directory that has a ``cluster.json`` restarts only the nodes that are
not running, with their old data and arguments. ``down`` stops them all
(TERM, then KILL after a grace period), ``status`` prints them.

A role whose plugin does not exist yet in this checkout is left out, so
``up`` starts what exists. Run it as ``python -m gitstratum.cluster.devcluster``.

This is a command-line tool, not reactor code: it waits with ``time.sleep``
and probes ports with plain sockets, and never runs inside a reactor.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import attrs
from twisted.python import usage

from gitstratum import cmdline
from gitstratum.cluster.secret import load_or_create

__all__ = ["Node", "Options", "down", "load", "main", "plan", "run", "status", "up"]

#: the plugin module and twistd tap name of each role, in start order
ROLES = {
    "control": ("gitstratum.control.tap", "gitstratum-control"),
    "metadata": ("gitstratum.metadata.tap", "gitstratum-metadata"),
    "object": ("gitstratum.objects.tap", "gitstratum-object"),
    "frontend": ("gitstratum.frontend.cluster_tap", "gitstratum-frontend"),
}
AMP_PORT = 7100
#: a control node's Raft peers talk on their own port, beside its AMP one
RAFT_PORT = 7200
HTTP_PORT = 8080
SSH_PORT = 2222
CLUSTER_JSON = "cluster.json"
#: twistd, with this checkout's plugin folder (when it has one) before any installed copy
TWISTD = (
    "import os, sys, twisted.plugins\n"
    "p = os.path.join(os.path.dirname(os.path.dirname(__import__('gitstratum').__file__)),"
    " 'twisted', 'plugins')\n"
    "if os.path.isdir(p): twisted.plugins.__path__.insert(0, p)\n"
    "from twisted.scripts.twistd import run; run()"
)


@attrs.define
class Node:
    """One node of the dev cluster, as ``cluster.json`` records it."""

    name: str
    role: str
    address: str
    data_dir: str
    log: str
    argv: list[str]
    pid: int | None = None
    http: str | None = None
    ssh: str | None = None


def _exists(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def plan(
    directory: str,
    counts: dict[str, int],
    *,
    python: str = sys.executable,
    exists: Callable[[str], bool] = _exists,
) -> list[Node]:
    """The nodes of a new cluster in *directory*: names, loopback addresses, data dirs, argv."""
    directory = os.path.abspath(directory)
    secret = os.path.join(directory, "cluster.secret")
    nodes: list[Node] = []
    host = 2
    hosts: dict[str, str] = {}
    for role in ROLES:
        for i in range(1, counts.get(role, 0) + 1):
            hosts[f"{role}-{i}"] = f"127.0.0.{host}"
            host += 1
    if host > 255:
        raise ValueError("a dev cluster has at most 253 nodes (127.0.0.2 to 127.0.0.254)")
    controls = [f"{hosts[n]}:{AMP_PORT}" for n in hosts if n.startswith("control-")]
    if not controls and hosts:
        raise ValueError("the other nodes join through the control plane: give --control 1 or more")
    initial = ",".join(f"{n}={hosts[n]}:{RAFT_PORT}" for n in hosts if n.startswith("control-"))
    for name, ip in hosts.items():
        role = name.rsplit("-", 1)[0]
        module, tap = ROLES[role]
        if not exists(module):
            continue
        data_dir = os.path.join(directory, name)
        argv = [python, "-c", TWISTD, "-n", "--logfile", os.path.join(data_dir, "twistd.log")]
        argv += ["--pidfile", os.path.join(data_dir, "twistd.pid"), tap]
        argv += ["--data-dir", data_dir, "--name", name, "--cluster-secret-file", secret]
        argv += ["--listen", f"tcp:{AMP_PORT}:interface={ip}"]
        if role == "control":
            argv += ["--initial-cluster", initial]
        elif controls:
            argv += ["--join", ",".join(controls)]
        node = Node(
            name, role, f"{ip}:{AMP_PORT}", data_dir, os.path.join(data_dir, "twistd.log"), argv
        )
        if role == "frontend":
            node.http, node.ssh = f"{ip}:{HTTP_PORT}", f"{ip}:{SSH_PORT}"
            argv += ["--http", node.http, "--ssh", node.ssh]
        nodes.append(node)
    return nodes


def running(node: Node) -> bool:
    """Whether *node*'s process is alive (not a zombie) and is still that node (its data dir)."""
    if node.pid is None:
        return False
    try:
        with open(f"/proc/{node.pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
        with open(f"/proc/{node.pid}/cmdline", "rb") as f:
            cmdline = f.read().split(b"\0")
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in (b"Z", b"X") and node.data_dir.encode() in cmdline


def load(directory: str) -> tuple[str | None, list[Node]]:
    """The admin token path and the nodes recorded in ``D/cluster.json``; no nodes if there is none."""
    try:
        with open(os.path.join(directory, CLUSTER_JSON)) as f:
            record = json.load(f)
    except FileNotFoundError:
        return None, []
    fields = {a.name for a in attrs.fields(Node)}
    nodes = [Node(**{k: v for k, v in n.items() if k in fields}) for n in record["nodes"]]
    return record.get("admin_token_file"), nodes


def _save(directory: str, token_file: str, nodes: Sequence[Node]) -> None:
    record = {"admin_token_file": token_file, "nodes": [attrs.asdict(n) for n in nodes]}
    path = os.path.join(directory, CLUSTER_JSON)
    with open(f"{path}.tmp", "w") as f:
        json.dump(record, f, indent=2)
        f.write("\n")
    os.replace(f"{path}.tmp", path)


def _start(node: Node) -> None:
    os.makedirs(node.data_dir, mode=0o700, exist_ok=True)
    pidfile = os.path.join(node.data_dir, "twistd.pid")
    if os.path.exists(pidfile):
        os.unlink(pidfile)  # the node is not running (checked): twistd would refuse a stale one
    with open(os.path.join(node.data_dir, "stdio.log"), "ab") as out:
        process = subprocess.Popen(
            node.argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,
            close_fds=True,
        )
    node.pid = process.pid


def _listening(address: str) -> bool:
    host, port = address.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=0.5):
            return True
    except OSError:
        return False


def up(
    directory: str,
    counts: dict[str, int],
    *,
    timeout: float = 60.0,
    make_plan: Callable[..., list[Node]] = plan,
    ready: Callable[[Node], bool] | None = None,
) -> list[Node]:
    """Start the cluster in *directory* (or the nodes of it that are not running); wait for them.

    With the real nodes (no *ready* given) and a control plane, it returns
    once the control plane reports every node active, not only listening.
    """
    directory = os.path.abspath(directory)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    load_or_create(os.path.join(directory, "cluster.secret"))
    token_file, nodes = load(directory)
    if not nodes:
        nodes = make_plan(directory, counts)
    token_file = token_file or os.path.join(directory, "admin.token")
    started = [n for n in nodes if not running(n)]
    for node in started:
        _start(node)
    _save(directory, token_file, nodes)
    is_ready = ready or (lambda n: _listening(n.address))
    deadline = time.monotonic() + timeout
    waiting = list(started)
    while waiting:
        dead = [n.name for n in waiting if not running(n)]
        if dead:
            raise RuntimeError(f"{', '.join(dead)} exited at start; see their logs")
        waiting = [n for n in waiting if not is_ready(n)]
        if waiting and time.monotonic() > deadline:
            raise RuntimeError(f"{', '.join(n.name for n in waiting)} not up in {timeout} s")
        if waiting:
            time.sleep(0.1)
    controls = [n for n in nodes if n.role == "control"]
    if ready is None and started and controls:
        # listening is not joined: wait until the control plane says every node is active
        secret = os.path.join(directory, "cluster.secret")
        while not _all_active(controls, secret, nodes):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the nodes were not all active in {timeout} s; see their logs")
            time.sleep(0.2)
    return nodes


def _all_active(controls: list[Node], secret: str, nodes: list[Node]) -> bool:
    """Whether the control plane (any of *controls*) reports every one of *nodes* active."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "gitstratum.cluster.status",
            "--control",
            ",".join(n.address for n in controls),
            "--cluster-secret-file",
            secret,
            "--timeout",
            "2",
            "--json",
        ],
        capture_output=True,
        timeout=30,
        check=False,
    )
    if proc.returncode:
        return False
    states = {m["name"]: m["state"] for m in json.loads(proc.stdout)["nodes"]}
    return all(states.get(n.name) == "active" for n in nodes)


def down(directory: str, *, grace: float = 10.0) -> list[Node]:
    """Stop every node of the cluster in *directory*: TERM, then KILL after *grace* seconds."""
    _, nodes = load(directory)
    alive = [n for n in nodes if running(n)]
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        for node in alive:
            try:
                os.killpg(node.pid, sig)  # type: ignore[arg-type]
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while alive and time.monotonic() < deadline:
            _reap()
            alive = [n for n in alive if running(n)]
            if alive:
                time.sleep(0.05)
        if not alive:
            break
    if alive:
        raise RuntimeError(f"{', '.join(n.name for n in alive)} would not stop")
    return nodes


def _reap() -> None:
    """Collect our own exited children (when ``up`` ran in this process), so they are not zombies."""
    try:
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass
    except ChildProcessError:
        pass


def status(directory: str) -> str:
    """One line a node: name, role, running or stopped, pid, address, log."""
    _, nodes = load(directory)
    if not nodes:
        return f"no dev cluster in {directory}"
    lines = []
    for n in nodes:
        state = "running" if running(n) else "stopped"
        extra = f" http={n.http} ssh={n.ssh}" if n.http else ""
        lines.append(
            f"{n.name:<12} {n.role:<9} {state:<8} pid={n.pid} {n.address}{extra} log={n.log}"
        )
    return "\n".join(lines)


class _Up(usage.Options):
    optParameters: list[Any] = [
        ["dir", None, None, "Directory of the cluster (made if missing)."],
        ["control", None, 3, "Control nodes.", int],
        ["metadata", None, 3, "Metadata nodes.", int],
        ["object", None, 3, "Object nodes.", int],
        ["frontend", None, 2, "Frontends.", int],
        ["timeout", None, 60.0, "Seconds to wait for every node to be up and active.", float],
    ]

    def postOptions(self) -> None:
        if not self["dir"]:
            raise usage.UsageError("--dir is required")
        for role in ROLES:
            if self[role] < 0:
                raise usage.UsageError(f"--{role} cannot be negative")


class _Dir(usage.Options):
    optParameters: list[Any] = [["dir", None, None, "Directory of the cluster."]]

    def postOptions(self) -> None:
        if not self["dir"]:
            raise usage.UsageError("--dir is required")


class Options(usage.Options):
    """``dev-cluster up|down|status --dir D``."""

    subCommands = [
        ["up", None, _Up, "Start the cluster, or its nodes that are not running."],
        ["down", None, _Dir, "Stop every node of the cluster."],
        ["status", None, _Dir, "Print the nodes and whether each runs."],
    ]

    def postOptions(self) -> None:
        if self.subCommand is None:
            raise usage.UsageError("give a command: up, down or status")


def run(options: Options, out: Any = None) -> int:
    """Carry out a parsed ``up``, ``down`` or ``status``; print the nodes; the exit status."""
    sub = options.subOptions
    try:
        if options.subCommand == "up":
            counts = {role: sub[role] for role in ROLES}
            up(sub["dir"], counts, timeout=sub["timeout"])
        elif options.subCommand == "down":
            down(sub["dir"])
    except (RuntimeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(status(sub["dir"]), file=out or sys.stdout)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    options = Options()
    code = cmdline.parse(options, argv, "dev-cluster")
    return code if code is not None else run(options)


if __name__ == "__main__":
    sys.exit(main())
