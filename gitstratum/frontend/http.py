"""Smart HTTP on Klein: a thin adapter from HTTP requests to the protocol engines.

Routing, authentication and framing happen here; everything that touches
the stores, inflates or hashes runs through the injected ``BlockingRunner``.
Responses stream through ``ThreadedIteratorProducer`` so a slow client
pauses pack generation instead of growing a buffer.  An upload-pack request
is planned before its response starts, so a fetch that admission control
refuses gets ``429 Too Many Requests`` with ``Retry-After``.
"""

from __future__ import annotations

import tempfile
import time
import zlib
from collections.abc import Callable
from typing import IO, Any, BinaryIO, cast

import attrs
from klein import Klein
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.interfaces import IConsumer
from twisted.logger import Logger
from twisted.web import server
from twisted.web.http import _getContentFile  # the size-based BytesIO/tempfile choice Request uses
from twisted.web.iweb import IRequest

from gitstratum.core.limits import Limits
from gitstratum.core.pktline import FLUSH_PKT, PktLineError, error_pkt
from gitstratum.frontend.admin_api import AdminAPI
from gitstratum.frontend.admission import Overloaded
from gitstratum.frontend.auth import Authorizer
from gitstratum.frontend.http_guard import declared_length
from gitstratum.frontend.metrics import Metrics, record_request, repo_class_of
from gitstratum.frontend.paths import BadPath, GitPath, parse_git_path
from gitstratum.frontend.sendfile import SendfileProducer, direct_socket
from gitstratum.frontend.threads import BlockingRunner, ThreadedIteratorProducer
from gitstratum.protocol import receive_pack
from gitstratum.protocol.ingest import PushProcessor
from gitstratum.protocol.upload_pack import UploadPackError
from gitstratum.protocol.upload_response import PlannedResponse
from gitstratum.protocol.upload_service import Caller, UploadPackService
from gitstratum.storage.interfaces import IMetadataStore, Permission, Repository

__all__ = ["GitHTTP", "spooling_request_factory", "BodyTooLarge"]

_NO_CACHE = {
    b"Cache-Control": b"no-cache, max-age=0, must-revalidate",
    b"Pragma": b"no-cache",
    b"Expires": b"Fri, 01 Jan 1980 00:00:00 GMT",
}


class BodyTooLarge(Exception):
    """A request body, raw or inflated, passed its configured limit."""


class _SpoolingRequest(server.Request):
    """A Request that spools its body under the data dir and stops storing past a bound.

    Twisted reads every body whole before any resource runs (memory below
    100 kB, a temp file above), so the bound is chosen here, from the raw
    path, before the first byte is kept: a push may bring ``max_body``, but
    only with credentials (an anonymous push is refused anyway); an
    upload-pack request ``max_request_body``; the admin API ``max_api_body``;
    anything else nothing.  An endless chunked upload costs neither memory
    nor disk, and an unauthenticated one cannot fill the spool.
    """

    max_body: int = 0
    max_request_body: int = 0
    max_api_body: int = 0
    spool_dir: str | None = None
    body_too_large: bool = False
    _body_seen: int = 0
    _bound: int = 0

    def body_bound(self) -> int:
        """The most body bytes this request may bring, by its endpoint."""
        raw = getattr(self.channel, "_path", b"") or b""
        path = raw.split(b"?", 1)[0]
        if path.endswith(b"/git-receive-pack"):
            return self.max_body if self.requestHeaders.hasHeader(b"authorization") else 0
        if path.endswith(b"/git-upload-pack"):
            return self.max_request_body
        if path.startswith(b"/api/"):
            return self.max_api_body
        return 0

    def gotLength(self, length: int | None) -> None:
        self._body_seen = 0
        self._bound = self.body_bound()
        self.body_too_large = length is not None and length > self._bound
        if length is not None and length < 100_000:
            self.content = _getContentFile(length)
        else:
            self.content = tempfile.TemporaryFile(dir=self.spool_dir)

    def handleContentChunk(self, data: bytes) -> None:
        self._body_seen += len(data)
        if self._body_seen > self._bound and not self.body_too_large:
            self.body_too_large = True
            # A body of undeclared length just passed the bound: a GuardedChannel
            # answers 413 now rather than read the rest of a stream that may not end.
            refuse = getattr(self.channel, "refuse", None)
            if refuse is not None:
                refuse(413, "too_large", "Request body too large")
        if self.body_too_large:
            # Also when Content-Length said so up front: the answer is 413 either way.
            return
        assert self.content is not None
        self.content.write(data)


def spooling_request_factory(
    max_body: int,
    spool_dir: str | None,
    *,
    max_request_body: int = 16 << 20,
    max_api_body: int = (1 << 20) + 1,
) -> type[server.Request]:
    """A Request class for ``Site(requestFactory=...)`` with these bounds."""
    return type(
        "SpoolingRequest",
        (_SpoolingRequest,),
        {
            "max_body": max_body,
            "spool_dir": spool_dir,
            "max_request_body": max_request_body,
            "max_api_body": max_api_body,
        },
    )


def _read_body(content: IO[bytes], gzipped: bool, limit: int) -> bytes:
    """The whole (small) request body, gunzipped, refusing more than *limit* bytes."""
    content.seek(0)
    if not gzipped:
        raw = content.read(limit + 1)
        if len(raw) > limit:
            raise BodyTooLarge(f"request body exceeds {limit} bytes")
        return raw
    # The compressed body is read in pieces: its own size says nothing about
    # the inflated size, and a stream that stops short is corrupt, not short.
    d = zlib.decompressobj(16 + zlib.MAX_WBITS)
    out = bytearray()
    try:
        while not d.eof:
            chunk = d.unconsumed_tail or content.read(1 << 16)
            if not chunk:
                raise ValueError("bad gzip request body: truncated")
            out += d.decompress(chunk, limit + 1 - len(out))
            if len(out) > limit:
                raise BodyTooLarge(f"inflated request body exceeds {limit} bytes")
    except zlib.error as e:
        raise ValueError(f"bad gzip request body: {e}") from None
    return bytes(out)


def _gunzip_to_spool(content: IO[bytes], limit: int, spool_dir: str | None) -> IO[bytes]:
    """Inflate a gzip body into a new spool file, bounded by *limit* inflated bytes."""
    content.seek(0)
    out = tempfile.TemporaryFile(dir=spool_dir)
    d = zlib.decompressobj(16 + zlib.MAX_WBITS)
    total = 0
    try:
        while True:
            chunk = content.read(1 << 20)
            data = d.decompress(chunk, 1 << 22) if chunk else d.flush()
            while True:
                total += len(data)
                if total > limit:
                    raise BodyTooLarge(f"inflated request body exceeds {limit} bytes")
                out.write(data)
                if not d.unconsumed_tail:
                    break
                data = d.decompress(d.unconsumed_tail, 1 << 22)
            if not chunk:
                break
        if not d.eof:
            raise ValueError("bad gzip request body: truncated")
    except zlib.error as e:
        out.close()
        raise ValueError(f"bad gzip request body: {e}") from None
    except Exception:
        out.close()
        raise
    out.seek(0)
    return out


#: bytes per send() while a pack streams (Twisted's default is 128 KiB)
STREAM_SEND_LIMIT = 4 << 20


def _raise_send_limit(request: IRequest) -> None:
    """Let a pack response go out in fewer, larger send() calls.

    A cached pack is megabytes; at Twisted's 128 KiB per call a 27 MB
    response takes ~200 syscalls, each with its own Python overhead.
    Measured on warm depth-1 hits: about 15% less server CPU per clone.
    """
    transport = getattr(getattr(request, "channel", None), "transport", None)
    if transport is not None and hasattr(transport, "SEND_LIMIT"):
        transport.SEND_LIMIT = STREAM_SEND_LIMIT


def _abort(request: IRequest) -> None:
    transport = getattr(getattr(request, "channel", None), "transport", None)
    if transport is not None:
        transport.abortConnection()


def _client_host(request: IRequest) -> str | None:
    """The client's IP address, for per-IP rate limits (forwarding headers are not trusted)."""
    return getattr(request.getClientAddress(), "host", None)


@attrs.define
class _Exchange:
    """Book-keeping for one request's log line and metrics."""

    service: str
    repo: str = "-"
    user: str = "-"
    repo_class: str = "none"
    status: int = 200
    outcome: str = "ok"
    nbytes: int = 0
    started: float = attrs.field(factory=time.monotonic)


@attrs.define
class GitHTTP:
    """The whole HTTP surface: Git smart HTTP, /api/v1, /healthz and /metrics."""

    metadata: IMetadataStore
    authorizer: Authorizer
    upload: UploadPackService
    push: PushProcessor
    admin: AdminAPI
    metrics: Metrics
    run: BlockingRunner
    limits: Limits = Limits()
    spool_dir: str | None = None
    app: Klein = attrs.field(factory=Klein)
    monotonic: Callable[[], float] = time.monotonic
    #: schedules stall checks of pack streams (``reactor.callLater`` when None)
    call_later: Callable[..., Any] | None = None
    #: send complete cache entries with sendfile on plain TCP connections
    sendfile: bool = True

    log = Logger()

    def __attrs_post_init__(self) -> None:
        app = self.app
        app.route("/healthz")(self._healthz)
        app.route("/metrics")(self._metrics)
        app.route("/api/", branch=True)(self._api)
        app.route("/", branch=True)(self._git)

    def resource(self) -> Any:
        return self.app.resource()

    # -- operations ------------------------------------------------------------
    def _healthz(self, request: IRequest) -> bytes:
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        return b"ok\n"

    def _metrics(self, request: IRequest) -> bytes:
        body, content_type = self.metrics.render()
        request.setHeader(b"Content-Type", content_type.encode("ascii"))
        return body

    def _api(self, request: IRequest) -> Any:
        return self.admin.app.resource()

    # -- git ----------------------------------------------------------------------
    def _route(self, request: IRequest) -> GitPath | bytes:
        """The git path a request is for, or the refusal already set up when it has none."""
        try:
            path = parse_git_path(request.path)
        except BadPath as e:
            return self._refuse(request, 400, str(e), "bad_request")
        if path is None:
            return self._refuse(request, 404, "Not found", "not_found")
        if path.endpoint == b"dumb":
            return self._refuse(
                request,
                404,
                "the dumb HTTP protocol is not supported; use a git client with smart HTTP",
                "not_found",
                repo=path.repo,
            )
        allowed = (b"GET", b"HEAD") if path.endpoint == b"info/refs" else (b"POST",)
        if request.method not in allowed:
            return self._refuse(request, 405, "Method not allowed", "bad_request", path.repo)
        return path

    async def _git(self, request: IRequest) -> bytes | None:
        path = self._route(request)
        if isinstance(path, bytes):
            return path
        if path.endpoint == b"info/refs":
            return await self._info_refs(request, path)
        if path.endpoint == b"git-upload-pack":
            return await self._upload_pack(request, path)
        return await self._receive_pack(request, path)

    # -- before the body ------------------------------------------------------------
    def admit(self, request: IRequest) -> Deferred[bytes | None]:
        """Refuse a request that brings a body from its headers alone, before the body is read.

        ``GuardedChannel`` calls this when the headers are complete, with the
        connection paused.  The answer is None (read the body and serve the
        request) or the body of the refusal the request's handler would have
        given, its status and headers already set on *request*: the same
        401/404/403 for the caller, 415 for the content type, 413 for a
        declared length over the endpoint's limit.
        """
        if request.path.startswith(b"/api/"):
            return self.admin.admit(request)
        return ensureDeferred(self._admit_git(request))

    async def _admit_git(self, request: IRequest) -> bytes | None:
        if not request.path.endswith((b"/git-upload-pack", b"/git-receive-pack")):
            return None  # no other route reads a body: GuardedChannel refuses one (413)
        path = self._route(request)
        if isinstance(path, bytes):
            return path
        fetch = path.endpoint == b"git-upload-pack"
        ex = _Exchange(service="upload-pack" if fetch else "receive-pack")
        need = Permission.READ if fetch else Permission.WRITE
        # The handler asks again once the body is in: access may change meanwhile.
        refused = await self._authorize(request, path, need, ex)
        if isinstance(refused, bytes):
            return refused
        return self._check_body(request, ex, path.endpoint)

    def refused_early(self, status: int, outcome: str) -> None:
        """Count and log a request the connection refused before it was routed."""
        self._finish(_Exchange(service="http", status=status, outcome=outcome))

    def _refuse(
        self, request: IRequest, status: int, message: str, outcome: str, repo: str = "-"
    ) -> bytes:
        """Answer a request refused before it reached a service, with its log line and metric."""
        ex = _Exchange(service="http", repo=repo, status=status, outcome=outcome)
        self._finish(ex)
        return self._plain(request, status, message)

    def _plain(self, request: IRequest, status: int, message: str) -> bytes:
        request.setResponseCode(status)
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        return message.encode("utf-8") + b"\n"

    def _finish(self, ex: _Exchange) -> None:
        record_request(
            self.metrics,
            self.log,
            service=ex.service,
            repo=ex.repo,
            user=ex.user,
            status=ex.status,
            outcome=ex.outcome,
            repo_class=ex.repo_class,
            seconds=time.monotonic() - ex.started,
            nbytes=ex.nbytes,
        )

    async def _authorize(
        self, request: IRequest, path: GitPath, need: Permission, ex: _Exchange
    ) -> Repository | bytes:
        """The repository when the caller may use it, else the error body already set up."""
        ex.repo = path.repo
        header = request.getHeader(b"authorization")
        user = None
        if header is not None:
            user = await self.run(self.authorizer.user_for_basic, header)
            if user is None:
                return self._deny(request, ex, 401, "Invalid username or token.")
            ex.user = user.name
        repo, decision = await self.run(self.authorizer.authorize, user, path.repo, need)
        if not decision.allowed:
            return self._deny(request, ex, decision.status, decision.message)
        assert repo is not None
        ex.repo_class = repo_class_of(repo)
        return repo

    def _deny(self, request: IRequest, ex: _Exchange, status: int, message: str) -> bytes:
        ex.status, ex.outcome = status, "denied"
        if status == 401:
            request.setHeader(b"WWW-Authenticate", b'Basic realm="GitStratum"')
        body = self._plain(request, status, message)
        self._finish(ex)
        return body

    async def _info_refs(self, request: IRequest, path: GitPath) -> bytes:
        args = request.args or {}
        service = (args.get(b"service") or [b""])[0]
        if not service:
            return self._plain(
                request,
                404,
                "the dumb HTTP protocol is not supported; use a git client with smart HTTP",
            )
        if service not in (b"git-upload-pack", b"git-receive-pack"):
            return self._plain(request, 403, "Unsupported service")
        ex = _Exchange(service=service.decode() + "-advertisement")
        need = Permission.READ if service == b"git-upload-pack" else Permission.WRITE
        repo = await self._authorize(request, path, need, ex)
        if isinstance(repo, bytes):
            return repo
        version = self._protocol_version(request)
        if service == b"git-upload-pack":
            body = await self.run(self.upload.advertise, repo, version=version, http=True)
        else:
            body = await self.run(self._push_advertisement, repo)
        request.setHeader(b"Content-Type", b"application/x-%s-advertisement" % service)
        for k, v in _NO_CACHE.items():
            request.setHeader(k, v)
        ex.nbytes = len(body)
        self._finish(ex)
        return body

    @staticmethod
    def _protocol_version(request: IRequest) -> int:
        header = request.getHeader(b"git-protocol") or b""
        return 2 if b"version=2" in header.split(b":") else 0

    def _check_body(self, request: IRequest, ex: _Exchange, kind: bytes) -> bytes | None:
        content_type = request.getHeader(b"content-type") or b""
        if content_type != b"application/x-%s-request" % kind:
            ex.status, ex.outcome = 415, "bad_request"
            self._finish(ex)
            return self._plain(
                request, 415, f"Content-Type must be application/x-{kind.decode()}-request"
            )
        limit = self._body_limit(kind)
        length = declared_length(request)
        if getattr(request, "body_too_large", False) or (length is not None and length > limit):
            ex.status, ex.outcome = 413, "too_large"
            self._finish(ex)
            return self._plain(request, 413, "Request body too large")
        return None

    def _body_limit(self, kind: bytes) -> int:
        """The most body bytes a request to *kind* may declare."""
        if kind == b"git-upload-pack":
            return self.limits.max_request_bytes
        return self.limits.max_pack_bytes

    def _is_gzip(self, request: IRequest) -> bool:
        return (request.getHeader(b"content-encoding") or b"").lower() in (b"gzip", b"x-gzip")

    async def _upload_pack(self, request: IRequest, path: GitPath) -> bytes | None:
        ex = _Exchange(service="upload-pack")
        repo = await self._authorize(request, path, Permission.READ, ex)
        if isinstance(repo, bytes):
            return repo
        refused = self._check_body(request, ex, b"git-upload-pack")
        if refused is not None:
            return refused
        try:
            body = await self.run(
                _read_body, request.content, self._is_gzip(request), self.limits.max_request_bytes
            )
        except BodyTooLarge as e:
            ex.status, ex.outcome = 413, "too_large"
            self._finish(ex)
            return self._plain(request, 413, str(e))
        except ValueError as e:
            ex.status, ex.outcome = 400, "bad_request"
            self._finish(ex)
            return self._plain(request, 400, str(e))
        caller = Caller(user=None if ex.user == "-" else ex.user, address=_client_host(request))
        # Planned before the first byte: a refusal can still be a status code.
        try:
            planned = await self.run(
                self.upload.plan,
                repo,
                body,
                version=self._protocol_version(request),
                caller=caller,
            )
        except Overloaded as e:
            ex.status, ex.outcome = 429, "rate_limited"
            self._finish(ex)
            request.setHeader(b"Retry-After", b"%d" % e.retry_seconds)
            return self._plain(request, 429, str(e))
        except UploadPackError as e:
            planned = PlannedResponse(error_pkt(str(e)))
            ex.outcome = "bad_request"
        try:
            opened = await self.run(self.upload.open, planned)
        except Exception:
            self.log.failure("upload-pack could not open the pack for {repo}", repo=path.repo)
            ex.status, ex.outcome = 500, "error"
            self._finish(ex)
            return self._plain(request, 500, "internal server error")
        request.setHeader(b"Content-Type", b"application/x-git-upload-pack-result")
        for k, v in _NO_CACHE.items():
            request.setHeader(k, v)
        if opened.length is not None:
            # A cache hit's size is known: no chunked framing to build and
            # parse around every pack byte.
            request.setHeader(b"Content-Length", b"%d" % opened.length)
        _raise_send_limit(request)
        transport = cast(Any, request).channel.transport
        sock = direct_socket(transport) if opened.file is not None and self.sendfile else None
        # twisted.web suspends its idle timeout while a request is answered, so a
        # client that stops reading would park this stream (and what it holds) forever.
        producer: SendfileProducer | ThreadedIteratorProducer
        if sock is not None:
            assert opened.file is not None
            producer = SendfileProducer(
                cast(IConsumer, request),
                transport,
                sock,
                opened.file,
                self.run,
                stall_timeout=self.limits.idle_timeout,
                call_later=self.call_later,
                on_stall=lambda: _abort(request),
            )
        else:
            producer = ThreadedIteratorProducer(
                cast(IConsumer, request),
                opened.chunks,
                self.run,
                stall_timeout=self.limits.idle_timeout,
                call_later=self.call_later,
                on_stall=lambda: _abort(request),
            )
        try:
            try:
                ex.nbytes = await producer.start()
            finally:
                if sock is not None:
                    # The stream is over; the entry's file can go (the iterator
                    # producer closes its iterator itself).
                    await self.run(opened.chunks.close)
        except Exception:
            # The response has started; all we can do is log and cut the stream.
            self.log.failure("upload-pack failed for {repo}", repo=path.repo)
            ex.outcome, ex.status, ex.nbytes = "error", 500, producer.written
            self._finish(ex)
            # Abort, not lose: a clean close after the last chunk would look
            # to the client like a complete (if truncated) response.
            cast(Any, request).channel.transport.abortConnection()
            return None
        if producer.stalled:
            ex.outcome = "timeout"
        elif producer.stopped:
            ex.outcome = "disconnected"
            # The transport stopped us as the connection went (often a client
            # that had every byte and hung up before our last pull returned).
            # The request is finished next, and must not still hold us, or
            # twisted.web logs "Producer was not unregistered" as critical.
            if getattr(request, "producer", None) is producer:
                cast(IConsumer, request).unregisterProducer()
        self._finish(ex)
        return None

    async def _receive_pack(self, request: IRequest, path: GitPath) -> bytes | None:
        ex = _Exchange(service="receive-pack")
        repo = await self._authorize(request, path, Permission.WRITE, ex)
        if isinstance(repo, bytes):
            return repo
        refused = self._check_body(request, ex, b"git-receive-pack")
        if refused is not None:
            return refused
        content = request.content
        try:
            if self._is_gzip(request):
                content = await self.run(
                    _gunzip_to_spool, content, self.limits.max_pack_bytes, self.spool_dir
                )
            response = await self.run(self._push, repo, content)
        except BodyTooLarge as e:
            ex.status, ex.outcome = 413, "too_large"
            self._finish(ex)
            return self._plain(request, 413, str(e))
        except (receive_pack.ReceivePackError, PktLineError, ValueError) as e:
            # 200 with an ERR packet, as for upload-pack: git prints "remote
            # error: <why>", where a 4xx shows only "RPC failed; HTTP 400".
            ex.status, ex.outcome = 200, "bad_request"
            self._finish(ex)
            request.setHeader(b"Content-Type", b"application/x-git-receive-pack-result")
            if isinstance(e, receive_pack.ReceivePackError) and e.sideband:
                return receive_pack.refusal(f"error: {e}", sideband=True) + FLUSH_PKT
            return receive_pack.refusal(str(e), sideband=False)
        request.setHeader(b"Content-Type", b"application/x-git-receive-pack-result")
        for k, v in _NO_CACHE.items():
            request.setHeader(k, v)
        body, ok = response
        ex.nbytes = len(body)
        ex.outcome = "ok" if ok else "rejected"
        self._finish(ex)
        return body

    def _push_advertisement(self, repo: Repository) -> bytes:
        """The refs a pusher sees (a worker thread: sorting every ref is not reactor work)."""
        return receive_pack.advertise(self.metadata.get_refs(repo), http=True)

    def _push(self, repo: Repository, content: IO[bytes]) -> tuple[bytes, bool]:
        """Parse, ingest and report one push (runs in a worker thread)."""
        content.seek(0)
        request, pack = receive_pack.read_request(cast(BinaryIO, content), self.limits)
        report = self.push.process(repo, request, pack)
        return receive_pack.encode_response(request, report), report.ok
