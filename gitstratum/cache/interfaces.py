"""The pack-cache seam: what the upload-pack path calls, whatever stores the entries.

An entry is the raw pack (no side-band framing) for one cache key.  Every
call blocks, so the frontend makes them from its thread pool, and the
``CachedPack`` a request gets is a blocking generator pulled from there too.
The local implementation keeps entries on disk (``gitstratum.cache.disk``);
the cluster will keep them in the object tier, placed by key, behind the
same interface.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator

import attrs
from zope.interface import Interface

__all__ = ["CacheOutcome", "BuildFailed", "CacheStats", "CachedPack", "IPackCache"]


class CacheOutcome(enum.Enum):
    """How a request was (or, for ``warm``, will be) served."""

    #: a complete entry existed and was streamed
    HIT = "hit"
    #: someone else was building the entry; it was streamed as it was written
    FOLLOW = "follow"
    #: nobody was building it; this request started the build and streamed it
    BUILD = "build"
    #: not worth caching yet (min_occurrences); the pack was built and streamed, nothing stored
    UNCACHED = "uncached"


class BuildFailed(Exception):
    """The build this request followed failed, so nothing was cached; the reason is the cause."""


@attrs.frozen
class CacheStats:
    """A snapshot of a pack cache.

    ``entries`` and ``bytes`` describe the stored entries (shared by every
    process using the store); the counters are this cache object's since it
    was opened.  ``hits``, ``follows``, ``builds`` and ``uncached`` count
    ``open`` outcomes (``builds`` also counts builds ``warm`` started).
    """

    entries: int = 0
    bytes: int = 0
    hits: int = 0
    follows: int = 0
    builds: int = 0
    uncached: int = 0
    failures: int = 0
    evictions: int = 0
    builds_in_progress: int = 0


@attrs.define(eq=False)
class CachedPack:
    """One request's view of a pack: how it is served and its bytes, to stream once.

    ``size`` is known for a HIT; ``build_seconds`` is what building the
    entry cost, for a HIT or a FOLLOW (what serving it from the cache saved).
    ``chunks()`` yields the raw pack in chunks of about a megabyte, blocking
    (in a worker thread) until more is written; it raises BuildFailed when
    the build it follows fails, before or after some bytes were yielded.
    ``close()`` (or closing the generator) releases file handles; it never
    cancels a build others may be following.  Implementations build one
    from a byte source and a release callback.

    A complete entry that is a local file may also offer ``fileno`` (open
    until ``close()``), so the frontend can ``sendfile`` it instead of
    reading ``chunks()``; whoever does so reports the bytes it sent through
    ``served``.
    """

    outcome: CacheOutcome
    size: int | None
    build_seconds: float | None
    _source: Iterator[bytes]
    _release: Callable[[], None] | None = None
    fileno: int | None = None
    _on_served: Callable[[int], None] | None = None
    _taken: bool = attrs.field(default=False, init=False)
    _closed: bool = attrs.field(default=False, init=False)

    def chunks(self) -> Iterator[bytes]:
        """The raw pack bytes; the iterator can be taken once."""
        if self._taken:
            raise RuntimeError("the chunks of a cached pack can be read once")
        self._taken = True
        return self._stream()

    def _stream(self) -> Iterator[bytes]:
        try:
            yield from self._source
        finally:
            self.close()

    def served(self, nbytes: int) -> None:
        """Account *nbytes* of the entry sent without ``chunks()`` (from ``fileno``)."""
        if self._on_served is not None:
            self._on_served(nbytes)

    def close(self) -> None:
        """Release what the pack holds (idempotent)."""
        if self._closed:
            return
        self._closed = True
        close = getattr(self._source, "close", None)
        try:
            if close is not None:
                close()
        finally:
            if self._release is not None:
                self._release()

    def __enter__(self) -> CachedPack:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class IPackCache(Interface):
    """Raw packs stored by cache key, built at most once at a time per key (blocking calls)."""

    def open(key: str, build: Callable[[], Iterator[bytes]]) -> CachedPack:
        """The pack for *key*, from the cache or from *build* (called in some thread, at most once).

        HIT: a complete entry exists.  FOLLOW: a build of *key* is under way
        (here or in another process sharing the store); the entry is
        streamed as it is written.  BUILD: nobody was building it, so
        *build* now runs as a job of its own, independent of this request
        (a client that goes away does not cancel it), writing the entry,
        and this request follows it.  UNCACHED: the key has not been seen
        often enough to be worth storing; *build* is simply streamed.
        """

    def warm(key: str, build: Callable[[], Iterator[bytes]]) -> CacheOutcome:
        """Make sure the entry for *key* exists or is being built; return without waiting.

        HIT: it exists.  FOLLOW: a build is already under way.  BUILD: one
        was started.  The occurrence threshold does not apply.
        """

    def contains(key: str) -> bool:
        """True when a complete entry for *key* exists."""

    def stats() -> CacheStats:
        """Entries, bytes and counters, as of now."""

    def building(key: str) -> bool:
        """True when a build of *key* is under way anywhere that shares this store.

        What an admission check asks before a request that is not a hit:
        one that would follow a build costs no build of its own.
        """

    def builds_in_progress() -> int:
        """Builds this cache object is running or has queued (what a build limiter counts)."""
