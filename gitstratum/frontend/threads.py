"""Running blocking store and pack work off the reactor thread.

Everything that touches LMDB in bulk, inflates, deflates or hashes is a
plain blocking function or generator.  The frontend reaches it through a
``BlockingRunner`` (a thread pool in production, inline in unit tests) and
streams generators with ``ThreadedIteratorProducer``, which pulls the next
chunk in the pool only while the consumer (an HTTP request, an SSH channel)
is not paused, so backpressure reaches the pack builder.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Protocol, TypeVar

import attrs
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IConsumer, IPushProducer, IReactorFromThreads
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

__all__ = ["BlockingRunner", "thread_runner", "inline_runner", "ThreadedIteratorProducer"]

T = TypeVar("T")


class BlockingRunner(Protocol):
    def __call__(self, f: Callable[..., T], /, *args: Any, **kwargs: Any) -> Deferred[T]: ...


def thread_runner(reactor: IReactorFromThreads, pool: ThreadPool) -> BlockingRunner:
    """A runner that calls each function in *pool* and fires on the reactor thread."""

    def run(f: Callable[..., T], /, *args: Any, **kwargs: Any) -> Deferred[T]:
        return deferToThreadPool(reactor, pool, f, *args, **kwargs)

    return run


def inline_runner(f: Callable[..., T], /, *args: Any, **kwargs: Any) -> Deferred[T]:
    """A runner that calls the function at once; for unit tests driven without threads."""
    return maybeDeferred(f, *args, **kwargs)


_DONE = object()


def _next_chunk(it: Iterator[bytes]) -> object:
    return next(it, _DONE)


@attrs.define(eq=False)
class StallLimitedProducer:
    """What every pack-stream producer shares: pause, resume, and giving up a stalled consumer.

    twisted.web suspends its idle timeout while a response is written, so a
    client that stops reading would park a stream (and what it holds)
    forever: ``stall_timeout`` seconds paused and the stream is stopped,
    ``stalled`` set and ``on_stall`` called (e.g. to abort the connection).
    """

    consumer: IConsumer
    #: seconds the consumer may stay paused before the stream is given up; None for no limit
    stall_timeout: float | None = attrs.field(default=None, kw_only=True)
    #: schedules the stall check (``reactor.callLater``; a Clock's in tests)
    call_later: Callable[..., Any] | None = attrs.field(default=None, kw_only=True)
    #: called when the stall limit ends the stream
    on_stall: Callable[[], None] | None = attrs.field(default=None, kw_only=True)
    #: True when the stall limit ended the stream
    stalled: bool = attrs.field(default=False, kw_only=True)
    #: True when the consumer stopped the stream (a client that went away)
    stopped: bool = attrs.field(default=False, kw_only=True)
    #: fires with the bytes written once the stream ends (or fails with its error)
    done: Deferred[int] = attrs.field(factory=Deferred, kw_only=True)
    written: int = attrs.field(default=0, kw_only=True)
    _paused: bool = attrs.field(default=False, kw_only=True)
    _finished: bool = attrs.field(default=False, kw_only=True)
    _stall_call: Any = attrs.field(default=None, kw_only=True)

    _log = Logger()

    def pauseProducing(self) -> None:
        self._paused = True
        if self.stall_timeout is not None and self._stall_call is None and not self._finished:
            call_later = self.call_later
            if call_later is None:
                from twisted.internet import reactor

                call_later = reactor.callLater  # type: ignore[attr-defined]
            self._stall_call = call_later(self.stall_timeout, self._stall)

    def resumeProducing(self) -> None:
        self._paused = False
        self._cancel_stall()

    def stopProducing(self) -> None:
        """The consumer went away: end the stream with what was written."""
        self._cancel_stall()
        if self._finished:
            return
        self._finished = True
        self.stopped = True
        if not self._in_flight():
            # Otherwise the work in the pool releases it when it returns, so
            # the release never races it.
            self._close()
        self.done.callback(self.written)

    def _in_flight(self) -> bool:
        """Whether a blocking call for this stream is running in the pool now."""
        raise NotImplementedError

    def _close(self) -> None:
        """Release what the stream holds."""
        raise NotImplementedError

    def _cancel_stall(self) -> None:
        if self._stall_call is not None and self._stall_call.active():
            self._stall_call.cancel()
        self._stall_call = None

    def _stall(self) -> None:
        """The consumer stayed paused for stall_timeout: give the stream up."""
        self._stall_call = None
        if not self._paused or self._finished:
            return
        self._log.info(
            "consumer paused for {seconds} s; giving up the stream", seconds=self.stall_timeout
        )
        self.stalled = True
        self.consumer.unregisterProducer()
        self.stopProducing()
        if self.on_stall is not None:
            self.on_stall()


@implementer(IPushProducer)
@attrs.define(eq=False)
class ThreadedIteratorProducer(StallLimitedProducer):
    """Write a blocking iterator of byte chunks to *consumer*, one pull at a time.

    Only one pull is ever outstanding, so the iterator is advanced by one
    thread at a time.  While the consumer is paused no pull is started.
    ``done`` fires with the number of bytes written, or fails with the
    iterator's exception; after ``stopProducing`` it fires with what was
    written and the iterator is closed in the runner (once any pull in
    flight has returned, so the two never overlap).
    """

    iterator: Iterator[bytes]
    run: BlockingRunner
    _pulling: bool = False
    _looping: bool = False

    _log = Logger()

    def start(self) -> Deferred[int]:
        self.consumer.registerProducer(self, True)
        self._pull()
        return self.done

    def _pull(self) -> None:
        # A runner may fire at once (inline_runner, a cached answer): loop here
        # rather than recurse through _got, or a long stream exhausts the stack.
        if self._looping:
            return
        self._looping = True
        try:
            while not (self._paused or self._pulling or self._finished):
                self._pulling = True
                d = self.run(_next_chunk, self.iterator)
                d.addCallback(self._got)
                # Also catches a failing write, which would otherwise leave done unfired.
                d.addErrback(self._failed)
        finally:
            self._looping = False

    def _got(self, chunk: object) -> None:
        self._pulling = False
        if self._finished:
            # stopProducing came while this pull ran; now nothing else touches the iterator.
            self._close()
            return
        if chunk is _DONE:
            self._finish()
            return
        assert isinstance(chunk, bytes | bytearray | memoryview)
        self.written += len(chunk)
        self.consumer.write(bytes(chunk))
        self._pull()

    def _failed(self, failure: Failure) -> None:
        self._pulling = False
        if self._finished:
            self._log.failure("pulling from the iterator failed after stopProducing", failure)
            return
        self._finished = True
        self._close()
        self.consumer.unregisterProducer()
        self.done.errback(failure)

    def _finish(self) -> None:
        self._cancel_stall()
        self._finished = True
        self.consumer.unregisterProducer()
        self.done.callback(self.written)

    def _close(self) -> None:
        """Close the iterator in the runner: a generator's cleanup may block too."""
        close = getattr(self.iterator, "close", None)
        if close is not None:
            self.run(close).addErrback(
                lambda f: self._log.failure("closing the iterator failed", f)
            )

    def resumeProducing(self) -> None:
        super().resumeProducing()
        self._pull()

    def _in_flight(self) -> bool:
        return self._pulling
