"""The upload-pack wire engine, pure: parsing, advertisements, negotiation and framing."""

from __future__ import annotations

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gitstratum.core.limits import INT32_MAX, INT63_MAX, Limits
from gitstratum.core.oid import ZERO_OID, ObjectID
from gitstratum.core.pktline import (
    DELIM_PKT,
    FLUSH_PKT,
    Packet,
    PktLineDecoder,
    Special,
    pkt_line,
    pkt_lines,
)
from gitstratum.protocol.upload_pack import (
    AGENT,
    INFINITE_DEPTH,
    SIDEBAND_64K,
    SIDEBAND_SMALL,
    V0_CAPABILITIES,
    FetchRequest,
    FilterKind,
    LsRefsRequest,
    MultiAck,
    ObjectFilter,
    UploadPackError,
    capability_advertisement,
    frame_band,
    http_header,
    ls_refs_response,
    negotiate_v0,
    parse_v0_request,
    parse_v2_request,
    process_haves,
    ref_advertisement,
    v0_shallow_section,
    v2_acknowledgments,
    v2_shallow_info,
    v2_wanted_refs,
)
from gitstratum.storage.interfaces import RefSnapshot

A = ObjectID(b"a" * 40)
B = ObjectID(b"b" * 40)
C = ObjectID(b"c" * 40)
D = ObjectID(b"d" * 40)
T = ObjectID(b"7" * 40)  # an annotated tag
LIMITS = Limits()

oids = st.binary(min_size=20, max_size=20).map(lambda b: ObjectID(b.hex().encode()))


def events(data: bytes) -> list[Packet | Special]:
    decoder = PktLineDecoder()
    decoder.receive_data(data)
    found = list(decoder.events())
    decoder.check_complete()
    return found


def lines(data: bytes) -> list[bytes | Special]:
    """Packets as payloads (specials as themselves), the way the tests read responses."""
    return [e.data if isinstance(e, Packet) else e for e in events(data)]


def v2(*caps: str | bytes, args: tuple[str | bytes, ...] = ()) -> bytes:
    """A v2 command request: capability lines, delim, argument lines, flush."""
    return pkt_lines(*caps) + DELIM_PKT + pkt_lines(*args) + FLUSH_PKT


def fetch(*args: str | bytes) -> bytes:
    return v2("command=fetch\n", "agent=git/2.39.5\n", "object-format=sha1\n", args=args)


def want(oid: bytes, caps: bytes = b"") -> bytes:
    return pkt_line(b"want " + oid + (b" " + caps if caps else b"") + b"\n")


# -- filters ------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, kind, limit",
    [
        (b"blob:none", FilterKind.BLOB_NONE, 0),
        (b"blob:limit=0", FilterKind.BLOB_LIMIT, 0),
        (b"blob:limit=1500", FilterKind.BLOB_LIMIT, 1500),
        (b"blob:limit=1k", FilterKind.BLOB_LIMIT, 1024),
        (b"blob:limit=2M", FilterKind.BLOB_LIMIT, 2 << 20),
        (b"blob:limit=3g", FilterKind.BLOB_LIMIT, 3 << 30),
        (b"tree:0", FilterKind.TREE_DEPTH, 0),
    ],
)
def test_filter_specs_we_serve(spec, kind, limit):
    """blob:none, blob:limit with k/m/g suffixes and tree:0 parse to their kind and byte count."""
    parsed = ObjectFilter.parse(spec)
    assert (parsed.kind, parsed.limit) == (kind, limit)
    assert ObjectFilter.parse(parsed.spec) == parsed


@given(st.integers(min_value=0, max_value=1 << 32), st.sampled_from(["", "k", "m", "g", "K"]))
def test_filter_spec_is_canonical(number, suffix):
    """The canonical spec writes the size out in bytes, so equal filters key a cache equally."""
    parsed = ObjectFilter.parse(b"blob:limit=%d%s" % (number, suffix.encode()))
    assert parsed.spec == b"blob:limit=%d" % parsed.limit
    assert (
        parsed.limit == number * {"": 1, "k": 1024, "K": 1024, "m": 1 << 20, "g": 1 << 30}[suffix]
    )


@pytest.mark.parametrize(
    "spec, message",
    [
        (b"tree:1", "tree filter allows max depth 0, but got 1"),
        (b"sparse:oid=abc", "filter 'sparse:oid' not supported"),
        (b"combine:blob:none+tree:0", "filter 'combine' not supported"),
        (b"object:type=blob", "filter 'object:type' not supported"),
        (b"blob:limit=", "invalid filter-spec 'blob:limit=' ('' is not a decimal number)"),
        (
            b"blob:limit=12q",
            "invalid filter-spec 'blob:limit=12q' ('12q' is not a decimal number)",
        ),
        (b"nonsense", "invalid filter-spec 'nonsense'"),
    ],
)
def test_filter_specs_refused_in_git_words(spec, message):
    """Filters we do not serve, and malformed ones, are refused with git's messages."""
    with pytest.raises(UploadPackError) as e:
        ObjectFilter.parse(spec)
    assert str(e.value) == message


# -- v0 requests --------------------------------------------------------------

CLONE_CAPS = (
    b"multi_ack_detailed no-done side-band-64k thin-pack ofs-delta deepen-since deepen-not "
    b"agent=git/2.39.5"
)


def test_v0_clone_request():
    """A clone's body: capabilities from the first want, later wants, flush, done."""
    body = want(A, CLONE_CAPS) + want(B) + want(A) + FLUSH_PKT + pkt_line(b"done\n")
    req = parse_v0_request(body, LIMITS)
    assert req.wants == (A, B)
    assert req.done and not req.awaiting_haves and req.haves == ()
    assert req.multi_ack is MultiAck.DETAILED and req.no_done
    assert req.sideband == SIDEBAND_64K and req.thin_pack and req.ofs_delta
    assert not req.include_tag and not req.no_progress
    assert req.agent == b"git/2.39.5"


def test_v0_capability_variants():
    """side-band alone gives 1000-byte packets, neither gives a raw pack; multi_ack is its own level."""
    small = parse_v0_request(want(A, b"side-band multi_ack") + FLUSH_PKT, LIMITS)
    assert small.sideband == SIDEBAND_SMALL and small.multi_ack is MultiAck.MULTI_ACK
    raw = parse_v0_request(want(A, b"include-tag no-progress") + FLUSH_PKT, LIMITS)
    assert raw.sideband == 0 and raw.multi_ack is MultiAck.NONE
    assert raw.include_tag and raw.no_progress


def test_v0_shallow_round_stops_after_the_wants():
    """A stateless client's first deepen round ends at the flush: the request awaits haves."""
    body = (
        want(A, b"shallow deepen-relative")
        + pkt_line(b"shallow " + C + b"\n")
        + pkt_line(b"deepen 3\n")
        + FLUSH_PKT
    )
    req = parse_v0_request(body, LIMITS)
    assert req.awaiting_haves and req.shallows == (C,) and req.depth == 3
    assert req.deepen_relative and req.deepens


def test_v0_negotiation_round():
    """Haves then a flush is a negotiation round; haves then done asks for the pack."""
    body = want(A, CLONE_CAPS) + FLUSH_PKT + pkt_line(b"have " + B + b"\n") + pkt_line(b"have " + C)
    req = parse_v0_request(body + FLUSH_PKT, LIMITS)
    assert req.haves == (B, C) and not req.done and not req.awaiting_haves
    req = parse_v0_request(body + pkt_line(b"done\n"), LIMITS)
    assert req.haves == (B, C) and req.done


def test_v0_filter_needs_the_capability():
    """A filter line counts only when the client asked for the filter capability."""
    body = want(A, b"filter") + pkt_line(b"filter blob:limit=1k\n") + FLUSH_PKT
    assert parse_v0_request(body, LIMITS).filter == ObjectFilter(FilterKind.BLOB_LIMIT, 1024)
    with pytest.raises(UploadPackError, match="filtering capability not negotiated"):
        parse_v0_request(want(A) + pkt_line(b"filter blob:none\n") + FLUSH_PKT, LIMITS)


@pytest.mark.parametrize(
    "body, message",
    [
        (
            pkt_line(b"wnat " + A + b"\n") + FLUSH_PKT,
            f"git upload-pack: protocol error, expected to get object ID, not 'wnat {A.decode()}'",
        ),
        (
            pkt_line(b"want 1234\n") + FLUSH_PKT,
            "git upload-pack: protocol error, expected to get object ID, not 'want 1234'",
        ),
        (want(A), "git upload-pack: protocol error, expected a flush after the wants"),
        (want(A) + DELIM_PKT, "git upload-pack: protocol error, unexpected delim packet"),
        (
            want(A) + FLUSH_PKT + pkt_line(b"have xyz\n") + FLUSH_PKT,
            "git upload-pack: expected SHA1 object, got 'xyz'",
        ),
        (
            want(A) + FLUSH_PKT + pkt_line(b"hello\n") + FLUSH_PKT,
            "git upload-pack: expected SHA1 list, got 'hello'",
        ),
        (
            want(A) + FLUSH_PKT + pkt_line(b"have " + B + b"\n"),
            "git upload-pack: protocol error, expected a flush or done after the haves",
        ),
        (
            want(A) + pkt_line(b"deepen 0\n") + FLUSH_PKT,
            f"Invalid deepen: deepen 0 (0 is not between 1 and {INT32_MAX})",
        ),
        (
            want(A) + pkt_line(b"deepen x\n") + FLUSH_PKT,
            "Invalid deepen: deepen x ('x' is not a decimal number)",
        ),
        (
            want(A) + pkt_line(b"deepen-since -5\n") + FLUSH_PKT,
            "Invalid deepen-since: deepen-since -5 ('-5' is not a decimal number)",
        ),
        (want(A) + pkt_line(b"shallow zz\n") + FLUSH_PKT, "invalid shallow line: shallow zz"),
        (
            want(A) + pkt_line(b"deepen 2\n") + pkt_line(b"deepen-not main\n") + FLUSH_PKT,
            "git upload-pack: deepen and deepen-since (or deepen-not) cannot be used together",
        ),
        (
            want(A, b"filter")
            + pkt_line(b"filter blob:none\n")
            + pkt_line(b"filter tree:0\n")
            + FLUSH_PKT,
            "multiple filter-specs cannot be combined",
        ),
        (
            want(A, b"object-format=sha256") + FLUSH_PKT,
            "mismatched object format: server sha1; client sha256",
        ),
        (b"00zz", "protocol error: bad line length character: 00zz"),
        (
            want(A) + FLUSH_PKT + b"0010have",
            "protocol error: unexpected end of stream inside a packet",
        ),
    ],
)
def test_v0_malformed_requests(body, message):
    """Each malformed v0 body is refused with a message a git user would recognise."""
    with pytest.raises(UploadPackError) as e:
        parse_v0_request(body, LIMITS)
    assert str(e.value) == message


# -- numbers: one bounded parser for every number a client sends ---------------------------

HOSTILE_NUMBERS = [
    b"-1",
    b"+1",
    b" 1",
    b"1 ",
    b"1_000",
    b"0x10",
    b"1e3",
    b"\xd9\xa3",  # ARABIC-INDIC DIGIT THREE, which str.isdigit() accepts
    b"",
    b"1k" * 3,
]
#: numbers too large for any bound; int() itself refuses the longest with a ValueError
HUGE_NUMBERS = [b"1" + b"0" * 30, b"9" * 5000, b"0" * 5000 + b"1" * 21]


@pytest.mark.parametrize("text", HOSTILE_NUMBERS + HUGE_NUMBERS)
@pytest.mark.parametrize(
    "line, prefix",
    [
        (b"deepen ", "Invalid deepen: "),
        (b"deepen-since ", "Invalid deepen-since: "),
        (b"filter blob:limit=", "invalid filter-spec "),
        (b"filter tree:", "invalid filter-spec "),
    ],
)
def test_hostile_numbers_are_refused_on_v0_and_v2(text, line, prefix):
    """Signs, spaces, other bases, non-ASCII digits, nothing, and huge numbers are each a clear
    UploadPackError naming the line and the reason, in v0 and in v2 alike."""
    caps = b"filter" if line.startswith(b"filter") else b""
    bodies = [
        want(A, caps) + pkt_line(line + text + b"\n") + FLUSH_PKT,
        fetch(line + text + b"\n"),
    ]
    for body, parse in zip(bodies, (parse_v0_request, parse_v2_request), strict=True):
        with pytest.raises(UploadPackError) as e:
            parse(body, LIMITS)
        message = str(e.value)
        assert message.startswith(prefix), message
        reason = "is not between" if text in HUGE_NUMBERS else "is not a decimal number"
        assert reason in message, message
        assert len(message) < 400


@pytest.mark.parametrize(
    "line, value",
    [
        (b"deepen 2147483647", INT32_MAX),  # git's INFINITE_DEPTH: --unshallow
        (b"deepen 0002", 2),  # leading zeros, as strtol reads them
        (b"deepen " + b"0" * 5000 + b"7", 7),
        (b"deepen-since 9223372036854775807", INT63_MAX),
    ],
)
def test_numbers_at_their_bounds_are_taken(line, value):
    """The largest accepted values parse, on both protocols."""
    for body, parse in (
        (want(A) + pkt_line(line + b"\n") + FLUSH_PKT, parse_v0_request),
        (fetch(line + b"\n"), parse_v2_request),
    ):
        req = parse(body, LIMITS)
        assert isinstance(req, FetchRequest)
        assert value in (req.depth, req.deepen_since)


@pytest.mark.parametrize(
    "line",
    [b"deepen 2147483648", b"deepen-since 9223372036854775808", b"deepen-since 0"],
)
def test_numbers_past_their_bounds_are_refused(line):
    """One past each bound is refused, with the bound in the message."""
    with pytest.raises(UploadPackError, match="is not between"):
        parse_v2_request(fetch(line + b"\n"), LIMITS)


def test_filter_sizes_are_bounded_after_their_suffix():
    """blob:limit's k/m/g scale before the bound is checked: 8589934591g is over 2**63-1."""
    assert ObjectFilter.parse(b"blob:limit=8589934591G").limit == 8589934591 << 30
    with pytest.raises(UploadPackError, match="is not between 0 and 9223372036854775807"):
        ObjectFilter.parse(b"blob:limit=8589934592g")
    with pytest.raises(UploadPackError, match="is not a decimal number"):
        ObjectFilter.parse(b"blob:limit=1kk")


def test_v0_limits_on_wants_and_haves():
    """limits.max_wants and max_haves bound how many lines one request may carry."""
    limits = Limits(max_wants=2, max_haves=2)
    assert parse_v0_request(want(A) + want(B) + want(A) + FLUSH_PKT, limits).wants == (A, B)
    with pytest.raises(UploadPackError, match=r"too many wants \(the limit is 2\)"):
        parse_v0_request(want(A) + want(B) + want(C) + FLUSH_PKT, limits)
    haves = b"".join(pkt_line(b"have " + x + b"\n") for x in (A, B, C))
    with pytest.raises(UploadPackError, match=r"too many haves \(the limit is 2\)"):
        parse_v0_request(want(A) + FLUSH_PKT + haves + pkt_line(b"done\n"), limits)


def test_v0_empty_want_list():
    """A lone flush is a request for nothing."""
    req = parse_v0_request(FLUSH_PKT, LIMITS)
    assert req.wants == () and req.awaiting_haves


# -- v2 requests --------------------------------------------------------------


def test_v2_empty_request_is_none():
    """An empty body, or a lone flush, is v2's empty request."""
    assert parse_v2_request(b"", LIMITS) is None
    assert parse_v2_request(FLUSH_PKT, LIMITS) is None


def test_v2_ls_refs():
    """ls-refs arguments, capabilities and server options are all read."""
    body = v2(
        "command=ls-refs\n",
        "agent=git/2.39.5\n",
        "server-option=ci\n",
        "server-option=fast\n",
        args=("peel\n", "symrefs\n", "unborn\n", "ref-prefix HEAD\n", "ref-prefix refs/heads/\n"),
    )
    req = parse_v2_request(body, LIMITS)
    assert req == LsRefsRequest(
        symrefs=True,
        peel=True,
        unborn=True,
        prefixes=(b"HEAD", b"refs/heads/"),
        agent=b"git/2.39.5",
        server_options=(b"ci", b"fast"),
    )


def test_v2_ls_refs_without_arguments():
    """A command with no arguments may end its capability list with the flush."""
    assert parse_v2_request(pkt_line("command=ls-refs\n") + FLUSH_PKT, LIMITS) == LsRefsRequest()


def test_v2_ls_refs_too_many_prefixes_lists_everything():
    """Past 65 ref-prefix lines git ignores them all, and so do we."""
    many = tuple(f"ref-prefix refs/{i}/\n" for i in range(66))
    req = parse_v2_request(v2("command=ls-refs\n", args=many), LIMITS)
    assert isinstance(req, LsRefsRequest) and req.prefixes == ()
    req = parse_v2_request(v2("command=ls-refs\n", args=many[:65]), LIMITS)
    assert isinstance(req, LsRefsRequest) and len(req.prefixes) == 65


def test_v2_fetch_every_argument():
    """Every fetch argument we advertise lands in the request."""
    body = fetch(
        want(A)[4:],
        b"want-ref refs/heads/main\n",
        b"have " + B + b"\n",
        b"have " + C + b"\n",
        "thin-pack\n",
        "ofs-delta\n",
        "include-tag\n",
        "no-progress\n",
        "wait-for-done\n",
        b"shallow " + D + b"\n",
        "deepen-since 1700000000\n",
        "deepen-not refs/heads/old\n",
        "deepen-not v1\n",
        "filter blob:none\n",
        "done\n",
    )
    req = parse_v2_request(body, LIMITS)
    assert req == FetchRequest(
        wants=(A,),
        want_refs=(b"refs/heads/main",),
        haves=(B, C),
        shallows=(D,),
        deepen_since=1700000000,
        deepen_not=(b"refs/heads/old", b"v1"),
        filter=ObjectFilter(FilterKind.BLOB_NONE),
        done=True,
        thin_pack=True,
        ofs_delta=True,
        include_tag=True,
        no_progress=True,
        wait_for_done=True,
        agent=b"git/2.39.5",
    )
    assert req.deepens and req.deepen_rev_list


def test_v2_fetch_deepen_relative_and_infinite():
    """deepen-relative is an argument in v2; git's --unshallow depth is INFINITE_DEPTH."""
    req = parse_v2_request(fetch("deepen 2147483647\n", "deepen-relative\n"), LIMITS)
    assert isinstance(req, FetchRequest)
    assert req.depth == INFINITE_DEPTH and req.deepen_relative


@given(
    wants=st.lists(oids, max_size=5),
    haves=st.lists(oids, max_size=5),
    shallows=st.lists(oids, max_size=3),
    depth=st.integers(min_value=0, max_value=INT32_MAX),
    flags=st.sets(
        st.sampled_from(["thin-pack", "ofs-delta", "include-tag", "no-progress", "done"])
    ),
)
@settings(max_examples=80)
def test_v2_fetch_round_trip(wants, haves, shallows, depth, flags):
    """Whatever mix of lines a client sends, the request holds exactly what was sent."""
    args = [b"want " + w + b"\n" for w in wants]
    args += [b"have " + h + b"\n" for h in haves]
    args += [b"shallow " + s + b"\n" for s in shallows]
    args += [b"deepen %d\n" % depth] if depth else []
    args += [f.encode() + b"\n" for f in sorted(flags)]
    req = parse_v2_request(fetch(*args), LIMITS)
    assert isinstance(req, FetchRequest)
    assert req.wants == tuple(dict.fromkeys(wants))
    assert req.haves == tuple(haves)
    assert req.shallows == tuple(dict.fromkeys(shallows))
    assert req.depth == depth
    assert req.thin_pack == ("thin-pack" in flags) and req.done == ("done" in flags)
    assert req.include_tag == ("include-tag" in flags) and req.ofs_delta == ("ofs-delta" in flags)


@pytest.mark.parametrize(
    "body, message",
    [
        (v2("command=push\n"), "unknown command 'push'"),
        (
            v2("command=fetch\n", "command=ls-refs\n"),
            "command 'ls-refs' requested after already requesting command 'fetch'",
        ),
        (v2("agent=git/2.39.5\n"), "no command requested"),
        (v2("command=fetch\n", "bundle-uri\n"), "unknown capability 'bundle-uri'"),
        (
            v2("command=fetch\n", "object-format=sha256\n"),
            "mismatched object format: server sha1; client sha256",
        ),
        (v2("command=fetch\n", "object-format=md5\n"), "unknown object format 'md5'"),
        (fetch("sideband-all\n"), "unexpected line: 'sideband-all'"),
        (
            fetch("want nothex\n"),
            "git upload-pack: protocol error, expected to get oid, not 'want nothex'",
        ),
        (fetch("have 1234\n"), "git upload-pack: expected SHA1 object, got '1234'"),
        (
            fetch("want-ref refs/heads/a\n", "want-ref refs/heads/a\n"),
            "want-ref refs/heads/a requested more than once",
        ),
        (fetch("deepen 0\n"), f"Invalid deepen: deepen 0 (0 is not between 1 and {INT32_MAX})"),
        (
            fetch("deepen 3\n", "deepen-since 12\n"),
            "git upload-pack: deepen and deepen-since (or deepen-not) cannot be used together",
        ),
        (fetch("filter sparse:oid=HEAD:x\n"), "filter 'sparse:oid' not supported"),
        (v2("command=ls-refs\n", args=("symlinks\n",)), "unexpected line: 'symlinks'"),
        (pkt_line("command=fetch\n") + DELIM_PKT + want(A), "expected flush after fetch arguments"),
        (
            pkt_line("command=ls-refs\n") + DELIM_PKT + pkt_line("peel\n") + DELIM_PKT,
            "expected flush after ls-refs arguments",
        ),
        (pkt_line("command=fetch\n") + b"0002", "protocol error: unexpected response-end packet"),
    ],
)
def test_v2_malformed_requests(body, message):
    """Each malformed v2 request is refused with git's wording (or a clear one where git has none)."""
    with pytest.raises(UploadPackError) as e:
        parse_v2_request(body, LIMITS)
    assert str(e.value) == message


def test_v2_limits():
    """max_wants counts want and want-ref lines; max_haves bounds have lines."""
    limits = Limits(max_wants=1, max_haves=1)
    with pytest.raises(UploadPackError, match="too many wants"):
        parse_v2_request(fetch(want(A)[4:], want(B)[4:]), limits)
    with pytest.raises(UploadPackError, match="too many wants"):
        parse_v2_request(fetch("want-ref refs/heads/a\n", "want-ref refs/heads/b\n"), limits)
    with pytest.raises(UploadPackError, match="too many haves"):
        parse_v2_request(fetch(b"have " + A + b"\n", b"have " + B + b"\n"), limits)


# -- advertisements -----------------------------------------------------------

SNAPSHOT = RefSnapshot(
    {b"refs/heads/main": A, b"refs/heads/dev": B, b"refs/tags/v1": T},
    b"refs/heads/main",
    7,
)
PEELED = {T: C}


def test_capability_advertisement():
    """v2 advertises exactly what we implement, agent first, then a flush."""
    assert lines(capability_advertisement()) == [
        b"version 2\n",
        b"agent=" + AGENT + b"\n",
        b"ls-refs=unborn\n",
        b"fetch=shallow wait-for-done filter ref-in-want\n",
        b"server-option\n",
        b"object-format=sha1\n",
        Special.FLUSH,
    ]


def test_http_header():
    """Smart HTTP prefixes the service line and a flush."""
    assert http_header() == b"001e# service=git-upload-pack\n0000"


def test_v0_ref_advertisement():
    """HEAD first with capabilities after NUL, then refs by name, tags followed by their peeled line."""
    found = lines(ref_advertisement(SNAPSHOT, PEELED, no_done=True))
    first, caps = found[0].split(b"\0")
    assert first == A + b" HEAD"
    assert caps.split() == [
        *V0_CAPABILITIES,
        b"no-done",
        b"symref=HEAD:refs/heads/main",
        b"filter",
        b"object-format=sha1",
        b"agent=" + AGENT,
    ]
    assert found[1:] == [
        B + b" refs/heads/dev\n",
        A + b" refs/heads/main\n",
        T + b" refs/tags/v1\n",
        C + b" refs/tags/v1^{}\n",
        Special.FLUSH,
    ]
    assert b"no-done" not in ref_advertisement(SNAPSHOT, PEELED, no_done=False)


def test_v0_ref_advertisement_unborn_head_and_empty():
    """An unborn HEAD is left out (and with it the symref); an empty repository sends capabilities^{}."""
    unborn = RefSnapshot({b"refs/heads/dev": B}, b"refs/heads/main", 1)
    found = lines(ref_advertisement(unborn, {}, no_done=False))
    assert found[0].startswith(B + b" refs/heads/dev\0") and b"symref=" not in found[0]
    empty = lines(ref_advertisement(RefSnapshot({}, b"refs/heads/main", 0), {}, no_done=False))
    assert empty[0].startswith(ZERO_OID + b" capabilities^{}\0multi_ack ")
    assert empty[1:] == [Special.FLUSH]


def test_ls_refs_plain_symrefs_and_peel():
    """ls-refs lists HEAD first; symrefs adds HEAD's target, peel the tags' peeled ids."""
    assert lines(ls_refs_response(LsRefsRequest(), SNAPSHOT, PEELED)) == [
        A + b" HEAD\n",
        B + b" refs/heads/dev\n",
        A + b" refs/heads/main\n",
        T + b" refs/tags/v1\n",
        Special.FLUSH,
    ]
    rich = LsRefsRequest(symrefs=True, peel=True)
    assert lines(ls_refs_response(rich, SNAPSHOT, PEELED)) == [
        A + b" HEAD symref-target:refs/heads/main\n",
        B + b" refs/heads/dev\n",
        A + b" refs/heads/main\n",
        T + b" refs/tags/v1 peeled:" + C + b"\n",
        Special.FLUSH,
    ]


def test_ls_refs_prefixes():
    """Only refs under one of the prefixes are listed, HEAD included."""
    req = LsRefsRequest(prefixes=(b"HEAD", b"refs/tags/"))
    assert lines(ls_refs_response(req, SNAPSHOT, PEELED)) == [
        A + b" HEAD\n",
        T + b" refs/tags/v1\n",
        Special.FLUSH,
    ]


def test_ls_refs_unborn_head():
    """With unborn and symrefs, a HEAD pointing at a missing branch is still shown."""
    unborn = RefSnapshot({b"refs/heads/dev": B}, b"refs/heads/trunk", 1)
    req = LsRefsRequest(symrefs=True, unborn=True)
    assert lines(ls_refs_response(req, unborn, {})) == [
        b"unborn HEAD symref-target:refs/heads/trunk\n",
        B + b" refs/heads/dev\n",
        Special.FLUSH,
    ]
    assert lines(ls_refs_response(LsRefsRequest(symrefs=True), unborn, {}))[0] == (
        B + b" refs/heads/dev\n"
    )


# -- negotiation --------------------------------------------------------------


@attrs.define
class ScriptedOracle:
    """A HaveOracle over a fixed set of known ids; "ready" once *ready_after* haves are common."""

    known: set[bytes]
    ready_after: int = 1 << 30
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


def round_of(haves, *, done=False, multi_ack=MultiAck.DETAILED, no_done=False) -> FetchRequest:
    return FetchRequest(
        wants=(A,), haves=tuple(haves), done=done, multi_ack=multi_ack, no_done=no_done
    )


def test_v0_detailed_round_without_common():
    """multi_ack_detailed: nothing in common means a bare NAK and no pack."""
    out, send = negotiate_v0(round_of([B, C]), ScriptedOracle(known=set()))
    assert lines(out) == [b"NAK\n"] and not send


def test_v0_detailed_round_common_not_ready():
    """Common haves are ACKed "common"; the round still ends in NAK without a pack."""
    out, send = negotiate_v0(round_of([B, C]), ScriptedOracle(known={B}))
    assert lines(out) == [b"ACK " + B + b" common\n", b"NAK\n"] and not send


def test_v0_detailed_ready_at_flush_then_no_done():
    """With every have common and the wants covered: "ACK ready", NAK, and with no-done the pack."""
    oracle = ScriptedOracle(known={B, C}, ready_after=2)
    out, send = negotiate_v0(round_of([B, C]), oracle)
    expected = [
        b"ACK " + B + b" common\n",
        b"ACK " + C + b" common\n",
        b"ACK " + C + b" ready\n",
        b"NAK\n",
    ]
    assert lines(out) == expected and not send
    out, send = negotiate_v0(
        round_of([B, C], no_done=True), ScriptedOracle(known={B, C}, ready_after=2)
    )
    assert lines(out) == [*expected, b"ACK " + C + b"\n"] and send


def test_v0_detailed_ready_on_an_unknown_have():
    """Once we could give up, a have we lack is answered "ACK <it> ready" (git's shortcut)."""
    out, send = negotiate_v0(
        round_of([B, D], no_done=True), ScriptedOracle(known={B}, ready_after=1)
    )
    assert lines(out) == [
        b"ACK " + B + b" common\n",
        b"ACK " + D + b" ready\n",
        b"NAK\n",
        b"ACK " + B + b"\n",
    ]
    assert send


def test_v0_multi_ack_uses_continue():
    """Plain multi_ack says "continue" where detailed says common or ready."""
    out, _ = negotiate_v0(
        round_of([B, D], multi_ack=MultiAck.MULTI_ACK), ScriptedOracle(known={B}, ready_after=1)
    )
    assert lines(out) == [b"ACK " + B + b" continue\n", b"ACK " + D + b" continue\n", b"NAK\n"]


def test_v0_without_multi_ack_acks_only_the_first_common():
    """The oldest style ACKs the first common have only, and no NAK once something was common."""
    out, send = negotiate_v0(
        round_of([B, C], multi_ack=MultiAck.NONE), ScriptedOracle(known={B, C})
    )
    assert lines(out) == [b"ACK " + B + b"\n"] and not send
    out, send = negotiate_v0(
        round_of([B, C], multi_ack=MultiAck.NONE, done=True), ScriptedOracle(known={B, C})
    )
    assert lines(out) == [b"ACK " + B + b"\n"] and send


def test_v0_done():
    """done: the last common have is ACKed (multi_ack) or NAK when none, and the pack follows."""
    out, send = negotiate_v0(round_of([B, C], done=True), ScriptedOracle(known={B, C}))
    assert lines(out)[-1] == b"ACK " + C + b"\n" and send
    out, send = negotiate_v0(round_of([], done=True), ScriptedOracle(known=set()))
    assert lines(out) == [b"NAK\n"] and send


def test_v2_process_haves():
    """v2 ACKs every have we hold, once each, in the client's order."""
    assert process_haves([C, D, B, C], ScriptedOracle(known={B, C})) == [C, B]


# -- response framing ---------------------------------------------------------


def test_v2_sections():
    """acknowledgments, shallow-info and wanted-refs sections have git's headers and closing packets."""
    assert lines(v2_acknowledgments([], False)) == [b"acknowledgments\n", b"NAK\n"]
    assert lines(v2_acknowledgments([A, B], True)) == [
        b"acknowledgments\n",
        b"ACK " + A + b"\n",
        b"ACK " + B + b"\n",
        b"ready\n",
    ]
    assert lines(v2_shallow_info([A], [B])) == [
        b"shallow-info\n",
        b"shallow " + A + b"\n",
        b"unshallow " + B + b"\n",
        Special.DELIM,
    ]
    assert lines(v2_wanted_refs([(b"refs/heads/main", A)])) == [
        b"wanted-refs\n",
        A + b" refs/heads/main\n",
        Special.DELIM,
    ]
    assert lines(v0_shallow_section([A], [])) == [b"shallow " + A + b"\n", Special.FLUSH]


@pytest.mark.parametrize("size", [1, 995, 996, 65515, 65516, 200_000])
def test_frame_band_splits_at_the_packet_limit(size):
    """Side-band framing splits data at the negotiated packet size and loses nothing."""
    data = bytes(range(256)) * (size // 256 + 1)
    data = data[:size]
    for limit in (SIDEBAND_SMALL, SIDEBAND_64K):
        found = events(frame_band(1, data, limit))
        assert all(isinstance(e, Packet) and e.data[:1] == b"\x01" for e in found)
        assert all(len(e.data) - 1 <= limit for e in found)  # type: ignore[union-attr]
        assert b"".join(e.data[1:] for e in found) == data  # type: ignore[union-attr]
