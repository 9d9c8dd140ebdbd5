"""GuardedChannel and GuardedSite over a StringTransport and a Clock: heads bounded, bodies gated.

A tiny resource stands in for the app: it answers ``200`` with the body it
read, so a test sees whether a body reached a resource at all.  ``admit`` is
a test double that records what it was asked and answers when told.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
import pytest
from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs
from twisted.web.resource import Resource

from gitstratum.frontend.http import spooling_request_factory
from gitstratum.frontend.http_guard import (
    LINGER_SECONDS,
    GuardedSite,
    HTTPLimits,
    JSONTooDeep,
    check_json_depth,
    declared_length,
)

SMALL = HTTPLimits(max_uri_bytes=100, max_header_bytes=500, max_headers=5, header_timeout=10.0)
PUSH = b"/o/r.git/git-receive-pack"


class Echo(Resource):
    """Answers 200 with the body it was given, so tests see whether a body arrived."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.bodies: list[bytes] = []

    def render(self, request: Any) -> bytes:
        body = request.content.read() if request.content is not None else b""
        self.bodies.append(body)
        return b"got " + str(len(body)).encode()


class HalfClosingTransport(StringTransport):
    """A StringTransport that can shut its write side, as a TCP transport can."""

    write_closed = False
    aborted = False

    def loseWriteConnection(self) -> None:
        self.write_closed = True

    def abortConnection(self) -> None:
        self.aborted = True


@attrs.define
class Gate:
    """An ``admit`` double: records each request and answers with the next prepared value."""

    asked: list[Any] = attrs.field(factory=list)
    pending: list[Deferred[bytes | None]] = attrs.field(factory=list)
    answer: Any = None
    synchronous: bool = True

    def __call__(self, request: Any) -> Any:
        self.asked.append((request.method, request.path, declared_length(request)))
        if self.synchronous:
            if callable(self.answer):
                return self.answer(request)
            return self.answer
        d: Deferred[bytes | None] = Deferred()
        self.pending.append(d)
        return d


@attrs.define
class Conn:
    """One guarded connection to a site over a half-closing StringTransport."""

    site: GuardedSite
    clock: Clock
    transport: HalfClosingTransport
    channel: Any
    echo: Echo
    refused: list[tuple[int, str]]

    def send(self, data: bytes) -> None:
        self.channel.dataReceived(data)

    @property
    def out(self) -> bytes:
        return bytes(self.transport.value())

    @property
    def status(self) -> int | None:
        out = self.out
        if not out.startswith(b"HTTP/1.1 "):
            return None
        return int(out[9:12])

    @property
    def closing(self) -> bool:
        return self.transport.write_closed or self.transport.disconnecting


def connect(
    tmp_path: Path,
    limits: HTTPLimits = SMALL,
    gate: Gate | None = None,
    *,
    max_body: int = 1000,
    max_api_body: int = 100,
) -> Conn:
    echo = Echo()
    refused: list[tuple[int, str]] = []
    site = GuardedSite(
        echo,
        limits=limits,
        admit=gate,
        on_refused=lambda status, outcome: refused.append((status, outcome)),
        requestFactory=spooling_request_factory(
            max_body, str(tmp_path), max_request_body=50, max_api_body=max_api_body
        ),
    )
    clock = Clock()
    site.reactor = clock
    channel = site.buildProtocol(None)
    transport = HalfClosingTransport()
    channel.makeConnection(transport)
    return Conn(site, clock, transport, channel, echo, refused)


def post(path: bytes = PUSH, *headers: bytes, length: int | None = None) -> bytes:
    lines = [b"POST " + path + b" HTTP/1.1", b"Host: t", b"Authorization: Basic eDp5", *headers]
    if length is not None:
        lines.append(b"Content-Length: %d" % length)
    return b"\r\n".join(lines) + b"\r\n\r\n"


# -- the request head -----------------------------------------------------------------------


def test_defaults_are_the_documented_ones() -> None:
    """The defaults the options and docs promise."""
    limits = HTTPLimits()
    assert (limits.max_uri_bytes, limits.max_header_bytes, limits.max_headers) == (
        8192,
        65536,
        100,
    )
    assert limits.header_timeout == 30.0
    assert (limits.api_max_body_bytes, limits.api_max_json_depth) == (1 << 20, 32)


def test_a_uri_at_the_limit_is_served_and_one_byte_more_is_414(tmp_path: Path) -> None:
    """max_uri_bytes counts the URI: at the limit it is served, past it 414 and a close."""
    uri = b"/" + b"a" * (SMALL.max_uri_bytes - 1)
    ok = connect(tmp_path)
    ok.send(b"GET " + uri + b" HTTP/1.1\r\nHost: t\r\n\r\n")
    assert ok.status == 200
    long = connect(tmp_path)
    long.send(b"GET " + uri + b"a HTTP/1.1\r\nHost: t\r\n\r\n")
    assert long.status == 414
    assert b"request URI longer than 100 bytes" in long.out
    assert b"Connection: close" in long.out
    assert long.closing
    assert long.echo.bodies == []
    assert long.refused == [(414, "too_large")]


def test_a_request_line_that_never_ends_is_414(tmp_path: Path) -> None:
    """A request line with no CRLF is cut at the line bound with 414, not buffered on."""
    c = connect(tmp_path)
    c.send(b"GET /" + b"a" * 20_000)
    assert c.status == 414
    assert c.closing
    assert len(c.channel._buffer) == 0


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        (b"X-A: 1\r\n" * 6, b"more than 5 request headers"),
        (b"X-Big: " + b"b" * 600 + b"\r\n", b"request headers larger than 500 bytes"),
        ((b"X-Mid: " + b"m" * 100 + b"\r\n") * 4 + b"X-M: " + b"m" * 100 + b"\r\n", b"larger"),
        (b"X-Endless: " + b"e" * 20_000, b"request headers larger than 500 bytes"),
    ],
    ids=["count", "one-large", "large-together", "endless"],
)
def test_too_many_or_too_large_headers_are_431(
    tmp_path: Path, headers: bytes, message: bytes
) -> None:
    """Past max_headers fields or max_header_bytes of them, the answer is 431 and a close."""
    c = connect(tmp_path)
    c.send(b"GET / HTTP/1.1\r\n" + headers + b"\r\n")
    assert c.out.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n")
    assert message in c.out
    assert c.closing
    assert c.echo.bodies == []


def test_headers_at_the_limits_are_served(tmp_path: Path) -> None:
    """Exactly max_headers fields, within max_header_bytes, are served."""
    c = connect(tmp_path)
    c.send(b"GET / HTTP/1.1\r\n" + b"X-A: 1\r\n" * 5 + b"\r\n")
    assert c.status == 200


@pytest.mark.parametrize(
    ("head", "status", "message"),
    [
        (b"Content-Length: -1", 400, b"malformed Content-Length"),
        (b"Content-Length: abc", 400, b"malformed Content-Length"),
        (b"Content-Length: 0x10", 400, b"malformed Content-Length"),
        (b"Content-Length: 1 2", 400, b"malformed Content-Length"),
        (b"Content-Length: \xd9\xa3", 400, b"malformed Content-Length"),  # an Arabic-Indic 3
        (b"Content-Length: 9999999999999999999", 413, b"larger than any body"),
        (b"Content-Length: " + b"9" * 400, 413, b"larger than any body"),
        (b"Content-Length: 5\r\nContent-Length: 5", 400, b"malformed request"),
        (b"Content-Length: 5\r\nTransfer-Encoding: chunked", 400, b"malformed request"),
        (b"Transfer-Encoding: gzip", 400, b"malformed request"),
    ],
)
def test_every_content_length_gets_a_clear_4xx(
    tmp_path: Path, head: bytes, status: int, message: bytes
) -> None:
    """Malformed, negative, non-ASCII and huge lengths are 400 or 413 with a reason, and a close."""
    c = connect(tmp_path)
    c.send(b"POST / HTTP/1.1\r\nHost: t\r\n" + head + b"\r\n\r\n")
    assert c.status == status
    assert message in c.out
    assert c.closing


def test_a_malformed_request_line_is_400_with_a_reason(tmp_path: Path) -> None:
    """Twisted's bare 400 gains a body saying what was wrong, and the connection closes."""
    c = connect(tmp_path)
    c.send(b"NONSENSE\r\n\r\n")
    assert c.status == 400
    assert b"malformed request line or headers" in c.out
    assert c.closing


# -- the header deadline ---------------------------------------------------------------------


def test_headers_that_trickle_past_the_deadline_get_408(tmp_path: Path) -> None:
    """A byte a second resets the idle timer but not the header deadline: 408 at header_timeout."""
    c = connect(tmp_path)
    c.send(b"GET / HTTP/1.1\r\nX-Slow: ")
    for _ in range(9):
        c.clock.advance(1)
        c.send(b"a")
    assert c.out == b""
    c.clock.advance(1)
    assert c.status == 408
    assert b"not complete within 10 seconds" in c.out
    assert c.closing
    assert c.refused == [(408, "timeout")]


def test_an_idle_new_connection_is_cut_at_the_deadline(tmp_path: Path) -> None:
    """A connection that sends nothing at all is also answered 408 at header_timeout."""
    c = connect(tmp_path)
    c.clock.advance(SMALL.header_timeout)
    assert c.status == 408


def test_the_deadline_stops_at_the_end_of_the_headers(tmp_path: Path) -> None:
    """Headers in time: the deadline is gone, and a keep-alive connection's next request gets a fresh one."""
    c = connect(tmp_path)
    c.clock.advance(9)
    c.send(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
    assert c.status == 200
    c.transport.clear()
    c.clock.advance(50)  # idle between requests: the idle timeout's business, not ours
    assert c.out == b""
    c.send(b"GET / HT")  # the next request starts: its own 10 seconds
    c.clock.advance(9)
    c.send(b"TP/1.1\r\n\r\n")
    assert c.status == 200
    c.transport.clear()
    c.send(b"GET / HT")
    c.clock.advance(10)
    assert c.status == 408


def test_a_zero_header_timeout_is_not_a_deadline() -> None:
    """The options refuse a timeout <= 0; the channel treats 0 as none rather than instant."""
    from gitstratum.frontend.http_guard import GuardedChannel

    channel = GuardedChannel()
    channel.configure(HTTPLimits(header_timeout=0))
    channel.callLater = Clock().callLater
    channel._start_deadline()
    assert channel._deadline is None


# -- the gate before the body -----------------------------------------------------------------


def test_admit_is_asked_with_the_head_and_nothing_of_the_body_is_read_until_it_answers(
    tmp_path: Path,
) -> None:
    """The transport pauses while admit decides; the body that came with the head waits."""
    gate = Gate(synchronous=False)
    c = connect(tmp_path, gate=gate)
    c.send(post(length=10) + b"0123456789")
    assert gate.asked == [(b"POST", PUSH, 10)]
    assert c.transport.producerState == "paused"
    request = c.channel.requests[-1]
    assert request.content is None  # not even a spool file yet
    gate.pending[0].callback(None)
    assert c.transport.producerState == "producing"
    assert c.echo.bodies == [b"0123456789"]
    assert c.status == 200


def test_a_refusal_is_answered_before_the_body_and_the_body_is_never_stored(
    tmp_path: Path,
) -> None:
    """admit's refusal goes out at once with Connection: close; what follows is discarded."""

    def refuse(request: Any) -> bytes:
        request.setResponseCode(401)
        request.setHeader(b"WWW-Authenticate", b'Basic realm="x"')
        return b"Invalid username or token.\n"

    gate = Gate(answer=refuse)
    c = connect(tmp_path, gate=gate)
    c.send(post(length=1 << 30))
    assert c.status == 401
    assert b"Connection: close" in c.out
    assert b'WWW-Authenticate: Basic realm="x"' in c.out
    assert c.out.endswith(b"\r\n\r\nInvalid username or token.\n")
    assert c.transport.write_closed and not c.transport.disconnecting
    written = len(c.out)
    c.send(b"x" * 100_000)  # the client goes on sending: read and thrown away
    c.send(b"GET / HTTP/1.1\r\n\r\n")  # nor is anything after it a new request
    assert len(c.out) == written
    assert c.echo.bodies == []
    assert not c.transport.aborted
    c.clock.advance(LINGER_SECONDS)
    assert c.transport.aborted


def test_a_refusal_after_an_asynchronous_decision_discards_what_was_buffered(
    tmp_path: Path,
) -> None:
    """Body bytes held while admit ran are dropped when it refuses, not fed to a request."""
    gate = Gate(synchronous=False)
    c = connect(tmp_path, gate=gate)
    c.send(post(length=10) + b"01234")

    request = c.channel.requests[-1]
    request.setResponseCode(404)
    gate.pending[0].callback(b"Repository not found.\n")
    assert c.status == 404
    c.send(b"56789")
    assert c.echo.bodies == []
    assert c.channel.requests == []


def test_a_connection_lost_while_admit_runs_is_left_alone(tmp_path: Path) -> None:
    """admit answering after the client left writes nothing and raises nothing."""
    gate = Gate(synchronous=False)
    c = connect(tmp_path, gate=gate)
    c.send(post(length=10))
    c.channel.connectionLost(None)
    gate.pending[0].callback(None)
    assert c.out == b""


def test_admit_failing_is_a_logged_500(tmp_path: Path) -> None:
    """A store error while deciding is a 500 (logged), and the body is not read."""
    gate = Gate(answer=lambda request: fail(RuntimeError("store down")))
    c = connect(tmp_path, gate=gate)
    with capturedLogs() as events:
        c.send(post(length=10) + b"0123456789")
    assert c.status == 500
    assert c.echo.bodies == []
    assert any("log_failure" in e for e in events)


def test_requests_without_a_body_are_not_gated(tmp_path: Path) -> None:
    """A GET (no length, no chunks) goes straight to the resource, which decides as before."""
    gate = Gate(answer=b"never\n")
    c = connect(tmp_path, gate=gate)
    c.send(b"GET /o/r.git/info/refs?service=git-upload-pack HTTP/1.1\r\nHost: t\r\n\r\n")
    assert gate.asked == []
    assert c.status == 200


def test_100_continue_is_sent_only_once_admitted(tmp_path: Path) -> None:
    """A client waiting on Expect: 100-continue is told to send only after admit agrees."""
    gate = Gate(synchronous=False)
    c = connect(tmp_path, gate=gate)
    c.send(post(PUSH, b"Expect: 100-continue", length=3))
    assert c.out == b""
    gate.pending[0].callback(None)
    assert c.out.startswith(b"HTTP/1.1 100 Continue")
    refused = connect(tmp_path, gate=Gate(answer=b"no\n"))
    refused.send(post(PUSH, b"Expect: 100-continue", length=3))
    assert b"100 Continue" not in refused.out


@pytest.mark.parametrize(
    ("path", "length", "status"),
    [
        (PUSH, 1000, 200),
        (PUSH, 1001, 413),
        (b"/o/r.git/git-upload-pack", 51, 413),
        (b"/api/v1/repos", 101, 413),
        (b"/healthz", 1, 413),
    ],
)
def test_a_declared_length_over_the_endpoint_bound_is_413_before_the_body(
    tmp_path: Path, path: bytes, length: int, status: int
) -> None:
    """Admitted or not, a Content-Length over what the endpoint may bring is 413 at once."""
    c = connect(tmp_path, gate=Gate())
    c.send(post(path, length=length))
    if status == 413:
        assert c.status == 413
        assert c.refused == [(413, "too_large")]
    else:
        assert c.status is None  # waiting for the body
        c.send(b"x" * length)
        assert c.status == 200


def test_a_chunked_body_is_refused_the_moment_it_passes_the_bound(tmp_path: Path) -> None:
    """An endless chunked push gets 413 as soon as it passes max_body; the rest is discarded."""
    c = connect(tmp_path, gate=Gate(), max_body=100)
    c.send(post(PUSH, b"Transfer-Encoding: chunked"))
    c.send(b"40\r\n" + b"y" * 64 + b"\r\n")
    assert c.status is None
    c.send(b"40\r\n" + b"y" * 64 + b"\r\n")
    assert c.status == 413
    c.send(b"40\r\n" + b"y" * 64 + b"\r\n0\r\n\r\n")
    assert c.echo.bodies == []


def test_a_chunked_body_to_a_route_that_takes_none_is_413_at_once(tmp_path: Path) -> None:
    """Where the bound is 0, a chunked body is refused from the head alone."""
    c = connect(tmp_path, gate=Gate())
    c.send(post(b"/healthz", b"Transfer-Encoding: chunked"))
    assert c.status == 413


# -- JSON depth --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "deep"),
    [
        ("[" * 3 + "]" * 3, False),
        ("[" * 4 + "]" * 4, True),
        ('{"a": {"b": {"c": 1}}}', False),
        ('{"a": {"b": {"c": {}}}}', True),
        ('["[[[[[[[[[[", "{{{{{{{"]', False),
        ('["\\"[[[[[[[[", 1]', False),
        ('["\\\\", [[[1]]]]', True),
        ("[" * 100_000, True),
        ('"[[[[[[' + "[" * 10, True),  # unterminated string: counted, and not JSON anyway
    ],
)
def test_json_depth_is_measured_outside_strings(text: str, deep: bool) -> None:
    """Brackets in strings (escaped quotes included) do not count; past the limit raises."""
    if deep:
        with pytest.raises(JSONTooDeep, match="nested more than 3 levels"):
            check_json_depth(text, 3)
    else:
        check_json_depth(text, 3)


def test_declared_length_reads_only_plain_digits() -> None:
    """declared_length: digits as an int; anything else (or nothing) as undeclared."""

    class R:
        def __init__(self, value: bytes | None) -> None:
            self.value = value

        def getHeader(self, name: bytes) -> bytes | None:
            return self.value

    assert declared_length(R(b" 12 ")) == 12
    for value in (None, b"-1", b"abc", b"9" * 19):
        assert declared_length(R(value)) is None


# -- the options -------------------------------------------------------------------------------


def test_the_standalone_options_give_the_http_limits() -> None:
    """Each --http-*/--api-* option sets its HTTPLimits field; unset ones keep the defaults."""
    from gitstratum.standalone.tap import Options, _http_limits

    options = Options()
    options.parseOptions([])
    assert _http_limits(options) == HTTPLimits()
    options = Options()
    options.parseOptions(
        [
            "--http-max-uri-bytes=1",
            "--http-max-header-bytes=2",
            "--http-max-headers=3",
            "--http-header-timeout=4.5",
            "--api-max-body-bytes=6",
            "--api-max-json-depth=7",
        ]
    )
    assert _http_limits(options) == HTTPLimits(1, 2, 3, 4.5, 6, 7)


@pytest.mark.parametrize(
    "option",
    [
        "--http-max-uri-bytes=0",
        "--http-max-header-bytes=-1",
        "--http-max-headers=0",
        "--http-header-timeout=0",
        "--api-max-body-bytes=0",
        "--api-max-json-depth=0",
    ],
)
def test_impossible_http_limits_are_usage_errors(option: str) -> None:
    """A limit of zero or less is refused when the options are parsed, naming the option."""
    from twisted.python.usage import UsageError

    from gitstratum.standalone.tap import Options

    with pytest.raises(UsageError, match=option.split("=")[0]):
        Options().parseOptions([option])
