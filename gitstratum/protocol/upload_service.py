"""The upload-pack service the HTTP, SSH and git:// adapters call: one stateless request at a time.

``advertise`` builds what ``info/refs`` (or a connection's greeting) sends;
``serve`` answers one complete request body as a blocking generator of
response chunks, for the frontend to pull from a worker thread.  Its first
step (``plan``) parses, validates, negotiates and plans; only then does
anything go out (``send``), so a client's mistake becomes a single ``ERR``
packet, never an exception.  ``UploadSession`` is v0/v1 in git's stateful
form, for connections that stay open (ssh://, git://): one want section,
then have rounds answered one by one, on one ref snapshot.

Planning is kept apart from sending: a ``PackRequest`` holds everything that
decides a pack's bytes (the material a pack cache keys on), ``plan_pack``
turns it into the object list, and ``pack_chunks`` streams the raw pack,
which is framed in side-band packets only on the way out.

With a pack cache (``IPackCache``), planning stops at the ``PackRequest``
and its key, so a hit costs no enumeration at all: ``plan_pack`` and
``pack_chunks`` run inside the build the cache starts (once, however many
identical requests arrive), and every request streams the raw entry,
framed for its own side-band (or none) as it goes out, so one entry serves
HTTP, SSH and git://, v0 and v2.  Admission control (``PackAdmission``) is
asked while planning, before any byte is sent, whether the fetch may go
ahead.  Advertisements and ``ls-refs`` answers are kept in a small LRU by
ref version.  Without a cache, admission or observer, packs are planned and
sent as before.
"""

from __future__ import annotations

import hashlib
import os
import struct
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Collection, Hashable, Iterator, Sequence
from fnmatch import fnmatchcase
from typing import Protocol

import attrs
from twisted.logger import Logger

from gitstratum.cache.interfaces import BuildFailed, CachedPack, CacheOutcome, IPackCache
from gitstratum.core.limits import Limits
from gitstratum.core.objects import ObjectType
from gitstratum.core.oid import ObjectID
from gitstratum.core.pktline import DELIM_PKT, FLUSH_PKT, error_pkt
from gitstratum.protocol.packgen import CorruptObject, MissingObject, generate_pack
from gitstratum.protocol.upload_pack import (
    PACKFILE_SECTION,
    SIDEBAND_64K,
    FetchRequest,
    LsRefsRequest,
    ObjectFilter,
    UploadPackError,
    V0Negotiation,
    capability_advertisement,
    frame_band,
    frame_stream,
    framed_size,
    http_header,
    ls_refs_response,
    negotiate_v0,
    parse_have_round,
    parse_v0_request,
    parse_v2_request,
    process_haves,
    ref_advertisement,
    v0_shallow_section,
    v2_acknowledgments,
    v2_shallow_info,
    v2_wanted_refs,
)
from gitstratum.protocol.walker import (
    Enumeration,
    Negotiator,
    Peeled,
    RepoView,
    ShallowPlan,
    check_wants,
    compute_shallow,
    enumerate_objects,
    negotiation_cut,
    ref_peels,
    resolve_want_refs,
)
from gitstratum.storage.interfaces import IMetadataStore, IObjectStore, RefSnapshot, Repository

__all__ = [
    "PackRequest",
    "PlannedResponse",
    "UploadPackService",
    "UploadSession",
    "Caller",
    "PackAdmission",
    "PackCacheObserver",
    "AdvertisementCache",
    "clone_requests",
    "ABORT_MESSAGE",
    "ENUMERATED_MESSAGE",
    "REUSED_MESSAGE",
]

#: git's band-3 message when pack generation fails part-way
ABORT_MESSAGE = b"aborting due to possible repository corruption on the remote side."
#: band 2 before a pack built for this request
ENUMERATED_MESSAGE = b"Enumerating objects: %d, done.\n"
#: band 2 before a pack streamed from the cache
REUSED_MESSAGE = b"Reusing cached pack: %d objects, done.\n"

_log = Logger()

_PREWARM_POLL = 0.05

# signature, version, object count
_PACK_HEADER = struct.Struct(">4sII")
# what ends a pack part-way: git's band-3 abort, then the error goes up
_PACK_FAILURES = (BuildFailed, MissingObject, CorruptObject)


@attrs.frozen
class PackRequest:
    """Everything that decides the bytes of a pack, normalised (sorted ids).

    Identity, agent and progress options are deliberately absent: two
    clients asking for the same thing get the same pack.
    """

    wants: tuple[ObjectID, ...]
    haves: tuple[ObjectID, ...]
    shallow: ShallowPlan = ShallowPlan()
    filter: ObjectFilter | None = None
    include_tag: bool = False
    ofs_delta: bool = False
    thin_pack: bool = False

    @classmethod
    def of(
        cls,
        request: FetchRequest,
        wants: Sequence[ObjectID],
        haves: Sequence[ObjectID],
        shallow: ShallowPlan,
    ) -> PackRequest:
        return cls(
            wants=tuple(sorted(set(wants))),
            haves=tuple(sorted(set(haves))),
            shallow=shallow,
            filter=request.filter,
            include_tag=request.include_tag,
            ofs_delta=request.ofs_delta,
            thin_pack=request.thin_pack,
        )


@attrs.frozen
class Caller:
    """Who sent a request, for admission control alone: it never reaches a cache key.

    *user* is None for an anonymous caller; *address* is the client's IP
    (None when the transport has none).
    """

    user: str | None = None
    address: str | None = None


class PackAdmission(Protocol):
    """Admission control as planning sees it (``gitstratum.frontend.admission.Admission``)."""

    def admit_pack(self, caller: Caller, *, builds: bool) -> None:
        """Charge one fetch that sends a pack (building it when *builds*); raise UploadPackError to refuse."""
        ...

    def may_build(self) -> bool:
        """Whether a build may start now; background work (pre-warm) skips a build rather than wait."""
        ...


class PackCacheObserver(Protocol):
    """Told how fetches were served from the cache (``gitstratum.frontend.metrics.Metrics``)."""

    def pack_served(self, outcome: CacheOutcome) -> None:
        """One fetch's pack was a hit, a follower, a build, or streamed uncached."""
        ...

    def cpu_saved(self, seconds: float) -> None:
        """A hit or follower was spared a build that cost *seconds*."""
        ...


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


def _ref_state(repo: Repository, snapshot: RefSnapshot) -> tuple[int, int, bytes]:
    return repo.id, snapshot.version, snapshot.head


@attrs.define(eq=False)
class _BuildTracker:
    """The pack builds running through one service, by cache key (None for an unkeyed build)."""

    _running: dict[str | None, int] = attrs.field(factory=dict)
    _lock: threading.Lock = attrs.field(factory=threading.Lock)

    def start(self, key: str | None) -> None:
        with self._lock:
            self._running[key] = self._running.get(key, 0) + 1

    def end(self, key: str | None) -> None:
        with self._lock:
            left = self._running[key] - 1
            if left:
                self._running[key] = left
            else:
                del self._running[key]

    def count(self) -> int:
        with self._lock:
            return sum(self._running.values())

    def running(self, key: str) -> bool:
        with self._lock:
            return key in self._running


class _TrackedBuild(Iterator[bytes]):
    """A pack build, counted as running from its creation until it ends, fails or is dropped.

    The work starts at the first pull, in whichever thread pulls (the
    cache's builder, or the request's own worker).  A build dropped without
    being run or closed is uncounted when it is collected.
    """

    def __init__(
        self, tracker: _BuildTracker, key: str | None, start: Callable[[], Iterator[bytes]]
    ):
        tracker.start(key)
        self._end = weakref.finalize(self, tracker.end, key)
        self._start: Callable[[], Iterator[bytes]] | None = start
        self._chunks: Iterator[bytes] | None = None

    def __next__(self) -> bytes:
        try:
            if self._chunks is None:
                if self._start is None:
                    raise StopIteration
                start, self._start = self._start, None
                self._chunks = start()
            return next(self._chunks)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        chunks, self._chunks, self._start = self._chunks, None, None
        try:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()
        finally:
            self._end()


@attrs.frozen
class _PackJob:
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
    pack: _PackJob | None = None


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
    chunks: _Closing
    #: the same bytes as a local file plus framing, when the pack is a
    #: complete cache entry on this machine (for ``sendfile``)
    file: FileResponse | None = None


class _Closing(Iterator[bytes]):
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


def clone_requests(snapshot: RefSnapshot, tip: ObjectID, *, full: bool) -> list[FetchRequest]:
    """The fetches CI sends for *tip* right after a push, as git 2.39 and clone_storm.py send them.

    Seen with ``GIT_TRACE_PACKET=1`` (protocol v2 and v0 alike):
    ``git clone --depth 1`` wants the branch tip with deepen 1, thin-pack,
    ofs-delta and include-tag; clone_storm.py the same without include-tag.
    A plain ``git clone`` wants every branch and tag (no include-tag: the
    tags are wanted); clone_storm.py's full clone wants the tip alone.  With
    *full* the two full clones are listed too.  Thin-pack, progress and
    side-band never change a clone's pack, so they are left as git sends them.
    """
    # git always asks for a thin pack with ofs-delta, and clone_storm.py too.
    clone = FetchRequest(wants=(tip,), thin_pack=True, ofs_delta=True, no_progress=True)
    requests = [
        attrs.evolve(clone, depth=1, include_tag=True),
        attrs.evolve(clone, depth=1),
    ]
    if full:
        every = tuple(
            oid
            for name, oid in sorted(snapshot.refs.items())
            if name.startswith((b"refs/heads/", b"refs/tags/"))
        )
        requests.append(attrs.evolve(clone, wants=every))
        requests.append(clone)
    return requests


@attrs.define(eq=False)
class UploadPackService:
    """Upload-pack over the storage seams, for any transport (blocking; run it in the pool).

    *cache*, *admission* and *observer* are optional: without them packs
    are enumerated while planning and built for each request.
    """

    metadata: IMetadataStore
    objects: IObjectStore
    limits: Limits
    compression_level: int = 6
    cache: IPackCache | None = None
    admission: PackAdmission | None = None
    observer: PackCacheObserver | None = None
    adverts: AdvertisementCache = attrs.field(factory=AdvertisementCache)
    #: how long a pre-warm waits for its depth-1 builds before starting the full ones
    prewarm_wait: float = 120.0
    sleep: Callable[[float], None] = time.sleep
    _builds: _BuildTracker = attrs.field(factory=_BuildTracker, init=False)

    def advertise(self, repo: Repository, *, version: int, http: bool) -> bytes:
        """The advertisement: v2's capabilities, or v0's refs; with HTTP's service header."""
        head = http_header() if http else b""
        if version == 2:
            return head + capability_advertisement()
        snapshot = self.metadata.get_refs(repo)
        return head + self.v0_advertisement(repo, snapshot, no_done=http)

    def v0_advertisement(self, repo: Repository, snapshot: RefSnapshot, *, no_done: bool) -> bytes:
        """The v0 ref advertisement of *snapshot*, from the LRU when this ref version was seen."""

        def make() -> bytes:
            view = RepoView(self.metadata, repo, snapshot)
            return ref_advertisement(snapshot, ref_peels(view), no_done=no_done)

        return self.adverts.get(("v0", *_ref_state(repo, snapshot), no_done), make)

    def serve(
        self, repo: Repository, request: bytes, *, version: int, caller: Caller | None = None
    ) -> Iterator[bytes]:
        """Answer one complete stateless request (*version* 2 or 0), chunk by chunk.

        A request the client got wrong, or one admission control refuses,
        yields one ``ERR`` packet.  Should the store fail part-way through a
        pack, the client gets git's band-3 abort message and the error
        propagates to the caller.
        """
        try:
            response = self.plan(repo, request, version=version, caller=caller)
        except UploadPackError as e:
            yield error_pkt(str(e))
            return
        yield from self.send(response)

    def plan(
        self, repo: Repository, request: bytes, *, version: int, caller: Caller | None = None
    ) -> PlannedResponse:
        """Parse, validate, negotiate and plan one stateless request; nothing is sent yet.

        Raises UploadPackError, whose text is the ``ERR`` line, for a request
        the client got wrong, and for a fetch admission control refuses
        (then a subclass carrying how long to wait).
        """
        who = caller or Caller()
        if version == 2:
            return self._plan_v2(repo, request, who)
        return self._plan_v0(repo, request, who)

    def send(self, response: PlannedResponse) -> Iterator[bytes]:
        """The bytes of a planned response: its packets, then the pack if one follows."""
        opened = self.open(response)
        try:
            yield from opened.chunks
        finally:
            opened.chunks.close()

    def open(self, response: PlannedResponse) -> OpenedResponse:
        """Get a planned response ready to stream: open its cache entry and read the pack header.

        Blocking (run it in the pool).  Errors opening the pack surface here,
        before any byte is sent.
        """
        head, job = response.head, response.pack
        if job is None:
            return OpenedResponse(len(head), _Closing(iter((head,) if head else ())))
        if job.plan is not None:
            return OpenedResponse(None, _Closing(_prepend(head, self._send_pack(job))))
        length, body, file = self._open_cached(job, head)
        return OpenedResponse(
            None if length is None else len(head) + length,
            _Closing(_prepend(head, body), body.close),
            file,
        )

    def plan_pack(self, view: RepoView, pack: PackRequest) -> Enumeration:
        """The objects of the pack *pack* describes, in pack order."""
        return enumerate_objects(
            view,
            self.objects,
            wants=pack.wants,
            haves=pack.haves,
            shallow=pack.shallow,
            filter=pack.filter,
            include_tag=pack.include_tag,
        )

    def pack_chunks(self, pack: PackRequest, plan: Enumeration) -> Iterator[bytes]:
        """The raw pack, in chunks of about a megabyte, streamed from the object store."""
        return generate_pack(
            self.objects,
            plan.objects,
            ofs_delta=pack.ofs_delta,
            client_has=plan.client_has,
            thin_pack=pack.thin_pack,
            compression_level=self.compression_level,
        )

    def builds_in_progress(self) -> int:
        """Packs being built through this service now (for a cache, for a request or pre-warm)."""
        return self._builds.count()

    # -- the pack cache ---------------------------------------------------------

    def normalise(self, view: RepoView, pack: PackRequest) -> PackRequest:
        """*pack* with include-tag dropped where it provably adds nothing, so more requests share a key.

        include-tag adds an annotated tag whose target the pack carries.
        It cannot when no ref under ``refs/tags/`` is an annotated tag, nor
        when the pack's commits are exactly its wanted commits (each one is
        on the shallow cut, as in a depth-1 clone) and every annotated tag
        names some other commit.  ``git clone --depth 1`` (include-tag) and
        a fetch without it then share one entry for an untagged tip.
        """
        if not pack.include_tag:
            return pack
        tags = _annotated_tags(view)
        if tags:
            types = view.types([*pack.wants, *pack.shallow.extra_wants])
            peeled = view.peel([o for o, t in types.items() if t is ObjectType.TAG])
            commits: set[ObjectID] = set()
            for oid in (*pack.wants, *pack.shallow.extra_wants):
                kind = types.get(oid)
                if kind is ObjectType.TAG and oid in peeled:
                    kind, oid = peeled[oid].type, peeled[oid].target
                if kind is ObjectType.COMMIT:
                    commits.add(oid)
            if not commits <= pack.shallow.cut:
                return pack
            for tag in tags.values():
                if tag.type is not ObjectType.COMMIT or tag.target in commits:
                    return pack
        return attrs.evolve(pack, include_tag=False)

    def pack_key(self, view: RepoView, pack: PackRequest) -> str:
        """The cache key of *pack* (normalised) asked of the view's repository.

        With include-tag, the pack also depends on the annotated tags under
        ``refs/tags/`` (which to add, in ref-name order), so their names
        and ids are folded in: a tag pushed later gives a new key.
        """
        from gitstratum.cache.key import cache_key  # cache.key imports PackRequest from here

        key = cache_key(view.repo, pack)
        if not pack.include_tag:
            return key
        material = hashlib.sha256(b"include-tag %s\n" % key.encode("ascii"))
        for name, oid in sorted(_annotated_tag_refs(view)):
            material.update(b"%d:%s %s\n" % (len(name), name, oid))
        return material.hexdigest()

    def prewarm(
        self, repo: Repository, refs: Collection[bytes], patterns: Sequence[str] = ()
    ) -> dict[str, CacheOutcome]:
        """Warm the clone packs CI will ask for after a push that updated *refs*.

        A ref counts when it is HEAD's target or matches one of the
        fnmatch *patterns* (full ref names: ``refs/heads/release/*``).  For
        each such tip the depth-1 clones are warmed first, then the full
        ones (see ``clone_requests``); keys that coincide after
        normalisation are warmed once.  Builds go through the cache's
        single-flight, so a clone arriving mid-way follows; a build that
        admission control has no room for is skipped, never waited for.
        Returns the outcome per key warmed (blocking, but never waits for
        a build).
        """
        cache = self.cache
        if cache is None:
            return {}
        snapshot = self.metadata.get_refs(repo)
        names = sorted(
            name
            for name in set(refs)
            if name in snapshot.refs
            and (
                name == snapshot.head
                or any(fnmatchcase(name.decode("utf-8", "replace"), p) for p in patterns)
            )
        )
        if not names:
            return {}
        view = RepoView(self.metadata, repo, snapshot)
        depth_one: list[FetchRequest] = []
        full: list[FetchRequest] = []
        for i, name in enumerate(names):
            requests = clone_requests(snapshot, snapshot.refs[name], full=True)
            depth_one += requests[:2]
            # Every tip wants the same whole-repository clone: list it once.
            full += requests[2:] if i == 0 else requests[3:]
        outcomes: dict[str, CacheOutcome] = {}
        for group in (depth_one, full):
            started = []
            for fetch in group:
                shallow = compute_shallow(view, fetch, fetch.wants)
                pack = self.normalise(view, PackRequest.of(fetch, fetch.wants, (), shallow))
                key = self.pack_key(view, pack)
                if key in outcomes:
                    continue
                known = cache.contains(key) or self._builds.running(key)
                if not known and self.admission is not None and not self.admission.may_build():
                    continue
                # Builds run concurrently in the cache's pool: each gets a view of its own.
                build_view = RepoView(self.metadata, repo, snapshot)
                outcomes[key] = cache.warm(key, self._builder(key, build_view, pack))
                started.append(key)
            if group is depth_one:
                # CI's first jobs ask for depth 1: let those builds have the cores
                # before the (far larger) full clones start competing with them.
                self._wait_for(cache, started)
        return outcomes

    def _wait_for(self, cache: IPackCache, keys: Sequence[str]) -> None:
        """Wait (in this worker thread) until none of *keys* is being built, or give up."""
        for _ in range(int(self.prewarm_wait / _PREWARM_POLL)):
            if not any(cache.building(k) for k in keys):
                return
            self.sleep(_PREWARM_POLL)

    def _pack_job(
        self, view: RepoView, pack: PackRequest, sideband: int, progress: bool, caller: Caller
    ) -> _PackJob:
        """Admit the fetch and plan its pack: enumerated now, or only keyed when there is a cache."""
        admission, cache = self.admission, self.cache
        if cache is None:
            if admission is not None:
                admission.admit_pack(caller, builds=True)
            return _PackJob(pack, self.plan_pack(view, pack), sideband, progress)
        pack = self.normalise(view, pack)
        key = self.pack_key(view, pack)
        if admission is not None:
            # A follower of a build in another process counts as a build here: only
            # the cache could tell, and its interface says nothing of other processes.
            builds = not (cache.contains(key) or self._builds.running(key))
            admission.admit_pack(caller, builds=builds)
        return _PackJob(pack, None, sideband, progress, key=key, view=view)

    def _builder(
        self, key: str | None, view: RepoView, pack: PackRequest
    ) -> Callable[[], Iterator[bytes]]:
        """What the cache calls to build the pack (in its builder, or streamed when uncached)."""
        return lambda: self._build(key, view, pack)

    def _build(self, key: str | None, view: RepoView, pack: PackRequest) -> Iterator[bytes]:
        """The raw pack, enumerated and generated from the first pull on, counted while it runs."""
        return _TrackedBuild(
            self._builds, key, lambda: self.pack_chunks(pack, self.plan_pack(view, pack))
        )

    # -- protocol v2 --------------------------------------------------------

    def _plan_v2(self, repo: Repository, body: bytes, caller: Caller) -> PlannedResponse:
        request = parse_v2_request(body, self.limits)
        if request is None:
            return PlannedResponse(b"")
        view = RepoView.open(self.metadata, repo)
        if isinstance(request, LsRefsRequest):
            return PlannedResponse(self._ls_refs(view, request))
        return self._fetch_v2(view, request, caller)

    def _ls_refs(self, view: RepoView, request: LsRefsRequest) -> bytes:
        def make() -> bytes:
            peeled = ref_peels(view) if request.peel else {}
            return ls_refs_response(request, view.snapshot, peeled)

        # The agent and server options change nothing in the answer.
        shape = attrs.evolve(request, agent=None, server_options=())
        return self.adverts.get(("ls-refs", *_ref_state(view.repo, view.snapshot), shape), make)

    def _fetch_v2(self, view: RepoView, request: FetchRequest, caller: Caller) -> PlannedResponse:
        wanted_refs = resolve_want_refs(view.snapshot, request.want_refs)
        check_wants(view, request.wants)
        wants = list(dict.fromkeys([*request.wants, *(oid for _, oid in wanted_refs)]))
        if not wants and not request.wait_for_done:
            return PlannedResponse(b"")  # git answers a fetch of nothing with nothing
        negotiator = Negotiator(view, wants)
        head: list[bytes] = []
        if request.haves:
            negotiator.prefetch(request.haves)
            common = process_haves(request.haves, negotiator)
            if not request.done:
                ready = not request.wait_for_done and negotiator.ok_to_give_up()
                head.append(v2_acknowledgments(common, ready))
                if not ready:
                    return PlannedResponse(b"".join(head) + FLUSH_PKT)
                head.append(DELIM_PKT)
        shallow = compute_shallow(view, request, wants)
        if request.deepens or shallow.client:
            head.append(v2_shallow_info(shallow.shallow, shallow.unshallow))
        if wanted_refs:
            head.append(v2_wanted_refs(wanted_refs))
        head.append(PACKFILE_SECTION)
        pack = PackRequest.of(request, wants, negotiator.have_objs, shallow)
        job = self._pack_job(view, pack, SIDEBAND_64K, not request.no_progress, caller)
        return PlannedResponse(b"".join(head), job)

    # -- protocol v0/v1, stateless -----------------------------------------

    def _plan_v0(self, repo: Repository, body: bytes, caller: Caller) -> PlannedResponse:
        request = parse_v0_request(body, self.limits)
        if not request.wants:
            return PlannedResponse(b"")
        view = RepoView.open(self.metadata, repo)
        check_wants(view, request.wants)
        shallow = compute_shallow(view, request, request.wants)
        head = [v0_shallow_section(shallow.shallow, shallow.unshallow)] if request.deepens else []
        if request.awaiting_haves:
            return PlannedResponse(b"".join(head))
        negotiator = Negotiator(
            view, [*request.wants, *shallow.extra_wants], negotiation_cut(shallow)
        )
        negotiator.prefetch(request.haves)
        acks, send_pack = negotiate_v0(request, negotiator)
        head.append(acks)
        if not send_pack:
            return PlannedResponse(b"".join(head))
        pack = PackRequest.of(request, request.wants, negotiator.have_objs, shallow)
        progress = bool(request.sideband) and not request.no_progress
        job = self._pack_job(view, pack, request.sideband, progress, caller)
        return PlannedResponse(b"".join(head), job)

    # -- sending -----------------------------------------------------------

    def _send_pack(self, job: _PackJob) -> Iterator[bytes]:
        """An uncached pack, enumerated while planning, built and framed as it streams."""
        assert job.plan is not None
        sideband = job.sideband
        if job.progress:
            yield frame_band(2, ENUMERATED_MESSAGE % len(job.plan.objects), sideband)
        plan = job.plan
        chunks = _TrackedBuild(self._builds, None, lambda: self.pack_chunks(job.request, plan))
        try:
            for chunk in chunks:
                yield frame_band(1, chunk, sideband) if sideband else chunk
        except (MissingObject, CorruptObject):
            if sideband:
                yield frame_band(3, ABORT_MESSAGE + b"\n", sideband)
            raise
        finally:
            chunks.close()
        if sideband:
            yield FLUSH_PKT

    def _open_cached(
        self, job: _PackJob, before: bytes
    ) -> tuple[int | None, _Closing, FileResponse | None]:
        """Open the pack's cache entry (hit, follower or build) and read its header.

        Returns the framed size of what follows when the entry is complete
        (a hit), the framed bytes, and for a hit on a local file the same
        response (with *before* in front) as a file to ``sendfile``.
        """
        cache, key, view = self.cache, job.key, job.view
        assert cache is not None and key is not None and view is not None
        sideband = job.sideband
        try:
            cached = cache.open(key, self._builder(key, view, job.request))
        except OSError:
            # A cache that cannot open an entry (a full or broken disk) costs
            # this fetch its sharing, not its pack.
            _log.failure("the pack cache could not open {key}; building uncached", key=key)
            cached = CachedPack(
                CacheOutcome.UNCACHED, None, None, source=self._build(key, view, job.request)
            )
        outcome = cached.outcome
        if self.observer is not None:
            self.observer.pack_served(outcome)
        chunks: Iterator[bytes] = cached.chunks()

        def release() -> None:
            try:
                close = getattr(chunks, "close", None)
                if close is not None:
                    close()
            finally:
                cached.close()

        try:
            try:
                head = _pack_head(chunks)
            except BuildFailed:
                # Nothing of the pack has gone out, so this request can still
                # have it: built here, once, and shared with nobody.
                cached.close()
                outcome = CacheOutcome.UNCACHED
                chunks = self._build(key, view, job.request)
                head = _pack_head(chunks)
        except BaseException:
            release()
            raise
        progress = b""
        if job.progress:
            built = outcome in (CacheOutcome.BUILD, CacheOutcome.UNCACHED)
            message = ENUMERATED_MESSAGE if built else REUSED_MESSAGE
            progress = frame_band(2, message % _PACK_HEADER.unpack_from(head)[2], sideband)
        length = None
        if outcome is CacheOutcome.HIT and cached.size is not None:
            length = len(progress) + (
                framed_size(cached.size, sideband) + len(FLUSH_PKT) if sideband else cached.size
            )
        body = self._cached_body(job, cached, outcome, progress, head, chunks)
        file = None
        if length is not None and cached.fileno is not None and cached.size is not None:
            size, saved, observer = cached.size, cached.build_seconds, self.observer

            def complete(nbytes: int) -> None:
                cached.served(size)
                if saved and observer is not None:
                    observer.cpu_saved(saved)

            file = FileResponse(
                before + progress,
                cached.fileno,
                size,
                1,
                sideband,
                FLUSH_PKT if sideband else b"",
                complete,
            )
            # Start reading the entry into the page cache now: sendfile
            # waits for the disk otherwise.
            os.posix_fadvise(cached.fileno, 0, size, os.POSIX_FADV_WILLNEED)
        return length, _Closing(body, release), file

    def _cached_body(
        self,
        job: _PackJob,
        cached: CachedPack,
        outcome: CacheOutcome,
        progress: bytes,
        head: bytes,
        chunks: Iterator[bytes],
    ) -> Iterator[bytes]:
        sideband = job.sideband
        try:
            if progress:
                yield progress
            if sideband:
                yield from frame_stream(1, _prepend(head, chunks), sideband)
            else:
                yield head
                yield from chunks
        except _PACK_FAILURES:
            if sideband:
                yield frame_band(3, ABORT_MESSAGE + b"\n", sideband)
            raise
        if sideband:
            yield FLUSH_PKT
        saved = cached.build_seconds
        if outcome in (CacheOutcome.HIT, CacheOutcome.FOLLOW) and saved and self.observer:
            self.observer.cpu_saved(saved)


def _prepend(first: bytes, rest: Iterator[bytes]) -> Iterator[bytes]:
    if first:
        yield first
    yield from rest


def _pack_head(chunks: Iterator[bytes]) -> bytes:
    """The first chunks of a pack, at least its 12-byte header; BuildFailed when it is not a pack."""
    head = b""
    while len(head) < _PACK_HEADER.size:
        chunk = next(chunks, None)
        if chunk is None:
            raise BuildFailed("the pack ended inside its header")
        head += chunk
    if head[:4] != b"PACK":
        raise BuildFailed("the cached entry is not a pack")
    return head


def _annotated_tag_refs(view: RepoView) -> list[tuple[bytes, ObjectID]]:
    """The refs under ``refs/tags/`` that name annotated tags (what include-tag can add)."""
    tags = _annotated_tags(view)
    return [
        (name, oid)
        for name, oid in view.snapshot.refs.items()
        if name.startswith(b"refs/tags/") and oid in tags
    ]


def _annotated_tags(view: RepoView) -> dict[ObjectID, Peeled]:
    values = {oid for name, oid in view.snapshot.refs.items() if name.startswith(b"refs/tags/")}
    return view.peel(values)


@attrs.define(eq=False)
class UploadSession:
    """Upload-pack v0/v1 on a connection that stays open (ssh://, git://): git's stateful mode.

    One ref snapshot serves the whole connection, as one ``git upload-pack``
    process does, and the rounds of haves share one negotiation.  Every step
    blocks (run it in the pool); call them in order, one at a time:
    ``advertisement``, ``receive_wants`` with the want section up to its
    flush, then ``receive_haves`` per round until its answer carries the
    pack.  Client mistakes, and a fetch admission control refuses, raise
    UploadPackError.
    """

    service: UploadPackService
    view: RepoView
    caller: Caller = attrs.field(factory=Caller)
    _request: FetchRequest | None = attrs.field(default=None, init=False)
    _shallow: ShallowPlan = attrs.field(factory=ShallowPlan, init=False)
    _negotiator: Negotiator | None = attrs.field(default=None, init=False)
    _negotiation: V0Negotiation = attrs.field(factory=V0Negotiation, init=False)
    _have_total: int = attrs.field(default=0, init=False)

    @classmethod
    def open(
        cls, service: UploadPackService, repo: Repository, caller: Caller | None = None
    ) -> UploadSession:
        """A session on the repository's refs as they are now, for *caller* (admission control)."""
        return cls(service, RepoView.open(service.metadata, repo), caller or Caller())

    def advertisement(self) -> bytes:
        """The v0 ref advertisement (no ``no-done``: git offers it to stateless clients only)."""
        view = self.view
        return self.service.v0_advertisement(view.repo, view.snapshot, no_done=False)

    def receive_wants(self, section: bytes) -> bytes | None:
        """Take the wants (with shallow, deepen and filter lines) up to their flush.

        Returns the shallow section owed to a client that deepens (b"" when
        none is owed), or None when the client wants nothing: the session is over.
        """
        if self._request is not None:
            raise RuntimeError("the wants were already received")
        request = parse_v0_request(section, self.service.limits)
        if not request.wants:
            return None
        view = self.view
        check_wants(view, request.wants)
        shallow = compute_shallow(view, request, request.wants)
        self._request, self._shallow = request, shallow
        self._negotiator = Negotiator(
            view, [*request.wants, *shallow.extra_wants], negotiation_cut(shallow)
        )
        self._negotiation = V0Negotiation(request.multi_ack, request.no_done)
        if request.deepens:
            return v0_shallow_section(shallow.shallow, shallow.unshallow)
        return b""

    def receive_haves(self, section: bytes) -> PlannedResponse:
        """Answer one round of haves (ending in a flush or ``done``); the pack comes once it is over."""
        request, negotiator = self._request, self._negotiator
        if request is None or negotiator is None:
            raise RuntimeError("haves before wants")
        limits = self.service.limits
        haves, done = parse_have_round(section, limits)
        # A stateless client resends every have each round; this bounds a
        # stream the same way across its rounds.
        self._have_total += len(haves)
        if self._have_total > limits.max_haves:
            raise UploadPackError(f"upload-pack: too many haves (the limit is {limits.max_haves})")
        negotiator.prefetch(haves)
        acks, send_pack = self._negotiation.round(haves, done, negotiator)
        if not send_pack:
            return PlannedResponse(acks)
        pack = PackRequest.of(request, request.wants, negotiator.have_objs, self._shallow)
        progress = bool(request.sideband) and not request.no_progress
        job = self.service._pack_job(self.view, pack, request.sideband, progress, self.caller)
        return PlannedResponse(acks, job)
