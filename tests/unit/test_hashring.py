"""The hash ring: balance, movement on join and leave, replica sets, diff, and stability."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from gitstratum.hashring.keys import (
    KEYSPACE,
    hash64,
    metadata_partition,
    partition_position,
    position_of_name,
    position_of_oid,
)
from gitstratum.hashring.ring import Node, Ring, RingError, apply_moves, diff, token_count

BIG = settings(max_examples=6, deadline=None)
SMALL = settings(max_examples=40, deadline=None)


def ring_of(count: int, **kw: object) -> Ring:
    return Ring.build([Node(f"node-{i:04d}") for i in range(count)], **kw)  # type: ignore[arg-type]


def max_over_mean(ring: Ring) -> float:
    """The most loaded node's share per unit weight over the mean share per unit weight."""
    loads = ring.loads()
    total_weight = sum(n.weight for n in ring.nodes.values())
    mean = sum(loads.values()) / total_weight
    return max(loads[i] / ring.nodes[i].weight for i in loads) / mean


@BIG
@given(st.integers(10, 1000))
@example(10)
@example(1000)
def test_balance_at_256_vnodes(count: int) -> None:
    """With 10 to 1,000 nodes at 256 vnodes, the most loaded node holds at most 1.10x the mean."""
    ring = ring_of(count)
    assert sum(ring.loads().values()) == KEYSPACE
    assert max_over_mean(ring) <= 1.10


@BIG
@given(st.integers(10, 1000), st.integers(0, 2**32))
@example(1000, 7)
def test_join_moves_its_share_and_only_to_the_new_node(count: int, salt: int) -> None:
    """A join moves at most 1.1/N of the keyspace, all of it to the new node, and keeps balance."""
    old = ring_of(count)
    new = old.with_node(Node(f"joiner-{salt}"))
    assert new.epoch == old.epoch + 1
    moves = diff(old, new)
    assert moves, "a join must move something"
    assert all(m.new == (f"joiner-{salt}",) for m in moves)
    moved = sum(m.size for m in moves)
    assert moved <= 1.1 * KEYSPACE / len(new)
    assert moved == new.loads()[f"joiner-{salt}"]
    assert max_over_mean(new) <= 1.10


@BIG
@given(st.integers(10, 1000), st.data())
@example(1000, None)
def test_leave_moves_only_the_leavers_share(count: int, data: st.DataObject | None) -> None:
    """A leave moves exactly the leaver's share and nothing else; balance holds after it."""
    old = ring_of(count)
    leaver = f"node-{(data.draw(st.integers(0, count - 1)) if data else 0):04d}"
    new = old.without_node(leaver)
    moves = diff(old, new)
    assert all(m.old == (leaver,) for m in moves)
    assert sum(m.size for m in moves) == old.loads()[leaver]
    assert max_over_mean(new) <= 1.10


@SMALL
@given(st.integers(1, 40), st.integers(1, 5), st.integers(0, KEYSPACE - 1))
def test_preference_lists_are_distinct_nodes(count: int, n: int, position: int) -> None:
    """A preference list has min(n, N) distinct nodes, the owner first."""
    ring = ring_of(count, vnodes=16)
    pref = ring.preference_list(position, n)
    assert len(pref) == min(n, count)
    assert len(set(pref)) == len(pref)
    assert pref[0] == ring.owner(position)


@SMALL
@given(st.integers(1, 5), st.integers(3, 6), st.integers(0, KEYSPACE - 1))
def test_preference_lists_span_zones(zones: int, per_zone: int, position: int) -> None:
    """Replicas go to distinct zones while unused zones remain, then to distinct nodes."""
    nodes = [Node(f"z{z}-n{i}", zone=f"zone-{z}") for z in range(zones) for i in range(per_zone)]
    ring = Ring.build(nodes, vnodes=16)
    pref = ring.preference_list(position, 3)
    assert len(set(pref)) == len(pref) == 3
    spanned = {ring.nodes[i].zone for i in pref[: min(3, zones)]}
    assert len(spanned) == min(3, zones)


@SMALL
@given(st.lists(st.tuples(st.booleans(), st.sampled_from([0.5, 1.0, 2.0])), max_size=12))
def test_diff_applied_gives_the_new_ownership(steps: list[tuple[bool, float]]) -> None:
    """For any join and leave sequence, old ownership with the diff applied is the new ownership."""
    ring = ring_of(5, vnodes=32)
    for k, (join, weight) in enumerate(steps):
        nxt = (
            ring.with_node(Node(f"j{k}", weight=weight))
            if join or len(ring) <= 2
            else ring.without_node(sorted(ring.nodes)[k % len(ring)])
        )
        for n in (1, 3):
            assert apply_moves(ring.ownership(n), diff(ring, nxt, n)) == nxt.ownership(n)
        ring = nxt


@SMALL
@given(st.lists(st.sampled_from([0.5, 1.0, 2.0, 3.0]), min_size=2, max_size=30))
def test_weighted_shares_follow_weights(weights: list[float]) -> None:
    """A node's share is proportional to its weight, at bootstrap and after a join."""
    nodes = [Node(f"w{i}", weight=w) for i, w in enumerate(weights)]
    ring = Ring.build(nodes[:-1]).with_node(nodes[-1])
    assert max_over_mean(ring) <= 1.10
    assert len(ring.token_map()["w0"]) == token_count(weights[0], 256)


def test_join_sequence_keeps_balance() -> None:
    """Growing from 3 to 120 nodes one join at a time, with leaves between, stays within 1.10."""
    ring = ring_of(3)
    for k in range(150):
        if k % 4 == 3:
            ring = ring.without_node(sorted(ring.nodes)[k % len(ring)])
        else:
            ring = ring.with_node(Node(f"grow-{k}"))
        assert max_over_mean(ring) <= 1.10, (k, len(ring))


def test_n3_join_only_adds_the_new_node() -> None:
    """With 3 replicas, every changed replica set gains the new node and loses one old one."""
    old = ring_of(12, vnodes=64)
    new = old.with_node(Node("joiner"))
    moves = diff(old, new, 3)
    assert moves
    for m in moves:
        assert set(m.new) - set(m.old) == {"joiner"}
        assert len(set(m.old) - set(m.new)) == 1


_REPLAY = """
import sys
from gitstratum.hashring.ring import Node, Ring
ring = Ring.build([Node("n%d" % i, zone="z%d" % (i % 3)) for i in range(40)])
for k in range(10):
    ring = ring.with_node(Node("j%d" % k, weight=1 + k % 3))
ring = ring.without_node("n7")
again = Ring(ring.nodes.values(), ring.token_map(), epoch=ring.epoch, vnodes=ring.vnodes)
assert again == ring
sys.stdout.write(ring.digest().hex() + " " + ",".join(ring.preference_list(12345678901, 3)))
"""


def test_same_membership_same_ring_in_two_processes() -> None:
    """Two processes with different hash seeds replay the same joins into the same ring."""
    outs = set()
    for seed in ("1", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run(
            [sys.executable, "-c", _REPLAY], env=env, capture_output=True, check=True
        )
        outs.add(out.stdout)
    assert len(outs) == 1


def test_stored_tokens_rebuild_the_same_ring() -> None:
    """A ring rebuilt from its token map and epoch equals the original, lookups included."""
    ring = ring_of(20).with_node(Node("x", weight=2, zone="b"))
    again = Ring(ring.nodes.values(), ring.token_map(), epoch=ring.epoch, vnodes=ring.vnodes)
    assert again == ring and again.digest() == ring.digest()
    assert ring.with_epoch(99) != ring
    for pos in (0, 1, KEYSPACE // 3, KEYSPACE - 1):
        assert again.preference_list(pos, 3) == ring.preference_list(pos, 3)


def test_walk_visits_every_node_once_from_the_owner() -> None:
    """walk() gives each node once, in ring order, starting with the owner."""
    ring = ring_of(9, vnodes=8)
    order = list(ring.walk(KEYSPACE // 2))
    assert sorted(order) == sorted(ring.nodes) and order[0] == ring.owner(KEYSPACE // 2)
    assert order[:3] == list(ring.preference_list(KEYSPACE // 2, 3))


def test_empty_ring() -> None:
    """An empty ring has no owners; the first join builds it."""
    empty = Ring([], {}, epoch=4)
    assert empty.preference_list(5, 3) == () and empty.ownership() == []
    first = empty.with_node(Node("a"))
    assert first.epoch == 5 and first.owner(KEYSPACE - 1) == "a"
    assert [(m.old, m.new) for m in diff(empty, first)] == [((), ("a",))]


@pytest.mark.parametrize(
    ("nodes", "tokens", "message"),
    [
        ([Node("a"), Node("a")], {"a": [1]}, "duplicate node id"),
        ([Node("a"), Node("b")], {"a": [1], "b": [1]}, "held twice"),
        ([Node("a")], {"a": [KEYSPACE]}, "outside the keyspace"),
        ([Node("a")], {"a": [-1]}, "outside the keyspace"),
        ([Node("a")], {"a": []}, "no tokens"),
        ([Node("a")], {"b": [1]}, "every node needs tokens"),
    ],
)
def test_bad_rings_are_refused(nodes: list[Node], tokens: dict, message: str) -> None:
    """A ring with duplicate ids or tokens, stray tokens or an empty node is refused clearly."""
    with pytest.raises(RingError, match=message):
        Ring(nodes, tokens)


@pytest.mark.parametrize("bad", ["", " a", "a\n", "x" * 129])
def test_bad_node_ids(bad: str) -> None:
    """Empty, padded, unprintable or over-long node ids are refused."""
    with pytest.raises(RingError):
        Node(bad)


@pytest.mark.parametrize("bad", [0, -1, float("nan"), float("inf"), 1001])
def test_bad_weights(bad: float) -> None:
    """A weight must be a finite number in (0, 1000]."""
    with pytest.raises(RingError):
        Node("a", weight=bad)


def test_join_and_leave_errors() -> None:
    """Joining twice or leaving when absent is an error, not a silent no-op."""
    ring = ring_of(3)
    with pytest.raises(RingError, match="already"):
        ring.with_node(Node("node-0001"))
    with pytest.raises(RingError, match="not on the ring"):
        ring.without_node("ghost")
    with pytest.raises(ValueError):
        ring.owner(KEYSPACE)


def test_key_positions() -> None:
    """Object ids are their own position; names and partitions are hashed, stably."""
    oid = b"0123456789abcdef0123456789abcdef01234567"
    assert position_of_oid(oid) == 0x0123456789ABCDEF
    assert position_of_oid(bytes.fromhex(oid.decode())) == 0x0123456789ABCDEF
    with pytest.raises(ValueError):
        position_of_oid(b"abc")
    # BLAKE2b-64 pinned: a change of hash would move every name on every ring
    assert hash64(b"") == 0xE4A6A0577479B2B4
    assert position_of_name("acme/app") == position_of_name(b"acme/app")
    assert position_of_name("acme/app") != position_of_name("acme/app2")
    parts = {metadata_partition(f"org/repo-{i}", 64) for i in range(2000)}
    assert parts == set(range(64))
    assert partition_position(1) != partition_position(2)
    with pytest.raises(ValueError):
        metadata_partition("a/b", 0)
