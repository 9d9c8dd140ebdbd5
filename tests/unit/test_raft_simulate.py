"""The deterministic Raft simulator: CI's seed set is clean, every fault is injected, bugs are caught."""

from __future__ import annotations

import collections
import random
import subprocess
import sys

import pytest

from gitstratum.raft.core import Config, RaftCore
from gitstratum.raft.simulate import (
    FAULT_KINDS,
    SeedResult,
    SimDisk,
    Violation,
    _Simulation,
    main,
    run_seed,
)
from gitstratum.raft.types import Entry, HardState, Role, Snapshot, SnapshotMetadata

CI_SEEDS_5 = range(200)
CI_SEEDS_3 = range(1000, 1050)


def _run_all(seeds: range, nodes: int) -> list[SeedResult]:
    return [run_seed(seed, nodes) for seed in seeds]


def _report(results: list[SeedResult]) -> str:
    bad = [r for r in results if not r.ok]
    if not bad:
        return ""
    first = bad[0]
    return (
        f"{len(bad)} seeds violate safety, first seed {first.seed}: {first.violations[0]}\n"
        + "\n".join(first.trace)
    )


def _fault_totals(results: list[SeedResult]) -> collections.Counter[str]:
    totals: collections.Counter[str] = collections.Counter()
    for result in results:
        totals.update(result.faults)
    return totals


def test_ci_seed_set_five_nodes() -> None:
    """200 seeds of a 5-node cluster under every fault kind break no safety property and stay linearizable."""
    results = _run_all(CI_SEEDS_5, 5)
    assert all(r.ok for r in results), _report(results)
    totals = _fault_totals(results)
    missing = [kind for kind in FAULT_KINDS if totals[kind] == 0]
    assert not missing, f"fault kinds never injected: {missing}"
    # The runs do real work: elections, commits and client operations in every seed.
    assert all(r.elections >= 1 and r.committed > 20 and r.operations > 50 for r in results)
    assert sum(1 for r in results if r.faults["membership"] >= 3) >= 180
    assert sum(1 for r in results if r.faults["snapshot"] > 0) >= 180


def test_ci_seed_set_three_nodes() -> None:
    """50 seeds of a 3-node cluster break no safety property and stay linearizable."""
    results = _run_all(CI_SEEDS_3, 3)
    assert all(r.ok for r in results), _report(results)
    totals = _fault_totals(results)
    assert all(totals[kind] > 0 for kind in ("crash", "partition", "membership", "snapshot"))


def test_same_seed_same_result() -> None:
    """A seed fixes everything: running it twice gives the identical result and trace."""
    first = run_seed(17, 5, 300)
    run_seed(18, 5, 300)  # nothing leaks from one run into the next
    second = run_seed(17, 5, 300)
    assert first == second
    assert run_seed(19, 5, 300) != first


def test_cli_summary_is_deterministic(capsys: pytest.CaptureFixture[str]) -> None:
    """The CLI prints one summary line and exits 0; the same seeds print the same line (timing aside)."""
    assert main(["--seed", "5", "--seeds", "3", "--nodes", "3", "--steps", "300"]) == 0
    first = capsys.readouterr().out.splitlines()
    assert main(["--seed", "5", "--seeds", "3", "--nodes", "3", "--steps", "300"]) == 0
    second = capsys.readouterr().out.splitlines()
    assert len(first) == 1
    assert first[0].startswith("seeds=3 operations=")
    assert "violations=0" in first[0]
    assert first[0].rsplit(" time=", 1)[0] == second[0].rsplit(" time=", 1)[0]


def test_stale_follower_reads_are_caught() -> None:
    """Serving gets from any node's local state (no ReadIndex) is caught by the linearizability check."""
    results = [run_seed(seed, 5, broken="stale_reads") for seed in range(10)]
    caught = [r for r in results if not r.ok]
    assert len(caught) >= 5
    assert all("not linearizable" in r.violations[0] for r in caught)


def test_unsynced_writes_are_caught() -> None:
    """A driver that never fsyncs loses acknowledged entries in crashes, and the safety checks notice."""
    results = [run_seed(seed, 3, broken="unsynced") for seed in range(20)]
    caught = [r for r in results if not r.ok]
    assert len(caught) >= 5
    assert sum(r.faults["lost_unsynced"] for r in results) > 0


def test_cli_reports_a_violation() -> None:
    """On a violation the CLI exits 1 and prints the seed and a shortened trace."""
    seed = next(s for s in range(10) if not run_seed(s, 5, broken="stale_reads").ok)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "gitstratum.raft.simulate",
            "--seed",
            str(seed),
            "--seeds",
            "1",
            "--broken",
            "stale_reads",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    lines = proc.stdout.splitlines()
    assert "violations=1" in lines[0]
    assert f"VIOLATION with seed {seed}" in lines[1]
    trace = lines[lines.index(next(line for line in lines if line.startswith("last "))) + 1 :]
    assert 0 < len(trace) <= 40


def test_disk_loses_only_unsynced_writes() -> None:
    """The simulated disk keeps what was synced and at most a prefix of what was not."""
    disk = SimDisk()
    disk.append([Entry(1, 1), Entry(1, 2)])
    disk.set_hard_state(HardState(1, 1, 2))
    disk.sync()
    disk.append([Entry(2, 2, data=b"new")])  # truncates index 2
    disk.set_hard_state(HardState(2, 1, 2))
    assert disk.crash(random.Random(0), keep_nothing=True) == 2
    hard_state, snapshot, entries = disk.load()
    assert hard_state == HardState(1, 1, 2)
    assert snapshot is None
    assert entries == (Entry(1, 1), Entry(1, 2))


def test_disk_snapshots() -> None:
    """A compaction drops covered entries; a received snapshot keeps the tail only if it agrees at its index."""
    disk = SimDisk()
    disk.append([Entry(1, i) for i in range(1, 6)])
    disk.compact(Snapshot(SnapshotMetadata(3, 1), b"s3"))
    disk.sync()
    assert [e.index for e in disk.load()[2]] == [4, 5]
    disk.apply_snapshot(Snapshot(SnapshotMetadata(4, 1), b"s4"))
    disk.sync()
    assert [e.index for e in disk.load()[2]] == [5]
    disk.apply_snapshot(Snapshot(SnapshotMetadata(5, 2), b"s5"))
    disk.sync()
    _, snapshot, entries = disk.load()
    assert snapshot is not None and snapshot.data == b"s5"
    assert entries == ()


def test_two_leaders_in_one_term_are_caught_before_any_ready() -> None:
    """Election Safety is checked on each input, not only after a Ready: a second leader of a
    term is a violation even while neither has handed the driver a Ready yet."""
    sim = _Simulation(0, 3, 10, None, "empty")
    for node_id in (1, 2):
        # Two single-voter cores: each elects itself in term 1 without any message.
        core = RaftCore(Config(node_id, frozenset({node_id})), random.Random(node_id))
        core.campaign()
        assert core.role is Role.LEADER and core.term == 1
        sim.nodes[node_id].core = core
    sim.check_election(sim.nodes[1])
    with pytest.raises(Violation, match="nodes 1 and 2 both led term 1"):
        sim.check_election(sim.nodes[2])
