"""The receive-pack wire engine: advertisement, request parsing and report-status."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import textwrap

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gitstratum.core.limits import Limits
from gitstratum.core.oid import ZERO_OID, ObjectID
from gitstratum.core.pktline import (
    FLUSH_PKT,
    NEED_DATA,
    Packet,
    PktLineDecoder,
    PktLineError,
    Special,
    pkt_line,
)
from gitstratum.protocol.receive_pack import (
    AGENT,
    CAPABILITIES,
    Command,
    PushRequest,
    PushRequestParser,
    ReceivePackError,
    RefResult,
    ReportStatus,
    advertise,
    encode_report,
    encode_response,
    parse_request,
    progress,
    read_request,
)
from gitstratum.storage.interfaces import RefSnapshot

A = ObjectID(b"a" * 40)
B = ObjectID(b"b" * 40)
C = ObjectID(b"c" * 40)
CAPS = b"report-status report-status-v2 side-band-64k quiet object-format=sha1 agent=git/2.39.5"
PACK = b"PACK\x00\x00\x00\x02\x00\x00\x00\x00" + b"\x02" * 20


def command(old: bytes, new: bytes, ref: bytes, caps: bytes | None = None) -> bytes:
    line = old + b" " + new + b" " + ref
    if caps is not None:
        line += b"\0" + caps
    return pkt_line(line + b"\n")


def events(data: bytes) -> list[Packet | Special]:
    decoder = PktLineDecoder()
    decoder.receive_data(data)
    found = list(decoder.events())
    decoder.check_complete()
    return found


def band(data: bytes, number: int) -> bytes:
    """The concatenated payload of every side-band packet of band *number*."""
    return b"".join(
        e.data[1:] for e in events(data) if isinstance(e, Packet) and e.data[:1] == bytes([number])
    )


# -- advertisement ------------------------------------------------------------


def test_advertise_empty_repository_sends_capabilities_line():
    """An empty repository advertises ``capabilities^{}`` with the zero id, then a flush."""
    body = advertise(None, http=False)
    found = events(body)
    assert found[-1] is Special.FLUSH and len(found) == 2
    name, _, caps = found[0].data.partition(b"\0")
    assert name == ZERO_OID + b" capabilities^{}"
    assert caps.endswith(b"\n")
    assert caps.split() == [*CAPABILITIES, b"agent=" + AGENT]
    assert advertise(RefSnapshot({}, b"refs/heads/main", 0), http=False) == body


def test_advertise_refs_sorted_capabilities_on_first_only_no_head():
    """Refs come sorted with capabilities after a NUL on the first line only; HEAD is not sent."""
    snapshot = RefSnapshot(
        {b"refs/tags/v1": C, b"refs/heads/main": A, b"refs/heads/dev": B}, b"refs/heads/main", 3
    )
    found = events(advertise(snapshot, http=False))
    lines = [e.data for e in found[:-1]]
    assert lines[0].split(b"\0")[0] == B + b" refs/heads/dev"
    assert b"\0" in lines[0] and lines[0].endswith(b"\n")
    assert lines[1:] == [A + b" refs/heads/main\n", C + b" refs/tags/v1\n"]
    assert all(b"HEAD" not in line and b"^{}" not in line for line in lines)
    assert found[-1] is Special.FLUSH


def test_advertise_http_prefix():
    """Over smart HTTP the advertisement starts with the service line and a flush."""
    body = advertise(None, http=True)
    assert body.startswith(pkt_line(b"# service=git-receive-pack\n") + FLUSH_PKT)
    assert body.endswith(advertise(None, http=False))


# -- parsing ------------------------------------------------------------------


def test_parse_commands_capabilities_and_pack_start():
    """Commands, capability tokens and the agent are parsed; the bytes after the flush are the pack."""
    data = (
        command(ZERO_OID, A, b"refs/heads/main", CAPS)
        + command(B, C, b"refs/heads/dev")
        + command(C, ZERO_OID, b"refs/tags/old")
        + FLUSH_PKT
        + PACK
    )
    request, rest = parse_request(data)
    assert request.commands == (
        Command(ZERO_OID, A, b"refs/heads/main"),
        Command(B, C, b"refs/heads/dev"),
        Command(C, ZERO_OID, b"refs/tags/old"),
    )
    assert request.capabilities == frozenset(CAPS.split())
    assert request.agent == b"git/2.39.5"
    assert rest == PACK
    assert request.expects_pack and request.report_status and request.sideband and request.quiet
    assert not request.atomic
    assert request.commands[0].is_create and request.commands[2].is_delete


def test_parse_shallow_lines_and_push_options():
    """Shallow lines are collected and push options are read up to their own flush."""
    data = (
        pkt_line(b"shallow " + C + b"\n")
        + command(A, B, b"refs/heads/main", b"report-status push-options atomic")
        + FLUSH_PKT
        + pkt_line(b"ci.skip\n")
        + pkt_line(b"merge_request.create")
        + FLUSH_PKT
        + PACK
    )
    request, rest = parse_request(data)
    assert request.shallow == (C,)
    assert request.push_options == (b"ci.skip", b"merge_request.create")
    assert request.atomic and not request.sideband
    assert request.agent is None
    assert rest == PACK


def test_parse_without_push_options_capability_leaves_following_packets_as_pack():
    """Without ``push-options`` nothing after the first flush is read as an option."""
    data = (
        command(A, B, b"refs/heads/main", b"report-status") + FLUSH_PKT + pkt_line(b"x") + FLUSH_PKT
    )
    request, rest = parse_request(data)
    assert request.push_options == ()
    assert rest == pkt_line(b"x") + FLUSH_PKT


def test_parse_delete_only_and_empty_requests():
    """A request of deletes expects no pack; a bare flush is a push with no commands."""
    request, rest = parse_request(
        command(A, ZERO_OID, b"refs/heads/gone", b"report-status") + FLUSH_PKT
    )
    assert not request.expects_pack and rest == b""
    empty, rest = parse_request(FLUSH_PKT)
    assert empty == PushRequest(commands=()) and rest == b""
    assert encode_response(empty, ReportStatus(None, ())) == b""


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"shallow 1234\n", "expected shallow sha, got '1234'"),
        (A + b" " + B + b"\n", "expected old/new/ref"),
        (A + b" " + B + b" \n", "expected old/new/ref"),
        (A + b"-" + B + b" refs/heads/x\n", "expected old/new/ref"),
        (A.upper() + b" " + B + b" refs/heads/x\n", "expected old/new/ref"),
        (b"g" * 40 + b" " + B + b" refs/heads/x\n", "expected old/new/ref"),
        (b"push-cert\0report-status\n", "push certificates are not supported"),
        (
            A + b" " + B + b" refs/heads/x\0object-format=sha256\n",
            "unsupported object format 'sha256'",
        ),
    ],
)
def test_parse_malformed_lines(payload, message):
    """Each malformed line is refused with git's wording."""
    with pytest.raises(ReceivePackError, match=message):
        parse_request(pkt_line(payload) + FLUSH_PKT)


def test_parse_delim_packet_is_a_protocol_error():
    """A delim packet has no place in a v0 push request."""
    with pytest.raises(ReceivePackError, match="protocol error"):
        parse_request(command(A, B, b"refs/heads/x", b"") + b"0001")


def test_parse_truncated_requests():
    """A request cut before its flush, or inside a packet, is an error, not a hang."""
    whole = command(A, B, b"refs/heads/x", b"report-status")
    with pytest.raises(ReceivePackError, match="ended before"):
        parse_request(whole)
    with pytest.raises(PktLineError, match="unexpected end of stream"):
        parse_request(whole[:-5])
    with pytest.raises(ReceivePackError, match="ended before"):
        parse_request(b"")
    with pytest.raises(PktLineError, match="bad line length character"):
        parse_request(b"zzzz")


def test_parse_enforces_command_and_option_limits():
    """More commands (or push options) than max_push_commands are refused."""
    limits = Limits(max_push_commands=2)
    lines = [
        command(ZERO_OID, A, b"refs/heads/b%d" % i, b"push-options" if i == 0 else None)
        for i in range(3)
    ]
    with pytest.raises(ReceivePackError, match="too many ref updates"):
        parse_request(b"".join(lines) + FLUSH_PKT, limits)
    ok, _ = parse_request(
        b"".join(lines[:2]) + FLUSH_PKT + pkt_line(b"a") + pkt_line(b"b") + FLUSH_PKT, limits
    )
    assert len(ok.commands) == 2 and ok.push_options == (b"a", b"b")
    with pytest.raises(ReceivePackError, match="too many push options"):
        parse_request(b"".join(lines[:2]) + FLUSH_PKT + pkt_line(b"a") * 3 + FLUSH_PKT, limits)


def test_parser_state_errors():
    """The parser refuses to hand out the pack before the request is complete, or to take more."""
    parser = PushRequestParser()
    parser.receive_data(command(A, B, b"refs/heads/x", b""))
    assert parser.next_event() is NEED_DATA
    with pytest.raises(RuntimeError):
        parser.take_unconsumed()
    parser.receive_data(FLUSH_PKT)
    assert isinstance(parser.next_event(), PushRequest)
    with pytest.raises(RuntimeError):
        parser.receive_data(b"more")


@settings(max_examples=150, deadline=None)
@given(
    refs=st.lists(
        st.binary(min_size=1, max_size=30).filter(
            lambda r: b"\0" not in r and not r.endswith(b"\n")
        ),
        min_size=1,
        max_size=6,
    ),
    options=st.lists(st.binary(max_size=20).filter(lambda o: not o.endswith(b"\n")), max_size=3),
    cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=8),
)
def test_parser_is_independent_of_chunking(refs, options, cuts):
    """Feeding a request in arbitrary pieces gives the same request and the same pack bytes."""
    data = command(ZERO_OID, A, refs[0], b"report-status push-options")
    data += b"".join(command(B, C, ref) for ref in refs[1:]) + FLUSH_PKT
    data += b"".join(pkt_line(o) for o in options) + FLUSH_PKT + PACK
    expected, expected_rest = parse_request(data)
    assert [c.ref for c in expected.commands] == refs
    assert expected.push_options == tuple(options) and expected_rest == PACK

    parser = PushRequestParser()
    bounds = sorted({min(c, len(data)) for c in cuts} | {0, len(data)})
    fed = 0
    result = NEED_DATA
    for start, end in zip(bounds, bounds[1:], strict=False):
        parser.receive_data(data[start:end])
        fed = end
        result = parser.next_event()
        if result is not NEED_DATA:
            break
    assert result == expected
    assert parser.take_unconsumed() + data[fed:] == PACK


def test_read_request_leaves_stream_at_pack():
    """read_request returns the spool positioned at the first pack byte, across small reads."""
    body = command(ZERO_OID, A, b"refs/heads/main", CAPS) + FLUSH_PKT + PACK
    stream = io.BytesIO(body)
    request, pack = read_request(stream, Limits(), chunk_size=7)
    assert request.commands[0].ref == b"refs/heads/main"
    assert pack is stream and pack.read() == PACK


def test_read_request_without_pack_and_truncated():
    """Deletes give no pack stream; a body that ends early is refused."""
    stream = io.BytesIO(command(A, ZERO_OID, b"refs/heads/x", b"") + FLUSH_PKT)
    request, pack = read_request(stream)
    assert pack is None and request.commands[0].is_delete
    with pytest.raises(ReceivePackError):
        read_request(io.BytesIO(command(A, B, b"refs/heads/x", b"")))


# -- report-status --------------------------------------------------------------


REPORT = ReportStatus(
    None,
    (RefResult(b"refs/heads/main"), RefResult(b"refs/heads/bad", "funny refname")),
    messages=("error: refusing to update funny ref 'refs/heads/bad' remotely",),
)


def test_encode_report_plain():
    """Without side-band: unpack line, one ok/ng line per ref, flush; messages dropped."""
    assert encode_report(REPORT, sideband=False) == (
        pkt_line(b"unpack ok\n")
        + pkt_line(b"ok refs/heads/main\n")
        + pkt_line(b"ng refs/heads/bad funny refname\n")
        + FLUSH_PKT
    )


def test_encode_report_unpack_error_and_newlines():
    """An unpack failure is reported after "unpack"; a reason can never break its pkt-line."""
    report = ReportStatus(
        "index-pack\nabnormal exit", (RefResult(b"refs/heads/x", "unpacker error"),)
    )
    assert encode_report(report, sideband=False) == (
        pkt_line(b"unpack index-pack abnormal exit\n")
        + pkt_line(b"ng refs/heads/x unpacker error\n")
        + FLUSH_PKT
    )
    assert not report.ok and REPORT.ok is False
    assert ReportStatus(None, (RefResult(b"refs/heads/x"),)).ok


def test_encode_report_sideband():
    """With side-band-64k the report is band 1, messages band 2 first, and a flush closes it."""
    body = encode_report(REPORT, sideband=True)
    assert body.endswith(FLUSH_PKT)
    assert band(body, 1) == encode_report(REPORT, sideband=False)
    assert band(body, 2) == b"error: refusing to update funny ref 'refs/heads/bad' remotely\n"
    assert body.index(b"\x02error") < body.index(b"\x01")


def test_encode_response_follows_negotiation():
    """No report unless asked for; side-band alone still gets its closing flush."""
    cmds = (Command(ZERO_OID, A, b"refs/heads/main"),)
    asked = PushRequest(cmds, frozenset({b"report-status-v2"}))
    assert encode_response(asked, REPORT) == encode_report(REPORT, sideband=False)
    silent = PushRequest(cmds, frozenset({b"side-band-64k"}))
    assert band(encode_response(silent, REPORT), 1) == b""
    assert encode_response(silent, REPORT).endswith(FLUSH_PKT)
    assert encode_response(PushRequest(cmds), REPORT) == b""


def test_progress_is_band_two():
    """Progress text travels on band 2, split to fit packets."""
    big = "x" * 70000 + "\n"
    body = progress(big)
    assert band(body, 2) == big.encode()
    assert len([e for e in events(body) if isinstance(e, Packet)]) == 2


# -- against the real git client -------------------------------------------------


FAKE_RECEIVE_PACK = textwrap.dedent(
    """
    import sys
    from gitstratum.protocol import receive_pack as rp
    out, inp = sys.stdout.buffer, sys.stdin.buffer
    out.write(rp.advertise(None, http=False)); out.flush()
    request, pack = rp.receive_request(inp.read1)
    pack += inp.read() if request.expects_pack else b""
    with open(sys.argv[1], "wb") as f:
        f.write(repr((request, pack[:4])).encode())
    results = tuple(
        rp.RefResult(c.ref, None if c.ref.endswith(b"main") else "not today")
        for c in request.commands
    )
    report = rp.ReportStatus(None, results, messages=("error: a message for stderr",))
    out.write(rp.progress("Resolving deltas: 100% (0/0), done.\\n"))
    out.write(rp.encode_response(request, report)); out.flush()
    """
)


def test_real_git_push_understands_advertisement_and_report(tmp_path):
    """git push parses our advertisement, sends a request we parse, and reads our report."""
    (tmp_path / "fake.py").write_text(FAKE_RECEIVE_PACK)
    wrapper = tmp_path / "fake-receive-pack"
    seen = tmp_path / "seen"
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    wrapper.write_text(
        f"#!/bin/sh\nPYTHONPATH={root} exec {sys.executable} {tmp_path / 'fake.py'} {seen}\n"
    )
    wrapper.chmod(0o755)
    work = tmp_path / "work"
    subprocess.run(["git", "init", "-q", "-b", "main", str(work)], check=True)
    (work / "f").write_text("hello\n")
    subprocess.run(["git", "-C", str(work), "add", "f"], check=True)
    subprocess.run(["git", "-C", str(work), "commit", "-qm", "one"], check=True)
    subprocess.run(["git", "-C", str(work), "branch", "dev"], check=True)
    (tmp_path / "remote").mkdir()
    result = subprocess.run(
        [
            "git",
            "-C",
            str(work),
            "push",
            "--porcelain",
            "--receive-pack",
            str(wrapper),
            str(tmp_path / "remote"),
            "main",
            "dev",
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1, result.stderr
    assert "*\trefs/heads/main:refs/heads/main\t[new branch]" in result.stdout
    assert "!\trefs/heads/dev:refs/heads/dev\t[remote rejected] (not today)" in result.stdout
    assert "remote: error: a message for stderr" in result.stderr
    parsed = seen.read_text()
    assert "refs/heads/main" in parsed and "refs/heads/dev" in parsed
    assert "b'report-status-v2'" in parsed and "b'side-band-64k'" in parsed
    assert "b'PACK'" in parsed
