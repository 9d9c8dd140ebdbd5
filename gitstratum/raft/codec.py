"""The wire form of a Raft ``Message``: explicit, versioned, struct-packed bytes (never pickle).

Layout, all integers big-endian::

    header   version u8, message type u8, body length u32, body CRC-32 u32
    body     to u64, from u64, term u64, log_term u64, index u64, commit u64,
             reject u8, reject_hint u64,
             context (length u32, bytes),
             entries (count u32, then each: term u64, index u64, type u8,
                      data length u32, data; indexes consecutive),
             snapshot (present u8; if 1: index u64, term u64,
                       voters (count u32, u64 each), learners (count u32, u64 each),
                       data length u32, data)

The body length in the header lets the decoder tell a truncated message
(fewer bytes than declared) and trailing bytes (more) from corruption inside
the body: once the body is known to be complete, any length or count that
reaches past its end is absurd rather than truncated.  The CRC-32 catches
what TCP's 16-bit checksum lets through, before a flipped bit is persisted
and applied on one replica only.  A change to this layout must bump
``CODEC_VERSION``; peers refuse versions they do not speak.
"""

from __future__ import annotations

import struct
import zlib

from gitstratum.raft.types import (
    ConfState,
    Entry,
    EntryType,
    Message,
    MessageType,
    Snapshot,
    SnapshotMetadata,
)

__all__ = ["CODEC_VERSION", "CodecError", "encode_message", "decode_message"]

#: The layout version written in every message's first byte.
CODEC_VERSION = 2

_HEADER = struct.Struct(">BBII")  # version, type, body length, body CRC-32
_FIXED = struct.Struct(">QQQQQQBQ")  # to, from, term, log_term, index, commit, reject, hint
_ENTRY = struct.Struct(">QQBI")  # term, index, type, data length
_SNAPSHOT = struct.Struct(">QQ")  # index, term
_U8 = struct.Struct(">B")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")

_MAX_U32 = (1 << 32) - 1
_MAX_U64 = (1 << 64) - 1


class CodecError(ValueError):
    """Bytes that are not a Raft message this node can read, or a message that cannot be written."""


def _u64(value: int, name: str) -> int:
    if not 0 <= value <= _MAX_U64:
        raise CodecError(
            f"cannot encode raft message: {name} {value} is not an unsigned 64-bit integer"
        )
    return value


def _length(data: bytes, name: str) -> int:
    if len(data) > _MAX_U32:
        raise CodecError(f"cannot encode raft message: {name} is {len(data)} bytes, over 4 GiB")
    return len(data)


def _encode_ids(ids: frozenset[int], name: str) -> bytes:
    ordered = sorted(ids)
    return _U32.pack(len(ordered)) + b"".join(_U64.pack(_u64(i, name)) for i in ordered)


def encode_message(message: Message) -> bytes:
    """The wire form of ``message``; ``CodecError`` if a field cannot be represented."""
    m = message
    parts = [
        _FIXED.pack(
            _u64(m.to, "to"),
            _u64(m.from_, "from"),
            _u64(m.term, "term"),
            _u64(m.log_term, "log_term"),
            _u64(m.index, "index"),
            _u64(m.commit, "commit"),
            1 if m.reject else 0,
            _u64(m.reject_hint, "reject_hint"),
        ),
        _U32.pack(_length(m.context, "context")),
        m.context,
        _U32.pack(len(m.entries)),
    ]
    for e in m.entries:
        parts.append(
            _ENTRY.pack(
                _u64(e.term, "entry term"),
                _u64(e.index, "entry index"),
                int(e.type),
                _length(e.data, "entry data"),
            )
        )
        parts.append(e.data)
    if m.snapshot is None:
        parts.append(_U8.pack(0))
    else:
        meta = m.snapshot.metadata
        parts.append(_U8.pack(1))
        parts.append(
            _SNAPSHOT.pack(_u64(meta.index, "snapshot index"), _u64(meta.term, "snapshot term"))
        )
        parts.append(_encode_ids(meta.conf_state.voters, "voter id"))
        parts.append(_encode_ids(meta.conf_state.learners, "learner id"))
        parts.append(_U32.pack(_length(m.snapshot.data, "snapshot data")))
        parts.append(m.snapshot.data)
    body = b"".join(parts)
    if len(body) > _MAX_U32:
        raise CodecError(f"cannot encode raft message: {len(body)} bytes, over 4 GiB")
    return _HEADER.pack(CODEC_VERSION, int(m.type), len(body), zlib.crc32(body)) + body


class _Reader:
    """Reads fields from a body whose length is already known to be complete."""

    def __init__(self, data: memoryview) -> None:
        self._data = data
        self._pos = 0

    @property
    def remaining(self) -> int:
        return len(self._data) - self._pos

    def unpack(self, fmt: struct.Struct, what: str) -> tuple[int, ...]:
        if fmt.size > self.remaining:
            raise CodecError(
                f"corrupt raft message: {what} needs {fmt.size} bytes, only {self.remaining} left in the body"
            )
        values = fmt.unpack_from(self._data, self._pos)
        self._pos += fmt.size
        return values

    def take(self, length: int, what: str) -> bytes:
        if length > self.remaining:
            raise CodecError(
                f"corrupt raft message: absurd {what} length {length}, only {self.remaining} bytes left in the body"
            )
        value = bytes(self._data[self._pos : self._pos + length])
        self._pos += length
        return value

    def count(self, item_size: int, what: str) -> int:
        (n,) = self.unpack(_U32, f"{what} count")
        if n * item_size > self.remaining:
            raise CodecError(
                f"corrupt raft message: absurd {what} count {n}, only {self.remaining} bytes left in the body"
            )
        return n

    def flag(self, what: str) -> bool:
        (value,) = self.unpack(_U8, what)
        if value > 1:
            raise CodecError(f"corrupt raft message: bad {what} flag {value}")
        return value == 1

    def ids(self, what: str) -> frozenset[int]:
        n = self.count(_U64.size, what)
        return frozenset(self.unpack(_U64, what)[0] for _ in range(n))


def decode_message(data: bytes) -> Message:
    """The message ``data`` encodes; ``CodecError`` for anything that is not exactly one message."""
    view = memoryview(data)
    if len(view) < _HEADER.size:
        raise CodecError(
            f"truncated raft message: {len(view)} bytes, shorter than the {_HEADER.size}-byte header"
        )
    version, type_value, body_length, checksum = _HEADER.unpack_from(view)
    if version != CODEC_VERSION:
        raise CodecError(
            f"unsupported raft codec version {version} (this node speaks version {CODEC_VERSION})"
        )
    try:
        message_type = MessageType(type_value)
    except ValueError:
        raise CodecError(f"unknown raft message type {type_value}") from None
    end = _HEADER.size + body_length
    if len(view) < end:
        raise CodecError(f"truncated raft message: {len(view)} of {end} bytes")
    if len(view) > end:
        raise CodecError(
            f"trailing bytes after raft message: {len(view) - end} past its {end} bytes"
        )
    if zlib.crc32(view[_HEADER.size :]) != checksum:
        raise CodecError("corrupt raft message: its checksum does not match its bytes")
    r = _Reader(view[_HEADER.size :])
    to, from_, term, log_term, index, commit, reject, reject_hint = r.unpack(_FIXED, "fixed fields")
    if reject > 1:
        raise CodecError(f"corrupt raft message: bad reject flag {reject}")
    (context_length,) = r.unpack(_U32, "context length")
    context = r.take(context_length, "context")
    entries: list[Entry] = []
    for _ in range(r.count(_ENTRY.size, "entry")):
        e_term, e_index, e_type, e_length = r.unpack(_ENTRY, "entry")
        try:
            entry_type = EntryType(e_type)
        except ValueError:
            raise CodecError(f"corrupt raft message: bad entry type {e_type}") from None
        if entries and e_index != entries[-1].index + 1:
            # One message carries one run of a log; a gap would tear the receiver's log.
            raise CodecError(
                f"corrupt raft message: entry {e_index} follows entry {entries[-1].index}"
            )
        entries.append(Entry(e_term, e_index, entry_type, r.take(e_length, "entry data")))
    snapshot = None
    if r.flag("snapshot present"):
        s_index, s_term = r.unpack(_SNAPSHOT, "snapshot metadata")
        voters = r.ids("voter")
        learners = r.ids("learner")
        (s_length,) = r.unpack(_U32, "snapshot data length")
        snapshot = Snapshot(
            SnapshotMetadata(s_index, s_term, ConfState(voters, learners)),
            r.take(s_length, "snapshot data"),
        )
    if r.remaining:
        raise CodecError(f"corrupt raft message: {r.remaining} unread bytes at the end of the body")
    return Message(
        type=message_type,
        to=to,
        from_=from_,
        term=term,
        log_term=log_term,
        index=index,
        entries=tuple(entries),
        commit=commit,
        reject=bool(reject),
        reject_hint=reject_hint,
        snapshot=snapshot,
        context=context,
    )
