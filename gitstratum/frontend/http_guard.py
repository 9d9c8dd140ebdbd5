"""Refuse before you read: the HTTP connection's own bounds, applied as the bytes arrive.

Twisted's ``HTTPChannel`` reads a request's whole body before any resource
runs, answers every malformed request with a bare ``400`` and bounds a slow
client only by its idle timeout.  ``GuardedChannel`` changes three things:

* The request line and headers are bounded by options, with the statuses
  HTTP names for it: a long URI is ``414``, too many or too large headers
  ``431``, a malformed or absurd ``Content-Length`` ``400``/``413``; headers
  that trickle in past ``header_timeout`` (slowloris) get ``408``.
* When the headers of a request with a body are complete, the site's
  ``admit`` decides from them alone (credentials, path, declared length),
  with the transport paused while it looks the caller up off the reactor.
  A refusal is answered at once and the body is never stored.
* A connection refused mid-request is closed gracefully: the answer is sent,
  the write side shut, and what the client still sends is read and thrown
  away for ``LINGER_SECONDS`` (closing with unread data would reset the
  connection, and the client might never see why it was refused).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from http import HTTPStatus
from typing import Any, cast

import attrs
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel, Request
from twisted.web.iweb import IRequest
from twisted.web.server import Site

__all__ = [
    "HTTPLimits",
    "GuardedChannel",
    "GuardedSite",
    "LINGER_SECONDS",
    "JSONTooDeep",
    "check_json_depth",
    "declared_length",
]

#: seconds a refused connection is drained (and its input discarded) before it is cut
LINGER_SECONDS = 5.0

#: digits a Content-Length may have: 10**18 bytes is past every limit already
_MAX_LENGTH_DIGITS = 18


@attrs.frozen
class HTTPLimits:
    """Bounds on what an HTTP client may send before its request is routed."""

    #: bytes in a request URI (path and query); longer is 414
    max_uri_bytes: int = 8192
    #: bytes in all header lines of one request together; more is 431
    max_header_bytes: int = 64 * 1024
    #: header fields in one request; more is 431
    max_headers: int = 100
    #: seconds from a request's first byte (a connection's start, for its
    #: first request) to the end of its headers; slower is 408 and a close
    header_timeout: float = 30.0
    #: bytes of JSON body an admin API request may bring; more is 413
    api_max_body_bytes: int = 1024 * 1024
    #: nesting depth of an admin API JSON body; deeper is 400
    api_max_json_depth: int = 32


def declared_length(request: Any) -> int | None:
    """The body length a request's headers declare (None: chunked or none given).

    ``GuardedChannel`` has already refused a malformed or absurd value; a
    request that did not come through it (a test's stub) is read the same
    way, and anything but plain digits counts as undeclared.
    """
    value = request.getHeader(b"content-length")
    if value is None:
        return None
    value = value.strip()
    if not value.isdigit() or len(value) > _MAX_LENGTH_DIGITS:
        return None
    return int(value)


class JSONTooDeep(ValueError):
    """A JSON text nests arrays and objects deeper than allowed."""


# A JSON string (possessive, so an unterminated one cannot backtrack) or a bracket.
_JSON_TOKENS = re.compile(r'"(?:[^"\\]|\\.)*+"|[\[\]{}]', re.DOTALL)


def check_json_depth(text: str, limit: int) -> None:
    """Raise ``JSONTooDeep`` if *text* nests brackets more than *limit* deep.

    ``json.loads`` recurses once per level, so a body of a few thousand
    ``[`` ends in ``RecursionError``; this scan, which skips string
    contents, runs first.  Brackets inside an unterminated string are
    counted: such a text is not JSON anyway.
    """
    depth = 0
    for match in _JSON_TOKENS.finditer(text):
        token = match.group()
        if token in ("[", "{"):
            depth += 1
            if depth > limit:
                raise JSONTooDeep(f"request body is nested more than {limit} levels deep")
        elif token in ("]", "}"):
            depth -= 1


#: ``admit(request)``: None to read the body, or the refusal's body with the
#: request's status and headers already set
Admit = Callable[[IRequest], "Deferred[bytes | None] | bytes | None"]


class GuardedChannel(HTTPChannel):
    """An ``HTTPChannel`` that bounds request heads and asks ``admit`` before reading a body."""

    limits: HTTPLimits = HTTPLimits()
    admit: Admit | None = None
    #: ``on_refused(status, outcome)`` for the metrics of refusals made here
    on_refused: Callable[[int, str], None] | None = None

    _log = Logger()
    _deadline: IDelayedCall | None = None
    _linger: IDelayedCall | None = None
    _awaiting_request_line = True
    _awaiting_headers = True
    _head_bytes = 0
    _head_count = 0
    _discarding = False
    _lost = False

    def configure(self, limits: HTTPLimits) -> None:
        """Apply *limits* to Twisted's own line and header bounds (ours fire first)."""
        self.limits = limits
        # Long enough for the longest allowed line of either kind; the exact
        # bounds are checked per line in lineReceived.
        self.MAX_LENGTH = max(limits.max_uri_bytes + 64, limits.max_header_bytes)
        self.totalHeadersSize = limits.max_uri_bytes + limits.max_header_bytes + 1024
        self.maxHeaders = limits.max_headers + 1

    @property
    def _tcp(self) -> Any:
        """The transport, as the TCP transport (pause, resume, half-close, abort) it is."""
        return self.transport

    # -- connection life ------------------------------------------------------

    def connectionMade(self) -> None:
        super().connectionMade()
        self._start_deadline()

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self._lost = True
        self._stop_deadline()
        if self._linger is not None and self._linger.active():
            self._linger.cancel()
        self._linger = None
        super().connectionLost(reason)

    def dataReceived(self, data: bytes) -> None:
        if self._discarding:
            return
        if self._awaiting_headers and not self._handlingRequest and data:
            self._start_deadline()
        super().dataReceived(data)

    def rawDataReceived(self, data: bytes) -> None:
        if self._discarding:
            return
        super().rawDataReceived(data)

    # -- the request head -----------------------------------------------------

    def lineReceived(self, line: bytes) -> None:
        if self._discarding:
            return
        limits = self.limits
        if self._awaiting_request_line:
            if line:
                self._awaiting_request_line = False
                parts = line.split(b" ")
                uri = parts[1] if len(parts) == 3 else line
                if len(uri) > limits.max_uri_bytes:
                    self.refuse(
                        414, "too_large", f"request URI longer than {limits.max_uri_bytes} bytes"
                    )
                    return
        elif line:
            self._head_bytes += len(line) + 2
            if self._head_bytes > limits.max_header_bytes:
                self.refuse(
                    431, "too_large", f"request headers larger than {limits.max_header_bytes} bytes"
                )
                return
            if line[:1] not in (b" ", b"\t"):
                self._head_count += 1
                if self._head_count > limits.max_headers:
                    self.refuse(431, "too_large", f"more than {limits.max_headers} request headers")
                    return
        super().lineReceived(line)

    def lineLengthExceeded(self, line: bytes) -> None:
        if self._awaiting_request_line:
            self.refuse(
                414, "too_large", f"request URI longer than {self.limits.max_uri_bytes} bytes"
            )
        else:
            self.refuse(
                431,
                "too_large",
                f"request headers larger than {self.limits.max_header_bytes} bytes",
            )

    def headerReceived(self, line: bytes) -> bool:
        name, sep, value = line.partition(b":")
        if sep and name.lower() == b"content-length":
            value = value.strip(b" \t")
            if not value.isdigit():
                self.refuse(400, "bad_request", "malformed Content-Length: expected a number")
                return False
            if len(value) > _MAX_LENGTH_DIGITS:
                self.refuse(413, "too_large", "Content-Length is larger than any body accepted")
                return False
        return bool(super().headerReceived(line))

    def _respondToBadRequestAndDisconnect(self) -> None:
        self.refuse(400, "bad_request", "malformed request line or headers")

    def timeoutHeaders(self) -> None:
        """The client took longer than ``header_timeout`` to send a request head."""
        self._deadline = None
        self.refuse(
            408,
            "timeout",
            f"request headers not complete within {self.limits.header_timeout:g} seconds",
        )

    def _start_deadline(self) -> None:
        if self._deadline is None and self.limits.header_timeout > 0:
            self._deadline = self.callLater(self.limits.header_timeout, self.timeoutHeaders)

    def _stop_deadline(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    # -- the body, or not -----------------------------------------------------

    def allHeadersReceived(self) -> None:
        self._stop_deadline()
        self._awaiting_headers = False
        request = self.requests[-1]
        request.parseCookies()
        self.persistent = self.checkPersistence(request, self._version)
        if self.length == 0:
            self._read_body(request)
            return
        if self.admit is None:
            self._admitted(None, request)
            return
        # What Request.requestReceived would set, so that admit (and a
        # refusal's log line) can see where the request goes.
        request.method, request.uri, request.clientproto = self._command, self._path, self._version
        request.path = self._path.split(b"?", 1)[0]
        # Stop reading while admit runs: what is buffered already stays in
        # LineReceiver's buffer (paused), the rest in the kernel's.
        self.paused = True
        self._tcp.pauseProducing()
        d = maybeDeferred(self.admit, request)
        d.addCallbacks(
            self._admitted, self._admit_failed, callbackArgs=(request,), errbackArgs=(request,)
        )

    def _admitted(self, refusal: bytes | None, request: Request) -> None:
        if self._lost:
            return
        if refusal is not None:
            self._answer(request, refusal)
            return
        bound = getattr(request, "body_bound", None)
        limit = bound() if bound is not None else None
        if limit is not None and (
            (self.length is not None and self.length > limit)
            or (self.length is None and limit == 0)
        ):
            self.refuse(413, "too_large", "Request body too large")
            return
        self._read_body(request)
        if self.paused:
            self.paused = False
            self._tcp.resumeProducing()
            self.dataReceived(b"")  # what arrived with the headers (a no-op when called inside)

    def _admit_failed(self, failure: Failure, request: Request) -> None:
        self._log.failure("deciding whether to read a request body failed", failure)
        if not self._lost:
            self.refuse(500, "error", "internal server error")

    def _read_body(self, request: Request) -> None:
        request.gotLength(self.length)
        expect = request.requestHeaders.getRawHeaders(b"expect")
        if expect and expect[0].lower() == b"100-continue" and self._version == b"HTTP/1.1":
            self._send100Continue()

    def allContentReceived(self) -> None:
        if self._discarding:
            return  # the body ended after the request was refused: nothing to serve
        self._awaiting_request_line = self._awaiting_headers = True
        self._head_bytes = self._head_count = 0
        super().allContentReceived()

    # -- refusals ---------------------------------------------------------------

    def _answer(self, request: Request, body: bytes) -> None:
        """Send the refusal ``admit`` set up on *request*, then close without reading on."""
        self._discard()
        request.setHeader(b"Connection", b"close")
        request.setHeader(b"Content-Length", b"%d" % len(body))
        request.write(body)
        request.finish()  # -> requestDone -> loseConnection, as it is not persistent

    def refuse(self, status: int, outcome: str, message: str) -> None:
        """Answer *status* with *message* outside any resource, and close the connection."""
        if self._discarding or self._lost:
            return
        self._discard()
        body = message.encode("utf-8") + b"\n"
        reason = HTTPStatus(status).phrase.encode("ascii")  # Twisted's table lacks 431
        self._tcp.write(
            b"HTTP/1.1 %d %s\r\nContent-Type: text/plain; charset=utf-8\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (status, reason, len(body), body)
        )
        if self.on_refused is not None:
            self.on_refused(status, outcome)
        self.loseConnection()

    def _discard(self) -> None:
        self._discarding = True
        self.persistent = False
        self._stop_deadline()
        self._buffer = b""
        self.paused = False

    def loseConnection(self) -> None:
        if not self._discarding:
            super().loseConnection()
            return
        cast(Any, self._networkProducer).unregisterProducer()
        half_close = getattr(self.transport, "loseWriteConnection", None)
        if half_close is None:
            self._tcp.loseConnection()
            return
        # Send the answer and EOF, but keep reading (and discarding) for a
        # while: the client is likely still sending the body we refused.
        half_close()
        self._tcp.resumeProducing()
        if self._linger is None:
            self._linger = self.callLater(LINGER_SECONDS, self._end_linger)

    def _end_linger(self) -> None:
        self._linger = None
        self._tcp.abortConnection()


class GuardedSite(Site):
    """A ``Site`` whose connections are ``GuardedChannel``s with these limits and gate."""

    protocol = GuardedChannel  # type: ignore[assignment]

    def __init__(
        self,
        resource: Any,
        *,
        limits: HTTPLimits,
        admit: Admit | None = None,
        on_refused: Callable[[int, str], None] | None = None,
        **kwargs: Any,
    ):
        super().__init__(resource, **kwargs)
        self.limits = limits
        self.admit = admit
        self.on_refused = on_refused

    def buildProtocol(self, addr: Any) -> Any:
        channel = super().buildProtocol(addr)
        channel.configure(self.limits)
        channel.admit = self.admit
        channel.on_refused = self.on_refused
        return channel
