"""dev-cluster's planning and process management, with stand-in processes instead of twistd nodes.

The stand-ins sleep with the node's data dir in their argv (as a real node
has), so ``running`` recognises them; the control server is not needed.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from gitstratum.cluster import devcluster
from gitstratum.cluster.devcluster import Node, down, load, plan, running, status, up

COUNTS = {"control": 3, "metadata": 3, "object": 3, "frontend": 2}


def sleeper_plan(directory: str, counts: dict[str, int]) -> list[Node]:
    """The real plan, each node's argv replaced by a sleeping Python naming its data dir."""
    nodes = plan(directory, counts, exists=lambda module: True)
    for n in nodes:
        n.argv = [sys.executable, "-c", "import time; time.sleep(120)", n.data_dir]
    return nodes


@pytest.fixture
def cluster_dir(tmp_path: Path) -> Any:
    d = tmp_path / "c"
    yield d
    down(str(d), grace=2.0)


def test_the_plan_puts_each_node_on_its_own_loopback_address(tmp_path: Path) -> None:
    """Control, metadata, object, frontend from 127.0.0.2 on; members join every control node."""
    nodes = plan(str(tmp_path), COUNTS, exists=lambda module: True)
    assert [n.name for n in nodes][:4] == ["control-1", "control-2", "control-3", "metadata-1"]
    addresses = [n.address for n in nodes]
    assert addresses[0] == "127.0.0.2:7100" and len(set(addresses)) == len(nodes) == 11
    member = nodes[3].argv
    assert member[member.index("--join") + 1] == "127.0.0.2:7100,127.0.0.3:7100,127.0.0.4:7100"
    control = nodes[0].argv
    # control nodes speak Raft on a port of their own, beside the AMP one members dial
    assert "control-2=127.0.0.3:7200" in control[control.index("--initial-cluster") + 1]
    frontends = [n for n in nodes if n.role == "frontend"]
    assert all(n.http and n.ssh and "--http" in n.argv for n in frontends)
    assert all(n.http is None for n in nodes if n.role != "frontend")


def test_a_role_without_a_plugin_is_left_out(tmp_path: Path) -> None:
    """``up`` starts what exists: a role whose tap module is missing has no nodes."""
    nodes = plan(str(tmp_path), COUNTS, exists=lambda module: "control" not in module)
    assert {n.role for n in nodes} == {"metadata", "object", "frontend"}
    assert "--join" in nodes[0].argv


def test_any_count_may_be_zero(tmp_path: Path) -> None:
    """A cluster of a control node and object nodes plans only those; members need a control node."""
    nodes = plan(str(tmp_path), {"control": 1, "object": 2}, exists=lambda module: True)
    assert [n.name for n in nodes] == ["control-1", "object-1", "object-2"]
    assert plan(str(tmp_path), {}, exists=lambda module: True) == []
    with pytest.raises(ValueError, match="--control"):
        plan(str(tmp_path), {"object": 2}, exists=lambda module: True)


def test_up_kill_up_down(cluster_dir: Path) -> None:
    """up writes cluster.json; a killed node comes back on up, the others keep their pids; down stops all."""
    d = str(cluster_dir)
    nodes = up(d, COUNTS, make_plan=sleeper_plan, ready=lambda n: True)
    record = json.loads((cluster_dir / "cluster.json").read_text())
    assert record["admin_token_file"] == os.path.join(d, "admin.token")
    assert len(record["nodes"]) == 11
    for field in ("name", "role", "pid", "address", "http", "ssh", "data_dir", "log"):
        assert field in record["nodes"][0]
    assert all(running(n) for n in nodes)
    assert oct(os.stat(cluster_dir / "cluster.secret").st_mode & 0o777) == "0o600"

    victim = nodes[4]
    os.kill(victim.pid, signal.SIGKILL)  # type: ignore[arg-type]
    deadline = time.monotonic() + 10
    while running(victim) and time.monotonic() < deadline:
        devcluster._reap()
        time.sleep(0.02)
    assert not running(victim)
    assert "stopped" in status(d).splitlines()[4]

    again = up(d, COUNTS, make_plan=sleeper_plan, ready=lambda n: True)
    pids = {n.name: n.pid for n in again}
    assert pids[victim.name] != victim.pid
    assert all(pids[n.name] == n.pid for n in nodes if n is not victim)
    assert all(running(n) for n in load(d)[1])

    down(d, grace=2.0)
    assert not any(running(n) for n in load(d)[1])
    assert status(d).count("stopped") == 11


def test_up_fails_clearly_when_a_node_exits(cluster_dir: Path) -> None:
    """A node that dies at start is named, not waited on for the whole timeout."""

    def failing(directory: str, counts: dict[str, int]) -> list[Node]:
        nodes = sleeper_plan(directory, counts)
        nodes[0].argv = [sys.executable, "-c", "import sys; sys.exit(3)", nodes[0].data_dir]
        return nodes

    with pytest.raises(RuntimeError, match="control-1 exited"):
        up(str(cluster_dir), {"control": 1, "object": 1}, make_plan=failing, ready=lambda n: False)


def test_the_command_line(cluster_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``status`` of an empty dir says so; a missing --dir or a negative count is a usage error."""
    assert devcluster.main(["status", "--dir", str(cluster_dir)]) == 0
    assert "no dev cluster" in capsys.readouterr().out
    assert devcluster.main(["up"]) == 2
    assert devcluster.main(["up", "--dir", str(cluster_dir), "--object", "-1"]) == 2
    assert devcluster.main([]) == 2
