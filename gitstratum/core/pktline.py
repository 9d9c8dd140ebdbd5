"""Sans-I/O pkt-line: encoding helpers and an incremental decoder (after h11).

The decoder takes bytes as they arrive (``receive_data``) and hands back one
event at a time (``next_event``): a ``Packet`` with its payload, one of the
``Special`` packets, or ``NEED_DATA`` when the buffer holds no whole packet.
It never reads from anything itself, so the same code serves SSH channels,
HTTP bodies and tests.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterator
from typing import Final, Literal, NoReturn, TypeAlias

import attrs

from gitstratum.core.limits import MAX_PKT_DATA, MAX_PKT_LEN, MAX_SIDEBAND_DATA

__all__ = [
    "FLUSH_PKT",
    "DELIM_PKT",
    "RESPONSE_END_PKT",
    "PktLineError",
    "Packet",
    "Special",
    "NEED_DATA",
    "NeedData",
    "Event",
    "pkt_line",
    "pkt_lines",
    "sideband",
    "error_pkt",
    "strip_newline",
    "line",
    "PktLineDecoder",
]

FLUSH_PKT: Final = b"0000"
DELIM_PKT: Final = b"0001"
RESPONSE_END_PKT: Final = b"0002"


class PktLineError(ValueError):
    """The peer sent bytes that are not a pkt-line stream; str() is fit for ``ERR ...``."""


@attrs.frozen
class Packet:
    """A data packet; ``data`` is its payload exactly as sent (may be empty)."""

    data: bytes


class Special(enum.Enum):
    """The packets that carry no payload; each member's value is its wire form."""

    FLUSH = FLUSH_PKT
    DELIM = DELIM_PKT
    RESPONSE_END = RESPONSE_END_PKT


class NeedData(enum.Enum):
    """The type of ``NEED_DATA``; an enum so that ``is NEED_DATA`` narrows for mypy."""

    NEED_DATA = "NEED_DATA"


NEED_DATA: Final = NeedData.NEED_DATA

Event: TypeAlias = Packet | Special

_SPECIALS = {0: Special.FLUSH, 1: Special.DELIM, 2: Special.RESPONSE_END}
_HEX4 = re.compile(rb"[0-9a-fA-F]{4}")
# Compacting only once this many bytes are consumed keeps the copy cost
# amortised O(1) per byte while bounding the dead prefix we carry.
_COMPACT_AT = 64 * 1024


def pkt_line(data: bytes | str) -> bytes:
    """Frame *data* as one data packet; ValueError if it exceeds MAX_PKT_DATA."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    if len(data) > MAX_PKT_DATA:
        raise ValueError(f"pkt-line payload of {len(data)} bytes exceeds {MAX_PKT_DATA}")
    return b"%04x" % (len(data) + 4) + data


def pkt_lines(*lines: bytes | str) -> bytes:
    """The concatenation of ``pkt_line`` of each argument."""
    return b"".join(pkt_line(each) for each in lines)


def sideband(band: int, data: bytes, max_payload: int = MAX_SIDEBAND_DATA) -> Iterator[bytes]:
    """Frame *data* on side-band *band*, at most *max_payload* data bytes per packet.

    Use ``max_payload=995`` for the original 1000-byte ``side-band``.
    """
    if not 0 <= band <= 255:
        raise ValueError(f"side-band number {band} is not a byte")
    if not 1 <= max_payload <= MAX_SIDEBAND_DATA:
        raise ValueError(f"side-band payload size {max_payload} out of range")
    prefix = bytes([band])
    view = memoryview(data)
    for start in range(0, len(view), max_payload):
        chunk = view[start : start + max_payload]
        yield b"%04x" % (len(chunk) + 5) + prefix + chunk


def error_pkt(message: str | bytes) -> bytes:
    """An ``ERR <message>`` packet, cut short if the message would not fit in one."""
    if isinstance(message, str):
        message = message.encode("utf-8", "replace")
    message = message.rstrip(b"\n")[: MAX_PKT_DATA - len(b"ERR \n")]
    return pkt_line(b"ERR " + message + b"\n")


def strip_newline(data: bytes) -> bytes:
    """*data* without one trailing LF, the way git chomps text packets."""
    return data[:-1] if data.endswith(b"\n") else data


def line(pkt: Packet) -> bytes:
    """A packet's payload as a text line: without one trailing LF."""
    return strip_newline(pkt.data)


@attrs.define
class PktLineDecoder:
    """Incremental pkt-line parser; feed ``receive_data``, drain ``next_event``.

    Once it has raised ``PktLineError`` the decoder is poisoned and raises the
    same error again: a stream that lost its framing cannot be resynchronised.
    """

    max_empty_packets: int = 256
    _buffer: bytearray = attrs.field(factory=bytearray, init=False)
    _offset: int = attrs.field(default=0, init=False)
    _empty_run: int = attrs.field(default=0, init=False)
    _error: PktLineError | None = attrs.field(default=None, init=False)

    def receive_data(self, data: bytes) -> None:
        """Append bytes from the peer; parse nothing yet."""
        self._buffer += data

    def next_event(self) -> Packet | Special | Literal[NeedData.NEED_DATA]:
        """The next whole packet in the buffer, or NEED_DATA; PktLineError if malformed."""
        if self._error is not None:
            raise self._error
        buf = self._buffer
        start = self._offset
        if len(buf) - start < 4:
            return NEED_DATA
        if not _HEX4.fullmatch(buf, start, start + 4):
            header = bytes(buf[start : start + 4]).decode("ascii", "backslashreplace")
            self._fail(f"protocol error: bad line length character: {header}")
        length = int(buf[start : start + 4], 16)
        special = _SPECIALS.get(length)
        if special is not None:
            self._advance(4)
            self._empty_run = 0
            return special
        if length < 4 or length > MAX_PKT_LEN:
            self._fail(f"protocol error: bad line length {length}")
        if len(buf) - start < length:
            return NEED_DATA
        if length == 4:
            self._empty_run += 1
            if self._empty_run > self.max_empty_packets:
                self._fail(
                    f"protocol error: more than {self.max_empty_packets} consecutive empty packets"
                )
        else:
            self._empty_run = 0
        payload = bytes(buf[start + 4 : start + length])
        self._advance(length)
        return Packet(payload)

    def events(self) -> Iterator[Packet | Special]:
        """Every whole event now buffered, in order; stops when more data is needed."""
        while True:
            event = self.next_event()
            if event is NEED_DATA:
                return
            yield event

    def take_unconsumed(self) -> bytes:
        """The buffered bytes not parsed yet (e.g. the pack after push commands); clears them."""
        rest = bytes(self._buffer[self._offset :])
        self._buffer = bytearray()
        self._offset = 0
        return rest

    def check_complete(self) -> None:
        """Raise PktLineError if the stream ended part-way through a packet."""
        if self._error is not None:
            raise self._error
        if len(self._buffer) > self._offset:
            self._fail("protocol error: unexpected end of stream inside a packet")

    def _advance(self, count: int) -> None:
        self._offset += count
        if self._offset >= _COMPACT_AT and self._offset * 2 >= len(self._buffer):
            del self._buffer[: self._offset]
            self._offset = 0

    def _fail(self, message: str) -> NoReturn:
        self._error = PktLineError(message)
        raise self._error
