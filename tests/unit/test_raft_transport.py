"""The AMP Raft transport: delivery, chunking, refusing bad peers with one log line, reconnecting with backoff."""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.endpoints import serverFromString
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import LogLevel, capturedLogs
from twisted.protocols import amp
from twisted.test.iosim import ConnectionCompleter, IOPump
from zope.interface.verify import verifyObject

from gitstratum.raft.codec import CODEC_VERSION, encode_message
from gitstratum.raft.interfaces import IRaftTransport
from gitstratum.raft.transport import (
    CHUNK_SIZE,
    MAX_PAYLOAD,
    AMPTransport,
    FrameError,
    Handshake,
    RaftAMP,
    RaftMessages,
    Reassembler,
    pack_frames,
)
from gitstratum.raft.types import (
    ConfState,
    Entry,
    Message,
    MessageType,
    NodeId,
    Snapshot,
    SnapshotMetadata,
)

PORTS = {1: 7001, 2: 7002, 3: 7003}
ADDRESSES = {node: f"tcp:host=127.0.0.1:port={port}" for node, port in PORTS.items()}


def _policy(attempt: int) -> float:
    """A deterministic backoff: 1, 2, 4, ... seconds."""
    return float(2 ** (attempt - 1))


def _append(frm: NodeId, to: NodeId, index: int = 1, data: bytes = b"x") -> Message:
    return Message(
        MessageType.APPEND,
        to=to,
        from_=frm,
        term=1,
        index=index - 1,
        entries=(Entry(1, index, data=data),),
    )


class Cluster:
    """Transports for some nodes on one MemoryReactorClock, connected by iosim pumps."""

    def __init__(
        self,
        nodes: list[NodeId],
        listening: list[NodeId] | None = None,
        known: tuple[NodeId, ...] = (),
        **kw: Any,
    ) -> None:
        self.reactor = MemoryReactorClock()
        self.completer = ConnectionCompleter(self.reactor)
        self.pumps: list[IOPump] = []
        self.received: dict[NodeId, list[Message]] = {n: [] for n in nodes}
        self.unreachable: dict[NodeId, list[NodeId]] = {n: [] for n in nodes}
        self.transports: dict[NodeId, AMPTransport] = {}
        for n in nodes:
            t = AMPTransport(
                n,
                {m: ADDRESSES[m] for m in (*nodes, *known)},
                self.reactor,
                retry_policy=_policy,
                unreachable=self.unreachable[n].append,
                **kw,
            )
            t.set_receiver(self.received[n].append)
            self.transports[n] = t
        for n in nodes if listening is None else listening:
            self.listen(n)

    def listen(self, node: NodeId) -> None:
        self.transports[node].listen(serverFromString(self.reactor, f"tcp:{PORTS[node]}"))

    def start(self) -> None:
        for t in self.transports.values():
            t.start()

    def connect(self) -> None:
        """Complete every pending dial that has a listener, then move all data."""
        while (pump := self.completer.succeedOnce()) is not None:
            self.pumps.append(pump)
        self.flush()

    def flush(self) -> None:
        moved = True
        while moved:
            moved = False
            for pump in self.pumps:
                moved = pump.flush() or moved


@contextmanager
def _warnings() -> Iterator[list[dict[str, Any]]]:
    """Collect this module's warnings, and fail on any critical event (an unhandled error)."""
    found: list[dict[str, Any]] = []
    with capturedLogs() as events:
        yield found
        found.extend(
            e
            for e in events
            if e.get("log_namespace") == "gitstratum.raft.transport"
            and e["log_level"] == LogLevel.warn
        )
    assert not [e for e in events if e["log_level"] in (LogLevel.critical, LogLevel.error)]


def _server(cluster: Cluster, node: NodeId) -> tuple[RaftAMP, StringTransport]:
    """A listening-side protocol of ``node`` on a StringTransport, to feed raw bytes to."""
    protocol = cluster.transports[node].server_factory().buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    return protocol, transport


def _box(**values: bytes) -> bytes:
    return amp.AmpBox(**values).serialize()


def _handshake(sender: int, receiver: int, version: int = CODEC_VERSION) -> bytes:
    return _box(
        _command=Handshake.commandName,
        _ask=b"1",
        version=str(version).encode(),
        sender=str(sender).encode(),
        receiver=str(receiver).encode(),
    )


def _frames(payload: bytes) -> bytes:
    return _box(_command=RaftMessages.commandName, frames=payload)


# -- frames ---------------------------------------------------------------------


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(1, 3 * CHUNK_SIZE), min_size=1, max_size=6), st.integers(0, 2**32))
def test_frames_reassemble_exactly(sizes: list[int], seed: int) -> None:
    """Any mix of small and multi-chunk messages packs into values under AMP's limit and reassembles in order."""
    rng = random.Random(seed)
    messages = [rng.randbytes(size) for size in sizes]
    payloads = pack_frames(enumerate(messages))
    assert all(len(p) <= MAX_PAYLOAD for p in payloads)
    reassembler = Reassembler()
    out = [m for p in payloads for m in reassembler.feed(p)]
    assert out == messages


def test_small_messages_share_one_value() -> None:
    """Fifty small messages travel in a single AMP value."""
    messages = [encode_message(_append(1, 2, i)) for i in range(1, 51)]
    assert len(pack_frames(enumerate(messages))) == 1


def test_reassembler_refuses_broken_frame_streams() -> None:
    """Out-of-order chunks, a missing first chunk, bad lengths and oversized messages raise FrameError."""
    data = bytes(3 * CHUNK_SIZE)
    first, second, third = pack_frames([(7, data)])
    with pytest.raises(FrameError, match="without its first chunk"):
        Reassembler().feed(second)
    r = Reassembler()
    r.feed(first)
    with pytest.raises(FrameError, match="waits for chunk 1 of 3"):
        r.feed(third)
    with pytest.raises(FrameError, match="over the 1000-byte limit"):
        Reassembler(max_message_size=1000).feed(first)
    with pytest.raises(FrameError, match="truncated frame header"):
        Reassembler().feed(b"\x00" * 5)
    with pytest.raises(FrameError, match="bad chunk length"):
        Reassembler().feed(pack_frames([(1, b"abc")])[0][:-1])
    assert Reassembler().feed(b"") == []


# -- delivery -------------------------------------------------------------------


def test_provides_the_interface() -> None:
    """AMPTransport satisfies IRaftTransport as declared."""
    assert verifyObject(IRaftTransport, Cluster([1, 2]).transports[1])


def test_messages_round_trip_between_two_nodes() -> None:
    """A message each way arrives intact, in order, after the handshake."""
    c = Cluster([1, 2])
    c.start()
    c.connect()
    out = [_append(1, 2, i) for i in range(1, 4)]
    back = Message(MessageType.APPEND_RESPONSE, to=1, from_=2, term=1, index=3)
    with _warnings() as warnings:
        c.transports[1].send(out)
        c.transports[2].send([back])
        c.flush()
    assert c.received[2] == out
    assert c.received[1] == [back]
    assert warnings == []
    assert c.transports[1].dropped == 0


def test_large_snapshot_is_chunked_and_reassembled() -> None:
    """A several-megabyte InstallSnapshot crosses in many AMP values and arrives byte for byte."""
    c = Cluster([1, 2])
    c.start()
    c.connect()
    data = bytes(range(256)) * (6 * 4096)  # 6 MiB
    snapshot = Snapshot(SnapshotMetadata(100, 3, ConfState(frozenset({1, 2}))), data)
    message = Message(MessageType.SNAPSHOT, to=2, from_=1, term=3, snapshot=snapshot)
    c.transports[1].send([message, _append(1, 2, 101)])
    c.flush()
    assert c.received[2] == [message, _append(1, 2, 101)]


def test_messages_to_self_and_unknown_peers_are_not_sent() -> None:
    """Messages to ourselves are ignored; to an unknown peer they are dropped and reported unreachable."""
    c = Cluster([1, 2])
    c.start()
    c.connect()
    c.transports[1].send([_append(1, 1), _append(1, 9)])
    c.flush()
    assert c.received[1] == [] and c.received[2] == []
    assert c.unreachable[1] == [9]
    assert c.transports[1].dropped == 1


# -- refusing bad peers ----------------------------------------------------------


def test_corrupt_frames_drop_the_connection_but_not_the_node() -> None:
    """A peer sending a corrupt message gets one log line and a dropped connection; others keep working."""
    c = Cluster([1, 2], known=(3,))
    c.start()
    c.connect()
    protocol, transport = _server(c, 1)
    corrupt = bytearray(encode_message(_append(3, 1)))
    corrupt[1] = 250  # unknown message type
    with _warnings() as warnings:
        protocol.dataReceived(_handshake(3, 1) + _frames(pack_frames([(0, bytes(corrupt))])[0]))
    assert transport.disconnecting
    assert len(warnings) == 1
    assert "unknown raft message type 250" in warnings[0]["reason"]
    assert warnings[0]["peer"] == 3
    c.transports[2].send([_append(2, 1)])
    c.flush()
    assert c.received[1] == [_append(2, 1)]


def test_an_append_with_a_gap_in_its_entries_drops_the_connection() -> None:
    """A well-framed APPEND whose entries skip an index is refused at the edge, never handed to the core."""
    c = Cluster([1], known=(3,))
    protocol, transport = _server(c, 1)
    torn = Message(MessageType.APPEND, to=1, from_=3, term=1, entries=(Entry(1, 1), Entry(1, 3)))
    with _warnings() as warnings:
        protocol.dataReceived(
            _handshake(3, 1) + _frames(pack_frames([(0, encode_message(torn))])[0])
        )
    assert transport.disconnecting
    assert [w["reason"] for w in warnings] == ["corrupt raft message: entry 3 follows entry 1"]
    assert c.received[1] == []


def test_bad_frame_stream_drops_the_connection() -> None:
    """A chunk out of sequence is a protocol error: one log line, connection dropped, nothing delivered."""
    c = Cluster([1], known=(3,))
    protocol, transport = _server(c, 1)
    first, second, _ = pack_frames([(5, encode_message(_append(3, 1, data=bytes(2 * CHUNK_SIZE))))])
    with _warnings() as warnings:
        protocol.dataReceived(_handshake(3, 1) + _frames(second))
    assert transport.disconnecting
    assert [w["reason"] for w in warnings] == ["chunk 1 of message 5 without its first chunk"]
    assert c.received[1] == []


def test_incompatible_version_is_refused() -> None:
    """A handshake with another codec version gets an INCOMPATIBLE_VERSION error, one log line, and a hang-up."""
    c = Cluster([1], known=(3,))
    protocol, transport = _server(c, 1)
    with _warnings() as warnings:
        protocol.dataReceived(_handshake(3, 1, version=CODEC_VERSION + 1) + _frames(b"ignored"))
    assert transport.disconnecting
    assert b"INCOMPATIBLE_VERSION" in transport.value()
    assert len(warnings) == 1
    assert f"speaks raft codec version {CODEC_VERSION + 1}" in warnings[0]["reason"]


def test_unknown_command_is_refused() -> None:
    """An unknown AMP command is not answered: one log line and the connection is dropped."""
    c = Cluster([1], known=(3,))
    protocol, transport = _server(c, 1)
    with _warnings() as warnings:
        protocol.dataReceived(_handshake(3, 1) + _box(_command=b"StartTLS", _ask=b"2"))
    assert transport.disconnecting
    assert [w["reason"] for w in warnings] == ["unknown command b'StartTLS'"]
    assert b"StartTLS" not in transport.value()


def test_messages_before_the_handshake_are_refused() -> None:
    """Raft messages from a connection that has not said who it is are refused."""
    c = Cluster([1])
    protocol, transport = _server(c, 1)
    with _warnings() as warnings:
        protocol.dataReceived(_frames(pack_frames([(0, encode_message(_append(3, 1)))])[0]))
    assert transport.disconnecting
    assert [w["reason"] for w in warnings] == ["a message before the handshake"]
    assert c.received[1] == []


def test_misaddressed_messages_are_refused() -> None:
    """A message whose sender or receiver disagrees with the handshake is refused, not delivered."""
    c = Cluster([1], known=(3,))
    protocol, transport = _server(c, 1)
    with _warnings() as warnings:
        protocol.dataReceived(
            _handshake(3, 1) + _frames(pack_frames([(0, encode_message(_append(2, 1)))])[0])
        )
    assert transport.disconnecting
    assert len(warnings) == 1 and "a message from node 2 to node 1" in warnings[0]["reason"]
    assert c.received[1] == []


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"\x01\x00garbage", "an AMP key of 256 bytes, over the 255-byte limit"),
        (_box(foo=b"bar"), "a box that is neither a command nor an answer"),
        (_box(_answer=b"77"), "an answer to a question never asked"),
        (
            _box(
                _command=Handshake.commandName,
                _ask=b"1",
                version=b"one",
                sender=b"3",
                receiver=b"1",
            ),
            "malformed raft-handshake command",
        ),
    ],
)
def test_garbage_is_refused_without_raising(data: bytes, reason: str) -> None:
    """Bytes that are not our AMP conversation log one line and drop the connection; nothing raises."""
    c = Cluster([1])
    protocol, transport = _server(c, 1)
    with _warnings() as warnings:
        protocol.dataReceived(data)
    assert transport.disconnecting
    assert len(warnings) == 1 and warnings[0]["reason"].startswith(reason)


def test_dialling_the_wrong_node_is_refused_on_both_sides() -> None:
    """If another node answers at a peer's address, both ends log once and the dialler backs off further."""
    c = Cluster([1, 3], listening=[3])
    c.transports[1].set_peers({2: f"tcp:host=127.0.0.1:port={PORTS[3]}"})
    c.transports[1].start()
    with _warnings() as warnings:
        c.connect()
    reasons = sorted(w["reason"] for w in warnings)
    assert len(reasons) == 2
    assert "it expected node 2, this is node 3" in reasons
    assert any(r.startswith("it refused the handshake") for r in reasons)
    # The refusal counts as a failed attempt on top of the reconnect: 2 s, not 1 s.
    (retry,) = c.reactor.getDelayedCalls()
    assert retry.getTime() - c.reactor.seconds() == _policy(2)
    assert c.unreachable[1] == [2]


# -- connecting, queueing, reconnecting ------------------------------------------


def test_reconnects_with_backoff_and_queues_while_dialling() -> None:
    """Failed dials back off 1, 2 s; messages are dropped while down, queued while dialling, sent on connect."""
    c = Cluster([1, 2], listening=[])
    t1 = c.transports[1]
    t1.start()
    assert len(c.reactor.tcpClients) == 1  # dialling node 2

    t1.send([_append(1, 2, 1)])  # queued: a dial is in progress
    c.completer.failOnce()
    assert t1.dropped == 1 and c.unreachable[1] == [2]
    (retry,) = c.reactor.getDelayedCalls()
    assert retry.getTime() == 1.0

    t1.send([_append(1, 2, 2)])  # down: dropped at once
    assert t1.dropped == 2

    c.reactor.advance(1.0)
    assert len(c.reactor.tcpClients) == 1
    c.completer.failOnce()
    (retry,) = c.reactor.getDelayedCalls()
    assert retry.getTime() == 1.0 + 2.0

    c.listen(2)
    c.reactor.advance(2.0)
    t1.send([_append(1, 2, 3)])  # dialling again: queued
    c.connect()
    assert c.received[2] == [_append(1, 2, 3)]
    t1.send([_append(1, 2, 4)])
    c.flush()
    assert c.received[2] == [_append(1, 2, 3), _append(1, 2, 4)]


def test_queue_while_dialling_is_bounded() -> None:
    """While a dial is in progress only the newest max_queue messages are kept; the rest are dropped."""
    c = Cluster([1, 2], max_queue=3)
    c.transports[1].start()
    c.transports[1].send([_append(1, 2, i) for i in range(1, 6)])
    assert c.transports[1].dropped == 2
    c.connect()
    assert c.received[2] == [_append(1, 2, i) for i in range(3, 6)]


def test_a_peer_that_stops_reading_gets_drops_not_an_ever_growing_buffer() -> None:
    """While the connection's send buffer is full, messages to that peer are dropped and reported."""
    c = Cluster([1, 2])
    t1 = c.transports[1]
    t1.start()
    c.connect()
    link = t1._links[2]
    assert link.protocol is not None
    buffer = link.protocol.transport.producer  # what the TCP transport pauses when full
    # A TCP transport pauses it past bufferSize, which the connection sets:
    tcp = StringTransport()
    tcp.bufferSize = 1  # type: ignore[attr-defined]
    fresh = RaftAMP(t1, link)
    fresh.makeConnection(tcp)
    assert tcp.bufferSize == t1.max_buffer_bytes == 16 << 20  # type: ignore[attr-defined]
    assert tcp.producer is not None and tcp.streaming
    buffer.pauseProducing()
    t1.send([_append(1, 2, 1)])
    c.connect()
    assert c.received[2] == [] and t1.dropped == 1 and c.unreachable[1] == [2]
    buffer.resumeProducing()
    t1.send([_append(1, 2, 2)])
    c.connect()
    assert c.received[2] == [_append(1, 2, 2)]


def test_lost_connection_is_reported_and_redialled() -> None:
    """When a connection drops the peer is reported unreachable, redialled after the backoff, and used again."""
    c = Cluster([1, 2])
    c.start()
    c.connect()
    pump = c.pumps[0]
    pump.clientIO.loseConnection()
    c.flush()
    assert 2 in c.unreachable[1]
    c.reactor.advance(_policy(1))
    c.connect()
    c.transports[1].send([_append(1, 2, 7)])
    c.flush()
    assert c.received[2][-1] == _append(1, 2, 7)


def test_set_peers_redials_changed_addresses_and_forgets_removed_ones() -> None:
    """A changed address hangs up and dials anew; a removed peer's messages are dropped."""
    c = Cluster([1, 2, 3])
    c.start()
    c.connect()
    t1 = c.transports[1]
    t1.set_peers({1: ADDRESSES[1], 3: ADDRESSES[3]})
    c.flush()
    t1.send([_append(1, 2), _append(1, 3)])
    c.flush()
    assert c.received[2] == [] and c.received[3] == [_append(1, 3)]
    assert c.unreachable[1] == [2]
    t1.set_peers({1: ADDRESSES[1], 2: ADDRESSES[2], 3: ADDRESSES[3]})
    c.connect()
    t1.send([_append(1, 2)])
    c.flush()
    assert c.received[2] == [_append(1, 2)]


def test_stop_hangs_up_everything() -> None:
    """stop() closes outgoing and incoming connections, stops listening, and its Deferred fires."""
    c = Cluster([1, 2])
    c.start()
    c.connect()
    done = c.transports[1].stop()
    c.flush()
    fired: list[object] = []
    done.addCallback(fired.append)
    assert fired == [None]
    # Node 1 no longer dials node 2, and node 2's connection to node 1 was closed.
    c.transports[1].send([_append(1, 2)])
    assert c.transports[1].dropped == 1
    assert all(p.serverIO.disconnected or p.clientIO.disconnected for p in c.pumps)


def test_a_stranger_is_refused_at_the_handshake() -> None:
    """A node id this transport has no address for is refused: it could disrupt the group."""
    c = Cluster([1])
    protocol, transport = _server(c, 1)
    with _warnings() as warnings:
        protocol.dataReceived(_handshake(3, 1) + _frames(b"ignored"))
    assert transport.disconnecting
    assert [w["reason"] for w in warnings] == ["node 3 is not a known peer"]
    assert c.received[1] == []


def test_silent_peer_times_out_the_handshake() -> None:
    """A listener that never answers the handshake is hung up on after the timeout, dropping the queue."""
    c = Cluster([1, 2], listening=[], handshake_timeout=3.0)
    c.reactor.listenTCP(PORTS[2], Factory.forProtocol(Protocol))  # accepts, never speaks
    c.transports[1].start()
    c.connect()
    c.transports[1].send([_append(1, 2)])
    assert c.transports[1].dropped == 0  # queued behind the handshake
    with _warnings() as warnings:
        c.reactor.advance(3.0)
        c.flush()
    assert [w["reason"] for w in warnings] == ["no answer to the handshake within 3.0 s"]
    assert c.transports[1].dropped == 1
    assert c.unreachable[1] == [2]
    # The timeout counts as a failed attempt: the retry waits 2 s rather than 1 s.
    (retry,) = c.reactor.getDelayedCalls()
    assert retry.getTime() - c.reactor.seconds() == _policy(2)


# -- the cluster secret in the handshake ----------------------------------------------


def test_peers_with_the_same_secret_talk() -> None:
    """With a secret on both ends, the handshake proves it and messages flow as before."""
    c = Cluster([1, 2], secret=b"k" * 32)
    c.start()
    c.connect()
    with _warnings() as warnings:
        c.transports[1].send([_append(1, 2)])
        c.flush()
    assert c.received[2] == [_append(1, 2)]
    assert warnings == []


def test_a_peer_with_another_secret_is_refused_and_dropped() -> None:
    """A dialler whose proof is wrong is refused at the handshake; nothing it sends arrives."""
    c = Cluster([1, 2], secret=b"k" * 32)
    object.__setattr__(c.transports[1], "secret", b"x" * 32)
    c.start()
    with _warnings() as warnings:
        c.connect()
        c.transports[1].send([_append(1, 2)])
        c.flush()
    assert c.received[2] == []
    assert "it did not prove the cluster secret" in [w["reason"] for w in warnings]


def test_a_handshake_without_a_proof_is_refused() -> None:
    """A listener with a secret refuses an old-style handshake (no nonce, no proof) and hangs up."""
    c = Cluster([1, 2], secret=b"k" * 32)
    protocol, transport = _server(c, 1)
    with _warnings() as warnings:
        protocol.dataReceived(_handshake(2, 1) + _frames(b"ignored"))
    assert transport.disconnecting
    assert b"NOT_AUTHENTICATED" in transport.value()
    assert [w["reason"] for w in warnings] == ["it did not prove the cluster secret"]
    assert c.received[1] == []


def test_a_listener_without_the_secret_is_not_trusted() -> None:
    """A dialler with a secret drops a listener that answers without a proof."""
    c = Cluster([1, 2], secret=b"k" * 32)
    object.__setattr__(c.transports[2], "secret", None)
    c.start()
    with _warnings() as warnings:
        c.connect()
        c.transports[1].send([_append(1, 2)])
        c.flush()
    assert c.received[2] == []
    assert "it did not prove the cluster secret" in [w["reason"] for w in warnings]
