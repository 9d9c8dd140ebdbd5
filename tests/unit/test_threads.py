"""ThreadedIteratorProducer and the runners, driven by hand: no reactor, no sleeps.

``ManualRunner`` queues each blocking call and runs it only when the test
says so, which makes "a pull is in flight" a state the test can hold and
inspect.  The one test with real threads waits for them by stopping (joining)
the pool, then runs on the test thread what the pool handed to the reactor.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any, cast

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IConsumer, IPushProducer, IReactorFromThreads
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer
from zope.interface.verify import verifyObject

from gitstratum.frontend.threads import ThreadedIteratorProducer, inline_runner, thread_runner


@attrs.define
class Call:
    f: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    deferred: Deferred[Any]

    @property
    def is_close(self) -> bool:
        return getattr(self.f, "__name__", "") == "close"


@attrs.define
class ManualRunner:
    """A BlockingRunner whose calls run only when ``step`` is called, in order."""

    pending: list[Call] = attrs.field(factory=list)
    max_pending: int = 0

    def __call__(self, f: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Deferred[Any]:
        # A producer that ignores "a pull is in flight" would queue pulls forever.
        assert len(self.pending) < 100, "runaway: calls queued while others are pending"
        d: Deferred[Any] = Deferred()
        self.pending.append(Call(f, args, kwargs, d))
        self.max_pending = max(self.max_pending, len(self.pending))
        return d

    def step(self) -> Call:
        """Run the oldest queued call and fire its Deferred with the outcome."""
        call = self.pending.pop(0)
        try:
            result = call.f(*call.args, **call.kwargs)
        except Exception:
            call.deferred.errback(Failure())
        else:
            call.deferred.callback(result)
        return call

    def drain(self) -> None:
        while self.pending:
            self.step()


@attrs.define
class Source:
    """A generator of chunks that records every pull and whether its cleanup ran."""

    chunks: list[bytes]
    fail_after: int | None = None
    fail_on_close: bool = False
    pulled: int = 0
    closed: bool = False
    running: bool = False

    def generate(self) -> Iterator[bytes]:
        try:
            for i, chunk in enumerate(self.chunks):
                if self.fail_after is not None and i == self.fail_after:
                    raise ValueError("object store went away")
                # A pull or close overlapping this one would see running set.
                assert not self.running
                self.running = True
                self.pulled += 1
                self.running = False
                yield chunk
        finally:
            assert not self.running
            self.closed = True
            if self.fail_on_close:
                raise OSError("cleanup failed")


def outcome(d: Deferred[Any]) -> list[Any]:
    """What *d* has fired with so far: [] while it has not fired."""
    got: list[Any] = []
    d.addBoth(got.append)
    return got


@implementer(IConsumer)
@attrs.define
class PausingConsumer:
    """A consumer whose buffer is full after every write, as a slow client's transport is."""

    data: list[bytes] = attrs.field(factory=list)
    producer: Any = None
    unregistered: int = 0

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        assert streaming
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None
        self.unregistered += 1

    def write(self, data: bytes) -> None:
        self.data.append(data)
        self.producer.pauseProducing()


@implementer(IConsumer)
@attrs.define
class BrokenConsumer:
    """A consumer whose write raises, as a request finished by someone else would."""

    producer: Any = None

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None

    def write(self, data: bytes) -> None:
        raise RuntimeError("Request.write called on a request after Request.finish was called.")


def test_producer_provides_ipushproducer() -> None:
    """ThreadedIteratorProducer is a streaming (push) producer by its interface."""
    p = ThreadedIteratorProducer(StringTransport(), iter([]), inline_runner)
    assert verifyObject(IPushProducer, p)


def test_chunks_are_written_in_order_and_done_fires_with_the_count() -> None:
    """Every chunk reaches the consumer in order; done fires with the byte total; it unregisters."""
    consumer = StringTransport()
    source = Source([b"PACK", b"", b"\x00\x01", b"tail"])
    p = ThreadedIteratorProducer(consumer, source.generate(), inline_runner)
    result = outcome(p.start())
    assert consumer.value() == b"PACK\x00\x01tail"
    assert result == [10]
    assert p.written == 10
    assert consumer.producer is None
    assert source.closed


def test_registers_as_a_streaming_producer_until_done() -> None:
    """While streaming, the producer is registered with the consumer as a push producer."""
    consumer = StringTransport()
    runner = ManualRunner()
    p = ThreadedIteratorProducer(consumer, iter([b"a"]), runner)
    p.start()
    assert consumer.producer is p
    assert consumer.streaming is True
    runner.drain()
    assert consumer.producer is None


def test_memoryview_and_bytearray_chunks_are_written_as_bytes() -> None:
    """Chunks may be bytearray or memoryview (pack writers reuse buffers); bytes are written."""
    consumer = StringTransport()
    chunks = cast(Iterator[bytes], iter([bytearray(b"ab"), memoryview(b"cd")]))
    p = ThreadedIteratorProducer(consumer, chunks, inline_runner)
    assert outcome(p.start()) == [4]
    assert consumer.value() == b"abcd"


def test_a_long_stream_with_a_synchronous_runner_does_not_recurse() -> None:
    """A runner that fires at once (inline) streams thousands of chunks without RecursionError."""
    consumer = StringTransport()
    p = ThreadedIteratorProducer(consumer, iter([b"x"] * 5000), inline_runner)
    assert outcome(p.start()) == [5000]
    assert consumer.value() == b"x" * 5000


def test_only_one_pull_is_ever_outstanding() -> None:
    """A new pull starts only when the previous one has returned, however often resume is called."""
    consumer = StringTransport()
    runner = ManualRunner()
    source = Source([b"a", b"b", b"c"])
    p = ThreadedIteratorProducer(consumer, source.generate(), runner)
    p.start()
    assert len(runner.pending) == 1
    p.pauseProducing()
    p.resumeProducing()
    p.resumeProducing()
    assert len(runner.pending) == 1
    runner.step()
    assert consumer.value() == b"a"
    assert len(runner.pending) == 1
    runner.drain()
    assert consumer.value() == b"abc"
    assert runner.max_pending == 1


def test_no_pull_starts_while_paused_and_resume_restarts_pulling() -> None:
    """Backpressure: a pull finishing while paused writes its chunk but starts no next pull."""
    consumer = StringTransport()
    runner = ManualRunner()
    source = Source([b"one", b"two"])
    p = ThreadedIteratorProducer(consumer, source.generate(), runner)
    done = outcome(p.start())
    p.pauseProducing()
    runner.step()
    assert consumer.value() == b"one"
    assert runner.pending == []
    assert source.pulled == 1
    p.resumeProducing()
    assert len(runner.pending) == 1
    runner.drain()
    assert consumer.value() == b"onetwo"
    assert done == [6]


def test_a_consumer_pausing_inside_write_stops_an_inline_stream() -> None:
    """A consumer that pauses during write gets one chunk per resume, even with an inline runner."""
    consumer = PausingConsumer()
    source = Source([b"a", b"b", b"c"])
    p = ThreadedIteratorProducer(consumer, source.generate(), inline_runner)
    done = outcome(p.start())
    assert consumer.data == [b"a"]
    assert source.pulled == 1
    p.resumeProducing()
    assert consumer.data == [b"a", b"b"]
    p.resumeProducing()
    p.resumeProducing()
    assert consumer.data == [b"a", b"b", b"c"]
    assert done == [3]
    assert consumer.unregistered == 1


def test_an_iterator_exception_fails_done_and_unregisters() -> None:
    """The iterator's own exception errbacks done, after the chunks before it were written."""
    consumer = StringTransport()
    source = Source([b"a", b"b", b"c"], fail_after=2)
    p = ThreadedIteratorProducer(consumer, source.generate(), inline_runner)
    (result,) = outcome(p.start())
    assert isinstance(result, Failure)
    assert result.check(ValueError)
    assert consumer.value() == b"ab"
    assert consumer.producer is None
    assert source.closed
    p.resumeProducing()
    p.stopProducing()
    assert consumer.value() == b"ab"


def test_a_failing_write_fails_done_and_closes_the_iterator() -> None:
    """An exception from consumer.write errbacks done (never a hang) and the generator is closed."""
    consumer = BrokenConsumer()
    source = Source([b"a", b"b"])
    p = ThreadedIteratorProducer(consumer, source.generate(), inline_runner)
    (result,) = outcome(p.start())
    assert isinstance(result, Failure)
    assert result.check(RuntimeError)
    assert consumer.producer is None
    assert source.closed
    assert source.pulled == 1


def test_stop_while_idle_closes_the_generator_in_the_runner() -> None:
    """stopProducing with no pull in flight closes the generator (its finally runs) in the runner."""
    consumer = StringTransport()
    runner = ManualRunner()
    source = Source([b"a", b"b", b"c"])
    p = ThreadedIteratorProducer(consumer, source.generate(), runner)
    done = outcome(p.start())
    p.pauseProducing()
    runner.step()
    assert runner.pending == []
    p.stopProducing()
    assert done == [1]
    (close,) = runner.pending
    assert close.is_close
    assert not source.closed, "close must run in the runner, not on the calling thread"
    runner.step()
    assert source.closed
    p.resumeProducing()
    assert runner.pending == []
    assert consumer.value() == b"a"


def test_stopped_tells_a_consumer_stop_from_a_finished_stream() -> None:
    """``stopped`` is False after the iterator ends and True after the consumer stopped it."""
    consumer = StringTransport()
    finished = ThreadedIteratorProducer(consumer, iter([b"a"]), inline_runner)
    finished.start()
    assert not finished.stopped
    runner = ManualRunner()
    cut = ThreadedIteratorProducer(StringTransport(), Source([b"a", b"b"]).generate(), runner)
    cut.start()
    cut.stopProducing()
    assert cut.stopped


def test_stop_during_a_pull_closes_only_after_the_pull_returns() -> None:
    """Close never races a pull: it is queued once the pull in flight returns, whose chunk is dropped."""
    consumer = StringTransport()
    runner = ManualRunner()
    source = Source([b"a", b"b", b"c"])
    p = ThreadedIteratorProducer(consumer, source.generate(), runner)
    done = outcome(p.start())
    runner.step()
    assert len(runner.pending) == 1  # the pull of b"b" is in flight
    p.stopProducing()
    assert done == [1]
    assert len(runner.pending) == 1 and not runner.pending[0].is_close
    runner.step()
    (close,) = runner.pending
    assert close.is_close
    runner.step()
    assert source.closed
    assert consumer.value() == b"a"
    assert runner.max_pending == 1


def test_stop_before_the_first_pull_returns_still_closes_the_generator() -> None:
    """A generator stopped during its very first pull is closed when that pull comes back."""
    consumer = StringTransport()
    runner = ManualRunner()
    source = Source([b"a"])
    p = ThreadedIteratorProducer(consumer, source.generate(), runner)
    done = outcome(p.start())
    p.stopProducing()
    assert done == [0]
    runner.drain()
    assert source.closed
    assert consumer.value() == b""


def test_a_pull_failing_after_stop_is_logged_not_raised() -> None:
    """An iterator error after stopProducing cannot fail done again; it is logged instead."""
    consumer = StringTransport()
    runner = ManualRunner()
    source = Source([b"a", b"b"], fail_after=1)
    p = ThreadedIteratorProducer(consumer, source.generate(), runner)
    done = outcome(p.start())
    runner.step()
    p.stopProducing()
    with capturedLogs() as events:
        runner.drain()
    assert done == [1]
    failures = [e for e in events if "log_failure" in e]
    assert len(failures) == 1
    assert failures[0]["log_failure"].check(ValueError)


def test_a_failing_close_is_logged_not_left_unhandled() -> None:
    """A generator whose cleanup raises is logged, not left as an unhandled Deferred error."""
    consumer = StringTransport()
    runner = ManualRunner()
    source = Source([b"a", b"b", b"c"], fail_on_close=True)
    p = ThreadedIteratorProducer(consumer, source.generate(), runner)
    done = outcome(p.start())
    runner.step()
    p.pauseProducing()
    runner.step()
    p.stopProducing()
    assert done == [2]
    with capturedLogs() as events:
        runner.drain()
    assert source.closed
    failures = [e for e in events if "log_failure" in e]
    assert len(failures) == 1
    assert failures[0]["log_failure"].check(OSError)


def test_stop_after_done_does_nothing() -> None:
    """Once done has fired, stopProducing neither fires it again nor calls into the runner."""
    consumer = StringTransport()
    runner = ManualRunner()
    p = ThreadedIteratorProducer(consumer, iter([b"a"]), runner)
    done = outcome(p.start())
    runner.drain()
    assert done == [1]
    p.stopProducing()
    assert runner.pending == []
    assert done == [1]


def test_a_plain_iterator_without_close_can_be_stopped() -> None:
    """stopProducing on an iterator that has no close() just fires done."""
    consumer = StringTransport()
    runner = ManualRunner()
    p = ThreadedIteratorProducer(consumer, iter([b"a", b"b"]), runner)
    done = outcome(p.start())
    runner.step()
    runner.step()
    p.pauseProducing()
    p.stopProducing()
    assert done == [2]
    runner.drain()
    assert runner.pending == []


def test_inline_runner_returns_a_fired_deferred_of_the_result_or_failure() -> None:
    """inline_runner calls at once: a result or the raised exception, as a fired Deferred."""
    assert outcome(inline_runner(lambda a, *, b: a + b, 1, b=2)) == [3]

    def boom() -> None:
        raise KeyError("missing")

    (failure,) = outcome(inline_runner(boom))
    assert isinstance(failure, Failure) and failure.check(KeyError)


@implementer(IReactorFromThreads)
@attrs.define
class RecordingReactor:
    """Collects what worker threads hand back with callFromThread, for the test to run."""

    calls: list[tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]] = attrs.field(
        factory=list
    )
    lock: threading.Lock = attrs.field(factory=threading.Lock)

    def callFromThread(self, callable: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        with self.lock:
            self.calls.append((callable, args, kwargs))

    def run_calls(self) -> None:
        with self.lock:
            calls, self.calls = self.calls, []
        for f, args, kwargs in calls:
            f(*args, **kwargs)


def test_thread_runner_runs_in_the_pool_and_fires_on_the_reactor_thread() -> None:
    """thread_runner calls the function in a pool thread and fires only via callFromThread."""
    reactor = RecordingReactor()
    pool = ThreadPool(minthreads=1, maxthreads=1, name="test-thread-runner")
    run = thread_runner(reactor, pool)
    ran_on: list[int] = []

    def work(a: int, *, b: int) -> int:
        ran_on.append(threading.get_ident())
        return a * b

    def fail() -> None:
        ran_on.append(threading.get_ident())
        raise LookupError("no such ref")

    pool.start()
    try:
        ok = outcome(run(work, 6, b=7))
        bad = outcome(run(fail))
    finally:
        pool.stop()  # joins the worker, so both calls have run and handed back their results
    assert len(ran_on) == 2
    assert threading.get_ident() not in ran_on
    assert ok == [] and bad == [], "results must arrive through the reactor, not the worker"
    reactor.run_calls()
    assert ok == [42]
    (failure,) = bad
    assert isinstance(failure, Failure) and failure.check(LookupError)


def test_producer_over_thread_runner_pulls_every_chunk_in_a_pool_thread() -> None:
    """Streamed through thread_runner, every pull (and the generator's cleanup) runs in the pool.

    Each round starts a pool, lets the reactor side hand it the next pull, and
    stops (joins) it, so every step is complete before the test looks.
    """
    reactor = RecordingReactor()
    pools: list[ThreadPool] = []
    seen_on: list[int] = []

    submitted: list[Callable[..., Any]] = []

    def run(f: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Deferred[Any]:
        submitted.append(f)
        assert len(submitted) < 50, "runaway: far more calls than the stream has chunks"
        return thread_runner(reactor, pools[-1])(f, *args, **kwargs)

    def generate() -> Iterator[bytes]:
        try:
            for chunk in (b"PACK", b"body", b"sum"):
                seen_on.append(threading.get_ident())
                yield chunk
        finally:
            seen_on.append(threading.get_ident())

    def in_a_fresh_pool(action: Callable[[], object]) -> None:
        pool = ThreadPool(minthreads=1, maxthreads=1, name="test-producer")
        pools.append(pool)
        pool.start()
        try:
            action()
        finally:
            pool.stop()

    consumer = StringTransport()
    p = ThreadedIteratorProducer(consumer, generate(), run)
    done: list[Any] = []
    in_a_fresh_pool(lambda: p.start().addBoth(done.append))
    assert consumer.value() == b""
    for _ in range(10):
        if done:
            break
        in_a_fresh_pool(reactor.run_calls)
    assert done == [11]
    assert consumer.value() == b"PACKbodysum"
    assert len(seen_on) == 4
    assert threading.get_ident() not in seen_on
    assert len(submitted) == 4  # three chunks and the end, one pull each


def test_a_consumer_paused_past_the_stall_timeout_ends_the_stream() -> None:
    """Paused for stall_timeout (a client that stopped reading): stream stopped, on_stall called."""
    from twisted.internet.task import Clock

    clock = Clock()
    runner = ManualRunner()
    consumer = StringTransport()
    source = Source([b"a", b"b", b"c"])
    stalls: list[bool] = []
    p = ThreadedIteratorProducer(
        consumer,
        source.generate(),
        runner,
        stall_timeout=30.0,
        call_later=clock.callLater,
        on_stall=lambda: stalls.append(True),
    )
    done = outcome(p.start())
    runner.step()  # "a" is written and the next pull starts
    p.pauseProducing()  # the client stops reading
    runner.step()  # the pull in flight returns "b"; nothing more is pulled
    clock.advance(29)
    assert not p.stalled and done == []
    clock.advance(1)
    assert p.stalled and stalls == [True]
    assert done == [2] and consumer.value() == b"ab"
    runner.drain()  # the generator is closed in the runner
    assert source.closed


def test_resuming_before_the_stall_timeout_keeps_the_stream() -> None:
    """A consumer that resumes in time is not given up, and no stall check is left behind."""
    from twisted.internet.task import Clock

    clock = Clock()
    consumer = StringTransport()
    p = ThreadedIteratorProducer(
        consumer, iter([b"a", b"b"]), inline_runner, stall_timeout=30.0, call_later=clock.callLater
    )
    p.pauseProducing()
    done = outcome(p.start())
    clock.advance(20)
    p.resumeProducing()
    clock.advance(60)
    assert not p.stalled and done == [2] and consumer.value() == b"ab"
    assert clock.getDelayedCalls() == []
