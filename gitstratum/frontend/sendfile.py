"""Zero-copy streaming of a cached pack: ``os.sendfile`` for the pack bytes, side-band headers between.

A warm CI storm is the same 27 MB entry sent to every job.  Read into
Python and framed there, each byte is copied three times on its way out
(``pread``, framing, ``send``) and those copies were most of a hit's cost.
Here the kernel moves the pack from the page cache to the socket; Python
only writes the five-byte side-band header in front of each 65,515-byte
packet.

Twisted's transports have no sendfile, so ``SendfileProducer`` writes to
a duplicate of the connection's socket itself, and only while Twisted's
own send buffer is empty (so the two never interleave): it hands Twisted a
buffered chunk, which fills Twisted's buffer and pauses the producer; when
the buffer drains Twisted resumes it, and the sends go direct again until
the socket is full.  The sends run in the thread pool, so a page-cache miss
never stalls the reactor; a pool thread waits a little for room in the
socket itself (one hand-off per clone for a client that reads) but hands
longer waits back to the reactor, so slow clients cannot pin the pool.  Only a plain TCP transport qualifies
(``direct_socket``); TLS and anything else use the buffered path.
"""

from __future__ import annotations

import os
import select
import socket
import time
from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet import tcp
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from gitstratum.frontend.threads import BlockingRunner, StallLimitedProducer
from gitstratum.protocol.upload_response import FileResponse

__all__ = ["SendfileProducer", "direct_socket", "send_direct"]

_log = Logger()


def send_direct(
    sock: socket.socket,
    response: FileResponse,
    pos: int,
    *,
    wait: float = 0.0,
    budget: float = 0.0,
    stopped: Callable[[], bool] = lambda: False,
    clock: Callable[[], float] = time.monotonic,
) -> tuple[int, bool]:
    """Send from *pos* until done or the socket stays full: ``(new position, blocked)``.

    When the socket is full it waits up to *wait* seconds for room before
    giving up the round, and never waits once the round has run *budget*
    seconds: a client that reads gets most of its stream in one call, while
    a slow one hands its waiting back to the reactor, and no stream holds a
    pool thread for long.  Blocking on the file (the page cache) and on
    that short wait, never longer: run it in the thread pool.
    """
    fileno = sock.fileno()
    poller = select.poll()
    poller.register(fileno, select.POLLOUT)
    deadline = clock() + budget

    def room() -> bool:
        if not wait or stopped() or clock() >= deadline:
            return False
        return bool(poller.poll(wait * 1000)) and not stopped()

    for piece in response.pieces(pos):
        if isinstance(piece, bytes):
            view = memoryview(piece)
            while view:
                try:
                    n = sock.send(view, socket.MSG_MORE)
                except BlockingIOError:
                    if room():
                        continue
                    return pos, True
                pos += n
                view = view[n:]
            continue
        offset, count = piece
        while count:
            try:
                n = os.sendfile(fileno, response.fd, offset, count)
            except BlockingIOError:
                if room():
                    continue
                return pos, True
            if n == 0:
                raise OSError(f"cached pack truncated at {offset} of {response.size} bytes")
            pos += n
            offset += n
            count -= n
    return pos, False


def direct_socket(transport: Any) -> socket.socket | None:
    """A duplicate of *transport*'s socket when it is plain TCP we may write to directly, else None.

    The duplicate keeps the connection open until we close it, so a client
    that goes away mid-send cannot hand our file descriptor number to
    another connection.
    """
    if not _is_plain_tcp(transport):
        return None
    handle = transport.getHandle()
    if not isinstance(handle, socket.socket) or handle.type != socket.SOCK_STREAM:
        return None
    return handle.dup()


def _is_plain_tcp(transport: Any) -> bool:
    return isinstance(transport, tcp.Connection) and hasattr(transport, "_tempDataLen")


def _drained(transport: Any) -> bool:
    """Twisted holds none of this connection's bytes (so a direct send cannot overtake any)."""
    return not transport._tempDataLen and transport.offset == len(transport.dataBuffer)


@implementer(IPushProducer)
@attrs.define(eq=False)
class SendfileProducer(StallLimitedProducer):
    """Write a ``FileResponse`` to an HTTP request over a plain TCP connection.

    ``done`` fires with the bytes written (all of them, or what was out when
    the client went away or the stall limit gave up), or fails with the
    error.
    """

    transport: Any
    sock: socket.socket
    response: FileResponse
    run: BlockingRunner
    #: seconds a pool thread may wait for room in the socket before handing
    #: the wait back to the reactor
    wait: float = 0.05
    #: seconds one pool hand-off may keep sending (and waiting) before it
    #: goes back to the reactor, so long streams share the pool fairly
    budget: float = 0.5
    _busy: bool = False
    _closed: bool = False

    def start(self) -> Deferred[int]:
        self.consumer.registerProducer(self, True)
        self._buffered()
        return self.done

    def _kick_size(self) -> int:
        # More than the transport's buffer, so the write pauses us and the
        # drain resumes us: that resume is when Twisted's buffer is empty.
        return int(getattr(self.transport, "bufferSize", 65536)) + 1

    def _buffered(self) -> None:
        self._busy = True
        d = self.run(self.response.read, self.written, self._kick_size())
        d.addCallback(self._read)
        d.addErrback(self._failed)

    def _read(self, data: bytes) -> None:
        self._busy = False
        if self._finished:
            self._close()
            return
        self.written += len(data)
        self.consumer.write(data)
        self._next()

    def _direct(self) -> None:
        self._busy = True
        d = self.run(
            send_direct,
            self.sock,
            self.response,
            self.written,
            wait=self.wait,
            budget=self.budget,
            stopped=lambda: self._finished,
        )
        d.addCallback(self._sent)
        d.addErrback(self._failed)

    def _sent(self, result: tuple[int, bool]) -> None:
        self._busy = False
        self.written = result[0]
        if self._finished:
            self._close()
            return
        if result[1]:
            # The socket is full: give Twisted bytes to send, so it tells us when it drains.
            self._buffered()
        else:
            self._next()

    def _next(self) -> None:
        if self.written >= self.response.length:
            self._finish()
        elif self._paused:
            return
        elif _drained(self.transport):
            self._direct()
        else:
            self._buffered()

    def _failed(self, failure: Failure) -> None:
        self._busy = False
        if self._finished:
            self._close()
            if not failure.check(OSError):
                _log.failure("sending a cached pack failed after the stream stopped", failure)
            return
        self._finished = True
        self._cancel_stall()
        self._close()
        self.consumer.unregisterProducer()
        self.done.errback(failure)

    def _finish(self) -> None:
        self._cancel_stall()
        self._finished = True
        self._close()
        self.consumer.unregisterProducer()
        if self.response.complete is not None:
            self.response.complete(self.written)
        self.done.callback(self.written)

    def _close(self) -> None:
        if not self._closed:
            self._closed = True
            self.sock.close()

    def resumeProducing(self) -> None:
        super().resumeProducing()
        if not (self._busy or self._finished):
            self._next()

    def _in_flight(self) -> bool:
        return self._busy
