"""Every configurable limit in one frozen value, passed down from the tier's options."""

from __future__ import annotations

import attrs

__all__ = ["Limits", "MAX_PKT_LEN", "MAX_PKT_DATA", "MAX_SIDEBAND_DATA"]

MAX_PKT_LEN = 65520  # git's LARGE_PACKET_MAX: header included
MAX_PKT_DATA = MAX_PKT_LEN - 4
MAX_SIDEBAND_DATA = MAX_PKT_DATA - 1  # one byte of band number


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
