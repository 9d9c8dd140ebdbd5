"""The member service every cluster node runs: join, heartbeat, watch, and keep the last topology.

A :class:`MemberService` dials any of the control addresses it was given
(the next one after each failure, waiting longer each time, up to a cap),
proves the cluster secret, and sends ``Join``, again whenever it connects,
since a ``Join`` of the same member is how a restarted node becomes active
again. It retries ``NO_LEADER`` on the same connection. Then, until the
connection drops, it sends ``Heartbeat`` every ``heartbeat_interval``
seconds and keeps one ``WatchTopology`` long-poll outstanding; a new epoch
(from either answer) fetches the topology page by page, and a page of
another epoch (``STALE_EPOCH``, the epoch moved mid-fetch) starts the fetch
again.

The last topology is kept in memory (:meth:`MemberService.current` returns
it at once: a request never waits on the control plane or Raft) and on disk
(:class:`~gitstratum.cluster.topology_cache.TopologyFile`), which is read
first at start, so a node whose control plane is entirely away keeps going
on the ring it last saw and picks up new epochs when the control plane
returns.

This module knows the control plane only through its AMP schemas: the
member's description (the bytes of the control state's ``Join``) and the
topology decoder are given to it, so ``cluster`` does not import
``control`` (whose server imports ``cluster``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any, Generic, Protocol, TypeVar, cast

from twisted.application.service import Service
from twisted.internet import threads
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    inlineCallbacks,
    maybeDeferred,
    succeed,
)
from twisted.internet.endpoints import clientFromString
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.failure import Failure

from gitstratum.cluster.auth import AuthenticationFailed, NodeAMP
from gitstratum.cluster.commands import (
    GetTopology,
    Heartbeat,
    Join,
    NoLeader,
    Refused,
    StaleEpoch,
    WatchTopology,
)
from gitstratum.cluster.topology_cache import TopologyFile

__all__ = [
    "DEFAULT_MAX_TOPOLOGY_BYTES",
    "MemberService",
    "TopologyLike",
    "control_endpoint",
    "parse_join",
]

_log = Logger()

#: the largest topology a member will fetch (1,000 nodes at 256 vnodes is about 4 MB)
DEFAULT_MAX_TOPOLOGY_BYTES = 64 * 1024 * 1024
#: how many torn fetches (the epoch moved mid-fetch) in a row before waiting for the next epoch
MAX_FETCH_RESTARTS = 5
TOPOLOGY_FILE = "topology.bin"

_ENDPOINT_TYPES = ("tcp:", "ssl:", "tls:", "unix:", "tcp6:")
_HOST_PORT = re.compile(r"^(?:\[([0-9A-Fa-f:.]+)\]|([^:\[\]]+)):([0-9]{1,5})$")


class TopologyLike(Protocol):
    """What the member needs of a topology value: its epoch and version."""

    @property
    def epoch(self) -> int: ...

    @property
    def version(self) -> int: ...


T = TypeVar("T", bound=TopologyLike)


def parse_join(value: str) -> tuple[str, ...]:
    """The control addresses of ``--join HOST:PORT[,...]``; ``ValueError`` names a bad one."""
    addresses = tuple(a.strip() for a in value.split(",") if a.strip())
    if not addresses:
        raise ValueError("--join needs at least one control address, HOST:PORT[,...]")
    for address in addresses:
        if not address.startswith(_ENDPOINT_TYPES):
            match = _HOST_PORT.match(address)
            if match is None or not 0 < int(match.group(3)) < 65536:
                raise ValueError(f"{address!r} is not HOST:PORT (or a client endpoint string)")
    return addresses


def control_endpoint(reactor: Any, address: str) -> IStreamClientEndpoint:
    """The endpoint to dial *address*: ``HOST:PORT``, or a client endpoint string (``ssl:...``)."""
    if address.startswith(_ENDPOINT_TYPES):
        return clientFromString(reactor, address)
    match = _HOST_PORT.match(address)
    if match is None:
        raise ValueError(f"{address!r} is not HOST:PORT")
    host = (match.group(1) or match.group(2)).replace(":", r"\:")
    return clientFromString(reactor, f"tcp:host={host}:port={match.group(3)}")


class _MemberAMP(NodeAMP):
    """The member's end of a control connection, which says when it closes."""

    def __init__(self, secret: bytes, node_id: str, clock: IReactorTime) -> None:
        super().__init__(secret, node_id, clock)
        self.closed = False
        self._waiters: list[Deferred[None]] = []

    def when_lost(self) -> Deferred[None]:
        """Fires when the connection closes (at once if it has); cancelling it cancels only it."""
        if self.closed:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._waiters.append(d)
        return d

    def connectionLost(self, reason: Any = None) -> None:
        super().connectionLost(reason)
        self.closed = True
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            if not d.called:
                d.callback(None)

    def abort(self) -> None:
        if self.transport is not None:
            cast(Any, self.transport).abortConnection()


class MemberService(Service, Generic[T]):
    """Membership of one node: join, heartbeat, watch; the cached topology in memory and on disk.

    *control* are the control addresses (``HOST:PORT`` or endpoint
    strings), *member* the encoded description ``Join`` carries, *decode*
    turns a fetched topology's bytes into a value with ``epoch`` and
    ``version``. *endpoint* makes the endpoint for an address (by default
    :func:`control_endpoint`); *blocking* runs the disk write off the
    reactor (by default in the reactor's thread pool).
    """

    def __init__(
        self,
        *,
        reactor: Any,
        control: Sequence[str],
        secret: bytes,
        node_id: str,
        member: bytes,
        data_dir: str,
        decode: Callable[[bytes], T],
        heartbeat_interval: float = 1.0,
        watch_wait: float = 30.0,
        request_timeout: float = 10.0,
        retry_initial: float = 0.5,
        retry_max: float = 10.0,
        max_topology_bytes: int = DEFAULT_MAX_TOPOLOGY_BYTES,
        endpoint: Callable[[str], IStreamClientEndpoint] | None = None,
        blocking: Callable[..., Deferred[Any]] | None = None,
    ) -> None:
        if not control:
            raise ValueError("a member needs at least one control address")
        for name, value in (
            ("heartbeat_interval", heartbeat_interval),
            ("watch_wait", watch_wait),
            ("request_timeout", request_timeout),
            ("retry_initial", retry_initial),
            ("retry_max", retry_max),
        ):
            if not value > 0:
                raise ValueError(f"{name} must be positive, not {value!r}")
        self._reactor = reactor
        self._control = tuple(control)
        self._secret = secret
        self.node_id = node_id
        self._member = member
        self._decode = decode
        self._file = TopologyFile(f"{data_dir}/{TOPOLOGY_FILE}")
        self.heartbeat_interval = heartbeat_interval
        self.watch_wait = watch_wait
        self.request_timeout = request_timeout
        self.retry_initial = retry_initial
        self.retry_max = retry_max
        self.max_topology_bytes = max_topology_bytes
        self._endpoint = endpoint or (lambda address: control_endpoint(reactor, address))
        self._blocking = blocking or self._in_thread
        self._topology: T | None = None
        self._observers: list[Callable[[T], object]] = []
        self._run: Deferred[None] | None = None
        self._next = 0
        self._fetching = False
        self._fetch_again = False
        #: the control address of the current connection, once joined
        self.connected_to: str | None = None
        #: the last reason a connection or a join failed, for status and tests
        self.last_error: str | None = None

    # -- what other code uses --------------------------------------------------------------

    def current(self) -> T | None:
        """The last topology seen (from the control plane or the disk copy); never waits."""
        return self._topology

    def subscribe(self, observer: Callable[[T], object]) -> Callable[[], None]:
        """Call *observer* with each new topology; returns the function that unsubscribes it."""
        self._observers.append(observer)
        return lambda: self._observers.remove(observer) if observer in self._observers else None

    # -- the service -----------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._load_disk_copy()
        self._run = self._loop()
        self._run.addErrback(self._crashed)

    def stopService(self) -> None:
        super().stopService()
        run, self._run = self._run, None
        if run is not None:
            run.cancel()

    def _crashed(self, failure: Failure) -> None:
        if not failure.check(CancelledError):
            _log.failure("the member service stopped", failure)

    def _load_disk_copy(self) -> None:
        stored = self._file.load()
        if stored is None:
            return
        epoch, blob = stored
        try:
            topology = self._decode(blob)
        except ValueError as e:
            _log.warn("ignoring the cached topology in {path}: {e}", path=self._file.path, e=e)
            return
        _log.info("starting on the cached topology of epoch {epoch}", epoch=topology.epoch)
        self._set(topology)

    # -- connecting, joining, and the session ----------------------------------------------

    @inlineCallbacks
    def _loop(self) -> Any:
        delay = self.retry_initial
        while self.running:
            address = self._control[self._next % len(self._control)]
            self._next += 1
            proto: _MemberAMP | None = None
            try:
                proto = yield self._connect(address)
                yield self._join(proto, address)
            except CancelledError:
                if proto is not None:
                    proto.abort()
                raise
            except Exception as e:
                self.last_error = self._explain(address, e)
                _log.warn("{error}", error=self.last_error)
                if proto is not None:
                    proto.abort()
                yield self._sleep(delay)
                delay = min(delay * 2, self.retry_max)
                continue
            self.connected_to = address
            self.last_error = None
            began = self._reactor.seconds()
            try:
                yield self._session(proto)
            finally:
                self.connected_to = None
                proto.abort()
            _log.info("lost the control node {address}; dialling again", address=address)
            # a connection that fails at once (a fetch it cannot finish) must not spin: back off
            # unless it lasted a while
            if self._reactor.seconds() - began >= self.retry_max:
                delay = self.retry_initial
            yield self._sleep(delay)
            delay = min(delay * 2, self.retry_max)

    def _explain(self, address: str, error: Exception) -> str:
        if isinstance(error, AuthenticationFailed) or (
            isinstance(error, amp.RemoteAmpError) and error.errorCode == b"AUTHENTICATION_FAILED"
        ):
            return (
                f"control node {address} and this node do not share the cluster secret"
                " (check --cluster-secret-file)"
            )
        if isinstance(error, Refused):
            return f"control node {address} refused this node's join: {error}"
        return f"control node {address}: {error.__class__.__name__}: {error}"

    def _connect(self, address: str) -> Deferred[_MemberAMP]:
        factory = Factory.forProtocol(lambda: _MemberAMP(self._secret, self.node_id, self._reactor))
        d = self._endpoint(address).connect(factory)

        def proved(proto: Any) -> Deferred[_MemberAMP]:
            return cast(_MemberAMP, proto).authenticate().addCallback(lambda _: proto)

        d.addCallback(proved)
        d.addTimeout(self.request_timeout, self._reactor)
        return cast("Deferred[_MemberAMP]", d)

    @inlineCallbacks
    def _join(self, proto: _MemberAMP, address: str) -> Any:
        delay = self.retry_initial
        while True:
            try:
                answer = yield self._call(proto, Join, member=self._member)
            except NoLeader:
                _log.info("control node {address}: no leader yet; join again", address=address)
                yield self._sleep(delay)
                delay = min(delay * 2, self.retry_max)
                continue
            _log.info("joined through {address} at epoch {epoch}", address=address, **answer)
            self._heard(answer["epoch"], None, proto)
            return

    @inlineCallbacks
    def _session(self, proto: _MemberAMP) -> Any:
        children = [self._heartbeats(proto), self._watch(proto)]
        for child in children:
            child.addErrback(self._session_failed, proto)
        try:
            yield proto.when_lost()
        finally:
            for child in children:
                child.cancel()

    def _session_failed(self, failure: Failure, proto: _MemberAMP) -> None:
        if not failure.check(CancelledError):
            _log.warn("control connection failed: {f}", f=failure.getErrorMessage())
        proto.abort()

    @inlineCallbacks
    def _heartbeats(self, proto: _MemberAMP) -> Any:
        while True:
            yield self._sleep(self.heartbeat_interval)
            try:
                answer = yield self._call(proto, Heartbeat, node=self.node_id)
            except NoLeader:
                continue
            except Refused as e:
                # the control plane no longer knows this node (it was removed): join again
                _log.warn("heartbeat refused ({e}); joining again", e=e)
                yield self._call(proto, Join, member=self._member)
                continue
            self._heard(answer["epoch"], answer.get("version"), proto)

    @inlineCallbacks
    def _watch(self, proto: _MemberAMP) -> Any:
        while True:
            current = self._topology
            answer = yield self._call(
                proto,
                WatchTopology,
                since=current.epoch if current is not None else 0,
                since_version=current.version if current is not None else 0,
                wait=self.watch_wait,
                timeout=self.watch_wait,
            )
            self._heard(answer["epoch"], answer.get("version"), proto)

    def _heard(self, epoch: int, version: int | None, proto: _MemberAMP) -> None:
        """The control plane is at *epoch* (and *version*, when told): fetch unless we have it.

        A member marked down or active moves the version, not the epoch; a
        member must see those too (the object tier's handoff reads them).
        """
        current = self._topology
        if (
            current is None
            or epoch != current.epoch
            or (version is not None and version != current.version)
        ):
            self._start_fetch(proto)

    # -- fetching --------------------------------------------------------------------------

    def _start_fetch(self, proto: _MemberAMP) -> None:
        if self._fetching:
            self._fetch_again = True
            return
        self._fetching = True

        def done(result: object) -> object:
            self._fetching = False
            if isinstance(result, Failure) and not result.check(CancelledError):
                _log.warn("fetching the topology failed: {f}", f=result.getErrorMessage())
                proto.abort()
            elif self._fetch_again and not proto.closed:
                self._fetch_again = False
                self._start_fetch(proto)
            return None

        d = self._fetch(proto)
        d.addBoth(done)
        proto.when_lost().addCallback(lambda _: d.cancel())

    @inlineCallbacks
    def _fetch(self, proto: _MemberAMP) -> Any:
        for _ in range(MAX_FETCH_RESTARTS):
            try:
                epoch, blob = yield self._fetch_pages(proto)
            except StaleEpoch:
                _log.info("the epoch moved while fetching the topology; fetching again")
                continue
            topology = self._decode(blob)
            current = self._topology
            if current is not None and (topology.epoch, topology.version) <= (
                current.epoch,
                current.version,
            ):
                return
            yield self._blocking(self._file.store, topology.epoch, blob)
            self._set(topology)
            return
        _log.warn("the epoch kept moving while fetching; waiting for the next one")

    @inlineCallbacks
    def _fetch_pages(self, proto: _MemberAMP) -> Any:
        first = yield self._call(proto, GetTopology, epoch=0, offset=0)
        epoch, total = first["epoch"], first["total"]
        if not 0 <= total <= self.max_topology_bytes:
            raise ValueError(
                f"a topology of {total} bytes is over the limit of {self.max_topology_bytes}"
            )
        pages = [first["page"]]
        have = len(first["page"])
        while have < total:
            answer = yield self._call(proto, GetTopology, epoch=epoch, offset=have)
            if answer["epoch"] != epoch or answer["total"] != total:
                raise StaleEpoch(f"asked for epoch {epoch}, got {answer['epoch']}")
            if not answer["page"]:
                raise ValueError(f"an empty topology page at offset {have} of {total}")
            pages.append(answer["page"])
            have += len(answer["page"])
        if have != total:
            raise ValueError(f"topology pages ran to {have} bytes, not {total}")
        return epoch, b"".join(pages)

    def _set(self, topology: T) -> None:
        self._topology = topology
        for observer in list(self._observers):
            try:
                observer(topology)
            except Exception:
                _log.failure("a topology observer failed")

    # -- helpers ---------------------------------------------------------------------------

    def _call(
        self, proto: _MemberAMP, command: type[amp.Command], timeout: float = 0.0, **kw: Any
    ) -> Deferred[Any]:
        d = proto.callRemote(command, **kw)
        d.addTimeout(timeout + self.request_timeout, self._reactor)
        return d

    def _sleep(self, seconds: float) -> Deferred[None]:
        return deferLater(self._reactor, seconds, lambda: None)

    def _in_thread(self, f: Callable[..., object], *args: object) -> Deferred[Any]:
        pool = getattr(self._reactor, "getThreadPool", None)
        if pool is None:
            return maybeDeferred(f, *args)
        return threads.deferToThreadPool(self._reactor, pool(), f, *args)
