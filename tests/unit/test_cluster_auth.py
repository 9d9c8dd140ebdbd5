"""Node authentication: the cluster secret file, and AMP that carries nothing until it is proved."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.task import Clock
from twisted.protocols import amp
from twisted.python.failure import Failure
from twisted.test.iosim import IOPump, connectedServerAndClient

from gitstratum.cluster import secret as secret_file
from gitstratum.cluster.auth import AuthenticationFailed, NodeAMP, NodeCommand, NotAuthenticated

SECRET = b"s" * 32


class Echo(NodeCommand):
    arguments = [(b"text", amp.Unicode())]
    response = [(b"text", amp.Unicode()), (b"peer", amp.Unicode())]


class EchoNode(NodeAMP):
    """A node with one command, to see what gets through."""

    calls: list[str]

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.calls = []

    @Echo.responder
    def echo(self, text: str) -> dict[str, str]:
        self.calls.append(text)
        return {"text": text, "peer": self.peer_node or ""}


def pair(
    server_secret: bytes = SECRET, client_secret: bytes = SECRET, timeout: float = 10.0
) -> tuple[EchoNode, EchoNode, IOPump, Clock]:
    clock = Clock()
    client, server, pump = connectedServerAndClient(
        lambda: EchoNode(server_secret, "control-1", clock, timeout=timeout),
        lambda: EchoNode(client_secret, "object-7", clock, timeout=timeout),
    )
    return client, server, pump, clock


def gone(proto: NodeAMP) -> bool:
    """The connection is closed or closing."""
    t: Any = proto.transport
    return t is None or t.disconnecting or t.disconnected


def results(d: Any) -> list[Any]:
    out: list[Any] = []
    d.addBoth(out.append)
    return out


def test_both_ends_prove_the_secret_then_commands_flow() -> None:
    """With the same secret, each end learns the other's id and commands get through."""
    client, server, pump, _ = pair()
    got = results(client.authenticate())
    pump.flush()
    assert got == ["control-1"]
    assert server.peer_node == "object-7" and client.peer_node == "control-1"
    answer = results(client.callRemote(Echo, text="hi"))
    pump.flush()
    assert answer == [{"text": "hi", "peer": "object-7"}]


def test_a_wrong_secret_is_refused_and_the_connection_dropped() -> None:
    """A dialler without the secret fails, the listener never marks it authenticated."""
    client, server, pump, _ = pair(client_secret=b"x" * 32)
    got = results(client.authenticate())
    pump.flush()
    assert isinstance(got[0], Failure) and got[0].check(AuthenticationFailed)
    assert server.peer_node is None
    assert gone(client)


def test_a_listener_without_the_secret_is_not_trusted() -> None:
    """The dialler checks the listener's proof too: an impostor listener is refused."""
    client, server, pump, _ = pair(server_secret=b"y" * 32)
    got = results(client.authenticate())
    pump.flush()
    assert isinstance(got[0], Failure) and got[0].check(AuthenticationFailed)
    assert client.peer_node is None


def test_commands_before_authentication_are_refused_and_the_peer_dropped() -> None:
    """Any command before Prove gets NOT_AUTHENTICATED, runs nothing, and ends the connection."""
    client, server, pump, _ = pair()
    got = results(client.callRemote(Echo, text="sneak"))
    pump.flush()
    assert isinstance(got[0], Failure) and got[0].check(NotAuthenticated)
    assert server.calls == []
    assert gone(server)


def test_prove_without_authenticate_is_refused() -> None:
    """A bare Prove (a replayed proof) is refused: there is no exchange for it to close."""
    from gitstratum.cluster.auth import Prove

    client, server, pump, _ = pair()
    got = results(client.callRemote(Prove, proof=b"\0" * 32))
    pump.flush()
    assert isinstance(got[0], Failure) and server.peer_node is None


def test_a_silent_peer_is_dropped_after_the_timeout() -> None:
    """A connection that never authenticates is aborted after the configured time."""
    client, server, pump, clock = pair(timeout=3.0)
    clock.advance(2.9)
    assert not server.transport.disconnecting  # type: ignore[union-attr]
    clock.advance(0.2)
    assert gone(server)


def test_an_authenticated_peer_is_not_timed_out() -> None:
    """Once proved, the connection outlives the authentication timeout."""
    client, server, pump, clock = pair(timeout=3.0)
    results(client.authenticate())
    pump.flush()
    clock.advance(60)
    assert not server.transport.disconnecting  # type: ignore[union-attr]


def test_secret_file_is_made_once_private_and_reused(tmp_path: Path) -> None:
    """load_or_create makes a 0600 secret, never replaces it, and load reads the same bytes."""
    path = str(tmp_path / "cluster-secret")
    old = os.umask(0)
    try:
        first = secret_file.load_or_create(path)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert len(first) == secret_file.SECRET_BYTES
    assert secret_file.load_or_create(path) == first == secret_file.load(path)


@pytest.mark.parametrize(
    ("content", "mode", "message"),
    [
        (None, 0o600, "no cluster secret"),
        (b"zz-not-hex\n", 0o600, "hex"),
        (b"abcd\n", 0o600, "holds 2 bytes"),
        (b"ab" * 32 + b"\n", 0o644, "readable by other users"),
    ],
)
def test_bad_secret_files_are_refused(
    tmp_path: Path, content: bytes | None, mode: int, message: str
) -> None:
    """A missing, malformed, short or world-readable secret file is a clear error."""
    path = tmp_path / "secret"
    if content is not None:
        path.write_bytes(content)
        path.chmod(mode)
    with pytest.raises(secret_file.SecretError, match=message):
        secret_file.load(str(path))
