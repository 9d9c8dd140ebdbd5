"""Upload-pack v0/v1 in git's stateful form, for connections that stay open (ssh://, git://)."""

from __future__ import annotations

import attrs

from gitstratum.protocol.pack_key import PackRequest
from gitstratum.protocol.upload_pack import (
    FetchRequest,
    UploadPackError,
    V0Negotiation,
    parse_have_round,
    parse_v0_request,
    v0_shallow_section,
)
from gitstratum.protocol.upload_response import PlannedResponse
from gitstratum.protocol.upload_service import Caller, UploadPackService
from gitstratum.protocol.walker import (
    Negotiator,
    RepoView,
    ShallowPlan,
    check_wants,
    compute_shallow,
    negotiation_cut,
)
from gitstratum.storage.interfaces import Repository

__all__ = ["UploadSession"]


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
        job = self.service.pack_job(self.view, pack, request.sideband, progress, self.caller)
        return PlannedResponse(acks, job)
