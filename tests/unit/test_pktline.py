"""The pkt-line codec: framing, side-band splitting and the incremental decoder."""

from __future__ import annotations

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gitstratum.core.limits import MAX_PKT_DATA, MAX_PKT_LEN, MAX_SIDEBAND_DATA
from gitstratum.core.pktline import (
    DELIM_PKT,
    FLUSH_PKT,
    NEED_DATA,
    RESPONSE_END_PKT,
    Packet,
    PktLineDecoder,
    PktLineError,
    Special,
    error_pkt,
    line,
    pkt_line,
    pkt_lines,
    sideband,
    strip_newline,
)


def decode_all(data: bytes, max_empty_packets: int = 256) -> list[Packet | Special]:
    decoder = PktLineDecoder(max_empty_packets)
    decoder.receive_data(data)
    events = list(decoder.events())
    decoder.check_complete()
    return events


def encode(event: Packet | Special) -> bytes:
    return pkt_line(event.data) if isinstance(event, Packet) else event.value


# -- encoding ---------------------------------------------------------------


def test_pkt_line_frames_bytes_and_text():
    """The header is the 4-hex-digit length including itself; text is sent as UTF-8."""
    assert pkt_line(b"want x\n") == b"000bwant x\n"
    assert pkt_line("é\n") == b"0007\xc3\xa9\n"
    assert pkt_line(b"") == b"0004"


def test_pkt_line_refuses_payload_over_the_limit():
    """A payload of MAX_PKT_DATA fits in one packet; one byte more is refused."""
    biggest = pkt_line(b"x" * MAX_PKT_DATA)
    assert biggest[:4] == b"%04x" % MAX_PKT_LEN
    with pytest.raises(ValueError):
        pkt_line(b"x" * (MAX_PKT_DATA + 1))


def test_pkt_lines_concatenates():
    """pkt_lines is the concatenation of pkt_line of each argument."""
    assert pkt_lines(b"a\n", "b\n", b"") == b"0006a\n0006b\n0004"
    assert pkt_lines() == b""


def test_special_members_are_their_wire_form():
    """Each Special's value is the bytes that represent it on the wire."""
    assert Special.FLUSH.value == FLUSH_PKT == b"0000"
    assert Special.DELIM.value == DELIM_PKT == b"0001"
    assert Special.RESPONSE_END.value == RESPONSE_END_PKT == b"0002"


def test_error_pkt():
    """An ERR packet carries the message and one newline, whatever the input ends with."""
    assert error_pkt("access denied") == pkt_line(b"ERR access denied\n")
    assert error_pkt(b"access denied\n") == pkt_line(b"ERR access denied\n")


def test_error_pkt_cuts_an_overlong_message_to_one_packet():
    """A message too long for one packet is cut rather than raising on the error path."""
    pkt = error_pkt("x" * (2 * MAX_PKT_DATA))
    assert len(pkt) == MAX_PKT_LEN
    (event,) = decode_all(pkt)
    assert isinstance(event, Packet)
    assert event.data.startswith(b"ERR xxx") and event.data.endswith(b"x\n")


def test_line_strips_exactly_one_newline():
    """line()/strip_newline() chomp one trailing LF and nothing else."""
    assert line(Packet(b"have x\n")) == b"have x"
    assert line(Packet(b"a\n\n")) == b"a\n"
    assert line(Packet(b"no newline")) == b"no newline"
    assert strip_newline(b"") == b""


# -- side-band --------------------------------------------------------------


def test_sideband_yields_nothing_for_empty_data():
    """Empty data makes no packets (an empty side-band packet would mean nothing)."""
    assert list(sideband(1, b"")) == []


@pytest.mark.parametrize(
    ("size", "count"),
    [
        (1, 1),
        (MAX_SIDEBAND_DATA - 1, 1),
        (MAX_SIDEBAND_DATA, 1),
        (MAX_SIDEBAND_DATA + 1, 2),
        (2 * MAX_SIDEBAND_DATA, 2),
        (2 * MAX_SIDEBAND_DATA + 1, 3),
    ],
)
def test_sideband_splits_at_the_packet_limit(size, count):
    """Packets are as full as allowed and never exceed the pkt-line limit."""
    data = bytes(i % 251 for i in range(size))
    pkts = list(sideband(2, data))
    assert len(pkts) == count
    assert all(len(p) <= MAX_PKT_LEN for p in pkts)
    assert len(pkts[0]) == 5 + min(size, MAX_SIDEBAND_DATA)
    events = decode_all(b"".join(pkts))
    assert all(isinstance(e, Packet) and e.data[:1] == b"\x02" for e in events)
    assert b"".join(e.data[1:] for e in events if isinstance(e, Packet)) == data


def test_sideband_small_packets_for_old_side_band():
    """With max_payload=995 (the 1000-byte side-band), every packet is at most 1000 bytes."""
    pkts = list(sideband(1, b"y" * 2000, max_payload=995))
    assert [len(p) for p in pkts] == [1000, 1000, 4 + 1 + 10]
    assert pkts[0][:5] == b"03e8\x01"


def test_sideband_refuses_bad_arguments():
    """A band that is not a byte, or a payload size the packet cannot carry, is a bug."""
    with pytest.raises(ValueError):
        list(sideband(256, b"x"))
    with pytest.raises(ValueError):
        list(sideband(1, b"x", max_payload=MAX_SIDEBAND_DATA + 1))
    with pytest.raises(ValueError):
        list(sideband(1, b"x", max_payload=0))


@settings(max_examples=50, deadline=None, derandomize=True)
@given(
    band=st.integers(1, 3),
    data=st.binary(max_size=3000),
    max_payload=st.integers(1, 1000),
)
def test_sideband_round_trip(band, data, max_payload):
    """Demultiplexing the packets gives back the data, every packet on the band."""
    events = decode_all(b"".join(sideband(band, data, max_payload)))
    assert all(isinstance(e, Packet) and 2 <= len(e.data) <= max_payload + 1 for e in events)
    assert all(e.data[0] == band for e in events if isinstance(e, Packet))
    assert b"".join(e.data[1:] for e in events if isinstance(e, Packet)) == data


# -- decoding ---------------------------------------------------------------

events_strategy = st.lists(
    st.one_of(
        st.builds(Packet, st.binary(max_size=200)),
        st.builds(
            lambda size, fill: Packet(bytes([fill]) * size),
            st.integers(60000, MAX_PKT_DATA),
            st.integers(0, 255),
        ),
        st.sampled_from(list(Special)),
    ),
    max_size=30,
)


@settings(max_examples=100, deadline=None, derandomize=True)
@given(events=events_strategy, cuts=st.lists(st.integers(0, 10**6), max_size=40))
def test_decoder_round_trip_in_any_chunking(events, cuts):
    """Encoding events then decoding them, however the bytes are split, gives the same events."""
    wire = b"".join(encode(e) for e in events)
    bounds = sorted({c % (len(wire) + 1) for c in cuts} | {0, len(wire)})
    decoder = PktLineDecoder()
    decoded = []
    for start, end in zip(bounds, bounds[1:], strict=False):
        decoder.receive_data(wire[start:end])
        decoded.extend(decoder.events())
    decoder.check_complete()
    assert decoded == events


def test_decoder_needs_data_until_a_packet_is_whole():
    """A partial header or partial payload is NEED_DATA, not an error."""
    decoder = PktLineDecoder()
    assert decoder.next_event() is NEED_DATA
    decoder.receive_data(b"00")
    assert decoder.next_event() is NEED_DATA
    decoder.receive_data(b"09hell")
    assert decoder.next_event() is NEED_DATA
    decoder.receive_data(b"o0000")
    assert decoder.next_event() == Packet(b"hello")
    assert decoder.next_event() is Special.FLUSH
    assert decoder.next_event() is NEED_DATA


def test_decoder_reads_the_specials():
    """0000, 0001 and 0002 are flush, delim and response-end."""
    assert decode_all(b"000100020000") == [Special.DELIM, Special.RESPONSE_END, Special.FLUSH]


def test_decoder_accepts_uppercase_hex_lengths():
    """git's hexval() reads upper-case digits, so "000A" is a 6-byte payload."""
    assert decode_all(b"000Aabcdef") == [Packet(b"abcdef")]


def test_decoder_largest_packet():
    """A packet of exactly MAX_PKT_LEN bytes is accepted."""
    assert decode_all(b"fff0" + b"z" * (MAX_PKT_LEN - 4)) == [Packet(b"z" * (MAX_PKT_LEN - 4))]


@pytest.mark.parametrize(
    ("wire", "message"),
    [
        (b"00zzxxxx", "protocol error: bad line length character: 00zz"),
        (b"+00a", "protocol error: bad line length character: +00a"),
        (b" 00a", "protocol error: bad line length character:  00a"),
        (b"0x0a", "protocol error: bad line length character: 0x0a"),
        (b"\xff000", "protocol error: bad line length character: \\xff000"),
        (b"0003", "protocol error: bad line length 3"),
        (b"fff1", "protocol error: bad line length 65521"),
        (b"ffff", "protocol error: bad line length 65535"),
    ],
)
def test_decoder_rejects_bad_lengths(wire, message):
    """Malformed length headers raise PktLineError with git's wording."""
    decoder = PktLineDecoder()
    decoder.receive_data(wire)
    with pytest.raises(PktLineError) as caught:
        decoder.next_event()
    assert str(caught.value) == message


def test_decoder_stays_failed_after_an_error():
    """After a framing error the stream cannot be trusted: every later call raises again."""
    decoder = PktLineDecoder()
    decoder.receive_data(b"0003")
    with pytest.raises(PktLineError):
        decoder.next_event()
    decoder.receive_data(b"0000")
    with pytest.raises(PktLineError):
        decoder.next_event()
    with pytest.raises(PktLineError):
        decoder.check_complete()


def test_decoder_bad_packet_after_good_ones():
    """Events before the bad header are delivered; the error comes where the damage is."""
    decoder = PktLineDecoder()
    decoder.receive_data(pkt_line(b"ok\n") + b"zzzz")
    assert decoder.next_event() == Packet(b"ok\n")
    with pytest.raises(PktLineError):
        decoder.next_event()


def test_decoder_limits_consecutive_empty_packets():
    """Up to max_empty_packets empty packets in a row are fine; one more is refused."""
    assert decode_all(b"0004" * 5, max_empty_packets=5) == [Packet(b"")] * 5
    with pytest.raises(PktLineError, match="consecutive empty packets"):
        decode_all(b"0004" * 6, max_empty_packets=5)


def test_empty_packet_run_is_reset_by_other_packets():
    """Only a run of empty packets counts: data or a flush in between starts again."""
    wire = (b"0004" * 3 + pkt_line(b"x")) * 3 + (b"0004" * 3 + FLUSH_PKT) * 3
    events = decode_all(wire, max_empty_packets=3)
    assert len(events) == 24


def test_default_empty_packet_limit():
    """The default allows 256 empty packets in a row and refuses the 257th."""
    assert len(decode_all(b"0004" * 256)) == 256
    with pytest.raises(PktLineError):
        decode_all(b"0004" * 257)


def test_events_stops_at_need_data():
    """events() yields what is whole and leaves a partial packet buffered."""
    decoder = PktLineDecoder()
    decoder.receive_data(pkt_lines(b"a", b"b") + b"000")
    assert list(decoder.events()) == [Packet(b"a"), Packet(b"b")]
    assert list(decoder.events()) == []
    decoder.receive_data(b"0")
    assert list(decoder.events()) == [Special.FLUSH]


def test_take_unconsumed_returns_what_follows_the_commands():
    """The bytes after the last parsed packet (a push's pack) come back whole, then are gone."""
    decoder = PktLineDecoder()
    pack = b"PACK\x00\x00\x00\x02" + bytes(range(256))
    decoder.receive_data(pkt_line(b"old new refs/heads/main\n") + FLUSH_PKT + pack[:10])
    assert decoder.next_event() == Packet(b"old new refs/heads/main\n")
    assert decoder.next_event() is Special.FLUSH
    decoder.receive_data(pack[10:])
    assert decoder.take_unconsumed() == pack
    assert decoder.take_unconsumed() == b""
    decoder.check_complete()
    assert decoder.next_event() is NEED_DATA


def test_take_unconsumed_after_compaction():
    """The unparsed tail is exact even after the decoder has discarded a large parsed prefix."""
    decoder = PktLineDecoder()
    lines = [pkt_line(b"have %040x\n" % i) for i in range(5000)]
    decoder.receive_data(b"".join(lines) + FLUSH_PKT + b"tail bytes")
    events = []
    while (event := decoder.next_event()) is not Special.FLUSH:
        events.append(event)
    assert len(events) == 5000
    assert decoder.take_unconsumed() == b"tail bytes"


def test_check_complete_detects_a_cut_packet():
    """A stream that ends inside a packet (header or payload) is an error at end of body."""
    for tail in (b"00", b"0009hel"):
        decoder = PktLineDecoder()
        decoder.receive_data(pkt_line(b"ok") + tail)
        assert list(decoder.events()) == [Packet(b"ok")]
        with pytest.raises(PktLineError, match="unexpected end of stream inside a packet"):
            decoder.check_complete()


def test_many_small_packets_decode_in_linear_time():
    """100k "have" lines in one buffer decode quickly (a quadratic decoder takes minutes)."""
    count = 100_000
    wire = b"".join(pkt_line(b"have %040x\n" % i) for i in range(count)) + FLUSH_PKT
    start = time.perf_counter()
    decoder = PktLineDecoder()
    decoder.receive_data(wire)
    events = list(decoder.events())
    elapsed = time.perf_counter() - start
    assert len(events) == count + 1
    assert events[-2] == Packet(b"have %040x\n" % (count - 1))
    assert elapsed < 10, elapsed
