"""The Raft key-value state machine: its command and snapshot encodings and its results."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from zope.interface.verify import verifyObject

from gitstratum.raft.interfaces import IStateMachine
from gitstratum.raft.kv import (
    Cas,
    Get,
    KVStore,
    Put,
    decode_command,
    decode_state,
    encode_command,
    encode_state,
)

keys = st.binary(max_size=8)
values = st.binary(max_size=16)
commands = st.one_of(
    st.builds(Put, keys, values),
    st.builds(Get, keys),
    st.builds(Cas, keys, st.none() | values, values),
)


def test_store_provides_the_state_machine_interface() -> None:
    """KVStore is a complete IStateMachine."""
    assert verifyObject(IStateMachine, KVStore())


@given(commands)
def test_command_round_trip(command: Put | Get | Cas) -> None:
    """Every command decodes to itself, including a CAS that expects the key absent."""
    assert decode_command(encode_command(command)) == command


def test_cas_absent_and_empty_are_distinct() -> None:
    """A CAS expecting the key absent is not the same command as one expecting an empty value."""
    absent = encode_command(Cas(b"k", None, b"v"))
    empty = encode_command(Cas(b"k", b"", b"v"))
    assert absent != empty
    assert decode_command(absent).expected is None  # type: ignore[union-attr]
    assert decode_command(empty).expected == b""  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "garbage",
    [
        b"",
        b"\x01",
        b"\x02\x01\x00\x00\x00\x00\x00\x00\x00\x00",  # unknown version
        b"\x01\x09\x00\x00\x00\x00",  # unknown operation
        b"\x01\x02\x00\x00\x00\x05abc",  # truncated key
        b"\x01\x02\x00\x00\x00\x01ab",  # trailing bytes
        b"\x01\x03\x00\x00\x00\x01k\x07\x00\x00\x00\x01v",  # bad CAS flag
        b"\x01\x02\xff\xff\xff\xff",  # absurd length
        b"\x80\x04\x95",  # the start of a pickle
    ],
)
def test_decoding_garbage_raises_value_error(garbage: bytes) -> None:
    """Anything that is not exactly one well-formed command is refused with ValueError."""
    with pytest.raises(ValueError):
        decode_command(garbage)


@given(st.binary(max_size=40))
def test_decoding_random_bytes_never_raises_anything_else(blob: bytes) -> None:
    """Random bytes either decode to a command that re-encodes identically or raise ValueError."""
    try:
        command = decode_command(blob)
    except ValueError:
        return
    assert encode_command(command) == blob


def test_apply_results() -> None:
    """put answers None, get the value or None, cas whether it swapped (None expecting absence)."""
    store = KVStore()
    assert store.apply(1, encode_command(Get(b"a"))) is None
    assert store.apply(2, encode_command(Cas(b"a", b"x", b"1"))) is False
    assert store.apply(3, encode_command(Cas(b"a", None, b"1"))) is True
    assert store.apply(4, encode_command(Cas(b"a", None, b"2"))) is False
    assert store.apply(5, encode_command(Get(b"a"))) == b"1"
    assert store.apply(6, encode_command(Put(b"a", b"3"))) is None
    assert store.apply(7, encode_command(Cas(b"a", b"3", b"4"))) is True
    assert store.query(encode_command(Get(b"a"))) == b"4"
    assert store.query(encode_command(Get(b"b"))) is None
    assert store.applied_index == 7


def test_noop_entry_and_double_apply() -> None:
    """An empty entry (a leader's no-op) changes nothing; applying an index twice is refused."""
    store = KVStore()
    assert store.apply(1, b"") is None
    assert store.data == {}
    store.apply(2, encode_command(Put(b"k", b"v")))
    with pytest.raises(ValueError, match="applied twice"):
        store.apply(2, encode_command(Put(b"k", b"w")))
    assert store.data == {b"k": b"v"}


def test_query_refuses_writes() -> None:
    """query only reads: a put or cas request is refused rather than applied outside the log."""
    store = KVStore()
    with pytest.raises(ValueError):
        store.query(encode_command(Put(b"k", b"v")))
    assert store.data == {}


@given(st.lists(commands, max_size=30))
def test_snapshot_restore_is_deterministic(script: list[Put | Get | Cas]) -> None:
    """Equal states give equal snapshot bytes whatever the insertion order, and restore reproduces the state."""
    store = KVStore()
    for index, command in enumerate(script, start=1):
        store.apply(index, encode_command(command))
    blob = store.snapshot()
    copy = KVStore()
    copy.restore(blob)
    assert copy.data == store.data
    assert copy.applied_index == store.applied_index
    reordered = dict(reversed(list(store.data.items())))
    assert encode_state(reordered, store.applied_index) == blob


def test_restore_garbage_raises_value_error() -> None:
    """A corrupt snapshot (truncated, trailing bytes, unsorted keys) is refused with ValueError."""
    good = encode_state({b"a": b"1", b"b": b"2"}, 9)
    assert decode_state(good) == ({b"a": b"1", b"b": b"2"}, 9)
    unsorted = good.replace(b"\x01a", b"\x01c")
    for blob in (good[:-1], good + b"\x00", unsorted, b"", b"\x02" + good[1:]):
        with pytest.raises(ValueError):
            KVStore().restore(blob)
