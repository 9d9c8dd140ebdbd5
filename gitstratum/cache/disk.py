"""The local pack cache: raw packs as files under one directory, indexed in LMDB, built once.

Layout, for a key ``abcd...``::

    DIR/index/          LMDB: size, created, last used, hits, build seconds per
                        entry; the LRU and age orders; sightings; total bytes
    DIR/ab/abcd....pack     a complete entry
    DIR/ab/abcd....partial  an entry being written
    DIR/ab/abcd....lock     held (flock, exclusive) by whoever builds the entry,
                            and for a moment by whoever removes it

A build writes the partial file, fsyncs it and renames it into place, so a
``.pack`` is always whole.  The builder holds the key's lock file for the
whole build; that is the single-flight across processes sharing the
directory (the frontend's worker processes), since a partial file whose
lock can be taken belongs to a builder that died and is garbage.  Followers
in this process wait on the build's Condition; followers in other processes
read the partial file and, at its end, poll (with a short sleep in their
worker thread) until its builder renames it (done), removes it (failed) or
dies (its lock comes free).  A lock file is only ever unlinked by its
holder, and a new holder checks that the path still names the file it
locked, so two builders can never both believe they hold a key.

Builds run in a private thread pool, so a build is independent of the
request that started it: a client that goes away stops reading, not
building.  Last-used times and hit counts are batched in memory and
written at most every ``touch_interval`` seconds (and before any eviction),
because a hit must not wait for an fsync.
"""

from __future__ import annotations

import enum
import fcntl
import os
import re
import struct
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import attrs
import lmdb
from twisted.logger import Logger
from zope.interface import implementer

from gitstratum.cache.interfaces import (
    BuildFailed,
    CachedPack,
    CacheOutcome,
    CacheStats,
    IPackCache,
)
from gitstratum.lmdbutil import open_env

__all__ = ["DiskPackCache", "CorruptEntry", "CHUNK_SIZE"]

#: the size of the chunks entries are read (and followed) in
CHUNK_SIZE = 1 << 20

_KEY_RE = re.compile(r"\A[0-9a-f]{64}\Z")
_ENTRY = struct.Struct(">QddQd")  # size, created, last used, hits, build seconds
_SIGHTING = struct.Struct(">Qd")  # times seen, last seen
_ORDER = struct.Struct(">Q")  # a time in microseconds, then the binary key
_TOTAL_BYTES = b"total_bytes"
_DB_NAMES = (b"entries", b"lru", b"created", b"sightings", b"meta")
#: sightings kept for min_occurrences; past this the oldest half is dropped
_MAX_SIGHTINGS = 1 << 16

_PACK, _PARTIAL, _LOCK = ".pack", ".partial", ".lock"


class CorruptEntry(BuildFailed):
    """A stored entry is shorter than it was when it was written; the cache directory is damaged."""


# -- one LMDB environment per directory and process ---------------------------

# LMDB refuses a second open of one environment in a process, yet two cache
# objects on one directory (tests; a server that reopens its cache) are fine:
# they share the environment, and flock still tells them apart.
_shared_lock = threading.Lock()
_shared: dict[str, _SharedIndex] = {}


@attrs.define(eq=False)
class _SharedIndex:
    env: lmdb.Environment
    dbs: dict[bytes, lmdb._Database]
    users: int = 0


def _open_index(path: str, map_size: int) -> _SharedIndex:
    real = os.path.realpath(path)
    with _shared_lock:
        index = _shared.get(real)
        if index is None:
            env = open_env(real, map_size=map_size, max_dbs=len(_DB_NAMES))
            index = _SharedIndex(env, {name: env.open_db(name) for name in _DB_NAMES})
            _shared[real] = index
        index.users += 1
        return index


def _close_index(path: str) -> None:
    real = os.path.realpath(path)
    with _shared_lock:
        index = _shared[real]
        index.users -= 1
        if index.users == 0:
            del _shared[real]
            index.env.close()


# -- files and locks -----------------------------------------------------------


def _identity(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def _fd_identity(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def _unlink(path: str) -> bool:
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _try_lock(path: str) -> int | None:
    """A descriptor holding the exclusive flock on *path*, or None when someone else holds it.

    flock belongs to the open file description, so this excludes other
    descriptors in this process as much as other processes.
    """
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        # The previous holder may have unlinked the file between our open
        # and our flock; a lock on an unlinked file excludes nobody.
        if _identity(path) == _fd_identity(fd):
            return fd
        os.close(fd)


def _unlock(path: str, fd: int) -> None:
    """Release a lock taken with _try_lock, removing its file (only a holder may)."""
    try:
        _unlink(path)
    finally:
        os.close(fd)


def _lock_held(path: str) -> bool:
    """True when someone holds the exclusive lock on *path* (probed without keeping it)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # also drops the shared lock, if we got it
    return False


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _order_key(when: float, bkey: bytes) -> bytes:
    return _ORDER.pack(max(0, int(when * 1_000_000))) + bkey


def _key_bytes(key: str) -> bytes:
    if not isinstance(key, str) or not _KEY_RE.match(key):
        raise ValueError(f"malformed pack cache key: {key!r:.80}")
    return bytes.fromhex(key)


@attrs.frozen
class _Entry:
    size: int
    created: float
    last_used: float
    hits: int
    build_seconds: float

    @classmethod
    def decode(cls, raw: bytes | memoryview) -> _Entry:
        return cls(*_ENTRY.unpack(raw))

    def encode(self) -> bytes:
        return _ENTRY.pack(self.size, self.created, self.last_used, self.hits, self.build_seconds)


@attrs.define(eq=False)
class _Build:
    """One build under way in this process: its progress, for followers to wait on."""

    key: str
    build: Callable[[], Iterator[bytes]]
    lock_fd: int
    fd: int  # the partial file, open for writing
    path: str  # where the entry's file is: the partial, then the pack once renamed
    cond: threading.Condition = attrs.field(factory=threading.Condition)
    written: int = 0
    done: bool = False
    error: BaseException | None = None
    build_seconds: float | None = None
    future: Future[None] | None = None


class _Remote(enum.Enum):
    """What became of a partial file another process was writing."""

    BUILDING = "building"
    DONE = "done"
    GONE = "gone"


@implementer(IPackCache)
@attrs.define(eq=False)
class DiskPackCache:
    """IPackCache on local disk, shared safely by every process that opens the same directory.

    ``max_bytes`` bounds the stored entries (least recently used go first);
    entries older than ``max_age`` seconds count as absent; a key is stored
    only from its ``min_occurrences``-th request on.  ``builders`` threads
    run builds.  ``on_event(name, value)`` is called, from whichever thread
    did the work, with "hit", "follow", "build" (every build started, by
    ``open`` or ``warm``), "uncached" and "evict" (value 1 each),
    "build_seconds" (a finished build's duration by ``clock``) and
    "bytes_served" (bytes streamed to HIT and FOLLOW readers).  Followers in
    other processes wait ``poll_interval`` seconds with ``sleep`` between
    looks at a partial file's progress.
    """

    directory: str
    max_bytes: int = attrs.field(kw_only=True)
    max_age: float | None = attrs.field(default=None, kw_only=True)
    min_occurrences: int = attrs.field(default=1, kw_only=True)
    clock: Callable[[], float] = attrs.field(default=time.time, kw_only=True)
    builders: int = attrs.field(default=4, kw_only=True)
    on_event: Callable[[str, float], None] | None = attrs.field(default=None, kw_only=True)
    poll_interval: float = attrs.field(default=0.005, kw_only=True)
    sleep: Callable[[float], None] = attrs.field(default=time.sleep, kw_only=True)
    touch_interval: float = attrs.field(default=1.0, kw_only=True)
    index_map_size: int = attrs.field(default=1 << 28, kw_only=True)

    _index: _SharedIndex = attrs.field(init=False)
    _executor: ThreadPoolExecutor = attrs.field(init=False)
    _lock: threading.Lock = attrs.field(init=False, factory=threading.Lock)
    _idle: threading.Condition = attrs.field(init=False)
    _builds: dict[str, _Build] = attrs.field(init=False, factory=dict)
    _running: int = attrs.field(init=False, default=0)  # builds not yet fully over
    _touch_lock: threading.Lock = attrs.field(init=False, factory=threading.Lock)
    _touches: dict[bytes, tuple[float, int]] = attrs.field(init=False, factory=dict)
    _last_flush: float = attrs.field(init=False, default=0.0)
    _evict_lock: threading.Lock = attrs.field(init=False, factory=threading.Lock)
    _counts: dict[str, int] = attrs.field(init=False, factory=dict)
    _counts_lock: threading.Lock = attrs.field(init=False, factory=threading.Lock)
    _closed: bool = attrs.field(init=False, default=False)

    _log = Logger()

    def __attrs_post_init__(self) -> None:
        if self.max_bytes < 0:
            raise ValueError("max_bytes must not be negative")
        if self.min_occurrences < 1:
            raise ValueError("min_occurrences must be at least 1")
        if self.builders < 1:
            raise ValueError("builders must be at least 1")
        os.makedirs(self.directory, exist_ok=True)
        self._idle = threading.Condition(self._lock)
        self._index = _open_index(os.path.join(self.directory, "index"), self.index_map_size)
        self._executor = ThreadPoolExecutor(self.builders, thread_name_prefix="pack-cache-build")
        self._last_flush = self.clock()
        try:
            self._recover()
        except BaseException:
            self.close()
            raise

    # -- IPackCache -----------------------------------------------------------

    def open(self, key: str, build: Callable[[], Iterator[bytes]]) -> CachedPack:
        bkey = _key_bytes(key)
        self._check_open()
        self._housekeep()
        pack = self._open_hit(key)
        if pack is not None:
            return pack
        seen = self._sight(bkey) if self.min_occurrences > 1 else None
        while True:
            outcome: CacheOutcome | None = None
            job: _Build | None = None
            found: tuple[int, _Entry] | None = None
            with self._lock:
                job = self._builds.get(key)
                if job is not None:
                    outcome = CacheOutcome.FOLLOW
                else:
                    lock_fd = self._try_lock_key(key)
                    if lock_fd is not None:
                        # It may have been finished between the first look and the lock.
                        found = self._lookup(key)
                        if found is not None:
                            outcome = CacheOutcome.HIT
                        elif seen is not None and seen < self.min_occurrences:
                            outcome = CacheOutcome.UNCACHED
                        else:
                            job = self._start(key, build, lock_fd)
                            outcome = CacheOutcome.BUILD
                        if job is None:
                            _unlock(self._path(key, _LOCK), lock_fd)
                if job is not None:
                    # Under the lock the job is running, so its file is where job.path says.
                    fd = os.open(job.path, os.O_RDONLY | os.O_CLOEXEC)
            if outcome is CacheOutcome.BUILD:
                self._count("build")
            if job is not None and outcome is not None:
                return self._follow_local(job, fd, outcome)
            if found is not None:
                return self._hit(bkey, *found)
            if outcome is CacheOutcome.UNCACHED:
                return self._uncached(build)
            # Another process (or another cache object here) holds the key.
            pack = self._follow_remote(key)
            if pack is None:
                pack = self._open_hit(key)
            if pack is not None:
                return pack
            # Its holder is between taking the lock and creating the partial
            # file, or between the rename and the unlock: a moment.
            self.sleep(self.poll_interval)

    def warm(self, key: str, build: Callable[[], Iterator[bytes]]) -> CacheOutcome:
        _key_bytes(key)
        self._check_open()
        self._housekeep()
        if self.contains(key):
            return CacheOutcome.HIT
        with self._lock:
            if key in self._builds:
                return CacheOutcome.FOLLOW
            lock_fd = self._try_lock_key(key)
            if lock_fd is None:
                return CacheOutcome.FOLLOW
            if self.contains(key):
                _unlock(self._path(key, _LOCK), lock_fd)
                return CacheOutcome.HIT
            self._start(key, build, lock_fd)
        self._count("build")
        return CacheOutcome.BUILD

    def contains(self, key: str) -> bool:
        entry = self._entry(_key_bytes(key))
        return (
            entry is not None
            and not self._expired(entry)
            and os.path.exists(self._path(key, _PACK))
        )

    def stats(self) -> CacheStats:
        self._flush_touches()
        index = self._index
        with index.env.begin() as txn:
            entries = txn.stat(index.dbs[b"entries"])["entries"]
            total = self._total(txn)
        with self._counts_lock:
            counts = dict(self._counts)
        return CacheStats(
            entries=entries,
            bytes=total,
            hits=counts.get("hit", 0),
            follows=counts.get("follow", 0),
            builds=counts.get("build", 0),
            uncached=counts.get("uncached", 0),
            failures=counts.get("failure", 0),
            evictions=counts.get("evict", 0),
            builds_in_progress=self.builds_in_progress(),
        )

    def building(self, key: str) -> bool:
        _key_bytes(key)
        with self._lock:
            if key in self._builds:
                return True
        return _lock_held(self._path(key, _LOCK))

    def builds_in_progress(self) -> int:
        with self._lock:
            return len(self._builds)

    # -- the rest of the public surface ---------------------------------------

    def wait_builds(self, timeout: float | None = None) -> bool:
        """Block until no build of this cache object is under way; False on timeout."""
        with self._idle:
            return self._idle.wait_for(lambda: self._running == 0, timeout)

    def close(self) -> None:
        """Wait for running builds, drop queued ones, write pending touches and close the index."""
        if self._closed:
            return
        self._closed = True
        self._executor.shutdown(wait=True, cancel_futures=True)
        # What is left never started (its future was cancelled): it still
        # holds its lock and partial file.
        with self._lock:
            left = list(self._builds.values())
        for job in left:
            self._fail(job, BuildFailed("the pack cache was closed before the build started"))
        self._flush_touches()
        _close_index(os.path.join(self.directory, "index"))

    # -- hits -------------------------------------------------------------------

    def _lookup(self, key: str) -> tuple[int, _Entry] | None:
        """A descriptor open on *key*'s complete, unexpired entry, and its record."""
        entry = self._entry(_key_bytes(key))
        if entry is None or self._expired(entry):
            return None
        try:
            fd = os.open(self._path(key, _PACK), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        return fd, entry

    def _open_hit(self, key: str) -> CachedPack | None:
        """Serve *key* from its entry, if it has one; tidy the index if its record is stale."""
        bkey = _key_bytes(key)
        found = self._lookup(key)
        if found is not None:
            return self._hit(bkey, *found)
        entry = self._entry(bkey)
        if entry is not None and self._expired(entry):
            self._remove([(bkey, entry.created)])
        elif entry is not None and not os.path.exists(self._path(key, _PACK)):
            # Removed behind the index's back (evicted by another process
            # between our read and our open, or lost in a crash).
            self._forget(bkey, entry.created)
        return None

    def _hit(self, bkey: bytes, fd: int, entry: _Entry) -> CachedPack:
        size = os.fstat(fd).st_size
        self._touch(bkey)
        self._count("hit")
        return CachedPack(
            CacheOutcome.HIT,
            size,
            entry.build_seconds,
            source=self._read_file(fd, 0, size),
            release=lambda: os.close(fd),
            fileno=fd,
            on_served=lambda n: self._emit("bytes_served", n),
        )

    def _read_file(self, fd: int, pos: int, size: int) -> Iterator[bytes]:
        while pos < size:
            data = os.pread(fd, min(CHUNK_SIZE, size - pos), pos)
            if not data:
                raise CorruptEntry(f"cached pack truncated at {pos} of {size} bytes")
            pos += len(data)
            self._emit("bytes_served", len(data))
            yield data

    # -- builds -----------------------------------------------------------------

    def _start(self, key: str, build: Callable[[], Iterator[bytes]], lock_fd: int) -> _Build:
        """Start building *key*, whose lock we hold (called under self._lock)."""
        partial = self._path(key, _PARTIAL)
        try:
            # We hold the lock, so a partial file here is a dead builder's.
            _unlink(partial)
            fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        except BaseException:
            _unlock(self._path(key, _LOCK), lock_fd)
            raise
        job = _Build(key, build, lock_fd, fd, partial)
        self._builds[key] = job
        self._running += 1
        job.future = self._executor.submit(self._run, job)
        return job

    def _run(self, job: _Build) -> None:
        start = self.clock()
        try:
            source = job.build()
            try:
                for chunk in source:
                    _write_all(job.fd, chunk)
                    with job.cond:
                        job.written += len(chunk)
                        job.cond.notify_all()
            finally:
                close = getattr(source, "close", None)
                if close is not None:
                    close()
            os.fsync(job.fd)
            seconds = max(0.0, self.clock() - start)
            self._store(job, seconds)
        except Exception as e:
            self._log.failure("building pack cache entry {key} failed", key=job.key)
            self._fail(job, e)
            return
        except BaseException as e:
            self._fail(job, e)
            raise
        # Followers hear "done" last, so whoever reads a build to its end
        # then finds the entry indexed, its key free and the bound enforced.
        self._release(job)
        try:
            self._emit("build_seconds", seconds)
            self._evict()
        finally:
            with job.cond:
                job.build_seconds = seconds
                job.done = True
                job.cond.notify_all()
            self._stopped()

    def _store(self, job: _Build, seconds: float) -> None:
        """Put the finished entry in place and in the index."""
        key, bkey = job.key, bytes.fromhex(job.key)
        os.close(job.fd)
        job.fd = -1
        pack = self._path(key, _PACK)
        with self._lock:
            os.rename(job.path, pack)
            job.path = pack
        try:
            _fsync_dir(os.path.dirname(pack))
            now = self.clock()
            entry = _Entry(job.written, now, now, 0, seconds)
            with self._index.env.begin(write=True) as txn:
                self._drop(txn, bkey)  # a stale record of an entry whose file went
                self._put(txn, bkey, entry)
        except BaseException:
            _unlink(pack)
            raise

    def _fail(self, job: _Build, error: BaseException) -> None:
        if job.fd >= 0:
            os.close(job.fd)
            job.fd = -1
        with self._lock:
            _unlink(self._path(job.key, _PARTIAL))
        self._count("failure", emit=False)
        # As with success, followers hear last: the next request builds afresh.
        self._release(job)
        with job.cond:
            job.error = error
            job.cond.notify_all()
        self._stopped()

    def _release(self, job: _Build) -> None:
        """Let go of the key: new requests no longer find this build."""
        with self._lock:
            if self._builds.get(job.key) is job:
                del self._builds[job.key]
        _unlock(self._path(job.key, _LOCK), job.lock_fd)

    def _stopped(self) -> None:
        with self._lock:
            self._running -= 1
            self._idle.notify_all()

    def _uncached(self, build: Callable[[], Iterator[bytes]]) -> CachedPack:
        def stream() -> Iterator[bytes]:
            yield from build()

        self._count("uncached")
        return CachedPack(CacheOutcome.UNCACHED, None, None, source=stream())

    # -- following ----------------------------------------------------------------

    def _follow_local(self, job: _Build, fd: int, outcome: CacheOutcome) -> CachedPack:
        """Follow a build of this cache object through *fd*, open on its file."""
        if outcome is CacheOutcome.FOLLOW:
            self._count("follow")
        served = outcome is CacheOutcome.FOLLOW

        def stream() -> Iterator[bytes]:
            pos = 0
            while True:
                with job.cond:
                    while job.written <= pos and not job.done and job.error is None:
                        job.cond.wait()
                    if job.error is not None:
                        raise BuildFailed(f"building the pack failed: {job.error}") from job.error
                    end, done = job.written, job.done
                while pos < end:
                    data = os.pread(fd, min(CHUNK_SIZE, end - pos), pos)
                    if not data:
                        raise CorruptEntry(f"pack being built truncated at {pos} of {end} bytes")
                    pos += len(data)
                    if served:
                        self._emit("bytes_served", len(data))
                    yield data
                if done:
                    if served:
                        pack.build_seconds = job.build_seconds
                    return

        pack = CachedPack(outcome, None, None, source=stream(), release=lambda: os.close(fd))
        return pack

    def _follow_remote(self, key: str) -> CachedPack | None:
        """Follow the partial file of a build someone else holds the lock for, if there is one."""
        try:
            fd = os.open(self._path(key, _PARTIAL), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        self._count("follow")

        def stream() -> Iterator[bytes]:
            ident = _fd_identity(fd)
            pos = 0
            while True:
                data = os.pread(fd, CHUNK_SIZE, pos)
                if data:
                    pos += len(data)
                    self._emit("bytes_served", len(data))
                    yield data
                    continue
                state = self._remote_state(key, ident)
                if state is _Remote.GONE:
                    raise BuildFailed("the pack build this request followed did not finish")
                if state is _Remote.DONE:
                    # Renamed after its fsync: everything is there now.
                    yield from self._read_file(fd, pos, os.fstat(fd).st_size)
                    entry = self._entry(bytes.fromhex(key))
                    pack.build_seconds = None if entry is None else entry.build_seconds
                    return
                self.sleep(self.poll_interval)

        pack = CachedPack(
            CacheOutcome.FOLLOW, None, None, source=stream(), release=lambda: os.close(fd)
        )
        return pack

    def _remote_state(self, key: str, ident: tuple[int, int]) -> _Remote:
        pack = self._path(key, _PACK)
        if _identity(pack) == ident:
            return _Remote.DONE
        if _identity(self._path(key, _PARTIAL)) == ident and _lock_held(self._path(key, _LOCK)):
            return _Remote.BUILDING
        # The builder may have renamed it and let go between the two looks.
        if _identity(pack) == ident:
            return _Remote.DONE
        return _Remote.GONE

    # -- the index ----------------------------------------------------------------

    def _entry(self, bkey: bytes) -> _Entry | None:
        with self._index.env.begin() as txn:
            raw = txn.get(bkey, db=self._index.dbs[b"entries"])
        return None if raw is None else _Entry.decode(raw)

    def _total(self, txn: lmdb.Transaction) -> int:
        raw = txn.get(_TOTAL_BYTES, db=self._index.dbs[b"meta"])
        return 0 if raw is None else int(_ORDER.unpack(raw)[0])

    def _put(self, txn: lmdb.Transaction, bkey: bytes, entry: _Entry) -> None:
        dbs = self._index.dbs
        txn.put(bkey, entry.encode(), db=dbs[b"entries"])
        txn.put(_order_key(entry.last_used, bkey), b"", db=dbs[b"lru"])
        txn.put(_order_key(entry.created, bkey), b"", db=dbs[b"created"])
        txn.put(_TOTAL_BYTES, _ORDER.pack(self._total(txn) + entry.size), db=dbs[b"meta"])

    def _drop(self, txn: lmdb.Transaction, bkey: bytes) -> _Entry | None:
        dbs = self._index.dbs
        raw = txn.get(bkey, db=dbs[b"entries"])
        if raw is None:
            return None
        entry = _Entry.decode(raw)
        txn.delete(bkey, db=dbs[b"entries"])
        txn.delete(_order_key(entry.last_used, bkey), db=dbs[b"lru"])
        txn.delete(_order_key(entry.created, bkey), db=dbs[b"created"])
        total = max(0, self._total(txn) - entry.size)
        txn.put(_TOTAL_BYTES, _ORDER.pack(total), db=dbs[b"meta"])
        return entry

    def _forget(self, bkey: bytes, created: float) -> None:
        """Drop the record of an entry whose file is gone, unless it was since rebuilt."""
        with self._index.env.begin(write=True) as txn:
            raw = txn.get(bkey, db=self._index.dbs[b"entries"])
            if raw is not None and _Entry.decode(raw).created == created:
                self._drop(txn, bkey)

    def _sight(self, bkey: bytes) -> int:
        """Count one more request for *bkey*; return how many there have been."""
        db = self._index.dbs[b"sightings"]
        with self._index.env.begin(write=True) as txn:
            raw = txn.get(bkey, db=db)
            count = 1 if raw is None else _SIGHTING.unpack(raw)[0] + 1
            txn.put(bkey, _SIGHTING.pack(count, self.clock()), db=db)
            if txn.stat(db)["entries"] > _MAX_SIGHTINGS:
                # Bounded: keys seen once long ago are forgotten first.
                seen = sorted(
                    (_SIGHTING.unpack(bytes(value))[1], bytes(k)) for k, value in txn.cursor(db=db)
                )
                for _, old in seen[: len(seen) // 2]:
                    if old != bkey:
                        txn.delete(old, db=db)
        return int(count)

    def _expired(self, entry: _Entry) -> bool:
        return self.max_age is not None and self.clock() - entry.created > self.max_age

    def _touch(self, bkey: bytes) -> None:
        now = self.clock()
        with self._touch_lock:
            _, hits = self._touches.get(bkey, (now, 0))
            self._touches[bkey] = (now, hits + 1)
            due = now - self._last_flush >= self.touch_interval
        if due:
            self._flush_touches()

    def _flush_touches(self) -> None:
        with self._touch_lock:
            touches, self._touches = self._touches, {}
            self._last_flush = self.clock()
        if not touches:
            return
        dbs = self._index.dbs
        with self._index.env.begin(write=True) as txn:
            for bkey, (used, hits) in touches.items():
                raw = txn.get(bkey, db=dbs[b"entries"])
                if raw is None:
                    continue
                entry = _Entry.decode(raw)
                if used > entry.last_used:
                    txn.delete(_order_key(entry.last_used, bkey), db=dbs[b"lru"])
                    txn.put(_order_key(used, bkey), b"", db=dbs[b"lru"])
                    entry = attrs.evolve(entry, last_used=used)
                entry = attrs.evolve(entry, hits=entry.hits + hits)
                txn.put(bkey, entry.encode(), db=dbs[b"entries"])

    # -- eviction -----------------------------------------------------------------

    def _housekeep(self) -> None:
        """On each request: evict if over the bound or an entry is too old (cheap when not)."""
        dbs = self._index.dbs
        with self._index.env.begin() as txn:
            over = self._total(txn) > self.max_bytes
            expired = False
            if self.max_age is not None:
                cursor = txn.cursor(db=dbs[b"created"])
                if cursor.first():
                    oldest = _ORDER.unpack(bytes(cursor.key())[: _ORDER.size])[0] / 1_000_000
                    expired = self.clock() - oldest > self.max_age
        if over or expired:
            self._evict()

    def _evict(self) -> None:
        """Remove expired entries, then least recently used ones until under max_bytes.

        An entry whose key lock is held is being rebuilt (or removed) by
        someone else; it is passed over and the next one taken instead.
        """
        with self._evict_lock:
            self._flush_touches()
            dbs = self._index.dbs
            victims: list[tuple[bytes, float, int]] = []
            chosen: set[bytes] = set()
            try:
                with self._index.env.begin() as txn:
                    entries = dbs[b"entries"]
                    excess = self._total(txn) - self.max_bytes
                    if self.max_age is not None:
                        for order, _ in txn.cursor(db=dbs[b"created"]):
                            bkey = bytes(order)[_ORDER.size :]
                            raw = txn.get(bkey, db=entries)
                            if raw is None:
                                continue
                            entry = _Entry.decode(raw)
                            if not self._expired(entry):
                                break
                            fd = self._try_lock_key(bkey.hex())
                            if fd is not None:
                                victims.append((bkey, entry.created, fd))
                                chosen.add(bkey)
                                excess -= entry.size
                    if excess > 0:
                        for order, _ in txn.cursor(db=dbs[b"lru"]):
                            bkey = bytes(order)[_ORDER.size :]
                            raw = txn.get(bkey, db=entries)
                            if bkey in chosen or raw is None:
                                continue
                            entry = _Entry.decode(raw)
                            fd = self._try_lock_key(bkey.hex())
                            if fd is None:
                                continue
                            victims.append((bkey, entry.created, fd))
                            chosen.add(bkey)
                            excess -= entry.size
                            if excess <= 0:
                                break
            except BaseException:
                for bkey, _, fd in victims:
                    _unlock(self._path(bkey.hex(), _LOCK), fd)
                raise
            if victims:
                self._drop_locked(victims)

    def _remove(self, victims: list[tuple[bytes, float]]) -> None:
        """Remove these entries (each as recorded at *created*), skipping any being rebuilt."""
        locked: list[tuple[bytes, float, int]] = []
        for bkey, created in victims:
            fd = self._try_lock_key(bkey.hex())
            if fd is not None:
                locked.append((bkey, created, fd))
        self._drop_locked(locked)

    def _drop_locked(self, victims: list[tuple[bytes, float, int]]) -> None:
        """Remove entries whose key locks we hold, then let the locks go."""
        try:
            gone: list[str] = []
            with self._index.env.begin(write=True) as txn:
                for bkey, created, _ in victims:
                    raw = txn.get(bkey, db=self._index.dbs[b"entries"])
                    # Skip one rebuilt since we chose it: it is new, not old.
                    if raw is not None and _Entry.decode(raw).created == created:
                        self._drop(txn, bkey)
                        gone.append(bkey.hex())
            for key in gone:
                # Readers with the file open keep reading it: POSIX keeps the inode.
                _unlink(self._path(key, _PACK))
                self._count("evict")
        finally:
            for bkey, _, fd in victims:
                _unlock(self._path(bkey.hex(), _LOCK), fd)

    # -- start-up ---------------------------------------------------------------

    def _recover(self) -> None:
        """Clear what a crash left: partial files and locks of dead builders, unindexed files."""
        keys: set[str] = set()
        for sub in os.listdir(self.directory):
            path = os.path.join(self.directory, sub)
            if len(sub) != 2 or not os.path.isdir(path):
                continue
            for name in os.listdir(path):
                key, dot, suffix = name.partition(".")
                if dot and "." + suffix in (_PACK, _PARTIAL, _LOCK) and _KEY_RE.match(key):
                    keys.add(key)
        with self._index.env.begin() as txn:
            for bkey, _ in txn.cursor(db=self._index.dbs[b"entries"]):
                keys.add(bytes(bkey).hex())
        for key in sorted(keys):
            partial, pack = self._path(key, _PARTIAL), self._path(key, _PACK)
            indexed = self._entry(bytes.fromhex(key))
            if not os.path.exists(partial) and os.path.exists(pack) == (indexed is not None):
                if not os.path.exists(self._path(key, _LOCK)):
                    continue  # consistent, and nobody building: nothing to take
            fd = self._try_lock_key(key)
            if fd is None:
                continue  # a live builder in another process
            try:
                if _unlink(partial):
                    self._log.info("removed the partial pack cache entry {key}", key=key)
                indexed = self._entry(bytes.fromhex(key))
                if indexed is None:
                    _unlink(pack)
                elif not os.path.exists(pack):
                    self._forget(bytes.fromhex(key), indexed.created)
            finally:
                _unlock(self._path(key, _LOCK), fd)

    # -- small things -------------------------------------------------------------

    def _path(self, key: str, suffix: str) -> str:
        return os.path.join(self.directory, key[:2], key + suffix)

    def _try_lock_key(self, key: str) -> int | None:
        path = self._path(key, _LOCK)
        try:
            return _try_lock(path)
        except FileNotFoundError:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            return _try_lock(path)

    def _count(self, name: str, *, emit: bool = True) -> None:
        with self._counts_lock:
            self._counts[name] = self._counts.get(name, 0) + 1
        if emit:
            self._emit(name, 1)

    def _emit(self, name: str, value: float) -> None:
        if self.on_event is not None:
            self.on_event(name, value)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the pack cache is closed")
