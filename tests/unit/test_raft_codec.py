"""The Raft message codec: exact round trips, and a clear CodecError for every kind of bad input."""

from __future__ import annotations

import struct
import zlib

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gitstratum.raft.codec import CODEC_VERSION, CodecError, decode_message, encode_message
from gitstratum.raft.types import (
    ConfState,
    Entry,
    EntryType,
    Message,
    MessageType,
    Snapshot,
    SnapshotMetadata,
)

u64 = st.integers(0, 2**64 - 1)
small = st.integers(0, 1000)
ids = st.frozensets(st.integers(1, 2**64 - 1), max_size=6)

entries = st.builds(
    Entry,
    term=u64,
    index=u64,
    type=st.sampled_from(list(EntryType)),
    data=st.binary(max_size=64),
)


@st.composite
def entry_runs(draw: st.DrawFn) -> tuple[Entry, ...]:
    """Up to five entries with consecutive indexes (one run of a log), from any start."""
    run = draw(st.lists(entries, max_size=5))
    first = draw(st.integers(0, 2**64 - 1 - len(run)))
    return tuple(attrs.evolve(e, index=first + i) for i, e in enumerate(run))


snapshots = st.builds(
    Snapshot,
    metadata=st.builds(
        SnapshotMetadata,
        index=u64,
        term=u64,
        conf_state=st.builds(ConfState, voters=ids, learners=ids),
    ),
    data=st.binary(max_size=256),
)
messages = st.builds(
    Message,
    type=st.sampled_from(list(MessageType)),
    to=u64,
    from_=u64,
    term=u64,
    log_term=u64,
    index=u64,
    entries=entry_runs(),
    commit=u64,
    reject=st.booleans(),
    reject_hint=u64,
    snapshot=st.none() | snapshots,
    context=st.binary(max_size=32),
)

# Offsets of fields in an encoded message: the header, then the fixed fields.
_HEADER = 10
_REJECT = _HEADER + 6 * 8


def _sealed(data: bytearray) -> bytes:
    """*data* with its body checksum made right again, so a test reaches the check after it."""
    data[6:10] = struct.pack(">I", zlib.crc32(bytes(data[_HEADER:])))
    return bytes(data)


def _full_message() -> Message:
    return Message(
        type=MessageType.APPEND,
        to=2,
        from_=1,
        term=7,
        log_term=6,
        index=41,
        entries=(
            Entry(7, 42, EntryType.NORMAL, b"put x 1"),
            Entry(7, 43, EntryType.CONF_CHANGE, b"\x00" * 9),
        ),
        commit=40,
        reject=False,
        reject_hint=0,
        snapshot=Snapshot(
            SnapshotMetadata(30, 5, ConfState(frozenset({1, 2, 3}), frozenset({4}))), b"state"
        ),
        context=b"ctx",
    )


@given(messages)
def test_every_message_round_trips(message: Message) -> None:
    """Any message, with any entries, snapshot and extreme integers, decodes to an equal message."""
    assert decode_message(encode_message(message)) == message


@given(messages)
def test_encoding_is_deterministic(message: Message) -> None:
    """Equal messages encode to equal bytes (id sets are written sorted), so retransmits are identical."""
    rebuilt = message
    if message.snapshot is not None:
        meta = message.snapshot.metadata
        shuffled = ConfState(
            frozenset(sorted(meta.conf_state.voters, reverse=True)),
            frozenset(sorted(meta.conf_state.learners, reverse=True)),
        )
        rebuilt = attrs.evolve(
            message,
            snapshot=attrs.evolve(
                message.snapshot, metadata=attrs.evolve(meta, conf_state=shuffled)
            ),
        )
    assert rebuilt == message
    assert encode_message(rebuilt) == encode_message(message)


def test_header_carries_the_version_and_type() -> None:
    """The first byte is CODEC_VERSION and the second the message type, as peers check them first."""
    data = encode_message(Message(MessageType.VOTE, to=2, from_=1, term=3))
    assert data[0] == CODEC_VERSION
    assert data[1] == MessageType.VOTE


def test_none_and_empty_snapshot_stay_distinct() -> None:
    """A message without a snapshot and one with an empty snapshot do not collapse into each other."""
    without = Message(MessageType.SNAPSHOT, to=2, from_=1)
    empty = Message(MessageType.SNAPSHOT, to=2, from_=1, snapshot=Snapshot())
    assert decode_message(encode_message(without)).snapshot is None
    assert decode_message(encode_message(empty)).snapshot == Snapshot()


def test_large_snapshot_round_trips() -> None:
    """A several-megabyte snapshot payload survives the codec byte for byte."""
    data = bytes(range(256)) * (5 * 4096)
    m = Message(
        MessageType.SNAPSHOT, to=2, from_=1, snapshot=Snapshot(SnapshotMetadata(9, 2), data)
    )
    assert decode_message(encode_message(m)).snapshot == m.snapshot


def test_unknown_version_is_refused() -> None:
    """A message from a newer (or older) codec names both versions instead of being misread."""
    data = bytearray(encode_message(_full_message()))
    data[0] = CODEC_VERSION + 1
    with pytest.raises(CodecError, match=f"unsupported raft codec version {CODEC_VERSION + 1}"):
        decode_message(bytes(data))


def test_unknown_message_type_is_refused() -> None:
    """A type byte outside MessageType is reported as an unknown message type."""
    data = bytearray(encode_message(_full_message()))
    data[1] = 200
    with pytest.raises(CodecError, match="unknown raft message type 200"):
        decode_message(bytes(data))


def test_truncated_message_is_refused() -> None:
    """Fewer bytes than the header declares is a truncation, at any cut point."""
    data = encode_message(_full_message())
    for cut in (0, 3, _HEADER, len(data) // 2, len(data) - 1):
        with pytest.raises(CodecError, match="truncated raft message"):
            decode_message(data[:cut])


def test_trailing_bytes_are_refused() -> None:
    """Bytes after the declared body are not silently ignored."""
    with pytest.raises(CodecError, match="trailing bytes after raft message: 1 past"):
        decode_message(encode_message(_full_message()) + b"\x00")


def test_a_flipped_bit_fails_the_checksum() -> None:
    """Any single bit flipped in the body is caught by the CRC-32 before a field is believed."""
    data = bytearray(encode_message(_full_message()))
    for bit in range(0, (len(data) - _HEADER) * 8, 37):
        flipped = bytearray(data)
        flipped[_HEADER + bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(CodecError, match="checksum does not match"):
            decode_message(bytes(flipped))


def test_bad_reject_flag_is_refused() -> None:
    """The reject byte must be 0 or 1."""
    data = bytearray(encode_message(_full_message()))
    data[_REJECT] = 2
    with pytest.raises(CodecError, match="bad reject flag 2"):
        decode_message(_sealed(data))


def test_bad_entry_type_is_refused() -> None:
    """An entry type byte outside EntryType is corruption, not a new kind of entry."""
    m = Message(MessageType.APPEND, to=2, from_=1, entries=(Entry(1, 1, EntryType.NORMAL, b""),))
    data = bytearray(encode_message(m))
    # header, fixed fields, context length (empty), entry count, then term and index
    type_offset = _HEADER + 57 + 4 + 4 + 16
    assert data[type_offset] == EntryType.NORMAL
    data[type_offset] = 9
    with pytest.raises(CodecError, match="bad entry type 9"):
        decode_message(_sealed(data))


def test_entries_with_a_gap_are_refused() -> None:
    """Entries whose indexes are not consecutive are corruption: a receiver would tear its log on them."""
    for indexes in ((1, 3), (5, 5), (7, 6)):
        m = Message(MessageType.APPEND, to=2, from_=1, entries=tuple(Entry(1, i) for i in indexes))
        with pytest.raises(CodecError, match=f"entry {indexes[1]} follows entry {indexes[0]}"):
            decode_message(encode_message(m))


def test_bad_snapshot_flag_is_refused() -> None:
    """The snapshot-present byte must be 0 or 1."""
    data = bytearray(encode_message(Message(MessageType.HEARTBEAT, to=2, from_=1)))
    assert data[-1] == 0
    data[-1] = 7
    with pytest.raises(CodecError, match="bad snapshot present flag 7"):
        decode_message(_sealed(data))


def test_absurd_entry_count_is_refused() -> None:
    """An entry count that could not fit in the body is reported as absurd, before any allocation."""
    data = bytearray(encode_message(Message(MessageType.APPEND, to=2, from_=1)))
    count_offset = _HEADER + 57 + 4
    data[count_offset : count_offset + 4] = struct.pack(">I", 2**32 - 1)
    with pytest.raises(CodecError, match="absurd entry count 4294967295"):
        decode_message(_sealed(data))


def test_absurd_context_length_is_refused() -> None:
    """A context length reaching past the end of a complete body is absurd, not truncated."""
    data = bytearray(encode_message(Message(MessageType.HEARTBEAT, to=2, from_=1, context=b"abc")))
    offset = _HEADER + 57
    data[offset : offset + 4] = struct.pack(">I", 10**6)
    with pytest.raises(CodecError, match="absurd context length 1000000"):
        decode_message(_sealed(data))


def test_body_shorter_than_its_fields_is_refused() -> None:
    """A header that declares a body too short for the fixed fields is corruption."""
    body = b"\x00\x00\x00"
    data = struct.pack(">BBII", CODEC_VERSION, MessageType.VOTE, 3, zlib.crc32(body)) + body
    with pytest.raises(CodecError, match="fixed fields needs 57 bytes"):
        decode_message(data)


def test_unencodable_values_are_refused() -> None:
    """Negative or over-64-bit integers raise CodecError on encode instead of wrapping around."""
    with pytest.raises(CodecError, match="term -1"):
        encode_message(Message(MessageType.VOTE, to=2, from_=1, term=-1))
    with pytest.raises(CodecError, match="to 18446744073709551616"):
        encode_message(Message(MessageType.VOTE, to=2**64, from_=1))


def test_codec_error_is_a_value_error() -> None:
    """Callers that catch ValueError for bad input also catch codec errors."""
    assert issubclass(CodecError, ValueError)


@settings(max_examples=500)
@given(st.binary(max_size=200))
def test_random_bytes_only_raise_codec_error(data: bytes) -> None:
    """Arbitrary bytes either decode or raise CodecError, never anything else."""
    try:
        decode_message(data)
    except CodecError:
        pass


@settings(max_examples=300)
@given(messages, st.data())
def test_mutated_messages_only_raise_codec_error(message: Message, data: st.DataObject) -> None:
    """Truncating or flipping bytes of a real message decodes or raises CodecError, nothing else."""
    encoded = bytearray(encode_message(message))
    cut = data.draw(st.integers(0, len(encoded)))
    flips = data.draw(
        st.lists(st.tuples(st.integers(0, len(encoded) - 1), st.integers(0, 255)), max_size=4)
    )
    for position, value in flips:
        encoded[position] = value
    mutated = bytes(encoded[:cut])
    try:
        decode_message(mutated)
    except CodecError:
        pass
