"""The IPackCache conformance suite, run against every implementation, and its build helpers.

A concrete test class inherits the mixin and provides the factory (and,
for a cache that persists somewhere other than a directory, the reopen
hook)::

    class TestDiskPackCache(PackCacheConformance):
        def make_pack_cache(self):
            return DiskPackCache(str(self.tmp_path / "cache"), max_bytes=1 << 30)

Each test gets a fresh cache in ``self.pack_cache``; ``self.tmp_path`` is
pytest's per-test directory.  Caches are closed after the test.  Builds are
``ScriptedBuild``s, whose chunks the test releases one at a time, so a
test decides exactly what has been written when it looks; nothing sleeps.
"""

from __future__ import annotations

import hashlib
import queue
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
from zope.interface.verify import verifyObject

from gitstratum.cache.interfaces import BuildFailed, CachedPack, CacheOutcome, IPackCache

__all__ = ["PackCacheConformance", "ScriptedBuild", "BuildError", "cache_key_of", "read_all"]

#: how long a test waits for a build thread before calling it a hang (never slept)
WAIT = 10.0


def cache_key_of(seed: object) -> str:
    """A well-formed cache key derived from *seed*."""
    return hashlib.sha256(repr(seed).encode()).hexdigest()


def read_all(pack: CachedPack) -> bytes:
    """Every byte of *pack*, closing it."""
    with pack:
        return b"".join(pack.chunks())


class BuildError(Exception):
    """The failure a ScriptedBuild injects."""


class ScriptedBuild:
    """A build callable whose chunks come out only as the test releases them.

    ``fail_after`` makes the build raise BuildError once that many chunks
    are out.  ``calls`` counts how often the cache called it; ``finished``
    is set when its iterator ends, however it ends.
    """

    def __init__(
        self, chunks: Sequence[bytes], *, fail_after: int | None = None, gated: bool = True
    ):
        self.chunks = list(chunks)
        self.fail_after = fail_after
        self.calls = 0
        self.finished = threading.Event()
        self._releases: queue.Queue[int] = queue.Queue()
        self._lock = threading.Lock()
        if not gated:
            self.release_all()

    @property
    def data(self) -> bytes:
        """The whole pack the build makes (when it does not fail)."""
        return b"".join(self.chunks)

    def release(self, count: int = 1) -> None:
        """Let *count* more chunks (or the failure) out."""
        for _ in range(count):
            self._releases.put(1)

    def release_all(self) -> None:
        """Let everything out, including the end or the failure."""
        self.release(len(self.chunks) + 1)

    def __call__(self) -> Iterator[bytes]:
        with self._lock:
            self.calls += 1
        return self._run()

    def _run(self) -> Iterator[bytes]:
        try:
            for i, chunk in enumerate(self.chunks):
                if self.fail_after is not None and i == self.fail_after:
                    break
                self._releases.get(timeout=WAIT)
                yield chunk
            if self.fail_after is not None:
                self._releases.get(timeout=WAIT)
                raise BuildError("injected build failure")
        finally:
            self.finished.set()


def _unexpected_build() -> Iterator[bytes]:
    raise AssertionError("the cache built a pack it should have served from the cache")


class PackCacheConformance:
    """The whole IPackCache contract.  Provide ``make_pack_cache(self)``."""

    tmp_path: Any
    pack_cache: Any
    _open_caches: list[Any]

    def make_pack_cache(self) -> Any:
        raise NotImplementedError("the concrete test class provides make_pack_cache")

    def reopen_pack_cache(self, cache: Any) -> Any:
        """Close *cache* and open the same store again; override for remote caches."""
        self._open_caches.remove(cache)
        cache.close()
        return self._track(self.make_pack_cache())

    def _track(self, cache: Any) -> Any:
        self._open_caches.append(cache)
        return cache

    @pytest.fixture(autouse=True)
    def _pack_cache_fixture(self, tmp_path: Any) -> Iterator[None]:
        self.tmp_path = tmp_path
        self._open_caches = []
        self.pack_cache = self._track(self.make_pack_cache())
        yield
        while self._open_caches:
            self._open_caches.pop().close()

    def _fill(self, key: str, data: bytes = b"PACK" + bytes(range(256)) * 40) -> bytes:
        """Store *data* under *key* by a build, read to its end."""
        build = ScriptedBuild([data[: len(data) // 2], data[len(data) // 2 :]], gated=False)
        pack = self.pack_cache.open(key, build)
        assert pack.outcome is CacheOutcome.BUILD
        assert read_all(pack) == data
        return data

    # -- the interface ------------------------------------------------------

    def test_provides_interface(self) -> None:
        """The cache declares and fully implements IPackCache."""
        assert verifyObject(IPackCache, self.pack_cache)

    def test_empty_cache(self) -> None:
        """A new cache holds nothing and has counted nothing."""
        stats = self.pack_cache.stats()
        assert (stats.entries, stats.bytes, stats.hits, stats.builds) == (0, 0, 0, 0)
        assert not self.pack_cache.contains(cache_key_of("nothing"))
        assert not self.pack_cache.building(cache_key_of("nothing"))
        assert self.pack_cache.builds_in_progress() == 0

    def test_miss_builds_then_hits(self) -> None:
        """The first open builds and streams the pack; the next is a hit with the same bytes."""
        key = cache_key_of("clone")
        data = self._fill(key)
        assert self.pack_cache.contains(key)
        pack = self.pack_cache.open(key, _unexpected_build)
        assert pack.outcome is CacheOutcome.HIT
        assert pack.size == len(data)
        assert pack.build_seconds is not None and pack.build_seconds >= 0
        assert read_all(pack) == data

    def test_keys_are_independent(self) -> None:
        """An entry serves its own key only."""
        one, two = cache_key_of(1), cache_key_of(2)
        self._fill(one, b"one")
        assert not self.pack_cache.contains(two)
        assert self._fill(two, b"two") == b"two"
        assert read_all(self.pack_cache.open(one, _unexpected_build)) == b"one"

    def test_empty_pack_is_an_entry(self) -> None:
        """A build that yields nothing stores an empty entry, served as a zero-byte hit."""
        key = cache_key_of("empty")
        assert read_all(self.pack_cache.open(key, ScriptedBuild([], gated=False))) == b""
        pack = self.pack_cache.open(key, _unexpected_build)
        assert (pack.outcome, pack.size, read_all(pack)) == (CacheOutcome.HIT, 0, b"")

    def test_concurrent_open_follows_the_build(self) -> None:
        """An open while the key is building follows it: one build, the same bytes for both."""
        key = cache_key_of("follow")
        build = ScriptedBuild([b"a" * 1000, b"b" * 1000, b"c" * 10])
        builder = self.pack_cache.open(key, build)
        follower = self.pack_cache.open(key, build)
        assert (builder.outcome, follower.outcome) == (CacheOutcome.BUILD, CacheOutcome.FOLLOW)
        assert self.pack_cache.builds_in_progress() == 1
        assert self.pack_cache.building(key)
        assert not self.pack_cache.building(cache_key_of("something else"))
        build.release_all()
        assert read_all(follower) == build.data
        assert read_all(builder) == build.data
        assert build.calls == 1
        assert self.pack_cache.builds_in_progress() == 0
        assert not self.pack_cache.building(key)

    def test_follower_streams_while_the_build_runs(self) -> None:
        """A follower gets the bytes written so far before the build is over."""
        key = cache_key_of("stream")
        build = ScriptedBuild([b"first", b"second"])
        builder = self.pack_cache.open(key, build)
        follower = self.pack_cache.open(key, build)
        chunks = follower.chunks()
        build.release()
        assert next(chunks) == b"first"
        assert not self.pack_cache.contains(key)
        assert not build.finished.is_set()
        build.release_all()
        assert b"".join(chunks) == b"second"
        builder.close()
        follower.close()

    def test_follower_closing_early_leaves_the_others(self) -> None:
        """A follower that goes away mid-stream neither stops the build nor harms other readers."""
        key = cache_key_of("leaver")
        build = ScriptedBuild([b"x" * 100, b"y" * 100, b"z" * 100])
        builder = self.pack_cache.open(key, build)
        leaver = self.pack_cache.open(key, build)
        stayer = self.pack_cache.open(key, build)
        build.release()
        assert next(leaver.chunks()) == b"x" * 100
        leaver.close()
        build.release_all()
        assert read_all(stayer) == build.data
        assert read_all(builder) == build.data
        assert self.pack_cache.contains(key)

    def test_builders_reader_closing_does_not_cancel(self) -> None:
        """The request that started a build going away does not cancel it for anyone."""
        key = cache_key_of("builder leaves")
        build = ScriptedBuild([b"p" * 500, b"q" * 500])
        builder = self.pack_cache.open(key, build)
        builder.close()
        follower = self.pack_cache.open(key, build)
        assert follower.outcome is CacheOutcome.FOLLOW
        build.release_all()
        assert read_all(follower) == build.data
        assert self.pack_cache.contains(key)
        assert build.calls == 1

    def test_failed_build_stores_nothing(self) -> None:
        """A build that fails part-way fails every reader with BuildFailed and leaves no entry."""
        key = cache_key_of("fails")
        build = ScriptedBuild([b"good", b"never"], fail_after=1)
        builder = self.pack_cache.open(key, build)
        follower = self.pack_cache.open(key, build)
        chunks = follower.chunks()
        build.release()
        assert next(chunks) == b"good"
        build.release_all()
        with pytest.raises(BuildFailed):
            list(chunks)
        with pytest.raises(BuildFailed):
            read_all(builder)
        assert not self.pack_cache.contains(key)
        assert self.pack_cache.stats().entries == 0

    def test_failure_before_any_byte(self) -> None:
        """A build that fails at once fails its readers before they get a byte."""
        key = cache_key_of("fails at once")
        build = ScriptedBuild([b"never"], fail_after=0, gated=False)
        with pytest.raises(BuildFailed):
            read_all(self.pack_cache.open(key, build))
        assert not self.pack_cache.contains(key)

    def test_next_request_after_a_failure_builds_again(self) -> None:
        """After a failed build the key is free: the next request builds it afresh."""
        key = cache_key_of("retry")
        with pytest.raises(BuildFailed):
            read_all(self.pack_cache.open(key, ScriptedBuild([b"x"], fail_after=0, gated=False)))
        retry = ScriptedBuild([b"fixed"], gated=False)
        pack = self.pack_cache.open(key, retry)
        assert pack.outcome is CacheOutcome.BUILD
        assert read_all(pack) == b"fixed"
        assert retry.calls == 1
        assert self.pack_cache.contains(key)

    def test_warm_builds_without_waiting(self) -> None:
        """warm starts a build and returns; opens follow it, and later ones hit."""
        key = cache_key_of("warm")
        build = ScriptedBuild([b"warm", b"pack"])
        assert self.pack_cache.warm(key, build) is CacheOutcome.BUILD
        assert self.pack_cache.warm(key, _unexpected_build) is CacheOutcome.FOLLOW
        follower = self.pack_cache.open(key, _unexpected_build)
        assert follower.outcome is CacheOutcome.FOLLOW
        build.release_all()
        assert read_all(follower) == b"warmpack"
        assert self.pack_cache.warm(key, _unexpected_build) is CacheOutcome.HIT
        assert read_all(self.pack_cache.open(key, _unexpected_build)) == b"warmpack"
        assert build.calls == 1

    def test_restart_keeps_entries(self) -> None:
        """Entries survive closing the cache and opening the same store again."""
        key = cache_key_of("durable")
        data = self._fill(key)
        cache = self.reopen_pack_cache(self.pack_cache)
        assert cache.contains(key)
        pack = cache.open(key, _unexpected_build)
        assert pack.outcome is CacheOutcome.HIT
        assert read_all(pack) == data

    def test_chunks_can_be_taken_once(self) -> None:
        """A cached pack's bytes are a one-shot stream."""
        key = cache_key_of("once")
        self._fill(key)
        pack = self.pack_cache.open(key, _unexpected_build)
        with pack:
            pack.chunks()
            with pytest.raises(RuntimeError):
                pack.chunks()

    def test_stats_count_outcomes(self) -> None:
        """stats() counts hits, follows and builds, and reports the stored entries and bytes."""
        key = cache_key_of("stats")
        build = ScriptedBuild([b"s" * 300])
        builder = self.pack_cache.open(key, build)
        follower = self.pack_cache.open(key, build)
        build.release_all()
        read_all(follower)
        read_all(builder)
        read_all(self.pack_cache.open(key, _unexpected_build))
        read_all(self.pack_cache.open(key, _unexpected_build))
        stats = self.pack_cache.stats()
        assert (stats.builds, stats.follows, stats.hits) == (1, 1, 2)
        assert (stats.entries, stats.bytes, stats.builds_in_progress) == (1, 300, 0)
