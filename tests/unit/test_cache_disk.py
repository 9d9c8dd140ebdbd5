"""The disk pack cache: the IPackCache suite, plus single-flight, eviction and recovery on disk.

Everything runs on real files and a real LMDB index in tmp_path.  Time is a
``FakeClock``; builds are ``ScriptedBuild``s released by the test; the
cross-process poll's ``sleep`` is a function that takes the simulated other
process's next step, so no test sleeps.  Tests with real threads join them.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gitstratum.cache import disk
from gitstratum.cache.disk import CHUNK_SIZE, DiskPackCache
from gitstratum.cache.interfaces import BuildFailed, CacheOutcome
from gitstratum.testing.cache_conformance import (
    WAIT,
    PackCacheConformance,
    ScriptedBuild,
    cache_key_of,
    read_all,
)


class FakeClock:
    """A clock that moves only when told to."""

    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def no_build() -> Iterator[bytes]:
    raise AssertionError("this request should not have built the pack")


class TestDiskPackCacheConformance(PackCacheConformance):
    def make_pack_cache(self) -> DiskPackCache:
        return DiskPackCache(str(self.tmp_path / "cache"), max_bytes=1 << 30, poll_interval=0)


@pytest.fixture
def caches(tmp_path: Any) -> Iterator[Callable[..., DiskPackCache]]:
    """A factory of caches on tmp_path/cache (by default), all closed after the test."""
    opened: list[DiskPackCache] = []

    def make(**kwargs: Any) -> DiskPackCache:
        kwargs.setdefault("max_bytes", 1 << 30)
        directory = kwargs.pop("directory", str(tmp_path / "cache"))
        cache = DiskPackCache(directory, **kwargs)
        opened.append(cache)
        return cache

    yield make
    for cache in opened:
        cache.close()


def fill(cache: DiskPackCache, key: str, data: bytes) -> None:
    pack = cache.open(key, ScriptedBuild([data], gated=False))
    assert pack.outcome is CacheOutcome.BUILD
    assert read_all(pack) == data


def paths(directory: str, key: str) -> tuple[str, str, str]:
    base = os.path.join(directory, key[:2], key)
    return base + ".pack", base + ".partial", base + ".lock"


# -- single flight -------------------------------------------------------------


def test_forty_concurrent_opens_build_once(caches: Callable[..., DiskPackCache]) -> None:
    """40 identical requests at once: exactly one build, 39 followers, identical bytes for all."""
    cache = caches()
    key = cache_key_of("storm")
    build = ScriptedBuild([bytes([i]) * 300_000 for i in range(4)])
    opened = threading.Barrier(41, timeout=WAIT)
    outcomes: list[CacheOutcome] = []
    bodies: list[bytes] = []
    errors: list[BaseException] = []
    record = threading.Lock()

    def clone() -> None:
        try:
            pack = cache.open(key, build)
            with record:
                outcomes.append(pack.outcome)
            opened.wait()
            body = read_all(pack)
            with record:
                bodies.append(body)
        except BaseException as e:  # reported by the assertions below
            errors.append(e)
            opened.abort()

    threads = [threading.Thread(target=clone) for _ in range(40)]
    for t in threads:
        t.start()
    opened.wait()
    build.release_all()
    for t in threads:
        t.join(WAIT)
    assert not errors
    assert build.calls == 1
    assert sorted(o.value for o in outcomes) == ["build"] + ["follow"] * 39
    assert len(bodies) == 40 and all(b == build.data for b in bodies)
    stats = cache.stats()
    assert (stats.builds, stats.follows, stats.entries) == (1, 39, 1)


def test_hits_stream_in_megabyte_chunks(caches: Callable[..., DiskPackCache]) -> None:
    """A hit is read a megabyte at a time, never as one whole-pack buffer."""
    cache = caches()
    key = cache_key_of("big")
    data = os.urandom(1 << 16) * 50  # 3.125 MiB
    fill(cache, key, data)
    pack = cache.open(key, no_build)
    with pack:
        chunks = list(pack.chunks())
    assert b"".join(chunks) == data
    assert max(len(c) for c in chunks) == CHUNK_SIZE
    assert len(chunks) == 4


def test_events_report_the_work(caches: Callable[..., DiskPackCache]) -> None:
    """on_event hears each outcome, the build's seconds and the bytes served from the cache."""
    events: list[tuple[str, float]] = []
    clock = FakeClock()
    cache = caches(clock=clock, on_event=lambda name, value: events.append((name, value)))
    key = cache_key_of("events")

    def timed() -> Iterator[bytes]:
        clock.advance(2.5)  # building takes 2.5 s of the cache's clock
        yield b"x" * 10

    builder = cache.open(key, timed)
    assert read_all(builder) == b"x" * 10
    hit = cache.open(key, no_build)
    assert hit.build_seconds == 2.5
    read_all(hit)
    assert events == [("build", 1), ("build_seconds", 2.5), ("hit", 1), ("bytes_served", 10)]


def test_follower_learns_build_seconds_at_the_end(caches: Callable[..., DiskPackCache]) -> None:
    """A follower's build_seconds is filled in once the build it followed is over."""
    clock = FakeClock()
    cache = caches(clock=clock)
    key = cache_key_of("follow seconds")
    release = threading.Event()

    def slow() -> Iterator[bytes]:
        assert release.wait(WAIT)
        clock.advance(4.0)
        yield b"pack"

    builder = cache.open(key, slow)
    follower = cache.open(key, no_build)
    assert follower.build_seconds is None
    release.set()
    assert read_all(follower) == b"pack"
    assert follower.build_seconds == 4.0
    assert builder.build_seconds is None  # building saved this request nothing
    builder.close()


def test_uncached_until_min_occurrences(caches: Callable[..., DiskPackCache]) -> None:
    """With min_occurrences=3 the first two requests stream a build and store nothing."""
    cache = caches(min_occurrences=3)
    key = cache_key_of("rare")
    for _ in range(2):
        build = ScriptedBuild([b"rare pack"], gated=False)
        pack = cache.open(key, build)
        assert pack.outcome is CacheOutcome.UNCACHED
        assert build.calls == 0  # nothing is built until the request reads
        assert read_all(pack) == b"rare pack"
        assert build.calls == 1
        assert not cache.contains(key)
    assert cache.open(key, ScriptedBuild([b"rare pack"], gated=False)).outcome is CacheOutcome.BUILD
    cache.wait_builds(WAIT)
    assert cache.open(key, no_build).outcome is CacheOutcome.HIT
    assert cache.stats().uncached == 2


def test_sightings_survive_a_restart(caches: Callable[..., DiskPackCache]) -> None:
    """Occurrences counted before a restart count after it."""
    first = caches(min_occurrences=2)
    key = cache_key_of("seen")
    assert read_all(first.open(key, ScriptedBuild([b"p"], gated=False))) == b"p"
    first.close()
    second = caches(min_occurrences=2)
    assert second.open(key, ScriptedBuild([b"p"], gated=False)).outcome is CacheOutcome.BUILD


def test_warm_ignores_min_occurrences(caches: Callable[..., DiskPackCache]) -> None:
    """warm builds on first sight whatever min_occurrences says."""
    cache = caches(min_occurrences=5)
    key = cache_key_of("prewarm")
    assert cache.warm(key, ScriptedBuild([b"tip"], gated=False)) is CacheOutcome.BUILD
    assert cache.wait_builds(WAIT)
    assert cache.open(key, no_build).outcome is CacheOutcome.HIT


def test_malformed_keys_are_refused(caches: Callable[..., DiskPackCache]) -> None:
    """Keys are 64 lowercase hex digits, so none can name a path outside the cache."""
    cache = caches()
    for bad in ["../" + "a" * 61, "A" * 64, "a" * 63, ""]:
        with pytest.raises(ValueError):
            cache.open(bad, no_build)
        with pytest.raises(ValueError):
            cache.contains(bad)


# -- eviction ---------------------------------------------------------------


def test_eviction_keeps_the_bound_in_lru_order(caches: Callable[..., DiskPackCache]) -> None:
    """Past max_bytes the least recently used entries go first, and the total stays bounded."""
    clock = FakeClock()
    events: list[str] = []
    cache = caches(max_bytes=250, clock=clock, on_event=lambda name, _: events.append(name))
    a, b, c = (cache_key_of(n) for n in "abc")
    fill(cache, a, b"a" * 100)
    clock.advance(1)
    fill(cache, b, b"b" * 100)
    clock.advance(1)
    read_all(cache.open(a, no_build))  # a is now used more recently than b
    clock.advance(1)
    fill(cache, c, b"c" * 100)
    assert [cache.contains(k) for k in (a, b, c)] == [True, False, True]
    stats = cache.stats()
    assert (stats.bytes, stats.entries, stats.evictions) == (200, 2, 1)
    assert events.count("evict") == 1
    assert not os.path.exists(paths(cache.directory, b)[0])


def test_lru_order_survives_a_restart(caches: Callable[..., DiskPackCache]) -> None:
    """Last-used times batched in memory are written on close, so a restart keeps the LRU order."""
    clock = FakeClock()
    first = caches(max_bytes=250, clock=clock)
    a, b, c = (cache_key_of(n) for n in "abc")
    fill(first, a, b"a" * 100)
    clock.advance(1)
    fill(first, b, b"b" * 100)
    clock.advance(1)
    read_all(first.open(a, no_build))
    first.close()
    clock.advance(1)
    second = caches(max_bytes=250, clock=clock)
    fill(second, c, b"c" * 100)
    assert [second.contains(k) for k in (a, b, c)] == [True, False, True]


def test_an_entry_larger_than_the_bound_is_served_not_kept(
    caches: Callable[..., DiskPackCache],
) -> None:
    """A pack bigger than max_bytes reaches its readers whole and is then dropped."""
    cache = caches(max_bytes=10)
    key = cache_key_of("huge")
    build = ScriptedBuild([b"h" * 50, b"i" * 50])
    builder = cache.open(key, build)
    follower = cache.open(key, build)
    build.release_all()
    assert read_all(follower) == build.data
    assert read_all(builder) == build.data
    assert not cache.contains(key)
    assert cache.stats().bytes == 0


def test_a_reader_keeps_reading_an_evicted_entry(caches: Callable[..., DiskPackCache]) -> None:
    """Evicting an entry someone is reading is fine: the open file still reads whole."""
    clock = FakeClock()
    cache = caches(max_bytes=CHUNK_SIZE * 3, clock=clock)
    old, new = cache_key_of("old"), cache_key_of("new")
    data = os.urandom(CHUNK_SIZE * 2)
    fill(cache, old, data)
    reader = cache.open(old, no_build)
    chunks = reader.chunks()
    first = next(chunks)
    clock.advance(1)
    fill(cache, new, os.urandom(CHUNK_SIZE * 2))  # pushes out `old`, which the hit made older
    assert not cache.contains(old)
    assert first + b"".join(chunks) == data


def test_eviction_skips_an_entry_being_rebuilt(caches: Callable[..., DiskPackCache]) -> None:
    """An entry whose key lock is held (someone is writing it) is not evicted until it is free."""
    clock = FakeClock()
    cache = caches(max_bytes=150, clock=clock)
    a, b = cache_key_of("held"), cache_key_of("other")
    fill(cache, a, b"a" * 100)
    lock = disk._try_lock(paths(cache.directory, a)[2])
    assert lock is not None
    clock.advance(1)
    fill(cache, b, b"b" * 100)
    assert cache.contains(a) and not cache.contains(b)  # b, the newer, went instead
    disk._unlock(paths(cache.directory, a)[2], lock)


def test_max_age_expires_entries(caches: Callable[..., DiskPackCache]) -> None:
    """Entries older than max_age count as absent, are removed, and are built again."""
    clock = FakeClock()
    cache = caches(max_age=60, clock=clock)
    old, other = cache_key_of("aging"), cache_key_of("also aging")
    fill(cache, old, b"v1")
    fill(cache, other, b"w1")
    clock.advance(59)
    assert cache.open(old, no_build).outcome is CacheOutcome.HIT
    clock.advance(2)
    assert not cache.contains(old)
    pack = cache.open(old, ScriptedBuild([b"v2"], gated=False))
    assert pack.outcome is CacheOutcome.BUILD
    assert read_all(pack) == b"v2"
    # The open that rebuilt `old` also cleared the other expired entry.
    assert not os.path.exists(paths(cache.directory, other)[0])
    stats = cache.stats()
    assert (stats.entries, stats.bytes, stats.evictions) == (1, 2, 2)


@settings(max_examples=20, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 5), st.integers(1, 120)),
        min_size=1,
        max_size=14,
    ),
    st.integers(100, 300),
)
def test_eviction_matches_an_lru_model(ops: list[tuple[int, int]], bound: int) -> None:
    """Any sequence of requests leaves exactly the entries an LRU model of the bound keeps."""
    import tempfile

    clock = FakeClock()
    with tempfile.TemporaryDirectory() as directory:
        cache = DiskPackCache(directory, max_bytes=bound, clock=clock)
        try:
            model: dict[str, tuple[float, int]] = {}  # key -> (last used, size)
            for name, size in ops:
                clock.advance(1)
                key = cache_key_of(name)
                pack = cache.open(key, ScriptedBuild([b"z" * size], gated=False))
                body = read_all(pack)
                if key in model:
                    assert pack.outcome is CacheOutcome.HIT
                    model[key] = (clock.now, model[key][1])
                else:
                    assert pack.outcome is CacheOutcome.BUILD
                    model[key] = (clock.now, size)
                    while sum(s for _, s in model.values()) > bound:
                        del model[min(model, key=lambda k: model[k][0])]
                assert len(body) == (model[key][1] if key in model else size)
                stats = cache.stats()
                assert stats.bytes == sum(s for _, s in model.values()) <= bound
                for n in range(6):
                    assert cache.contains(cache_key_of(n)) == (cache_key_of(n) in model)
        finally:
            cache.close()


# -- restarts and crashes -------------------------------------------------------


def test_start_clears_what_a_crash_left(caches: Callable[..., DiskPackCache]) -> None:
    """At start, dead builders' partial files and locks, unindexed files and fileless records go."""
    first = caches()
    kept, lost = cache_key_of("kept"), cache_key_of("file lost")
    fill(first, kept, b"kept")
    fill(first, lost, b"lost")
    directory = first.directory
    first.close()
    os.unlink(paths(directory, lost)[0])
    crashed, orphan = cache_key_of("crashed"), cache_key_of("orphan")
    for key, suffix, data in [
        (crashed, 1, b"half a pa"),
        (crashed, 2, b""),
        (orphan, 0, b"no record"),
    ]:
        path = paths(directory, key)[suffix]
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
    cache = caches()
    for key in (crashed, orphan):
        assert not any(os.path.exists(p) for p in paths(directory, key))
    assert cache.contains(kept) and not cache.contains(lost)
    stats = cache.stats()
    assert (stats.entries, stats.bytes) == (1, 4)
    assert read_all(cache.open(kept, no_build)) == b"kept"


def test_a_dead_builders_partial_is_rebuilt(caches: Callable[..., DiskPackCache]) -> None:
    """A partial file whose lock nobody holds is garbage: the next request removes it and builds."""
    cache = caches()
    key = cache_key_of("dead builder")
    partial, lock = paths(cache.directory, key)[1:]
    os.makedirs(os.path.dirname(partial), exist_ok=True)
    with open(partial, "wb") as f:
        f.write(b"garbage from a builder that died")
    with open(lock, "wb"):
        pass
    pack = cache.open(key, ScriptedBuild([b"real pack"], gated=False))
    assert pack.outcome is CacheOutcome.BUILD
    assert read_all(pack) == b"real pack"
    assert read_all(cache.open(key, no_build)) == b"real pack"


class OtherProcess:
    """A builder in "another process": it holds the key's flock and writes the partial file.

    Each ``step`` is what that process does next; the cache under test runs
    one step whenever its follower would sleep.
    """

    def __init__(self, directory: str, key: str):
        self.pack, self.partial, self.lock_path = paths(directory, key)
        os.makedirs(os.path.dirname(self.partial), exist_ok=True)
        lock = disk._try_lock(self.lock_path)
        assert lock is not None
        self.lock = lock
        self.steps: list[Callable[[], None]] = []
        self.sleeps = 0

    def write(self, data: bytes) -> None:
        with open(self.partial, "ab") as f:
            f.write(data)

    def finish(self) -> None:
        os.rename(self.partial, self.pack)
        disk._unlock(self.lock_path, self.lock)

    def die(self) -> None:
        os.close(self.lock)  # the kernel lets go of a dead process's flock

    def sleep(self, seconds: float) -> None:
        self.sleeps += 1
        assert self.steps, "the follower waited with nothing left to happen"
        self.steps.pop(0)()


def test_follows_a_build_in_another_process(
    tmp_path: Any, caches: Callable[..., DiskPackCache]
) -> None:
    """A build whose lock another process holds is followed from its partial file, not rebuilt."""
    key = cache_key_of("elsewhere")
    other = OtherProcess(str(tmp_path / "cache"), key)
    other.write(b"abc")
    cache = caches(sleep=other.sleep)  # its start-up must leave the live builder's file alone
    assert os.path.exists(other.partial)
    other.steps = [lambda: other.write(b"def"), other.finish]
    pack = cache.open(key, no_build)
    assert pack.outcome is CacheOutcome.FOLLOW
    assert read_all(pack) == b"abcdef"
    assert other.sleeps == 2


def test_a_builder_dying_in_another_process_fails_its_followers(
    tmp_path: Any, caches: Callable[..., DiskPackCache]
) -> None:
    """When the other process dies mid-build its followers get BuildFailed; the next request builds."""
    key = cache_key_of("dies elsewhere")
    other = OtherProcess(str(tmp_path / "cache"), key)
    other.write(b"half")
    cache = caches(sleep=other.sleep)
    other.steps = [other.die]
    pack = cache.open(key, no_build)
    chunks = pack.chunks()
    assert next(chunks) == b"half"
    with pytest.raises(BuildFailed):
        next(chunks)
    pack.close()
    rebuilt = cache.open(key, ScriptedBuild([b"whole"], gated=False))
    assert rebuilt.outcome is CacheOutcome.BUILD
    assert read_all(rebuilt) == b"whole"


def test_waits_while_another_process_holds_the_key(
    tmp_path: Any, caches: Callable[..., DiskPackCache]
) -> None:
    """A held lock with no partial file yet is a moment's wait, then the request goes on."""
    key = cache_key_of("moment")
    other = OtherProcess(str(tmp_path / "cache"), key)
    cache = caches(sleep=other.sleep)
    other.steps = [lambda: disk._unlock(other.lock_path, other.lock)]
    pack = cache.open(key, ScriptedBuild([b"mine"], gated=False))
    assert pack.outcome is CacheOutcome.BUILD
    assert read_all(pack) == b"mine"


def test_flock_excludes_descriptors_in_one_process(tmp_path: Any) -> None:
    """Two opens of one lock file in one process exclude each other (flock is per open file)."""
    path = str(tmp_path / "k.lock")
    first = disk._try_lock(path)
    assert first is not None
    assert disk._try_lock(path) is None
    assert disk._lock_held(path)
    disk._unlock(path, first)
    assert not disk._lock_held(path)
    second = disk._try_lock(path)
    assert second is not None
    disk._unlock(path, second)


def test_two_caches_on_one_directory_build_once(caches: Callable[..., DiskPackCache]) -> None:
    """A second cache object on the same directory (another worker) follows the first's build."""
    building = caches(poll_interval=0)
    build = ScriptedBuild([b"one ", b"build"])

    def step(_: float) -> None:
        build.release()

    other = caches(sleep=step)
    key = cache_key_of("shared")
    builder = building.open(key, build)
    assert other.warm(key, no_build) is CacheOutcome.FOLLOW
    assert other.building(key) and other.builds_in_progress() == 0
    follower = other.open(key, no_build)
    assert follower.outcome is CacheOutcome.FOLLOW
    assert read_all(follower) == b"one build"  # each poll lets the build take a step
    assert read_all(builder) == b"one build"
    assert build.calls == 1
    hit = other.open(key, no_build)
    assert (hit.outcome, read_all(hit)) == (CacheOutcome.HIT, b"one build")


def test_a_real_second_process_shares_the_cache(caches: Callable[..., DiskPackCache]) -> None:
    """Another OS process sees a build under way here as one to follow, and its entry as a hit."""
    cache = caches()
    key = cache_key_of("process")
    build = ScriptedBuild([b"cross-process pack"])
    builder = cache.open(key, build)
    script = (
        "import sys\n"
        "from gitstratum.cache.disk import DiskPackCache\n"
        "def no_build():\n"
        "    raise AssertionError('built')\n"
        "c = DiskPackCache(sys.argv[1], max_bytes=1 << 30)\n"
        "if sys.argv[3] == 'warm':\n"
        "    print(c.warm(sys.argv[2], no_build).name)\n"
        "else:\n"
        "    p = c.open(sys.argv[2], no_build)\n"
        "    print(p.outcome.name, b''.join(p.chunks()).decode())\n"
        "c.close()\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(disk.__file__)))
    env = dict(os.environ, PYTHONPATH=os.path.dirname(root))

    def run(mode: str) -> str:
        argv = [sys.executable, "-c", script, cache.directory, key, mode]
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    assert run("warm") == "FOLLOW"
    build.release_all()
    assert read_all(builder) == build.data
    assert run("open") == "HIT cross-process pack"


# -- closing -------------------------------------------------------------------


def test_close_drops_queued_builds_cleanly(caches: Callable[..., DiskPackCache]) -> None:
    """close() waits for the running build and fails queued ones, leaving no lock or partial."""
    cache = caches(builders=1)
    running, queued = cache_key_of("running"), cache_key_of("queued")
    first = ScriptedBuild([b"first"])
    assert cache.warm(running, first) is CacheOutcome.BUILD
    assert cache.warm(queued, no_build) is CacheOutcome.BUILD
    follower = cache.open(queued, no_build)
    cancelled = threading.Event()
    future = cache._builds[queued].future
    assert future is not None
    future.add_done_callback(lambda _: cancelled.set())
    closer = threading.Thread(target=cache.close)
    closer.start()
    assert cancelled.wait(WAIT) and future.cancelled()
    first.release_all()
    closer.join(WAIT)
    assert not closer.is_alive()
    with pytest.raises(BuildFailed):
        read_all(follower)
    assert not any(os.path.exists(p) for p in paths(cache.directory, queued))
    again = caches()
    assert again.contains(running)
    assert again.open(queued, ScriptedBuild([b"q"], gated=False)).outcome is CacheOutcome.BUILD


def test_closed_cache_refuses_requests(caches: Callable[..., DiskPackCache]) -> None:
    """A closed cache says so rather than touching a closed index."""
    cache = caches()
    cache.close()
    with pytest.raises(RuntimeError):
        cache.open(cache_key_of("late"), no_build)
