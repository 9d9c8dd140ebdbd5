"""Every configurable limit in one frozen value, and the one parser of numbers a client sends."""

from __future__ import annotations

import re

import attrs

__all__ = [
    "Limits",
    "MAX_PKT_LEN",
    "MAX_PKT_DATA",
    "MAX_SIDEBAND_DATA",
    "INT32_MAX",
    "INT63_MAX",
    "NumberError",
    "parse_number",
]

MAX_PKT_LEN = 65520  # git's LARGE_PACKET_MAX: header included
MAX_PKT_DATA = MAX_PKT_LEN - 4
MAX_SIDEBAND_DATA = MAX_PKT_DATA - 1  # one byte of band number

#: the largest depth git sends (its INFINITE_DEPTH) and the largest it parses into an int
INT32_MAX = (1 << 31) - 1
#: the largest size or timestamp we take from a client (git's are 64-bit)
INT63_MAX = (1 << 63) - 1

# ASCII digits only: no sign, no space, no "_" (all of which int() accepts).
_DECIMAL = re.compile(rb"[0-9]+")
# More significant digits than this cannot be in bounds; and int() never meets Python's
# 4300-digit guard (a ValueError, not a protocol error).
_MAX_DIGITS = 20
_SCALES = {b"": 1, b"k": 1 << 10, b"m": 1 << 20, b"g": 1 << 30}


class NumberError(ValueError):
    """A number from a client is malformed or out of bounds; str() is fit for ``ERR ...``."""


def parse_number(
    text: bytes, *, low: int = 0, high: int = INT63_MAX, suffixes: bool = False
) -> int:
    """The decimal *text* as an int in [*low*, *high*], or NumberError saying why not.

    Every number a client sends goes through here: ASCII digits only (no
    sign, whitespace or underscore; leading zeros are fine), and with *suffixes*
    one of git's ``k``/``m``/``g`` (any case) scaling by 1024 each.  The
    bound is checked after scaling, so ``99999999999g`` is refused too.
    """
    digits, scale = text, 1
    if suffixes and text[-1:].lower() in (b"k", b"m", b"g"):
        digits, scale = text[:-1], _SCALES[text[-1:].lower()]
    shown = text[:40].decode("ascii", "backslashreplace") + ("..." if len(text) > 40 else "")
    if _DECIMAL.fullmatch(digits) is None:
        raise NumberError(f"'{shown}' is not a decimal number")
    significant = digits.lstrip(b"0") or b"0"
    if len(significant) > _MAX_DIGITS:
        raise NumberError(f"'{shown}' is not between {low} and {high}")
    value = int(significant) * scale
    if not low <= value <= high:
        raise NumberError(f"{value} is not between {low} and {high}")
    return value


@attrs.frozen
class Limits:
    """Bounds on what one request may make the server read, inflate or hold."""

    #: an upload-pack request body, after gzip is undone
    max_request_bytes: int = 16 * 1024 * 1024
    #: a receive-pack body (commands plus pack), as spooled
    max_pack_bytes: int = 2 * 1024 * 1024 * 1024
    #: the inflated size of any one object
    max_object_bytes: int = 512 * 1024 * 1024
    #: the inflated size of all objects in one received pack
    max_inflated_bytes: int = 16 * 1024 * 1024 * 1024
    #: the longest delta chain a received pack may create (git's own maximum)
    max_delta_depth: int = 4095
    #: objects in one received pack
    max_pack_objects: int = 10_000_000
    #: consecutive empty data packets ("0004") before the stream is refused
    max_empty_packets: int = 256
    #: commands in one push
    max_push_commands: int = 10_000
    #: bytes in one pushed ref name (git has no limit; the metadata store's
    #: keys allow at most 503)
    max_ref_bytes: int = 500
    #: "have" lines in one negotiation request
    max_haves: int = 100_000
    #: "want" lines in one request
    max_wants: int = 100_000
    #: seconds an HTTP connection may sit idle before it is dropped
    idle_timeout: float = 120.0
    #: seconds an SSH or git:// session may go without a byte either way (a client that
    #: stops mid-pack or mid-negotiation) before it gets ``ERR`` and is closed; 0 is never
    stream_idle_timeout: float = 60.0
    #: whether a push may delete the branch HEAD points to (git's receive.denyDeleteCurrent
    #: refuses it: every later clone would check out nothing)
    allow_delete_current: bool = False
