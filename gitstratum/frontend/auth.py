"""Who is calling and what they may do: tokens, HTTP credentials and the access rule.

Tokens are random, prefixed with ``gst_`` so that secret scanners can spot a
leaked one, and are only ever stored as their SHA-256 digest.  Every HTTP
entry point (smart HTTP, the admin API) asks ``Authorizer.decide`` for the
status to answer, so that "401 or 404 or 403" is settled in one place; the
git adapters (smart HTTP, SSH, git://) look the repository up and decide in
one step with ``Authorizer.authorize``.

The ``Authorizer`` makes point reads on the metadata store; they are cheap
locally but may be remote in a cluster, so request handlers call it through
their ``BlockingRunner``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
import secrets

import attrs

from gitstratum.storage.interfaces import IMetadataStore, Permission, Repository, User, UserExists

__all__ = [
    "TOKEN_PREFIX",
    "REALM",
    "ADMIN_USER",
    "ADMIN_TOKEN_FILE",
    "new_token",
    "hash_token",
    "parse_basic",
    "parse_bearer",
    "ssh_fingerprint",
    "Decision",
    "NOT_FOUND",
    "Authorizer",
    "bootstrap_admin",
]

TOKEN_PREFIX = "gst_"
REALM = "GitStratum"
ADMIN_USER = "admin"
ADMIN_TOKEN_FILE = "admin-token"

# RFC 7235 token68, which is what a Bearer credential must be.
_TOKEN68 = re.compile(r"\A[A-Za-z0-9\-._~+/]+=*\Z")


def new_token() -> str:
    """A fresh API token: the prefix and 256 bits from ``secrets``."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> bytes:
    """The SHA-256 digest under which a token is stored and looked up."""
    return hashlib.sha256(token.encode("utf-8")).digest()


def _split_scheme(header: bytes | None, scheme: bytes) -> bytes | None:
    if not header:
        return None
    parts = header.strip().split(None, 1)
    if len(parts) != 2 or parts[0].lower() != scheme:
        return None
    return parts[1].strip()


def parse_basic(header: bytes | None) -> tuple[str, str] | None:
    """``(user, password)`` from an ``Authorization: Basic ...`` value, or None if malformed."""
    value = _split_scheme(header, b"basic")
    if not value:
        return None
    try:
        decoded = base64.b64decode(value, validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    user, sep, password = decoded.partition(":")
    if not sep:
        return None
    return user, password


def parse_bearer(header: bytes | None) -> str | None:
    """The token of an ``Authorization: Bearer ...`` value, or None if malformed."""
    value = _split_scheme(header, b"bearer")
    if not value:
        return None
    try:
        token = value.decode("ascii")
    except UnicodeDecodeError:
        return None
    return token if _TOKEN68.match(token) else None


def ssh_fingerprint(blob: bytes) -> str:
    """OpenSSH's ``SHA256:...`` fingerprint of a public key blob (base64, unpadded).

    Conch's own ``Key.fingerprint`` keeps the ``=`` padding, which would not
    match what ``ssh-keygen -l`` shows the user.
    """
    digest = hashlib.sha256(blob).digest()
    return "SHA256:" + base64.b64encode(digest).decode("ascii").rstrip("=")


@attrs.frozen
class Decision:
    """The answer to "may this caller do this here?", as an HTTP status.

    ``www_authenticate`` is set on 401s: the challenge that makes git ask for
    (or retry with) credentials.
    """

    allowed: bool
    status: int
    message: str = ""
    www_authenticate: str | None = None


_ALLOWED = Decision(True, 200)
#: the answer for a repository the caller cannot see, or that does not exist
NOT_FOUND = Decision(False, 404, "Repository not found.")
_CHALLENGE = Decision(False, 401, "Authentication required.", f'Basic realm="{REALM}"')


@attrs.define
class Authorizer:
    """Resolves credentials to users and users to permissions on repositories."""

    metadata: IMetadataStore

    def user_for_token(self, token: str) -> User | None:
        """The owner of *token*, or None for an empty or unknown token."""
        if not token:
            return None
        return self.metadata.user_for_token(hash_token(token))

    def user_for_basic(self, header: bytes | None) -> User | None:
        """The user whose token is the password of a Basic ``Authorization`` header.

        As on GitHub, the user name part is ignored: git needs *some* user
        name to send a password, so ``x-token:<token>``, ``alice:<token>`` and
        ``:<token>`` (an empty name) all identify the token's owner.  An
        empty password never matches anyone.
        """
        credentials = parse_basic(header)
        if credentials is None:
            return None
        return self.user_for_token(credentials[1])

    def access(self, user: User | None, repo: Repository) -> Permission | None:
        """The highest permission *user* (None: anonymous) has on *repo*, or None."""
        if user is not None and user.is_admin:
            return Permission.ADMIN
        granted = self.metadata.get_permission(user.name, repo.name) if user is not None else None
        if repo.public:
            return max(granted or Permission.READ, Permission.READ)
        return granted

    def decide(self, user: User | None, repo: Repository | None, need: Permission) -> Decision:
        """The HTTP answer for *user* wanting *need* on *repo* (None: it does not exist).

        An anonymous caller is asked for credentials whenever it is refused,
        so git prompts and a private repository's existence is not revealed.
        A known caller who cannot see the repository gets the same 404 as for
        one that does not exist; one who can see it but needs more gets 403.
        """
        if repo is None:
            return _CHALLENGE if user is None else NOT_FOUND
        have = self.access(user, repo)
        if have is not None and have >= need:
            return _ALLOWED
        if user is None:
            return _CHALLENGE
        if have is None:
            return NOT_FOUND
        return Decision(False, 403, f"Permission to {repo.name}.git denied to {user.name}.")

    def authorize(
        self, user: User | None, repo_name: str, need: Permission
    ) -> tuple[Repository | None, Decision]:
        """The repository named *repo_name* and ``decide``'s answer for *user* wanting *need*.

        Blocking (it reads the metadata store): adapters call it through
        their ``BlockingRunner``.  The repository (None if there is none)
        comes with the decision so that an allowed caller needs no second
        read; a refused one must be told only the decision's message.
        """
        repo = self.metadata.get_repository(repo_name)
        return repo, self.decide(user, repo, need)


def bootstrap_admin(metadata: IMetadataStore, data_dir: str) -> str | None:
    """On first start, create the ``admin`` site admin and write its token to a 0600 file.

    Returns the token file's path, or None (touching nothing) when ``admin``
    already exists.  The file is written before the user is created, so a
    crash part-way leaves no admin without a token on disk; the next start
    simply writes a new one.  It is created with mode 0600 in one step so the
    token is never readable by others, not even briefly.
    """
    if metadata.get_user(ADMIN_USER) is not None:
        return None
    os.makedirs(data_dir, mode=0o700, exist_ok=True)
    path = os.path.join(data_dir, ADMIN_TOKEN_FILE)
    token = new_token()
    tmp = f"{path}.{secrets.token_hex(8)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(token + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:
        metadata.create_user(ADMIN_USER, is_admin=True)
    except UserExists:
        # A concurrent bootstrap created admin first; our token was never registered.
        os.unlink(path)
        return None
    metadata.add_token(ADMIN_USER, hash_token(token))
    return path
