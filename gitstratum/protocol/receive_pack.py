"""Receive-pack on the wire, sans-I/O: the ref advertisement, the push request, report-status.

A push is: the server advertises its refs and capabilities; the client sends
optional ``shallow`` lines and one command per ref (``<old> <new> <ref>``, the
first carrying its capabilities after a NUL), a flush, push options and a
flush when it asked for ``push-options``, and then the pack (unless every
command is a delete).  The server answers with report-status, inside band 1
when ``side-band-64k`` was negotiated.  Wording follows git's receive-pack.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import BinaryIO, Literal

import attrs

from gitstratum import __version__
from gitstratum.core.limits import Limits
from gitstratum.core.oid import ZERO_OID, ObjectID, is_oid
from gitstratum.core.pktline import (
    FLUSH_PKT,
    NEED_DATA,
    NeedData,
    Packet,
    PktLineDecoder,
    Special,
    error_pkt,
    pkt_line,
    sideband,
    strip_newline,
)
from gitstratum.storage.interfaces import RefSnapshot

__all__ = [
    "CAPABILITIES",
    "AGENT",
    "ReceivePackError",
    "Command",
    "PushRequest",
    "RefResult",
    "ReportStatus",
    "PushRequestParser",
    "advertise",
    "parse_request",
    "receive_request",
    "read_request",
    "encode_report",
    "encode_response",
    "progress",
    "refusal",
]

AGENT = b"gitstratum/" + __version__.encode("ascii")

#: What receive-pack offers, in git's order; ``agent`` is appended last.
CAPABILITIES: tuple[bytes, ...] = (
    b"report-status",
    b"report-status-v2",
    b"delete-refs",
    b"side-band-64k",
    b"quiet",
    b"atomic",
    b"ofs-delta",
    b"push-options",
    b"object-format=sha1",
)

_SERVICE_LINE = b"# service=git-receive-pack\n"


class ReceivePackError(ValueError):
    """The push request is malformed or over a limit; the message is fit for ``ERR``.

    ``sideband`` says whether the commands read before the error asked for
    side-band-64k: git then reads the answer through the bands, so the
    message must go on band 3 (an ``ERR`` packet there is "bad band #69").
    """

    sideband: bool = False


@attrs.frozen
class Command:
    """One ref update as the client asked for it; a zero id means "absent"."""

    old: ObjectID
    new: ObjectID
    ref: bytes

    @property
    def is_create(self) -> bool:
        return self.old == ZERO_OID and self.new != ZERO_OID

    @property
    def is_delete(self) -> bool:
        return self.new == ZERO_OID


@attrs.frozen
class PushRequest:
    """Everything before the pack.  ``capabilities`` are the raw tokens (``agent=...`` included)."""

    commands: tuple[Command, ...]
    capabilities: frozenset[bytes] = frozenset()
    push_options: tuple[bytes, ...] = ()
    shallow: tuple[ObjectID, ...] = ()
    agent: bytes | None = None

    @property
    def expects_pack(self) -> bool:
        """A pack follows unless every command is a delete (git's ``delete_only``)."""
        return any(not c.is_delete for c in self.commands)

    @property
    def report_status(self) -> bool:
        return b"report-status" in self.capabilities or b"report-status-v2" in self.capabilities

    @property
    def sideband(self) -> bool:
        return b"side-band-64k" in self.capabilities

    @property
    def quiet(self) -> bool:
        return b"quiet" in self.capabilities

    @property
    def atomic(self) -> bool:
        return b"atomic" in self.capabilities


@attrs.frozen
class RefResult:
    """The outcome for one command: ``error`` None is ``ok``, else the ``ng`` reason."""

    ref: bytes
    error: str | None = None


@attrs.frozen
class ReportStatus:
    """The answer to a push.

    ``messages`` are lines for the client's stderr (``error: ...``), sent on
    band 2 whatever ``quiet`` says, as git's ``rp_error`` does; without
    side-band there is nowhere to put them and they are dropped.
    """

    unpack_error: str | None
    results: tuple[RefResult, ...]
    messages: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        """True when the pack was accepted and every ref updated."""
        return self.unpack_error is None and all(r.error is None for r in self.results)


# -- advertisement ----------------------------------------------------------


def advertise(snapshot: RefSnapshot | None, *, http: bool) -> bytes:
    """The ref advertisement of receive-pack (no HEAD and no peeled lines, like git).

    *snapshot* None, or one without refs, advertises ``capabilities^{}`` so
    the client still learns the capabilities of an empty repository.
    """
    caps = b" ".join((*CAPABILITIES, b"agent=" + AGENT))
    refs: Mapping[bytes, ObjectID] = snapshot.refs if snapshot is not None else {}
    lines = [b"%s %s" % (refs[name], name) for name in sorted(refs)]
    lines = lines or [ZERO_OID + b" capabilities^{}"]
    lines[0] += b"\0" + caps
    prefix = pkt_line(_SERVICE_LINE) + FLUSH_PKT if http else b""
    return prefix + b"".join(pkt_line(line + b"\n") for line in lines) + FLUSH_PKT


# -- the request ------------------------------------------------------------


def _show(line: bytes) -> str:
    """A line as git quotes it in a protocol error, cut short."""
    return line[:200].decode("utf-8", "replace")


@attrs.define
class PushRequestParser:
    """Incremental parser of the push request (h11 style).

    Feed bytes with ``receive_data``; ``next_event`` returns ``NEED_DATA``
    until the request is complete, then the ``PushRequest``.  After that,
    ``take_unconsumed`` hands back the bytes already received that follow
    the request: the start of the pack.  Call ``end_of_input`` when the
    stream ends, to turn a truncated request into an error.
    """

    limits: Limits = attrs.field(factory=Limits)
    _decoder: PktLineDecoder = attrs.field(init=False)
    _in_options: bool = attrs.field(init=False, default=False)
    _commands: list[Command] = attrs.field(init=False, factory=list)
    _capabilities: set[bytes] = attrs.field(init=False, factory=set)
    _shallow: list[ObjectID] = attrs.field(init=False, factory=list)
    _options: list[bytes] = attrs.field(init=False, factory=list)
    _result: PushRequest | None = attrs.field(init=False, default=None)

    def __attrs_post_init__(self) -> None:
        self._decoder = PktLineDecoder(self.limits.max_empty_packets)

    def receive_data(self, data: bytes) -> None:
        if self._result is not None:
            raise RuntimeError("the push request is complete; take_unconsumed() the rest")
        self._decoder.receive_data(data)

    def next_event(self) -> PushRequest | Literal[NeedData.NEED_DATA]:
        """The parsed request, or ``NEED_DATA``; raises ReceivePackError or PktLineError."""
        try:
            while self._result is None:
                event = self._decoder.next_event()
                if event is NEED_DATA:
                    return NEED_DATA
                self._handle(event)
        except ReceivePackError as e:
            e.sideband = self.asked_sideband
            raise
        return self._result

    @property
    def asked_sideband(self) -> bool:
        """Whether the commands read so far asked for side-band-64k."""
        return b"side-band-64k" in self._capabilities

    def take_unconsumed(self) -> bytes:
        if self._result is None:
            raise RuntimeError("the push request is not complete yet")
        return self._decoder.take_unconsumed()

    def end_of_input(self) -> None:
        """The stream ended; raise unless the request was complete."""
        if self._result is None:
            self._decoder.check_complete()
            error = ReceivePackError("protocol error: the push request ended before its flush-pkt")
            error.sideband = self.asked_sideband
            raise error

    def _handle(self, event: object) -> None:
        if isinstance(event, Packet):
            if self._in_options:
                self._option_line(strip_newline(event.data))
            else:
                self._command_line(strip_newline(event.data))
        elif event is Special.FLUSH:
            if not self._in_options and self._commands and b"push-options" in self._capabilities:
                self._in_options = True
            else:
                self._finish()
        else:
            raise ReceivePackError(f"protocol error: unexpected {event} in a push request")

    def _command_line(self, line: bytes) -> None:
        if line.startswith(b"shallow "):
            value = line[8:]
            if not is_oid(value):
                raise ReceivePackError(
                    f"protocol error: expected shallow sha, got '{_show(value)}'"
                )
            if len(self._shallow) >= self.limits.max_haves:
                raise ReceivePackError(
                    f"protocol error: more than {self.limits.max_haves} shallow lines"
                )
            self._shallow.append(ObjectID(value))
            return
        text, nul, features = line.partition(b"\0")
        if text == b"push-cert":
            raise ReceivePackError("protocol error: push certificates are not supported")
        if nul:
            self._add_capabilities(features)
        old, new, ref = text[:40], text[41:81], text[82:]
        if (
            len(text) < 83
            or text[40:41] != b" "
            or text[81:82] != b" "
            or not is_oid(old)
            or not is_oid(new)
        ):
            raise ReceivePackError(f"protocol error: expected old/new/ref, got '{_show(text)}'")
        if len(self._commands) >= self.limits.max_push_commands:
            raise ReceivePackError(
                f"too many ref updates in one push (the limit is {self.limits.max_push_commands})"
            )
        self._commands.append(Command(ObjectID(old), ObjectID(new), ref))

    def _add_capabilities(self, features: bytes) -> None:
        for cap in features.split(b" "):
            if not cap:
                continue
            if cap.startswith(b"object-format=") and cap != b"object-format=sha1":
                raise ReceivePackError(
                    f"unsupported object format '{_show(cap[len(b'object-format=') :])}'"
                )
            self._capabilities.add(cap)

    def _option_line(self, line: bytes) -> None:
        if len(self._options) >= self.limits.max_push_commands:
            raise ReceivePackError(
                f"too many push options (the limit is {self.limits.max_push_commands})"
            )
        self._options.append(line)

    def _finish(self) -> None:
        agent = next((c[6:] for c in self._capabilities if c.startswith(b"agent=")), None)
        self._result = PushRequest(
            commands=tuple(self._commands),
            capabilities=frozenset(self._capabilities),
            push_options=tuple(self._options),
            shallow=tuple(self._shallow),
            agent=agent,
        )


def parse_request(data: bytes, limits: Limits | None = None) -> tuple[PushRequest, bytes]:
    """Parse a push request from the start of *data*; return it and the bytes after it."""
    parser = PushRequestParser(limits or Limits())
    parser.receive_data(data)
    request = parser.next_event()
    if not isinstance(request, PushRequest):
        parser.end_of_input()
        raise AssertionError("end_of_input raises on an incomplete request")
    return request, parser.take_unconsumed()


def receive_request(
    read: Callable[[int], bytes], limits: Limits | None = None, *, chunk_size: int = 64 * 1024
) -> tuple[PushRequest, bytes]:
    """Read a request through a blocking *read(n)*; return it and the bytes read past it.

    Those bytes are the start of the pack; the rest is still to be read.
    """
    parser = PushRequestParser(limits or Limits())
    while True:
        request = parser.next_event()
        if isinstance(request, PushRequest):
            return request, parser.take_unconsumed()
        chunk = read(chunk_size)
        if not chunk:
            parser.end_of_input()
        parser.receive_data(chunk)


def read_request(
    stream: BinaryIO, limits: Limits | None = None, *, chunk_size: int = 64 * 1024
) -> tuple[PushRequest, BinaryIO | None]:
    """Read the request from a seekable *stream* (a spooled body) and leave it at the pack.

    Returns the request and *stream* positioned at the first pack byte, or
    None in place of the stream when no pack is expected.
    """
    request, rest = receive_request(stream.read, limits, chunk_size=chunk_size)
    stream.seek(-len(rest), 1)
    return request, stream if request.expects_pack else None


# -- the answer -------------------------------------------------------------


def _reason(text: str) -> bytes:
    # A reason is the rest of one pkt-line: no newline may cut it short.
    return " ".join(text.split()).encode("utf-8", "replace")


def _report_lines(report: ReportStatus) -> bytes:
    out = bytearray()
    if report.unpack_error is None:
        out += pkt_line(b"unpack ok\n")
    else:
        out += pkt_line(b"unpack %s\n" % _reason(report.unpack_error))
    for result in report.results:
        if result.error is None:
            out += pkt_line(b"ok %s\n" % result.ref)
        else:
            out += pkt_line(b"ng %s %s\n" % (result.ref, _reason(result.error)))
    out += FLUSH_PKT
    return bytes(out)


def encode_report(report: ReportStatus, *, sideband: bool) -> bytes:
    """Report-status (the same lines serve report-status-v2: we send no option lines).

    With *sideband* the report travels in band 1 after the messages in band
    2, and a final flush ends the response, as git's receive-pack does.
    """
    if not sideband:
        return _report_lines(report)
    return _messages(report.messages) + _band(1, _report_lines(report)) + FLUSH_PKT


def encode_response(request: PushRequest, report: ReportStatus) -> bytes:
    """The whole response to *request*, honouring what the client negotiated.

    A report only when report-status (or -v2) was asked for; with side-band,
    messages on band 2 and the closing flush even without a report.
    """
    if not request.commands:
        return b""
    if request.report_status:
        return encode_report(report, sideband=request.sideband)
    if request.sideband:
        return _messages(report.messages) + FLUSH_PKT
    return b""


def progress(message: str | bytes) -> bytes:
    """A progress message for band 2; the caller sends none when the client asked for quiet."""
    if isinstance(message, str):
        message = message.encode("utf-8", "replace")
    return _band(2, message)


def refusal(message: str, *, sideband: bool) -> bytes:
    """*message* where a client that sent a push reads it: band 3 if it asked for side-band
    (git reads the answer through the bands, and an ``ERR`` packet there is "bad band #69"),
    else an ``ERR`` packet."""
    if sideband:
        return _band(3, message.encode("utf-8", "replace") + b"\n")
    return error_pkt(message)


def _messages(messages: Iterable[str]) -> bytes:
    return b"".join(progress(m if m.endswith("\n") else m + "\n") for m in messages)


def _band(band: int, data: bytes) -> bytes:
    return b"".join(sideband(band, data))
