"""What the upload-pack service answers with: a planned response, and the same opened to stream.

A ``PlannedResponse`` is the packets before the pack and the ``PackJob`` to
follow; ``UploadPackService.open`` turns it into an ``OpenedResponse``
(chunks to pull, their length when known, and a ``FileResponse`` when the
pack is a complete local cache entry the frontend can ``sendfile``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import attrs

from gitstratum.protocol.pack_key import PackRequest
from gitstratum.protocol.walker import Enumeration, RepoView

__all__ = ["PlannedResponse", "PackJob", "FileResponse", "OpenedResponse", "Closing"]


@attrs.frozen
class PackJob:
    """A pack to send and how to frame it (side-band size, 0 for raw; whether to report progress).

    Either ``plan`` is the enumeration, made while planning (no cache), or
    ``key`` names the cache entry and ``view`` is what a build enumerates
    from, only if the cache does not have it.
    """

    request: PackRequest
    plan: Enumeration | None
    sideband: int
    progress: bool
    key: str | None = None
    view: RepoView | None = None


@attrs.frozen
class PlannedResponse:
    """A planned answer: the packets before the pack, and the pack to follow, if any."""

    head: bytes
    pack: PackJob | None = None


@attrs.frozen
class FileResponse:
    """A response whose bulk is a local file, sent as side-band packets of *band*.

    The bytes are ``prefix``, then the file's first ``size`` bytes in
    packets of at most ``max_payload`` data bytes (every packet full but the
    last; 0 for no framing), then ``suffix``.  ``complete`` is called with
    the whole length once every byte is out.
    """

    prefix: bytes
    fd: int
    size: int
    band: int
    max_payload: int
    suffix: bytes
    complete: Callable[[int], None] | None = None

    @property
    def body_length(self) -> int:
        if not self.max_payload:
            return self.size
        return self.size + 5 * -(-self.size // self.max_payload)

    @property
    def length(self) -> int:
        return len(self.prefix) + self.body_length + len(self.suffix)

    def pieces(self, pos: int) -> Iterator[bytes | tuple[int, int]]:
        """What is left from byte *pos*: bytes to send, or ``(file offset, count)`` ranges."""
        prefix, body_end = len(self.prefix), len(self.prefix) + self.body_length
        if pos < prefix:
            yield self.prefix[pos:]
            pos = prefix
        if pos < body_end:
            rel = pos - prefix
            step = self.max_payload
            if not step:
                yield (rel, self.size - rel)
            else:
                frame, within = divmod(rel, step + 5)
                for start in range(frame * step, self.size, step):
                    count = min(step, self.size - start)
                    if within < 5:
                        yield (b"%04x%c" % (count + 5, self.band))[within:]
                        yield (start, count)
                    else:
                        yield (start + within - 5, count - (within - 5))
                    within = 0
            pos = body_end
        if pos - body_end < len(self.suffix):
            yield self.suffix[pos - body_end :]

    def read(self, pos: int, limit: int) -> bytes:
        """Up to *limit* bytes from *pos*, read into memory (for the buffered path)."""
        out: list[bytes] = []
        left = limit
        for piece in self.pieces(pos):
            if left <= 0:
                break
            if isinstance(piece, bytes):
                out.append(piece[:left])
                left -= len(out[-1])
                continue
            offset, count = piece
            while count and left:
                data = os.pread(self.fd, min(count, left), offset)
                if not data:
                    raise OSError(f"cached pack truncated at {offset} of {self.size} bytes")
                out.append(data)
                offset += len(data)
                count -= len(data)
                left -= len(data)
        return b"".join(out)


@attrs.frozen
class OpenedResponse:
    """A planned response ready to stream, its cache entry (if any) already open.

    ``length`` is the whole response's size when it is known before the
    first byte (a cache hit), so HTTP can send it as Content-Length instead
    of chunking 27 MB of pack.  ``chunks`` must be closed (``close()``) if
    it is not read to the end: it may hold a cache entry open.
    """

    length: int | None
    chunks: Closing
    #: the same bytes as a local file plus framing, when the pack is a
    #: complete cache entry on this machine (for ``sendfile``)
    file: FileResponse | None = None


class Closing(Iterator[bytes]):
    """An iterator with a ``close`` that releases what it holds even if it was never started.

    A generator's ``finally`` does not run when it is closed before its
    first ``next``; an opened response can be abandoned then (the client
    left while headers were being written).
    """

    def __init__(self, it: Iterator[bytes], release: Callable[[], None] | None = None) -> None:
        self._it = it
        self._release = release

    def __next__(self) -> bytes:
        return next(self._it)

    def close(self) -> None:
        release, self._release = self._release, None
        try:
            close = getattr(self._it, "close", None)
            if close is not None:
                close()
        finally:
            if release is not None:
                release()
