"""Raft messages between nodes over AMP: one-way commands, batched and chunked under AMP's 64 KiB value limit.

Each node listens with ``AMPTransport.server_factory()`` (or ``listen``) and
dials every peer through its own ``ClientService`` with backoff; messages
flow from the dialling side to the listening side only, so a node's
outgoing messages to a peer all travel on the one connection it made.

On a connection the dialler first sends ``Handshake`` (codec version,
sender id, the id it expects to reach) and waits for the answer; then it
sends ``RaftMessages`` commands, one-way.  Each carries one AMP value of
frames::

    message id u64, chunk index u32, chunk count u32, chunk length u16, chunk

Several small messages share one command; a message larger than a value is
split into consecutive chunks that the receiver reassembles (one message at
a time per connection, bounded by ``max_message_size``).  The encoded
messages are ``gitstratum.raft.codec``'s.

With a cluster ``secret`` (``AMPTransport(secret=...)``) the handshake
also proves it, both ways: the dialler sends a fresh nonce and
``HMAC-SHA256(secret, "raft-dialler" | nonce_c | sender | receiver)``, the
listener answers its own nonce and ``HMAC(secret, "raft-listener" | nonce_c
| nonce_s | sender | receiver)``. A side whose peer's proof is missing or
wrong refuses the handshake and drops the connection, so a process without
the secret cannot send a Raft message. The dialler's proof covers only its
own nonce (one round trip), so it is not fresh against an on-path
recorder; against that, and for confidentiality, run the transport over
``ssl:`` endpoints (mutual TLS), as for every link between nodes.

Anything the listener cannot accept (an incompatible version, an unknown
command, a malformed frame, a message that fails to decode or is
misaddressed) gets one warning line and the connection dropped; nothing
raises out of ``dataReceived``.  Delivery is best-effort, as Raft expects:
a message to a peer that is down is dropped and the ``unreachable`` hook
is told; while a connection is being made, a bounded queue holds them.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import math
import random
import secrets
import struct
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import attrs
from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.endpoints import clientFromString
from twisted.internet.interfaces import (
    IConsumer,
    IDelayedCall,
    IListeningPort,
    IPushProducer,
    IReactorTime,
    IStreamClientEndpoint,
    IStreamServerEndpoint,
    ITCPTransport,
)
from twisted.internet.protocol import Factory, connectionDone
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.failure import Failure
from zope.interface import implementer

from gitstratum.raft.codec import CODEC_VERSION, CodecError, decode_message, encode_message
from gitstratum.raft.interfaces import IRaftTransport
from gitstratum.raft.types import NONE, Message, NodeId

__all__ = [
    "AMPTransport",
    "RaftAMP",
    "Handshake",
    "RaftMessages",
    "IncompatibleVersion",
    "WrongNode",
    "NotAuthenticated",
    "FrameError",
    "Reassembler",
    "pack_frames",
    "MAX_PAYLOAD",
    "CHUNK_SIZE",
    "DEFAULT_MAX_MESSAGE_SIZE",
]

_log = Logger()

#: The largest AMP value.
MAX_PAYLOAD = amp.MAX_VALUE_LENGTH
_FRAME = struct.Struct(">QIIH")  # message id, chunk index, chunk count, chunk length
#: The largest chunk of one message that fits in a frame of one value.
CHUNK_SIZE = MAX_PAYLOAD - _FRAME.size
#: The largest encoded message sent or reassembled (a whole InstallSnapshot).
DEFAULT_MAX_MESSAGE_SIZE = 1 << 28


class IncompatibleVersion(Exception):
    """The other side speaks a Raft codec version this node cannot read."""


class WrongNode(Exception):
    """The handshake names a node other than the one that answered, or an impossible sender."""


class NotAuthenticated(Exception):
    """The peer did not prove the cluster secret in the handshake."""


#: bytes of each side's handshake nonce
NONCE_BYTES = 16


def _proof(secret: bytes, side: bytes, sender: int, receiver: int, *nonces: bytes) -> bytes:
    ids = f"{sender}\0{receiver}".encode("ascii")
    return hmac.new(secret, b"\0".join((side, ids, *nonces)), hashlib.sha256).digest()


class Handshake(amp.Command):
    """The first command on every connection: who is calling, whom it expects, and its codec version.

    ``nonce`` and ``proof`` carry the cluster-secret proof when the
    transport has a secret (see the module docstring).
    """

    commandName = b"raft-handshake"
    arguments = [
        (b"version", amp.Integer()),
        (b"sender", amp.Integer()),
        (b"receiver", amp.Integer()),
        (b"nonce", amp.String(optional=True)),
        (b"proof", amp.String(optional=True)),
    ]
    response = [
        (b"version", amp.Integer()),
        (b"node", amp.Integer()),
        (b"nonce", amp.String(optional=True)),
        (b"proof", amp.String(optional=True)),
    ]
    fatalErrors = {
        IncompatibleVersion: b"INCOMPATIBLE_VERSION",
        WrongNode: b"WRONG_NODE",
        NotAuthenticated: b"NOT_AUTHENTICATED",
    }


class RaftMessages(amp.Command):
    """Frames of encoded Raft messages; one-way, since Raft answers with messages of its own."""

    commandName = b"raft-messages"
    arguments = [(b"frames", amp.String())]
    requiresAnswer = False


_COMMANDS: dict[bytes, type[amp.Command]] = {
    Handshake.commandName: Handshake,
    RaftMessages.commandName: RaftMessages,
}


class FrameError(ValueError):
    """Frames that do not reassemble into messages: truncated, out of order, or too large."""


def pack_frames(messages: Iterable[tuple[int, bytes]]) -> list[bytes]:
    """Pack ``(message id, encoded message)`` pairs into AMP values of at most ``MAX_PAYLOAD`` bytes.

    Small messages share a value; a large one is split into ``CHUNK_SIZE``
    chunks, in order, never interleaved with another message.
    """
    payloads: list[bytes] = []
    current: list[bytes] = []
    size = 0
    for message_id, data in messages:
        view = memoryview(data)
        total = max(1, math.ceil(len(view) / CHUNK_SIZE))
        for index in range(total):
            chunk = view[index * CHUNK_SIZE : (index + 1) * CHUNK_SIZE]
            frame_size = _FRAME.size + len(chunk)
            if size + frame_size > MAX_PAYLOAD:
                payloads.append(b"".join(current))
                current, size = [], 0
            current.append(_FRAME.pack(message_id, index, total, len(chunk)))
            current.append(bytes(chunk))
            size += frame_size
    if current:
        payloads.append(b"".join(current))
    return payloads


@attrs.define
class Reassembler:
    """Turns the frames of one connection back into encoded messages, holding at most one partial message."""

    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
    _id: int | None = attrs.field(init=False, default=None)
    _total: int = attrs.field(init=False, default=0)
    _next: int = attrs.field(init=False, default=0)
    _parts: list[bytes] = attrs.field(init=False, factory=list)
    _size: int = attrs.field(init=False, default=0)

    def feed(self, payload: bytes) -> list[bytes]:
        """The messages that ``payload``'s frames complete; ``FrameError`` if they cannot be from a sender of ours."""
        done: list[bytes] = []
        view = memoryview(payload)
        pos = 0
        max_chunks = max(1, math.ceil(self.max_message_size / CHUNK_SIZE))
        while pos < len(view):
            if len(view) - pos < _FRAME.size:
                raise FrameError(f"truncated frame header: {len(view) - pos} bytes")
            message_id, index, total, length = _FRAME.unpack_from(view, pos)
            pos += _FRAME.size
            if not 0 < length <= len(view) - pos:
                raise FrameError(
                    f"bad chunk length {length} with {len(view) - pos} bytes left in the frames"
                )
            if not 0 <= index < total:
                raise FrameError(f"bad chunk {index} of {total}")
            if total > max_chunks:
                raise FrameError(
                    f"absurd message of {total} chunks, over the {self.max_message_size}-byte limit"
                )
            chunk = bytes(view[pos : pos + length])
            pos += length
            if self._id is None:
                if index != 0:
                    raise FrameError(
                        f"chunk {index} of message {message_id} without its first chunk"
                    )
                if total == 1:
                    done.append(chunk)
                    continue
                self._id, self._total, self._next = message_id, total, 0
            elif (message_id, index, total) != (self._id, self._next, self._total):
                raise FrameError(
                    f"chunk {index} of {total} of message {message_id} while message "
                    f"{self._id} waits for chunk {self._next} of {self._total}"
                )
            self._parts.append(chunk)
            self._size += length
            if self._size > self.max_message_size:
                raise FrameError(
                    f"message {message_id} is over the {self.max_message_size}-byte limit"
                )
            self._next += 1
            if self._next == self._total:
                done.append(b"".join(self._parts))
                self._id, self._parts, self._size = None, [], 0
        return done


class _State(enum.Enum):
    DOWN = "down"  # waiting to retry, or not started: messages are dropped
    CONNECTING = "connecting"  # dialling or handshaking: messages wait in a bounded queue
    READY = "ready"  # handshake answered: messages go out at once


@attrs.define(eq=False)
class _Peer:
    """One peer we dial: its address, connection state and the messages waiting for the handshake."""

    node_id: NodeId
    address: str
    queue: deque[Message]
    state: _State = _State.DOWN
    service: ClientService | None = None
    protocol: RaftAMP | None = None
    #: Consecutive refused handshakes; they count as failed attempts for the
    #: backoff (ClientService resets its own count on every TCP connect).
    rejections: int = 0
    #: The connection's send buffer is over ``max_buffer_bytes``: the peer is
    #: not reading, so new messages are dropped until it drains.
    congested: bool = False


@implementer(IPushProducer)
@attrs.define(eq=False)
class _SendBuffer:
    """Told by the TCP transport when its send buffer fills and drains (it is never asked to produce)."""

    link: _Peer

    def pauseProducing(self) -> None:
        self.link.congested = True

    def resumeProducing(self) -> None:
        self.link.congested = False

    def stopProducing(self) -> None:
        self.link.congested = False


class RaftAMP(amp.AMP):
    """One Raft connection: the dialling side when ``link`` is given, else the listening side."""

    def __init__(self, raft: AMPTransport, link: _Peer | None = None) -> None:
        super().__init__()
        self._raft = raft
        self._link = link
        #: The node at the other end: known up front when dialling, from the handshake when listening.
        self.peer: NodeId = link.node_id if link is not None else NONE
        self._ready = False
        self._closing = False
        self._lost = False
        self._next_message_id = 0
        self._reassembler = Reassembler(raft.max_message_size)
        self._handshake_timer: IDelayedCall | None = None
        self._nonce = b""

    # -- both sides ---------------------------------------------------------

    def connectionMade(self) -> None:
        super().connectionMade()
        if ITCPTransport.providedBy(self.transport):
            # Raft messages are small and latency-bound: Nagle would hold
            # each one for the peer's delayed ACK (measured: 4x fewer commits/s).
            self.transport.setTcpNoDelay(True)
        if self._link is not None:
            # A peer that stops reading would otherwise grow our send buffer
            # without bound: past this many bytes the transport pauses us and
            # send() drops (Raft resends) instead of buffering.
            transport: Any = self.transport
            if hasattr(transport, "bufferSize"):
                transport.bufferSize = self._raft.max_buffer_bytes
            self._link.congested = False
            if IConsumer.providedBy(transport):
                transport.registerProducer(_SendBuffer(self._link), True)
            proof: dict[str, bytes] = {}
            secret = self._raft.secret
            if secret is not None:
                self._nonce = secrets.token_bytes(NONCE_BYTES)
                proof = {
                    "nonce": self._nonce,
                    "proof": _proof(
                        secret, b"raft-dialler", self._raft.node_id, self.peer, self._nonce
                    ),
                }
            answer = self.callRemote(
                Handshake,
                version=CODEC_VERSION,
                sender=self._raft.node_id,
                receiver=self.peer,
                **proof,
            )
            answer.addCallbacks(self._handshake_answered, self._handshake_failed)
            self._handshake_timer = self._raft.timer.callLater(
                self._raft.handshake_timeout, self._handshake_timed_out
            )
        else:
            self._raft._incoming.add(self)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._lost = True
        self._stop_handshake_timer()
        super().connectionLost(reason)
        if self._link is not None:
            self._raft._peer_lost(self._link, self)
        else:
            self._raft._incoming.discard(self)

    def ampBoxReceived(self, box: amp.AmpBox) -> None:
        """Admit only what this side expects, so AMP never answers (or raises for) anything else."""
        if self._closing:
            return
        if amp.COMMAND in box:
            self._command_received(box)
        elif amp.ANSWER in box or amp.ERROR in box:
            tag = box[amp.ANSWER] if amp.ANSWER in box else box[amp.ERROR]
            if tag in self._outstandingRequests:
                super().ampBoxReceived(box)
            else:
                self._reject("an answer to a question never asked")
        else:
            self._reject("a box that is neither a command nor an answer")

    def lengthLimitExceeded(self, length: int) -> None:
        self._reject(f"an AMP key of {length} bytes, over the 255-byte limit")
        super().lengthLimitExceeded(length)

    def _reject(self, reason: str) -> None:
        """One clear line, then drop the connection; later boxes already buffered are ignored."""
        if self._closing:
            return
        self._closing = True
        _log.warn(
            "Dropping Raft connection {direction} node {peer} ({address}): {reason}",
            direction="to" if self._link is not None else "from",
            peer=self.peer or "unknown",
            address=self.transport.getPeer() if self.transport is not None else "closed",
            reason=reason,
        )
        if self.transport is not None:
            self.transport.loseConnection()

    # -- listening side -----------------------------------------------------

    def _command_received(self, box: amp.AmpBox) -> None:
        name = box[amp.COMMAND]
        command = _COMMANDS.get(name)
        if self._link is not None:
            self._reject(f"command {name!r} sent by the listening side")
            return
        if command is None:
            self._reject(f"unknown command {name!r}")
            return
        if (command is Handshake) == self._ready:
            self._reject(
                "the handshake must come first, once"
                if self._ready
                else "a message before the handshake"
            )
            return
        try:
            command.parseArguments(box, self)
        except (KeyError, ValueError) as e:
            self._reject(f"malformed {name.decode('ascii', 'replace')} command ({e!r})")
            return
        super().ampBoxReceived(box)

    @Handshake.responder
    def _handshake(
        self,
        version: int,
        sender: int,
        receiver: int,
        nonce: bytes | None = None,
        proof: bytes | None = None,
    ) -> dict[str, Any]:
        me = self._raft.node_id
        secret = self._raft.secret
        if secret is not None:
            expected = _proof(secret, b"raft-dialler", sender, receiver, nonce or b"")
            if (
                nonce is None
                or proof is None
                or len(nonce) != NONCE_BYTES
                or not hmac.compare_digest(proof, expected)
            ):
                reason = "it did not prove the cluster secret"
                self._refuse(sender, reason)
                raise NotAuthenticated(reason)
        if version != CODEC_VERSION:
            reason = f"it speaks raft codec version {version}, this node speaks {CODEC_VERSION}"
            self._refuse(sender, reason)
            raise IncompatibleVersion(reason)
        if receiver != me:
            reason = f"it expected node {receiver}, this is node {me}"
            self._refuse(sender, reason)
            raise WrongNode(reason)
        if sender <= NONE or sender == me:
            reason = f"impossible sender id {sender}"
            self._refuse(sender, reason)
            raise WrongNode(reason)
        if sender not in self._raft.peers:
            # A stranger could still disrupt the group with a higher term; a
            # joining node is given its peers' addresses before it is added.
            reason = f"node {sender} is not a known peer"
            self._refuse(sender, reason)
            raise WrongNode(reason)
        self.peer = sender
        self._ready = True
        if secret is None or nonce is None:
            return {"version": CODEC_VERSION, "node": me}
        nonce_s = secrets.token_bytes(NONCE_BYTES)
        mine = _proof(secret, b"raft-listener", sender, receiver, nonce, nonce_s)
        return {"version": CODEC_VERSION, "node": me, "nonce": nonce_s, "proof": mine}

    def _refuse(self, sender: int, reason: str) -> None:
        # AMP sends the fatal error and then closes the connection itself.
        self.peer = sender
        _log.warn(
            "Dropping Raft connection from node {peer} ({address}): {reason}",
            peer=sender,
            address=self.transport.getPeer() if self.transport is not None else "closed",
            reason=reason,
        )
        self._closing = True

    @RaftMessages.responder
    def _messages(self, frames: bytes) -> dict[str, Any]:
        try:
            for data in self._reassembler.feed(frames):
                message = decode_message(data)
                if message.to != self._raft.node_id or message.from_ != self.peer:
                    self._reject(
                        f"a message from node {message.from_} to node {message.to} "
                        f"on the connection from node {self.peer} to node {self._raft.node_id}"
                    )
                    break
                self._raft._deliver(message)
        except (FrameError, CodecError) as e:
            self._reject(str(e))
        return {}

    # -- dialling side ------------------------------------------------------

    def _stop_handshake_timer(self) -> None:
        if self._handshake_timer is not None and self._handshake_timer.active():
            self._handshake_timer.cancel()
        self._handshake_timer = None

    def _handshake_timed_out(self) -> None:
        assert self._link is not None
        self._handshake_timer = None
        self._link.rejections += 1
        self._reject(f"no answer to the handshake within {self._raft.handshake_timeout} s")

    def _handshake_answered(self, answer: dict[str, Any]) -> None:
        assert self._link is not None
        self._stop_handshake_timer()
        secret = self._raft.secret
        nonce_s, theirs = answer.get("nonce"), answer.get("proof")
        if secret is not None and (
            nonce_s is None
            or theirs is None
            or not hmac.compare_digest(
                theirs,
                _proof(
                    secret, b"raft-listener", self._raft.node_id, self.peer, self._nonce, nonce_s
                ),
            )
        ):
            self._link.rejections += 1
            self._reject("it did not prove the cluster secret")
        elif answer["version"] != CODEC_VERSION:
            self._link.rejections += 1
            self._reject(f"it answered with raft codec version {answer['version']}")
        elif answer["node"] != self.peer:
            self._link.rejections += 1
            self._reject(f"node {answer['node']} answered at its address")
        else:
            self._ready = True
            self._raft._peer_ready(self._link, self)

    def _handshake_failed(self, failure: Failure) -> None:
        assert self._link is not None
        self._stop_handshake_timer()
        if self._lost or self._closing:
            return  # the connection went away first; connectionLost says so
        self._link.rejections += 1
        self._reject(f"it refused the handshake: {failure.getErrorMessage()}")

    def send_encoded(self, encoded: Sequence[bytes]) -> None:
        """Send encoded messages in as few one-way commands as fit."""
        first = self._next_message_id
        self._next_message_id += len(encoded)
        for payload in pack_frames(zip(range(first, first + len(encoded)), encoded, strict=True)):
            self.callRemote(RaftMessages, frames=payload)


@attrs.define(eq=False)
class _RaftFactory(Factory):
    build: Callable[[], RaftAMP]

    def buildProtocol(self, addr: object) -> RaftAMP:
        return self.build()


@implementer(IStreamClientEndpoint)
@attrs.frozen
class _TrackedEndpoint:
    """Tells the transport when ClientService dials and when a dial fails, so it knows whether to queue."""

    endpoint: IStreamClientEndpoint
    link: _Peer = attrs.field(repr=False)
    raft: AMPTransport = attrs.field(repr=False)

    def connect(self, factory: Any) -> Deferred[Any]:
        self.raft._peer_dialling(self.link)
        dialling = self.endpoint.connect(factory)
        dialling.addErrback(self._failed)
        return dialling

    def _failed(self, failure: Failure) -> Failure:
        self.raft._peer_down(self.link)
        return failure


def _ignore_unreachable(node: NodeId) -> None:
    pass


@implementer(IRaftTransport)
@attrs.define(eq=False)
class AMPTransport:
    """``IRaftTransport`` over AMP for node ``node_id``; ``peers`` maps node ids to client endpoint strings.

    Call ``start()`` to dial the peers and ``listen(endpoint)`` (or pass
    ``server_factory()`` to an endpoint) to accept them; ``stop()`` undoes
    both.  ``retry_policy`` is ClientService's (seconds to wait after n
    failed attempts); ``max_queue`` bounds the messages held per peer while
    it is being dialled.
    """

    node_id: NodeId
    peers: dict[NodeId, str] = attrs.field(converter=dict)
    reactor: Any
    clock: IReactorTime | None = None
    retry_policy: Callable[[int], float] | None = attrs.field(default=None, kw_only=True)
    max_queue: int = attrs.field(default=256, kw_only=True)
    max_message_size: int = attrs.field(default=DEFAULT_MAX_MESSAGE_SIZE, kw_only=True)
    #: Seconds a dialled peer has to answer the handshake before we hang up and retry.
    handshake_timeout: float = attrs.field(default=5.0, kw_only=True)
    #: Bytes a peer's connection may hold unsent before messages to it are dropped.
    max_buffer_bytes: int = attrs.field(default=16 << 20, kw_only=True)
    #: ``(NodeId) -> None``, told when messages to a peer were dropped or its connection was lost.
    unreachable: Callable[[NodeId], None] = attrs.field(default=_ignore_unreachable, kw_only=True)
    #: The cluster secret both ends of every connection must prove; ``None``: no proof asked.
    secret: bytes | None = attrs.field(default=None, kw_only=True, repr=False)
    #: Messages dropped (peer down, queue full, unknown peer, too large), for metrics and tests.
    dropped: int = attrs.field(init=False, default=0)
    _links: dict[NodeId, _Peer] = attrs.field(init=False, factory=dict)
    _incoming: set[RaftAMP] = attrs.field(init=False, factory=set)
    _ports: list[IListeningPort] = attrs.field(init=False, factory=list)
    _receiver: Callable[[Message], None] | None = attrs.field(init=False, default=None)
    _started: bool = attrs.field(init=False, default=False)
    _stopping: list[Deferred[None]] = attrs.field(init=False, factory=list)

    def __attrs_post_init__(self) -> None:
        if self.clock is None:
            self.clock = self.reactor
        if self.retry_policy is None:
            # LAN defaults: retry fast (failover must finish within a second
            # or two) with a little jitter so peers do not dial in lockstep.
            jitter = random.Random()
            self.retry_policy = backoffPolicy(
                initialDelay=0.1, maxDelay=2.0, factor=2.0, jitter=lambda: jitter.random() * 0.1
            )
        addresses, self.peers = self.peers, {}
        self.set_peers(addresses)

    @property
    def timer(self) -> IReactorTime:
        """The clock for retries and handshake timeouts (``clock``, else the reactor)."""
        assert self.clock is not None
        return self.clock

    # -- IRaftTransport -----------------------------------------------------

    def send(self, messages: Sequence[Message]) -> None:
        """Send each message to its ``to`` node now, queue it while that peer is being dialled, or drop it."""
        by_peer: dict[NodeId, list[Message]] = {}
        for message in messages:
            if message.to != self.node_id:
                by_peer.setdefault(message.to, []).append(message)
        for node, batch in by_peer.items():
            link = self._links.get(node)
            if link is None or link.state is _State.DOWN:
                self._drop(node, len(batch))
            elif link.state is _State.CONNECTING:
                overflow = max(0, len(link.queue) + len(batch) - self.max_queue)
                link.queue.extend(batch)
                if overflow:
                    self._drop(node, overflow)
            elif link.congested:
                self._drop(node, len(batch))
            else:
                assert link.protocol is not None
                self._write(link, link.protocol, batch)

    def set_receiver(self, receiver: Callable[[Message], None]) -> None:
        """Deliver every incoming message to ``receiver``."""
        self._receiver = receiver

    def set_peers(self, peers: dict[NodeId, str]) -> None:
        """Replace the peer addresses: dial new ones, hang up on removed ones, redial changed ones."""
        wanted = {node: address for node, address in peers.items() if node != self.node_id}
        for node, link in list(self._links.items()):
            if wanted.get(node) != link.address:
                self._remove(link)
        for node, address in wanted.items():
            if node not in self._links:
                self._add(node, address)
        self.peers = dict(wanted)

    # -- lifecycle ----------------------------------------------------------

    def server_factory(self) -> Factory:
        """The factory for incoming Raft connections, for any server endpoint."""
        return _RaftFactory(lambda: RaftAMP(self))

    def listen(self, endpoint: IStreamServerEndpoint) -> Deferred[IListeningPort]:
        """Accept Raft connections on ``endpoint``; ``stop()`` stops listening."""
        listening: Deferred[IListeningPort] = endpoint.listen(self.server_factory())

        def remember(port: IListeningPort) -> IListeningPort:
            self._ports.append(port)
            return port

        return listening.addCallback(remember)

    def start(self) -> None:
        """Start dialling every peer (and any added later)."""
        self._started = True
        for link in self._links.values():
            self._dial(link)

    def stop(self) -> Deferred[None]:
        """Hang up on every peer, stop listening, and fire when all of it is done."""
        self._started = False
        for link in list(self._links.values()):
            self._hang_up(link)
        for protocol in list(self._incoming):
            if protocol.transport is not None:
                protocol.transport.loseConnection()
        waits: list[Deferred[Any]] = list(self._stopping)
        waits.extend(succeed(port.stopListening()) for port in self._ports)
        self._ports.clear()
        self._stopping.clear()
        done: Deferred[Any] = DeferredList(waits, consumeErrors=True)
        return done.addCallback(lambda _: None)

    # -- peers --------------------------------------------------------------

    def _add(self, node: NodeId, address: str) -> None:
        link = _Peer(node, address, deque(maxlen=self.max_queue))
        self._links[node] = link
        if self._started:
            self._dial(link)

    def _remove(self, link: _Peer) -> None:
        del self._links[link.node_id]
        self._hang_up(link)

    def _dial(self, link: _Peer) -> None:
        endpoint = _TrackedEndpoint(clientFromString(self.reactor, link.address), link, self)
        policy = self.retry_policy
        assert policy is not None
        link.service = ClientService(
            endpoint,
            _RaftFactory(lambda: RaftAMP(self, link)),
            retryPolicy=lambda attempt: policy(attempt + link.rejections),
            clock=self.timer,
        )
        link.service.startService()

    def _hang_up(self, link: _Peer) -> None:
        if link.service is not None:
            self._stopping.append(link.service.stopService())
            link.service = None
        self._peer_down(link)

    def _peer_dialling(self, link: _Peer) -> None:
        link.state = _State.CONNECTING

    def _peer_ready(self, link: _Peer, protocol: RaftAMP) -> None:
        if link.service is None:
            return  # hung up while the handshake was in flight
        link.state = _State.READY
        link.protocol = protocol
        link.rejections = 0
        queued = list(link.queue)
        link.queue.clear()
        if queued:
            self._write(link, protocol, queued)

    def _peer_lost(self, link: _Peer, protocol: RaftAMP) -> None:
        if link.service is None:
            return  # hung up on purpose
        if link.protocol is protocol or link.protocol is None:
            reported = bool(link.queue)  # dropping the queue reports it already
            self._peer_down(link)
            if not reported:
                self.unreachable(link.node_id)

    def _peer_down(self, link: _Peer) -> None:
        link.state = _State.DOWN
        link.protocol = None
        if link.queue:
            dropped = len(link.queue)
            link.queue.clear()
            self._drop(link.node_id, dropped)

    # -- messages -----------------------------------------------------------

    def _write(self, link: _Peer, protocol: RaftAMP, messages: Sequence[Message]) -> None:
        encoded = []
        for message in messages:
            data = encode_message(message)
            if len(data) > self.max_message_size:
                _log.warn(
                    "Dropping a {size}-byte {type} to node {peer}: over the {limit}-byte message limit",
                    size=len(data),
                    type=message.type.name,
                    peer=link.node_id,
                    limit=self.max_message_size,
                )
                self._drop(link.node_id, 1)
            else:
                encoded.append(data)
        protocol.send_encoded(encoded)

    def _drop(self, node: NodeId, count: int) -> None:
        self.dropped += count
        self.unreachable(node)

    def _deliver(self, message: Message) -> None:
        if self._receiver is not None:
            self._receiver(message)
