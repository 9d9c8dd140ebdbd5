"""Stand-ins for the git stream engine and the thread pool, for tests of the SSH and git:// adapters.

An adapter's job ends where ``GitStreamProtocol`` begins: it authenticates,
picks the repository and the protocol version, and hands the connection over.
``RecordingStream`` takes the engine's place and records what it was handed;
``RecordingRunner`` takes the pool's place and can hold calls back, so a test
can act while a lookup is "in the pool".
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import attrs
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from gitstratum.frontend.threads import inline_runner

__all__ = ["RecordingStream", "recording_stream_factory", "RecordingRunner"]

_T = TypeVar("_T")


@implementer(IHalfCloseableProtocol)
class RecordingStream(Protocol):
    """Takes ``GitStreamProtocol``'s place (same arguments): greets, records, ends when told.

    On connection it writes ``hello USER SERVICE OWNER/NAME vVERSION\\n``, so
    a test sees what the adapter chose from the client's side too.  Bytes
    received, the client's half-close and the reason the connection was lost
    are kept; the test ends the session by calling ``on_done`` itself.
    """

    def __init__(
        self,
        backend: Any,
        *,
        service: str,
        repo: Any,
        user: str,
        version: int,
        on_done: Callable[[int], None],
    ):
        self.backend = backend
        self.service = service
        self.repo = repo
        self.user = user
        self.version = version
        self.on_done = on_done
        self.received = bytearray()
        self.eof = False
        self.lost: Failure | None = None

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(
            f"hello {self.user} {self.service} {self.repo.name} v{self.version}\n".encode()
        )

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def readConnectionLost(self) -> None:
        self.eof = True

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost = reason


def recording_stream_factory(streams: list[RecordingStream]) -> Callable[..., RecordingStream]:
    """A ``stream_factory`` for the adapters that appends each stream it builds to *streams*."""

    def build(*args: Any, **kwargs: Any) -> RecordingStream:
        stream = RecordingStream(*args, **kwargs)
        streams.append(stream)
        return stream

    return build


@attrs.define
class RecordingRunner:
    """A ``BlockingRunner`` that runs calls inline and records their names.

    With ``hold`` set, calls wait (their Deferreds unfired) until the test
    lets them run: ``release_one`` the oldest, ``release`` all of them,
    including any that the released ones queue.
    """

    calls: list[str] = attrs.field(factory=list)
    hold: bool = False
    pending: list[tuple[Deferred[Any], Callable[..., Any], tuple[Any, ...], dict[str, Any]]] = (
        attrs.field(factory=list)
    )

    def __call__(self, f: Callable[..., _T], /, *args: Any, **kwargs: Any) -> Deferred[_T]:
        self.calls.append(getattr(f, "__name__", repr(f)))
        if not self.hold:
            return inline_runner(f, *args, **kwargs)
        d: Deferred[_T] = Deferred()
        self.pending.append((d, f, args, kwargs))
        return d

    def waiting(self) -> list[str]:
        """The names of the held calls, oldest first."""
        return [getattr(f, "__name__", repr(f)) for _, f, _, _ in self.pending]

    def release_one(self) -> None:
        """Run the oldest held call and fire its Deferred with the outcome."""
        d, f, args, kwargs = self.pending.pop(0)
        maybeDeferred(f, *args, **kwargs).chainDeferred(d)

    def release(self) -> None:
        """Run held calls, oldest first, until none is left."""
        while self.pending:
            self.release_one()
