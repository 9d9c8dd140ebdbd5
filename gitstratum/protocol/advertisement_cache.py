"""The LRU of ref advertisements and ``ls-refs`` answers the upload-pack service keeps by ref version."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable

import attrs

from gitstratum.storage.interfaces import RefSnapshot, Repository

__all__ = ["AdvertisementCache", "ref_state"]


@attrs.define(eq=False)
class AdvertisementCache:
    """A bounded LRU of advertisements and ``ls-refs`` answers, shared by worker threads.

    Keys carry the repository id and its ref version, which every ref update
    and HEAD change bumps (and ids are never reused), so an entry can only
    be outgrown, never stale.  Bounded in entries and in bytes; an answer
    larger than the byte bound is made each time and never stored.
    """

    max_entries: int = 1024
    max_bytes: int = 64 << 20
    hits: int = 0
    misses: int = 0
    _entries: OrderedDict[Hashable, bytes] = attrs.field(factory=OrderedDict, init=False)
    _bytes: int = attrs.field(default=0, init=False)
    _lock: threading.Lock = attrs.field(factory=threading.Lock, init=False)

    def get(self, key: Hashable, make: Callable[[], bytes]) -> bytes:
        """The answer stored under *key*, or ``make()`` (blocking; not under the lock), remembered."""
        with self._lock:
            found = self._entries.get(key)
            if found is not None:
                self._entries.move_to_end(key)
                self.hits += 1
                return found
            self.misses += 1
        value = make()
        if self.max_entries <= 0 or len(value) > self.max_bytes:
            return value
        with self._lock:
            replaced = self._entries.pop(key, None)
            if replaced is not None:
                self._bytes -= len(replaced)
            self._entries[key] = value
            self._bytes += len(value)
            while len(self._entries) > self.max_entries or self._bytes > self.max_bytes:
                _, dropped = self._entries.popitem(last=False)
                self._bytes -= len(dropped)
        return value

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return self._bytes


def ref_state(repo: Repository, snapshot: RefSnapshot) -> tuple[int, int, bytes]:
    """What of a repository's refs an advertisement key carries: its id, ref version and HEAD."""
    return repo.id, snapshot.version, snapshot.head
