"""The upload-pack service the HTTP, SSH and git:// adapters call: one stateless request at a time.

``advertise`` builds what ``info/refs`` (or a connection's greeting) sends;
``serve`` answers one complete request body as a blocking generator of
response chunks, for the frontend to pull from a worker thread.  Its first
step (``plan``) parses, validates, negotiates and plans; only then does
anything go out (``send``), so a client's mistake becomes a single ``ERR``
packet, never an exception.  ``gitstratum.protocol.upload_session`` holds
v0/v1 in git's stateful form, for connections that stay open.

Planning is kept apart from sending: a ``PackRequest``
(``gitstratum.protocol.pack_key``) holds everything that decides a pack's
bytes, ``plan_pack`` turns it into the object list, and ``pack_chunks``
streams the raw pack, which is framed in side-band packets only on the way
out (the response types are in ``gitstratum.protocol.upload_response``).

With a pack cache (``IPackCache``), planning stops at the ``PackRequest``
and its key, so a hit costs no enumeration at all: ``plan_pack`` and
``pack_chunks`` run inside the build the cache starts (once, however many
identical requests arrive), and every request streams the raw entry,
framed for its own side-band (or none) as it goes out, so one entry serves
HTTP, SSH and git://, v0 and v2.  Admission control (``PackAdmission``) is
asked while planning, before any byte is sent, whether the fetch may go
ahead.  Advertisements and ``ls-refs`` answers are kept in a small LRU by
ref version (``gitstratum.protocol.advertisement_cache``).  Without a
cache, admission or observer, packs are planned and sent as before.
Pre-warm (``gitstratum.protocol.prewarm``) drives this service from outside.
"""

from __future__ import annotations

import os
import struct
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import Protocol

import attrs
from twisted.logger import Logger

from gitstratum.cache.interfaces import BuildFailed, CachedPack, CacheOutcome, IPackCache
from gitstratum.core.limits import Limits
from gitstratum.core.pktline import DELIM_PKT, FLUSH_PKT, error_pkt
from gitstratum.protocol.advertisement_cache import AdvertisementCache, ref_state
from gitstratum.protocol.pack_key import PackRequest, normalise, pack_key
from gitstratum.protocol.packgen import CorruptObject, MissingObject, generate_pack
from gitstratum.protocol.upload_pack import (
    PACKFILE_SECTION,
    SIDEBAND_64K,
    FetchRequest,
    LsRefsRequest,
    UploadPackError,
    capability_advertisement,
    frame_band,
    frame_stream,
    framed_size,
    http_header,
    ls_refs_response,
    negotiate_v0,
    parse_v0_request,
    parse_v2_request,
    process_haves,
    ref_advertisement,
    v0_shallow_section,
    v2_acknowledgments,
    v2_shallow_info,
    v2_wanted_refs,
)
from gitstratum.protocol.upload_response import (
    Closing,
    FileResponse,
    OpenedResponse,
    PackJob,
    PlannedResponse,
)
from gitstratum.protocol.walker import (
    Enumeration,
    Negotiator,
    RepoView,
    check_wants,
    compute_shallow,
    enumerate_objects,
    negotiation_cut,
    ref_peels,
    resolve_want_refs,
)
from gitstratum.storage.interfaces import IMetadataStore, IObjectStore, RefSnapshot, Repository

__all__ = [
    "UploadPackService",
    "Caller",
    "PackAdmission",
    "PackCacheObserver",
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

# signature, version, object count
_PACK_HEADER = struct.Struct(">4sII")
# what ends a pack part-way: git's band-3 abort, then the error goes up
_PACK_FAILURES = (BuildFailed, MissingObject, CorruptObject)


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

        return self.adverts.get(("v0", *ref_state(repo, snapshot), no_done), make)

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
            return OpenedResponse(len(head), Closing(iter((head,) if head else ())))
        if job.plan is not None:
            return OpenedResponse(None, Closing(_prepend(head, self._send_pack(job))))
        length, body, file = self._open_cached(job, head)
        return OpenedResponse(
            None if length is None else len(head) + length,
            Closing(_prepend(head, body), body.close),
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

    def is_building(self, key: str) -> bool:
        """Whether a build of *key* is running through this service now."""
        return self._builds.running(key)

    # -- the pack cache ---------------------------------------------------------

    def pack_job(
        self, view: RepoView, pack: PackRequest, sideband: int, progress: bool, caller: Caller
    ) -> PackJob:
        """Admit the fetch and plan its pack: enumerated now, or only keyed when there is a cache."""
        admission, cache = self.admission, self.cache
        if cache is None:
            if admission is not None:
                admission.admit_pack(caller, builds=True)
            return PackJob(pack, self.plan_pack(view, pack), sideband, progress)
        pack = normalise(view, pack)
        key = pack_key(view, pack)
        if admission is not None:
            # A follower of a build in another process counts as a build here: only
            # the cache could tell, and its interface says nothing of other processes.
            builds = not (cache.contains(key) or self.is_building(key))
            admission.admit_pack(caller, builds=builds)
        return PackJob(pack, None, sideband, progress, key=key, view=view)

    def builder(
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
        return self.adverts.get(("ls-refs", *ref_state(view.repo, view.snapshot), shape), make)

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
        job = self.pack_job(view, pack, SIDEBAND_64K, not request.no_progress, caller)
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
        job = self.pack_job(view, pack, request.sideband, progress, caller)
        return PlannedResponse(b"".join(head), job)

    # -- sending -----------------------------------------------------------

    def _send_pack(self, job: PackJob) -> Iterator[bytes]:
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
        self, job: PackJob, before: bytes
    ) -> tuple[int | None, Closing, FileResponse | None]:
        """Open the pack's cache entry (hit, follower or build) and read its header.

        Returns the framed size of what follows when the entry is complete
        (a hit), the framed bytes, and for a hit on a local file the same
        response (with *before* in front) as a file to ``sendfile``.
        """
        cache, key, view = self.cache, job.key, job.view
        assert cache is not None and key is not None and view is not None
        sideband = job.sideband
        try:
            cached = cache.open(key, self.builder(key, view, job.request))
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
        return length, Closing(body, release), file

    def _cached_body(
        self,
        job: PackJob,
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
