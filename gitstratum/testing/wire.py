"""Reading what an upload-pack engine sent, for tests: pkt-lines, side-band streams, the pack."""

from __future__ import annotations

import attrs

__all__ = ["Response", "read_response"]


@attrs.frozen
class Response:
    """A response split up: packets before the pack (without LF; "0000"/"0001" for specials),
    and the bytes of side-bands 1 (pack), 2 (progress) and 3 (fatal)."""

    lines: list[bytes]
    pack: bytes
    progress: bytes
    fatal: bytes


def read_response(data: bytes) -> Response:
    """Split a response into its pkt-lines and side-band streams (or a raw pack after them)."""
    lines: list[bytes] = []
    bands = {1: bytearray(), 2: bytearray(), 3: bytearray()}
    pos = 0
    while pos < len(data):
        if data[pos : pos + 4] == b"PACK":
            bands[1] += data[pos:]
            break
        n = int(data[pos : pos + 4], 16)
        if n < 4:
            lines.append(data[pos : pos + 4])
            pos += 4
            continue
        payload = data[pos + 4 : pos + n]
        pos += n
        if payload[:1] in (b"\x01", b"\x02", b"\x03"):
            bands[payload[0]] += payload[1:]
        else:
            lines.append(payload.rstrip(b"\n"))
    return Response(lines, bytes(bands[1]), bytes(bands[2]), bytes(bands[3]))
