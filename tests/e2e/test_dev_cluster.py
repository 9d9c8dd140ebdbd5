"""End to end: ``dev-cluster`` runs real control and member processes, survives kill -9, and stops clean.

Every node is its own ``twistd`` on its own loopback address (127.0.0.2, ...);
everything goes through the ``gitstratum`` command (``dev-cluster`` and
``cluster status --control``), the status from the control plane itself,
over AMP with the cluster secret.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gitstratum.cluster.member import TOPOLOGY_FILE
from gitstratum.cluster.topology_cache import TopologyFile

from .conftest import checkout_env

pytestmark = pytest.mark.e2e


def devcluster(directory: Path, *args: str) -> str:
    """``gitstratum dev-cluster ARGS --dir DIRECTORY``; its output."""
    proc = subprocess.run(
        [sys.executable, "-m", "gitstratum.cli", "dev-cluster", *args, "--dir", str(directory)],
        capture_output=True,
        env=checkout_env(),
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    return proc.stdout.decode()


def gitstratum(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """The ``gitstratum`` command, with no API token in its environment."""
    env = {k: v for k, v in checkout_env().items() if not k.startswith("GITSTRATUM_")}
    proc = subprocess.run(
        [sys.executable, "-m", "gitstratum.cli", *args], capture_output=True, env=env, timeout=60
    )
    assert not check or proc.returncode == 0, proc.stderr.decode()
    return proc


def control_args(directory: Path) -> tuple[str, ...]:
    """``--control`` (every control node) and ``--cluster-secret-file`` for *directory*'s cluster."""
    control = [n["address"] for n in nodes(directory).values() if n["role"] == "control"]
    return (
        "--control",
        ",".join(control),
        "--cluster-secret-file",
        str(directory / "cluster.secret"),
    )


def nodes(directory: Path) -> dict[str, dict[str, Any]]:
    doc = json.loads((directory / "cluster.json").read_text())
    return {n["name"]: n for n in doc["nodes"]}


def status(directory: Path, *control: str) -> dict[str, Any] | None:
    """The control plane's status document (``gitstratum cluster status --control --json``), or None
    while no control node answers."""
    addresses = control or tuple(
        n["address"] for n in nodes(directory).values() if n["role"] == "control"
    )
    proc = gitstratum(
        "cluster",
        "status",
        "--control",
        ",".join(addresses),
        "--cluster-secret-file",
        str(directory / "cluster.secret"),
        "--json",
        check=False,
    )
    return json.loads(proc.stdout) if proc.returncode == 0 else None


def states(doc: dict[str, Any] | None) -> dict[str, str]:
    return {n["name"]: n["state"] for n in doc["nodes"]} if doc else {}


def wait_for(what: str, check: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.5)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (not yet reaped by its session) is gone for our purposes
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split(") ")[-1][:1] != "Z"


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Path]:
    directory = tmp_path / "dc"
    devcluster(
        directory, "up", "--control", "3", "--metadata", "0", "--object", "2", "--frontend", "0"
    )
    try:
        yield directory
    finally:
        if (directory / "cluster.json").exists():
            devcluster(directory, "down")


def test_kill_9_then_up_again_then_down(cluster: Path) -> None:
    """A killed member goes down within the window and active after ``up``; a killed leader is replaced.

    ``up`` returns only once every node is active. Also: the killed control leader's members keep their topology (same
    members, same epoch), ``up`` restarts only the dead nodes, every log is
    where ``cluster.json`` says, and ``down`` leaves nothing running.
    """
    expected = set(nodes(cluster))
    assert expected == {"control-1", "control-2", "control-3", "object-1", "object-2"}
    # up returns once the control plane reports every node active, not only listening
    assert set(states(status(cluster)).items()) == {(n, "active") for n in expected}
    before = status(cluster)
    assert before is not None and before["leader"] in expected

    victim = nodes(cluster)["object-1"]["pid"]
    os.kill(victim, signal.SIGKILL)
    wait_for("object-1 marked down", lambda: states(status(cluster)).get("object-1") == "down", 30)

    leader = before["leader"]
    os.kill(nodes(cluster)[leader]["pid"], signal.SIGKILL)
    others = [
        n["address"]
        for n in nodes(cluster).values()
        if n["role"] == "control" and n["name"] != leader
    ]
    wait_for(
        "a new leader",
        lambda: (status(cluster, *others) or {}).get("leader") not in (None, leader),
        30,
    )
    after = status(cluster, *others)
    assert after is not None and after["epoch"] == before["epoch"]
    assert set(states(after)) == expected

    untouched = {
        name: n["pid"] for name, n in nodes(cluster).items() if name not in ("object-1", leader)
    }
    devcluster(cluster, "up")
    restarted = nodes(cluster)
    assert {name: restarted[name]["pid"] for name in untouched} == untouched
    assert restarted["object-1"]["pid"] != victim
    assert set(states(status(cluster)).items()) == {(n, "active") for n in expected}
    for node in restarted.values():
        assert Path(node["log"]).is_file() and Path(node["log"]).stat().st_size > 0

    pids = [n["pid"] for n in restarted.values()]
    devcluster(cluster, "down")
    wait_for("every node stopped", lambda: not any(alive(p) for p in pids), 30)


def test_with_every_control_node_killed_members_keep_their_topology(cluster: Path) -> None:
    """With the whole control plane killed, members stay up on their cached topology; it resumes.

    The members' processes keep running and their on-disk topology (what
    they serve from) stays as it was. Restarted with ``up``, the control
    plane comes back from its Raft logs with the same members and epoch,
    and every member is active again. Then ``cluster remove`` of a node
    that holds data is refused, and ``drain`` then ``remove`` takes it off
    the ring (a new epoch).
    """
    expected = set(nodes(cluster))
    wait_for(
        "every node active",
        lambda: set(states(status(cluster)).items()) == {(n, "active") for n in expected},
        60,
    )
    before = status(cluster)
    assert before is not None
    members = {name: n for name, n in nodes(cluster).items() if n["role"] != "control"}
    cached = {
        name: TopologyFile(str(Path(n["data_dir"]) / TOPOLOGY_FILE)).load()
        for name, n in members.items()
    }
    assert all(c is not None and c[0] == before["epoch"] for c in cached.values())

    for node in nodes(cluster).values():
        if node["role"] == "control":
            os.kill(node["pid"], signal.SIGKILL)
    assert status(cluster) is None
    time.sleep(3)  # members retry their dials meanwhile; nothing they hold may change
    for name, node in members.items():
        assert alive(node["pid"]), f"{name} exited without its control plane"
        assert TopologyFile(str(Path(node["data_dir"]) / TOPOLOGY_FILE)).load() == cached[name]

    devcluster(cluster, "up")
    wait_for(
        "every node active after the restart",
        lambda: set(states(status(cluster)).items()) == {(n, "active") for n in expected},
        60,
    )
    after = status(cluster)
    assert after is not None and after["epoch"] == before["epoch"]

    # an operator removes a node: refused while it holds data, done once drained
    refused = gitstratum("cluster", "remove", "object-2", *control_args(cluster), check=False)
    assert refused.returncode == 1 and "refused" in refused.stderr.decode()
    gitstratum("cluster", "drain", "object-2", *control_args(cluster))
    gitstratum("cluster", "remove", "object-2", *control_args(cluster))
    wait_for(
        "object-2 removed",
        lambda: states(status(cluster)).get("object-2") in (None, "removed"),
        30,
    )
    now = status(cluster)
    assert now is not None and now["epoch"] > before["epoch"]
