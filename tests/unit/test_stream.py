"""Git over a byte stream: GitStreamProtocol driven by hand and by the real git client.

The first part drives the protocol with ``StringTransport`` and the inline
runner over real LMDB stores, and holds its stateful v0 negotiation to what
``git upload-pack`` itself answers to the same transcript.  The last part runs
the real ``git`` with ``--upload-pack``/``--receive-pack`` pointing at a small
script that ties the protocol to its stdin and stdout on a real reactor, so
clone, fetch, shallow fetch and push go through it end to end.
"""

from __future__ import annotations

import inspect
import itertools
import json
import os
import random
import subprocess
import sys
import textwrap
import zlib
from collections.abc import Iterator
from typing import Any

import attrs
import pytest
from twisted.internet.error import ConnectionLost
from twisted.internet.interfaces import IHalfCloseableProtocol, IProtocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs
from twisted.python.failure import Failure
from zope.interface.verify import verifyClass, verifyObject

import gitstratum
from gitstratum.core.limits import Limits
from gitstratum.core.oid import ZERO_OID, ObjectID
from gitstratum.core.pktline import DELIM_PKT, FLUSH_PKT, pkt_line, pkt_lines
from gitstratum.frontend.metrics import Metrics
from gitstratum.frontend.stream import (
    PACK_TOO_LARGE,
    GitBackend,
    GitStreamProtocol,
    parse_git_protocol_env,
)
from gitstratum.frontend.threads import BlockingRunner, inline_runner
from gitstratum.protocol import receive_pack
from gitstratum.protocol.ingest import PushProcessor
from gitstratum.protocol.upload_pack import (
    MultiAck,
    UploadPackError,
    V0Negotiation,
    capability_advertisement,
    parse_have_round,
)
from gitstratum.protocol.upload_service import ABORT_MESSAGE, UploadPackService
from gitstratum.storage.interfaces import Repository
from gitstratum.storage.lmdb_metadata import LMDBMetadataStore
from gitstratum.storage.lmdb_objects import LMDBObjectStore
from gitstratum.testing.fixtures import GIT_ENV, git, import_git_repo, make_small_repo
from gitstratum.testing.streams import RecordingRunner, RecordingStream, recording_stream_factory
from gitstratum.testing.wire import Response, read_response

AGENT = b"agent=git/2.39.5"


# -- the world: a repository in git and the same history in LMDB ----------------------


@attrs.define
class World:
    base: str
    src: str
    metadata: LMDBMetadataStore
    objects: LMDBObjectStore
    repo: Repository
    names: Iterator[int] = attrs.field(factory=itertools.count)

    def rev(self, name: str) -> ObjectID:
        return ObjectID(git("rev-parse", name, cwd=self.src).strip())

    def new_repo(self) -> Repository:
        return self.metadata.create_repository(f"o/push-{next(self.names)}")

    def backend(
        self, limits: Limits, run: BlockingRunner, spool_dir: str, clock: Clock | None = None
    ) -> GitBackend:
        ticks = itertools.count()
        return GitBackend(
            call_later=(clock or Clock()).callLater,
            metadata=self.metadata,
            upload=UploadPackService(self.metadata, self.objects, limits),
            push=PushProcessor(self.metadata, self.objects, limits),
            run=run,
            limits=limits,
            metrics=Metrics(),
            spool_dir=spool_dir,
            clock=lambda: float(next(ticks)),
        )


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    base = str(tmp_path_factory.mktemp("stream"))
    src = make_small_repo(os.path.join(base, "src.git"), commits=8)
    metadata = LMDBMetadataStore(os.path.join(base, "metadata"))
    objects = LMDBObjectStore(os.path.join(base, "objects"))
    repo = metadata.create_repository("o/r")
    import_git_repo(src, metadata, objects, repo)
    yield World(base, src, metadata, objects, repo)
    metadata.close()
    objects.close()


@attrs.define
class Session:
    """A protocol on a StringTransport, with what it reported through on_done."""

    protocol: GitStreamProtocol
    transport: StringTransport
    backend: GitBackend
    spool_dir: str
    statuses: list[int]

    def send(self, *chunks: bytes) -> None:
        for chunk in chunks:
            self.protocol.dataReceived(chunk)

    def take(self) -> bytes:
        out = self.transport.value()
        self.transport.clear()
        return out

    @property
    def status(self) -> int | None:
        assert len(self.statuses) <= 1, "on_done was called more than once"
        return self.statuses[0] if self.statuses else None

    def requests(self, **labels: str) -> float:
        value = self.backend.metrics.registry.get_sample_value("gitstratum_requests_total", labels)
        return value or 0.0

    def spooled(self) -> list[str]:
        """Spool files still open: unlinked at once, so they are found through /proc/self/fd."""
        return open_files_under(self.spool_dir)


def open_files_under(directory: str) -> list[str]:
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue  # the descriptor os.listdir itself used
        if target.startswith(directory + os.sep):
            found.append(target)
    return found


@pytest.fixture
def connect(world, tmp_path):
    def make(
        service: str = "upload-pack",
        *,
        version: int = 0,
        repo: Repository | None = None,
        limits: Limits | None = None,
        run: BlockingRunner = inline_runner,
        transport: StringTransport | None = None,
        clock: Clock | None = None,
    ) -> Session:
        spool_dir = tmp_path / "spool"
        spool_dir.mkdir(exist_ok=True)
        backend = world.backend(limits or Limits(), run, str(spool_dir), clock)
        statuses: list[int] = []
        protocol = GitStreamProtocol(
            backend,
            service=service,
            repo=repo or world.repo,
            user="tester",
            version=version,
            on_done=statuses.append,
        )
        transport = transport or StringTransport()
        protocol.makeConnection(transport)
        return Session(protocol, transport, backend, str(spool_dir), statuses)

    return make


# -- reading what the server sent ---------------------------------------------------------


Reply = Response
read = read_response


def after_advertisement(data: bytes) -> Reply:
    """What followed the advertisement (everything after its first flush)."""
    end = 0
    while data[end : end + 4] != FLUSH_PKT:
        end += int(data[end : end + 4], 16)
    return read(data[end + 4 :])


def pack_ids(pack: bytes, where: str) -> set[bytes]:
    """The ids in *pack*, as ``git index-pack`` finds them (which also verifies it)."""
    git("init", "-q", "--bare", where)
    name = git("index-pack", "--stdin", "--fix-thin", cwd=where, input=pack).split()[-1]
    idx = os.path.join(where, "objects", "pack", f"pack-{name.decode()}.idx")
    with open(idx, "rb") as f:
        listing = git("show-index", input=f.read())
    return {line.split()[1] for line in listing.splitlines()}


def git_upload_pack(src: str, transcript: bytes, version: int = 0) -> bytes:
    """What the real, stateful ``git upload-pack`` writes for a client that sends *transcript*."""
    env = {**os.environ, **GIT_ENV}
    if version == 2:
        env["GIT_PROTOCOL"] = "version=2"
    proc = subprocess.run(
        ["git", "upload-pack", src], input=transcript, capture_output=True, env=env, timeout=60
    )
    return proc.stdout


def chunks_of(data: bytes, seed: int) -> list[bytes]:
    """*data* cut at seeded random points, some one byte apart."""
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, 40)))
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]


def wants_section(*wants: bytes, caps: bytes, lines: tuple[bytes, ...] = ()) -> bytes:
    first = b"want " + wants[0] + b" " + caps + b"\n"
    return pkt_lines(first, *(b"want " + w + b"\n" for w in wants[1:]), *lines) + FLUSH_PKT


def have_round(*haves: bytes, end: bytes = FLUSH_PKT) -> bytes:
    return pkt_lines(*(b"have " + h + b"\n" for h in haves)) + end


DONE = pkt_line(b"done\n")
UNKNOWN = [bytes([c]) * 40 for c in b"abcdef"]


def v2_command(command: str, *args: str | bytes) -> bytes:
    return (
        pkt_lines(f"command={command}\n", AGENT + b"\n", "object-format=sha1\n")
        + DELIM_PKT
        + pkt_lines(*args)
        + FLUSH_PKT
    )


# -- GIT_PROTOCOL --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "version"),
    [
        (b"version=2", 2),
        (b"version=1", 0),
        (b"", 0),
        (b"foo=bar:version=2", 2),
        (b"version=1:version=2", 2),
        (b"version=20", 0),
        (b"xversion=2", 0),
        (b"version=2 ", 0),
    ],
)
def test_parse_git_protocol_env(value, version):
    """version=2 anywhere in the colon-separated list selects v2; anything else is v0."""
    assert parse_git_protocol_env(value) == version


# -- the stateful pieces of the engine ------------------------------------------------------


@attrs.define
class Oracle:
    """A HaveOracle over a fixed set of commits the server has."""

    known: set[bytes]
    ready_after: int = 99
    have_objs: list[bytes] = attrs.field(factory=list)

    def got_oid(self, oid: ObjectID) -> int:
        if oid not in self.known:
            return -1
        if oid in self.have_objs:
            return 0
        self.have_objs.append(oid)
        return 1

    def ok_to_give_up(self) -> bool:
        return len(self.have_objs) >= self.ready_after

    @property
    def have_count(self) -> int:
        return len(self.have_objs)


def test_v0_negotiation_carries_state_across_rounds():
    """Rounds of one connection share the last common have, which done's ACK names, as in git."""
    b, c = UNKNOWN[0], UNKNOWN[1]
    oracle = Oracle(known={b})
    negotiation = V0Negotiation(MultiAck.MULTI_ACK)
    assert negotiation.round([b], False, oracle) == (
        pkt_lines(b"ACK %s continue\n" % b, "NAK\n"),
        False,
    )
    assert negotiation.round([c], False, oracle) == (pkt_line("NAK\n"), False)
    assert negotiation.round([], True, oracle) == (pkt_line(b"ACK %s\n" % b), True)
    plain = V0Negotiation(MultiAck.NONE)
    fresh = Oracle(known={b, c})
    # Without multi_ack only the first common have is ever ACKed, whatever round it came in.
    assert plain.round([b], False, fresh) == (pkt_line(b"ACK %s\n" % b), False)
    assert plain.round([c], False, fresh) == (b"", False)


def test_parse_have_round():
    """A round is have lines up to a flush, or up to done; anything else is git's error."""
    a, b = UNKNOWN[0], UNKNOWN[1]
    limits = Limits()
    assert parse_have_round(have_round(a, b), limits) == ((a, b), False)
    assert parse_have_round(have_round(a, end=DONE), limits) == ((a,), True)
    assert parse_have_round(DONE, limits) == ((), True)
    with pytest.raises(UploadPackError, match="expected SHA1 list, got 'want"):
        parse_have_round(pkt_line(b"want " + a + b"\n") + FLUSH_PKT, limits)
    with pytest.raises(UploadPackError, match="expected a flush or done after the haves"):
        parse_have_round(pkt_line(b"have " + a + b"\n"), limits)
    with pytest.raises(UploadPackError, match="too many haves"):
        parse_have_round(have_round(a, b), Limits(max_haves=1))


# -- the stand-ins for the engine and the pool in the adapters' tests ----------------------


def test_recording_stream_takes_the_engines_place():
    """RecordingStream provides GitStreamProtocol's interfaces and takes the same arguments."""
    assert verifyClass(IProtocol, GitStreamProtocol)
    assert verifyClass(IHalfCloseableProtocol, GitStreamProtocol)
    stream = RecordingStream(
        None, service="upload-pack", repo=Repository(1, "o/r"), user="-", version=0, on_done=print
    )
    assert verifyObject(IProtocol, stream)
    assert verifyObject(IHalfCloseableProtocol, stream)

    def parameters(cls: type) -> list[tuple[str, Any]]:
        return [(p.name, p.kind) for p in inspect.signature(cls).parameters.values()]

    assert parameters(RecordingStream) == parameters(GitStreamProtocol)


def test_recording_stream_greets_and_records_what_it_is_given():
    """The stand-in says what it was handed, keeps the bytes, the half-close and the loss."""
    streams: list[RecordingStream] = []
    build = recording_stream_factory(streams)
    stream = build(
        None,
        service="receive-pack",
        repo=Repository(1, "o/r"),
        user="bob",
        version=0,
        on_done=print,
    )
    assert streams == [stream]
    transport = StringTransport()
    stream.makeConnection(transport)
    assert transport.value() == b"hello bob receive-pack o/r v0\n"
    stream.dataReceived(b"ab")
    stream.dataReceived(b"c")
    stream.readConnectionLost()
    stream.connectionLost(Failure(ConnectionLost()))
    assert bytes(stream.received) == b"abc" and stream.eof
    assert stream.lost is not None and stream.lost.check(ConnectionLost)


def test_recording_runner_holds_calls_until_released():
    """Inline unless held; held calls run oldest first, errors reach their Deferred, all recorded."""
    runner = RecordingRunner()
    results: list[Any] = []
    runner(len, b"abc").addCallback(results.append)
    assert results == [3]

    def queue_another() -> str:
        runner(len, b"xy").addCallback(results.append)
        return "queued"

    def fail() -> None:
        raise ValueError("no")

    runner.hold = True
    runner(queue_another).addCallback(results.append)
    runner(fail).addErrback(lambda f: results.append(f.type))
    assert results == [3] and runner.waiting() == ["queue_another", "fail"]
    runner.release_one()
    assert results == [3, "queued"] and runner.waiting() == ["fail", "len"]
    runner.release()
    assert results == [3, "queued", ValueError, 2] and runner.pending == []
    assert runner.calls == ["len", "queue_another", "fail", "len"]


# -- upload-pack v2 ---------------------------------------------------------------------------


IDLE = Limits(stream_idle_timeout=30.0)


def elapse(clock: Clock, seconds: float) -> None:
    """Let *seconds* pass in half-second steps, as a reactor would, so that timers re-armed
    on the way run at their own times (one ``advance`` would run each only once)."""
    clock.pump([0.5] * round(seconds * 2))


def test_a_silent_client_is_dropped_at_the_idle_timeout(connect):
    """No byte from the client for stream_idle_timeout seconds: ERR "timeout" and status 128."""
    clock = Clock()
    session = connect(version=2, limits=IDLE, clock=clock)
    session.take()  # the advertisement
    elapse(clock, 29)
    assert session.status is None
    elapse(clock, 1)
    assert session.status == 128
    assert b"ERR timeout: nothing received for 30 s" in session.take()
    assert session.requests(service="upload-pack", repo_class="private", outcome="timeout") == 1
    assert not clock.getDelayedCalls()  # the timer went with the session


def test_the_stream_timeout_is_not_the_http_one(connect):
    """Streams follow stream_idle_timeout whatever idle_timeout (HTTP's) says; 0 turns it off."""
    clock = Clock()
    session = connect(
        version=2, limits=Limits(idle_timeout=5.0, stream_idle_timeout=0), clock=clock
    )
    elapse(clock, 1000)
    assert session.status is None and not clock.getDelayedCalls()


def test_a_client_that_keeps_talking_is_not_idle(world, connect):
    """Bytes arriving within each timeout keep the session open."""
    clock = Clock()
    session = connect(version=2, limits=IDLE, clock=clock)
    for _ in range(8):
        elapse(clock, 29)
        session.send(v2_command("ls-refs"))
    assert session.status is None


def test_server_work_in_the_pool_is_not_idleness(world, connect):
    """A blocking step that outlasts the idle timeout (a big push, a long plan) is waited for."""
    clock = Clock()
    runner = RecordingRunner(hold=True)
    session = connect(version=2, limits=IDLE, clock=clock, run=runner)
    session.send(v2_command("ls-refs"))
    elapse(clock, 100)  # the ls-refs step is still "running"
    assert session.status is None
    runner.release()
    assert b"refs/heads/main" in session.take()
    elapse(clock, 29)  # the answer just went out: the client's time starts now
    assert session.status is None
    elapse(clock, 30 / 4 + 1)  # dropped within a quarter of the timeout past it
    assert session.status == 128


def test_a_client_stalling_mid_negotiation_is_dropped(world, connect):
    """v0: wants sent, then half a have line and nothing more: ERR timeout, 128, no pack."""
    clock = Clock()
    s = connect(limits=IDLE, clock=clock)
    s.take()
    s.send(wants_section(world.rev("main"), caps=b"multi_ack_detailed side-band-64k"))
    s.take()
    s.send(have_round(*UNKNOWN[:2])[:30])
    elapse(clock, 29)
    assert s.status is None
    elapse(clock, 30 / 4 + 1)  # within a quarter of the timeout past it
    assert s.status == 128
    assert read(s.take()).lines == [b"ERR timeout: nothing received for 30 s"]


def test_v2_session_answers_commands_until_a_lone_flush(world, connect):
    """v2: the capability advertisement first, each command answered as the service would, then 0."""
    s = connect(version=2)
    assert s.take() == capability_advertisement()
    ls_refs = v2_command("ls-refs", "symrefs\n", "peel\n", "ref-prefix refs/heads/\n")
    s.send(ls_refs)
    upload = s.backend.upload
    assert s.take() == b"".join(upload.serve(world.repo, ls_refs, version=2))
    fetch = v2_command("fetch", "ofs-delta\n", b"want " + world.rev("main") + b"\n", "done\n")
    s.send(fetch)
    # Streamed through the producer, and nothing after it.
    assert s.take() == b"".join(upload.serve(world.repo, fetch, version=2))
    assert s.transport.producer is None and s.status is None
    s.send(FLUSH_PKT)
    assert s.status == 0 and s.take() == b""
    assert s.requests(service="upload-pack", repo_class="private", outcome="ok") == 1


def test_v2_commands_sent_together_are_answered_in_order(world, connect):
    """Commands in one chunk, or cut anywhere, get the same answers in order."""
    commands = [
        v2_command("ls-refs", "ref-prefix HEAD\n"),
        v2_command("fetch", b"want " + world.rev("feature") + b"\n", "done\n"),
        v2_command("ls-refs", "peel\n"),
    ]
    upload = connect(version=2).backend.upload
    expected = b"".join(b"".join(upload.serve(world.repo, c, version=2)) for c in commands)
    for seed in (None, 1, 2):
        s = connect(version=2)
        s.take()
        data = b"".join(commands) + FLUSH_PKT
        s.send(*([data] if seed is None else chunks_of(data, seed)))
        assert s.take() == expected and s.status == 0


def test_v2_end_of_input_between_commands_is_a_clean_end(world, connect):
    """A v2 client may just close after its last command: status 0, as git's serve loop exits."""
    s = connect(version=2)
    s.send(v2_command("ls-refs"))
    s.protocol.readConnectionLost()
    assert s.status == 0


def test_v2_end_of_input_inside_a_command_is_an_error(world, connect):
    """Input that stops part-way through a command ends the session with 128."""
    s = connect(version=2)
    s.take()
    s.send(pkt_line(b"command=ls-refs\n"))
    s.protocol.readConnectionLost()
    assert s.status == 128 and s.take() == b""
    assert s.requests(service="upload-pack", repo_class="private", outcome="disconnected") == 1


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (v2_command("frobnicate"), b"ERR unknown command 'frobnicate'"),
        (
            v2_command("fetch", b"want " + b"1" * 40 + b"\n", "done\n"),
            b"ERR upload-pack: not our ref " + b"1" * 40,
        ),
        (b"zzzz", b"ERR protocol error: bad line length character: zzzz"),
    ],
)
def test_v2_client_mistake_is_err_and_128(connect, data, message):
    """A bad command gets one ERR packet and ends the session with 128; nothing else is read."""
    s = connect(version=2)
    s.take()
    s.send(data, v2_command("ls-refs"))
    assert read(s.take()).lines == [message]
    assert s.status == 128
    assert s.requests(service="upload-pack", repo_class="private", outcome="bad_request") == 1


def test_v2_request_larger_than_the_limit_is_refused(connect):
    """A command that never ends cannot grow the buffer past max_request_bytes."""
    s = connect(version=2, limits=Limits(max_request_bytes=1000))
    s.take()
    s.send(pkt_line(b"command=ls-refs\n") + DELIM_PKT)
    for _ in range(40):
        s.send(pkt_line(b"ref-prefix refs/heads/\n"))
    assert s.status == 128
    assert read(s.take()).lines == [b"ERR protocol error: request exceeds 1000 bytes"]


# -- upload-pack v0/v1, stateful ------------------------------------------------------------


def test_v0_advertisement_is_gits_stateful_one(world, connect):
    """The v0 refs and capabilities match git's (agent aside); no no-done, as git over ssh."""
    s = connect()
    ours = read(s.take()).lines
    theirs = read(git_upload_pack(world.src, FLUSH_PKT)).lines

    def split(lines):
        first, _, caps = lines[0].partition(b"\0")
        return [first, *lines[1:]], set(caps.split()) - {c for c in caps.split() if b"agent" in c}

    our_refs, our_caps = split(ours)
    their_refs, their_caps = split(theirs)
    assert our_refs == their_refs
    assert b"no-done" not in our_caps and b"no-done" not in their_caps
    assert b"multi_ack_detailed" in our_caps and b"side-band-64k" in our_caps


def _negotiations(world: World) -> dict[str, tuple[bytes, bytes]]:
    main, feature = world.rev("main"), world.rev("feature")
    detailed = b"multi_ack_detailed side-band-64k ofs-delta " + AGENT
    return {
        # Two rounds of nothing in common, then common commits, then done.
        "detailed": (
            wants_section(main, feature, caps=detailed),
            have_round(*UNKNOWN[:3])
            + have_round(UNKNOWN[3])
            + have_round(world.rev("main~3"), UNKNOWN[4], world.rev("main~4"))
            + have_round(UNKNOWN[5])
            + DONE,
        ),
        "multi_ack": (
            wants_section(main, caps=b"multi_ack side-band ofs-delta"),
            have_round(UNKNOWN[0], world.rev("main~2"))
            + have_round(UNKNOWN[1], world.rev("main~5"))
            + DONE,
        ),
        "plain": (
            wants_section(main, caps=b"ofs-delta"),
            have_round(*UNKNOWN[:2]) + have_round(world.rev("main~2"), world.rev("main~3")) + DONE,
        ),
        "nothing in common": (
            wants_section(feature, caps=detailed),
            have_round(*UNKNOWN[:4]) + DONE,
        ),
        "no-done": (
            wants_section(main, caps=detailed + b" no-done"),
            have_round(UNKNOWN[0]) + have_round(world.rev("main~1")),
        ),
        "deepen": (
            wants_section(main, caps=detailed, lines=(b"deepen 2\n",)),
            have_round(world.rev("main~5")) + DONE,
        ),
        "shallow client": (
            wants_section(
                main,
                caps=detailed + b" shallow",
                lines=(b"shallow " + world.rev("main~4") + b"\n", b"deepen 6\n"),
            ),
            have_round(world.rev("main~4")) + DONE,
        ),
    }


def _replay(
    world: World,
    connect,
    tmp_path,
    case: str,
    *,
    deepening: bool = False,
    ready_may_differ: bool = False,
) -> None:
    """Send a case's transcript to git and to us (whole, then cut up) and compare the answers.

    With *deepening*, our pack may leave out what the haves below the new
    shallow boundary already hold, which git sends anyway: the client has
    those objects, so the smaller pack is complete for it.  With
    *ready_may_differ* our extra "ACK ready" lines are not compared (see
    the xfail below).
    """
    wants, rounds = _negotiations(world)[case]
    transcript = wants + rounds
    theirs = after_advertisement(git_upload_pack(world.src, transcript))
    assert theirs.pack, "git sent no pack: the transcript is wrong"
    for i, chunks in enumerate([[transcript], chunks_of(transcript, seed=len(case))]):
        s = connect()
        s.send(*chunks)
        ours = after_advertisement(s.take())
        ours_ids = pack_ids(ours.pack, str(tmp_path / f"ours{i}"))
        theirs_ids = pack_ids(theirs.pack, str(tmp_path / f"theirs{i}"))
        assert s.status == 0
        if ready_may_differ:
            assert [x for x in ours.lines if not x.endswith(b" ready")] == theirs.lines
        else:
            assert ours.lines == theirs.lines
        if deepening:
            assert ours_ids and ours_ids <= theirs_ids
        else:
            assert ours_ids == theirs_ids


@pytest.mark.parametrize("case", ["detailed", "multi_ack", "plain", "nothing in common", "no-done"])
def test_v0_stateful_negotiation_matches_git(world, connect, tmp_path, case):
    """Every answer of a multi-round v0 negotiation is git's, and the packs hold the same objects.

    The client's whole side is sent at once (git reads it as it goes), and
    again cut at random points, to hold the buffering between rounds.
    """
    _replay(world, connect, tmp_path, case)


def test_v0_deepening_negotiation_matches_git(world, connect, tmp_path):
    """Deepening with a have below the new boundary: exactly git's shallow list and ACKs.

    The new boundary commits have no parents for negotiation (git registers
    them shallow before it reads haves), so no "ACK ready" comes early.
    """
    _replay(world, connect, tmp_path, "deepen", deepening=True)


def test_v0_shallow_client_negotiation_matches_git_but_for_ready(world, connect, tmp_path):
    """A shallow client deepening past its boundary: git's shallow and unshallow lines and ACKs."""
    _replay(world, connect, tmp_path, "shallow client", deepening=True, ready_may_differ=True)


@pytest.mark.xfail(
    strict=True,
    reason="when the client sends as a have the commit it unshallows, we say 'ACK ready' "
    "where git 2.39 answers NAK; the pack is still complete",
)
def test_v0_shallow_client_negotiation_says_ready_like_git(world, connect, tmp_path):
    """Exactly git's lines when a shallow client deepens and has the commit it unshallows."""
    _replay(world, connect, tmp_path, "shallow client", deepening=True)


def test_v0_rounds_are_answered_one_at_a_time(world, connect):
    """Each round is answered when it ends, before the next arrives; the pack only after done."""
    s = connect()
    s.take()
    caps = b"multi_ack_detailed side-band-64k ofs-delta"
    s.send(wants_section(world.rev("main"), caps=caps))
    assert s.take() == b""
    s.send(have_round(UNKNOWN[0]))
    assert read(s.take()).lines == [b"NAK"]
    s.send(have_round(world.rev("main~1")))
    common = b"ACK " + world.rev("main~1")
    assert read(s.take()).lines == [common + b" common", common + b" ready", b"NAK"]
    assert s.status is None
    s.send(DONE)
    reply = read(s.take())
    assert reply.lines == [common, FLUSH_PKT] and reply.pack.startswith(b"PACK")
    assert b"Enumerating objects" in reply.progress and s.status == 0


def test_v0_client_up_to_date_sends_only_a_flush(connect):
    """An empty want list (ls-remote, or nothing to fetch) ends the session with 0 and no output."""
    s = connect()
    s.take()
    s.send(FLUSH_PKT)
    assert s.status == 0 and s.take() == b""


def test_v0_end_of_input_after_the_advertisement_is_clean(connect):
    """A client that only read the refs and closed ends the session with 0."""
    s = connect()
    s.protocol.readConnectionLost()
    assert s.status == 0


def test_v0_end_of_input_during_negotiation_is_128(world, connect):
    """The client hanging up between have rounds is git's "hung up unexpectedly": 128."""
    s = connect()
    s.send(wants_section(world.rev("main"), caps=b"multi_ack_detailed"), have_round(UNKNOWN[0]))
    s.protocol.connectionLost(Failure(ConnectionError("gone")))
    assert s.status == 128


@pytest.mark.parametrize(
    ("client", "message"),
    [
        (
            lambda w: wants_section(b"1" * 40, caps=b"ofs-delta"),
            b"ERR upload-pack: not our ref " + b"1" * 40,
        ),
        (
            lambda w: wants_section(w.rev("main"), caps=b"ofs-delta") + pkt_line(b"hello\n"),
            b"ERR git upload-pack: expected SHA1 list, got 'hello'",
        ),
        (
            lambda w: wants_section(w.rev("main"), caps=b"ofs-delta") + have_round(b"xyz"),
            b"ERR git upload-pack: expected SHA1 object, got 'xyz'",
        ),
        (
            lambda w: pkt_line(b"want nonsense\n") + FLUSH_PKT,
            b"ERR git upload-pack: protocol error, expected to get object ID, not 'want nonsense'",
        ),
    ],
)
def test_v0_client_mistake_is_err_and_128(world, connect, client, message):
    """A bad want or have line gets git's wording in one ERR packet, and status 128."""
    s = connect()
    s.take()
    s.send(client(world) + DONE)
    assert read(s.take()).lines == [message] and s.status == 128


def test_v0_haves_are_bounded_across_rounds(world, connect):
    """max_haves bounds the whole negotiation of a connection, not just one round."""
    s = connect(limits=Limits(max_haves=3))
    s.take()
    s.send(wants_section(world.rev("main"), caps=b"multi_ack_detailed"))
    s.send(have_round(*UNKNOWN[:2]))
    assert read(s.take()).lines == [b"NAK"]
    s.send(have_round(*UNKNOWN[2:4]))
    assert read(s.take()).lines == [b"ERR upload-pack: too many haves (the limit is 3)"]
    assert s.status == 128


def test_v0_input_sent_far_ahead_is_refused(world, connect):
    """While a step runs, the unread input is bounded too."""
    s = connect(run=RecordingRunner(hold=True), limits=Limits(max_request_bytes=500))
    for _ in range(10):
        s.send(have_round(*UNKNOWN))
    assert s.status == 128 and b"bytes sent ahead" in s.take()


# -- the pack stream and the transport -----------------------------------------------------


class PausingTransport(StringTransport):
    """A transport whose buffer is full after the first write of a pack chunk."""

    def __init__(self) -> None:
        super().__init__()
        self.pause_next = False

    def write(self, data: bytes) -> None:
        super().write(data)
        if self.pause_next and self.producer is not None:
            self.pause_next = False
            self.producer.pauseProducing()


def test_a_paused_transport_pauses_pack_generation(world, connect):
    """The pack comes from a producer on the transport: while it is paused, nothing is pulled."""
    transport = PausingTransport()
    s = connect(transport=transport)
    s.take()
    s.send(wants_section(world.rev("main"), caps=b"side-band-64k ofs-delta"))
    transport.pause_next = True
    s.send(DONE)
    producer = transport.producer
    assert producer is not None and transport.streaming
    partial = s.take()
    assert partial and s.status is None
    producer.resumeProducing()
    reply = read(partial + s.take())
    assert reply.pack.startswith(b"PACK") and s.status == 0
    assert transport.producer is None


def test_losing_the_connection_mid_pack_stops_the_stream(world, connect):
    """stopProducing from the transport ends the session with 128, once; no more is written."""
    transport = PausingTransport()
    s = connect(transport=transport)
    s.take()
    s.send(wants_section(world.rev("main"), caps=b"side-band-64k ofs-delta"))
    transport.pause_next = True
    s.send(DONE)
    producer = transport.producer
    assert producer is not None
    producer.stopProducing()  # what a TCP transport does as it goes away
    s.protocol.connectionLost(Failure(ConnectionError("gone")))
    assert s.status == 128
    assert s.requests(service="upload-pack", repo_class="private", outcome="disconnected") == 1


@pytest.mark.parametrize("version", [0, 2])
def test_hanging_up_once_the_last_byte_is_out_is_a_clean_end(world, connect, version):
    """git closes as soon as it has the pack's last byte, maybe before our last pull returns: 0."""
    runner = RecordingRunner(hold=True)
    s = connect(run=runner, version=version)
    if version == 2:
        request = v2_command("fetch", b"want " + world.rev("main") + b"\n", "done\n")
    else:
        request = wants_section(world.rev("main"), caps=b"side-band-64k") + DONE
    runner.release()
    s.take()
    s.send(request)
    while not s.transport.value().endswith(FLUSH_PKT):
        runner.release_one()
    assert runner.pending  # the pull that would find the end is still out
    s.protocol.connectionLost(Failure(ConnectionError("closed by the client")))
    runner.release()
    assert s.status == 0
    assert s.requests(service="upload-pack", repo_class="private", outcome="ok") == 1


def test_a_store_failure_mid_pack_is_band_three_and_128(tmp_path):
    """A pack that cannot be finished ends with git's abort message on band 3 and status 128."""
    src = make_small_repo(str(tmp_path / "broken.git"), commits=2, branches=False, tags=False)
    metadata = LMDBMetadataStore(str(tmp_path / "m"))
    objects = LMDBObjectStore(str(tmp_path / "o"))
    try:
        repo = metadata.create_repository("o/broken")
        import_git_repo(src, metadata, objects, repo)
        objects.delete_many([ObjectID(git("rev-parse", "HEAD:README.md", cwd=src).strip())])
        broken = World(str(tmp_path), src, metadata, objects, repo)
        backend = broken.backend(Limits(), inline_runner, str(tmp_path))
        statuses: list[int] = []
        protocol = GitStreamProtocol(
            backend, service="upload-pack", repo=repo, user="-", version=0, on_done=statuses.append
        )
        transport = StringTransport()
        protocol.makeConnection(transport)
        with capturedLogs() as events:
            protocol.dataReceived(
                wants_section(broken.rev("HEAD"), caps=b"side-band-64k ofs-delta") + DONE
            )
        assert after_advertisement(transport.value()).fatal == ABORT_MESSAGE + b"\n"
        assert statuses == [128]
        assert any(e.get("log_failure") is not None for e in events)
        outcome = {"service": "upload-pack", "repo_class": "private", "outcome": "error"}
        assert backend.metrics.registry.get_sample_value("gitstratum_requests_total", outcome) == 1
    finally:
        metadata.close()
        objects.close()


def test_one_log_line_per_session(world, connect):
    """Each session logs one structured request line with its bytes, outcome and exit status."""
    with capturedLogs() as events:
        s = connect()
        sent = len(s.take())
        s.send(FLUSH_PKT)
    lines = [e for e in events if e.get("service") == "upload-pack"]
    assert len(lines) == 1
    line = lines[0]
    assert line["repo"] == "o/r" and line["user"] == "tester"
    assert line["outcome"] == "ok" and line["status"] == 0 and line["nbytes"] == sent
    assert line["seconds"] == 1.0  # the injected clock ticked once: start, end


def test_unknown_service_is_refused():
    """Only upload-pack and receive-pack can be served."""
    with pytest.raises(ValueError, match="unknown git service"):
        GitStreamProtocol(
            None,  # type: ignore[arg-type]
            service="upload-archive",
            repo=Repository(1, "o/r"),
            user="-",
            version=0,
            on_done=lambda status: None,
        )


def test_the_protocol_handles_half_close():
    """Transports deliver the client's end of input separately (IHalfCloseableProtocol)."""
    assert IHalfCloseableProtocol.implementedBy(GitStreamProtocol)


# -- receive-pack ---------------------------------------------------------------------------


def make_pack(src: str, *revs: str) -> bytes:
    """A pack of every object reachable from *revs* (``^rev`` excludes), as git's pack-objects makes it."""
    listing = git("rev-list", "--objects", *revs, cwd=src)
    ids = b"".join(line.split()[0] + b"\n" for line in listing.splitlines())
    return git("pack-objects", "--stdout", cwd=src, input=ids)


def push_request(*commands: tuple[bytes, bytes, bytes], caps: bytes) -> bytes:
    lines = [b"%s %s %s" % c for c in commands]
    lines[0] += b"\0" + caps
    return pkt_lines(*(line + b"\n" for line in lines)) + FLUSH_PKT


PUSH_CAPS = b"report-status side-band-64k ofs-delta " + AGENT


def test_receive_pack_advertisement(world, connect):
    """receive-pack advertises the refs and capabilities on connect, without the HTTP header."""
    s = connect("receive-pack")
    snapshot = world.metadata.get_refs(world.repo)
    assert s.take() == receive_pack.advertise(snapshot, http=False)


@pytest.mark.parametrize("seed", [None, 3, 4])
def test_push_pack_end_is_found_without_the_client_closing(world, connect, seed):
    """Commands then the pack, the client's side still open: the report comes once the pack is in."""
    repo = world.new_repo()
    s = connect("receive-pack", repo=repo)
    s.take()
    main = world.rev("main")
    data = push_request((ZERO_OID, main, b"refs/heads/main"), caps=PUSH_CAPS) + make_pack(
        world.src, "main"
    )
    s.send(*([data] if seed is None else chunks_of(data, seed)))
    reply = read(s.take())
    report = read(reply.pack)  # band 1 carries the report's own pkt-lines
    assert report.lines == [b"unpack ok", b"ok refs/heads/main", FLUSH_PKT]
    assert b"Checking connectivity" in reply.progress
    assert s.status == 0 and s.spooled() == []
    assert world.metadata.get_refs(repo).refs == {b"refs/heads/main": main}
    assert s.requests(service="receive-pack", repo_class="private", outcome="ok") == 1


def test_push_client_closing_its_side_after_the_pack_still_gets_the_report(world, connect):
    """Over ssh the client's EOF follows the pack at once; the push still runs and is reported."""
    runner = RecordingRunner(hold=True)
    repo = world.new_repo()
    s = connect("receive-pack", repo=repo, run=runner)
    runner.release()
    s.take()
    main = world.rev("main")
    s.send(
        push_request((ZERO_OID, main, b"refs/heads/main"), caps=b"report-status"),
        make_pack(world.src, "main"),
    )
    s.protocol.readConnectionLost()
    assert len(runner.pending) == 1 and s.status is None  # the push, not yet run
    runner.release()
    assert read(s.take()).lines == [b"unpack ok", b"ok refs/heads/main", FLUSH_PKT]
    assert s.status == 0 and world.metadata.get_refs(repo).refs == {b"refs/heads/main": main}


def test_push_pack_one_byte_at_a_time(world, connect):
    """The trailer is recognised whichever chunks the pack arrives in, down to single bytes."""
    repo = world.new_repo()
    s = connect("receive-pack", repo=repo)
    s.take()
    v01 = world.rev("v0.1")
    s.send(push_request((ZERO_OID, v01, b"refs/heads/old"), caps=b"report-status"))
    for byte in make_pack(world.src, "v0.1"):
        assert s.status is None
        s.send(bytes([byte]))
    assert read(s.take()).lines == [b"unpack ok", b"ok refs/heads/old", FLUSH_PKT]
    assert s.status == 0


def test_incremental_push_and_delete_only_push(world, connect):
    """A push on top of existing history takes a thin pack; a deletes-only push has no pack at all."""
    repo = world.new_repo()
    first = connect("receive-pack", repo=repo)
    first.take()
    v01, main, feature = world.rev("v0.1"), world.rev("main"), world.rev("feature")
    first.send(
        push_request((ZERO_OID, v01, b"refs/heads/main"), caps=b"report-status"),
        make_pack(world.src, "v0.1"),
    )
    assert first.status == 0
    second = connect("receive-pack", repo=repo)
    second.take()
    thin = git(
        "pack-objects",
        "--stdout",
        "--thin",
        "--revs",
        cwd=world.src,
        input=b"main\nfeature\n^v0.1\n",
    )
    second.send(
        push_request(
            (v01, main, b"refs/heads/main"),
            (ZERO_OID, feature, b"refs/heads/feature"),
            caps=b"report-status ofs-delta",
        ),
        thin,
    )
    assert read(second.take()).lines == [
        b"unpack ok",
        b"ok refs/heads/main",
        b"ok refs/heads/feature",
        FLUSH_PKT,
    ]
    third = connect("receive-pack", repo=repo)
    third.take()
    third.send(push_request((feature, ZERO_OID, b"refs/heads/feature"), caps=b"report-status"))
    assert read(third.take()).lines == [b"unpack ok", b"ok refs/heads/feature", FLUSH_PKT]
    assert third.status == 0
    assert world.metadata.get_refs(repo).refs == {b"refs/heads/main": main}


def test_push_larger_than_the_limit(world, connect):
    """Past max_pack_bytes: the unpack error and ng lines, then status 128; nothing is kept."""
    repo = world.new_repo()
    s = connect("receive-pack", repo=repo, limits=Limits(max_pack_bytes=2000))
    s.take()
    main = world.rev("main")
    pack = make_pack(world.src, "main")
    assert len(pack) > 2000
    s.send(push_request((ZERO_OID, main, b"refs/heads/main"), caps=PUSH_CAPS), pack[:1500])
    assert s.status is None and len(s.spooled()) == 1
    s.send(pack[1500:])
    reply = read(s.take())
    assert read(reply.pack).lines == [
        b"unpack " + PACK_TOO_LARGE.encode(),
        b"ng refs/heads/main unpacker error",
        FLUSH_PKT,
    ]
    assert PACK_TOO_LARGE.encode() in reply.progress
    assert s.status == 128 and s.spooled() == []
    s.send(b"more pack bytes")  # ignored: the session is over
    assert s.take() == b""
    assert world.metadata.get_refs(repo).refs == {}
    assert s.requests(service="receive-pack", repo_class="private", outcome="too_large") == 1


def test_corrupt_pack_is_judged_when_the_client_closes(world, connect):
    """A trailer that never matches is found out at the client's end of input, by the indexer."""
    repo = world.new_repo()
    s = connect("receive-pack", repo=repo)
    s.take()
    main = world.rev("main")
    pack = bytearray(make_pack(world.src, "main"))
    pack[-1] ^= 1
    s.send(push_request((ZERO_OID, main, b"refs/heads/main"), caps=b"report-status"), pack)
    assert s.status is None and s.take() == b""
    s.protocol.readConnectionLost()
    assert read(s.take()).lines == [
        b"unpack pack is corrupted (SHA1 mismatch)",
        b"ng refs/heads/main unpacker error",
        FLUSH_PKT,
    ]
    assert s.status == 0 and s.spooled() == []
    assert world.metadata.get_refs(repo).refs == {}


def test_not_a_pack_is_refused_at_once(world, connect):
    """Bytes that cannot start a pack are handed to the indexer straight away, which refuses them."""
    repo = world.new_repo()
    s = connect("receive-pack", repo=repo)
    s.take()
    s.send(
        push_request((ZERO_OID, world.rev("main"), b"refs/heads/main"), caps=b"report-status"),
        b"JUNK, which is long enough to be a pack but is not one",
    )
    assert read(s.take()).lines[0] == b"unpack pack signature mismatch"
    assert s.status == 0


def test_push_lost_mid_pack_changes_nothing(world, connect):
    """A connection lost before the pack is complete applies nothing and removes the spool."""
    repo = world.new_repo()
    s = connect("receive-pack", repo=repo)
    s.take()
    pack = make_pack(world.src, "main")
    s.send(
        push_request((ZERO_OID, world.rev("main"), b"refs/heads/main"), caps=b"report-status"),
        pack[: len(pack) // 2],
    )
    s.protocol.connectionLost(Failure(ConnectionError("gone")))
    assert s.status == 128 and s.spooled() == []
    assert world.metadata.get_refs(repo).refs == {}


@pytest.mark.parametrize("caps", [b"report-status", PUSH_CAPS])
def test_a_push_stalling_mid_pack_is_dropped_and_its_spool_removed(world, connect, caps):
    """Half a pack, then silence: the error where the client reads it (band 3 with side-band),
    status 128, the spool file gone and no ref changed."""
    clock = Clock()
    repo = world.new_repo()
    s = connect("receive-pack", repo=repo, limits=IDLE, clock=clock)
    s.take()
    pack = make_pack(world.src, "main")
    s.send(push_request((ZERO_OID, world.rev("main"), b"refs/heads/main"), caps=caps))
    for start in range(0, len(pack) // 2, 100):  # bytes keep coming for a while...
        s.send(pack[start : start + 100])
        elapse(clock, 10)
    assert s.status is None and len(s.spooled()) == 1
    elapse(clock, 37.5)  # ...then stop
    assert s.status == 128 and s.spooled() == []
    reply = s.take()
    if b"side-band-64k" in caps:
        assert read(reply).fatal == b"timeout: nothing received for 30 s\n"
    else:
        assert read(reply).lines == [b"ERR timeout: nothing received for 30 s"]
    assert world.metadata.get_refs(repo).refs == {}
    assert s.requests(service="receive-pack", repo_class="private", outcome="timeout") == 1


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (pkt_line(b"not a command\n") + FLUSH_PKT, b"ERR protocol error: expected old/new/ref"),
        (b"00zz", b"ERR protocol error: bad line length character: 00zz"),
    ],
)
def test_push_protocol_error_is_err_and_128(world, connect, data, message):
    """A malformed command section gets an ERR packet and status 128; nothing is applied."""
    repo = world.new_repo()
    s = connect("receive-pack", repo=repo)
    s.take()
    s.send(data)
    assert read(s.take()).lines[0].startswith(message) and s.status == 128


def test_push_error_after_asking_for_side_band_goes_on_band_three(world, connect):
    """Once the commands asked for side-band-64k, git reads through the bands: the error is band 3."""
    repo = world.new_repo()
    s = connect("receive-pack", repo=repo)
    s.take()
    zero = b"0" * 40
    s.send(
        pkt_line(zero + b" " + zero + b" refs/heads/a\0report-status side-band-64k\n")
        + pkt_line(b"not a command\n")
        + FLUSH_PKT
    )
    reply = read(s.take())
    assert reply.fatal.startswith(b"protocol error: expected old/new/ref") and s.status == 128
    assert world.metadata.get_refs(repo).refs == {}


def test_push_with_nothing_to_do(world, connect):
    """A lone flush (nothing to push), or a client that only looked at the refs, ends with 0."""
    s = connect("receive-pack", repo=world.new_repo())
    s.take()
    s.send(FLUSH_PKT)
    assert s.status == 0 and s.take() == b""
    t = connect("receive-pack", repo=world.new_repo())
    t.protocol.readConnectionLost()
    assert t.status == 0


def test_push_commands_cut_short_by_the_client(world, connect):
    """End of input inside the command section is git's protocol error: ERR and 128."""
    s = connect("receive-pack", repo=world.new_repo())
    s.take()
    s.send(pkt_line(b"%s %s refs/heads/x\0report-status\n" % (ZERO_OID, world.rev("main"))))
    s.protocol.readConnectionLost()
    assert s.status == 128
    assert b"ended before its flush-pkt" in s.take()


def test_rejected_refs_are_reported_with_status_zero(world, connect):
    """An ng for a stale old value is a normal answer: git's receive-pack still exits 0."""
    repo = world.new_repo()
    s = connect("receive-pack", repo=repo)
    s.take()
    v01, main = world.rev("v0.1"), world.rev("main")
    s.send(
        push_request((v01, main, b"refs/heads/main"), caps=b"report-status"),
        make_pack(world.src, "main"),
    )
    lines = read(s.take()).lines
    assert lines[0] == b"unpack ok" and lines[1].startswith(b"ng refs/heads/main")
    assert s.status == 0
    assert s.requests(service="receive-pack", repo_class="private", outcome="rejected") == 1


# -- the real git client over a pipe ----------------------------------------------------------

SERVER = textwrap.dedent(
    '''
    """One git session on stdin/stdout through GitStreamProtocol, for --upload-pack/--receive-pack."""
    import os
    import sys

    from twisted.internet import reactor, stdio
    from twisted.internet.interfaces import IHalfCloseableProtocol
    from twisted.internet.protocol import Protocol
    from twisted.logger import globalLogBeginner, jsonFileLogObserver
    from zope.interface import implementer

    from gitstratum.core.limits import Limits
    from gitstratum.frontend.metrics import Metrics
    from gitstratum.frontend.stream import GitBackend, GitStreamProtocol, parse_git_protocol_env
    from gitstratum.frontend.threads import thread_runner
    from gitstratum.protocol.ingest import PushProcessor
    from gitstratum.protocol.upload_service import ABORT_MESSAGE, UploadPackService
    from gitstratum.storage.lmdb_metadata import LMDBMetadataStore
    from gitstratum.storage.lmdb_objects import LMDBObjectStore

    service, metadata_dir, objects_dir, repo_name, spool_dir, max_pack, log_path = sys.argv[1:8]
    globalLogBeginner.beginLoggingTo(
        [jsonFileLogObserver(open(log_path, "a"))], discardBuffer=True, redirectStandardIO=False
    )
    metadata, objects = LMDBMetadataStore(metadata_dir), LMDBObjectStore(objects_dir)
    limits = Limits(max_pack_bytes=int(max_pack))
    backend = GitBackend(
        metadata=metadata,
        upload=UploadPackService(metadata, objects, limits),
        push=PushProcessor(metadata, objects, limits),
        run=thread_runner(reactor, reactor.getThreadPool()),
        limits=limits,
        metrics=Metrics(),
        spool_dir=spool_dir,
    )
    statuses = []


    @implementer(IHalfCloseableProtocol)
    class Stdio(Protocol):
        """Ties the session to stdio, the way an SSH channel would."""

        def __init__(self, inner):
            self.inner = inner

        def makeConnection(self, transport):
            self.transport = transport
            self.inner.makeConnection(transport)

        def dataReceived(self, data):
            self.inner.dataReceived(data)

        def readConnectionLost(self):
            # Withheld from receive-pack: the end of the pack must be found in the stream.
            if service != "receive-pack":
                self.inner.readConnectionLost()

        def writeConnectionLost(self):
            self.inner.writeConnectionLost()

        def connectionLost(self, reason):
            self.inner.connectionLost(reason)
            if reactor.running:
                reactor.stop()


    def done(status):
        statuses.append(status)
        wrapper.transport.loseConnection()


    wrapper = Stdio(
        GitStreamProtocol(
            backend,
            service=service,
            repo=metadata.get_repository(repo_name),
            user="tester",
            version=parse_git_protocol_env(os.environb.get(b"GIT_PROTOCOL", b"")),
            on_done=done,
        )
    )
    stdio.StandardIO(wrapper)
    reactor.run()
    metadata.close()
    objects.close()
    sys.exit(statuses[0] if statuses else 99)
    '''
)


@attrs.frozen
class Client:
    """The real git, with --upload-pack/--receive-pack running SERVER on the world's stores."""

    world: World
    script: str
    spool_dir: str
    log_path: str

    def command(self, service: str, repo: str, max_pack: int) -> str:
        w = self.world
        return " ".join(
            [
                sys.executable,
                self.script,
                service,
                os.path.join(w.base, "metadata"),
                os.path.join(w.base, "objects"),
                repo,
                self.spool_dir,
                str(max_pack),
                self.log_path,
            ]
        )

    def run(
        self,
        *args: str,
        repo: str = "o/r",
        version: int = 2,
        cwd: str | None = None,
        trace: str | None = None,
        max_pack: int = 1 << 30,
        check: bool = True,
    ) -> subprocess.CompletedProcess[bytes]:
        verb, rest = args[0], args[1:]
        option = "--receive-pack" if verb == "push" else "--upload-pack"
        service = "receive-pack" if verb == "push" else "upload-pack"
        env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
        env.update(GIT_ENV)
        pythonpath = os.path.dirname(os.path.dirname(os.path.abspath(gitstratum.__file__)))
        env["PYTHONPATH"] = pythonpath
        if trace:
            env["GIT_TRACE_PACKET"] = trace
        proc = subprocess.run(
            [
                "git",
                "-c",
                f"protocol.version={version}",
                verb,
                f"{option}={self.command(service, repo, max_pack)}",
                *rest,
            ],
            cwd=cwd,
            env=env,
            capture_output=True,
            timeout=120,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"git {' '.join(args)} failed:\n{proc.stderr.decode()}")
        return proc

    def sessions(self) -> list[dict[str, Any]]:
        """The request lines the server sessions logged so far."""
        with open(self.log_path) as f:
            events = [json.loads(line.strip("\x1e")) for line in f if line.strip()]
        return [e for e in events if "outcome" in e and "service" in e]


@pytest.fixture
def client(world, tmp_path):
    script = tmp_path / "serve.py"
    script.write_text(SERVER)
    spool_dir = tmp_path / "client-spool"
    spool_dir.mkdir()
    return Client(world, str(script), str(spool_dir), str(tmp_path / "server.log"))


URL = "file:///served/o/r.git"


def shallow_boundary(clone: str) -> set[bytes]:
    path = os.path.join(clone, ".git", "shallow")
    return set(open(path, "rb").read().split()) if os.path.exists(path) else set()


@pytest.mark.parametrize("version", [0, 2])
def test_git_clone(world, client, tmp_path, version):
    """A real clone over the stream is complete and fsck-clean, in v0 and in v2; v2 really is v2."""
    dest = str(tmp_path / "clone")
    trace = str(tmp_path / "trace")
    client.run("clone", "-q", URL, dest, version=version, trace=trace)
    git("fsck", "--strict", cwd=dest)
    for ref in ("main", "feature"):
        assert git("rev-parse", f"origin/{ref}", cwd=dest).strip() == world.rev(ref)
    assert git("rev-parse", "v1.0^{}", cwd=dest).strip() == world.rev("main")
    packets = open(trace, "rb").read()
    assert (b"clone< version 2" in packets) == (version == 2)
    assert (b"command=fetch" in packets) == (version == 2)
    assert [(s["outcome"], s["status"]) for s in client.sessions()] == [("ok", 0)]


@pytest.mark.parametrize("version", [0, 2])
def test_git_fetch_negotiates_over_several_rounds(world, client, tmp_path, version):
    """A client with history of its own negotiates in several rounds and gets a good pack."""
    repo = world.new_repo()
    v01 = world.rev("v0.1")
    work = str(tmp_path / "work")
    git("clone", "-q", world.src, work)
    # The server repository holds main as of v0.1 (pushed through the stream).
    client.run("push", "-q", "file:///x", "v0.1:refs/heads/main", repo=repo.name, cwd=work)
    assert world.metadata.get_refs(repo).refs[b"refs/heads/main"] == v01
    dest = str(tmp_path / "dest")
    client.run("clone", "-q", "file:///x", dest, repo=repo.name, version=version)
    git("checkout", "-q", "-b", "local", cwd=dest)
    for i in range(40):
        # Newer than anything on the server, so the client offers them first.
        when = {"GIT_COMMITTER_DATE": f"{1_800_000_000 + i} +0000"}
        git("commit", "-q", "--allow-empty", "-m", f"local {i}", cwd=dest, env=when)
    client.run("push", "-q", "file:///x", "main:refs/heads/main", repo=repo.name, cwd=work)
    trace = str(tmp_path / "trace")
    client.run("fetch", "-q", "origin", repo=repo.name, version=version, cwd=dest, trace=trace)
    assert git("rev-parse", "origin/main", cwd=dest).strip() == world.rev("main")
    git("fsck", "--strict", cwd=dest)
    packets = open(trace, "rb").read().splitlines()
    haves = [p for p in packets if b"> have " in p]
    flushes = [p for p in packets if p.endswith(b"> 0000")]
    assert len(haves) > 32 and len(flushes) >= 3  # rounds of 16, 32, ... haves
    assert any(b"< ACK " in p for p in packets)
    assert all(s["outcome"] == "ok" for s in client.sessions())


@pytest.mark.parametrize("version", [0, 2])
def test_git_shallow_clone_deepen_unshallow(world, client, tmp_path, version):
    """--depth=1, --deepen and --unshallow through the stream leave the right shallow file."""
    dest = str(tmp_path / "shallow")
    client.run("clone", "-q", "--depth=1", URL, dest, version=version)
    assert shallow_boundary(dest) == {world.rev("main")}
    client.run("fetch", "-q", "--deepen=2", cwd=dest, version=version)
    assert shallow_boundary(dest) == {world.rev("main~2")}
    git("fsck", cwd=dest)
    client.run("fetch", "-q", "--unshallow", cwd=dest, version=version)
    assert shallow_boundary(dest) == set()
    git("fsck", "--strict", cwd=dest)


def test_git_push_then_clone_back(world, client, tmp_path):
    """Pushes (new repository, update, delete) through the stream; a clone of the result fscks."""
    repo = world.new_repo()
    work = str(tmp_path / "work")
    git("clone", "-q", "--mirror", world.src, work)
    client.run("push", "-q", "--mirror", "file:///x", repo=repo.name, cwd=work)
    snapshot = world.metadata.get_refs(repo)
    assert snapshot.refs == world.metadata.get_refs(world.repo).refs
    dest = str(tmp_path / "back")
    client.run("clone", "-q", "file:///x", dest, repo=repo.name)
    with open(os.path.join(dest, "data.bin"), "wb") as f:
        f.write(zlib.compress(b"payload " * 5000))
    git("add", "data.bin", cwd=dest)
    git("commit", "-q", "-m", "more", cwd=dest)
    client.run("push", "-q", "origin", "main", ":feature", repo=repo.name, cwd=dest)
    refs = world.metadata.get_refs(repo).refs
    assert refs[b"refs/heads/main"] == git("rev-parse", "HEAD", cwd=dest).strip()
    assert b"refs/heads/feature" not in refs
    again = str(tmp_path / "again")
    client.run("clone", "-q", "file:///x", again, repo=repo.name, version=0)
    git("fsck", "--strict", cwd=again)
    assert git("rev-parse", "HEAD", cwd=again) == git("rev-parse", "HEAD", cwd=dest)
    sessions = client.sessions()
    assert [s["service"] for s in sessions].count("receive-pack") == 2
    assert all((s["outcome"], s["status"]) == ("ok", 0) for s in sessions)
    assert os.listdir(client.spool_dir) == []


def test_git_push_over_the_size_limit(world, client, tmp_path):
    """A push past the pack limit fails at the client with git's message; no ref moves."""
    repo = world.new_repo()
    work = str(tmp_path / "work")
    git("clone", "-q", world.src, work)
    proc = client.run(
        "push",
        "file:///x",
        "main:refs/heads/main",
        repo=repo.name,
        cwd=work,
        max_pack=2000,
        check=False,
    )
    if proc.returncode == 0:
        raise AssertionError("the push was accepted")
    assert b"pack exceeds maximum allowed size" in proc.stderr
    assert world.metadata.get_refs(repo).refs == {}
    assert [(s["outcome"], s["status"]) for s in client.sessions()] == [("too_large", 128)]
    assert os.listdir(client.spool_dir) == []
