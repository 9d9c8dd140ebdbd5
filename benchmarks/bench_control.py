#!/usr/bin/env python3
"""The control plane: how fast a failure, and a new epoch, reach every member.

    python benchmarks/bench_control.py [--runs 20] [--objects 3] [--out control.json]

It starts a dev-cluster (3 control nodes, ``--objects`` object nodes, each
its own ``twistd`` on its own loopback address) and measures, from what the
members themselves hold (each member's on-disk topology, which it replaces
whenever it fetches a new one):

- ``kill_to_down``: from ``kill -9`` of an object node to every *other*
  object node's topology showing it ``down`` (the failure detector's window
  is the control nodes' ``--heartbeat-window``, 10 s by default, so this is
  the window plus detection and propagation). The killed node is restarted
  with ``dev-cluster up`` between runs.
- ``epoch_to_members``: from the control plane's answer to a ``Join`` of a
  new object member (a new epoch: its tokens change the ring) to every
  object node holding that epoch.

p50 and p99 over ``--runs`` runs each. Everything is on loopback.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from harness import ENV, BenchOptions, measured_at, report  # noqa: E402
from twisted.internet import defer, task
from twisted.internet.endpoints import connectProtocol

from gitstratum.cluster import commands as wire
from gitstratum.cluster import secret as secret_file
from gitstratum.cluster.auth import NodeAMP
from gitstratum.cluster.member import TOPOLOGY_FILE, control_endpoint
from gitstratum.cluster.topology_cache import TopologyFile
from gitstratum.control import commands as ctl
from gitstratum.control.topology import Topology


class Options(BenchOptions):
    optParameters: list[list[Any]] = [
        ["runs", None, 20, "Runs of each measurement.", int],
        ["objects", None, 3, "Object nodes (the members measured).", int],
    ]


def devcluster(directory: Path, *args: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "gitstratum.cluster.devcluster", *args, "--dir", str(directory)],
        check=True,
        capture_output=True,
        env=ENV,
    )


def nodes(directory: Path) -> dict[str, dict[str, Any]]:
    return {n["name"]: n for n in json.loads((directory / "cluster.json").read_text())["nodes"]}


def held(node: dict[str, Any]) -> Topology | None:
    """The topology a member holds (its on-disk copy), or None."""
    stored = TopologyFile(str(Path(node["data_dir"]) / TOPOLOGY_FILE)).load()
    return Topology.decode(stored[1]) if stored else None


def all_see(others: list[dict[str, Any]], name: str, state: str) -> bool:
    """Every one of *others* holds a topology where *name* is in *state*."""
    return all(state_of(o, name) == state for o in others)


def wait(check: Any, timeout: float = 60.0, step: float = 0.02) -> float:
    """Poll *check* until true; the time it took."""
    start = time.perf_counter()
    while not check():
        if time.perf_counter() - start > timeout:
            raise SystemExit("timed out")
        time.sleep(step)
    return time.perf_counter() - start


def state_of(node: dict[str, Any], name: str) -> str | None:
    topology = held(node)
    member = topology.member(name) if topology else None
    return member.state.value if member else None


def percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "runs": len(ordered),
        "p50_s": round(ordered[len(ordered) // 2], 3),
        "p99_s": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))], 3),
        "max_s": round(ordered[-1], 3),
    }


def kill_to_down(directory: Path, runs: int) -> list[float]:
    samples = []
    objects = sorted(n for n, v in nodes(directory).items() if v["role"] == "object")
    for run in range(runs):
        victim = objects[run % len(objects)]
        others = [nodes(directory)[o] for o in objects if o != victim]
        wait(lambda: all_see(others, victim, "active"))  # noqa: B023 (called at once)
        os.kill(nodes(directory)[victim]["pid"], signal.SIGKILL)
        start = time.perf_counter()
        wait(lambda: all_see(others, victim, "down"))  # noqa: B023 (called at once)
        samples.append(time.perf_counter() - start)
        devcluster(directory, "up")
    return samples


def epoch_to_members(directory: Path, runs: int, samples: list[float]) -> None:
    """Fill *samples*; runs the reactor once (``react`` exits through SystemExit)."""
    secret = secret_file.load(str(directory / "cluster.secret"))
    control = [n["address"] for n in nodes(directory).values() if n["role"] == "control"]
    members = [n for n in nodes(directory).values() if n["role"] == "object"]

    async def join_all(reactor: Any) -> None:
        proto = NodeAMP(secret, "bench-control", reactor)
        await connectProtocol(control_endpoint(reactor, control[0]), proto)
        await proto.authenticate()
        for run in range(runs):
            member = ctl.Join(f"bench-{run}", ("object",), f"127.0.1.{run + 1}:7100", at=0.0)
            answer = None
            while answer is None:
                try:
                    answer = await proto.callRemote(wire.Join, member=ctl.encode_command(member))
                except wire.NoLeader:
                    await task.deferLater(reactor, 0.1, lambda: None)
            start = time.perf_counter()
            epoch = answer["epoch"]
            while not all((t := held(m)) is not None and t.epoch >= epoch for m in members):
                await task.deferLater(reactor, 0.02, lambda: None)
            samples.append(time.perf_counter() - start)
        proto.transport.loseConnection()

    try:
        task.react(lambda reactor: defer.ensureDeferred(join_all(reactor)), [])
    except SystemExit as e:
        if e.code not in (0, None):
            raise


def main() -> int:
    options = Options()
    options.run()
    work = Path(tempfile.mkdtemp(prefix="gs-bench-control-"))
    directory = work / "dc"
    results: dict[str, Any] = {"measured_at": measured_at()}
    devcluster(
        directory,
        "up",
        "--control",
        "3",
        "--metadata",
        "0",
        "--object",
        str(options["objects"]),
        "--frontend",
        "0",
    )
    try:
        objects = [n for n in nodes(directory).values() if n["role"] == "object"]
        wait(lambda: all(held(o) is not None for o in objects))
        results["kill_to_down"] = {
            "label": "kill -9 of an object node to every other object node's topology showing it down (10 s window)",
            **percentiles(kill_to_down(directory, options["runs"])),
        }
        samples: list[float] = []
        epoch_to_members(directory, options["runs"], samples)
        results["epoch_to_members"] = {
            "label": "a Join answered (new epoch) to every object node holding that epoch",
            **percentiles(samples),
        }
    finally:
        devcluster(directory, "down")
    return report(results, options["out"], work)


if __name__ == "__main__":
    sys.exit(main())
