#!/usr/bin/env python3
"""The hash ring: lookup rate, balance, movement on join and leave, and memory.

    python benchmarks/bench_ring.py [--sizes 10,100,1000] [--vnodes 256] [--batch 10000]
                                    [--batches 5] [--out ring.json]

For each ring size it reports:

- ``lookups_per_s``: ``preference_list(position, 3)`` over batches of
  ``--batch`` random object ids (a pack's worth), first pass over the ring
  (``cold``: nothing cached) and a second pass over the same ids (``warm``);
- ``balance``: the most loaded node's share over the mean, at bootstrap,
  after a join and after a leave;
- ``join_moved`` / ``leave_moved``: the keyspace that changed owner, as a
  multiple of 1/N (a perfect join moves exactly 1/N);
- ``build_s``, ``join_s``, ``diff_s``: the time to bootstrap, allocate a
  joiner's tokens and diff the two rings;
- ``ring_mb``: the memory the ring holds (tracemalloc, after a warm pass).

Pure Python, one process, no server.
"""

from __future__ import annotations

import json
import os
import sys
import time
import tracemalloc
from pathlib import Path

from twisted.python import usage

from gitstratum.hashring.keys import KEYSPACE, position_of_oid
from gitstratum.hashring.ring import Node, Ring, diff


class Options(usage.Options):
    optParameters = [
        ["sizes", None, "10,100,1000", "Ring sizes (nodes), comma-separated."],
        ["vnodes", None, 256, "Vnodes per unit weight.", int],
        ["batch", None, 10000, "Object ids per lookup batch.", int],
        ["batches", None, 5, "Batches per pass.", int],
        ["out", None, None, "Also write the JSON results to this file."],
    ]


def max_over_mean(ring: Ring) -> float:
    loads = ring.loads()
    return max(loads.values()) / (KEYSPACE / len(ring))


def lookups(ring: Ring, ids: list[bytes]) -> float:
    start = time.perf_counter()
    for oid in ids:
        ring.preference_list(position_of_oid(oid), 3)
    return len(ids) / (time.perf_counter() - start)


def measure(size: int, vnodes: int, batch: int, batches: int) -> dict:
    ids = [os.urandom(20) for _ in range(batch * batches)]
    tracemalloc.start()
    t0 = time.perf_counter()
    ring = Ring.build([Node(f"node-{i:04d}") for i in range(size)], vnodes=vnodes)
    build_s = time.perf_counter() - t0
    cold = lookups(ring, ids)
    warm = lookups(ring, ids)
    ring_mb = tracemalloc.get_traced_memory()[0] / 1e6
    tracemalloc.stop()
    t0 = time.perf_counter()
    joined = ring.with_node(Node("joiner"))
    join_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    moved_in = sum(m.size for m in diff(ring, joined))
    diff_s = time.perf_counter() - t0
    left = joined.without_node("node-0000")
    moved_out = sum(m.size for m in diff(joined, left))
    return {
        "nodes": size,
        "vnodes": vnodes,
        "lookups_per_s": {"cold": round(cold), "warm": round(warm), "n": 3},
        "balance": {
            "bootstrap": round(max_over_mean(ring), 4),
            "after_join": round(max_over_mean(joined), 4),
            "after_leave": round(max_over_mean(left), 4),
        },
        "join_moved_x_1_over_n": round(moved_in / (KEYSPACE / len(joined)), 4),
        "leave_moved_x_1_over_n": round(moved_out / (KEYSPACE / len(joined)), 4),
        "build_s": round(build_s, 3),
        "join_s": round(join_s, 3),
        "diff_s": round(diff_s, 3),
        "ring_mb": round(ring_mb, 2),
    }


def main(argv: list[str] | None = None) -> int:
    opts = Options()
    try:
        opts.parseOptions(argv if argv is not None else sys.argv[1:])
    except usage.UsageError as e:
        print(f"{e}\n{opts}", file=sys.stderr)
        return 2
    sizes = [int(s) for s in opts["sizes"].split(",") if s]
    results = [measure(s, opts["vnodes"], opts["batch"], opts["batches"]) for s in sizes]
    text = json.dumps({"ring": results}, indent=2)
    print(text)
    if opts["out"]:
        Path(opts["out"]).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
