"""Tokens, credential parsing, the access rule and the first-start admin bootstrap."""

from __future__ import annotations

import base64
import hashlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gitstratum.frontend.auth import (
    ADMIN_TOKEN_FILE,
    NOT_FOUND,
    TOKEN_PREFIX,
    Authorizer,
    bootstrap_admin,
    hash_token,
    new_token,
    parse_basic,
    parse_bearer,
    ssh_fingerprint,
)
from gitstratum.storage.interfaces import Permission, Repository, User
from gitstratum.storage.lmdb_metadata import LMDBMetadataStore

# Generated once with `ssh-keygen -t ed25519`; `ssh-keygen -lf` printed the fingerprint.
PUBKEY = (
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIP27OLKXI8YWr55tS4WHELjD30rOP1qw7euSBDRcGpcS alice@laptop"
)
PUBKEY_FINGERPRINT = "SHA256:ox8byVsK0z+376T7zfVE7/DhBO7U1GoZbgw5wHQptag"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[LMDBMetadataStore]:
    s = LMDBMetadataStore(str(tmp_path / "meta"))
    yield s
    s.close()


@pytest.fixture
def authz(store: LMDBMetadataStore) -> Authorizer:
    return Authorizer(store)


def basic(user: str, password: str) -> bytes:
    return b"Basic " + base64.b64encode(f"{user}:{password}".encode())


def mint(store: LMDBMetadataStore, user: str) -> str:
    token = new_token()
    store.add_token(user, hash_token(token))
    return token


# -- tokens ----------------------------------------------------------------------


def test_new_token_is_prefixed_urlsafe_and_unique() -> None:
    """Tokens carry the gst_ prefix, use URL-safe characters and do not repeat."""
    tokens = {new_token() for _ in range(200)}
    assert len(tokens) == 200
    for token in tokens:
        assert token.startswith(TOKEN_PREFIX)
        assert len(token) >= len(TOKEN_PREFIX) + 40
        body = token[len(TOKEN_PREFIX) :]
        assert set(body) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


def test_hash_token_is_sha256_of_the_utf8_token() -> None:
    """A token is stored under the SHA-256 digest of its UTF-8 bytes."""
    assert hash_token("gst_abc") == hashlib.sha256(b"gst_abc").digest()
    assert hash_token("gst_abc") != hash_token("gst_abd")


# -- parsing -------------------------------------------------------------------


def test_parse_basic_reads_user_and_password() -> None:
    """A Basic header yields its user and password; the password may contain colons."""
    assert parse_basic(basic("alice", "gst_x:y")) == ("alice", "gst_x:y")
    assert parse_basic(basic("", "tok")) == ("", "tok")
    assert parse_basic(b"bAsIc " + base64.b64encode(b"u:p")) == ("u", "p")


@pytest.mark.parametrize(
    "header",
    [
        None,
        b"",
        b"Basic",
        b"Basic ",
        b"Basic !!!notbase64",
        b"Basic " + base64.b64encode(b"no-colon-here"),
        b"Basic " + base64.b64encode(b"\xff\xfe:\xff"),
        b"Bearer " + base64.b64encode(b"u:p"),
        b"Digest username=alice",
    ],
)
def test_parse_basic_rejects_malformed_headers(header: bytes | None) -> None:
    """Anything that is not a well-formed Basic credential parses to None."""
    assert parse_basic(header) is None


@settings(derandomize=True)
@given(st.text().filter(lambda u: ":" not in u), st.text())
def test_parse_basic_round_trips(user: str, password: str) -> None:
    """Whatever user (without ':') and password a client encodes, we decode the same."""
    assert parse_basic(basic(user, password)) == (user, password)


def test_parse_bearer_reads_the_token() -> None:
    """A Bearer header yields its token, whatever the case of the scheme."""
    assert parse_bearer(b"Bearer gst_abc-DEF_123") == "gst_abc-DEF_123"
    assert parse_bearer(b"bearer  tok/en+==") == "tok/en+=="


@pytest.mark.parametrize(
    "header",
    [None, b"", b"Bearer", b"Bearer ", b"Basic dTpw", b"Bearer two tokens", b"Bearer t\xc3\xa9"],
)
def test_parse_bearer_rejects_malformed_headers(header: bytes | None) -> None:
    """Missing, other-scheme and non-token68 credentials parse to None."""
    assert parse_bearer(header) is None


def test_ssh_fingerprint_matches_openssh() -> None:
    """The fingerprint is the one `ssh-keygen -l` shows: SHA256: and unpadded base64."""
    blob = base64.b64decode(PUBKEY.split()[1])
    assert ssh_fingerprint(blob) == PUBKEY_FINGERPRINT


# -- users from credentials ----------------------------------------------------------


def test_user_for_token(store: LMDBMetadataStore, authz: Authorizer) -> None:
    """A minted token maps to its user; unknown and empty tokens map to nobody."""
    store.create_user("alice")
    token = mint(store, "alice")
    assert authz.user_for_token(token) == User("alice")
    assert authz.user_for_token(token + "x") is None
    assert authz.user_for_token("") is None


def test_user_for_basic_ignores_the_user_name(store: LMDBMetadataStore, authz: Authorizer) -> None:
    """The Basic password is the token; any user name, even an empty one, is accepted."""
    store.create_user("alice")
    token = mint(store, "alice")
    for name in ("alice", "x-access-token", "someone-else", ""):
        assert authz.user_for_basic(basic(name, token)) == User("alice")


def test_user_for_basic_refuses_missing_or_wrong_passwords(
    store: LMDBMetadataStore, authz: Authorizer
) -> None:
    """No header, a bad header, an empty password or a token in the user field is nobody."""
    store.create_user("alice")
    token = mint(store, "alice")
    assert authz.user_for_basic(None) is None
    assert authz.user_for_basic(b"Basic ???") is None
    assert authz.user_for_basic(basic("alice", "")) is None
    assert authz.user_for_basic(basic(token, "")) is None
    assert authz.user_for_basic(basic("alice", "gst_wrong")) is None


# -- access and decisions -------------------------------------------------------------


@pytest.fixture
def world(store: LMDBMetadataStore) -> dict[str, object]:
    """Users root (site admin), rita (READ on priv), wendy (WRITE), ada (ADMIN), eve (nothing)."""
    store.create_user("root", is_admin=True)
    for name in ("rita", "wendy", "ada", "eve"):
        store.create_user(name)
    priv = store.create_repository("org/priv")
    pub = store.create_repository("org/pub", public=True)
    store.grant("rita", "org/priv", Permission.READ)
    store.grant("wendy", "org/priv", Permission.WRITE)
    store.grant("ada", "org/priv", Permission.ADMIN)
    store.grant("wendy", "org/pub", Permission.WRITE)
    return {
        "priv": priv,
        "pub": pub,
        **{n: store.get_user(n) for n in ("root", "rita", "wendy", "ada", "eve")},
    }


@pytest.mark.parametrize(
    ("who", "repo", "expected"),
    [
        ("root", "priv", Permission.ADMIN),
        ("root", "pub", Permission.ADMIN),
        ("rita", "priv", Permission.READ),
        ("wendy", "priv", Permission.WRITE),
        ("ada", "priv", Permission.ADMIN),
        ("eve", "priv", None),
        (None, "priv", None),
        ("eve", "pub", Permission.READ),
        (None, "pub", Permission.READ),
        ("wendy", "pub", Permission.WRITE),
    ],
)
def test_access(
    authz: Authorizer, world: dict[str, object], who: str | None, repo: str, expected: object
) -> None:
    """Site admins get ADMIN, grants count, and a public repository is readable by anyone."""
    user = world[who] if who else None
    assert isinstance(user, User | None)
    target = world[repo]
    assert isinstance(target, Repository)
    assert authz.access(user, target) == expected


CHALLENGE = 'Basic realm="GitStratum"'


@pytest.mark.parametrize(
    ("who", "repo", "need", "status"),
    [
        # anonymous callers are asked for credentials whenever refused
        (None, None, Permission.READ, 401),
        (None, "priv", Permission.READ, 401),
        (None, "pub", Permission.READ, 200),
        (None, "pub", Permission.WRITE, 401),
        # known callers who cannot see the repository get 404, as if it did not exist
        ("eve", None, Permission.READ, 404),
        ("eve", "priv", Permission.READ, 404),
        ("eve", "priv", Permission.WRITE, 404),
        # known callers who can read but need more get 403
        ("eve", "pub", Permission.WRITE, 403),
        ("rita", "priv", Permission.WRITE, 403),
        ("wendy", "priv", Permission.ADMIN, 403),
        # allowed
        ("rita", "priv", Permission.READ, 200),
        ("wendy", "priv", Permission.WRITE, 200),
        ("wendy", "pub", Permission.WRITE, 200),
        ("ada", "priv", Permission.ADMIN, 200),
        ("root", "priv", Permission.ADMIN, 200),
        ("root", None, Permission.READ, 404),
    ],
)
def test_decide(
    authz: Authorizer,
    world: dict[str, object],
    who: str | None,
    repo: str | None,
    need: Permission,
    status: int,
) -> None:
    """The HTTP rule: allowed, 401 with a Basic challenge, 404 or 403, each where it belongs."""
    user = world[who] if who else None
    target = world[repo] if repo else None
    assert isinstance(user, User | None) and isinstance(target, Repository | None)
    decision = authz.decide(user, target, need)
    assert decision.status == status
    assert decision.allowed == (status == 200)
    assert (decision.www_authenticate == CHALLENGE) == (status == 401)
    if status == 404:
        assert decision.message == "Repository not found."
    if status == 403:
        assert user is not None and target is not None
        assert decision.message == f"Permission to {target.name}.git denied to {user.name}."


def test_decide_does_not_reveal_private_repositories(
    authz: Authorizer, world: dict[str, object]
) -> None:
    """A stranger cannot tell a hidden repository from a missing one."""
    eve, priv = world["eve"], world["priv"]
    assert isinstance(eve, User) and isinstance(priv, Repository)
    assert authz.decide(eve, priv, Permission.READ) == authz.decide(eve, None, Permission.READ)
    assert authz.decide(None, priv, Permission.READ) == authz.decide(None, None, Permission.READ)


@pytest.mark.parametrize(
    ("who", "name", "need", "status"),
    [
        (None, "org/pub", Permission.READ, 200),
        (None, "org/priv", Permission.READ, 401),
        (None, "org/missing", Permission.READ, 401),
        ("eve", "org/priv", Permission.READ, 404),
        ("eve", "org/pub", Permission.WRITE, 403),
        ("rita", "org/priv", Permission.READ, 200),
        ("rita", "org/missing", Permission.READ, 404),
    ],
)
def test_authorize_looks_the_repository_up_and_decides(
    store: LMDBMetadataStore,
    authz: Authorizer,
    world: dict[str, object],
    who: str | None,
    name: str,
    need: Permission,
    status: int,
) -> None:
    """authorize(user, name, need) is the stored repository (or None) and decide()'s answer on it."""
    user = world[who] if who else None
    assert isinstance(user, User | None)
    expected = store.get_repository(name)
    repo, decision = authz.authorize(user, name, need)
    assert repo == expected
    assert decision.status == status
    assert decision == authz.decide(user, expected, need)


def test_authorize_answers_not_found_for_a_missing_repository(authz: Authorizer) -> None:
    """A known caller naming a repository that does not exist gets NOT_FOUND, git's wording."""
    user = User("eve")
    repo, decision = authz.authorize(user, "org/nothing", Permission.READ)
    assert repo is None and decision is NOT_FOUND
    assert (decision.status, decision.message) == (404, "Repository not found.")


def test_access_follows_visibility_changes(store: LMDBMetadataStore, authz: Authorizer) -> None:
    """Making a repository private takes anonymous read access away again."""
    repo = store.create_repository("org/flip", public=True)
    assert authz.access(None, repo) == Permission.READ
    repo = store.set_public("org/flip", False)
    assert authz.access(None, repo) is None


# -- bootstrap -------------------------------------------------------------------------


def test_bootstrap_admin_creates_admin_and_a_0600_token_file(
    store: LMDBMetadataStore, authz: Authorizer, tmp_path: Path
) -> None:
    """First start: 'admin' is a site admin whose token is in DATA_DIR/admin-token, mode 0600."""
    data_dir = tmp_path / "data"
    old_umask = os.umask(0)  # even a permissive umask must not widen the file's mode
    try:
        path = bootstrap_admin(store, str(data_dir))
    finally:
        os.umask(old_umask)
    assert path == str(data_dir / ADMIN_TOKEN_FILE)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    token = Path(path).read_text().strip()
    assert token.startswith(TOKEN_PREFIX)
    assert authz.user_for_token(token) == User("admin", is_admin=True)
    assert os.listdir(data_dir) == [ADMIN_TOKEN_FILE]  # no temporary file left behind


def test_bootstrap_admin_stores_only_the_token_hash(
    store: LMDBMetadataStore, tmp_path: Path
) -> None:
    """The raw token never reaches the metadata store's files, only its digest."""
    path = bootstrap_admin(store, str(tmp_path / "data"))
    assert path is not None
    token = Path(path).read_text().strip().encode()
    on_disk = b"".join(p.read_bytes() for p in (tmp_path / "meta").iterdir() if p.is_file())
    assert hashlib.sha256(token).digest() in on_disk
    assert token not in on_disk


def test_bootstrap_admin_is_a_no_op_once_admin_exists(
    store: LMDBMetadataStore, authz: Authorizer, tmp_path: Path
) -> None:
    """A later start returns None and leaves the token file exactly as it was."""
    data_dir = tmp_path / "data"
    path = bootstrap_admin(store, str(data_dir))
    assert path is not None
    before = Path(path).read_bytes()
    stamp = os.stat(path).st_mtime_ns
    assert bootstrap_admin(store, str(data_dir)) is None
    assert Path(path).read_bytes() == before
    assert os.stat(path).st_mtime_ns == stamp
    assert authz.user_for_token(before.decode().strip()) is not None


def test_bootstrap_admin_touches_nothing_if_admin_was_made_elsewhere(
    store: LMDBMetadataStore, tmp_path: Path
) -> None:
    """An existing 'admin' user means no file is written at all."""
    store.create_user("admin", is_admin=True)
    data_dir = tmp_path / "data"
    assert bootstrap_admin(store, str(data_dir)) is None
    assert not data_dir.exists()
