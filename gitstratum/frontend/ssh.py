"""Git over SSH on Twisted Conch: host keys, public-key login and exec channels that run git.

A client logs in with a key registered in metadata (under any login name:
the key says who it is), opens a session channel and asks it to ``exec``
``git-upload-pack '<path>'`` or ``git-receive-pack '<path>'``.  The command
is parsed and the path checked before anything is looked up; the user's
permission is settled by the same ``Authorizer`` rule as smart HTTP; then the
channel is handed to ``GitStreamProtocol``, the in-process engine that also
serves git://.  No process is started per connection.

Backpressure runs both ways through the channel window.  When the client
stops granting window, ``ChannelTransport`` pauses the registered pack
producer; when the stream protocol pauses its transport (a push arriving
faster than it is spooled), ``GitSSHConnection`` stops granting window to
the client.
"""

from __future__ import annotations

import os
import secrets
import struct
from collections.abc import Callable, Iterable
from typing import Any, cast

import attrs
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
)
from twisted.conch.avatar import ConchUser
from twisted.conch.error import ConchError, ValidPublicKey
from twisted.conch.interfaces import IConchUser
from twisted.conch.ssh import common
from twisted.conch.ssh.channel import SSHChannel
from twisted.conch.ssh.connection import (
    EXTENDED_DATA_STDERR,
    OPEN_ADMINISTRATIVELY_PROHIBITED,
    SSHConnection,
)
from twisted.conch.ssh.factory import SSHFactory
from twisted.conch.ssh.keys import BadKeyError, Key
from twisted.conch.ssh.transport import (
    DISCONNECT_BY_APPLICATION,
    DISCONNECT_NO_MORE_AUTH_METHODS_AVAILABLE,
    SSHServerTransport,
)
from twisted.conch.ssh.userauth import SSHUserAuthServer
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import ISSHPrivateKey
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm, Portal
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import (
    IConsumer,
    IDelayedCall,
    IHalfCloseableProtocol,
    IProducer,
    IProtocol,
    IPushProducer,
    IReactorTime,
    ITransport,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from gitstratum.frontend.auth import NOT_FOUND, Authorizer, Decision, ssh_fingerprint
from gitstratum.frontend.metrics import record_request
from gitstratum.frontend.paths import valid_repo_name
from gitstratum.frontend.stream import GitBackend, GitStreamProtocol, parse_git_protocol_env
from gitstratum.frontend.threads import BlockingRunner
from gitstratum.storage.interfaces import IMetadataStore, Permission, Repository, User

__all__ = [
    "HOST_KEY_FILES",
    "HIGH_WATER",
    "HostKeyError",
    "load_or_create_host_keys",
    "host_key_fingerprints",
    "SSHKeyChecker",
    "GitCommand",
    "CommandError",
    "NotAGitCommand",
    "parse_exec",
    "repo_from_path",
    "shell_refusal",
    "SSHGitContext",
    "GitRealm",
    "GitAvatar",
    "GitSessionChannel",
    "ChannelTransport",
    "GitSSHConnection",
    "GitUserAuthServer",
    "GitSSHTransport",
    "GitSSHFactory",
    "make_ssh_factory",
]

#: (file name under the data dir, SSH key type), in the order offered to clients.
HOST_KEY_FILES = (
    ("ssh_host_ed25519_key", b"ssh-ed25519"),
    ("ssh_host_rsa_key", b"ssh-rsa"),
)
_RSA_BITS = 3072

#: The largest number of session channels one connection may hold open (OpenSSH's MaxSessions).
MAX_SESSIONS = 10

# The server's receive window per channel: OpenSSH's default, so a push is not
# throttled by window round trips.
_LOCAL_WINDOW = 2 * 1024 * 1024
_LOCAL_MAX_PACKET = 32 * 1024

#: Output that may wait for the client's window before the pack producer is paused.
HIGH_WATER = 1024 * 1024

# Fastest first among what Conch implements and OpenSSH clients offer by default.
# The client's order decides (RFC 4253 7.1), so this is what an old or unusual
# client meets; CBC ciphers, MD5 and SHA-1 key exchanges are left out.
_CIPHERS = (b"aes128-ctr", b"aes192-ctr", b"aes256-ctr")
_MACS = (b"hmac-sha2-256", b"hmac-sha2-512", b"hmac-sha1")
_KEX = (
    b"curve25519-sha256",
    b"curve25519-sha256@libssh.org",
    b"mlkem768x25519-sha256",
    b"ecdh-sha2-nistp256",
    b"ecdh-sha2-nistp384",
    b"ecdh-sha2-nistp521",
)


def _prefer(preferred: Iterable[bytes], supported: Iterable[bytes]) -> list[bytes]:
    available = set(supported)
    return [name for name in preferred if name in available]


# -- host keys -----------------------------------------------------------------------------


class HostKeyError(Exception):
    """A host key file that cannot be used (unreadable, wrong type, readable by others)."""


def _generate_host_key(kind: bytes) -> bytes:
    """A new private key of *kind* in OpenSSH's private key format."""
    key: ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey
    if kind == b"ssh-ed25519":
        key = ed25519.Ed25519PrivateKey.generate()
    else:
        key = rsa.generate_private_key(public_exponent=65537, key_size=_RSA_BITS)
    return key.private_bytes(Encoding.PEM, PrivateFormat.OpenSSH, NoEncryption())


def _create_exclusive(path: str, data: bytes) -> None:
    """Write *data* to a new 0600 file at *path*, unless another process made it first.

    The key goes to a temporary file created 0600 in one step, then is
    hard-linked into place: linking fails if *path* exists, so two servers
    starting at once agree on one key and a crash never leaves half a key.
    """
    tmp = f"{path}.{secrets.token_hex(8)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
    finally:
        os.unlink(tmp)


def _load_host_key(path: str, kind: bytes) -> Key:
    mode = os.stat(path).st_mode & 0o777
    if mode & 0o077:
        # What sshd does too: a host key others can read is no secret.
        raise HostKeyError(
            f"permissions {mode:04o} for {path!r} are too open; "
            "the host key must be readable by its owner only (chmod 600)"
        )
    with open(path, "rb") as f:
        data = f.read()
    try:
        key = Key.fromString(data)
    except BadKeyError as e:
        raise HostKeyError(f"{path!r} is not a usable SSH private key: {e}") from e
    if key.isPublic() or key.sshType() != kind:
        raise HostKeyError(f"{path!r} must hold a {kind.decode()} private key")
    return key


def load_or_create_host_keys(data_dir: str) -> dict[bytes, Key]:
    """The server's ed25519 and RSA host keys, generated on first start and reused after.

    The keys live in ``data_dir/ssh_host_ed25519_key`` and
    ``data_dir/ssh_host_rsa_key`` (OpenSSH private key format, mode 0600),
    so ``ssh-keygen -lf`` shows their fingerprints and clients'
    ``known_hosts`` entries stay valid across restarts.  The result maps
    each key type to its key, ed25519 first (the order offered to clients).
    """
    os.makedirs(data_dir, mode=0o700, exist_ok=True)
    keys: dict[bytes, Key] = {}
    for filename, kind in HOST_KEY_FILES:
        path = os.path.join(data_dir, filename)
        if not os.path.exists(path):
            _create_exclusive(path, _generate_host_key(kind))
        keys[kind] = _load_host_key(path, kind)
    return keys


def host_key_fingerprints(keys: dict[bytes, Key]) -> dict[bytes, str]:
    """Each host key's ``SHA256:...`` fingerprint, as ``ssh-keygen -l`` and ssh show it."""
    return {kind: ssh_fingerprint(key.public().blob()) for kind, key in keys.items()}


# -- login ---------------------------------------------------------------------------------


@implementer(ICredentialsChecker)
@attrs.define
class SSHKeyChecker:
    """Public-key login against the keys registered in metadata.

    The avatar id is the key owner's name (UTF-8): the login name the client
    sent (``git`` in ``git@host``) plays no part.  A key offered without a
    signature that belongs to someone raises ``ValidPublicKey``, which makes
    Conch answer ``PK_OK`` so the client goes on to sign.
    """

    metadata: IMetadataStore
    run: BlockingRunner

    credentialInterfaces = (ISSHPrivateKey,)
    _log = Logger()

    def requestAvatarId(self, credentials: Any) -> Deferred[bytes | tuple[()]]:
        fingerprint = ssh_fingerprint(credentials.blob)
        d: Deferred[User | None] = self.run(self.metadata.user_for_ssh_key, fingerprint)
        return d.addCallback(self._check, credentials, fingerprint)

    def _check(self, user: User | None, credentials: Any, fingerprint: str) -> bytes | tuple[()]:
        if user is None:
            self._log.info(
                "SSH login refused: no user has the key {fingerprint}", fingerprint=fingerprint
            )
            raise UnauthorizedLogin(f"no user has the key {fingerprint}")
        if credentials.signature is None:
            raise ValidPublicKey()
        try:
            key = Key.fromString(credentials.blob)
            good = key.verify(credentials.signature, credentials.sigData)
        except (BadKeyError, struct.error, ValueError, IndexError):
            # A blob or signature that does not even parse is a failed login, not a bug.
            good = False
        if not good:
            raise UnauthorizedLogin(f"bad signature for the key {fingerprint}")
        self._log.info(
            "SSH login by {user} with key {fingerprint}", user=user.name, fingerprint=fingerprint
        )
        return user.name.encode("utf-8")


# -- the exec command ----------------------------------------------------------------------


class CommandError(ValueError):
    """An exec command refused before any lookup; ``str()`` is the line shown to the user."""


class NotAGitCommand(ValueError):
    """An exec command that is not one of the git services (``ls``, a shell, ...)."""


@attrs.frozen
class GitCommand:
    """A parsed ``git-upload-pack '<path>'`` style command."""

    service: str  # "upload-pack" or "receive-pack"
    repo: str  # OWNER/NAME, already validated
    protocol: bytes | None = None  # the value of a GIT_PROTOCOL=... prefix, if any


_SERVICES = {"upload-pack", "receive-pack"}
_BLANKS = " \t"


def _printable(text: str) -> str:
    """*text* safe to echo to a terminal: control characters become ``?``."""
    return "".join(c if c.isprintable() else "?" for c in text)


def _split_command(command: str) -> list[tuple[str, bool]]:
    """Split *command* into words, each with whether it was quoted.

    A word is either bare (no quotes, backslashes or blanks) or quoted the
    way git quotes for a remote shell (``sq_quote``): inside single quotes
    everything is literal, and a ``'`` or ``!`` is written ``'\\''`` or
    ``'\\!'``.  Anything else (double quotes, a lone backslash, an unclosed
    quote, a quote glued to a bare word) is refused rather than guessed at.
    """
    words: list[tuple[str, bool]] = []
    i, n = 0, len(command)
    while i < n:
        c = command[i]
        if c in _BLANKS:
            i += 1
            continue
        if c != "'":
            j = i
            while j < n and command[j] not in _BLANKS:
                if command[j] in "'\"\\":
                    raise CommandError("ERROR: Invalid command: bad quoting.")
                j += 1
            words.append((command[i:j], False))
            i = j
            continue
        parts: list[str] = []
        while True:
            close = command.find("'", i + 1)
            if close < 0:
                raise CommandError("ERROR: Invalid command: unclosed quote.")
            parts.append(command[i + 1 : close])
            i = close + 1
            if command.startswith(("\\'", "\\!"), i):
                if command.startswith("'", i + 2):
                    parts.append(command[i + 1])
                    i += 2
                    continue
                raise CommandError("ERROR: Invalid command: bad quoting.")
            break
        if i < n and command[i] not in _BLANKS:
            raise CommandError("ERROR: Invalid command: bad quoting.")
        words.append(("".join(parts), True))
    return words


def repo_from_path(path: str) -> str:
    """``OWNER/NAME`` from a path as git sends it, or CommandError.

    One leading ``/``, then one ``~/`` or ``~``, and a trailing ``.git``
    are dropped, so ``/alice/proj.git``, ``~/alice/proj`` and
    ``alice/proj`` all name ``alice/proj``.  ``..``, NUL and backslashes
    are refused outright, whatever they would resolve to.
    """
    if ".." in path or "\0" in path or "\\" in path:
        raise CommandError(f"ERROR: Invalid repository path '{_printable(path)}'.")
    name = path.removeprefix("/")
    if name.startswith("~/"):
        name = name[2:]
    elif name.startswith("~"):
        name = name[1:]
    name = name.removesuffix(".git")
    if not valid_repo_name(name):
        raise CommandError(
            f"ERROR: Invalid repository path '{_printable(path)}': use OWNER/NAME.git."
        )
    return name


def parse_exec(command: bytes) -> GitCommand:
    """Parse the command of an SSH ``exec`` request.

    Accepted: ``git-upload-pack``, ``git-receive-pack``, ``git upload-pack``
    and ``git receive-pack``, each with exactly one path argument, optionally
    after ``GIT_PROTOCOL=<value>`` (the environment-prefix form some clients
    send instead of an ``env`` request).  Raises NotAGitCommand for any
    other program and CommandError for a git command that is malformed or
    names an impossible repository.
    """
    try:
        text = command.decode("utf-8")
    except UnicodeDecodeError:
        raise CommandError("ERROR: Invalid command: not UTF-8.") from None
    if any(not c.isprintable() and c != "\t" for c in text):
        raise CommandError("ERROR: Invalid command: control characters.")
    words = _split_command(text)
    protocol = None
    if words and not words[0][1] and words[0][0].startswith("GIT_PROTOCOL="):
        protocol = words.pop(0)[0].removeprefix("GIT_PROTOCOL=").encode("ascii", "replace")
    names = [word for word, _ in words]
    if names[:1] in (["git-upload-pack"], ["git-receive-pack"]):
        service, args = names[0].removeprefix("git-"), names[1:]
    elif len(names) >= 2 and names[0] == "git" and names[1] in _SERVICES:
        service, args = names[1], names[2:]
    else:
        raise NotAGitCommand(text)
    if len(args) != 1:
        raise CommandError(f"ERROR: Invalid command: git-{service} takes one repository path.")
    return GitCommand(service=service, repo=repo_from_path(args[0]), protocol=protocol)


def shell_refusal(user: str) -> bytes:
    """What a shell (or any non-git command) gets on stderr, after GitHub's greeting."""
    return (
        f"Hi {user}! You've successfully authenticated, "
        "but GitStratum does not provide shell access.\n"
    ).encode()


# -- sessions ------------------------------------------------------------------------------

StreamFactory = Callable[..., IProtocol]


@attrs.define(eq=False)
class SSHGitContext:
    """What every SSH session of one server shares: the engines and the access rule.

    ``stream_factory`` builds the protocol that speaks git on an accepted
    channel (``GitStreamProtocol``'s signature); tests may put a simpler one
    in its place.
    """

    backend: GitBackend
    authorizer: Authorizer
    stream_factory: StreamFactory = GitStreamProtocol
    max_sessions: int = MAX_SESSIONS

    def authorize(
        self, user_name: str, repo_name: str, need: Permission
    ) -> tuple[Repository | None, Decision]:
        """The repository and the decision for *user_name* wanting *need* (blocking).

        The user is looked up again rather than trusted from login time: a
        user removed since logging in finds no repository at all.
        """
        user = self.authorizer.metadata.get_user(user_name)
        if user is None:
            return None, NOT_FOUND
        return self.authorizer.authorize(user, repo_name, need)


@implementer(IRealm)
@attrs.frozen
class GitRealm:
    """Turns an authenticated key owner into a ``GitAvatar``."""

    context: SSHGitContext

    def requestAvatar(
        self, avatarId: Any, mind: object, *interfaces: Any
    ) -> tuple[Any, GitAvatar, Callable[[], None]]:
        if IConchUser not in interfaces:
            raise NotImplementedError("GitStratum only serves SSH avatars")
        name = avatarId.decode("utf-8") if isinstance(avatarId, bytes) else str(avatarId)
        avatar = GitAvatar(name, self.context)
        return IConchUser, avatar, lambda: None


class GitAvatar(ConchUser):
    """A logged-in user: may open session channels, nothing else (no forwarding, no sftp)."""

    def __init__(self, user_name: str, context: SSHGitContext):
        super().__init__()
        self.user_name = user_name
        self.context = context
        self.channelLookup[b"session"] = GitSessionChannel

    def lookupChannel(
        self, channelType: bytes, windowSize: int, maxPacket: int, data: bytes
    ) -> Any:
        if len(self.conn.channels) >= self.context.max_sessions:
            raise ConchError(
                "too many sessions on one connection", OPEN_ADMINISTRATIVELY_PROHIBITED
            )
        return super().lookupChannel(channelType, windowSize, maxPacket, data)


_REFUSAL_OUTCOMES = {403: "denied", 404: "not_found", 400: "bad_request"}


class GitSessionChannel(SSHChannel):
    """A session channel that runs exactly one git service, or explains why it will not.

    Requests: ``env`` keeps ``GIT_PROTOCOL`` (others are ignored, as
    sshd does without ``AcceptEnv``); ``exec`` runs a git command or refuses
    it; ``shell`` gets the greeting and exit status 1.  ``pty-req`` is
    refused, so ``ssh git@host`` prints "PTY allocation request failed" and
    then the greeting, as GitHub does: git never asks for a terminal.

    Work that answers a request (writing to the channel, closing it) starts
    only after Conch has sent the request's reply, in ``request_answered``,
    so the client never sees a channel close before its request succeeded.
    """

    name = b"session"
    avatar: GitAvatar

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs.setdefault("localWindow", _LOCAL_WINDOW)
        kwargs.setdefault("localMaxPacket", _LOCAL_MAX_PACKET)
        super().__init__(*args, **kwargs)
        self.git_protocol: bytes | None = None
        self.protocol: IProtocol | None = None
        self.adapter: ChannelTransport | None = None
        self.reading_paused = True  # until a git protocol is there to read
        self._inbox: list[bytes] = []
        self._eof_received = False
        self._started = False
        self._pending: Callable[[], None] | None = None
        self._exit_status: int | None = None
        self._exit_sent = False
        self._closed = False

    # -- requests -----------------------------------------------------------------
    def request_env(self, data: bytes) -> int:
        try:
            name, value, _ = common.getNS(data, 2)
        except (struct.error, IndexError):
            return 0
        if name != b"GIT_PROTOCOL":
            return 0
        self.git_protocol = value
        return 1

    def request_pty_req(self, data: bytes) -> int:
        return 0

    def request_shell(self, data: bytes) -> int:
        if self._started:
            return 0
        self._started = True
        self._pending = self._refuse_shell
        return 1

    def request_exec(self, data: bytes) -> int:
        if self._started:
            return 0
        try:
            command = common.getNS(data)[0]
        except (struct.error, IndexError):
            return 0
        self._started = True
        self._pending = lambda: self._exec(command)
        return 1

    @property
    def started(self) -> bool:
        """Whether the client asked this channel to run something (exec or shell)."""
        return self._started

    def request_answered(self) -> None:
        """Called by ``GitSSHConnection`` once a request's reply is on its way."""
        pending, self._pending = self._pending, None
        if pending is not None and not self._closed:
            pending()

    # -- refusals -------------------------------------------------------------------
    def _refuse_shell(self) -> None:
        self._log.info("SSH shell refused for {user}", user=self.avatar.user_name)
        self._fail(shell_refusal(self.avatar.user_name), 1)

    def _fail(self, message: bytes, status: int) -> None:
        self.writeExtended(EXTENDED_DATA_STDERR, message)
        self._finish(status)

    def _refuse(self, service: str, repo: str, status: int, message: str) -> None:
        record_request(
            self.avatar.context.backend.metrics,
            self._log,
            service=service,
            repo=repo,
            user=self.avatar.user_name,
            status=status,
            outcome=_REFUSAL_OUTCOMES.get(status, "denied"),
        )
        self._fail(message.encode("utf-8") + b"\n", 1)

    # -- exec -------------------------------------------------------------------------
    def _exec(self, command: bytes) -> None:
        try:
            parsed = parse_exec(command)
        except NotAGitCommand:
            self._refuse_shell()
            return
        except CommandError as e:
            self._refuse("ssh-exec", "-", 400, str(e))
            return
        context = self.avatar.context
        need = Permission.READ if parsed.service == "upload-pack" else Permission.WRITE
        d = context.backend.run(context.authorize, self.avatar.user_name, parsed.repo, need)
        d.addCallback(self._authorized, parsed)
        d.addErrback(self._session_failed, parsed)

    def _authorized(self, result: tuple[Repository | None, Decision], parsed: GitCommand) -> None:
        repo, decision = result
        if self._closed:
            return
        if not decision.allowed or repo is None:
            self._refuse(parsed.service, parsed.repo, decision.status, "ERROR: " + decision.message)
            return
        context = self.avatar.context
        value = parsed.protocol if parsed.protocol is not None else self.git_protocol
        version = parse_git_protocol_env(value) if value else 0
        self.adapter = ChannelTransport(self)
        self.protocol = context.stream_factory(
            context.backend,
            service=parsed.service,
            repo=repo,
            user=self.avatar.user_name,
            version=version,
            on_done=self._finish,
        )
        self.protocol.makeConnection(self.adapter)
        self.resume_reading()

    def _session_failed(self, failure: Failure, parsed: GitCommand) -> None:
        self._log.failure("SSH session for {repo} failed", failure, repo=parsed.repo)
        if not self._closed:
            self._fail(b"ERROR: Internal server error.\n", 1)

    # -- data from the client ---------------------------------------------------------
    def dataReceived(self, data: bytes) -> None:
        if self.reading_paused or self._inbox:
            self._inbox.append(data)
            return
        assert self.protocol is not None
        self.protocol.dataReceived(data)

    def eofReceived(self) -> None:
        self._eof_received = True
        if not self.reading_paused and not self._inbox:
            self._deliver_eof()

    def _deliver_eof(self) -> None:
        protocol = self.protocol
        if protocol is not None and IHalfCloseableProtocol.providedBy(protocol):
            protocol.readConnectionLost()  # type: ignore[attr-defined]

    def pause_reading(self) -> None:
        """Stop granting window to the client; what it already sent is held back."""
        self.reading_paused = True

    def resume_reading(self) -> None:
        """Deliver held data, then grant the client window again."""
        self.reading_paused = False
        while self._inbox and not self.reading_paused and self.protocol is not None:
            self.protocol.dataReceived(self._inbox.pop(0))
        if self.reading_paused or self._inbox:
            return
        if self._eof_received:
            self._deliver_eof()
        if self.conn is not None and not self.localClosed:
            consumed = self.localWindowSize - self.localWindowLeft
            if consumed > self.localWindowSize // 2:
                self.conn.adjustWindow(self, consumed)

    # -- flow control toward the client -----------------------------------------------
    def held_bytes(self) -> int:
        """Output written but not sent yet, for want of window."""
        return len(self.buf) + sum(len(data) for _, data in self.extBuf)

    def addWindowBytes(self, data: int) -> None:
        super().addWindowBytes(data)
        if self.adapter is not None:
            self.adapter.flow_changed()
        if self._exit_status is not None and not self._exit_sent:
            self._send_exit()

    # -- the end ------------------------------------------------------------------------
    def _finish(self, status: int) -> None:
        """End the session with *status* once everything written has left."""
        if self._exit_status is not None:
            return
        self._exit_status = status
        self._send_exit()

    def _send_exit(self) -> None:
        if self.buf or self.extBuf or self._closed:
            return  # addWindowBytes calls again once the buffered output is sent
        self._exit_sent = True
        assert self.conn is not None and self._exit_status is not None
        self.conn.sendRequest(self, b"exit-status", struct.pack(">L", self._exit_status))
        self.conn.sendEOF(self)
        self.loseConnection()

    def closed(self) -> None:
        self._closed = True
        self._inbox.clear()
        if self.adapter is not None:
            self.adapter.stop_producer()
        protocol, self.protocol = self.protocol, None
        if protocol is not None:
            reason = ConnectionDone if self._exit_sent else ConnectionLost
            protocol.connectionLost(Failure(reason("SSH channel closed")))


@implementer(ITransport, IConsumer, IPushProducer)
@attrs.define(eq=False)
class ChannelTransport:
    """An SSH session channel seen as a TCP-like transport by a git stream protocol.

    It is a consumer: a streaming producer registered here is paused once
    more than ``high_water`` bytes wait for the client's window, and resumed
    when the window has taken them.  Letting about one pack chunk wait,
    rather than pausing the moment the window is full, keeps the next chunk
    ready when a window adjust arrives, so the stream does not stall on the
    pack builder's next pull; memory per channel stays bounded by the window
    plus ``high_water`` plus one chunk.  It is a producer too: pausing it
    stops the flow of data from the client.
    """

    channel: GitSessionChannel
    high_water: int = HIGH_WATER
    producer: IPushProducer | None = None
    producer_paused: bool = False
    disconnecting: bool = False

    def write(self, data: bytes) -> None:
        self.channel.write(data)
        self.flow_changed()

    def writeSequence(self, data: Iterable[bytes]) -> None:
        self.write(b"".join(data))

    def loseConnection(self) -> None:
        self.disconnecting = True
        self.channel.loseConnection()

    def getPeer(self) -> Any:
        return self.channel.getPeer()

    def getHost(self) -> Any:
        return self.channel.getHost()

    def registerProducer(self, producer: IProducer, streaming: bool) -> None:
        if self.producer is not None:
            raise RuntimeError(
                f"Cannot register producer {producer!r}: {self.producer!r} is still registered"
            )
        if not streaming:
            # The channel has no "buffer drained" moment to pull on; git's producers push.
            raise ValueError("an SSH channel only takes streaming (push) producers")
        self.producer = cast(IPushProducer, producer)
        self.producer_paused = False
        self.flow_changed()

    def unregisterProducer(self) -> None:
        self.producer = None
        self.producer_paused = False

    def flow_changed(self) -> None:
        """Pause or resume the producer after output was queued or window granted."""
        producer = self.producer
        if producer is None:
            return
        held = self.channel.held_bytes()
        if not self.producer_paused and held > self.high_water:
            self.producer_paused = True
            producer.pauseProducing()
        elif self.producer_paused and held <= self.high_water:
            self.producer_paused = False
            producer.resumeProducing()

    def stop_producer(self) -> None:
        producer, self.producer = self.producer, None
        if producer is not None:
            producer.stopProducing()

    # IPushProducer: the flow from the client.
    def pauseProducing(self) -> None:
        self.channel.pause_reading()

    def resumeProducing(self) -> None:
        self.channel.resume_reading()

    def stopProducing(self) -> None:
        self.loseConnection()


# -- the Conch services --------------------------------------------------------------------


class GitSSHConnection(SSHConnection):
    """Conch's connection service, with two hooks for git sessions.

    A channel whose reading is paused is granted no window (Conch would
    grant it unconditionally), and a session channel learns when the reply
    to its request has been sent.
    """

    _log = Logger()
    _idle_call: IDelayedCall | None = None
    _quiet_checks = 0

    def serviceStarted(self) -> None:
        super().serviceStarted()
        self._arm_idle()

    def serviceStopped(self) -> None:
        if self._idle_call is not None and self._idle_call.active():
            self._idle_call.cancel()
        self._idle_call = None
        super().serviceStopped()

    def _arm_idle(self) -> None:
        """A logged-in connection running no git command is dropped after the factory's
        ``idle_timeout`` (checked each quarter of it): a running command has the stream's own
        idle limit, but a client that opens no channel, or never says what to run in one,
        would otherwise hold its connection for ever."""
        factory: Any = getattr(self.transport, "factory", None)
        timeout = getattr(factory, "idle_timeout", 0)
        if timeout > 0:
            self._idle_call = factory.clock.callLater(timeout / 4, self._check_idle, timeout)

    def _check_idle(self, timeout: float) -> None:
        self._idle_call = None
        started = any(getattr(c, "started", False) for c in self.channels.values())
        self._quiet_checks = 0 if started else self._quiet_checks + 1
        if self._quiet_checks < 4:
            self._arm_idle()
            return
        transport = cast(SSHServerTransport, self.transport)
        self._log.info(
            "SSH {peer}: no git command for {seconds} s",
            peer=_peer(transport),
            seconds=timeout,
        )
        transport.sendDisconnect(
            DISCONNECT_BY_APPLICATION, b"timeout: no git command for %g s" % timeout
        )

    def adjustWindow(self, channel: SSHChannel, bytesToAdd: int) -> None:
        if getattr(channel, "reading_paused", False):
            return
        super().adjustWindow(channel, bytesToAdd)

    def ssh_CHANNEL_REQUEST(self, packet: bytes) -> Any:
        (local,) = struct.unpack(">L", packet[:4])
        result = super().ssh_CHANNEL_REQUEST(packet)
        channel = self.channels.get(local)
        if isinstance(channel, GitSessionChannel):
            channel.request_answered()
        return result


class GitUserAuthServer(SSHUserAuthServer):
    """Conch's user-auth service with the factory's attempt limit, and no timer of its own.

    The login deadline is kept by ``GitSSHTransport`` from the moment the
    TCP connection opens (like sshd's ``LoginGraceTime``): Conch's timer
    would only start once the client asks for user auth, so a client that
    connects and says nothing would hold its connection for ever.
    """

    def serviceStarted(self) -> None:
        assert self.transport is not None
        factory = self.transport.factory
        # Conch disconnects once failures exceed this; max_auth_attempts counts the failure
        # that disconnects, as OpenSSH's MaxAuthTries does.
        self.attemptsBeforeDisconnect = factory.max_auth_attempts - 1
        self.loginTimeout = factory.login_timeout
        self.clock = factory.clock
        super().serviceStarted()
        conch: Any = self
        if conch._cancelLoginTimeout is not None:
            conch._cancelLoginTimeout.cancel()
            conch._cancelLoginTimeout = None


class GitSSHTransport(SSHServerTransport):
    """The server transport: our algorithm order, the login deadline, a log of what was negotiated."""

    version = b"GitStratum"
    ourVersionString = b"SSH-2.0-GitStratum"
    supportedCiphers = _prefer(_CIPHERS, SSHServerTransport.supportedCiphers)
    supportedMACs = _prefer(_MACS, SSHServerTransport.supportedMACs)
    supportedKeyExchanges = _prefer(_KEX, SSHServerTransport.supportedKeyExchanges)

    _login_timer: IDelayedCall | None = None

    def connectionMade(self) -> None:
        super().connectionMade()
        factory: Any = self.factory
        self._login_timer = factory.clock.callLater(factory.login_timeout, self._login_timed_out)

    def _login_timed_out(self) -> None:
        self._login_timer = None
        self._log.info("SSH {peer}: no login within the timeout", peer=_peer(self))
        self.sendDisconnect(DISCONNECT_NO_MORE_AUTH_METHODS_AVAILABLE, b"you took too long")

    def _cancel_login_timer(self) -> None:
        if self._login_timer is not None:
            self._login_timer.cancel()
            self._login_timer = None

    def setService(self, service: Any) -> None:
        # The connection service only starts after a successful login.
        if service.name != b"ssh-userauth":
            self._cancel_login_timer()
        super().setService(service)

    def connectionLost(self, reason: Failure | None = None) -> None:
        self._cancel_login_timer()
        super().connectionLost(reason)

    negotiated: dict[str, str] | None = None
    _log = Logger()

    def _newKeys(self) -> None:
        super()._newKeys()
        enc = self.currentEncryptions
        self.negotiated = {
            "kex": self.kexAlg.decode("ascii"),
            "host_key": self.keyAlg.decode("ascii"),
            "cipher": enc.outCipType.decode("ascii"),
            "mac": enc.outMACType.decode("ascii"),
            "cipher_in": enc.inCipType.decode("ascii"),
            "mac_in": enc.inMACType.decode("ascii"),
        }
        self._log.info(
            "SSH {peer}: kex={kex} host_key={host_key} cipher={cipher} mac={mac}"
            " (client to server: {cipher_in} {mac_in})",
            peer=_peer(self),
            **self.negotiated,
        )


def _peer(transport: SSHServerTransport) -> str:
    if transport.transport is None:
        return "-"
    peer = transport.transport.getPeer()
    host, port = getattr(peer, "host", None), getattr(peer, "port", None)
    return f"{host}:{port}" if host is not None else str(peer)


class GitSSHFactory(SSHFactory):
    """An SSH server factory offering only public-key login and git sessions."""

    protocol = GitSSHTransport
    services = {
        b"ssh-userauth": GitUserAuthServer,
        b"ssh-connection": GitSSHConnection,
    }

    def __init__(
        self,
        portal: Portal,
        host_keys: dict[bytes, Key],
        *,
        login_timeout: float,
        max_auth_attempts: int,
        clock: IReactorTime,
        idle_timeout: float = 0.0,
    ):
        if max_auth_attempts < 1:
            raise ValueError("max_auth_attempts must be at least 1")
        if not host_keys:
            raise ValueError("an SSH server needs at least one host key")
        self.portal = portal
        self.host_keys = dict(host_keys)
        self.login_timeout = login_timeout
        self.max_auth_attempts = max_auth_attempts
        self.clock = clock
        #: seconds a logged-in connection may run no git command (0: for ever)
        self.idle_timeout = idle_timeout

    def getPublicKeys(self) -> dict[bytes, Key]:
        return {kind: key.public() for kind, key in self.host_keys.items()}

    def getPrivateKeys(self) -> dict[bytes, Key]:
        return dict(self.host_keys)

    def getPrimes(self) -> None:
        # No moduli file: Conch then drops the group-exchange key exchanges,
        # which we would rank below curve25519 anyway.
        return None


def make_ssh_factory(
    backend: GitBackend,
    authorizer: Authorizer,
    host_keys: dict[bytes, Key],
    *,
    login_timeout: float = 30.0,
    max_auth_attempts: int = 6,
    clock: IReactorTime | None = None,
    stream_factory: StreamFactory | None = None,
    idle_timeout: float | None = None,
) -> GitSSHFactory:
    """The SSH server factory for ``strports.service(endpoint, factory)``.

    *login_timeout* is how long a client may take to log in (Conch's
    default is ten hours); *max_auth_attempts* is how many failed logins
    end the connection (Conch's default is 21).  A logged-in connection
    that runs no git command for *idle_timeout* seconds (default: the
    backend's ``stream_idle_timeout``; 0 never) is dropped, as a running
    command that goes quiet is.  *clock* defaults to
    the global reactor.
    """
    if clock is None:
        from twisted.internet import reactor

        clock = reactor  # type: ignore[assignment]
    assert clock is not None
    context = SSHGitContext(backend, authorizer)
    if stream_factory is not None:
        context.stream_factory = stream_factory
    portal = Portal(GitRealm(context), [SSHKeyChecker(authorizer.metadata, backend.run)])
    return GitSSHFactory(
        portal,
        host_keys,
        login_timeout=login_timeout,
        max_auth_attempts=max_auth_attempts,
        clock=clock,
        idle_timeout=backend.limits.stream_idle_timeout if idle_timeout is None else idle_timeout,
    )
