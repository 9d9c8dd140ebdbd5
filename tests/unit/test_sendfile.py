"""Sending a cached pack with sendfile: the framed layout, the direct sends, and the producer's hand-offs.

The layout is checked against ``frame_stream`` (what the buffered path
sends), so both paths put the same bytes on the wire.  The sends use a
real non-blocking socketpair; the producer is driven by hand with a fake
TCP transport (its buffer drained by the test), an inline runner, and no
reactor.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.testing import StringTransport

from gitstratum.frontend.sendfile import SendfileProducer, direct_socket, send_direct
from gitstratum.frontend.threads import inline_runner
from gitstratum.protocol.upload_pack import frame_stream, framed_size
from gitstratum.protocol.upload_response import FileResponse


def expected_bytes(prefix: bytes, data: bytes, max_payload: int, suffix: bytes) -> bytes:
    body = b"".join(frame_stream(1, [data], max_payload)) if max_payload else data
    return prefix + body + suffix


@pytest.fixture
def file_of(tmp_path: Path) -> Iterator[Any]:
    fds: list[int] = []

    def make(data: bytes) -> int:
        path = tmp_path / f"entry-{len(fds)}"
        path.write_bytes(data)
        fds.append(os.open(path, os.O_RDONLY))
        return fds[-1]

    yield make
    for fd in fds:
        os.close(fd)


@settings(max_examples=60, deadline=None)
@given(
    data=st.binary(min_size=1, max_size=3000),
    max_payload=st.sampled_from([0, 1, 7, 100, 995]),
    prefix=st.binary(max_size=20),
    suffix=st.sampled_from([b"", b"0000"]),
    where=st.floats(min_value=0, max_value=1),
)
def test_the_file_layout_is_the_framed_stream(
    tmp_path_factory: pytest.TempPathFactory,
    data: bytes,
    max_payload: int,
    prefix: bytes,
    suffix: bytes,
    where: float,
) -> None:
    """From any position, the pieces and the buffered read give exactly what frame_stream sends."""
    path = tmp_path_factory.mktemp("layout") / "entry"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        response = FileResponse(prefix, fd, len(data), 1, max_payload, suffix)
        expected = expected_bytes(prefix, data, max_payload, suffix)
        assert response.length == len(expected)
        pos = int(where * len(expected))
        rebuilt = b"".join(
            p if isinstance(p, bytes) else os.pread(fd, p[1], p[0]) for p in response.pieces(pos)
        )
        assert rebuilt == expected[pos:]
        assert response.read(pos, 333) == expected[pos : pos + 333]
    finally:
        os.close(fd)


def test_framed_size_counts_one_header_per_started_packet() -> None:
    """framed_size adds five bytes per packet, a short last packet included."""
    assert framed_size(0, 10) == 0
    assert framed_size(10, 10) == 15
    assert framed_size(11, 10) == 21


@given(
    sizes=st.lists(st.integers(min_value=0, max_value=50), max_size=12),
    max_payload=st.integers(min_value=1, max_value=20),
)
def test_frame_stream_packets_are_full_but_the_last(sizes: list[int], max_payload: int) -> None:
    """Chunk boundaries do not show in the packets: all full but the last, the data unchanged."""
    chunks = [bytes([i % 251]) * n for i, n in enumerate(sizes)]
    out = b"".join(frame_stream(2, chunks, max_payload))
    data = b"".join(chunks)
    assert len(out) == framed_size(len(data), max_payload)
    payloads = []
    pos = 0
    while pos < len(out):
        length = int(out[pos : pos + 4], 16)
        assert out[pos + 4] == 2
        payloads.append(out[pos + 5 : pos + length])
        pos += length
    assert b"".join(payloads) == data
    assert all(len(p) == max_payload for p in payloads[:-1])


def socket_pair(sndbuf: int = 16384) -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, sndbuf)
    a.setblocking(False)
    b.setblocking(False)
    return a, b


def read_available(sock: socket.socket) -> bytes:
    out = []
    while True:
        try:
            data = sock.recv(1 << 20)
        except BlockingIOError:
            return b"".join(out)
        if not data:
            return b"".join(out)
        out.append(data)


def test_send_direct_stops_when_the_socket_is_full_and_resumes_where_it_stopped(
    file_of: Any,
) -> None:
    """A full socket ends a round as 'blocked' at the byte reached; the next round continues there."""
    data = os.urandom(700_000)
    response = FileResponse(b"head", file_of(data), len(data), 1, 65515, b"0000")
    sender, receiver = socket_pair()
    received = []
    pos, rounds = 0, 0
    try:
        while True:
            pos, blocked = send_direct(sender, response, pos)
            rounds += 1
            received.append(read_available(receiver))
            if not blocked:
                break
        received.append(read_available(receiver))
    finally:
        sender.close()
        receiver.close()
    assert rounds > 1
    assert pos == response.length
    assert b"".join(received) == expected_bytes(b"head", data, 65515, b"0000")


def test_a_reading_client_gets_the_whole_stream_in_one_round(file_of: Any) -> None:
    """With a wait allowed, a full socket is waited out in the thread, not handed back."""
    import threading

    data = os.urandom(2_000_000)
    response = FileResponse(b"", file_of(data), len(data), 1, 65515, b"0000")
    sender, receiver = socket_pair()
    receiver.setblocking(True)
    received: list[bytes] = []

    def read_all() -> None:
        while chunk := receiver.recv(1 << 20):
            received.append(chunk)

    reader = threading.Thread(target=read_all)
    reader.start()
    try:
        pos, blocked = send_direct(sender, response, 0, wait=30, budget=300)
    finally:
        sender.close()
        reader.join()
        receiver.close()
    assert (pos, blocked) == (response.length, False)
    assert b"".join(received) == expected_bytes(b"", data, 65515, b"0000")


def test_a_stopped_stream_ends_the_round_at_the_next_full_socket(file_of: Any) -> None:
    """The stop flag is checked before waiting: a stopped stream never waits for room."""
    data = os.urandom(1_000_000)
    response = FileResponse(b"", file_of(data), len(data), 1, 65515, b"")
    sender, receiver = socket_pair()
    try:
        pos, blocked = send_direct(sender, response, 0, wait=30, budget=300, stopped=lambda: True)
    finally:
        sender.close()
        receiver.close()
    assert blocked and 0 < pos < response.length


def test_a_round_past_its_budget_hands_the_wait_back(file_of: Any) -> None:
    """Past its time budget a round stops at the next full socket, even for a reading client."""
    import threading

    data = os.urandom(3_000_000)
    response = FileResponse(b"", file_of(data), len(data), 1, 65515, b"")
    sender, receiver = socket_pair()
    receiver.setblocking(True)

    def read_all() -> None:
        while receiver.recv(1 << 20):
            pass

    reader = threading.Thread(target=read_all)
    reader.start()
    ticks = iter(range(10_000))
    try:
        pos, blocked = send_direct(
            sender, response, 0, wait=30, budget=1, clock=lambda: float(next(ticks))
        )
    finally:
        sender.close()
        reader.join()
        receiver.close()
    assert blocked and 0 < pos < response.length


@attrs.define(eq=False)
class FakeTCP:
    """The parts of a Twisted TCP transport the producer uses; the test drains its buffer."""

    bufferSize: int = 65536
    dataBuffer: bytes = b""
    offset: int = 0
    _tempDataLen: int = 0
    pending: list[bytes] = attrs.field(factory=list)
    producer: Any = None
    unregistered: bool = False

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        assert streaming
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.unregistered = True

    def write(self, data: bytes) -> None:
        self.pending.append(data)
        self._tempDataLen += len(data)
        if self._tempDataLen > self.bufferSize:
            self.producer.pauseProducing()

    def drain(self, sock: socket.socket) -> bool:
        """Send what Twisted would; True once the buffer is empty (then resume the producer)."""
        while self.pending:
            try:
                n = sock.send(self.pending[0])
            except BlockingIOError:
                return False
            self._tempDataLen -= n
            if n < len(self.pending[0]):
                self.pending[0] = self.pending[0][n:]
                return False
            self.pending.pop(0)
        self.producer.resumeProducing()
        return True


def test_the_producer_interleaves_buffered_and_direct_sends_in_order(file_of: Any) -> None:
    """Direct sends start only once Twisted's buffer is empty, so the client gets the exact stream."""
    data = os.urandom(1_500_000)
    response = FileResponse(b"prefix", file_of(data), len(data), 1, 65515, b"0000")
    completed: list[int] = []
    response = attrs.evolve(response, complete=completed.append)
    sender, receiver = socket_pair()
    transport = FakeTCP()
    producer = SendfileProducer(transport, transport, sender.dup(), response, inline_runner, wait=0)
    done = producer.start()
    received = []
    for _ in range(10_000):
        if done.called:
            break
        transport.drain(sender)
        received.append(read_available(receiver))
    while not transport.drain(sender):
        received.append(read_available(receiver))
    received.append(read_available(receiver))
    sender.close()
    receiver.close()
    assert done.called and done.result == response.length
    assert b"".join(received) == expected_bytes(b"prefix", data, 65515, b"0000")
    assert completed == [response.length] and transport.unregistered


def test_a_client_that_goes_away_stops_the_stream_and_closes_our_socket(file_of: Any) -> None:
    """stopProducing fires done with what was written and releases the duplicate socket."""
    data = os.urandom(500_000)
    response = FileResponse(b"", file_of(data), len(data), 1, 65515, b"")
    sender, receiver = socket_pair()
    transport = FakeTCP()
    ours = sender.dup()
    producer = SendfileProducer(transport, transport, ours, response, inline_runner, wait=0)
    done = producer.start()
    transport.drain(sender)
    producer.stopProducing()
    assert done.called and 0 < done.result < response.length
    assert ours.fileno() == -1 and producer.stopped
    sender.close()
    receiver.close()


def test_a_client_that_stops_reading_is_given_up_after_the_stall_limit(file_of: Any) -> None:
    """Paused past stall_timeout, the producer stops the stream and calls on_stall."""
    from twisted.internet.task import Clock

    clock = Clock()
    data = os.urandom(300_000)
    response = FileResponse(b"", file_of(data), len(data), 1, 65515, b"")
    sender, receiver = socket_pair()
    transport = FakeTCP()
    stalls: list[bool] = []
    producer = SendfileProducer(
        transport,
        transport,
        sender.dup(),
        response,
        inline_runner,
        stall_timeout=30,
        call_later=clock.callLater,
        on_stall=lambda: stalls.append(True),
        wait=0,
    )
    done = producer.start()
    clock.advance(29)
    assert not done.called
    clock.advance(2)
    assert done.called and producer.stalled and stalls == [True]
    sender.close()
    receiver.close()


def test_only_a_plain_tcp_transport_is_written_to_directly() -> None:
    """Anything but a real TCP connection (TLS, a test transport) keeps the buffered path."""
    assert direct_socket(StringTransport()) is None
