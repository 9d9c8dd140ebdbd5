"""AMP between nodes, with the cluster secret proved both ways before any other command.

The dialling node calls :meth:`NodeAMP.authenticate`, two round trips::

    Authenticate(node_c, nonce_c)  ->  node_s, nonce_s,
                                        proof_s = HMAC(secret, "server" | nonce_c | nonce_s | node_c | node_s)
    Prove(proof_c = HMAC(secret, "client" | nonce_c | nonce_s | node_c | node_s))  ->  {}

Each side checks the other's proof, so neither talks to an impostor, and the
fresh nonces on both sides mean a recorded exchange cannot be replayed. The
secret never crosses the wire. Until ``Prove`` succeeds the listening side
answers every other command with ``NOT_AUTHENTICATED`` and hangs up, and it
hangs up on a connection that has not proved itself within ``timeout``
seconds. Confidentiality is TLS's job: run the same protocol over an
``ssl:`` endpoint (mutual TLS is configured there, not here).

Subclass :class:`NodeAMP` and declare responders as usual; they are only
reachable once the peer is authenticated, and ``self.peer_node`` names it
(on both ends).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from typing import Any, cast

from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.protocols import amp

__all__ = [
    "AuthenticationFailed",
    "Authenticate",
    "NodeAMP",
    "NodeCommand",
    "NotAuthenticated",
    "Prove",
    "make_proof",
]

_log = Logger()
NONCE_BYTES = 16
DEFAULT_TIMEOUT = 10.0


class AuthenticationFailed(Exception):
    """A proof did not match: the peer does not hold the cluster secret."""


class NotAuthenticated(Exception):
    """A command arrived before the sender proved it holds the cluster secret."""


class NodeCommand(amp.Command):
    """The base of every command between nodes: the refusal of an unproved peer is known to it."""

    fatalErrors = {NotAuthenticated: b"NOT_AUTHENTICATED"}


class Authenticate(amp.Command):
    """The dialler's opening: who it is and its nonce; the answer proves the listener."""

    arguments = [(b"node", amp.Unicode()), (b"nonce", amp.String())]
    response = [(b"node", amp.Unicode()), (b"nonce", amp.String()), (b"proof", amp.String())]
    errors = {AuthenticationFailed: b"AUTHENTICATION_FAILED"}
    fatalErrors = {AuthenticationFailed: b"AUTHENTICATION_FAILED"}


class Prove(amp.Command):
    """The dialler's proof; after it, the connection carries the node's commands."""

    arguments = [(b"proof", amp.String())]
    response = []  # type: ignore[misc]
    fatalErrors = {AuthenticationFailed: b"AUTHENTICATION_FAILED"}


def make_proof(
    secret: bytes, side: bytes, nonce_c: bytes, nonce_s: bytes, node_c: str, node_s: str
) -> bytes:
    """HMAC-SHA256 over one side's view of the exchange."""
    ids = (node_c.encode("utf-8"), node_s.encode("utf-8"))
    message = b"\0".join((side, nonce_c, nonce_s, *ids))
    return hmac.new(secret, message, hashlib.sha256).digest()


class NodeAMP(amp.AMP):
    """An AMP connection that carries nothing until both ends have proved the secret."""

    def __init__(
        self,
        secret: bytes,
        node_id: str,
        clock: IReactorTime,
        *,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        super().__init__()
        self._secret = secret
        self.node_id = node_id
        self._clock = clock
        self._timeout = timeout
        self._timer: IDelayedCall | None = None
        self._pending: tuple[str, bytes, bytes] | None = None
        #: The authenticated peer's node id, once ``Prove`` has succeeded (either side).
        self.peer_node: str | None = None

    def connectionMade(self) -> None:
        super().connectionMade()
        self._timer = self._clock.callLater(self._timeout, self._timed_out)

    def connectionLost(self, reason: Any = None) -> None:
        self._stop_timer()
        super().connectionLost(reason)

    def locateResponder(self, name: bytes) -> Any:
        if self.peer_node is None and name not in (b"Authenticate", b"Prove"):
            return self._refuse_unauthenticated
        return super().locateResponder(name)

    # -- the dialling side --------------------------------------------------------------

    def authenticate(self) -> Deferred[str]:
        """Prove ourselves and check the listener: fires with the listener's node id.

        Fails with :class:`AuthenticationFailed` (and hangs up) when the
        listener's proof is wrong, or with the listener's refusal.
        """
        nonce_c = secrets.token_bytes(NONCE_BYTES)
        d = self.callRemote(Authenticate, node=self.node_id, nonce=nonce_c)

        listener: list[str] = []

        def check(answer: dict[str, Any]) -> Deferred[dict[str, Any]]:
            node_s, nonce_s, theirs = answer["node"], answer["nonce"], answer["proof"]
            expected = make_proof(self._secret, b"server", nonce_c, nonce_s, self.node_id, node_s)
            if len(nonce_s) != NONCE_BYTES or not hmac.compare_digest(theirs, expected):
                cast(Any, self.transport).loseConnection()
                raise AuthenticationFailed("the peer does not hold the cluster secret")
            listener.append(node_s)
            mine = make_proof(self._secret, b"client", nonce_c, nonce_s, self.node_id, node_s)
            return self.callRemote(Prove, proof=mine)

        def done(_: object) -> str:
            self._stop_timer()
            self.peer_node = listener[0]
            return listener[0]

        return d.addCallback(check).addCallback(done)

    # -- the listening side -------------------------------------------------------------

    @Authenticate.responder
    def _authenticate(self, node: str, nonce: bytes) -> dict[str, Any]:
        if self._pending is not None or self.peer_node is not None:
            raise AuthenticationFailed("authentication already under way")
        if len(nonce) != NONCE_BYTES or not node or len(node) > 128:
            raise AuthenticationFailed("malformed authentication request")
        nonce_s = secrets.token_bytes(NONCE_BYTES)
        self._pending = (node, nonce, nonce_s)
        mine = make_proof(self._secret, b"server", nonce, nonce_s, node, self.node_id)
        return {"node": self.node_id, "nonce": nonce_s, "proof": mine}

    @Prove.responder
    def _prove(self, proof: bytes) -> dict[str, Any]:
        pending, self._pending = self._pending, None
        if pending is None:
            raise AuthenticationFailed("Prove before Authenticate")
        node, nonce_c, nonce_s = pending
        expected = make_proof(self._secret, b"client", nonce_c, nonce_s, node, self.node_id)
        if not hmac.compare_digest(proof, expected):
            _log.warn("refused node {node!r}: it does not hold the cluster secret", node=node)
            raise AuthenticationFailed("the proof does not match the cluster secret")
        self._stop_timer()
        self.peer_node = node
        return {}

    def _refuse_unauthenticated(self, box: amp.AmpBox) -> Deferred[amp.AmpBox]:
        _log.warn(
            "refused {command!r} from an unauthenticated peer {peer}",
            command=box.get(b"_command", b"?"),
            peer=self.transport.getPeer() if self.transport else None,
        )
        return fail(
            amp.RemoteAmpError(b"NOT_AUTHENTICATED", "prove the cluster secret first", fatal=True)
        )

    def _timed_out(self) -> None:
        self._timer = None
        if self.peer_node is None and self.transport is not None:
            _log.warn("dropped a peer that did not authenticate in {t} s", t=self._timeout)
            cast(Any, self.transport).abortConnection()

    def _stop_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
