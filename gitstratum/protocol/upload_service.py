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
which is framed in side-band packets only on the way out, so a cache can
sit between planning and sending and store unframed bytes.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import attrs

from gitstratum.core.limits import Limits
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
    RepoView,
    ShallowPlan,
    check_wants,
    compute_shallow,
    enumerate_objects,
    ref_peels,
    resolve_want_refs,
)
from gitstratum.storage.interfaces import IMetadataStore, IObjectStore, Repository

__all__ = ["PackRequest", "PlannedResponse", "UploadPackService", "UploadSession", "ABORT_MESSAGE"]

#: git's band-3 message when pack generation fails part-way
ABORT_MESSAGE = b"aborting due to possible repository corruption on the remote side."


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
class _PackJob:
    """A planned pack and how to frame it (side-band size, 0 for raw; whether to report progress)."""

    request: PackRequest
    plan: Enumeration
    sideband: int
    progress: bool


@attrs.frozen
class PlannedResponse:
    """A planned answer: the packets before the pack, and the pack to follow, if any."""

    head: bytes
    pack: _PackJob | None = None


@attrs.define(eq=False)
class UploadPackService:
    """Upload-pack over the storage seams, for any transport (blocking; run it in the pool)."""

    metadata: IMetadataStore
    objects: IObjectStore
    limits: Limits
    compression_level: int = 6

    def advertise(self, repo: Repository, *, version: int, http: bool) -> bytes:
        """The advertisement: v2's capabilities, or v0's refs; with HTTP's service header."""
        head = http_header() if http else b""
        if version == 2:
            return head + capability_advertisement()
        view = RepoView.open(self.metadata, repo)
        return head + ref_advertisement(view.snapshot, ref_peels(view), no_done=http)

    def serve(self, repo: Repository, request: bytes, *, version: int) -> Iterator[bytes]:
        """Answer one complete stateless request (*version* 2 or 0), chunk by chunk.

        A request the client got wrong yields one ``ERR`` packet.  Should the
        store fail part-way through a pack, the client gets git's band-3
        abort message and the error propagates to the caller.
        """
        try:
            response = self.plan(repo, request, version=version)
        except UploadPackError as e:
            yield error_pkt(str(e))
            return
        yield from self.send(response)

    def plan(self, repo: Repository, request: bytes, *, version: int) -> PlannedResponse:
        """Parse, validate, negotiate and plan one stateless request; nothing is sent yet.

        Raises UploadPackError, whose text is the ``ERR`` line, for a request
        the client got wrong.
        """
        return self._plan_v2(repo, request) if version == 2 else self._plan_v0(repo, request)

    def send(self, response: PlannedResponse) -> Iterator[bytes]:
        """The bytes of a planned response: its packets, then the pack if one follows."""
        if response.head:
            yield response.head
        if response.pack is not None:
            yield from self._send_pack(response.pack)

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

    # -- protocol v2 --------------------------------------------------------

    def _plan_v2(self, repo: Repository, body: bytes) -> PlannedResponse:
        request = parse_v2_request(body, self.limits)
        if request is None:
            return PlannedResponse(b"")
        view = RepoView.open(self.metadata, repo)
        if isinstance(request, LsRefsRequest):
            peeled = ref_peels(view) if request.peel else {}
            return PlannedResponse(ls_refs_response(request, view.snapshot, peeled))
        return self._fetch_v2(view, request)

    def _fetch_v2(self, view: RepoView, request: FetchRequest) -> PlannedResponse:
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
        job = _PackJob(pack, self.plan_pack(view, pack), SIDEBAND_64K, not request.no_progress)
        return PlannedResponse(b"".join(head), job)

    # -- protocol v0/v1, stateless -----------------------------------------

    def _plan_v0(self, repo: Repository, body: bytes) -> PlannedResponse:
        request = parse_v0_request(body, self.limits)
        if not request.wants:
            return PlannedResponse(b"")
        view = RepoView.open(self.metadata, repo)
        check_wants(view, request.wants)
        shallow = compute_shallow(view, request, request.wants)
        head = [v0_shallow_section(shallow.shallow, shallow.unshallow)] if request.deepens else []
        if request.awaiting_haves:
            return PlannedResponse(b"".join(head))
        negotiator = Negotiator(view, [*request.wants, *shallow.extra_wants])
        negotiator.prefetch(request.haves)
        acks, send_pack = negotiate_v0(request, negotiator)
        head.append(acks)
        if not send_pack:
            return PlannedResponse(b"".join(head))
        pack = PackRequest.of(request, request.wants, negotiator.have_objs, shallow)
        progress = bool(request.sideband) and not request.no_progress
        job = _PackJob(pack, self.plan_pack(view, pack), request.sideband, progress)
        return PlannedResponse(b"".join(head), job)

    # -- sending -----------------------------------------------------------

    def _send_pack(self, job: _PackJob) -> Iterator[bytes]:
        sideband = job.sideband
        if job.progress:
            count = len(job.plan.objects)
            yield frame_band(2, b"Enumerating objects: %d, done.\n" % count, sideband)
        try:
            for chunk in self.pack_chunks(job.request, job.plan):
                yield frame_band(1, chunk, sideband) if sideband else chunk
        except (MissingObject, CorruptObject):
            if sideband:
                yield frame_band(3, ABORT_MESSAGE + b"\n", sideband)
            raise
        if sideband:
            yield FLUSH_PKT


@attrs.define(eq=False)
class UploadSession:
    """Upload-pack v0/v1 on a connection that stays open (ssh://, git://): git's stateful mode.

    One ref snapshot serves the whole connection, as one ``git upload-pack``
    process does, and the rounds of haves share one negotiation.  Every step
    blocks (run it in the pool); call them in order, one at a time:
    ``advertisement``, ``receive_wants`` with the want section up to its
    flush, then ``receive_haves`` per round until its answer carries the
    pack.  Client mistakes raise UploadPackError.
    """

    service: UploadPackService
    view: RepoView
    _request: FetchRequest | None = attrs.field(default=None, init=False)
    _shallow: ShallowPlan = attrs.field(factory=ShallowPlan, init=False)
    _negotiator: Negotiator | None = attrs.field(default=None, init=False)
    _negotiation: V0Negotiation = attrs.field(factory=V0Negotiation, init=False)
    _have_total: int = attrs.field(default=0, init=False)

    @classmethod
    def open(cls, service: UploadPackService, repo: Repository) -> UploadSession:
        """A session on the repository's refs as they are now."""
        return cls(service, RepoView.open(service.metadata, repo))

    def advertisement(self) -> bytes:
        """The v0 ref advertisement (no ``no-done``: git offers it to stateless clients only)."""
        return ref_advertisement(self.view.snapshot, ref_peels(self.view), no_done=False)

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
        self._negotiator = Negotiator(view, [*request.wants, *shallow.extra_wants])
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
        job = _PackJob(pack, self.service.plan_pack(self.view, pack), request.sideband, progress)
        return PlannedResponse(acks, job)
