"""The control plane's commands and queries, their results, and their deterministic wire form.

A command is a frozen value; ``encode_command`` gives the bytes the
service proposes to Raft, and ``ControlState.apply`` decodes and applies
them on every replica. The values carry what the proposer was given, as
given: every check (a well-formed id, a known role, a dialable address, a
weight in range) is made in ``apply``, the same on every replica, so a
refused command is refused everywhere and changes nothing.

Times (``at``, ``cutoff``) are the *leader's* clock, put in the command by
the service that proposes it; ``apply`` never reads a clock.

Commands that an operator or a member decides on from a topology it has
seen (``Join``, ``Leave``, ``Drain``, ``Remove``, ``SetConfig``) may carry
``expect_epoch``: the command is refused with ``STALE_EPOCH`` if the epoch
has moved on since.

Wire form: ``version u8 = 1``, ``compressed u8`` (0 or 1), then the JSON
object ``{"op": NAME, FIELD: VALUE, ...}`` with every field present, keys
sorted, compact separators and no NaN: snappy-compressed when it is over
:data:`COMPRESS_OVER` bytes (a large heartbeat batch). Never pickle. A
change to a command's fields must bump :data:`COMMAND_VERSION`, and a
mixed-version control plane must not propose the new version until every
replica reads it (an old replica would refuse what a new one applies).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import attrs
import snappy

from gitstratum.control.errors import CommandRefused, Refusal, Refused
from gitstratum.control.topology import load_json

__all__ = [
    "COMMAND_VERSION",
    "COMPRESS_OVER",
    "MAX_COMMAND_BYTES",
    "Applied",
    "Command",
    "Drain",
    "GetMember",
    "GetTopology",
    "Heartbeat",
    "Join",
    "Leave",
    "MarkActive",
    "MarkDown",
    "Query",
    "Remove",
    "Result",
    "SetConfig",
    "decode_command",
    "decode_query",
    "encode_command",
    "encode_query",
    "unwrap",
]

COMMAND_VERSION = 1
#: JSON longer than this is snappy-compressed
COMPRESS_OVER = 1024
#: the most a command may decompress to. Not an option: it must be the same
#: on every replica, or one would refuse what another applies.
MAX_COMMAND_BYTES = 16 * 1024 * 1024


@attrs.frozen
class Join:
    """Add a member, or (same id and address, after a restart) mark it active again.

    A new member starts ``joining`` with ``at`` as its last heartbeat; an
    object or metadata member gets its tokens on that ring, allocated in
    ``apply``. ``http`` and ``ssh`` are a frontend's public addresses.
    """

    id: str
    roles: tuple[str, ...]
    address: str
    at: float
    http: str | None = None
    ssh: str | None = None
    zone: str | None = None
    weight: float = 1.0
    expect_epoch: int | None = None


@attrs.frozen
class Leave:
    """A member's own request to be removed; the same checks as :class:`Remove`."""

    id: str
    expect_epoch: int | None = None


@attrs.frozen
class Heartbeat:
    """The leader heard from *nodes* at *at* (its clock): one batch per interval, not one per node.

    A ``joining`` member heard from becomes ``active``; a ``down`` one stays
    down until the failure detector's ``MarkActive``. Ids that are not
    members (or were removed) are skipped and listed in the result's
    ``ignored``, so the service can tell those nodes to join again.
    """

    nodes: tuple[str, ...]
    at: float


@attrs.frozen
class MarkDown:
    """The failure detector's verdict: mark *id* down if it was last heard from before *cutoff*.

    The condition is checked again in ``apply``, so a heartbeat committed
    between the detector's look and this command wins (``STALE_HEARTBEAT``).
    """

    id: str
    cutoff: float


@attrs.frozen
class MarkActive:
    """The failure detector's verdict: mark down member *id* active, if heard from at or after *cutoff*."""

    id: str
    cutoff: float


@attrs.frozen
class Drain:
    """Take a member out of service: off every ring (its ranges move to others), state ``draining``."""

    id: str
    expect_epoch: int | None = None


@attrs.frozen
class Remove:
    """The operator removes a member: state ``removed``, its addresses free for others."""

    id: str
    expect_epoch: int | None = None


@attrs.frozen
class SetConfig:
    """Change the ring configuration; ``None`` leaves a value as it is.

    ``vnodes`` and ``partitions`` are fixed once any member is on a ring
    (``CONFIG_LOCKED``); ``replication`` may change at any time.
    """

    vnodes: int | None = None
    replication: int | None = None
    partitions: int | None = None
    expect_epoch: int | None = None


Command = Join | Leave | Heartbeat | MarkDown | MarkActive | Drain | Remove | SetConfig


@attrs.frozen
class GetTopology:
    """Query: the whole :class:`~gitstratum.control.topology.Topology`."""


@attrs.frozen
class GetMember:
    """Query: one :class:`~gitstratum.control.topology.Member`, or ``None``."""

    id: str


Query = GetTopology | GetMember


@attrs.frozen
class Applied:
    """The result of an applied command: the epoch and version after it.

    ``changed`` is false for a command that found nothing to do (a repeat
    drain, a config already so, a heartbeat batch that only moved times).
    """

    epoch: int
    version: int
    changed: bool = True
    #: for a heartbeat batch, the ids that are not members
    ignored: tuple[str, ...] = ()


#: what ``ControlState.apply`` returns: ``None`` only for an empty entry (a leader's no-op)
Result = Applied | Refused | None


def unwrap(result: object) -> Applied:
    """*result* if the command was applied; raise :class:`CommandRefused` if it was refused."""
    if isinstance(result, Refused):
        result.raise_()
    if not isinstance(result, Applied):
        raise TypeError(f"not a control command's result: {result!r}")
    return result


# -- the wire form ---------------------------------------------------------------------------


def _str(value: object) -> object:
    if not isinstance(value, str):
        raise TypeError("a string")
    return value


def _opt(check: Callable[[object], object]) -> Callable[[object], object]:
    def checked(value: object) -> object:
        return None if value is None else check(value)

    return checked


def _int(value: object) -> object:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError("an integer")
    return value


def _number(value: object) -> object:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError("a number")
    # 10**400 would not become a float; OverflowError is not a TypeError
    try:
        return float(value)
    except OverflowError:
        raise TypeError("a number a float can hold") from None


def _strings(value: object) -> object:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise TypeError("a list of strings")
    return tuple(value)


#: how each field's declared type is read back from JSON; a field of any
#: other type fails at import, so a new field cannot go unchecked
_READERS: dict[str, Callable[[object], object]] = {
    "str": _str,
    "str | None": _opt(_str),
    "int | None": _opt(_int),
    "float": _number,
    "tuple[str, ...]": _strings,
}

_COMMANDS: dict[str, type] = {
    "join": Join,
    "leave": Leave,
    "heartbeat": Heartbeat,
    "mark_down": MarkDown,
    "mark_active": MarkActive,
    "drain": Drain,
    "remove": Remove,
    "set_config": SetConfig,
}
_QUERIES: dict[str, type] = {"get_topology": GetTopology, "get_member": GetMember}
_NAMES = {cls: name for name, cls in (_COMMANDS | _QUERIES).items()}

for _cls in _NAMES:
    for _field in attrs.fields(_cls):
        assert _field.type in _READERS, f"{_cls.__name__}.{_field.name}: {_field.type!r}"


def _encode(value: Command | Query) -> bytes:
    # asdict turns tuples into lists, as JSON wants
    body: dict[str, Any] = {"op": _NAMES[type(value)], **attrs.asdict(value)}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()
    if len(text) > COMPRESS_OVER:
        return bytes([COMMAND_VERSION, 1]) + snappy.compress(text)
    return bytes([COMMAND_VERSION, 0]) + text


def _decode(data: bytes, table: dict[str, type], what: str) -> Any:
    data = bytes(data)
    if len(data) < 2 or data[0] != COMMAND_VERSION or data[1] not in (0, 1):
        raise _malformed(f"not a version-{COMMAND_VERSION} control {what}")
    try:
        body = load_json(data[2:], MAX_COMMAND_BYTES, compressed=bool(data[1]))
    except ValueError as e:
        raise _malformed(f"unreadable control {what}: {e}") from None
    if not isinstance(body, dict):
        raise _malformed(f"a control {what} is a JSON object")
    op = body.pop("op", None)
    cls = table.get(op) if isinstance(op, str) else None
    if cls is None:
        raise _malformed(f"unknown control {what}")
    fields = attrs.fields(cls)
    if set(body) != {f.name for f in fields}:
        raise _malformed(f"a {cls.__name__} has the fields {', '.join(f.name for f in fields)}")
    values = {}
    for field in fields:
        try:
            values[field.name] = _READERS[field.type](body[field.name])  # type: ignore[index]
        except TypeError as e:
            raise _malformed(f"{cls.__name__}.{field.name} must be {e}") from None
    return cls(**values)


def _malformed(message: str) -> CommandRefused:
    return CommandRefused(Refusal.MALFORMED, message)


def encode_command(command: Command) -> bytes:
    """The bytes to propose for *command* (deterministic: equal commands, equal bytes)."""
    if not isinstance(command, tuple(_COMMANDS.values())):
        raise TypeError(f"not a control command: {command!r}")
    return _encode(command)


def decode_command(data: bytes) -> Command:
    """The inverse of :func:`encode_command`; :class:`CommandRefused` (``MALFORMED``) otherwise."""
    command: Command = _decode(data, _COMMANDS, "command")
    return command


def encode_query(query: Query) -> bytes:
    """The bytes to pass to ``RaftNode.read`` for *query*."""
    if not isinstance(query, GetTopology | GetMember):
        raise TypeError(f"not a control query: {query!r}")
    return _encode(query)


def decode_query(data: bytes) -> Query:
    """The inverse of :func:`encode_query`; :class:`CommandRefused` (``MALFORMED``) otherwise."""
    query: Query = _decode(data, _QUERIES, "query")
    return query
