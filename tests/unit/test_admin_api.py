"""The JSON admin API, driven through StubTreq over a real LMDB metadata store."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import attrs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from klein import Klein
from treq.testing import StubTreq
from twisted.web.resource import Resource
from twisted.web.server import Request, Site
from twisted.web.test.requesthelper import DummyChannel

from gitstratum.frontend.admin_api import MAX_BODY_BYTES, AdminAPI
from gitstratum.frontend.auth import Authorizer, bootstrap_admin, hash_token, new_token
from gitstratum.frontend.threads import inline_runner
from gitstratum.storage.interfaces import Permission
from gitstratum.storage.lmdb_metadata import LMDBMetadataStore

PUBKEY = (
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIP27OLKXI8YWr55tS4WHELjD30rOP1qw7euSBDRcGpcS alice@laptop"
)
PUBKEY_FINGERPRINT = "SHA256:ox8byVsK0z+376T7zfVE7/DhBO7U1GoZbgw5wHQptag"
PRIVATE_KEY = """-----BEGIN OPENSSH PRIVATE KEY-----
b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtzc2gtZW
-----END OPENSSH PRIVATE KEY-----
"""


@attrs.frozen
class Reply:
    code: int
    headers: dict[str, list[str]]
    body: Any

    def header(self, name: str) -> str | None:
        values = self.headers.get(name.lower())
        return values[0] if values else None


@attrs.define
class Harness:
    store: LMDBMetadataStore
    api: AdminAPI
    stub: Any  # StubTreq, whose HTTP methods are set dynamically
    admin_token: str
    status: dict[str, Any]

    def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        token: str | None = "admin",
        data: bytes | None = None,
        authorization: str | None = None,
    ) -> Reply:
        headers = {}
        if authorization is not None:
            headers["Authorization"] = authorization
        elif token is not None:
            headers["Authorization"] = "Bearer " + (self.admin_token if token == "admin" else token)
        kwargs: dict[str, Any] = {"headers": headers}
        if body is not None:
            kwargs["json"] = body
        if data is not None:
            kwargs["data"] = data
        responses: list[Any] = []
        self.stub.request(method, "http://admin.test" + path, **kwargs).addBoth(responses.append)
        self.stub.flush()
        (response,) = responses
        contents: list[Any] = []
        response.content().addBoth(contents.append)
        self.stub.flush()
        (raw,) = contents
        headers_out = {
            k.decode().lower(): [v.decode() for v in vs]
            for k, vs in response.headers.getAllRawHeaders()
        }
        return Reply(response.code, headers_out, json.loads(raw) if raw else None)

    def user(self, name: str, admin: bool = False) -> str:
        """Create a user straight in the store and return a fresh token for it."""
        self.store.create_user(name, is_admin=admin)
        token = new_token()
        self.store.add_token(name, hash_token(token))
        return token


@pytest.fixture
def h(tmp_path: Path) -> Iterator[Harness]:
    store = LMDBMetadataStore(str(tmp_path / "meta"))
    token_file = bootstrap_admin(store, str(tmp_path))
    assert token_file is not None
    status: dict[str, Any] = {"mode": "standalone", "nodes": [{"id": "n1", "state": "up"}]}
    api = AdminAPI(store, Authorizer(store), inline_runner, lambda: status)
    yield Harness(
        store, api, StubTreq(api.app.resource()), Path(token_file).read_text().strip(), status
    )
    store.close()


@contextmanager
def configured(tmp_path: Path, **options: Any) -> Iterator[Harness]:
    """A harness over an AdminAPI built with these keyword *options* (prefix, max_body, ...)."""
    store = LMDBMetadataStore(str(tmp_path / "meta"))
    token_file = bootstrap_admin(store, str(tmp_path))
    assert token_file is not None
    api = AdminAPI(store, Authorizer(store), inline_runner, dict, **options)
    try:
        yield Harness(
            store, api, StubTreq(api.app.resource()), Path(token_file).read_text().strip(), {}
        )
    finally:
        store.close()


def assert_error(reply: Reply, code: int, fragment: str = "") -> None:
    assert reply.code == code, reply
    assert reply.header("content-type") == "application/json"
    assert isinstance(reply.body, dict) and isinstance(reply.body["error"], str)
    assert fragment in reply.body["error"]


# -- authentication --------------------------------------------------------------------


@pytest.mark.parametrize(
    "authorization",
    [None, "Bearer", "Basic " + base64.b64encode(b"admin:x").decode(), "Bearer gst_nonsense"],
)
def test_requests_without_a_valid_bearer_token_get_401(
    h: Harness, authorization: str | None
) -> None:
    """Missing, malformed, wrong-scheme and unknown tokens get 401 and a Bearer challenge."""
    reply = h.call("GET", "/api/v1/whoami", token=None, authorization=authorization)
    assert_error(reply, 401)
    assert reply.header("www-authenticate") == 'Bearer realm="GitStratum"'


def test_whoami_answers_any_valid_token(h: Harness) -> None:
    """/whoami names the caller, site admin or not."""
    assert h.call("GET", "/api/v1/whoami").body == {"name": "admin", "admin": True}
    bob = h.user("bob")
    assert h.call("GET", "/api/v1/whoami", token=bob).body == {"name": "bob", "admin": False}


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/api/v1/repos", {"name": "a/b"}),
        ("GET", "/api/v1/repos", None),
        ("DELETE", "/api/v1/repos/org/x", None),
        ("POST", "/api/v1/users", {"name": "carol"}),
        ("GET", "/api/v1/users", None),
        ("POST", "/api/v1/users/bob/tokens", None),
        ("POST", "/api/v1/users/bob/keys", {"key": PUBKEY}),
        ("GET", "/api/v1/users/bob/keys", None),
        ("GET", "/api/v1/cluster/status", None),
    ],
)
def test_site_admin_routes_refuse_ordinary_users(
    h: Harness, method: str, path: str, body: Any
) -> None:
    """An ordinary user (even a repository admin) gets 403 and changes nothing."""
    h.store.create_repository("org/x")
    bob = h.user("bob")
    h.store.grant("bob", "org/x", Permission.ADMIN)
    assert_error(h.call(method, path, body, token=bob), 403, "site administrator")
    assert h.store.get_repository("a/b") is None
    assert h.store.get_repository("org/x") is not None
    assert h.store.get_user("carol") is None
    assert h.store.list_ssh_keys("bob") == []


# -- repositories ------------------------------------------------------------------------


def test_create_get_list_and_delete_a_repository(h: Harness) -> None:
    """The repository lifecycle: 201 on create, visible to GET and list, gone after DELETE."""
    reply = h.call("POST", "/api/v1/repos", {"name": "alice/proj"})
    assert reply.code == 201
    assert reply.header("content-type") == "application/json"
    assert reply.body == {"name": "alice/proj", "public": False, "head": "refs/heads/main"}
    repo = h.store.get_repository("alice/proj")
    assert repo is not None and not repo.public

    h.call("POST", "/api/v1/repos", {"name": "alice/pub", "public": True})
    assert h.call("GET", "/api/v1/repos/alice/proj").body["name"] == "alice/proj"
    assert h.call("GET", "/api/v1/repos").body == {
        "repos": [
            {"name": "alice/proj", "public": False, "head": "refs/heads/main"},
            {"name": "alice/pub", "public": True, "head": "refs/heads/main"},
        ]
    }

    reply = h.call("DELETE", "/api/v1/repos/alice/proj")
    assert (reply.code, reply.body) == (204, None)
    assert h.store.get_repository("alice/proj") is None
    assert_error(h.call("GET", "/api/v1/repos/alice/proj"), 404, "Repository not found.")
    assert_error(h.call("DELETE", "/api/v1/repos/alice/proj"), 404)


def test_creating_an_existing_repository_is_a_conflict(h: Harness) -> None:
    """A second create of the same name gets 409 and leaves the first untouched."""
    h.call("POST", "/api/v1/repos", {"name": "alice/proj", "public": True})
    assert_error(h.call("POST", "/api/v1/repos", {"name": "alice/proj"}), 409, "already exists")
    repo = h.store.get_repository("alice/proj")
    assert repo is not None and repo.public


@pytest.mark.parametrize(
    "name",
    [
        "proj",
        "a/b/c",
        "/proj",
        "alice/",
        "./proj",
        "alice/..",
        "alice/proj.git",
        "alice.git/proj",
        "alice/pro j",
        "alice/pröj",
        "alice/" + "x" * 101,
        "alice\\proj",
        "a/.hidden",
        "-x/y",
        "a/-rf",
        "x/...",
        "acme/a..b",
        "acme/trailing.",
        "api/repo",
    ],
)
def test_invalid_repository_names_are_refused(h: Harness, name: str) -> None:
    """Names no transport could serve (bad characters or start, '..', '.git', a reserved owner) get 400."""
    assert_error(h.call("POST", "/api/v1/repos", {"name": name}), 400, "invalid repository name")
    assert h.store.list_repositories() == []


@pytest.mark.parametrize("name", ["a/b", "Org-1/re_po.v2", "x" * 100 + "/" + "y" * 100, "_a/b.c"])
def test_valid_repository_names_are_accepted(h: Harness, name: str) -> None:
    """Edge-of-range names (one character, 100 characters, dots inside) are accepted."""
    assert h.call("POST", "/api/v1/repos", {"name": name}).code == 201
    assert h.store.get_repository(name) is not None


def test_patch_changes_visibility(h: Harness) -> None:
    """PATCH {"public": bool} flips visibility in the store."""
    h.store.create_repository("org/r")
    reply = h.call("PATCH", "/api/v1/repos/org/r", {"public": True})
    assert reply.code == 200 and reply.body["public"] is True
    repo = h.store.get_repository("org/r")
    assert repo is not None and repo.public
    assert h.call("PATCH", "/api/v1/repos/org/r", {"public": False}).body["public"] is False


@pytest.mark.parametrize("body", [{}, {"public": 1}, {"public": "yes"}, {"public": None}])
def test_patch_wants_a_boolean(h: Harness, body: dict[str, Any]) -> None:
    """A missing or non-boolean "public" is a 400, not a silent truthiness cast."""
    h.store.create_repository("org/r")
    assert_error(h.call("PATCH", "/api/v1/repos/org/r", body), 400, "public")
    repo = h.store.get_repository("org/r")
    assert repo is not None and not repo.public


# -- users, tokens, keys -----------------------------------------------------------------


def test_create_and_list_users(h: Harness) -> None:
    """Users are created (optionally as site admins), listed, and duplicates are 409."""
    assert h.call("POST", "/api/v1/users", {"name": "bob"}).body == {"name": "bob", "admin": False}
    reply = h.call("POST", "/api/v1/users", {"name": "root2", "admin": True})
    assert (reply.code, reply.body) == (201, {"name": "root2", "admin": True})
    assert h.call("GET", "/api/v1/users").body == {
        "users": [
            {"name": "admin", "admin": True},
            {"name": "bob", "admin": False},
            {"name": "root2", "admin": True},
        ]
    }
    assert_error(h.call("POST", "/api/v1/users", {"name": "bob"}), 409, "already exists")


@pytest.mark.parametrize("name", ["", "a b", "x" * 65, "bob/evil", "..", ".", "émile", "a:b"])
def test_invalid_user_names_are_refused(h: Harness, name: str) -> None:
    """User names outside [A-Za-z0-9_.-]{1,64} (and the dot-segments) get 400."""
    assert_error(h.call("POST", "/api/v1/users", {"name": name}), 400, "invalid user name")
    assert [u.name for u in h.store.list_users()] == ["admin"]


def test_minted_token_authenticates_its_user(h: Harness) -> None:
    """POST /users/<name>/tokens returns a fresh token that works as that user."""
    h.call("POST", "/api/v1/users", {"name": "bob"})
    reply = h.call("POST", "/api/v1/users/bob/tokens")
    assert reply.code == 201
    assert reply.header("cache-control") == "no-store"
    token = reply.body["token"]
    assert token.startswith("gst_")
    assert h.call("GET", "/api/v1/whoami", token=token).body == {"name": "bob", "admin": False}
    assert h.call("POST", "/api/v1/users/bob/tokens").body["token"] != token


def test_minted_token_is_not_stored_in_the_clear(h: Harness, tmp_path: Path) -> None:
    """Only the token's hash reaches the store's files."""
    h.call("POST", "/api/v1/users", {"name": "bob"})
    token = h.call("POST", "/api/v1/users/bob/tokens").body["token"].encode()
    on_disk = b"".join(p.read_bytes() for p in (tmp_path / "meta").iterdir() if p.is_file())
    assert hash_token(token.decode()) in on_disk
    assert token not in on_disk


def test_token_for_unknown_user_is_404(h: Harness) -> None:
    """Minting for a user who does not exist is 404."""
    assert_error(h.call("POST", "/api/v1/users/ghost/tokens"), 404, "ghost")


def test_ssh_key_lifecycle(h: Harness) -> None:
    """Add (with OpenSSH's fingerprint), list, get, delete, and 404 once gone."""
    h.user("bob")
    reply = h.call("POST", "/api/v1/users/bob/keys", {"key": PUBKEY + "\n"})
    assert reply.code == 201
    assert reply.body == {
        "user": "bob",
        "fingerprint": PUBKEY_FINGERPRINT,
        "type": "ssh-ed25519",
        "comment": "alice@laptop",
        "key": PUBKEY,
    }
    (stored,) = h.store.list_ssh_keys("bob")
    assert stored.blob == base64.b64decode(PUBKEY.split()[1])
    assert h.store.user_for_ssh_key(PUBKEY_FINGERPRINT) is not None

    assert h.call("GET", "/api/v1/users/bob/keys").body == {"keys": [reply.body]}
    # The fingerprint's '/' may arrive raw or percent-encoded, with or without "SHA256:".
    escaped = PUBKEY_FINGERPRINT.replace("/", "%2F").replace("+", "%2B")
    assert h.call("GET", f"/api/v1/users/bob/keys/{escaped}").body == reply.body
    bare = PUBKEY_FINGERPRINT.removeprefix("SHA256:")
    assert h.call("GET", f"/api/v1/users/bob/keys/{bare}").code == 200

    assert h.call("DELETE", f"/api/v1/users/bob/keys/{PUBKEY_FINGERPRINT}").code == 204
    assert h.store.list_ssh_keys("bob") == []
    assert_error(h.call("DELETE", f"/api/v1/users/bob/keys/{PUBKEY_FINGERPRINT}"), 404, "no key")
    assert_error(h.call("GET", f"/api/v1/users/bob/keys/{escaped}"), 404, "no key")


def test_the_same_key_cannot_be_registered_twice(h: Harness) -> None:
    """A key already in use (by anyone) is a 409."""
    h.user("bob")
    h.user("carol")
    h.call("POST", "/api/v1/users/bob/keys", {"key": PUBKEY})
    assert_error(h.call("POST", "/api/v1/users/carol/keys", {"key": PUBKEY}), 409, "already")
    assert h.store.list_ssh_keys("carol") == []


@pytest.mark.parametrize(
    ("key", "fragment"),
    [
        ("", "one OpenSSH public key line"),
        ("ssh-ed25519", "not a valid SSH public key"),
        ("ssh-ed25519 AAAA", "not a valid SSH public key"),
        ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIA==", "not a valid SSH public key"),
        ("hello world", "not a valid SSH public key"),
        (PUBKEY + "\n" + PUBKEY, "one OpenSSH public key line"),
        (PRIVATE_KEY, "private key"),
    ],
)
def test_bad_keys_are_refused(h: Harness, key: str, fragment: str) -> None:
    """Garbage, truncated, multi-line and private keys get a 400 saying what is wrong."""
    h.user("bob")
    assert_error(h.call("POST", "/api/v1/users/bob/keys", {"key": key}), 400, fragment)
    assert h.store.list_ssh_keys("bob") == []


@settings(
    max_examples=60,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(st.text(max_size=200) | st.text(max_size=60).map(lambda t: "ssh-ed25519 " + t))
def test_arbitrary_key_text_never_breaks_the_server(h: Harness, key: str) -> None:
    """Whatever text is sent as a key, the answer is a 201 or a JSON 4xx, never a 500."""
    if h.store.get_user("fuzz") is None:
        h.user("fuzz")
    reply = h.call("POST", "/api/v1/users/fuzz/keys", {"key": key})
    assert reply.code in (201, 400, 409), reply


def test_keys_of_unknown_users_are_404(h: Harness) -> None:
    """Adding or listing keys for a missing user is 404."""
    assert_error(h.call("POST", "/api/v1/users/ghost/keys", {"key": PUBKEY}), 404, "ghost")
    assert_error(h.call("GET", "/api/v1/users/ghost/keys"), 404, "ghost")


# -- permissions -----------------------------------------------------------------------


def test_grant_and_revoke(h: Harness) -> None:
    """PUT sets a grant, a second PUT replaces it, DELETE removes it."""
    h.store.create_repository("org/r")
    h.user("bob")
    reply = h.call("PUT", "/api/v1/repos/org/r/permissions/bob", {"permission": "write"})
    assert reply.body == {"repo": "org/r", "user": "bob", "permission": "write"}
    assert h.store.get_permission("bob", "org/r") == Permission.WRITE
    h.call("PUT", "/api/v1/repos/org/r/permissions/bob", {"permission": "READ"})
    assert h.store.get_permission("bob", "org/r") == Permission.READ
    assert h.call("DELETE", "/api/v1/repos/org/r/permissions/bob").code == 204
    assert h.store.get_permission("bob", "org/r") is None


def test_grant_errors(h: Harness) -> None:
    """Unknown permission 400, unknown user 404, unknown repository 404."""
    h.store.create_repository("org/r")
    h.user("bob")
    assert_error(
        h.call("PUT", "/api/v1/repos/org/r/permissions/bob", {"permission": "owner"}),
        400,
        "unknown permission",
    )
    assert_error(
        h.call("PUT", "/api/v1/repos/org/r/permissions/ghost", {"permission": "read"}), 404, "ghost"
    )
    assert_error(
        h.call("PUT", "/api/v1/repos/org/nope/permissions/bob", {"permission": "read"}),
        404,
        "Repository not found.",
    )
    assert h.store.get_permission("bob", "org/r") is None


def test_a_repository_admin_manages_only_that_repository(h: Harness) -> None:
    """ADMIN on org/r lets a user see it, change visibility and grants; nothing more."""
    h.store.create_repository("org/r")
    h.store.create_repository("org/other")
    ada = h.user("ada")
    h.user("bob")
    h.store.grant("ada", "org/r", Permission.ADMIN)

    assert h.call("GET", "/api/v1/repos/org/r", token=ada).code == 200
    assert h.call("PATCH", "/api/v1/repos/org/r", {"public": True}, token=ada).code == 200
    grant = {"permission": "write"}
    assert h.call("PUT", "/api/v1/repos/org/r/permissions/bob", grant, token=ada).code == 200
    assert h.store.get_permission("bob", "org/r") == Permission.WRITE
    assert h.call("DELETE", "/api/v1/repos/org/r/permissions/bob", token=ada).code == 204

    # Another repository is invisible to her, and deleting her own is a site admin's job.
    assert_error(h.call("GET", "/api/v1/repos/org/other", token=ada), 404, "Repository not found.")
    assert_error(h.call("PUT", "/api/v1/repos/org/other/permissions/bob", grant, token=ada), 404)
    assert_error(h.call("DELETE", "/api/v1/repos/org/r", token=ada), 403)
    assert h.store.get_repository("org/r") is not None


def test_readers_and_writers_cannot_manage_a_repository(h: Harness) -> None:
    """Someone who can see the repository but is not its admin gets 403, not 404."""
    h.store.create_repository("org/r")
    wendy = h.user("wendy")
    h.store.grant("wendy", "org/r", Permission.WRITE)
    assert_error(
        h.call("PATCH", "/api/v1/repos/org/r", {"public": True}, token=wendy),
        403,
        "Permission to org/r.git denied to wendy.",
    )
    assert_error(
        h.call(
            "PUT", "/api/v1/repos/org/r/permissions/wendy", {"permission": "admin"}, token=wendy
        ),
        403,
    )
    assert h.store.get_permission("wendy", "org/r") == Permission.WRITE


# -- cluster status, routing and bodies ----------------------------------------------------


def test_cluster_status_passes_through(h: Harness) -> None:
    """GET /cluster/status returns what the injected status callable reports, now."""
    assert h.call("GET", "/api/v1/cluster/status").body == h.status
    h.status["mode"] = "cluster"
    assert h.call("GET", "/api/v1/cluster/status").body["mode"] == "cluster"


def test_unexpected_failures_are_a_json_500(tmp_path: Path) -> None:
    """A bug behind a route gives a JSON 500 without a traceback in the body."""
    store = LMDBMetadataStore(str(tmp_path / "meta"))
    token_file = bootstrap_admin(store, str(tmp_path))
    assert token_file is not None

    def broken() -> dict[str, Any]:
        raise RuntimeError("secret internals")

    api = AdminAPI(store, Authorizer(store), inline_runner, broken)
    h = Harness(store, api, StubTreq(api.app.resource()), Path(token_file).read_text().strip(), {})
    reply = h.call("GET", "/api/v1/cluster/status")
    assert_error(reply, 500, "internal server error")
    assert "secret" not in json.dumps(reply.body)
    store.close()


def test_unknown_routes_and_methods_get_json_errors(h: Harness) -> None:
    """Unknown paths are a JSON 404; a known path with the wrong method is a JSON 405."""
    assert_error(h.call("GET", "/api/v1/nothing"), 404, "no such API endpoint")
    reply = h.call("PUT", "/api/v1/repos")
    assert_error(reply, 405)
    allow = reply.header("allow")
    assert allow is not None and {"GET", "POST"} <= set(allow.replace(" ", "").split(","))


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b"", "JSON object"),
        (b"{not json", "JSON object"),
        (b"\xff\xfe", "JSON object"),
        (b"[1, 2]", "JSON object"),
        (b'"a/b"', "JSON object"),
        (b'{"name": "a/b", "pubic": true}', "unknown field 'pubic'"),
        (b'{"public": true}', "missing field 'name'"),
        (b'{"name": 7}', "field 'name' must be a string"),
    ],
)
def test_bad_bodies_are_400(h: Harness, data: bytes, fragment: str) -> None:
    """Bodies that are not the expected JSON object are refused with a reason."""
    assert_error(h.call("POST", "/api/v1/repos", data=data), 400, fragment)
    assert h.store.list_repositories() == []


def test_bodies_over_one_mebibyte_are_413(h: Harness) -> None:
    """A body larger than 1 MiB is refused with 413 before it is parsed."""
    padding = b" " * (MAX_BODY_BYTES + 1 - len(b'{"name": "a/b"}'))
    reply = h.call("POST", "/api/v1/repos", data=b'{"name": "a/b"}' + padding)
    assert_error(reply, 413)
    assert h.store.list_repositories() == []
    # Exactly 1 MiB is still fine.
    reply = h.call("POST", "/api/v1/repos", data=b'{"name": "a/b"}' + padding[:-1])
    assert reply.code == 201


def test_oversized_body_without_content_length_is_413(h: Harness) -> None:
    """A chunked body (no Content-Length) is measured as it is read and still refused."""
    channel = DummyChannel()
    channel.site = Site(h.api.app.resource())
    request = Request(channel, False)
    request.content = io.BytesIO(b'{"name": "a/b"}' + b" " * MAX_BODY_BYTES)
    request.requestHeaders.addRawHeader(b"authorization", b"Bearer " + h.admin_token.encode())
    request.requestReceived(b"POST", b"/api/v1/repos", b"HTTP/1.1")
    assert request.code == 413
    assert b"larger than" in channel.transport.written.getvalue()
    assert h.store.list_repositories() == []


def test_prefix_moves_the_routes(tmp_path: Path) -> None:
    """With prefix='/v1' the API answers where a parent resource mounted it."""
    with configured(tmp_path, prefix="/v1") as h:
        assert h.call("GET", "/v1/whoami").body == {"name": "admin", "admin": True}
        assert h.call("GET", "/api/v1/whoami").code == 404


def test_routes_match_the_whole_path_wherever_the_api_is_mounted(h: Harness) -> None:
    """Returned from a parent's /api/ branch route or put as a child, /api/v1/... still routes."""
    parent = Klein()

    @parent.route("/api/", branch=True)
    def api(request: Any) -> Any:
        return h.api.app.resource()

    root = Resource()
    root.putChild(b"api", h.api.app.resource())

    for resource in (parent.resource(), root):
        mounted = Harness(h.store, h.api, StubTreq(resource), h.admin_token, {})
        assert mounted.call("GET", "/api/v1/whoami").body == {"name": "admin", "admin": True}
        reply = mounted.call("GET", "/api/v1/users/admin/keys/SHA256:a%2Fb")
        assert_error(reply, 404, "has no key SHA256:a/b")


# -- refused from the head (AdminAPI.admit, which GuardedChannel asks before reading a body) ----


def admit(h: Harness, path: bytes, authorization: str | None, length: int = 10) -> Request:
    """Run AdminAPI.admit on a POST with these headers; the request, its code set if refused."""
    request = Request(DummyChannel(), False)
    request.method, request.path = b"POST", path
    if authorization is not None:
        request.requestHeaders.addRawHeader(b"authorization", authorization.encode())
    request.requestHeaders.addRawHeader(b"content-length", b"%d" % length)
    results: list[Any] = []
    h.api.admit(request).addBoth(results.append)
    (result,) = results
    request.admitted = result  # type: ignore[attr-defined]
    return request


def refusal(request: Any) -> dict[str, Any]:
    return dict(json.loads(request.admitted))


@pytest.mark.parametrize("authorization", [None, "Bearer gst_nonsense", "Basic eDp5"])
def test_admit_refuses_a_body_without_a_valid_token(h: Harness, authorization: str | None) -> None:
    """No token, a wrong one or the wrong scheme: 401 with the Bearer challenge, from the head."""
    request = admit(h, b"/api/v1/repos", authorization)
    assert request.code == 401
    assert request.responseHeaders.getRawHeaders(b"www-authenticate") == [
        b'Bearer realm="GitStratum"'
    ]
    assert "error" in refusal(request)


def test_admit_lets_a_site_admin_through_within_the_body_limit(h: Harness) -> None:
    """A site admin's body up to max_body is admitted (None); one byte more is 413."""
    assert admit(h, b"/api/v1/repos", f"Bearer {h.admin_token}", MAX_BODY_BYTES).admitted is None
    request = admit(h, b"/api/v1/repos", f"Bearer {h.admin_token}", MAX_BODY_BYTES + 1)
    assert request.code == 413
    assert "larger than" in refusal(request)["error"]


def test_admit_refuses_a_non_admin_everywhere_but_repositories_it_administers(h: Harness) -> None:
    """A plain user: 403 outside /repos/O/N, 404 on a repository it cannot see, through as its ADMIN."""
    bob = f"Bearer {h.user('bob')}"
    h.store.create_repository("o/mine", False)
    h.store.create_repository("o/theirs", False)
    h.store.grant("bob", "o/mine", Permission.ADMIN)
    assert admit(h, b"/api/v1/users", bob).code == 403
    assert admit(h, b"/api/v1/repos", bob).code == 403
    assert admit(h, b"/api/v1/repos/o/theirs", bob).code == 404
    assert admit(h, b"/api/v1/repos/o/mine/permissions/bob", bob).admitted is None
    assert admit(h, b"/api/v1/repos/o/mine", bob).admitted is None
    assert admit(h, b"/api/v1/repos/o/bad..name", bob).code == 400


def test_max_body_is_configurable(tmp_path: Path) -> None:
    """AdminAPI(max_body=...) moves the 413 bound for bodies read and bodies declared."""
    with configured(tmp_path, max_body=20) as h:
        assert h.call("POST", "/api/v1/repos", data=b'{"name": "a/b"}' + b" " * 5).code == 201
        assert_error(h.call("POST", "/api/v1/repos", data=b'{"name": "a/c"}' + b" " * 6), 413)
        assert admit(h, b"/api/v1/repos", f"Bearer {h.admin_token}", 21).code == 413


@pytest.mark.parametrize(
    "data",
    [b"[" * 100_000, b"{" * 33 + b"}" * 33, b'{"name": ' + b"[" * 40 + b"]" * 40 + b"}"],
)
def test_deeply_nested_bodies_are_400_not_500(h: Harness, data: bytes) -> None:
    """A body nested past max_json_depth (32) is 400 saying so; json.loads never recurses into it."""
    assert_error(h.call("POST", "/api/v1/repos", data=data), 400, "nested more than 32 levels")
    assert h.store.list_repositories() == []


def test_nesting_up_to_max_json_depth_is_parsed(tmp_path: Path) -> None:
    """At exactly max_json_depth the body is parsed (and refused only for what it says)."""
    with configured(tmp_path, max_json_depth=3) as h:
        reply = h.call("POST", "/api/v1/repos", data=b'{"name": [[1]]}')
        assert_error(reply, 400, "field 'name' must be a string")
        reply = h.call("POST", "/api/v1/repos", data=b'{"name": [[[1]]]}')
        assert_error(reply, 400, "nested more than 3 levels")
