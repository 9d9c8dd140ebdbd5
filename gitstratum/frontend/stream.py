"""Git over a byte stream: upload-pack and receive-pack as they run behind ssh:// and git://.

Smart HTTP carries one complete request per round trip.  A stream keeps one
connection for the whole exchange, and git's client speaks the *stateful*
protocol on it: upload-pack v0/v1 sends its wants once and then rounds of
haves, each answered as it ends; v2 sends commands one after another until a
lone flush; receive-pack sends its commands and then the pack on the same
stream, and keeps its side open until it has read the report.

``GitStreamProtocol`` is that protocol for one SSH exec channel or one
git:// connection.  The adapters authenticate, choose the repository and the
protocol version, connect it to their transport, and learn the exit status
through ``on_done``; they close the transport then (an SSH channel sends its
exit-status first).  A fetch admission control refuses ends the session
with git's ``ERR`` packet ("server busy: ..., retry in N s").  Nothing here blocks the reactor: every step that touches
the stores runs through the backend's ``BlockingRunner``, and packs stream
through ``ThreadedIteratorProducer`` registered on the transport, so a full
SSH window or TCP buffer pauses pack generation.  Input that arrives while a
step runs is buffered, within the request limit, and read when it is over.
"""

from __future__ import annotations

import enum
import hashlib
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import IO, Any, BinaryIO, TypeVar, cast

import attrs
from twisted.internet.interfaces import IConsumer, IHalfCloseableProtocol
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from gitstratum.core.limits import Limits
from gitstratum.core.pktline import (
    FLUSH_PKT,
    NEED_DATA,
    Packet,
    PktLineDecoder,
    PktLineError,
    Special,
    pkt_line,
    strip_newline,
)
from gitstratum.frontend.admission import Overloaded
from gitstratum.frontend.metrics import Metrics, record_request, repo_class_of
from gitstratum.frontend.threads import BlockingRunner, ThreadedIteratorProducer
from gitstratum.protocol import receive_pack
from gitstratum.protocol.ingest import UNPACKER_ERROR, PushProcessor
from gitstratum.protocol.receive_pack import (
    PushRequest,
    PushRequestParser,
    ReceivePackError,
    RefResult,
    ReportStatus,
    encode_response,
    refusal,
)
from gitstratum.protocol.upload_pack import UploadPackError, capability_advertisement
from gitstratum.protocol.upload_response import PlannedResponse
from gitstratum.protocol.upload_service import Caller, UploadPackService
from gitstratum.protocol.upload_session import UploadSession
from gitstratum.storage.interfaces import IMetadataStore, Repository

__all__ = [
    "UPLOAD_PACK",
    "RECEIVE_PACK",
    "PACK_TOO_LARGE",
    "GitBackend",
    "GitStreamProtocol",
    "parse_git_protocol_env",
]

UPLOAD_PACK = "upload-pack"
RECEIVE_PACK = "receive-pack"

#: index-pack's words when a push passes receive.maxInputSize
PACK_TOO_LARGE = "pack exceeds maximum allowed size"

_T = TypeVar("_T")
_TRAILER = 20
_PACK_HEADER = 12
_CLIENT_ERRORS = (UploadPackError, ReceivePackError, PktLineError)
#: idle checks per stream_idle_timeout: a silent client goes within 1 + 1/_IDLE_CHECKS timeouts
_IDLE_CHECKS = 4


def parse_git_protocol_env(value: bytes) -> int:
    """The protocol version a ``GIT_PROTOCOL`` value asks for: 2, or 0 for anything else.

    The value is a colon-separated list of ``key[=value]`` items; like git's
    server, the highest ``version=`` wins, and version 1 is served as 0.
    """
    versions = [item[8:] for item in value.split(b":") if item.startswith(b"version=")]
    return 2 if b"2" in versions else 0


def _peer_host(transport: Any) -> str | None:
    """The client's IP address behind a transport: TCP's peer, or the one under an SSH channel."""
    address = transport.getPeer() if transport is not None else None
    while address is not None and not hasattr(address, "host"):
        address = getattr(address, "address", None)  # SSHTransportAddress wraps the TCP one
    return getattr(address, "host", None)


@attrs.frozen
class GitBackend:
    """Everything a stream session needs; built once per server and shared by its sessions."""

    metadata: IMetadataStore
    upload: UploadPackService
    push: PushProcessor
    run: BlockingRunner
    limits: Limits
    metrics: Metrics
    spool_dir: str | None = None
    #: seconds for the request log; injected so tests need no wall clock
    clock: Callable[[], float] = time.monotonic
    #: schedules the idle check (``reactor.callLater``; a Clock's in tests)
    call_later: Callable[..., Any] | None = None


class _PackTooLarge(Exception):
    pass


class _PackSpool:
    """A pushed pack spooled to a temporary file as it arrives, noticing where it ends.

    The client keeps its side open after the pack, so the end has to be
    found in the bytes.  A pack ends with the SHA-1 of everything before it,
    and git sends nothing after it, so after each chunk the last 20 bytes
    received are compared with the hash of the bytes before them: nothing is
    inflated here, and the indexer inflates each object once, later.  A pack
    that cannot be one (no ``PACK`` signature) counts as complete at once so
    that the indexer refuses it; one whose trailer never matches (corrupt,
    or followed by junk) is complete when the client closes its side.
    """

    def __init__(self, file: IO[bytes], limit: int):
        self.file = file
        self.limit = limit
        self.size = 0
        self.complete = False
        self._head = b""
        self._sha = hashlib.sha1()
        self._tail = b""  # the last (up to 20) bytes, not hashed yet: they may be the trailer

    def write(self, data: bytes) -> None:
        """Append *data*; _PackTooLarge once the pack would pass the limit."""
        if not data:
            return
        if self.size + len(data) > self.limit:
            raise _PackTooLarge()
        self.file.write(data)
        self.size += len(data)
        if len(self._head) < _PACK_HEADER:
            self._head = (self._head + data)[:_PACK_HEADER]
        if len(data) >= _TRAILER:
            # Hash what is now known not to be the trailer, without copying the chunk.
            self._sha.update(self._tail)
            with memoryview(data) as view, view[:-_TRAILER] as body:
                self._sha.update(body)
            self._tail = data[-_TRAILER:]
        else:
            joined = self._tail + data
            self._sha.update(joined[:-_TRAILER])
            self._tail = joined[-_TRAILER:]
        if len(self._head) >= 4 and self._head[:4] != b"PACK":
            self.complete = True
        elif self.size >= _PACK_HEADER + _TRAILER and self._sha.digest() == self._tail:
            self.complete = True

    def close(self) -> None:
        self.file.close()


class _State(enum.Enum):
    """What the session reads next."""

    STARTING = "starting"  # the advertisement is being built
    COMMAND = "command"  # v2: a command request, up to its flush
    WANTS = "wants"  # v0: the want section, up to its flush
    HAVES = "haves"  # v0: a round of haves, up to a flush or done
    PUSH_COMMANDS = "push-commands"  # receive-pack: commands and push options
    PUSH_PACK = "push-pack"  # receive-pack: the pack, spooled
    CLOSED = "closed"


@implementer(IHalfCloseableProtocol)
class GitStreamProtocol(Protocol):
    """One ``git-upload-pack`` or ``git-receive-pack`` session on a stream transport.

    *service* is ``"upload-pack"`` or ``"receive-pack"``; *version* 2 or 0
    (see ``parse_git_protocol_env``; receive-pack is always v0, as in git);
    *user* names the caller in the request log (``"-"`` for anonymous).
    *on_done* is called once with the exit status git would have: 0, or 128
    after an error (then an ``ERR`` packet, or a band-3 message, was sent if
    the client can still read one).  The transport must be an ``IConsumer``.
    The session ends after one fetch (v0), after a lone flush or the client's
    end of input (v2), or after the report (receive-pack); a lost connection
    ends it too.
    """

    _log = Logger()

    def __init__(
        self,
        backend: GitBackend,
        *,
        service: str,
        repo: Repository,
        user: str,
        version: int,
        on_done: Callable[[int], None],
    ):
        if service not in (UPLOAD_PACK, RECEIVE_PACK):
            raise ValueError(f"unknown git service {service!r}")
        self._backend = backend
        self._limits = backend.limits
        self._service = service
        self._repo = repo
        self._user = user or "-"
        self._version = 2 if service == UPLOAD_PACK and version == 2 else 0
        self._on_done = on_done
        self._state = _State.STARTING
        self._busy = True  # a step runs in the pool, or a response streams
        self._looping = False
        self._eof = False  # the client will send nothing more
        self._gone = False  # nor read anything more
        self._finished = False
        self._inbox = bytearray()  # received, not yet handed to a parser
        self._decoder = PktLineDecoder(self._limits.max_empty_packets)
        self._section = bytearray()  # the wire bytes of the section being read
        self._session: UploadSession | None = None
        self._push_parser = PushRequestParser(self._limits)
        self._push_fed = 0
        self._push_request: PushRequest | None = None
        self._spool: _PackSpool | None = None
        self._producer: ThreadedIteratorProducer | None = None
        self._nbytes = 0
        self._started = 0.0
        self._caller = Caller()
        self._received_total = 0
        self._pool_steps = 0  # blocking steps in flight: the server is working, not idle
        self._idle_call: Any = None
        self._idle_seen: tuple[int, int] = (0, 0)
        self._quiet_checks = 0

    # -- Twisted's hooks ---------------------------------------------------------

    def connectionMade(self) -> None:
        self._started = self._backend.clock()
        user = None if self._user == "-" else self._user
        self._caller = Caller(user=user, address=_peer_host(self.transport))
        with self._guarded():
            if self._service == RECEIVE_PACK:
                self._call(self._push_advertised, self._push_advertisement)
            elif self._version == 2:
                self._write(capability_advertisement())
                self._ready(_State.COMMAND)
            else:
                self._call(self._upload_advertised, self._open_upload)
        self._arm_idle()  # after the greeting, so the first period is the client's

    def dataReceived(self, data: bytes) -> None:
        self._received_total += len(data)
        with self._guarded():
            self._received(data)

    def readConnectionLost(self) -> None:
        """The client closed its side: what it sent is all there is."""
        with self._guarded():
            self._eof = True
            self._advance()

    def writeConnectionLost(self) -> None:
        """The client stopped reading: nothing more can be answered."""
        with self._guarded():
            self._lost()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        with self._guarded():
            self._eof = True
            self._lost()

    @contextmanager
    def _guarded(self) -> Iterator[None]:
        # An exception escaping into an SSH channel's callers would take the
        # whole connection, and every other session on it, down with it.
        try:
            yield
        except Exception:
            self._log.failure(
                "{service} session for {repo} failed", service=self._service, repo=self._repo.name
            )
            self._fatal("internal server error", "error")

    def _received(self, data: bytes) -> None:
        if self._finished:
            return
        if self._state is _State.PUSH_PACK:
            if not self._busy:
                self._spool_data(data)
            # else: the pack has ended and is being processed; git sends nothing after it
            return
        self._inbox += data
        if len(self._inbox) > self._limits.max_request_bytes:
            self._client_error(
                f"protocol error: more than {self._limits.max_request_bytes} bytes sent "
                "ahead of the server's answer"
            )
            return
        self._advance()

    # -- steps in the pool ---------------------------------------------------------

    def _call(self, then: Callable[[_T], None], f: Callable[..., _T], *args: Any) -> None:
        """Run blocking *f* in the pool, then *then* with its result (unless the session ended)."""
        self._busy = True
        self._pool_steps += 1
        d = self._backend.run(f, *args)
        d.addBoth(self._step_done)
        d.addCallback(self._unless_finished, then)
        d.addErrback(self._failed)

    def _step_done(self, result: Any) -> Any:
        self._pool_steps -= 1
        return result

    # -- the idle limit -------------------------------------------------------------

    def _progress(self) -> tuple[int, int]:
        streamed = self._producer.written if self._producer is not None else 0
        return self._received_total, self._nbytes + streamed

    def _arm_idle(self) -> None:
        """Check, every quarter of ``stream_idle_timeout``, that bytes moved one way or the other.

        A session is dropped once four checks in a row saw no byte move and no
        blocking step (the server's own work) in flight: between one and one
        and a quarter timeouts after the client stopped, whether it stopped
        between requests, part-way through a negotiation or part-way through
        a pack (whose spool goes with the session).  Checking on a timer, not
        re-arming one per byte, keeps a streaming pack's cost per chunk nil.
        """
        timeout = self._limits.stream_idle_timeout
        if timeout <= 0 or self._finished:
            return
        call_later = self._backend.call_later
        if call_later is None:
            from twisted.internet import reactor

            call_later = reactor.callLater  # type: ignore[attr-defined]
        self._idle_seen = self._progress()
        self._idle_call = call_later(timeout / _IDLE_CHECKS, self._check_idle)

    def _check_idle(self) -> None:
        self._idle_call = None
        if self._finished:
            return
        if self._pool_steps or self._progress() != self._idle_seen:
            self._quiet_checks = 0  # we were working, or bytes moved: not idle
        else:
            self._quiet_checks += 1
        if self._quiet_checks < _IDLE_CHECKS:
            self._arm_idle()
            return
        seconds = self._limits.stream_idle_timeout
        self._log.info(
            "{service} session for {repo} idle for {seconds} s; closing",
            service=self._service,
            repo=self._repo.name,
            seconds=seconds,
        )
        if self._producer is None:
            self._write(
                refusal(
                    f"timeout: nothing received for {seconds:g} s",
                    sideband=self._push_parser.asked_sideband,
                )
            )
        self._finish(128, "timeout")

    def _cancel_idle(self) -> None:
        if self._idle_call is not None and self._idle_call.active():
            self._idle_call.cancel()
        self._idle_call = None

    def _unless_finished(self, result: _T, then: Callable[[_T], None]) -> None:
        if not self._finished:
            then(result)

    def _failed(self, failure: Failure) -> None:
        if failure.check(Overloaded) is not None and not self._finished:
            self._fatal(str(failure.value), "rate_limited")  # "ERR server busy: ..."
            return
        client_error = failure.check(*_CLIENT_ERRORS) is not None
        if self._finished:
            if not client_error:
                self._log.failure(
                    "{service} failed after the session ended", failure, service=self._service
                )
            return
        if client_error:
            self._client_error(str(failure.value))
            return
        self._log.failure(
            "{service} failed for {repo}", failure, service=self._service, repo=self._repo.name
        )
        self._fatal("internal server error", "error")

    def _ready(self, state: _State) -> None:
        """The step is over: read the next section in *state*."""
        self._state = state
        self._busy = False
        if self._gone:
            self._input_ended()
        else:
            self._advance()

    # -- reading -----------------------------------------------------------------------

    def _advance(self) -> None:
        # Steps may finish at once (an inline runner): loop here, never recurse.
        if self._looping:
            return
        self._looping = True
        try:
            while not (self._busy or self._finished) and self._read_one():
                pass
        finally:
            self._looping = False

    def _read_one(self) -> bool:
        """Act on the next piece of input; False when more input is needed."""
        state = self._state
        if state is _State.PUSH_COMMANDS:
            return self._read_push_request()
        if state is _State.PUSH_PACK:
            if self._eof:
                self._pack_ended()
            return False
        if self._inbox:
            self._decoder.receive_data(bytes(self._inbox))
            self._inbox.clear()
        try:
            event = self._decoder.next_event()
        except PktLineError as e:
            self._client_error(str(e))
            return False
        if event is NEED_DATA:
            if self._eof:
                self._input_ended()
            return False
        self._take(event)
        return True

    def _take(self, event: Packet | Special) -> None:
        self._section += event.value if isinstance(event, Special) else pkt_line(event.data)
        if len(self._section) > self._limits.max_request_bytes:
            self._client_error(
                f"protocol error: request exceeds {self._limits.max_request_bytes} bytes"
            )
            return
        state = self._state
        if state is _State.COMMAND:
            if event is Special.FLUSH:
                section = self._take_section()
                if section == FLUSH_PKT:
                    self._finish(0, "ok")  # a lone flush: the client is done
                else:
                    self._call(self._v2_planned, self._plan_v2, section)
        elif state is _State.WANTS:
            if event is Special.FLUSH:
                session = self._upload_session()
                self._call(self._wants_received, session.receive_wants, self._take_section())
        elif state is _State.HAVES:
            if event is Special.FLUSH or (
                isinstance(event, Packet) and strip_newline(event.data) == b"done"
            ):
                session = self._upload_session()
                self._call(self._haves_answered, session.receive_haves, self._take_section())

    def _take_section(self) -> bytes:
        section = bytes(self._section)
        self._section.clear()
        return section

    def _is_idle(self) -> bool:
        """Whether the client is between requests, where ending the session is no error."""
        if self._busy or self._section or self._inbox:
            return False
        if self._state is _State.PUSH_COMMANDS:
            return self._push_fed == 0
        if self._state not in (_State.COMMAND, _State.WANTS):
            return False
        try:
            self._decoder.check_complete()
        except PktLineError:
            return False
        return True

    def _input_ended(self) -> None:
        if self._is_idle():
            self._finish(0, "ok")
        else:
            # git's "the remote end hung up unexpectedly": no one is left to tell.
            self._finish(128, "disconnected")

    def _lost(self) -> None:
        self._gone = True
        if self._producer is not None:
            self._producer.stopProducing()
        if not self._finished:
            self._input_ended()

    # -- upload-pack -------------------------------------------------------------------

    def _upload_session(self) -> UploadSession:
        assert self._session is not None
        return self._session

    def _open_upload(self) -> tuple[UploadSession, bytes]:
        session = UploadSession.open(self._backend.upload, self._repo, self._caller)
        return session, session.advertisement()

    def _upload_advertised(self, opened: tuple[UploadSession, bytes]) -> None:
        self._session, advertisement = opened
        self._write(advertisement)
        self._ready(_State.WANTS)

    def _plan_v2(self, section: bytes) -> PlannedResponse:
        return self._backend.upload.plan(self._repo, section, version=2, caller=self._caller)

    def _v2_planned(self, planned: PlannedResponse) -> None:
        self._respond(planned, lambda: self._ready(_State.COMMAND))

    def _wants_received(self, shallow: bytes | None) -> None:
        if shallow is None:
            self._finish(0, "ok")  # no wants: the client is up to date, or only listed refs
            return
        self._write(shallow)
        self._ready(_State.HAVES)

    def _haves_answered(self, planned: PlannedResponse) -> None:
        self._respond(planned, lambda: self._ready(_State.HAVES), lambda: self._finish(0, "ok"))

    def _respond(
        self,
        planned: PlannedResponse,
        then: Callable[[], None],
        after_pack: Callable[[], None] | None = None,
    ) -> None:
        if planned.pack is None:
            self._write(planned.head)
            then()
        else:
            self._stream(self._backend.upload.send(planned), after_pack or then)

    def _stream(self, chunks: Iterator[bytes], then: Callable[[], None]) -> None:
        """Send *chunks* through a producer on the transport, then call *then*."""
        self._busy = True
        complete: list[bool] = []

        def tracked() -> Iterator[bytes]:
            # One chunk of lookahead: once the last chunk is handed over, the
            # response is complete, and a client that hangs up on reading it
            # (as git does after a fetch) ends the session cleanly.
            it = iter(chunks)
            current = next(it, None)
            while current is not None:
                try:
                    following = next(it, None)
                except Exception:
                    yield current  # band 3's abort message goes out before the error
                    raise
                if following is None:
                    complete.append(True)
                yield current
                current = following

        producer = ThreadedIteratorProducer(
            cast(IConsumer, self.transport), tracked(), self._backend.run
        )
        self._producer = producer

        def streamed(written: int) -> None:
            self._producer = None
            self._nbytes += written
            if self._finished:
                return
            if not complete:
                # stopProducing: the transport went away part-way.
                self._finish(128, "disconnected")
                return
            then()

        def failed(failure: Failure) -> None:
            self._producer = None
            self._nbytes += producer.written
            if not self._finished:
                # The client already has the band-3 abort message, if it reads side-band.
                self._log.failure(
                    "{service} failed part-way for {repo}",
                    failure,
                    service=self._service,
                    repo=self._repo.name,
                )
                self._finish(128, "error")

        d = producer.start()
        d.addCallbacks(streamed, failed)
        d.addErrback(self._failed)

    # -- receive-pack ------------------------------------------------------------------

    def _push_advertisement(self) -> bytes:
        return receive_pack.advertise(self._backend.metadata.get_refs(self._repo), http=False)

    def _push_advertised(self, advertisement: bytes) -> None:
        self._write(advertisement)
        self._ready(_State.PUSH_COMMANDS)

    def _read_push_request(self) -> bool:
        parser = self._push_parser
        if self._inbox:
            self._push_fed += len(self._inbox)
            parser.receive_data(bytes(self._inbox))
            self._inbox.clear()
        try:
            request = parser.next_event()
            if request is NEED_DATA:
                if self._push_fed > self._limits.max_request_bytes:
                    raise ReceivePackError(
                        f"protocol error: push commands exceed {self._limits.max_request_bytes}"
                        " bytes"
                    )
                if self._eof:
                    if self._push_fed == 0:
                        self._finish(0, "ok")  # the client only looked at the refs
                    else:
                        parser.end_of_input()
                return False
        except (ReceivePackError, PktLineError) as e:
            self._client_error(str(e))
            return False
        self._push_request = request
        pack_start = parser.take_unconsumed()
        if not request.commands:
            self._finish(0, "ok")  # a lone flush: nothing to update
        elif not request.expects_pack:
            self._process_push(None)
        else:
            try:
                spool = tempfile.TemporaryFile(dir=self._backend.spool_dir)
            except OSError:
                self._log.failure("cannot spool a pack for {repo}", repo=self._repo.name)
                self._fatal("unable to create temporary file for the pack", "error")
                return False
            self._spool = _PackSpool(spool, self._limits.max_pack_bytes)
            self._state = _State.PUSH_PACK
            self._spool_data(pack_start)
        return False

    def _spool_data(self, data: bytes) -> None:
        spool = self._spool
        assert spool is not None
        try:
            spool.write(data)
        except _PackTooLarge:
            self._pack_too_large()
            return
        except OSError:
            self._log.failure("spooling a pack for {repo} failed", repo=self._repo.name)
            self._fatal("unable to write the pack to disk", "error")
            return
        if spool.complete:
            self._pack_ended()

    def _pack_ended(self) -> None:
        spool, self._spool = self._spool, None
        assert spool is not None
        try:
            spool.file.flush()
            spool.file.seek(0)
        except OSError:
            spool.close()
            self._log.failure("spooling a pack for {repo} failed", repo=self._repo.name)
            self._fatal("unable to write the pack to disk", "error")
            return
        self._process_push(spool.file)

    def _process_push(self, pack: IO[bytes] | None) -> None:
        request = self._push_request
        assert request is not None
        self._call(self._pushed, self._run_push, request, pack)

    def _run_push(self, request: PushRequest, pack: IO[bytes] | None) -> tuple[bytes, bool]:
        """Apply the push and encode the answer (in the pool; the spool is ours to close)."""
        progress: list[str] = []
        try:
            report = self._backend.push.process(
                self._repo, request, cast(BinaryIO | None, pack), progress.append
            )
        finally:
            if pack is not None:
                pack.close()
        response = encode_response(request, report)
        if request.sideband and not request.quiet and progress:
            response = b"".join(receive_pack.progress(m) for m in progress) + response
        return response, report.ok

    def _pushed(self, result: tuple[bytes, bool]) -> None:
        response, ok = result
        self._write(response)
        self._finish(0, "ok" if ok else "rejected")

    def _pack_too_large(self) -> None:
        request = self._push_request
        assert request is not None
        report = ReportStatus(
            unpack_error=PACK_TOO_LARGE,
            results=tuple(RefResult(c.ref, UNPACKER_ERROR) for c in request.commands),
            messages=(f"fatal: {PACK_TOO_LARGE} ({self._limits.max_pack_bytes} bytes)",),
        )
        # The rest of the pack cannot be skipped without reading it: answer, then hang up.
        self._write(encode_response(request, report))
        self._finish(128, "too_large")

    # -- writing and ending ------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        if data and self.transport is not None:
            self._nbytes += len(data)
            self.transport.write(data)

    def _client_error(self, message: str) -> None:
        self._fatal(message, "bad_request")

    def _fatal(self, message: str, outcome: str) -> None:
        """End with status 128, telling the client why where it reads it: ERR, or band 3."""
        if self._finished or self._producer is not None:
            pass  # over already, or inside a pack, where nothing more can be said
        else:  # a push that asked for side-band, complete or not, reads band 3
            self._write(refusal(message, sideband=self._push_parser.asked_sideband))
        self._finish(128, outcome)

    def _finish(self, status: int, outcome: str) -> None:
        if self._finished:
            return
        self._finished = True
        self._cancel_idle()
        self._state = _State.CLOSED
        if self._producer is not None:
            self._producer.stopProducing()
        if self._spool is not None:
            self._spool.close()
            self._spool = None
        record_request(
            self._backend.metrics,
            self._log,
            service=self._service,
            repo=self._repo.name,
            user=self._user,
            status=status,
            outcome=outcome,
            repo_class=repo_class_of(self._repo),
            seconds=self._backend.clock() - self._started,
            nbytes=self._nbytes,
        )
        self._on_done(status)
