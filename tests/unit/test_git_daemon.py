"""The git:// daemon (gitstratum.frontend.git_daemon): request parsing, refusals, timeout, hand-over.

Connections are driven through ``StringTransport`` with a ``Clock``, on real
LMDB stores holding an imported repository twice (one public, one private).
Most tests run a recording protocol in place of the git engine; the last
ones run the real ``GitStreamProtocol``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
from twisted.internet.error import ConnectionLost
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from gitstratum.core.limits import Limits
from gitstratum.core.pktline import FLUSH_PKT, PktLineDecoder, Special, pkt_line
from gitstratum.frontend.git_daemon import (
    DaemonRequest,
    DaemonRequestError,
    GitDaemonProtocol,
    daemon_repo,
    make_git_daemon_factory,
    parse_daemon_request,
)
from gitstratum.frontend.metrics import Metrics
from gitstratum.frontend.stream import GitBackend
from gitstratum.protocol.ingest import PushProcessor
from gitstratum.protocol.upload_service import UploadPackService
from gitstratum.storage.lmdb_metadata import LMDBMetadataStore
from gitstratum.storage.lmdb_objects import LMDBObjectStore
from gitstratum.testing.fixtures import git, import_git_repo, make_small_repo
from gitstratum.testing.streams import RecordingRunner, RecordingStream, recording_stream_factory

PRIVATE = "alice/proj"
PUBLIC = "alice/open"


def request(line: bytes) -> bytes:
    return pkt_line(line)


def upload(path: bytes = b"/alice/open.git", *extra: bytes, host: bytes = b"example.com") -> bytes:
    """The first pkt-line git sends for git://HOST/path, with optional extra parameters."""
    payload = b"git-upload-pack " + path + b"\0host=" + host + b"\0"
    if extra:
        payload += b"\0" + b"".join(e + b"\0" for e in extra)
    return pkt_line(payload)


# -- parsing -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (
            b"git-upload-pack /alice/open.git\0host=example.com\0",
            DaemonRequest("upload-pack", "/alice/open.git", "example.com"),
        ),
        (
            b"git-upload-pack /alice/open.git\0host=Example.COM:9418\0\0version=2\0",
            DaemonRequest("upload-pack", "/alice/open.git", "example.com", (b"version=2",)),
        ),
        (
            b"git-upload-pack /x/y\0host=[::1]:9418\0\0version=2\0object-format=sha1\0",
            DaemonRequest("upload-pack", "/x/y", "[::1]", (b"version=2", b"object-format=sha1")),
        ),
        (b"git-upload-pack /x/y\n", DaemonRequest("upload-pack", "/x/y")),
        (b"git-upload-pack /x/y\0", DaemonRequest("upload-pack", "/x/y")),
        (
            b"git-receive-pack /alice/open.git\0host=h\0",
            DaemonRequest("receive-pack", "/alice/open.git", "h"),
        ),
        (b"git-upload-archive /x/y\0host=h\0", DaemonRequest("upload-archive", "/x/y", "h")),
    ],
)
def test_requests_git_sends_are_parsed(payload: bytes, expected: DaemonRequest) -> None:
    """Service, path, host (lower-cased, port dropped) and extra parameters are read as git sends them."""
    assert parse_daemon_request(payload) == expected


def test_extra_parameters_become_the_git_protocol_value() -> None:
    """Extra parameters are joined with ':' as git daemon does for GIT_PROTOCOL."""
    parsed = parse_daemon_request(b"git-upload-pack /x/y\0host=h\0\0version=2\0a=b\0")
    assert parsed.git_protocol == b"version=2:a=b"
    assert parse_daemon_request(b"git-upload-pack /x/y\0host=h\0").git_protocol == b""


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"", "expected 'git-<service> <path>'"),
        (b"upload-pack /x/y\0", "expected 'git-<service> <path>'"),
        (b"git-upload-pack\0host=h\0", "expected 'git-<service> <path>'"),
        (b"git-upload-pack \0host=h\0", "expected 'git-<service> <path>'"),
        (b"git-frobnicate /x/y\0", "unknown service 'git-frobnicate'"),
        (b"git-upload-pack /x/y\0host=a/b\0", "invalid host"),
        (b"git-upload-pack /x/y\0host=a b\0", "invalid host"),
        (b"git-upload-pack /x/y\0host=\0", "invalid host"),
        (
            b"git-upload-pack /x/y\0host=h:99999\0",
            r"invalid host port \(99999 is not between 0 and 65535\)",
        ),
    ],
)
def test_malformed_requests_are_refused(payload: bytes, message: str) -> None:
    """A first line that is not a daemon request raises with a protocol-error message."""
    with pytest.raises(DaemonRequestError, match=message):
        parse_daemon_request(payload)


@pytest.mark.parametrize(
    ("path", "repo"),
    [
        ("/alice/open.git", "alice/open"),
        ("/alice/open", "alice/open"),
        ("alice/open.git", None),
        ("/~alice/open", None),
        ("/alice/../open", None),
        ("/../alice/open", None),
        ("/alice/open/..", None),
        ("/alice\\open", None),
        ("/alice/open\0", None),
        ("/alice", None),
        ("/alice/open/extra", None),
        ("//alice/open", None),
        ("/alice/open.git.git", None),
    ],
)
def test_only_owner_name_paths_name_a_repository(path: str, repo: str | None) -> None:
    """Only /OWNER/NAME[.git] names a repository: no ~user, traversal, NUL or backslash."""
    assert daemon_repo(path) == repo


# -- connections ---------------------------------------------------------------------------


@attrs.define
class Daemon:
    metadata: LMDBMetadataStore
    backend: GitBackend
    runner: RecordingRunner
    clock: Clock
    streams: list[RecordingStream] = attrs.field(factory=list)

    def connect(
        self, *, real_git: bool = False, **kwargs: Any
    ) -> tuple[GitDaemonProtocol, StringTransport]:
        if not real_git:
            kwargs.setdefault("stream_factory", recording_stream_factory(self.streams))
        factory = make_git_daemon_factory(self.backend, self.metadata, clock=self.clock, **kwargs)
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        return protocol, transport


@pytest.fixture(scope="module")
def source_repo(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_small_repo(str(tmp_path_factory.mktemp("src") / "small.git"))


@pytest.fixture
def daemon(tmp_path: Path, source_repo: str) -> Iterator[Daemon]:
    metadata = LMDBMetadataStore(str(tmp_path / "meta"))
    objects = LMDBObjectStore(str(tmp_path / "objects"))
    for name, public in ((PRIVATE, False), (PUBLIC, True)):
        import_git_repo(
            source_repo, metadata, objects, metadata.create_repository(name, public=public)
        )
    limits = Limits()
    runner = RecordingRunner()
    clock = Clock()
    backend = GitBackend(
        metadata=metadata,
        upload=UploadPackService(metadata, objects, limits),
        push=PushProcessor(metadata, objects, limits),
        run=runner,
        limits=limits,
        metrics=Metrics(),
        spool_dir=str(tmp_path),
        clock=clock.seconds,
    )
    yield Daemon(metadata, backend, runner, clock)
    metadata.close()
    objects.close()


def _err(transport: StringTransport) -> bytes:
    """The single ERR packet sent, after checking it is all that was sent and the line is closed."""
    decoder = PktLineDecoder()
    decoder.receive_data(transport.value())
    (packet,) = list(decoder.events())
    assert not isinstance(packet, Special)
    assert packet.data.startswith(b"ERR ") and packet.data.endswith(b"\n")
    assert transport.disconnecting
    return packet.data[4:-1]


def test_a_public_repository_is_handed_to_the_stream(daemon: Daemon) -> None:
    """upload-pack of a public repository starts the stream: anonymous, v0, its greeting sent."""
    protocol, transport = daemon.connect()
    protocol.dataReceived(upload())
    (stream,) = daemon.streams
    assert (stream.service, stream.repo.name, stream.user, stream.version) == (
        "upload-pack",
        PUBLIC,
        "-",
        0,
    )
    assert transport.value() == b"hello - upload-pack alice/open v0\n"
    assert not transport.disconnecting
    assert daemon.clock.getDelayedCalls() == []


@pytest.mark.parametrize(
    ("extra", "version"), [((b"version=2",), 2), ((b"version=1",), 0), ((b"foo=bar",), 0)]
)
def test_version_2_comes_from_the_extra_parameters(
    daemon: Daemon, extra: tuple[bytes, ...], version: int
) -> None:
    """``\\0version=2\\0`` after the host selects protocol v2; other extras do not."""
    protocol, _ = daemon.connect()
    protocol.dataReceived(upload(b"/alice/open", *extra))
    assert daemon.streams[0].version == version


def test_the_request_may_arrive_in_pieces(daemon: Daemon) -> None:
    """The first pkt-line is reassembled from any number of reads."""
    protocol, _ = daemon.connect()
    for byte in upload():
        protocol.dataReceived(bytes([byte]))
    assert len(daemon.streams) == 1


def test_bytes_after_the_request_reach_the_stream(daemon: Daemon) -> None:
    """Data that follows the request in the same read, or later, goes to the stream in order."""
    protocol, _ = daemon.connect()
    protocol.dataReceived(upload() + b"0000")
    protocol.dataReceived(b"more")
    protocol.readConnectionLost()
    (stream,) = daemon.streams
    assert bytes(stream.received) == b"0000more" and stream.eof


def test_reading_pauses_while_the_repository_is_looked_up(daemon: Daemon) -> None:
    """During the lookup the transport is paused; early data and EOF are delivered afterwards."""
    daemon.runner.hold = True
    protocol, transport = daemon.connect()
    protocol.dataReceived(upload() + b"early")
    assert transport.producerState == "paused"
    protocol.dataReceived(b"+late")
    protocol.readConnectionLost()
    assert daemon.streams == []
    daemon.runner.release()
    (stream,) = daemon.streams
    assert bytes(stream.received) == b"early+late" and stream.eof
    assert transport.producerState == "producing"


@pytest.mark.parametrize(
    "path", [b"/alice/proj.git", b"/alice/missing.git", b"/nobody/open", b"/alice/proj"]
)
def test_private_or_unknown_repositories_are_not_exported(daemon: Daemon, path: bytes) -> None:
    """A private or missing repository gets git daemon's "access denied or repository not exported"."""
    protocol, transport = daemon.connect()
    protocol.dataReceived(upload(path))
    assert _err(transport) == b"access denied or repository not exported: " + path
    assert daemon.streams == []


@pytest.mark.parametrize(
    "path",
    [b"/alice/../alice/open.git", b"/~alice/open", b"/alice/open/../../x", b"alice/open.git"],
)
def test_hostile_paths_are_refused_before_any_lookup(daemon: Daemon, path: bytes) -> None:
    """Traversal and ~user paths get the same refusal, and the store is never asked."""
    protocol, transport = daemon.connect()
    protocol.dataReceived(upload(path))
    assert _err(transport) == b"access denied or repository not exported: " + path
    assert daemon.runner.calls == []


@pytest.mark.parametrize("service", [b"git-receive-pack", b"git-upload-archive"])
def test_push_and_archive_are_not_enabled(daemon: Daemon, service: bytes) -> None:
    """A push (or archive) over git:// is refused with "service not enabled", before any lookup."""
    protocol, transport = daemon.connect()
    protocol.dataReceived(pkt_line(service + b" /alice/open.git\0host=h\0"))
    assert _err(transport) == b"service not enabled: /alice/open.git"
    assert daemon.runner.calls == [] and daemon.streams == []


def test_refusals_are_counted_in_metrics(daemon: Daemon) -> None:
    """Refused pushes and unexported reads appear in gitstratum_requests_total."""
    p1, _ = daemon.connect()
    p1.dataReceived(pkt_line(b"git-receive-pack /alice/open.git\0host=h\0"))
    p2, _ = daemon.connect()
    p2.dataReceived(upload(b"/alice/proj.git"))
    registry = daemon.backend.metrics.registry
    sample = "gitstratum_requests_total"
    base = {"repo_class": "none"}
    assert (
        registry.get_sample_value(sample, {**base, "service": "receive-pack", "outcome": "denied"})
        == 1
    )
    assert (
        registry.get_sample_value(
            sample, {**base, "service": "upload-pack", "outcome": "not_found"}
        )
        == 1
    )


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"zzzz", b"protocol error: bad line length character: zzzz"),
        (b"fff1" + b"x" * 10, b"protocol error: bad line length 65521"),
        (b"0003", b"protocol error: bad line length 3"),
        (FLUSH_PKT, b"protocol error: expected a git-upload-pack request"),
        (pkt_line(b"hello world"), b"protocol error: expected 'git-<service> <path>'"),
        (pkt_line(b"git-upload-pack /x/y\0host=a/b\0"), b"protocol error: invalid host 'a/b'"),
    ],
)
def test_garbage_first_lines_get_an_err_and_the_connection_closes(
    daemon: Daemon, data: bytes, message: bytes
) -> None:
    """Whatever the first bytes are, the answer is one ERR line and a closed connection."""
    protocol, transport = daemon.connect()
    protocol.dataReceived(data)
    assert _err(transport) == message
    protocol.dataReceived(b"ignored afterwards")
    assert daemon.streams == []


def test_an_oversized_first_line_is_refused_without_waiting_for_it(daemon: Daemon) -> None:
    """A length prefix beyond a pkt-line's maximum is refused at once, not buffered."""
    protocol, transport = daemon.connect()
    protocol.dataReceived(b"ffff")
    assert _err(transport) == b"protocol error: bad line length 65535"


def test_a_silent_client_is_dropped_at_the_timeout(daemon: Daemon) -> None:
    """No request within 30 s (or the configured time) closes the connection."""
    _, transport = daemon.connect()
    daemon.clock.advance(29.9)
    assert not transport.disconnecting
    daemon.clock.advance(0.1)
    assert transport.disconnecting and transport.value() == b""
    _, transport = daemon.connect(request_timeout=2.0)
    daemon.clock.advance(2)
    assert transport.disconnecting


def test_a_request_trickling_in_too_slowly_is_dropped(daemon: Daemon) -> None:
    """Part of a request does not reset the deadline: the whole line must arrive in time."""
    protocol, transport = daemon.connect()
    line = upload()
    protocol.dataReceived(line[:10])
    daemon.clock.advance(20)
    protocol.dataReceived(line[10:20])
    daemon.clock.advance(10)
    assert transport.disconnecting and daemon.streams == []


def test_a_client_that_closes_before_its_request_is_hung_up_on(daemon: Daemon) -> None:
    """EOF before a whole request closes the connection and cancels the timer."""
    protocol, transport = daemon.connect()
    protocol.dataReceived(b"00")
    protocol.readConnectionLost()
    assert transport.disconnecting and daemon.clock.getDelayedCalls() == []


def test_the_stream_ending_closes_the_connection(daemon: Daemon) -> None:
    """When the stream calls on_done, the daemon closes the TCP connection."""
    protocol, transport = daemon.connect()
    protocol.dataReceived(upload())
    assert not transport.disconnecting
    daemon.streams[0].on_done(0)
    assert transport.disconnecting


def test_a_lost_connection_reaches_the_stream(daemon: Daemon) -> None:
    """connectionLost is passed on to the stream with its reason."""
    protocol, _ = daemon.connect()
    protocol.dataReceived(upload())
    protocol.connectionLost(Failure(ConnectionLost()))
    (stream,) = daemon.streams
    assert stream.lost is not None and stream.lost.check(ConnectionLost)


def test_a_lookup_answered_after_the_client_left_starts_nothing(daemon: Daemon) -> None:
    """If the connection is gone when the repository is found, no stream is started."""
    daemon.runner.hold = True
    protocol, _ = daemon.connect()
    protocol.dataReceived(upload())
    protocol.connectionLost(Failure(ConnectionLost()))
    daemon.runner.release()
    assert daemon.streams == []


# -- the real git engine -------------------------------------------------------------------


def _packets(data: bytes) -> list[bytes | Special]:
    decoder = PktLineDecoder()
    decoder.receive_data(data)
    return [e if isinstance(e, Special) else e.data for e in decoder.events()]


def test_real_stream_lists_refs_over_git_protocol_v2(daemon: Daemon, source_repo: str) -> None:
    """With version=2 the real engine advertises v2 and answers ls-refs with the repository's refs."""
    protocol, transport = daemon.connect(real_git=True)
    protocol.dataReceived(upload(b"/alice/open.git", b"version=2"))
    assert _packets(transport.value())[0] == b"version 2\n"
    transport.clear()
    protocol.dataReceived(pkt_line(b"command=ls-refs\n") + FLUSH_PKT)
    names = {
        p.split(b" ")[1].rstrip(b"\n") for p in _packets(transport.value()) if isinstance(p, bytes)
    }
    out = git("for-each-ref", "--format=%(refname)", cwd=source_repo)
    assert names == set(out.split()) | {b"HEAD"}
    protocol.dataReceived(FLUSH_PKT)
    assert transport.disconnecting


def test_real_stream_v0_advertises_refs(daemon: Daemon, source_repo: str) -> None:
    """Without extra parameters the real engine sends git's v0 ref advertisement first."""
    protocol, transport = daemon.connect(real_git=True)
    protocol.dataReceived(upload(b"/alice/open"))
    packets = _packets(transport.value())
    head = git("rev-parse", "HEAD", cwd=source_repo).strip()
    first = packets[0]
    assert isinstance(first, bytes) and first.startswith(head + b" HEAD\0")
    assert packets[-1] is Special.FLUSH
    protocol.dataReceived(FLUSH_PKT)
    assert transport.disconnecting
