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


@implementer(IPushProducer)
@attrs.define(eq=False)
class ThreadedIteratorProducer:
    """Write a blocking iterator of byte chunks to *consumer*, one pull at a time.

    Only one pull is ever outstanding, so the iterator is advanced by one
    thread at a time.  While the consumer is paused no pull is started.
    ``done`` fires with the number of bytes written, or fails with the
    iterator's exception; after ``stopProducing`` it fires with what was
    written and the iterator is closed.
    """

    consumer: IConsumer
    iterator: Iterator[bytes]
    run: BlockingRunner
    done: Deferred[int] = attrs.field(factory=Deferred)
    written: int = 0
    _paused: bool = False
    _pulling: bool = False
    _finished: bool = False

    _log = Logger()

    def start(self) -> Deferred[int]:
        self.consumer.registerProducer(self, True)
        self._pull()
        return self.done

    def _pull(self) -> None:
        if self._paused or self._pulling or self._finished:
            return
        self._pulling = True
        d = self.run(_next_chunk, self.iterator)
        d.addCallbacks(self._got, self._failed)

    def _got(self, chunk: object) -> None:
        self._pulling = False
        if self._finished:
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
            return
        self._finished = True
        self.consumer.unregisterProducer()
        self.done.errback(failure)

    def _finish(self) -> None:
        self._finished = True
        self.consumer.unregisterProducer()
        self.done.callback(self.written)

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._pull()

    def stopProducing(self) -> None:
        if self._finished:
            return
        self._finished = True
        close = getattr(self.iterator, "close", None)
        if close is not None and not self._pulling:
            # Closing a generator runs its cleanup; it must not race a pull in the pool.
            self.run(close)
        self.done.callback(self.written)
