"""The topology: the cluster's members and ring configuration as one frozen value, and its wire form.

This is what the control plane publishes, what every member caches in
memory and on disk, and what ``GetTopology`` and ``WatchTopology`` carry.
It is pure: no reactor, no clock, no I/O.

- :class:`Member`: one node (id, roles, addresses, zone, weight, state,
  the leader's time of its last heartbeat, and its tokens on each ring it
  is on).
- :class:`RingConfig`: vnodes, replication factor, metadata partitions.
- :class:`Topology`: ``epoch`` (bumped by every change of ring placement
  or ring configuration), ``version`` (bumped by every change at all except
  heartbeat times: what watchers are pushed on), the config and the members
  sorted by id. ``topology.ring(Role.OBJECT)`` builds (once) the
  :class:`~gitstratum.hashring.ring.Ring` of that role at the topology's
  epoch.

There are two rings, one per ring role: the object ring places objects and
pack-cache entries; the metadata ring places the metadata partitions
(``hashring.keys.partition_position``). A member is on a role's ring, and
has tokens for it, exactly when it has the role and its state is joining,
active or down: a ``down`` node keeps its place (the object tier hands off,
it does not re-shuffle); ``draining`` and ``removed`` nodes are off.

Wire form (``Topology.encode`` / ``Topology.decode``), integers big-endian::

    version u8 = 1
    header length u32, header: snappy(JSON, sorted keys, compact)
    tokens: little-endian u64s; for each member in header order its object
            tokens then its metadata tokens (counts are in the header)
    CRC-32 u32 of everything before it

Tokens are packed, never JSON lists of ints: 1,000 nodes at 256 vnodes is
2 MB of tokens, which as JSON would be 5 MB and a quarter of a million
Python ints to parse. The form is longer than one AMP value (64 KiB), so
the AMP layer must send it in chunks. Decoding checks everything a
:class:`Topology` promises (valid fields, sorted unique ids, unique live
addresses, tokens exactly on the members that should have them, no token
held twice on a ring), so a decoded topology always builds its rings.
"""

from __future__ import annotations

import enum
import ipaddress
import json
import math
import re
import struct
import sys
import zlib
from array import array
from collections.abc import Iterable, Iterator
from typing import Any

import attrs
import snappy

from gitstratum.control.errors import CommandRefused, Refusal
from gitstratum.hashring.ring import DEFAULT_VNODES, Node, Ring

__all__ = [
    "DEFAULT_MAX_TOPOLOGY_BYTES",
    "MAX_PARTITIONS",
    "MAX_REPLICATION",
    "MAX_VNODES",
    "MAX_WEIGHT",
    "ON_RING",
    "RING_ROLES",
    "TOPOLOGY_VERSION",
    "Member",
    "MemberState",
    "RingConfig",
    "Role",
    "Topology",
    "TopologyError",
    "build_ring",
    "canonical_address",
    "check_id",
    "check_invariants",
    "check_time",
    "check_weight",
    "check_zone",
    "pack_tokens",
    "load_json",
    "parse_roles",
    "snappy_length",
    "unpack_tokens",
]

TOPOLOGY_VERSION = 1
#: the most a decoded topology may take once uncompressed (header plus tokens)
DEFAULT_MAX_TOPOLOGY_BYTES = 256 * 1024 * 1024
MAX_WEIGHT = 1000.0
MAX_VNODES = 4096
MAX_REPLICATION = 16
MAX_PARTITIONS = 65536

_U32 = struct.Struct(">I")
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", re.ASCII)
_ZONE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", re.ASCII)
_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)", re.ASCII)
_PORT = re.compile(r"[1-9][0-9]{0,4}", re.ASCII)

assert array("Q").itemsize == 8, "tokens are packed as 8-byte unsigned integers"


class TopologyError(ValueError):
    """Bytes that are not a topology this version can read, or one that breaks its invariants."""


class Role(enum.Enum):
    """What a member does; a member has one or more."""

    CONTROL = "control"
    METADATA = "metadata"
    OBJECT = "object"
    FRONTEND = "frontend"


#: the roles with a ring, in the order their tokens are packed
RING_ROLES = (Role.OBJECT, Role.METADATA)


class MemberState(enum.Enum):
    """Where a member is in its life; see ``gitstratum.control.state`` for the transitions."""

    JOINING = "joining"
    ACTIVE = "active"
    DRAINING = "draining"
    DOWN = "down"
    REMOVED = "removed"


#: the states in which a ring-role member holds tokens (and data)
ON_RING = frozenset({MemberState.JOINING, MemberState.ACTIVE, MemberState.DOWN})


# -- field rules (shared by the commands' validation and the decoder) ----------------------


def check_id(value: object) -> str:
    """A member id: 1 to 128 of ``A-Za-z0-9._-``, starting with a letter or digit."""
    if not isinstance(value, str) or not _ID.fullmatch(value):
        raise CommandRefused(
            Refusal.BAD_ID,
            f"a node id is 1 to 128 of A-Za-z0-9._- starting alphanumeric, not {_show(value)}",
        )
    return value


def check_zone(value: object) -> str | None:
    """A zone (``None`` for none): 1 to 64 of ``A-Za-z0-9._-``, starting with a letter or digit."""
    if value is None:
        return None
    if not isinstance(value, str) or not _ZONE.fullmatch(value):
        raise CommandRefused(
            Refusal.BAD_ZONE,
            f"a zone is 1 to 64 of A-Za-z0-9._- starting alphanumeric, not {_show(value)}",
        )
    return value


def check_weight(value: object) -> float:
    """A weight: a finite number in (0, 1000], the member's share relative to 1.0."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or not 0 < value <= MAX_WEIGHT
    ):
        raise CommandRefused(
            Refusal.BAD_WEIGHT, f"a weight is a number in (0, {MAX_WEIGHT:g}], not {_show(value)}"
        )
    return float(value)


def check_time(value: object) -> float:
    """A time from the leader's clock: finite, non-negative seconds."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value < 0
    ):
        raise CommandRefused(
            Refusal.BAD_TIME, f"a time is finite non-negative seconds, not {_show(value)}"
        )
    return float(value)


def parse_roles(values: object) -> frozenset[Role]:
    """A non-empty set of role names (``control``, ``metadata``, ``object``, ``frontend``)."""
    if not isinstance(values, tuple | list | frozenset | set) or not values:
        raise CommandRefused(Refusal.UNKNOWN_ROLE, "a member needs at least one role")
    roles = set()
    for value in values:
        try:
            roles.add(Role(value))
        except ValueError:
            known = ", ".join(r.value for r in Role)
            raise CommandRefused(
                Refusal.UNKNOWN_ROLE, f"unknown role {_show(value)} (known: {known})"
            ) from None
    return frozenset(roles)


def canonical_address(value: object) -> str:
    """``HOST:PORT`` in canonical form (IPs normalised, names lower-cased), or ``BAD_ADDRESS``.

    HOST is an IPv4 address, a bracketed IPv6 address or a DNS name; PORT is
    1 to 65535. The unspecified addresses (``0.0.0.0``, ``[::]``) are
    refused: a member's address is one other nodes dial.
    """
    bad = CommandRefused(Refusal.BAD_ADDRESS, f"an address is HOST:PORT, not {_show(value)}")
    if not isinstance(value, str) or len(value) > 300:
        raise bad
    if value.startswith("["):
        host, sep, port = value[1:].partition("]:")
        try:
            ip6 = ipaddress.IPv6Address(host)
        except ValueError:
            raise bad from None
        if ip6.is_unspecified or ip6.scope_id:
            raise bad
        host = f"[{ip6.compressed}]"
    else:
        host, sep, port = value.rpartition(":")
        try:
            ip4 = ipaddress.IPv4Address(host)
        except ValueError:
            host = host.lower().removesuffix(".")
            labels = host.split(".")
            if (
                len(host) > 253
                or not all(_LABEL.fullmatch(label) for label in labels)
                or labels[-1].isdigit()
            ):
                raise bad from None
        else:
            if ip4.is_unspecified:
                raise bad from None
            host = str(ip4)
    if not sep or not _PORT.fullmatch(port) or int(port) > 65535:
        raise bad
    return f"{host}:{int(port)}"


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# -- tokens ------------------------------------------------------------------------------


def pack_tokens(tokens: Iterable[int]) -> bytes:
    """Tokens as little-endian u64s (the in-memory and wire form of a member's tokens)."""
    packed = array("Q", tokens)
    if sys.byteorder == "big":
        packed.byteswap()
    return packed.tobytes()


def unpack_tokens(data: bytes) -> array[int]:
    """The inverse of :func:`pack_tokens`."""
    if len(data) % 8:
        raise TopologyError(f"{len(data)} bytes of tokens is not a whole number of tokens")
    tokens = array("Q")
    tokens.frombytes(data)
    if sys.byteorder == "big":
        tokens.byteswap()
    return tokens


# -- values --------------------------------------------------------------------------------


def _tokens_repr(value: bytes) -> str:
    return f"<{len(value) // 8} tokens>"


@attrs.frozen
class Member:
    """One node of the cluster, as the control plane records it.

    ``address`` is its AMP ``HOST:PORT``; ``http`` and ``ssh`` are a
    frontend's public addresses (``None`` otherwise). ``last_heartbeat`` is
    the leader's clock when it last heard from the node (a join counts).
    ``object_tokens`` and ``metadata_tokens`` are packed (:func:`pack_tokens`);
    use :meth:`tokens` for the integers.
    """

    id: str
    roles: frozenset[Role]
    address: str
    state: MemberState
    last_heartbeat: float
    weight: float = 1.0
    zone: str | None = None
    http: str | None = None
    ssh: str | None = None
    object_tokens: bytes = attrs.field(default=b"", repr=_tokens_repr)
    metadata_tokens: bytes = attrs.field(default=b"", repr=_tokens_repr)

    def token_bytes(self, role: Role) -> bytes:
        """This member's packed tokens on *role*'s ring (empty when it is not on it)."""
        if role is Role.OBJECT:
            return self.object_tokens
        if role is Role.METADATA:
            return self.metadata_tokens
        raise ValueError(f"the {role.value} role has no ring")

    def tokens(self, role: Role) -> array[int]:
        """This member's tokens on *role*'s ring, ascending."""
        return unpack_tokens(self.token_bytes(role))

    def with_tokens(self, role: Role, packed: bytes) -> Member:
        """This member with its tokens on *role*'s ring replaced by *packed*."""
        if role is Role.OBJECT:
            return attrs.evolve(self, object_tokens=packed)
        if role is Role.METADATA:
            return attrs.evolve(self, metadata_tokens=packed)
        raise ValueError(f"the {role.value} role has no ring")

    @property
    def addresses(self) -> tuple[str, ...]:
        """Every address this member listens on (AMP, then public HTTP and SSH if any)."""
        return tuple(a for a in (self.address, self.http, self.ssh) if a is not None)

    @property
    def holds_data(self) -> bool:
        """A ring-role (object or metadata) member that has not been drained or removed.

        Such a node may hold the only copies of some data, so it cannot be
        removed until a drain has moved its ranges to others. The control
        plane cannot see the copy finish: whoever removes a drained node
        (the operator, ``gitstratum cluster remove``) waits for the tier to
        say its ranges are streamed.
        """
        return bool(self.roles & set(RING_ROLES)) and self.state in ON_RING

    def ring_node(self) -> Node:
        """This member as a ring node (id, weight, zone)."""
        return Node(self.id, self.weight, self.zone)


@attrs.frozen
class RingConfig:
    """How the rings are laid out: vnodes per unit weight, replicas per key, metadata partitions."""

    vnodes: int = DEFAULT_VNODES
    replication: int = 3
    partitions: int = 64

    def check(self) -> RingConfig:
        """This config, or ``BAD_CONFIG`` when a value is out of range."""
        for name, value, top in (
            ("vnodes", self.vnodes, MAX_VNODES),
            ("replication", self.replication, MAX_REPLICATION),
            ("partitions", self.partitions, MAX_PARTITIONS),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= top:
                raise CommandRefused(
                    Refusal.BAD_CONFIG, f"{name} is an integer in [1, {top}], not {value!r}"
                )
        return self


@attrs.frozen
class Topology:
    """The cluster as of one applied log index: epoch, version, config and members by id.

    Removed members stay listed (state ``removed``, no addresses reserved,
    no tokens) so that watchers see them go.
    """

    epoch: int
    version: int
    config: RingConfig
    #: sorted by id
    members: tuple[Member, ...]
    _by_id: dict[str, Member] = attrs.field(init=False, eq=False, repr=False, hash=False)
    _rings: dict[Role, Ring] = attrs.field(init=False, eq=False, repr=False, hash=False)

    def __attrs_post_init__(self) -> None:
        object.__setattr__(self, "_by_id", {m.id: m for m in self.members})
        object.__setattr__(self, "_rings", {})

    def member(self, node_id: str) -> Member | None:
        """The member with id *node_id*, removed or not; ``None`` if there never was one."""
        return self._by_id.get(node_id)

    def with_role(self, role: Role, states: Iterable[MemberState] = ()) -> Iterator[Member]:
        """The members with *role*, in id order; only those in *states* if any are given."""
        wanted = frozenset(states)
        for m in self.members:
            if role in m.roles and (not wanted or m.state in wanted):
                yield m

    def ring(self, role: Role) -> Ring:
        """*role*'s ring at this epoch (built on first use, then kept)."""
        ring = self._rings.get(role)
        if ring is None:
            ring = build_ring(self.members, role, self.config.vnodes, self.epoch)
            self._rings[role] = ring
        return ring

    # -- the wire form ----------------------------------------------------------------------

    def encode(self) -> bytes:
        """The compact wire form (see the module docstring)."""
        header = {
            "epoch": self.epoch,
            "version": self.version,
            "config": attrs.asdict(self.config),
            "members": [_member_header(m) for m in self.members],
        }
        text = json.dumps(header, sort_keys=True, separators=(",", ":"), allow_nan=False)
        compressed = snappy.compress(text.encode("utf-8"))
        parts = [bytes([TOPOLOGY_VERSION]), _U32.pack(len(compressed)), compressed]
        for m in self.members:
            parts.append(m.object_tokens)
            parts.append(m.metadata_tokens)
        body = b"".join(parts)
        return body + _U32.pack(zlib.crc32(body))

    @classmethod
    def decode(cls, data: bytes, *, max_bytes: int = DEFAULT_MAX_TOPOLOGY_BYTES) -> Topology:
        """The inverse of :meth:`encode`; :class:`TopologyError` for anything else.

        *max_bytes* bounds what the header may decompress to and the whole
        form, so a hostile or corrupt length cannot ask for gigabytes.
        """
        data = bytes(data)
        if len(data) > max_bytes:
            raise TopologyError(f"topology of {len(data)} bytes is over the {max_bytes} limit")
        if len(data) < 9:
            raise TopologyError("truncated topology")
        if data[0] != TOPOLOGY_VERSION:
            raise TopologyError(f"unsupported topology version {data[0]}")
        (crc,) = _U32.unpack_from(data, len(data) - 4)
        if zlib.crc32(data[:-4]) != crc:
            raise TopologyError("topology checksum mismatch")
        (header_length,) = _U32.unpack_from(data, 1)
        tokens_at = 5 + header_length
        if tokens_at > len(data) - 4:
            raise TopologyError("truncated topology header")
        try:
            header = load_json(bytes(data[5:tokens_at]), max_bytes, compressed=True)
        except ValueError as e:
            raise TopologyError(f"unreadable topology header: {e}") from None
        try:
            return _from_header(header, memoryview(data)[tokens_at:-4])
        except CommandRefused as e:
            raise TopologyError(f"bad member in topology: {e}") from None


def build_ring(members: Iterable[Member], role: Role, vnodes: int, epoch: int) -> Ring:
    """*role*'s ring of those *members* with tokens on it."""
    on_ring = [m for m in members if m.token_bytes(role)]
    return Ring(
        [m.ring_node() for m in on_ring],
        {m.id: m.tokens(role) for m in on_ring},
        epoch=epoch,
        vnodes=vnodes,
    )


_MEMBER_KEYS = frozenset(
    {
        "id",
        "roles",
        "address",
        "state",
        "last_heartbeat",
        "weight",
        "zone",
        "http",
        "ssh",
        "object_tokens",
        "metadata_tokens",
    }
)
_TOP_KEYS = frozenset({"epoch", "version", "config", "members"})


def _member_header(m: Member) -> dict[str, Any]:
    return {
        "id": m.id,
        "roles": sorted(r.value for r in m.roles),
        "address": m.address,
        "state": m.state.value,
        "last_heartbeat": m.last_heartbeat,
        "weight": m.weight,
        "zone": m.zone,
        "http": m.http,
        "ssh": m.ssh,
        "object_tokens": len(m.object_tokens) // 8,
        "metadata_tokens": len(m.metadata_tokens) // 8,
    }


def snappy_length(data: bytes) -> int:
    """The uncompressed length a snappy block declares (its leading varint)."""
    length = shift = 0
    for i, byte in enumerate(data[:5]):
        length |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return length
        shift += 7
        if i == 4:
            break
    raise ValueError("bad snappy length")


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number")


def load_json(data: bytes, max_bytes: int, *, compressed: bool) -> Any:
    """Strict JSON (no NaN or Infinity), snappy-decompressed first if *compressed*.

    Raises ``ValueError`` for anything unreadable, and before decompressing
    when the block declares more than *max_bytes*.
    """
    if compressed:
        if snappy_length(data) > max_bytes:
            raise ValueError(f"it would decompress past the {max_bytes} byte limit")
        try:
            data = snappy.uncompress(data)
        except snappy.UncompressError as e:
            raise ValueError(f"corrupt snappy block: {e}") from None
    # json and UTF-8 errors are ValueErrors
    return json.loads(data.decode("utf-8"), parse_constant=_no_constant)


def _int(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << 63:
        raise TopologyError(f"{what} is not a non-negative integer: {_show(value)}")
    return value


def _opt_address(value: object) -> str | None:
    return None if value is None else canonical_address(value)


def _from_header(header: object, tokens: memoryview) -> Topology:
    if not isinstance(header, dict) or set(header) != _TOP_KEYS:
        raise TopologyError("topology header has the wrong keys")
    config = header["config"]
    if not isinstance(config, dict) or set(config) != {"vnodes", "replication", "partitions"}:
        raise TopologyError("topology config has the wrong keys")
    try:
        ring_config = RingConfig(**config).check()
    except CommandRefused as e:
        raise TopologyError(str(e)) from None
    raw_members = header["members"]
    if not isinstance(raw_members, list):
        raise TopologyError("topology members is not a list")
    members: list[Member] = []
    offset = 0
    for raw in raw_members:
        if not isinstance(raw, dict) or set(raw) != _MEMBER_KEYS:
            raise TopologyError("a topology member has the wrong keys")
        packed: dict[Role, bytes] = {}
        for role in RING_ROLES:
            count = _int(raw[f"{role.value}_tokens"], "a token count")
            end = offset + 8 * count
            if end > len(tokens):
                raise TopologyError("the topology's tokens are truncated")
            packed[role] = bytes(tokens[offset:end])
            offset = end
        state_name = raw["state"]
        if state_name not in {s.value for s in MemberState}:
            raise TopologyError(f"unknown member state {_show(state_name)}")
        members.append(
            Member(
                id=check_id(raw["id"]),
                roles=parse_roles(raw["roles"]),
                address=canonical_address(raw["address"]),
                state=MemberState(state_name),
                last_heartbeat=check_time(raw["last_heartbeat"]),
                weight=check_weight(raw["weight"]),
                zone=check_zone(raw["zone"]),
                http=_opt_address(raw["http"]),
                ssh=_opt_address(raw["ssh"]),
                object_tokens=packed[Role.OBJECT],
                metadata_tokens=packed[Role.METADATA],
            )
        )
    if offset != len(tokens):
        raise TopologyError(f"{len(tokens) - offset} bytes after the topology's tokens")
    topology = Topology(
        epoch=_int(header["epoch"], "the epoch"),
        version=_int(header["version"], "the version"),
        config=ring_config,
        members=tuple(members),
    )
    check_invariants(topology.members)
    return topology


def check_invariants(members: Iterable[Member]) -> None:
    """Raise :class:`TopologyError` unless *members* is a topology's membership.

    Ids ascend (so are unique); no two members that are not removed share an
    address; a member has tokens on a role's ring exactly when it has the
    role and is on the ring (:data:`ON_RING`), and they ascend; no token is
    held twice on one ring.
    """
    previous = ""
    seen_addresses: set[str] = set()
    held: dict[Role, set[int]] = {role: set() for role in RING_ROLES}
    for m in members:
        if m.id <= previous:
            raise TopologyError(f"member ids out of order at {m.id!r}")
        previous = m.id
        if (m.http is not None or m.ssh is not None) and Role.FRONTEND not in m.roles:
            raise TopologyError(f"{m.id!r} has public addresses but is not a frontend")
        if m.state is not MemberState.REMOVED:
            mine = m.addresses
            if len(set(mine)) != len(mine) or seen_addresses.intersection(mine):
                raise TopologyError(f"an address of {m.id!r} is used twice")
            seen_addresses.update(mine)
        for role in RING_ROLES:
            tokens = m.tokens(role)
            should = role in m.roles and m.state in ON_RING
            if bool(tokens) != should:
                raise TopologyError(
                    f"{m.id!r} ({m.state.value}) {'lacks' if should else 'has'} {role.value} tokens"
                )
            if any(a >= b for a, b in zip(tokens, tokens[1:], strict=False)):
                raise TopologyError(f"{m.id!r}'s {role.value} tokens are not ascending")
            ring_tokens = held[role]
            before = len(ring_tokens)
            ring_tokens.update(tokens)
            if len(ring_tokens) != before + len(tokens):
                raise TopologyError(f"a {role.value} token of {m.id!r} is held twice")
