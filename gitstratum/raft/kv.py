"""A small replicated key-value store: the state machine the Raft tests, the simulator and the test processes run.

Commands are ``Put``, ``Get`` and ``Cas`` (compare-and-swap), carried in log
entries in an explicit versioned binary form (``encode_command`` /
``decode_command``), never pickle.  ``KVStore`` implements
``IStateMachine``; ``execute`` is the same step as a pure function, which
the linearizability checker uses as its sequential model.

Command form (version 1), all integers big-endian::

    version:u8 = 1, op:u8, then per op:
      PUT  key, value
      GET  key
      CAS  present:u8 (0 = expect the key absent), [expected if present], new
    where each byte string is length:u32 followed by the bytes.

Snapshot form (version 1): ``version:u8 = 1, applied_index:u64, count:u32``,
then ``count`` pairs of key and value byte strings, keys in ascending order
so equal states give equal bytes.
"""

from __future__ import annotations

import enum
import struct

import attrs
from zope.interface import implementer

from gitstratum.raft.interfaces import IStateMachine

__all__ = [
    "FORMAT_VERSION",
    "Put",
    "Get",
    "Cas",
    "Command",
    "Result",
    "encode_command",
    "decode_command",
    "execute",
    "encode_state",
    "decode_state",
    "KVStore",
]

FORMAT_VERSION = 1
#: bytes in one key or value; far above anything the tests use, it stops a
#: corrupt length from asking for gigabytes
MAX_FIELD_BYTES = 64 * 1024 * 1024

_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")


class _Op(enum.IntEnum):
    PUT = 1
    GET = 2
    CAS = 3


@attrs.frozen
class Put:
    """Set ``key`` to ``value``; the result is ``None``."""

    key: bytes
    value: bytes


@attrs.frozen
class Get:
    """Read ``key``; the result is its value, or ``None`` when it is absent."""

    key: bytes


@attrs.frozen
class Cas:
    """Set ``key`` to ``new`` if its value is ``expected`` (``None``: if it is absent); the result says whether it did."""

    key: bytes
    expected: bytes | None
    new: bytes


Command = Put | Get | Cas
#: what applying a command returns: ``None`` for a put, the value (or
#: ``None``) for a get, a bool for a compare-and-swap
Result = bytes | bool | None


def _field(value: bytes) -> bytes:
    return _U32.pack(len(value)) + value


def encode_command(command: Command) -> bytes:
    """The version-1 binary form of ``command``."""
    if isinstance(command, Put):
        return bytes([FORMAT_VERSION, _Op.PUT]) + _field(command.key) + _field(command.value)
    if isinstance(command, Get):
        return bytes([FORMAT_VERSION, _Op.GET]) + _field(command.key)
    if isinstance(command, Cas):
        expected = b"\x00" if command.expected is None else b"\x01" + _field(command.expected)
        return (
            bytes([FORMAT_VERSION, _Op.CAS]) + _field(command.key) + expected + _field(command.new)
        )
    raise TypeError(f"not a KV command: {command!r}")


class _Reader:
    """Reads fields off a byte string, raising ``ValueError`` on anything short or oversized."""

    def __init__(self, data: bytes, what: str) -> None:
        self._data = data
        self._pos = 0
        self._what = what

    def take(self, n: int) -> bytes:
        if n > len(self._data) - self._pos:
            raise ValueError(f"truncated {self._what}")
        chunk = self._data[self._pos : self._pos + n]
        self._pos += n
        return chunk

    def byte(self) -> int:
        return self.take(1)[0]

    def u32(self) -> int:
        (value,) = _U32.unpack(self.take(4))
        return int(value)

    def u64(self) -> int:
        (value,) = _U64.unpack(self.take(8))
        return int(value)

    def field(self) -> bytes:
        length = self.u32()
        if length > MAX_FIELD_BYTES:
            raise ValueError(f"{self._what}: field of {length} bytes is too long")
        return self.take(length)

    def version(self) -> None:
        version = self.byte()
        if version != FORMAT_VERSION:
            raise ValueError(f"{self._what}: unsupported version {version}")

    def end(self) -> None:
        if self._pos != len(self._data):
            raise ValueError(f"{self._what}: {len(self._data) - self._pos} trailing bytes")


def decode_command(data: bytes) -> Command:
    """The inverse of ``encode_command``; ``ValueError`` for anything that is not exactly one command."""
    reader = _Reader(bytes(data), "KV command")
    reader.version()
    op = reader.byte()
    command: Command
    if op == _Op.PUT:
        key = reader.field()
        command = Put(key, reader.field())
    elif op == _Op.GET:
        command = Get(reader.field())
    elif op == _Op.CAS:
        key = reader.field()
        present = reader.byte()
        if present not in (0, 1):
            raise ValueError(f"KV command: bad compare-and-swap flag {present}")
        expected = reader.field() if present else None
        command = Cas(key, expected, reader.field())
    else:
        raise ValueError(f"KV command: unknown operation {op}")
    reader.end()
    return command


def execute(value: bytes | None, command: Command) -> tuple[Result, bytes | None]:
    """One command against one key's current ``value``: ``(result, new value)``.

    The sequential specification shared by ``KVStore`` and the
    linearizability checker's model, so the two cannot drift apart.
    """
    if isinstance(command, Put):
        return None, command.value
    if isinstance(command, Get):
        return value, value
    if isinstance(command, Cas):
        if value == command.expected:
            return True, command.new
        return False, value
    raise TypeError(f"not a KV command: {command!r}")


def encode_state(data: dict[bytes, bytes], applied_index: int) -> bytes:
    """The version-1 snapshot form; keys sorted so it depends only on the state."""
    parts = [bytes([FORMAT_VERSION]), _U64.pack(applied_index), _U32.pack(len(data))]
    for key in sorted(data):
        parts.append(_field(key))
        parts.append(_field(data[key]))
    return b"".join(parts)


def decode_state(blob: bytes) -> tuple[dict[bytes, bytes], int]:
    """The inverse of ``encode_state``: ``(data, applied_index)``; ``ValueError`` for anything else."""
    reader = _Reader(bytes(blob), "KV snapshot")
    reader.version()
    applied_index = reader.u64()
    count = reader.u32()
    data: dict[bytes, bytes] = {}
    previous: bytes | None = None
    for _ in range(count):
        key = reader.field()
        # Ascending keys are part of the form: it makes the encoding unique
        # and catches corruption that would otherwise merge two keys.
        if previous is not None and key <= previous:
            raise ValueError("KV snapshot: keys out of order")
        data[key] = reader.field()
        previous = key
    reader.end()
    return data, applied_index


@implementer(IStateMachine)
@attrs.define
class KVStore:
    """An in-memory key-value map driven by committed log entries.

    ``applied_index`` is the index of the last entry applied; applying an
    index at or below it raises, because applying an entry twice is a
    driver bug that a compare-and-swap would silently turn into wrong data.
    """

    data: dict[bytes, bytes] = attrs.field(factory=dict)
    applied_index: int = 0

    def apply(self, index: int, data: bytes) -> Result:
        """Apply the command in the entry at ``index``; an empty entry (a leader's no-op) changes nothing."""
        if index <= self.applied_index:
            raise ValueError(f"entry {index} applied twice (already applied {self.applied_index})")
        self.applied_index = index
        if not data:
            return None
        return self.execute(decode_command(data))

    def execute(self, command: Command) -> Result:
        """Run ``command`` against the current state (no log index involved)."""
        result, new_value = execute(self.data.get(command.key), command)
        if new_value is None:
            self.data.pop(command.key, None)
        else:
            self.data[command.key] = new_value
        return result

    def query(self, request: bytes) -> Result:
        """Answer an encoded ``Get`` against the applied state; other commands would write, so they are refused."""
        command = decode_command(request)
        if not isinstance(command, Get):
            raise ValueError(f"KV query must be a get, not {type(command).__name__.lower()}")
        return self.data.get(command.key)

    def snapshot(self) -> bytes:
        return encode_state(self.data, self.applied_index)

    def restore(self, data: bytes) -> None:
        self.data, self.applied_index = decode_state(data)
