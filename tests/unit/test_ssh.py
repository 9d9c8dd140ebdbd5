"""Git over SSH (gitstratum.frontend.ssh): host keys, login, exec parsing, sessions, flow control.

The server runs its real Conch stack against a Conch client over ``iosim``
(no sockets), on real LMDB stores, with a ``Clock`` for the login timeout.
Tests about the channel itself run a small recording protocol in place of
the git engine (``make_ssh_factory(stream_factory=...)``); the tests at the
end run the real ``GitStreamProtocol`` over the same stack.
"""

from __future__ import annotations

import os
import stat
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from hypothesis import given
from hypothesis import strategies as st
from twisted.conch.error import ValidPublicKey
from twisted.conch.ssh import common
from twisted.conch.ssh.channel import SSHChannel
from twisted.conch.ssh.connection import SSHConnection
from twisted.conch.ssh.keys import Key
from twisted.conch.ssh.transport import SSHClientTransport
from twisted.conch.ssh.userauth import SSHUserAuthClient
from twisted.cred.credentials import SSHPrivateKey
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IPushProducer
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs
from twisted.python.failure import Failure
from twisted.test.iosim import IOPump, connectedServerAndClient
from zope.interface import implementer

from gitstratum.core.limits import Limits
from gitstratum.core.pktline import FLUSH_PKT, PktLineDecoder, Special, pkt_line
from gitstratum.frontend.auth import Authorizer, ssh_fingerprint
from gitstratum.frontend.metrics import Metrics
from gitstratum.frontend.ssh import (
    HIGH_WATER,
    CommandError,
    GitCommand,
    GitSSHTransport,
    GitUserAuthServer,
    HostKeyError,
    NotAGitCommand,
    SSHGitContext,
    SSHKeyChecker,
    host_key_fingerprints,
    load_or_create_host_keys,
    make_ssh_factory,
    parse_exec,
    shell_refusal,
)
from gitstratum.frontend.stream import GitBackend
from gitstratum.frontend.threads import inline_runner
from gitstratum.protocol.ingest import PushProcessor
from gitstratum.protocol.upload_service import UploadPackService
from gitstratum.storage.interfaces import Permission, SSHKey
from gitstratum.storage.lmdb_metadata import LMDBMetadataStore
from gitstratum.storage.lmdb_objects import LMDBObjectStore
from gitstratum.testing.fixtures import git, import_git_repo, make_small_repo
from gitstratum.testing.streams import RecordingRunner, RecordingStream, recording_stream_factory

PRIVATE = "alice/proj"
PUBLIC = "alice/open"

# OpenSSH 9.2's default client preferences, restricted to what Conch implements.
OPENSSH_KEX = [b"curve25519-sha256", b"curve25519-sha256@libssh.org", b"ecdh-sha2-nistp256"]
OPENSSH_CIPHERS = [b"aes128-ctr", b"aes192-ctr", b"aes256-ctr"]
OPENSSH_MACS = [b"hmac-sha2-256", b"hmac-sha2-512", b"hmac-sha1"]
OPENSSH_HOST_KEYS = [b"ssh-ed25519", b"rsa-sha2-512", b"rsa-sha2-256"]


# -- keys ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def host_keys(tmp_path_factory: pytest.TempPathFactory) -> dict[bytes, Key]:
    return load_or_create_host_keys(str(tmp_path_factory.mktemp("hostkeys")))


def _ed25519() -> Key:
    return Key(ed25519.Ed25519PrivateKey.generate())


@pytest.fixture(scope="module")
def user_keys() -> dict[str, Key]:
    """A private key per name; "dave" has an RSA key, "stranger"'s is never registered."""
    keys = {name: _ed25519() for name in ("alice", "bob", "carol", "stranger", "admin")}
    keys["dave"] = Key(rsa.generate_private_key(public_exponent=65537, key_size=2048))
    return keys


# -- host keys -----------------------------------------------------------------------------


def test_host_keys_are_created_once_with_mode_0600_and_reused(tmp_path: Path) -> None:
    """First start writes an ed25519 and an RSA-3072 key (0600, OpenSSH format); later starts reuse them."""
    data_dir = tmp_path / "data"
    first = load_or_create_host_keys(str(data_dir))
    assert list(first) == [b"ssh-ed25519", b"ssh-rsa"]
    assert first[b"ssh-rsa"].size() == 3072
    files = {}
    for name in ("ssh_host_ed25519_key", "ssh_host_rsa_key"):
        path = data_dir / name
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        files[name] = path.read_bytes()
        assert files[name].startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
    assert sorted(os.listdir(data_dir)) == ["ssh_host_ed25519_key", "ssh_host_rsa_key"]
    second = load_or_create_host_keys(str(data_dir))
    assert host_key_fingerprints(second) == host_key_fingerprints(first)
    for name, data in files.items():
        assert (data_dir / name).read_bytes() == data


def test_host_key_fingerprints_match_ssh_keygen_form(tmp_path: Path) -> None:
    """Fingerprints are OpenSSH's unpadded SHA256 of each public key blob."""
    keys = load_or_create_host_keys(str(tmp_path))
    prints = host_key_fingerprints(keys)
    for kind, key in keys.items():
        assert prints[kind] == ssh_fingerprint(key.public().blob())
        assert prints[kind].startswith("SHA256:") and not prints[kind].endswith("=")


def test_an_existing_host_key_is_kept_and_only_the_missing_one_made(tmp_path: Path) -> None:
    """A key already on disk (e.g. written by a concurrent start) wins over a new one."""
    mine = Key(ed25519.Ed25519PrivateKey.generate())
    path = tmp_path / "ssh_host_ed25519_key"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(mine.toString("OPENSSH"))
    keys = load_or_create_host_keys(str(tmp_path))
    assert keys[b"ssh-ed25519"].public().blob() == mine.public().blob()
    assert (tmp_path / "ssh_host_rsa_key").exists()


def test_a_host_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    """Like sshd, a host key file with group or other permissions is not used."""
    load_or_create_host_keys(str(tmp_path))
    os.chmod(tmp_path / "ssh_host_rsa_key", 0o644)
    with pytest.raises(HostKeyError, match="too open"):
        load_or_create_host_keys(str(tmp_path))


def test_a_host_key_file_of_the_wrong_type_is_refused(tmp_path: Path) -> None:
    """An RSA key where the ed25519 key belongs is an error, not silently used."""
    load_or_create_host_keys(str(tmp_path))
    rsa_bytes = (tmp_path / "ssh_host_rsa_key").read_bytes()
    (tmp_path / "ssh_host_ed25519_key").write_bytes(rsa_bytes)
    with pytest.raises(HostKeyError, match="ssh-ed25519"):
        load_or_create_host_keys(str(tmp_path))


def test_a_corrupt_host_key_file_is_refused(tmp_path: Path) -> None:
    """Garbage in a host key file stops the start with the file named."""
    path = tmp_path / "ssh_host_ed25519_key"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(b"not a key\n")
    with pytest.raises(HostKeyError, match="ssh_host_ed25519_key"):
        load_or_create_host_keys(str(tmp_path))


# -- exec parsing --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        (b"git-upload-pack 'alice/proj.git'", GitCommand("upload-pack", PRIVATE)),
        (b"git-upload-pack '/alice/proj.git'", GitCommand("upload-pack", PRIVATE)),
        (b"git-upload-pack '/alice/proj'", GitCommand("upload-pack", PRIVATE)),
        (b"git-upload-pack '~/alice/proj.git'", GitCommand("upload-pack", PRIVATE)),
        (b"git-upload-pack '~alice/proj'", GitCommand("upload-pack", PRIVATE)),
        (b"git-upload-pack alice/proj.git", GitCommand("upload-pack", PRIVATE)),
        (b"git-receive-pack 'alice/proj.git'", GitCommand("receive-pack", PRIVATE)),
        (b"git upload-pack 'alice/proj.git'", GitCommand("upload-pack", PRIVATE)),
        (b"git receive-pack '/alice/proj.git'", GitCommand("receive-pack", PRIVATE)),
        (b"git-upload-pack  \t'alice/proj.git'  ", GitCommand("upload-pack", PRIVATE)),
        (
            b"GIT_PROTOCOL=version=2 git-upload-pack 'alice/proj.git'",
            GitCommand("upload-pack", PRIVATE, b"version=2"),
        ),
        (
            b"GIT_PROTOCOL=version=2:object-format=sha1 git upload-pack 'alice/proj'",
            GitCommand("upload-pack", PRIVATE, b"version=2:object-format=sha1"),
        ),
        (b"git-upload-pack 'a'\\''b/c_d.git'", GitCommand("upload-pack", "a'b/c_d")),
        (b"git-upload-pack 'o/x'", GitCommand("upload-pack", "o/x")),
        (b"git-upload-pack 'O-1/n.a.m.e'", GitCommand("upload-pack", "O-1/n.a.m.e")),
    ],
)
def test_exec_commands_git_sends_are_understood(command: bytes, expected: GitCommand) -> None:
    """Every form git (and people) send names the service and OWNER/NAME; a prefix sets GIT_PROTOCOL."""
    if "'" in expected.repo:
        # git quotes a ' as '\''; the unquoted name is still checked like any other.
        with pytest.raises(CommandError, match="Invalid repository path"):
            parse_exec(command)
        return
    assert parse_exec(command) == expected


@pytest.mark.parametrize(
    ("command", "message"),
    [
        (b"git-upload-pack '../alice/proj.git'", "Invalid repository path"),
        (b"git-upload-pack 'alice/../etc'", "Invalid repository path"),
        (b"git-upload-pack '/alice/proj/..'", "Invalid repository path"),
        (b"git-upload-pack 'alice/..'", "Invalid repository path"),
        (b"git-upload-pack 'alice\\proj'", "Invalid repository path"),
        (b"git-upload-pack 'alice/proj.git.git'", "Invalid repository path"),
        (b"git-upload-pack '/srv/git/alice/proj.git'", "Invalid repository path"),
        (b"git-upload-pack 'alice'", "Invalid repository path"),
        (b"git-upload-pack 'alice/'", "Invalid repository path"),
        (b"git-upload-pack '//alice/proj'", "Invalid repository path"),
        (b"git-upload-pack ''", "Invalid repository path"),
        (b"git-upload-pack '.hidden/x'", "Invalid repository path"),
        (b"git-upload-pack 'alice/proj", "unclosed quote"),
        (b"git-upload-pack 'alice/proj.git''", "bad quoting"),
        (b'git-upload-pack "alice/proj.git"', "bad quoting"),
        (b"git-upload-pack alice/'proj'", "bad quoting"),
        (b"git-upload-pack 'alice/'proj", "bad quoting"),
        (b"git-upload-pack 'alice/proj'\\x", "bad quoting"),
        (b"git-upload-pack 'a'\\'", "bad quoting"),
        (b"git-upload-pack alice\\ proj", "bad quoting"),
        (b"git-upload-pack", "takes one repository path"),
        (b"git-upload-pack 'alice/proj' 'bob/proj'", "takes one repository path"),
        (b"git-upload-pack --stateless-rpc 'alice/proj'", "takes one repository path"),
        (b"git-upload-pack 'alice/proj'\x00", "control characters"),
        (b"git-upload-pack 'alice/proj'\n; rm -rf /", "control characters"),
        (b"git-upload-pack '\x00/x'", "control characters"),
        (b"git-upload-pack '\xff'", "not UTF-8"),
    ],
)
def test_malformed_or_hostile_git_commands_are_refused(command: bytes, message: str) -> None:
    """Bad quoting, traversal, NUL, backslash and anything but OWNER/NAME are refused by parsing alone."""
    with pytest.raises(CommandError, match=message) as info:
        parse_exec(command)
    assert str(info.value).startswith("ERROR: ")
    assert "\n" not in str(info.value) and "\x00" not in str(info.value)


@pytest.mark.parametrize(
    "command",
    [
        b"ls",
        b"",
        b"   ",
        b"bash",
        b"git status",
        b"git",
        b"git-upload-archive 'alice/proj.git'",
        b"FOO=1 git-upload-pack 'alice/proj.git'",
        b"'GIT_PROTOCOL=version=2' git-upload-pack 'alice/proj.git'",
        b"sh -c 'git-upload-pack alice/proj'",
        b"scp -f /etc/passwd",
    ],
)
def test_other_commands_are_not_git_commands(command: bytes) -> None:
    """Programs other than the two git services are told apart from malformed git commands."""
    with pytest.raises(NotAGitCommand):
        parse_exec(command)


def sq_quote(text: str) -> str:
    """git's sq_quote_buf: single quotes, with ' and ! escaped outside them."""
    return "'" + text.replace("'", "'\\''").replace("!", "'\\!'") + "'"


# A name ending in "." would make "..git": refused like any path holding "..".
_PART = st.from_regex(r"\A[A-Za-z0-9_][A-Za-z0-9._-]{0,20}\Z").filter(
    lambda p: ".." not in p and not p.endswith((".git", "."))
)


@given(owner=_PART, name=_PART, prefix=st.sampled_from(["", "/", "~/", "~"]), git=st.booleans())
def test_any_valid_name_quoted_by_git_parses_back(
    owner: str, name: str, prefix: str, git: bool
) -> None:
    """Whatever OWNER/NAME git quotes (with any accepted prefix and suffix) comes back unchanged."""
    path = prefix + f"{owner}/{name}" + (".git" if git else "")
    command = f"git-upload-pack {sq_quote(path)}".encode()
    assert parse_exec(command) == GitCommand("upload-pack", f"{owner}/{name}")


@given(
    path=st.text(alphabet=st.sampled_from("ab/.~!'\\\x00 "), max_size=20).filter(
        lambda p: ".." in p or "\\" in p or "\x00" in p
    )
)
def test_traversal_nul_or_backslash_is_never_accepted(path: str) -> None:
    """No path containing "..", NUL or a backslash parses, however it is quoted."""
    with pytest.raises(CommandError):
        parse_exec(f"git-receive-pack {sq_quote(path)}".encode())


def test_shell_refusal_is_github_s_greeting() -> None:
    """The greeting names the user and says there is no shell, on one line."""
    assert shell_refusal("ci") == (
        b"Hi ci! You've successfully authenticated, but GitStratum does not provide shell access.\n"
    )


# -- the world: stores, users and a server factory -----------------------------------------


def run_until(link: Link, runner: RecordingRunner, name: str) -> None:
    """Let held runner calls finish, one at a time, until a call to *name* is the one waiting."""
    for _ in range(20):
        link.flush()
        if name in runner.waiting():
            return
        runner.release_one()
    raise AssertionError(f"{name} was never called; waiting: {runner.waiting()}")


@implementer(IPushProducer)
@attrs.define
class CountingProducer:
    """A push producer that records pauses and resumes."""

    events: list[str] = attrs.field(factory=list)

    def pauseProducing(self) -> None:
        self.events.append("pause")

    def resumeProducing(self) -> None:
        self.events.append("resume")

    def stopProducing(self) -> None:
        self.events.append("stop")


@attrs.define
class World:
    """Real stores with users of each access level, and an SSH factory over them."""

    metadata: LMDBMetadataStore
    objects: LMDBObjectStore
    runner: RecordingRunner
    metrics: Metrics
    clock: Clock
    keys: dict[str, Key]
    host_keys: dict[bytes, Key]
    spool_dir: str
    streams: list[RecordingStream] = attrs.field(factory=list)
    factory: Any = None

    @property
    def backend(self) -> GitBackend:
        limits = Limits()
        return GitBackend(
            metadata=self.metadata,
            upload=UploadPackService(self.metadata, self.objects, limits),
            push=PushProcessor(self.metadata, self.objects, limits),
            run=self.runner,
            limits=limits,
            metrics=self.metrics,
            spool_dir=self.spool_dir,
            clock=lambda: self.clock.seconds(),
        )

    def make_factory(self, *, real_git: bool = False, **kwargs: Any) -> Any:
        """A started factory; sessions run RecordingStream unless *real_git*."""
        if not real_git:
            kwargs.setdefault("stream_factory", recording_stream_factory(self.streams))
        factory = make_ssh_factory(
            self.backend,
            Authorizer(self.metadata),
            self.host_keys,
            clock=self.clock,
            **kwargs,
        )
        factory.doStart()
        return factory


@pytest.fixture(scope="module")
def source_repo(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_small_repo(str(tmp_path_factory.mktemp("src") / "small.git"))


@pytest.fixture
def world(
    tmp_path: Path, host_keys: dict[bytes, Key], user_keys: dict[str, Key], source_repo: str
) -> Iterator[World]:
    metadata = LMDBMetadataStore(str(tmp_path / "meta"))
    objects = LMDBObjectStore(str(tmp_path / "objects"))
    for name, public in ((PRIVATE, False), (PUBLIC, True)):
        import_git_repo(
            source_repo, metadata, objects, metadata.create_repository(name, public=public)
        )
    for name in ("alice", "bob", "carol", "dave"):
        metadata.create_user(name)
    metadata.create_user("admin", is_admin=True)
    for name in ("alice", "bob", "carol", "dave", "admin"):
        blob = user_keys[name].public().blob()
        metadata.add_ssh_key(SSHKey(user=name, fingerprint=ssh_fingerprint(blob), blob=blob))
    metadata.grant("alice", PRIVATE, Permission.WRITE)
    metadata.grant("alice", PUBLIC, Permission.WRITE)
    metadata.grant("bob", PRIVATE, Permission.READ)
    metadata.grant("dave", PRIVATE, Permission.READ)
    spool = tmp_path / "spool"
    spool.mkdir()
    w = World(
        metadata, objects, RecordingRunner(), Metrics(), Clock(), user_keys, host_keys, str(spool)
    )
    w.factory = w.make_factory()
    yield w
    w.factory.doStop()
    metadata.close()
    objects.close()


# -- a Conch client ------------------------------------------------------------------------


@attrs.define
class Seen:
    """What the client saw on one session channel."""

    out: bytearray = attrs.field(factory=bytearray)
    err: bytearray = attrs.field(factory=bytearray)
    status: int | None = None
    eof: bool = False
    closed: bool = False
    replies: list[tuple[bytes, bool]] = attrs.field(factory=list)
    open_failed: str | None = None
    events: list[str] = attrs.field(factory=list)


class ClientSession(SSHChannel):
    name = b"session"

    def __init__(self, requests: list[tuple[bytes, bytes]], seen: Seen, **kwargs: Any):
        super().__init__(**kwargs)
        self.requests = requests
        self.seen = seen

    def channelOpen(self, specificData: bytes) -> None:
        assert self.conn is not None
        for kind, payload in self.requests:
            d = self.conn.sendRequest(self, kind, payload, wantReply=1)
            d.addCallbacks(
                lambda _, k=kind: self._reply(k, True),
                lambda _, k=kind: self._reply(k, False),
            )

    def _reply(self, kind: bytes, ok: bool) -> None:
        self.seen.replies.append((kind, ok))
        self.seen.events.append("reply")

    def openFailed(self, reason: Any) -> None:
        self.seen.open_failed = str(reason)

    def dataReceived(self, data: bytes) -> None:
        self.seen.out += data
        self.seen.events.append("data")

    def extReceived(self, dataType: int, data: bytes) -> None:
        self.seen.err += data
        self.seen.events.append("stderr")

    def request_exit_status(self, data: bytes) -> int:
        (self.seen.status,) = struct.unpack(">L", data)
        self.seen.events.append("exit-status")
        return 1

    def eofReceived(self) -> None:
        self.seen.eof = True
        self.seen.events.append("eof")

    def closed(self) -> None:
        self.seen.closed = True
        self.seen.events.append("closed")


class ClientConnection(SSHConnection):
    def __init__(self, channels: list[ClientSession]):
        super().__init__()
        self.to_open = channels
        self.hold_window = False
        self.held: dict[Any, int] = {}

    def serviceStarted(self) -> None:
        for channel in self.to_open:
            self.openChannel(channel)

    def adjustWindow(self, channel: Any, bytesToAdd: int) -> None:
        # A client that stops reading: it grants the server no more window until released.
        if self.hold_window:
            # Conch asks for the whole deficit each time, so the latest request is the one owed.
            self.held[channel] = bytesToAdd
            return
        super().adjustWindow(channel, bytesToAdd)

    def release_window(self) -> None:
        self.hold_window = False
        held, self.held = self.held, {}
        for channel, n in held.items():
            super().adjustWindow(channel, n)


class ClientAuth(SSHUserAuthClient):
    def __init__(self, user: bytes, instance: Any, keys: list[Key]):
        super().__init__(user, instance)
        self.keys = list(keys)
        self.offered = 0
        self.current: Key | None = None
        self.succeeded = False

    def getPublicKey(self) -> Key | None:
        if not self.keys:
            return None
        self.current = self.keys.pop(0)
        self.offered += 1
        return self.current.public()

    def getPrivateKey(self) -> Deferred[Key]:
        assert self.current is not None
        return defer.succeed(self.current)

    def getPassword(self, prompt: Any = None) -> Any:
        return None

    def ssh_USERAUTH_SUCCESS(self, packet: bytes) -> None:
        self.succeeded = True
        super().ssh_USERAUTH_SUCCESS(packet)


class IdleAuth(SSHUserAuthClient):
    """A client that starts user auth and then never tries a method."""

    def serviceStarted(self) -> None:
        pass


class ClientTransport(SSHClientTransport):
    supportedPublicKeys = OPENSSH_HOST_KEYS
    supportedKeyExchanges = OPENSSH_KEX
    supportedCiphers = OPENSSH_CIPHERS
    supportedMACs = OPENSSH_MACS

    def __init__(
        self, user: bytes, keys: list[Key], channels: list[ClientSession], authenticate: bool
    ):
        self.user = user
        self.keys = keys
        self.connection = ClientConnection(channels)
        self.authenticate = authenticate
        self.auth: ClientAuth | None = None
        self.host_key: bytes | None = None
        self.disconnected: tuple[int, bytes] | None = None
        self.lost = False

    def verifyHostKey(self, hostKey: bytes, fingerprint: bytes) -> Deferred[bool]:
        self.host_key = hostKey
        return defer.succeed(True)

    def connectionSecure(self) -> None:
        if self.authenticate:
            self.auth = ClientAuth(self.user, self.connection, self.keys)
            self.requestService(self.auth)

    def receiveError(self, reasonCode: int, description: bytes) -> None:
        self.disconnected = (reasonCode, description)
        super().receiveError(reasonCode, description)

    def connectionLost(self, reason: Any = None) -> None:
        self.lost = True
        super().connectionLost(reason)


@attrs.define
class Link:
    client: ClientTransport
    server: GitSSHTransport
    pump: IOPump

    def flush(self) -> None:
        self.pump.flush()


def connect(
    world: World,
    *sessions: list[tuple[bytes, bytes]],
    keys: list[str] | None = None,
    login: bytes = b"git",
    authenticate: bool = True,
    factory: Any = None,
) -> tuple[Link, list[Seen]]:
    """Connect a client logging in with *keys* (default alice's) and open one channel per request list."""
    seen = [Seen() for _ in sessions]
    channels = [ClientSession(requests, s) for requests, s in zip(sessions, seen, strict=True)]
    key_objects = [world.keys[k] for k in (keys if keys is not None else ["alice"])]
    server_factory = factory or world.factory
    client, server, pump = connectedServerAndClient(
        lambda: server_factory.buildProtocol(None),
        lambda: ClientTransport(login, key_objects, channels, authenticate),
        greet=False,
    )
    link = Link(client, server, pump)
    link.flush()
    return link, seen


def exec_(command: bytes) -> tuple[bytes, bytes]:
    return (b"exec", common.NS(command))


def env(name: bytes, value: bytes) -> tuple[bytes, bytes]:
    return (b"env", common.NS(name) + common.NS(value))


SHELL = (b"shell", b"")
PTY = (b"pty-req", common.NS(b"xterm") + struct.pack(">4L", 80, 24, 0, 0) + common.NS(b""))


# -- login ---------------------------------------------------------------------------------


def _credentials(key: Key, data: bytes | None, signer: Key | None = None) -> SSHPrivateKey:
    blob = key.public().blob()
    algorithm = key.public().sshType()
    signature = (signer or key).sign(data) if data is not None else None
    return SSHPrivateKey(b"git", algorithm, blob, data, signature)


def _outcome(d: Deferred[Any]) -> Any:
    results: list[Any] = []
    d.addBoth(results.append)
    (result,) = results
    return result


def test_checker_accepts_a_registered_key_with_a_good_signature(world: World) -> None:
    """A valid signature by a registered key logs in as the key's owner, whatever the login name."""
    checker = SSHKeyChecker(world.metadata, inline_runner)
    for name in ("alice", "dave"):  # ed25519 and RSA
        creds = _credentials(world.keys[name], b"session data")
        assert _outcome(checker.requestAvatarId(creds)) == name.encode()


def test_checker_asks_for_a_signature_for_a_registered_key(world: World) -> None:
    """A registered key offered without a signature answers ValidPublicKey, so the client signs."""
    checker = SSHKeyChecker(world.metadata, inline_runner)
    result = _outcome(checker.requestAvatarId(_credentials(world.keys["bob"], None)))
    assert isinstance(result, Failure) and result.check(ValidPublicKey)


@pytest.mark.parametrize("signed", [False, True])
def test_checker_refuses_an_unknown_key(world: World, signed: bool) -> None:
    """A key nobody registered is refused, with or without a signature."""
    checker = SSHKeyChecker(world.metadata, inline_runner)
    creds = _credentials(world.keys["stranger"], b"data" if signed else None)
    result = _outcome(checker.requestAvatarId(creds))
    assert isinstance(result, Failure) and result.check(UnauthorizedLogin)


def test_checker_refuses_a_signature_by_another_key(world: World) -> None:
    """Presenting bob's public key with a signature made by the stranger's key fails."""
    checker = SSHKeyChecker(world.metadata, inline_runner)
    creds = _credentials(world.keys["bob"], b"data", signer=world.keys["stranger"])
    result = _outcome(checker.requestAvatarId(creds))
    assert isinstance(result, Failure) and result.check(UnauthorizedLogin)


@pytest.mark.parametrize("signature", [b"", b"\x00\x00\x00\x0bssh-ed25519", b"\xff" * 7, b"x" * 40])
def test_checker_refuses_garbage_signatures(world: World, signature: bytes) -> None:
    """A signature that does not even parse is a failed login, never an exception."""
    checker = SSHKeyChecker(world.metadata, inline_runner)
    key = world.keys["alice"].public()
    creds = SSHPrivateKey(b"git", key.sshType(), key.blob(), b"data", signature)
    result = _outcome(checker.requestAvatarId(creds))
    assert isinstance(result, Failure) and result.check(UnauthorizedLogin)


def test_login_with_a_registered_key_over_ssh(world: World) -> None:
    """The full handshake with a registered key authenticates; the host key offered is ours."""
    link, _ = connect(world, [exec_(b"git-upload-pack 'alice/proj.git'")])
    assert link.client.auth is not None and link.client.auth.succeeded
    assert link.client.host_key == world.host_keys[b"ssh-ed25519"].public().blob()
    assert world.streams[0].user == "alice"


def test_only_publickey_login_is_offered(world: World) -> None:
    """The server lists "publickey" as its only method: no password, no keyboard-interactive."""
    link, seen = connect(world, [exec_(b"git-upload-pack 'alice/proj.git'")], keys=["stranger"])
    userauth = link.server.service
    assert isinstance(userauth, GitUserAuthServer)
    assert userauth.supportedAuthentications == [b"publickey"]
    assert link.client.auth is not None and not link.client.auth.succeeded
    assert world.streams == [] and seen[0].out == b""


def test_unknown_key_is_refused_and_nothing_runs(world: World) -> None:
    """A client whose only key is unregistered gets no session; the client gives up and disconnects."""
    link, seen = connect(world, [exec_(b"git-upload-pack 'alice/public.git'")], keys=["stranger"])
    assert link.client.auth is not None and not link.client.auth.succeeded
    assert link.client.lost and world.streams == []
    assert not seen[0].closed and seen[0].status is None


def test_negotiated_algorithms_are_logged(world: World) -> None:
    """An OpenSSH-like client gets curve25519, aes128-ctr and hmac-sha2-256, and the log says so."""
    with capturedLogs() as events:
        link, _ = connect(world, [])
    assert link.server.negotiated == {
        "kex": "curve25519-sha256",
        "host_key": "ssh-ed25519",
        "cipher": "aes128-ctr",
        "mac": "hmac-sha2-256",
        "cipher_in": "aes128-ctr",
        "mac_in": "hmac-sha2-256",
    }
    lines = [e for e in events if e.get("log_format", "").startswith("SSH {peer}: kex=")]
    assert (
        len(lines) == 1
        and lines[0]["cipher"] == "aes128-ctr"
        and lines[0]["mac"] == "hmac-sha2-256"
    )


def test_server_offers_fast_algorithms_only() -> None:
    """The server's lists start with aes128-ctr, hmac-sha2-256 and curve25519, and leave out weak ones."""
    assert GitSSHTransport.supportedCiphers[0] == b"aes128-ctr"
    assert all(c.endswith(b"-ctr") for c in GitSSHTransport.supportedCiphers)
    assert GitSSHTransport.supportedMACs[0] == b"hmac-sha2-256"
    assert b"hmac-md5" not in GitSSHTransport.supportedMACs
    assert GitSSHTransport.supportedKeyExchanges[0] == b"curve25519-sha256"
    assert not any(k.endswith(b"sha1") for k in GitSSHTransport.supportedKeyExchanges)


def test_login_timeout_drops_a_client_that_never_authenticates(world: World) -> None:
    """A client that completes key exchange but never logs in is disconnected after 30 s."""
    link, _ = connect(world, [], authenticate=False)
    link.client.requestService(IdleAuth(b"git", link.client.connection))
    link.flush()
    assert link.server.service is not None and link.server.service.name == b"ssh-userauth"
    world.clock.advance(29.9)
    link.flush()
    assert link.client.disconnected is None
    world.clock.advance(0.2)
    link.flush()
    assert link.client.disconnected is not None
    assert link.client.disconnected[1] == b"you took too long"
    assert link.client.lost


def test_login_timeout_counts_from_the_tcp_connection(world: World) -> None:
    """A client that connects and never even sends its version string is dropped at the deadline."""
    server = world.factory.buildProtocol(None)
    transport = StringTransport()
    server.makeConnection(transport)
    assert transport.value().startswith(b"SSH-2.0-GitStratum\r\n")
    world.clock.advance(29)
    assert not transport.disconnecting
    world.clock.advance(1)
    assert transport.disconnecting
    server.connectionLost(Failure(ConnectionDone()))
    assert world.clock.getDelayedCalls() == []


def test_login_timeout_is_configurable_and_ends_at_login(world: World) -> None:
    """make_ssh_factory(login_timeout=...) sets the deadline; logging in cancels it."""
    factory = world.make_factory(login_timeout=5.0, idle_timeout=0)
    link, _ = connect(world, [], authenticate=False, factory=factory)
    world.clock.advance(4.9)
    link.flush()
    assert link.client.disconnected is None
    world.clock.advance(0.2)
    link.flush()
    assert link.client.disconnected is not None
    link2, _ = connect(world, [], factory=factory)
    assert link2.client.auth is not None and link2.client.auth.succeeded
    assert world.clock.getDelayedCalls() == []
    world.clock.advance(100)
    link2.flush()
    assert link2.client.disconnected is None and not link2.client.lost
    factory.doStop()


def elapse(world: World, link: Link, seconds: float) -> None:
    """Let *seconds* pass in half-second steps, as a reactor would, flushing the link after each."""
    for _ in range(round(seconds * 2)):
        world.clock.advance(0.5)
        link.flush()


def test_a_logged_in_connection_running_nothing_is_dropped(world: World) -> None:
    """Logged in, but no channel: disconnected within 1.25 stream_idle_timeouts, saying why."""
    factory = world.make_factory(idle_timeout=20.0)
    link, _ = connect(world, [], factory=factory)
    assert link.client.auth is not None and link.client.auth.succeeded
    elapse(world, link, 19.5)
    assert link.client.disconnected is None
    elapse(world, link, 5)
    assert link.client.disconnected is not None
    assert link.client.disconnected[1] == b"timeout: no git command for 20 s"
    assert link.client.lost and world.clock.getDelayedCalls() == []
    factory.doStop()


def test_a_channel_that_never_says_what_to_run_is_dropped(world: World) -> None:
    """A session channel with no exec request does not keep the connection alive."""
    factory = world.make_factory(idle_timeout=20.0)
    link, seen = connect(world, [env(b"GIT_PROTOCOL", b"version=2")], factory=factory)
    assert seen[0].open_failed is None and not seen[0].closed
    elapse(world, link, 25)
    assert link.client.disconnected is not None and link.client.lost


def test_a_connection_running_a_git_command_is_left_to_the_stream(world: World) -> None:
    """While a channel runs a command, the connection's own idle limit does not fire (the
    stream protocol has its own); it applies again once the channel has closed."""
    factory = world.make_factory(idle_timeout=20.0)
    link, seen = connect(world, [exec_(b"git-upload-pack 'alice/proj.git'")], factory=factory)
    assert world.streams and seen[0].status is None
    elapse(world, link, 60)
    assert link.client.disconnected is None and seen[0].status is None
    factory.doStop()


def test_sixth_failed_login_disconnects(world: World) -> None:
    """Five unknown keys still leave a sixth try; six failures end the connection (MaxAuthTries 6)."""
    strangers = [_ed25519() for _ in range(6)]
    world.keys.update({f"s{i}": k for i, k in enumerate(strangers)})
    link, _ = connect(world, [], keys=[f"s{i}" for i in range(5)] + ["alice"])
    assert link.client.auth is not None and link.client.auth.succeeded
    link2, _ = connect(world, [], keys=[f"s{i}" for i in range(6)] + ["alice"])
    assert link2.client.auth is not None and not link2.client.auth.succeeded
    assert link2.client.disconnected is not None
    assert link2.client.disconnected[1] == b"too many bad auths"
    assert link2.client.auth.offered == 6


def test_attempt_limit_is_configurable(world: World) -> None:
    """make_ssh_factory(max_auth_attempts=2) disconnects at the second failure."""
    factory = world.make_factory(max_auth_attempts=2)
    world.keys.update({"x1": _ed25519(), "x2": _ed25519()})
    link, _ = connect(world, [], keys=["x1", "x2", "alice"], factory=factory)
    assert link.client.disconnected is not None and link.client.auth is not None
    assert link.client.auth.offered == 2
    factory.doStop()


# -- sessions: refusals --------------------------------------------------------------------


def _refused(seen: Seen) -> str:
    assert seen.status == 1 and seen.eof and seen.closed and seen.out == b""
    # Every request is answered before the refusal is written and the channel closed.
    replies = len(seen.replies)
    assert seen.events == ["reply"] * replies + ["stderr", "exit-status", "eof", "closed"]
    return seen.err.decode()


def test_shell_gets_the_greeting_and_status_1(world: World) -> None:
    """``ssh git@host`` (pty then shell): the pty is refused, the shell answered with the greeting."""
    _, (seen,) = connect(world, [PTY, SHELL], keys=["bob"])
    assert seen.replies == [(b"pty-req", False), (b"shell", True)]
    assert _refused(seen) == (
        "Hi bob! You've successfully authenticated, but GitStratum does not provide shell access.\n"
    )


def test_other_commands_get_the_greeting(world: World) -> None:
    """``ssh git@host ls`` is answered like a shell, with exit status 1 and nothing looked up."""
    _, (seen,) = connect(world, [exec_(b"ls -la")])
    assert seen.replies == [(b"exec", True)]
    assert _refused(seen).startswith("Hi alice! You've successfully authenticated")
    assert "authorize" not in world.runner.calls


@pytest.mark.parametrize(
    "command",
    [
        b"git-upload-pack '../../etc/passwd'",
        b"git-receive-pack 'alice/../bob/x'",
        b"git-upload-pack 'alice/proj",
        b"git-upload-pack 'alice\\proj'",
    ],
)
def test_hostile_paths_are_refused_before_any_lookup(world: World, command: bytes) -> None:
    """Traversal and bad quoting get an ERROR line and status 1; the stores are never asked."""
    _, (seen,) = connect(world, [exec_(command)])
    message = _refused(seen)
    assert message.startswith("ERROR: Invalid ") and message.endswith("\n")
    assert world.runner.calls == ["user_for_ssh_key", "user_for_ssh_key"]
    assert world.streams == []


def test_missing_repository_is_not_found(world: World) -> None:
    """A repository that does not exist: "ERROR: Repository not found." and status 1."""
    _, (seen,) = connect(world, [exec_(b"git-upload-pack 'alice/nope.git'")])
    assert _refused(seen) == "ERROR: Repository not found.\n"


def test_private_repository_without_access_is_not_found(world: World) -> None:
    """A user with no grant cannot tell a private repository from a missing one."""
    for command in (b"git-upload-pack 'alice/proj.git'", b"git-receive-pack 'alice/proj.git'"):
        _, (seen,) = connect(world, [exec_(command)], keys=["carol"])
        assert _refused(seen) == "ERROR: Repository not found.\n"
    assert world.streams == []


def test_read_only_user_cannot_push(world: World) -> None:
    """A reader pushing gets GitHub's "Permission to OWNER/NAME.git denied to USER." and status 1."""
    _, (seen,) = connect(world, [exec_(b"git-receive-pack 'alice/proj.git'")], keys=["bob"])
    assert _refused(seen) == "ERROR: Permission to alice/proj.git denied to bob.\n"
    _, (seen,) = connect(world, [exec_(b"git-receive-pack 'alice/open.git'")], keys=["carol"])
    assert _refused(seen) == "ERROR: Permission to alice/open.git denied to carol.\n"


def test_refusals_are_counted_in_metrics(world: World) -> None:
    """Denied and not-found sessions show up in gitstratum_requests_total by service and outcome."""
    connect(world, [exec_(b"git-receive-pack 'alice/proj.git'")], keys=["bob"])
    connect(world, [exec_(b"git-upload-pack 'alice/proj.git'")], keys=["carol"])
    registry = world.metrics.registry
    labels = {"repo_class": "none"}
    denied = registry.get_sample_value(
        "gitstratum_requests_total", {**labels, "service": "receive-pack", "outcome": "denied"}
    )
    missing = registry.get_sample_value(
        "gitstratum_requests_total", {**labels, "service": "upload-pack", "outcome": "not_found"}
    )
    assert denied == 1 and missing == 1


def test_permission_is_checked_when_the_command_runs(world: World) -> None:
    """Access is looked up per command: a grant revoked after login already counts."""
    world.runner.hold = True
    link, (seen,) = connect(world, [exec_(b"git-upload-pack 'alice/proj.git'")], keys=["bob"])
    run_until(link, world.runner, "authorize")
    world.metadata.grant("bob", PRIVATE, None)
    world.runner.release_one()
    link.flush()
    assert _refused(seen) == "ERROR: Repository not found.\n"
    assert world.streams == []


def test_a_user_gone_since_login_finds_no_repository(world: World) -> None:
    """authorize() looks the user up again: a name with no user behind it gets "not found"."""
    context = SSHGitContext(world.backend, Authorizer(world.metadata))
    repo, decision = context.authorize("ghost", PUBLIC, Permission.READ)
    assert repo is None and not decision.allowed
    assert (decision.status, decision.message) == (404, "Repository not found.")
    repo, decision = context.authorize("carol", PUBLIC, Permission.READ)
    assert repo is not None and decision.allowed


# -- sessions: running git -----------------------------------------------------------------


def test_exec_starts_the_stream_with_service_repo_user_and_version(world: World) -> None:
    """An allowed exec hands the channel to the stream protocol; its first bytes reach the client."""
    _, (seen,) = connect(world, [exec_(b"git-upload-pack '/alice/proj.git'")], keys=["bob"])
    (stream,) = world.streams
    assert (stream.service, stream.repo.name, stream.user, stream.version) == (
        "upload-pack",
        PRIVATE,
        "bob",
        0,
    )
    assert seen.replies == [(b"exec", True)]
    assert seen.out == b"hello bob upload-pack alice/proj v0\n"
    assert seen.status is None and not seen.closed


@pytest.mark.parametrize(
    ("requests", "version"),
    [
        ([env(b"GIT_PROTOCOL", b"version=2"), exec_(b"git-upload-pack 'alice/proj'")], 2),
        ([exec_(b"GIT_PROTOCOL=version=2 git-upload-pack 'alice/proj'")], 2),
        ([env(b"GIT_PROTOCOL", b"version=1"), exec_(b"git upload-pack 'alice/proj'")], 0),
        ([env(b"LANG", b"C"), exec_(b"git-upload-pack 'alice/proj'")], 0),
    ],
)
def test_git_protocol_comes_from_env_or_a_prefix(
    world: World, requests: list[tuple[bytes, bytes]], version: int
) -> None:
    """GIT_PROTOCOL=version=2 in an env request or a command prefix selects v2; other env is ignored."""
    _, (seen,) = connect(world, requests)
    assert world.streams[0].version == version
    assert seen.replies[-1] == (b"exec", True)
    if requests[0] == env(b"LANG", b"C"):
        assert seen.replies[0] == (b"env", False)


def test_data_and_eof_from_the_client_reach_the_stream(world: World) -> None:
    """Bytes the client sends, then its EOF, arrive at the stream protocol in order."""
    link, _ = connect(world, [exec_(b"git-receive-pack 'alice/proj.git'")])
    (stream,) = world.streams
    channel = _client_channel(link)
    channel.write(b"0000")
    channel.write(b"more")
    link.client.connection.sendEOF(channel)
    link.flush()
    assert bytes(stream.received) == b"0000more" and stream.eof


def test_data_sent_before_the_lookup_finishes_is_held_for_the_stream(world: World) -> None:
    """Data (and EOF) that race the permission lookup reach the stream once it starts."""
    world.runner.hold = True
    link, _ = connect(world, [exec_(b"git-upload-pack 'alice/proj.git'")])
    run_until(link, world.runner, "authorize")
    channel = _client_channel(link)
    channel.write(b"early")
    link.client.connection.sendEOF(channel)
    link.flush()
    assert world.streams == []
    world.runner.release_one()
    link.flush()
    (stream,) = world.streams
    assert bytes(stream.received) == b"early" and stream.eof


def test_on_done_sends_exit_status_then_eof_and_close(world: World) -> None:
    """When the stream ends, the client gets its output, then exit-status, EOF and close."""
    link, (seen,) = connect(world, [exec_(b"git-upload-pack 'alice/proj.git'")])
    (stream,) = world.streams
    assert stream.transport is not None
    stream.transport.write(b"payload")
    stream.on_done(0)
    stream.on_done(128)  # only the first call counts
    link.flush()
    assert seen.status == 0 and seen.eof and seen.closed
    assert seen.events[-3:] == ["exit-status", "eof", "closed"]
    assert seen.out.endswith(b"payload")
    assert stream.lost is not None and stream.lost.check(ConnectionDone)


def test_exit_status_waits_for_output_held_by_the_window(world: World) -> None:
    """Output beyond the client's window is sent before exit-status, once the window grows."""
    link, (seen,) = connect(world, [exec_(b"git-upload-pack 'alice/proj.git'")])
    (stream,) = world.streams
    link.client.connection.hold_window = True
    assert stream.transport is not None
    big = bytes(range(256)) * 4096  # 1 MiB, more than Conch's client window
    stream.transport.write(big)
    stream.on_done(0)
    link.flush()
    assert seen.status is None and len(seen.out) < len(big)
    link.client.connection.release_window()
    link.flush()
    assert seen.out.endswith(big) and seen.status == 0 and seen.closed
    assert seen.events[-3:] == ["exit-status", "eof", "closed"]


def test_client_window_pauses_and_resumes_the_producer(world: World) -> None:
    """Output piling up behind a full client window pauses the producer; window adjusts resume it."""
    link, (seen,) = connect(world, [exec_(b"git-upload-pack 'alice/proj.git'")])
    (stream,) = world.streams
    transport: Any = stream.transport
    producer = CountingProducer()
    transport.registerProducer(producer, True)
    link.client.connection.hold_window = True
    data = bytes(range(256)) * (12 * 1024)  # 3 MiB: the client's window is 128 KiB
    transport.write(data)
    link.flush()
    assert producer.events == ["pause"]
    assert transport.channel.held_bytes() > HIGH_WATER
    link.client.connection.release_window()
    link.flush()
    assert producer.events == ["pause", "resume"]
    assert seen.out.endswith(data) and transport.channel.held_bytes() == 0
    transport.unregisterProducer()


def test_up_to_high_water_waits_without_pausing(world: World) -> None:
    """Up to HIGH_WATER bytes may wait for window (one chunk ready ahead) before the producer pauses."""
    link, _ = connect(world, [exec_(b"git-upload-pack 'alice/proj.git'")])
    transport: Any = world.streams[0].transport
    producer = CountingProducer()
    transport.registerProducer(producer, True)
    link.client.connection.hold_window = True
    transport.write(b"x" * (512 * 1024))
    link.flush()
    held = transport.channel.held_bytes()
    assert 0 < held <= HIGH_WATER and producer.events == []
    transport.write(b"y" * (HIGH_WATER - held + 1))
    assert producer.events == ["pause"]


def test_a_producer_registered_on_a_full_window_starts_paused(world: World) -> None:
    """Registering while the window is exhausted pauses the producer at once."""
    link, _ = connect(world, [exec_(b"git-upload-pack 'alice/proj.git'")])
    (stream,) = world.streams
    transport: Any = stream.transport
    link.client.connection.hold_window = True
    transport.write(b"x" * (3 * 1024 * 1024))
    link.flush()
    producer = CountingProducer()
    transport.registerProducer(producer, True)
    assert producer.events == ["pause"]
    with pytest.raises(RuntimeError):
        transport.registerProducer(CountingProducer(), True)


def test_pull_producers_are_refused(world: World) -> None:
    """Only streaming producers can be registered on a channel."""
    connect(world, [exec_(b"git-upload-pack 'alice/proj.git'")])
    transport: Any = world.streams[0].transport
    with pytest.raises(ValueError, match="streaming"):
        transport.registerProducer(CountingProducer(), False)


def test_pausing_the_transport_stops_the_client_s_window(world: World) -> None:
    """While the stream pauses its transport, data is held and no window is granted; resume delivers."""
    link, _ = connect(world, [exec_(b"git-receive-pack 'alice/proj.git'")])
    (stream,) = world.streams
    transport: Any = stream.transport
    server_channel = transport.channel
    transport.pauseProducing()
    channel = _client_channel(link)
    chunk = b"p" * 32768
    for _ in range(100):  # 3.2 MiB offered, more than the 2 MiB window
        channel.write(chunk)
    link.flush()
    assert bytes(stream.received) == b""
    held = sum(len(d) for d in server_channel._inbox)
    assert held <= 2 * 1024 * 1024 and len(channel.buf) >= 1024 * 1024
    transport.resumeProducing()
    link.flush()
    assert bytes(stream.received) == chunk * 100


def test_client_closing_mid_stream_stops_the_producer_and_the_stream(world: World) -> None:
    """If the client goes away, the producer is stopped and the stream told the connection was lost."""
    link, _ = connect(world, [exec_(b"git-upload-pack 'alice/proj.git'")])
    (stream,) = world.streams
    producer = CountingProducer()
    transport: Any = stream.transport
    transport.registerProducer(producer, True)
    _client_channel(link).loseConnection()
    link.flush()
    assert producer.events == ["stop"]
    assert stream.lost is not None and stream.lost.check(ConnectionLost)


def test_only_one_command_per_channel(world: World) -> None:
    """A second exec (or shell) on a channel that already runs one is refused."""
    _, (seen,) = connect(
        world,
        [
            exec_(b"git-upload-pack 'alice/proj.git'"),
            exec_(b"git-upload-pack 'alice/open.git'"),
            SHELL,
        ],
    )
    assert seen.replies == [(b"exec", True), (b"exec", False), (b"shell", False)]
    assert len(world.streams) == 1


def test_sessions_per_connection_are_bounded(world: World) -> None:
    """A connection may hold at most ten session channels at once; the eleventh is refused."""
    sessions = [[exec_(b"git-upload-pack 'alice/proj.git'")] for _ in range(11)]
    _, seen = connect(world, *sessions)
    assert [s.open_failed is None for s in seen] == [True] * 10 + [False]
    assert len(world.streams) == 10


def test_forwarding_and_subsystems_are_refused(world: World) -> None:
    """No sftp subsystem, no agent or X11 forwarding: only git runs here."""
    _, (seen,) = connect(
        world,
        [
            (b"subsystem", common.NS(b"sftp")),
            (b"auth-agent-req@openssh.com", b""),
            (
                b"x11-req",
                b"\x00" + common.NS(b"MIT-MAGIC-COOKIE-1") + common.NS(b"00") + b"\0\0\0\0",
            ),
        ],
    )
    assert seen.replies == [
        (b"subsystem", False),
        (b"auth-agent-req@openssh.com", False),
        (b"x11-req", False),
    ]


def _client_channel(link: Link) -> ClientSession:
    (channel,) = link.client.connection.channels.values()
    return channel


# -- the real git engine over SSH ----------------------------------------------------------


def _packets(data: bytes) -> list[bytes | Special]:
    decoder = PktLineDecoder()
    decoder.receive_data(data)
    return [e if isinstance(e, Special) else e.data for e in decoder.events()]


def _git_refs(git_dir: str) -> dict[bytes, bytes]:
    out = git("for-each-ref", "--format=%(objectname) %(refname)", cwd=git_dir)
    return {name: sha for sha, name in (line.split() for line in out.splitlines())}


def test_real_stream_serves_v2_ls_refs_over_ssh(world: World, source_repo: str) -> None:
    """GIT_PROTOCOL=version=2 over SSH gets v2 capabilities, ls-refs answers, a flush ends with 0."""
    factory = world.make_factory(real_git=True)
    link, (seen,) = connect(
        world,
        [env(b"GIT_PROTOCOL", b"version=2"), exec_(b"git-upload-pack '/alice/proj.git'")],
        keys=["bob"],
        factory=factory,
    )
    assert _packets(bytes(seen.out))[0] == b"version 2\n"
    seen.out.clear()
    channel = _client_channel(link)
    channel.write(pkt_line(b"command=ls-refs\n") + b"0001" + pkt_line(b"peel\n") + FLUSH_PKT)
    link.flush()
    listed = {}
    for packet in _packets(bytes(seen.out)):
        if isinstance(packet, bytes):
            oid, name = packet.rstrip(b"\n").split(b" ")[:2]
            listed[name] = oid
    expected = _git_refs(source_repo)
    assert listed.pop(b"HEAD") == expected[b"refs/heads/main"]
    assert listed == expected
    channel.write(FLUSH_PKT)
    link.flush()
    assert seen.status == 0 and seen.eof and seen.closed and seen.err == b""
    factory.doStop()


def test_real_stream_v0_ends_with_0_when_the_client_wants_nothing(
    world: World, source_repo: str
) -> None:
    """Without GIT_PROTOCOL the v0 ref advertisement comes first; a bare flush ends cleanly."""
    factory = world.make_factory(real_git=True)
    link, (seen,) = connect(
        world, [exec_(b"git upload-pack 'alice/open'")], keys=["carol"], factory=factory
    )
    packets = _packets(bytes(seen.out))
    assert isinstance(packets[0], bytes) and b"\0" in packets[0]  # refs, then capabilities
    assert packets[-1] is Special.FLUSH
    _client_channel(link).write(FLUSH_PKT)
    link.flush()
    assert seen.status == 0 and seen.closed
    factory.doStop()


def test_real_stream_applies_a_push_over_ssh(world: World, source_repo: str) -> None:
    """A writer's delete-only push through receive-pack is reported ok and changes the ref."""
    factory = world.make_factory(real_git=True)
    link, (seen,) = connect(world, [exec_(b"git-receive-pack 'alice/proj.git'")], factory=factory)
    old = _git_refs(source_repo)[b"refs/heads/feature"]
    assert old in bytes(seen.out)
    command = old + b" " + b"0" * 40 + b" refs/heads/feature\0report-status delete-refs\n"
    channel = _client_channel(link)
    channel.write(pkt_line(command) + FLUSH_PKT)
    link.flush()
    assert b"ok refs/heads/feature" in bytes(seen.out)
    assert seen.status == 0 and seen.closed
    repo = world.metadata.get_repository(PRIVATE)
    assert repo is not None
    assert b"refs/heads/feature" not in world.metadata.get_refs(repo).refs
    factory.doStop()
