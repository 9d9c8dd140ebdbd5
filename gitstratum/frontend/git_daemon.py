"""The git:// protocol (what ``git daemon`` serves): anonymous, read-only, public repositories.

A connection opens with one pkt-line request,
``git-upload-pack /OWNER/NAME.git\\0host=HOST\\0``, optionally followed by
``\\0version=2\\0`` (extra parameters, which git daemon hands on as
``GIT_PROTOCOL``).  That line is read within a bounded time and size, the
path is checked before any lookup, and only a public repository is served;
everything else gets git daemon's own ``ERR`` lines.  Then the connection
belongs to ``GitStreamProtocol``, the same engine SSH uses.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IDelayedCall,
    IHalfCloseableProtocol,
    IProtocol,
    IReactorTime,
)
from twisted.internet.protocol import Protocol, ServerFactory, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from gitstratum.core.limits import NumberError, parse_number
from gitstratum.core.pktline import NEED_DATA, Packet, PktLineDecoder, PktLineError, error_pkt
from gitstratum.frontend.auth import Authorizer, Decision
from gitstratum.frontend.metrics import record_request
from gitstratum.frontend.paths import valid_repo_name
from gitstratum.frontend.stream import GitBackend, GitStreamProtocol, parse_git_protocol_env
from gitstratum.storage.interfaces import IMetadataStore, Permission, Repository

__all__ = [
    "DEFAULT_PORT",
    "DaemonRequest",
    "DaemonRequestError",
    "parse_daemon_request",
    "daemon_repo",
    "GitDaemonProtocol",
    "GitDaemonFactory",
    "make_git_daemon_factory",
]

DEFAULT_PORT = 9418

_SERVICES = ("upload-pack", "receive-pack", "upload-archive")
# What git daemon's own "host=" check lets through: a DNS name or an address, and a port.
_HOST = re.compile(r"\A(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+)(:[0-9]{1,5})?\Z")
_NOT_EXPORTED = "access denied or repository not exported"


class DaemonRequestError(ValueError):
    """A first line that is not a git daemon request; ``str()`` is the ERR text."""


@attrs.frozen
class DaemonRequest:
    """The parsed first line of a git:// connection."""

    service: str  # "upload-pack", "receive-pack" or "upload-archive"
    path: str  # as sent, e.g. "/alice/proj.git"
    host: str | None = None  # lower-cased, without the port
    extra: tuple[bytes, ...] = ()  # the extra parameters, e.g. (b"version=2",)

    @property
    def git_protocol(self) -> bytes:
        """The extra parameters as git daemon passes them on: ``GIT_PROTOCOL``'s value."""
        return b":".join(self.extra)


def _printable(text: str) -> str:
    return "".join(c if c.isprintable() else "?" for c in text)


def parse_daemon_request(payload: bytes) -> DaemonRequest:
    """Parse the payload of the first pkt-line; raise DaemonRequestError if it is not one."""
    command, _, rest = payload.partition(b"\0")
    command = command.removesuffix(b"\n")
    word, space, raw_path = command.partition(b" ")
    if not word.startswith(b"git-") or not space or not raw_path:
        raise DaemonRequestError("protocol error: expected 'git-<service> <path>'")
    service = word[4:].decode("ascii", "replace")
    if service not in _SERVICES:
        raise DaemonRequestError(f"protocol error: unknown service 'git-{_printable(service)}'")
    try:
        path = raw_path.decode("utf-8")
    except UnicodeDecodeError:
        path = raw_path.decode("utf-8", "replace")
    fields = rest.split(b"\0") if rest else []
    host = None
    if fields and fields[0].startswith(b"host="):
        raw_host = fields.pop(0)[5:].decode("ascii", "replace")
        match = _HOST.match(raw_host)
        if match is None:
            raise DaemonRequestError(f"protocol error: invalid host '{_printable(raw_host)}'")
        if match.group(2):
            try:
                parse_number(match.group(2)[1:].encode(), high=65535)
            except NumberError as e:
                raise DaemonRequestError(f"protocol error: invalid host port ({e})") from None
        host = match.group(1).lower()
    extra: tuple[bytes, ...] = ()
    # Extra parameters follow one empty field: "host=H\0\0version=2\0".
    if len(fields) > 1 and fields[0] == b"":
        extra = tuple(f for f in fields[1:] if f)
    return DaemonRequest(service=service, path=path, host=host, extra=extra)


def daemon_repo(path: str) -> str | None:
    """``OWNER/NAME`` for a git:// path (``/OWNER/NAME`` or ``/OWNER/NAME.git``), else None.

    No ``~user`` paths, no ``..``, NUL or backslash: git daemon would only
    serve such paths under options we do not offer.
    """
    if not path.startswith("/") or ".." in path or "\0" in path or "\\" in path:
        return None
    name = path[1:].removesuffix(".git")
    return name if valid_repo_name(name) else None


@implementer(IHalfCloseableProtocol)
class GitDaemonProtocol(Protocol):
    """One git:// connection: read and check the request line, then hand over to git.

    Until the request is settled, reading from the client is paused, so
    nothing it sends early is buffered beyond one read.  After that every
    byte, the half-close and the connection's end go to the stream protocol.
    The backend, clock, timeout and stream factory are its factory's.
    """

    _log = Logger()
    factory: GitDaemonFactory

    def __init__(self, factory: GitDaemonFactory):
        self.factory = factory
        self.decoder = PktLineDecoder(factory.backend.limits.max_empty_packets)
        self.request: DaemonRequest | None = None
        self.stream: IProtocol | None = None
        self._timeout: IDelayedCall | None = None
        self._early: list[bytes] = []
        self._eof = False
        self._done = False

    def connectionMade(self) -> None:
        self._timeout = self.factory.clock.callLater(self.factory.request_timeout, self._timed_out)

    def _timed_out(self) -> None:
        self._timeout = None
        self._log.info("git:// client {peer} sent no request in time", peer=self._peer())
        self._finish()

    def _cancel_timeout(self) -> None:
        if self._timeout is not None:
            self._timeout.cancel()
            self._timeout = None

    def dataReceived(self, data: bytes) -> None:
        if self.stream is not None:
            self.stream.dataReceived(data)
            return
        if self._done:
            return
        if self.request is not None:
            self._early.append(data)  # the request is being looked up
            return
        self.decoder.receive_data(data)
        try:
            event = self.decoder.next_event()
        except PktLineError as e:
            self._refuse("-", 400, str(e))
            return
        if event is NEED_DATA:
            return
        if not isinstance(event, Packet):
            self._refuse("-", 400, "protocol error: expected a git-upload-pack request")
            return
        self._cancel_timeout()
        rest = self.decoder.take_unconsumed()
        if rest:
            self._early.append(rest)
        self._handle(event.data)

    def _handle(self, payload: bytes) -> None:
        try:
            request = parse_daemon_request(payload)
        except DaemonRequestError as e:
            self._refuse("-", 400, str(e))
            return
        self.request = request
        path = _printable(request.path)
        service = request.service
        if service != "upload-pack":
            # git daemon checks the service before it looks at the path.
            self._refuse(path, 403, f"service not enabled: {path}", service)
            return
        name = daemon_repo(request.path)
        if name is None:
            self._refuse(path, 404, f"{_NOT_EXPORTED}: {path}", service)
            return
        assert self.transport is not None
        self.transport.pauseProducing()  # type: ignore[attr-defined]
        factory = self.factory
        d: Deferred[tuple[Repository | None, Decision]] = factory.backend.run(
            factory.authorizer.authorize, None, name, Permission.READ
        )
        d.addCallback(self._found, request, name)
        d.addErrback(self._failed, name)

    def _found(
        self, found: tuple[Repository | None, Decision], request: DaemonRequest, name: str
    ) -> None:
        if self._done:
            return
        repo, decision = found
        if repo is None or not decision.allowed:
            path = _printable(request.path)
            self._refuse(name, 404, f"{_NOT_EXPORTED}: {path}", request.service)
            return
        value = request.git_protocol
        version = parse_git_protocol_env(value) if value else 0
        self._log.info(
            "git:// {peer} upload-pack {repo} host={host} version={version}",
            peer=self._peer(),
            repo=name,
            host=request.host or "-",
            version=version,
        )
        stream = self.factory.stream_factory(
            self.factory.backend,
            service="upload-pack",
            repo=repo,
            user="-",
            version=version,
            on_done=self._stream_done,
        )
        self.stream = stream
        assert self.transport is not None
        stream.makeConnection(self.transport)
        early, self._early = self._early, []
        for data in early:
            stream.dataReceived(data)
        if self._eof:
            self._deliver_eof()
        if not self._done:
            self.transport.resumeProducing()  # type: ignore[attr-defined]

    def _failed(self, failure: Failure, name: str) -> None:
        self._log.failure("git:// lookup of {repo} failed", failure, repo=name)
        if not self._done:
            self._refuse(name, 500, "internal server error")

    def _stream_done(self, status: int) -> None:
        self._finish()

    def _refuse(self, repo: str, status: int, message: str, service: str = "git-daemon") -> None:
        """Send git daemon's ``ERR`` line and hang up."""
        counted = service in ("upload-pack", "receive-pack")
        record_request(
            self.factory.backend.metrics if counted else None,
            self._log,
            service=service,
            repo=repo,
            user="-",
            status=status,
            outcome={400: "bad_request", 403: "denied", 404: "not_found"}.get(status, "error"),
            logged_as=None if service == "git-daemon" else f"git-daemon {service}",
        )
        if self.transport is not None and not self._done:
            self.transport.write(error_pkt(message))
        self._finish()

    def _finish(self) -> None:
        if self._done:
            return
        self._done = True
        self._cancel_timeout()
        if self.transport is not None:
            self.transport.loseConnection()

    def readConnectionLost(self) -> None:
        self._eof = True
        if self.stream is not None:
            self._deliver_eof()
        elif self.request is None:
            self._finish()  # closed before sending a whole request

    def writeConnectionLost(self) -> None:
        pass

    def _deliver_eof(self) -> None:
        if self.stream is not None and IHalfCloseableProtocol.providedBy(self.stream):
            self.stream.readConnectionLost()  # type: ignore[attr-defined]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._done = True
        self._cancel_timeout()
        stream, self.stream = self.stream, None
        if stream is not None:
            stream.connectionLost(reason)

    def _peer(self) -> str:
        if self.transport is None:
            return "-"
        peer: Any = self.transport.getPeer()
        host = getattr(peer, "host", None)
        return f"{host}:{peer.port}" if host is not None else str(peer)


@attrs.define(eq=False)
class GitDaemonFactory(ServerFactory[GitDaemonProtocol]):
    """Builds a ``GitDaemonProtocol`` per connection; what they share is kept here."""

    backend: GitBackend
    metadata: IMetadataStore
    clock: IReactorTime = attrs.field(kw_only=True)
    request_timeout: float = attrs.field(kw_only=True)
    stream_factory: Callable[..., IProtocol] = attrs.field(default=GitStreamProtocol, kw_only=True)
    authorizer: Authorizer = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.authorizer = Authorizer(self.metadata)

    def buildProtocol(self, addr: Any) -> GitDaemonProtocol:
        return GitDaemonProtocol(self)


def make_git_daemon_factory(
    backend: GitBackend,
    metadata: IMetadataStore,
    *,
    request_timeout: float = 30.0,
    clock: IReactorTime | None = None,
    stream_factory: Callable[..., IProtocol] | None = None,
) -> GitDaemonFactory:
    """The git:// server factory for ``strports.service(endpoint, factory)``.

    *request_timeout* bounds how long a client may take to send its request
    line; *clock* defaults to the global reactor.
    """
    if clock is None:
        from twisted.internet import reactor

        clock = reactor  # type: ignore[assignment]
    assert clock is not None
    return GitDaemonFactory(
        backend,
        metadata,
        clock=clock,
        request_timeout=request_timeout,
        stream_factory=stream_factory or GitStreamProtocol,
    )
