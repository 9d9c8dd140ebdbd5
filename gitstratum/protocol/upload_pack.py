"""Upload-pack on the wire, sans I/O: request parsing, advertisements, negotiation and framing.

Protocol v2 (``ls-refs`` and ``fetch``) and v0/v1 in the stateless-rpc form
that smart HTTP uses: one complete request body in, one response out.  The
parsers turn a body into a frozen request value; the encoders turn answers
into pkt-lines.  Negotiation follows git's upload-pack line for line, but the
questions it needs the commit graph for ("do we have this?", "can every want
reach a have?") are asked of a ``HaveOracle`` (``walker.Negotiator`` over the
metadata store), so this module never touches storage.

Errors a client caused are ``UploadPackError``; its text, in git's own words
where git has them, goes out as an ``ERR`` packet.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Protocol

import attrs

from gitstratum import __version__
from gitstratum.core.limits import (
    INT32_MAX,
    INT63_MAX,
    MAX_SIDEBAND_DATA,
    Limits,
    NumberError,
    parse_number,
)
from gitstratum.core.oid import ZERO_OID, ObjectID, is_oid
from gitstratum.core.pktline import (
    DELIM_PKT,
    FLUSH_PKT,
    NEED_DATA,
    Packet,
    PktLineDecoder,
    PktLineError,
    Special,
    pkt_line,
    pkt_lines,
    strip_newline,
)
from gitstratum.storage.interfaces import RefSnapshot

__all__ = [
    "AGENT",
    "SERVICE",
    "INFINITE_DEPTH",
    "SIDEBAND_64K",
    "SIDEBAND_SMALL",
    "V0_CAPABILITIES",
    "V2_CAPABILITIES",
    "UploadPackError",
    "FilterKind",
    "ObjectFilter",
    "MultiAck",
    "LsRefsRequest",
    "FetchRequest",
    "HaveOracle",
    "parse_v0_request",
    "parse_v2_request",
    "http_header",
    "capability_advertisement",
    "ref_advertisement",
    "ls_refs_response",
    "negotiate_v0",
    "V0Negotiation",
    "parse_have_round",
    "process_haves",
    "v0_shallow_section",
    "v2_acknowledgments",
    "v2_shallow_info",
    "v2_wanted_refs",
    "PACKFILE_SECTION",
    "frame_band",
]

AGENT = b"gitstratum/" + __version__.encode("ascii")
SERVICE = b"git-upload-pack"

#: what ``git fetch --unshallow`` sends as its depth (git's INFINITE_DEPTH)
INFINITE_DEPTH = INT32_MAX

#: data bytes per side-band packet: side-band-64k, and the original side-band (1000-byte packets)
SIDEBAND_64K = MAX_SIDEBAND_DATA
SIDEBAND_SMALL = 1000 - 5

V0_CAPABILITIES: tuple[bytes, ...] = (
    b"multi_ack",
    b"thin-pack",
    b"side-band",
    b"side-band-64k",
    b"ofs-delta",
    b"shallow",
    b"deepen-since",
    b"deepen-not",
    b"deepen-relative",
    b"no-progress",
    b"include-tag",
    b"multi_ack_detailed",
    b"allow-tip-sha1-in-want",
    b"allow-reachable-sha1-in-want",
)

V2_CAPABILITIES: tuple[bytes, ...] = (
    b"agent=" + AGENT,
    b"ls-refs=unborn",
    b"fetch=shallow wait-for-done filter ref-in-want",
    b"server-option",
    b"object-format=sha1",
)

# git stops honouring ref-prefix past this many and lists everything instead
_TOO_MANY_PREFIXES = 65
_KNOWN_HASHES = (b"sha1", b"sha256")


class UploadPackError(Exception):
    """A request git's upload-pack would refuse; str() is the text of the ERR packet."""


def _show(data: bytes, limit: int = 100) -> str:
    """Client bytes quoted in an error message: decoded leniently and cut short."""
    text = data[:limit].decode("utf-8", "backslashreplace")
    return text + ("..." if len(data) > limit else "")


# -- filters ---------------------------------------------------------------


class FilterKind(enum.Enum):
    """The partial-clone filters we serve (``rev-list --filter``'s names)."""

    BLOB_NONE = "blob:none"
    BLOB_LIMIT = "blob:limit"
    TREE_DEPTH = "tree"


# filters git knows that we do not serve: refused by name, like uploadpackfilter.<name>.allow=false
_UNSERVED_FILTERS = (b"sparse:oid", b"object:type", b"combine")


@attrs.frozen
class ObjectFilter:
    """A parsed ``filter`` argument; ``limit`` is blob:limit's byte count (0 for the others)."""

    kind: FilterKind
    limit: int = 0

    @property
    def spec(self) -> bytes:
        """The canonical spec (scaled sizes written out), the form a cache key uses."""
        if self.kind is FilterKind.BLOB_LIMIT:
            return b"blob:limit=%d" % self.limit
        if self.kind is FilterKind.TREE_DEPTH:
            return b"tree:0"
        return b"blob:none"

    @classmethod
    def parse(cls, spec: bytes) -> ObjectFilter:
        """Parse blob:none, blob:limit=<n>[kmg] or tree:0; anything else is an UploadPackError."""
        if spec == b"blob:none":
            return cls(FilterKind.BLOB_NONE)
        if spec.startswith(b"blob:limit="):
            size = _number(
                spec[len(b"blob:limit=") :], f"invalid filter-spec '{_show(spec)}'", suffixes=True
            )
            return cls(FilterKind.BLOB_LIMIT, size)
        if spec.startswith(b"tree:"):
            depth = _number(
                spec[len(b"tree:") :], f"invalid filter-spec '{_show(spec)}'", suffixes=True
            )
            if depth != 0:
                # git's wording when uploadpackfilter.tree.maxDepth is 0
                raise UploadPackError(f"tree filter allows max depth 0, but got {depth}")
            return cls(FilterKind.TREE_DEPTH)
        for name in _UNSERVED_FILTERS:
            if spec.startswith(name):
                raise UploadPackError(f"filter '{name.decode()}' not supported")
        raise UploadPackError(f"invalid filter-spec '{_show(spec)}'")


# -- requests --------------------------------------------------------------


class MultiAck(enum.IntEnum):
    """v0 acknowledgment styles, from plain ACK to multi_ack_detailed."""

    NONE = 0
    MULTI_ACK = 1
    DETAILED = 2


@attrs.frozen
class LsRefsRequest:
    """A v2 ``ls-refs`` command; no ``prefixes`` means every ref."""

    symrefs: bool = False
    peel: bool = False
    unborn: bool = False
    prefixes: tuple[bytes, ...] = ()
    agent: bytes | None = None
    server_options: tuple[bytes, ...] = ()


@attrs.frozen
class FetchRequest:
    """A fetch, from v2's ``fetch`` command or a v0 stateless-rpc body.

    ``wants`` keep the client's order without repeats.  The v0-only fields:
    ``multi_ack``, ``no_done``, ``sideband`` (data bytes per side-band packet,
    0 for a raw pack; v2 is always side-band-64k) and ``awaiting_haves``,
    true when the body stopped after the wants (the shallow-list round a
    stateless client makes before it negotiates).
    """

    wants: tuple[ObjectID, ...] = ()
    want_refs: tuple[bytes, ...] = ()
    haves: tuple[ObjectID, ...] = ()
    shallows: tuple[ObjectID, ...] = ()
    depth: int = 0
    deepen_relative: bool = False
    deepen_since: int | None = None
    deepen_not: tuple[bytes, ...] = ()
    filter: ObjectFilter | None = None
    done: bool = False
    thin_pack: bool = False
    ofs_delta: bool = False
    include_tag: bool = False
    no_progress: bool = False
    wait_for_done: bool = False
    agent: bytes | None = None
    server_options: tuple[bytes, ...] = ()
    multi_ack: MultiAck = MultiAck.NONE
    no_done: bool = False
    sideband: int = SIDEBAND_64K
    awaiting_haves: bool = False

    @property
    def deepen_rev_list(self) -> bool:
        """Whether the shallow cut is by date or by excluded refs rather than by depth."""
        return self.deepen_since is not None or bool(self.deepen_not)

    @property
    def deepens(self) -> bool:
        """Whether the client asked for a new shallow boundary (so a shallow list is owed)."""
        return self.depth > 0 or self.deepen_rev_list


class _Reader:
    """Events of one complete request body, or None at its end; framing errors as UploadPackError."""

    def __init__(self, data: bytes, limits: Limits):
        self._decoder = PktLineDecoder(limits.max_empty_packets)
        self._decoder.receive_data(data)
        self._peeked: Packet | Special | None = None

    def peek(self) -> Packet | Special | None:
        if self._peeked is None:
            self._peeked = self._read()
        return self._peeked

    def next(self) -> Packet | Special | None:
        event = self.peek()
        self._peeked = None
        return event

    def _read(self) -> Packet | Special | None:
        try:
            event = self._decoder.next_event()
            if event is NEED_DATA:
                self._decoder.check_complete()
                return None
        except PktLineError as e:
            raise UploadPackError(str(e)) from None
        return event


def _oid_arg(value: bytes, message: str) -> ObjectID:
    if not is_oid(value):
        raise UploadPackError(message)
    return ObjectID(value)


def _number(
    value: bytes, message: str, *, low: int = 0, high: int = INT63_MAX, suffixes: bool = False
) -> int:
    """A number from the request, through the one bounded parser; *message* (git's words) and
    the reason on refusal."""
    try:
        return parse_number(value, low=low, high=high, suffixes=suffixes)
    except NumberError as e:
        raise UploadPackError(f"{message} ({e})") from None


def _check_object_format(value: bytes) -> None:
    if value == b"sha1":
        return
    if value in _KNOWN_HASHES:
        raise UploadPackError(f"mismatched object format: server sha1; client {_show(value)}")
    raise UploadPackError(f"unknown object format '{_show(value)}'")


class _FetchArgs:
    """The mutable tally behind FetchRequest while its lines are read."""

    def __init__(self, limits: Limits):
        self.limits = limits
        self.wants: dict[ObjectID, None] = {}
        self.want_refs: dict[bytes, None] = {}
        self.haves: list[ObjectID] = []
        self.shallows: dict[ObjectID, None] = {}
        self.fields: dict[str, object] = {}
        self.deepen_not: list[bytes] = []

    def want(self, value: bytes, line: bytes, v2: bool) -> None:
        what = "oid" if v2 else "object ID"
        oid = _oid_arg(
            value,
            f"git upload-pack: protocol error, expected to get {what}, not '{_show(line)}'",
        )
        self.wants[oid] = None
        if len(self.wants) > self.limits.max_wants:
            raise UploadPackError(
                f"upload-pack: too many wants (the limit is {self.limits.max_wants})"
            )

    def have(self, value: bytes) -> None:
        self.haves.append(
            _oid_arg(value, f"git upload-pack: expected SHA1 object, got '{_show(value)}'")
        )
        if len(self.haves) > self.limits.max_haves:
            raise UploadPackError(
                f"upload-pack: too many haves (the limit is {self.limits.max_haves})"
            )

    def shallow_or_deepen(self, line: bytes) -> bool:
        """Handle the shallow-related lines both protocols share; False if *line* is not one."""
        if line.startswith(b"shallow "):
            oid = _oid_arg(line[8:], f"invalid shallow line: {_show(line)}")
            self.shallows[oid] = None
            if len(self.shallows) > self.limits.max_haves:
                raise UploadPackError(
                    f"upload-pack: too many shallow lines (the limit is {self.limits.max_haves})"
                )
        elif line.startswith(b"deepen "):
            # git's own INFINITE_DEPTH (what --unshallow sends) is the deepest there is
            self.fields["depth"] = _number(
                line[7:], f"Invalid deepen: {_show(line)}", low=1, high=INFINITE_DEPTH
            )
        elif line.startswith(b"deepen-since "):
            self.fields["deepen_since"] = _number(
                line[13:], f"Invalid deepen-since: {_show(line)}", low=1
            )
        elif line.startswith(b"deepen-not "):
            name = line[11:]
            if not name:
                raise UploadPackError(f"git upload-pack: ambiguous deepen-not: {_show(line)}")
            self.deepen_not.append(name)
        else:
            return False
        return True

    def filter(self, spec: bytes) -> None:
        if "filter" in self.fields:
            raise UploadPackError("multiple filter-specs cannot be combined")
        self.fields["filter"] = ObjectFilter.parse(spec)

    def build(self, **extra: object) -> FetchRequest:
        if self.fields.get("depth") and ("deepen_since" in self.fields or self.deepen_not):
            raise UploadPackError(
                "git upload-pack: deepen and deepen-since (or deepen-not) cannot be used together"
            )
        kwargs: dict[str, object] = {
            "wants": tuple(self.wants),
            "want_refs": tuple(self.want_refs),
            "haves": tuple(self.haves),
            "shallows": tuple(self.shallows),
            "deepen_not": tuple(self.deepen_not),
            **self.fields,
            **extra,
        }
        return FetchRequest(**kwargs)  # type: ignore[arg-type]


_V0_FLAGS = {
    b"thin-pack": "thin_pack",
    b"ofs-delta": "ofs_delta",
    b"no-progress": "no_progress",
    b"include-tag": "include_tag",
    b"no-done": "no_done",
    b"deepen-relative": "deepen_relative",
}


def parse_v0_request(data: bytes, limits: Limits) -> FetchRequest:
    """Parse a v0/v1 stateless-rpc upload-pack body (wants, shallow/deepen, flush, haves, done).

    Capabilities are read from every want line (git reads them from each),
    though a client sends them on the first only.
    """
    reader = _Reader(data, limits)
    args = _FetchArgs(limits)
    caps: set[bytes] = set()
    agent: bytes | None = None
    filters: list[bytes] = []
    while True:
        event = reader.next()
        if event is Special.FLUSH:
            break
        if not isinstance(event, Packet):
            raise UploadPackError(
                "git upload-pack: protocol error, expected a flush after the wants"
                if event is None
                else f"git upload-pack: protocol error, unexpected {event.name.lower()} packet"
            )
        line = strip_newline(event.data)
        if args.shallow_or_deepen(line):
            continue
        if line.startswith(b"filter "):
            filters.append(line[7:])
            continue
        if not line.startswith(b"want "):
            raise UploadPackError(
                f"git upload-pack: protocol error, expected to get object ID, not '{_show(line)}'"
            )
        value, _, features = line[5:].partition(b" ")
        args.want(value, line, v2=False)
        for feature in features.split():
            if feature.startswith(b"agent="):
                agent = feature[6:]
            elif feature.startswith(b"object-format="):
                _check_object_format(feature[14:])
            else:
                caps.add(feature)
    if filters and b"filter" not in caps:
        raise UploadPackError("git upload-pack: filtering capability not negotiated")
    for spec in filters:
        args.filter(spec)

    extra: dict[str, object] = {name: True for cap, name in _V0_FLAGS.items() if cap in caps}
    extra["agent"] = agent
    if b"multi_ack_detailed" in caps:
        extra["multi_ack"] = MultiAck.DETAILED
    elif b"multi_ack" in caps:
        extra["multi_ack"] = MultiAck.MULTI_ACK
    if b"side-band-64k" in caps:
        extra["sideband"] = SIDEBAND_64K
    elif b"side-band" in caps:
        extra["sideband"] = SIDEBAND_SMALL
    else:
        extra["sideband"] = 0

    # After the wants: nothing (the stateless shallow-list round), or haves ending in flush or done.
    if reader.peek() is None:
        return args.build(awaiting_haves=True, **extra)
    extra["done"] = _read_haves(reader, args)
    return args.build(**extra)


def _read_haves(reader: _Reader, args: _FetchArgs) -> bool:
    """Read have lines up to a flush (False) or ``done`` (True), as git's get_common_commits."""
    while True:
        event = reader.next()
        if event is Special.FLUSH:
            return False
        if not isinstance(event, Packet):
            raise UploadPackError(
                "git upload-pack: protocol error, expected a flush or done after the haves"
                if event is None
                else f"git upload-pack: protocol error, unexpected {event.name.lower()} packet"
            )
        line = strip_newline(event.data)
        if line.startswith(b"have "):
            args.have(line[5:])
        elif line == b"done":
            return True
        else:
            raise UploadPackError(f"git upload-pack: expected SHA1 list, got '{_show(line)}'")


def parse_have_round(data: bytes, limits: Limits) -> tuple[tuple[ObjectID, ...], bool]:
    """One round of a stateful v0 negotiation: have lines ending in a flush or in ``done``.

    Returns the haves, in the client's order, and whether the round ended in
    ``done``.  Over ssh:// and git:// a connection sends many such rounds
    after one want section; ``V0Negotiation`` answers them.
    """
    args = _FetchArgs(limits)
    done = _read_haves(_Reader(data, limits), args)
    return tuple(args.haves), done


_V2_FETCH_FLAGS = {
    b"thin-pack": "thin_pack",
    b"ofs-delta": "ofs_delta",
    b"no-progress": "no_progress",
    b"include-tag": "include_tag",
    b"done": "done",
    b"wait-for-done": "wait_for_done",
    b"deepen-relative": "deepen_relative",
}
_V2_COMMANDS = (b"ls-refs", b"fetch")


def parse_v2_request(data: bytes, limits: Limits) -> LsRefsRequest | FetchRequest | None:
    """Parse one v2 command request; None for the empty request (a lone flush, or nothing)."""
    reader = _Reader(data, limits)
    command: bytes | None = None
    agent: bytes | None = None
    options: list[bytes] = []
    seen_any = False
    while True:
        event = reader.peek()
        if event is None or event is Special.FLUSH:
            # The flush stays for the command's own reader, as in git's serve loop.
            if not seen_any:
                return None
            break
        reader.next()
        if event is Special.DELIM:
            break
        if not isinstance(event, Packet):
            raise UploadPackError("protocol error: unexpected response-end packet")
        seen_any = True
        line = strip_newline(event.data)
        if line.startswith(b"command="):
            name = line[8:]
            if command is not None:
                raise UploadPackError(
                    f"command '{_show(name)}' requested after already requesting command "
                    f"'{command.decode()}'"
                )
            if name not in _V2_COMMANDS:
                raise UploadPackError(f"unknown command '{_show(name)}'")
            command = name
        elif line.startswith(b"agent="):
            agent = line[6:]
        elif line.startswith(b"object-format="):
            _check_object_format(line[14:])
        elif line.startswith(b"server-option="):
            options.append(line[14:])
        else:
            raise UploadPackError(f"unknown capability '{_show(line)}'")
    if command is None:
        raise UploadPackError("no command requested")
    if command == b"ls-refs":
        return _parse_ls_refs(reader, agent, tuple(options))
    return _parse_fetch(reader, limits, agent, tuple(options))


def _command_args(reader: _Reader, command: str) -> Iterator[bytes]:
    while True:
        event = reader.next()
        if event is Special.FLUSH:
            return
        if not isinstance(event, Packet):
            raise UploadPackError(f"expected flush after {command} arguments")
        yield strip_newline(event.data)


def _parse_ls_refs(
    reader: _Reader, agent: bytes | None, options: tuple[bytes, ...]
) -> LsRefsRequest:
    flags = {"symrefs": False, "peel": False, "unborn": False}
    prefixes: list[bytes] = []
    too_many = False
    for line in _command_args(reader, "ls-refs"):
        if line in (b"symrefs", b"peel", b"unborn"):
            flags[line.decode()] = True
        elif line.startswith(b"ref-prefix "):
            if too_many:
                continue
            if len(prefixes) >= _TOO_MANY_PREFIXES:
                too_many = True
                prefixes.clear()
            else:
                prefixes.append(line[11:])
        else:
            raise UploadPackError(f"unexpected line: '{_show(line)}'")
    return LsRefsRequest(
        prefixes=tuple(prefixes),
        agent=agent,
        server_options=options,
        **flags,
    )


def _parse_fetch(
    reader: _Reader, limits: Limits, agent: bytes | None, options: tuple[bytes, ...]
) -> FetchRequest:
    args = _FetchArgs(limits)
    flags: dict[str, object] = {}
    for line in _command_args(reader, "fetch"):
        if line.startswith(b"want "):
            args.want(line[5:], line, v2=True)
        elif line.startswith(b"want-ref "):
            name = line[9:]
            if name in args.want_refs:
                raise UploadPackError(f"want-ref {_show(name)} requested more than once")
            args.want_refs[name] = None
            if len(args.want_refs) > limits.max_wants:
                raise UploadPackError(
                    f"upload-pack: too many wants (the limit is {limits.max_wants})"
                )
        elif line.startswith(b"have "):
            args.have(line[5:])
        elif line in _V2_FETCH_FLAGS:
            flags[_V2_FETCH_FLAGS[line]] = True
        elif args.shallow_or_deepen(line):
            pass
        elif line.startswith(b"filter "):
            args.filter(line[7:])
        else:
            raise UploadPackError(f"unexpected line: '{_show(line)}'")
    return args.build(agent=agent, server_options=options, **flags)


# -- advertisements --------------------------------------------------------


def http_header() -> bytes:
    """What smart HTTP puts before an upload-pack advertisement (v0 and v2 alike)."""
    return pkt_line(b"# service=" + SERVICE + b"\n") + FLUSH_PKT


def capability_advertisement() -> bytes:
    """The v2 capability advertisement."""
    return pkt_lines(b"version 2\n", *(cap + b"\n" for cap in V2_CAPABILITIES)) + FLUSH_PKT


def _ordered_refs(snapshot: RefSnapshot) -> list[tuple[bytes, ObjectID]]:
    """HEAD (when it resolves) first, then every ref by name."""
    head = snapshot.head_oid()
    refs = [(b"HEAD", head)] if head is not None else []
    refs.extend(sorted(snapshot.refs.items()))
    return refs


def ref_advertisement(
    snapshot: RefSnapshot, peeled: Mapping[ObjectID, ObjectID], *, no_done: bool
) -> bytes:
    """The v0 ref advertisement: capabilities after NUL on the first line, ``^{}`` peeled lines.

    *peeled* maps annotated tag ids to what they finally point at.  An empty
    repository advertises the zero id as ``capabilities^{}``.  ``no-done``
    only means something to stateless clients, so git offers it over HTTP only.
    """
    caps = list(V0_CAPABILITIES)
    if no_done:
        caps.append(b"no-done")
    if snapshot.head_oid() is not None:
        caps.append(b"symref=HEAD:" + snapshot.head)
    caps += [b"filter", b"object-format=sha1", b"agent=" + AGENT]
    cap_text = b"\0" + b" ".join(caps)
    out: list[bytes] = []
    for name, value in _ordered_refs(snapshot):
        out.append(pkt_line(value + b" " + name + (cap_text if not out else b"") + b"\n"))
        if value in peeled:
            out.append(pkt_line(peeled[value] + b" " + name + b"^{}\n"))
    if not out:
        out.append(pkt_line(ZERO_OID + b" capabilities^{}" + cap_text + b"\n"))
    out.append(FLUSH_PKT)
    return b"".join(out)


def ls_refs_response(
    request: LsRefsRequest, snapshot: RefSnapshot, peeled: Mapping[ObjectID, ObjectID]
) -> bytes:
    """The answer to ``ls-refs``: HEAD first, then refs by name, each filtered by ref-prefix."""

    def wanted(name: bytes) -> bool:
        return not request.prefixes or any(name.startswith(p) for p in request.prefixes)

    out: list[bytes] = []
    head = snapshot.head_oid()
    if head is None and request.unborn and request.symrefs and wanted(b"HEAD"):
        out.append(pkt_line(b"unborn HEAD symref-target:" + snapshot.head + b"\n"))
    for name, value in _ordered_refs(snapshot):
        if not wanted(name):
            continue
        line = value + b" " + name
        if name == b"HEAD" and request.symrefs:
            line += b" symref-target:" + snapshot.head
        if request.peel and value in peeled:
            line += b" peeled:" + peeled[value]
        out.append(pkt_line(line + b"\n"))
    out.append(FLUSH_PKT)
    return b"".join(out)


# -- negotiation -----------------------------------------------------------


class HaveOracle(Protocol):
    """What negotiation asks of the repository (implemented by walker.Negotiator)."""

    def got_oid(self, oid: ObjectID) -> int:
        """Record a have: -1 if this repository lacks it, 1 if newly common, 0 if already known."""
        ...

    def ok_to_give_up(self) -> bool:
        """Whether every want reaches something the client has (so a pack can be cut)."""
        ...

    @property
    def have_count(self) -> int:
        """How many haves were recorded as common."""
        ...


@attrs.define
class V0Negotiation:
    """git's get_common_commits, one round at a time, for one connection.

    A round is the haves up to a flush or ``done``.  Over a stateful stream
    (ssh://, git://) the rounds of a connection share what was learnt: the
    oracle's haves and the last common commit, which the final ``ACK`` names.
    A stateless request is a single round of a fresh negotiation.
    """

    multi_ack: MultiAck = MultiAck.NONE
    no_done: bool = False
    _last: bytes = attrs.field(default=b"", init=False)

    def round(
        self, haves: Iterable[ObjectID], done: bool, oracle: HaveOracle
    ) -> tuple[bytes, bool]:
        """The ACK/NAK packets for one round, and whether the pack follows them.

        A round ending in a flush gets its ACKs and NAK and no pack, unless
        no-done was negotiated and we sent "ready"; a round ending in
        ``done`` gets the pack.
        """
        out: list[bytes] = []
        detailed = self.multi_ack is MultiAck.DETAILED
        multi_ack = self.multi_ack is not MultiAck.NONE
        got_common = got_other = sent_ready = False
        for have in haves:
            if oracle.got_oid(have) < 0:
                got_other = True
                if multi_ack and oracle.ok_to_give_up():
                    if detailed:
                        sent_ready = True
                        out.append(b"ACK %s ready\n" % have)
                    else:
                        out.append(b"ACK %s continue\n" % have)
                continue
            got_common = True
            self._last = have
            if detailed:
                out.append(b"ACK %s common\n" % have)
            elif multi_ack:
                out.append(b"ACK %s continue\n" % have)
            elif oracle.have_count == 1:
                out.append(b"ACK %s\n" % have)
        last = self._last
        if done:
            if oracle.have_count > 0:
                if multi_ack:
                    out.append(b"ACK %s\n" % last)
            else:
                out.append(b"NAK\n")
            return pkt_lines(*out), True
        if detailed and got_common and not got_other and oracle.ok_to_give_up():
            sent_ready = True
            out.append(b"ACK %s ready\n" % last)
        if oracle.have_count == 0 or multi_ack:
            out.append(b"NAK\n")
        if self.no_done and sent_ready:
            out.append(b"ACK %s\n" % last)
            return pkt_lines(*out), True
        return pkt_lines(*out), False


def negotiate_v0(request: FetchRequest, oracle: HaveOracle) -> tuple[bytes, bool]:
    """Answer a stateless v0 have round the way git's get_common_commits does.

    Returns the ACK/NAK packets and whether the pack follows (see
    ``V0Negotiation.round``; a stateless request is one round of its own).
    """
    return V0Negotiation(request.multi_ack, request.no_done).round(
        request.haves, request.done, oracle
    )


def process_haves(haves: Iterable[ObjectID], oracle: HaveOracle) -> list[ObjectID]:
    """v2: record every have and return the common ones, in order, each once."""
    common: dict[ObjectID, None] = {}
    for have in haves:
        if oracle.got_oid(have) >= 0:
            common[have] = None
    return list(common)


# -- response framing ------------------------------------------------------


def _shallow_lines(shallow: Sequence[ObjectID], unshallow: Sequence[ObjectID]) -> list[bytes]:
    return [pkt_line(b"shallow " + c + b"\n") for c in shallow] + [
        pkt_line(b"unshallow " + c + b"\n") for c in unshallow
    ]


def v0_shallow_section(shallow: Sequence[ObjectID], unshallow: Sequence[ObjectID]) -> bytes:
    """v0's answer to deepening: shallow and unshallow lines, then a flush."""
    return b"".join(_shallow_lines(shallow, unshallow)) + FLUSH_PKT


def v2_acknowledgments(common: Sequence[ObjectID], ready: bool) -> bytes:
    """The acknowledgments section (without the delim or flush that ends it)."""
    lines = [b"acknowledgments\n"]
    lines += [b"ACK %s\n" % c for c in common] if common else [b"NAK\n"]
    if ready:
        lines.append(b"ready\n")
    return pkt_lines(*lines)


def v2_shallow_info(shallow: Sequence[ObjectID], unshallow: Sequence[ObjectID]) -> bytes:
    """The shallow-info section, with its closing delim."""
    return pkt_line(b"shallow-info\n") + b"".join(_shallow_lines(shallow, unshallow)) + DELIM_PKT


def v2_wanted_refs(refs: Sequence[tuple[bytes, ObjectID]]) -> bytes:
    """The wanted-refs section, with its closing delim."""
    lines = [b"wanted-refs\n"] + [oid + b" " + name + b"\n" for name, oid in refs]
    return pkt_lines(*lines) + DELIM_PKT


#: the header of v2's last section; side-band data follows it
PACKFILE_SECTION = pkt_line(b"packfile\n")


def frame_band(band: int, data: bytes, max_payload: int = SIDEBAND_64K) -> bytes:
    """*data* as side-band packets of *band*, at most *max_payload* data bytes each.

    One join over headers and memoryview slices: every cached pack byte goes
    through here, so it is copied once, not once per packet and again to join.
    """
    view = memoryview(data)
    size = len(view)
    parts: list[bytes | memoryview] = []
    for start in range(0, size, max_payload):
        end = min(start + max_payload, size)
        parts.append(b"%04x%c" % (end - start + 5, band))
        parts.append(view[start:end])
    return b"".join(parts)


def framed_size(size: int, max_payload: int = SIDEBAND_64K) -> int:
    """How many bytes ``frame_stream`` turns *size* payload bytes into."""
    return size + 5 * -(-size // max_payload)


def frame_stream(
    band: int, chunks: Iterable[bytes], max_payload: int = SIDEBAND_64K
) -> Iterator[bytes]:
    """*chunks* as one run of side-band packets of *band*, every packet full but the last.

    Unlike ``frame_band`` per chunk, packet boundaries do not follow chunk
    boundaries, so the framed length is ``framed_size`` of the total and can
    be announced (as a Content-Length) before the first byte.  Each output
    chunk is one join over memoryviews: every byte is copied once.
    """
    carry: list[memoryview] = []
    carried = 0
    for chunk in chunks:
        view = memoryview(chunk)
        parts: list[bytes | memoryview] = []
        pos = 0
        if carried:
            take = min(max_payload - carried, len(view))
            carry.append(view[:take])
            carried += take
            pos = take
            if carried < max_payload:
                continue
            parts.append(b"%04x%c" % (carried + 5, band))
            parts.extend(carry)
            carry, carried = [], 0
        full_end = pos + (len(view) - pos) // max_payload * max_payload
        for start in range(pos, full_end, max_payload):
            parts.append(b"%04x%c" % (max_payload + 5, band))
            parts.append(view[start : start + max_payload])
        if full_end < len(view):
            carry.append(view[full_end:])
            carried = len(view) - full_end
        if parts:
            yield b"".join(parts)
    if carried:
        yield b"".join([b"%04x%c" % (carried + 5, band), *carry])
