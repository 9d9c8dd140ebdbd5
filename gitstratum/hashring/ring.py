"""Vnode tokens, preference lists, and what moves between two rings.

A node owns ``round(vnodes * weight)`` tokens (at least one). A token owns
the keys from its own position up to the next token's, so a key belongs to
the last token at or before it, wrapping round the top of the keyspace.

**Why tokens are allocated, not hashed.** Tokens placed independently by a
hash leave the most loaded of 1,000 nodes with 256 vnodes holding about
1.27 times the mean share (the load of a node is a sum of 256 exponential
gaps: a spread of 1/16, and the maximum of 1,000 such is 3 to 4 spreads
out). Cassandra met the same wall and moved to allocated tokens; so does
this ring, as Dynamo's and Cassandra's designs allow:

- ``Ring.build`` places the first members' tokens by a stable hash and then
  spaces them evenly by rank, so every node starts with exactly its share.
- ``Ring.with_node`` gives a joining node its share by carving the end off
  the largest ranges of the most loaded nodes, one token at a time. Only the
  new node gains; each donor loses a sliver.
- ``Ring.without_node`` hands the leaver's ranges, largest first, to the
  least loaded nodes (its tokens stay put and change owner). Only the
  leaver's share moves, and it evens the load out as it goes.

So the ring is a pure function of the membership *with its tokens*: the
control plane replicates the tokens with each member, and every process
that holds the same membership builds the same ring. Both allocations are
deterministic (no randomness, no dict order, no float that differs between
machines), so replaying the same joins gives the same tokens too.
"""

from __future__ import annotations

import heapq
import math
from array import array
from bisect import bisect_right
from collections.abc import Iterable, Iterator, Mapping, Sequence
from types import MappingProxyType

import attrs

from gitstratum.hashring.keys import KEYSPACE, hash64

__all__ = [
    "DEFAULT_VNODES",
    "Move",
    "Node",
    "Ring",
    "RingError",
    "apply_moves",
    "diff",
    "token_count",
]

DEFAULT_VNODES = 256
_PREF_CACHE_MAX = 1 << 16


class RingError(ValueError):
    """A ring that cannot be built as asked (duplicate id, bad token, unknown node)."""


def _check_id(_: object, __: object, value: str) -> None:
    if not value or len(value) > 128 or not value.isprintable() or value != value.strip():
        raise RingError(f"bad node id: {value[:140]!r}")


def _check_weight(_: object, __: object, value: float) -> None:
    if not (isinstance(value, int | float) and math.isfinite(value) and 0 < value <= 1000):
        raise RingError(f"a node's weight must be a number in (0, 1000], not {value!r}")


@attrs.frozen
class Node:
    """A member of the ring: its id, its weight (share relative to 1.0) and its zone."""

    id: str = attrs.field(validator=_check_id)
    weight: float = attrs.field(default=1.0, validator=_check_weight)
    zone: str | None = None


@attrs.frozen
class Move:
    """Keys in ``[start, end)`` whose replica set changes from *old* to *new*."""

    start: int
    end: int
    old: tuple[str, ...]
    new: tuple[str, ...]

    @property
    def size(self) -> int:
        return self.end - self.start


def token_count(weight: float, vnodes: int) -> int:
    """How many tokens a node of *weight* holds on a ring of *vnodes* per unit weight."""
    return max(1, round(vnodes * weight))


class Ring:
    """An immutable ring: nodes, their tokens and an epoch.

    Build one with :meth:`build` (bootstrap), :meth:`with_node` (a join),
    :meth:`without_node` (a leave), or from stored tokens with the
    constructor. Lookups are safe from any thread.
    """

    def __init__(
        self,
        nodes: Iterable[Node],
        tokens: Mapping[str, Sequence[int]],
        *,
        epoch: int = 0,
        vnodes: int = DEFAULT_VNODES,
    ):
        if vnodes < 1:
            raise RingError("vnodes must be at least 1")
        by_id: dict[str, Node] = {}
        for node in nodes:
            if node.id in by_id:
                raise RingError(f"duplicate node id {node.id!r}")
            by_id[node.id] = node
        if set(tokens) != set(by_id):
            raise RingError("every node needs tokens, and every token a node")
        ids = sorted(by_id)
        entries: list[tuple[int, int]] = []
        for index, node_id in enumerate(ids):
            owned = tokens[node_id]
            if not owned:
                raise RingError(f"node {node_id!r} has no tokens")
            for token in owned:
                if not (isinstance(token, int) and 0 <= token < KEYSPACE):
                    raise RingError(f"token {token!r} of {node_id!r} is outside the keyspace")
                entries.append((token, index))
        entries.sort()
        for (a, _), (b, _) in zip(entries, entries[1:], strict=False):
            if a == b:
                raise RingError(f"token {a} is held twice")
        self._assemble(
            [by_id[i] for i in ids],
            array("Q", [t for t, _ in entries]),
            array("I", [o for _, o in entries]),
            epoch,
            vnodes,
        )

    def _assemble(
        self, nodes: list[Node], tokens: array[int], owner: array[int], epoch: int, vnodes: int
    ) -> None:
        """Set every field from checked parts: *nodes* sorted by id, *owner* indexing them."""
        self.epoch = epoch
        self.vnodes = vnodes
        self._ids = tuple(n.id for n in nodes)
        self.nodes: Mapping[str, Node] = MappingProxyType({n.id: n for n in nodes})
        self._tokens = tokens
        self._owner = owner
        zone_keys = [n.zone or "\0" + n.id for n in nodes]
        self._zone = tuple(zone_keys)
        self._zones = len(set(zone_keys))
        self._pref_cache: dict[tuple[int, int], tuple[str, ...]] = {}

    def _derive(self, nodes: list[Node], tokens: list[int], owner: list[int]) -> Ring:
        """A ring of the next epoch from parts this ring's own methods computed (no re-check)."""
        ring = Ring.__new__(Ring)
        ring._assemble(nodes, array("Q", tokens), array("I", owner), self.epoch + 1, self.vnodes)
        return ring

    # -- building -------------------------------------------------------------------------

    @classmethod
    def build(cls, nodes: Iterable[Node], *, vnodes: int = DEFAULT_VNODES, epoch: int = 1) -> Ring:
        """The bootstrap ring: tokens ordered by a stable hash, spaced evenly by rank."""
        members = sorted(nodes, key=lambda n: n.id)
        ranked: list[tuple[int, str]] = []
        for node in members:
            for i in range(token_count(node.weight, vnodes)):
                ranked.append((hash64(f"vnode\0{node.id}\0{i}".encode()), node.id))
        ranked.sort()
        tokens: dict[str, list[int]] = {n.id: [] for n in members}
        for rank, (_, node_id) in enumerate(ranked):
            tokens[node_id].append(rank * KEYSPACE // len(ranked))
        return cls(members, tokens, epoch=epoch, vnodes=vnodes)

    def with_node(self, node: Node) -> Ring:
        """The ring after *node* joins: it takes its share, and only it gains.

        Each of its tokens carves the end off the largest range of the node
        most loaded for its weight; the bite is what the new node still needs
        divided by the tokens it has left, so it ends at its share.
        """
        if node.id in self.nodes:
            raise RingError(f"node {node.id!r} is already on the ring")
        if not self._tokens:
            return Ring.build([node], vnodes=self.vnodes, epoch=self.epoch + 1)
        count = token_count(node.weight, self.vnodes)
        total_weight = sum(n.weight for n in self.nodes.values()) + node.weight
        need = KEYSPACE * node.weight / total_weight
        loads = self._loads_by_index()
        weights = [self.nodes[i].weight for i in self._ids]
        owned: list[list[int]] = [[] for _ in self._ids]
        for t_index, o in enumerate(self._owner):
            owned[o].append(t_index)
        # A range is (token index, its current end, unwrapped); ends shrink as we carve.
        ends: dict[int, int] = {}
        ranges: dict[int, list[tuple[int, int]]] = {}
        # Ties go by node id, never by position in a list, so every process agrees.
        donors = [(-loads[o] / weights[o], self._ids[o], o) for o in range(len(self._ids))]
        heapq.heapify(donors)
        new_tokens: list[int] = []
        while len(new_tokens) < count and donors:
            _, _, donor = heapq.heappop(donors)
            heap = ranges.get(donor)
            if heap is None:
                heap = [(-self._range_length(t), t) for t in owned[donor]]
                heapq.heapify(heap)
                ranges[donor] = heap
            if not heap:
                continue  # nothing left to carve: drop the donor
            neg_length, t_index = heapq.heappop(heap)
            length = -neg_length
            if length < 2:
                continue  # its largest range is too small to split: the donor is spent
            start = self._tokens[t_index]
            end = ends.get(t_index, start + length)
            left = count - len(new_tokens)
            bite = max(1, min(length - 1, round(need / left)))
            # strictly inside (start, end), where no token is: a fresh token
            new_tokens.append((end - bite) % KEYSPACE)
            ends[t_index] = end - bite
            need -= bite
            loads[donor] -= bite
            heapq.heappush(heap, (-(length - bite), t_index))
            heapq.heappush(donors, (-loads[donor] / weights[donor], self._ids[donor], donor))
        if len(new_tokens) < count:
            raise RingError(f"the ring has no room for {count} more tokens")
        at = bisect_right(self._ids, node.id)
        tokens = self._tokens.tolist()
        owner = [o + (o >= at) for o in self._owner]
        for token in sorted(new_tokens):
            i = bisect_right(tokens, token)
            tokens.insert(i, token)
            owner.insert(i, at)
        nodes = [*self.nodes.values()]
        nodes.insert(at, node)
        return self._derive(nodes, tokens, owner)

    def without_node(self, node_id: str) -> Ring:
        """The ring after *node_id* leaves: its ranges go, largest first, to the least loaded.

        The leaver's tokens stay where they are and change owner, so only
        its share moves, and it moves where it evens out the load.
        """
        if node_id not in self.nodes:
            raise RingError(f"node {node_id!r} is not on the ring")
        gone = self._ids.index(node_id)
        owner = self._owner.tolist()
        leaving = [i for i, o in enumerate(owner) if o == gone]
        rest = [n for n in self.nodes.values() if n.id != node_id]
        if not rest:
            return self._derive([], [], [])
        loads = self._loads_by_index()
        lightest = [(loads[o] / n.weight, n.id, o) for o, n in enumerate(self.nodes.values())]
        del lightest[gone]
        heapq.heapify(lightest)
        for t_index in sorted(leaving, key=lambda t: (-self._range_length(t), t)):
            _, to_id, to = heapq.heappop(lightest)
            owner[t_index] = to
            loads[to] += self._range_length(t_index)
            heapq.heappush(lightest, (loads[to] / self.nodes[to_id].weight, to_id, to))
        owner = [o - (o > gone) for o in owner]
        return self._derive(rest, self._tokens.tolist(), owner)

    def with_epoch(self, epoch: int) -> Ring:
        """The same placement under another epoch number."""
        return Ring(self.nodes.values(), self.token_map(), epoch=epoch, vnodes=self.vnodes)

    # -- reading --------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._ids)

    def __repr__(self) -> str:
        return f"<Ring epoch={self.epoch} nodes={len(self._ids)} tokens={len(self._tokens)}>"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Ring):
            return NotImplemented
        return (
            self.epoch == other.epoch
            and self.vnodes == other.vnodes
            and dict(self.nodes) == dict(other.nodes)
            and self._tokens == other._tokens
            and [self._ids[o] for o in self._owner] == [other._ids[o] for o in other._owner]
        )

    __hash__ = None  # type: ignore[assignment]

    def token_map(self) -> dict[str, list[int]]:
        """Each node's tokens, sorted: what the control plane stores with each member."""
        out: dict[str, list[int]] = {i: [] for i in self._ids}
        for token, o in zip(self._tokens, self._owner, strict=True):
            out[self._ids[o]].append(token)
        return out

    def digest(self) -> bytes:
        """A fingerprint of the whole placement, for comparing rings across processes."""
        parts = [b"%d %d" % (self.epoch, self.vnodes)]
        for i in self._ids:
            n = self.nodes[i]
            parts.append(f"{n.id} {n.weight!r} {n.zone!r}".encode())
        parts.append(self._tokens.tobytes() + self._owner.tobytes())
        return hash64(b"\n".join(parts)).to_bytes(8, "big")

    def owner(self, position: int) -> str:
        """The node whose token owns *position*."""
        return self._ids[self._owner[self._token_index(position)]]

    def preference_list(self, position: int, n: int) -> tuple[str, ...]:
        """*n* distinct nodes for the key at *position*, owner first, walking clockwise.

        Nodes are taken from distinct zones while unused zones remain (a node
        with no zone is a zone of its own); when there are fewer zones than
        *n*, the walk goes round again for distinct nodes. Fewer than *n*
        nodes on the ring gives them all.
        """
        if not self._tokens:
            return ()
        return self._pref(self._token_index(position), n)

    def walk(self, position: int) -> Iterator[str]:
        """Every node once, in ring order from *position*: the fallbacks after a preference list."""
        if not self._tokens:
            return
        start = self._token_index(position)
        seen: set[int] = set()
        for step in range(len(self._tokens)):
            o = self._owner[(start + step) % len(self._tokens)]
            if o not in seen:
                seen.add(o)
                yield self._ids[o]
                if len(seen) == len(self._ids):
                    return

    def loads(self, n: int = 1) -> dict[str, int]:
        """The keyspace each node holds as one of the first *n* replicas."""
        out = dict.fromkeys(self._ids, 0)
        if n == 1:
            for o, load in enumerate(self._loads_by_index()):
                out[self._ids[o]] = load
            return out
        for start, end, replicas in self.ownership(n):
            for node_id in replicas:
                out[node_id] += end - start
        return out

    def ownership(self, n: int = 1) -> list[tuple[int, int, tuple[str, ...]]]:
        """The whole keyspace as ``(start, end, replicas)`` pieces, adjacent equals merged."""
        if not self._tokens:
            return []
        pieces: list[tuple[int, int, tuple[str, ...]]] = []
        first = self._tokens[0]
        if first:
            pieces.append((0, first, self._pref(len(self._tokens) - 1, n)))
        for i, token in enumerate(self._tokens):
            end = self._tokens[i + 1] if i + 1 < len(self._tokens) else KEYSPACE
            pieces.append((token, end, self._pref(i, n)))
        return _merged(pieces)

    # -- internals ------------------------------------------------------------------------

    def _token_index(self, position: int) -> int:
        if not 0 <= position < KEYSPACE:
            raise ValueError(f"position {position} is outside the keyspace")
        return (bisect_right(self._tokens, position) - 1) % len(self._tokens)

    def _range_length(self, t_index: int) -> int:
        nxt = self._tokens[(t_index + 1) % len(self._tokens)]
        return (nxt - self._tokens[t_index]) % KEYSPACE or KEYSPACE

    def _loads_by_index(self) -> list[int]:
        loads = [0] * len(self._ids)
        tokens, owner = self._tokens, self._owner
        for i in range(len(tokens) - 1):
            loads[owner[i]] += tokens[i + 1] - tokens[i]
        loads[owner[-1]] += KEYSPACE - tokens[-1] + tokens[0]
        return loads

    def _pref(self, t_index: int, n: int) -> tuple[str, ...]:
        key = (t_index, n)
        hit = self._pref_cache.get(key)
        if hit is not None:
            return hit
        want = min(n, len(self._ids))
        zone_goal = min(want, self._zones)
        chosen: list[int] = []
        zones: set[str] = set()
        count = len(self._tokens)
        for step in range(count):
            o = self._owner[(t_index + step) % count]
            if o not in chosen and self._zone[o] not in zones:
                chosen.append(o)
                zones.add(self._zone[o])
                if len(chosen) == zone_goal:
                    break
        if len(chosen) < want:
            for step in range(count):
                o = self._owner[(t_index + step) % count]
                if o not in chosen:
                    chosen.append(o)
                    if len(chosen) == want:
                        break
        result = tuple(self._ids[o] for o in chosen)
        if len(self._pref_cache) >= _PREF_CACHE_MAX:
            self._pref_cache.clear()
        self._pref_cache[key] = result
        return result


def _merged(
    pieces: Iterable[tuple[int, int, tuple[str, ...]]],
) -> list[tuple[int, int, tuple[str, ...]]]:
    out: list[tuple[int, int, tuple[str, ...]]] = []
    for start, end, replicas in pieces:
        if out and out[-1][1] == start and out[-1][2] == replicas:
            out[-1] = (out[-1][0], end, replicas)
        else:
            out.append((start, end, replicas))
    return out


def diff(old: Ring, new: Ring, n: int = 1) -> list[Move]:
    """The ranges whose first *n* replicas differ between *old* and *new*, in key order.

    This is what the object tier streams when the ring changes: for each
    range, the new replicas that lack it pull it from the old ones.
    """
    bounds = sorted({0, *old._tokens, *new._tokens})
    moves: list[Move] = []
    last_old: tuple[int, tuple[str, ...]] = (-1, ())
    last_new: tuple[int, tuple[str, ...]] = (-1, ())
    for k, start in enumerate(bounds):
        end = bounds[k + 1] if k + 1 < len(bounds) else KEYSPACE
        before: tuple[str, ...] = ()
        after: tuple[str, ...] = ()
        if old._tokens:
            i = old._token_index(start)
            if i != last_old[0]:
                last_old = (i, old._pref(i, n))
            before = last_old[1]
        if new._tokens:
            j = new._token_index(start)
            if j != last_new[0]:
                last_new = (j, new._pref(j, n))
            after = last_new[1]
        if before == after:
            continue
        if moves and moves[-1].end == start and moves[-1].old == before and moves[-1].new == after:
            moves[-1] = attrs.evolve(moves[-1], end=end)
        else:
            moves.append(Move(start, end, before, after))
    return moves


def apply_moves(
    ownership: Sequence[tuple[int, int, tuple[str, ...]]], moves: Iterable[Move]
) -> list[tuple[int, int, tuple[str, ...]]]:
    """*ownership* (as :meth:`Ring.ownership` gives it) with each move carried out.

    Raises :class:`RingError` when a move's old replicas are not who owns
    its range: a diff applied to the wrong ring.
    """
    cuts = sorted({0, KEYSPACE, *(s for s, _, _ in ownership), *(e for _, e, _ in ownership)})
    moves = list(moves)
    for m in moves:
        cuts.extend((m.start, m.end))
    cuts = sorted(set(cuts))
    # who holds each elementary piece, from the ownership list
    holders: list[tuple[str, ...]] = []
    pos = 0
    for k in range(len(cuts) - 1):
        a = cuts[k]
        while pos < len(ownership) and ownership[pos][1] <= a:
            pos += 1
        holders.append(ownership[pos][2] if pos < len(ownership) and ownership[pos][0] <= a else ())
    index = {c: k for k, c in enumerate(cuts)}
    for m in moves:
        for k in range(index[m.start], index[m.end]):
            if holders[k] != m.old:
                raise RingError(f"move of [{m.start}, {m.end}) expects {m.old}, found {holders[k]}")
            holders[k] = m.new
    pieces = [(cuts[k], cuts[k + 1], holders[k]) for k in range(len(cuts) - 1) if holders[k]]
    return _merged(pieces)
