"""A member's last topology, kept on disk so the node starts with it when the control plane is away.

The file holds the serialised topology as the control plane sent it,
behind a small header (a magic, the epoch and a CRC-32), and is replaced
atomically: written to a temporary file in the same directory, synced, then
renamed over the old one, so a crash leaves the old or the new copy, never
half of one. A torn or foreign file is ignored with a log line, not trusted.
"""

from __future__ import annotations

import os
import struct
import zlib

from twisted.logger import Logger

__all__ = ["TopologyFile"]

_log = Logger()
_MAGIC = b"GSTOPO1\n"
_HEADER = struct.Struct(">QII")  # epoch, length, crc32


class TopologyFile:
    """Load and store one topology blob at *path* (mode 0600)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def load(self) -> tuple[int, bytes] | None:
        """``(epoch, blob)`` of the stored topology, or ``None`` when there is no sound copy."""
        try:
            with open(self.path, "rb") as f:
                head = f.read(len(_MAGIC) + _HEADER.size)
                if head[: len(_MAGIC)] != _MAGIC or len(head) != len(_MAGIC) + _HEADER.size:
                    _log.warn("ignoring {path}: not a topology file", path=self.path)
                    return None
                epoch, length, crc = _HEADER.unpack(head[len(_MAGIC) :])
                blob = f.read(length + 1)
        except FileNotFoundError:
            return None
        if len(blob) != length or zlib.crc32(blob) != crc:
            _log.warn("ignoring {path}: torn or corrupt", path=self.path)
            return None
        return epoch, blob

    def store(self, epoch: int, blob: bytes) -> None:
        """Replace the stored topology with *blob* of *epoch*, atomically and durably."""
        tmp = f"{self.path}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, _MAGIC + _HEADER.pack(epoch, len(blob), zlib.crc32(blob)))
            view = memoryview(blob)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        dir_fd = os.open(os.path.dirname(os.path.abspath(self.path)), os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
