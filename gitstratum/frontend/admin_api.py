"""The JSON admin API under ``/api/v1/``: repositories, users, tokens, keys and grants.

Every call carries ``Authorization: Bearer TOKEN``.  Most need a site admin;
a repository's ADMIN grantee may also read the repository and manage its
visibility and grants, and ``/whoami`` answers any valid token.  Store calls
go through the injected ``BlockingRunner``, so the reactor never waits on
LMDB (or, in a cluster, on the metadata tier).

The routes are absolute (``/api/v1/...`` unless ``prefix`` says otherwise)
and are matched against the whole request path wherever
``AdminAPI(...).app.resource()`` is mounted: at the root of a site, or
returned from a parent Klein app's ``/api/`` branch route.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Callable, Coroutine, Mapping
from typing import IO, Any, TypeVar
from urllib.parse import unquote_to_bytes

import attrs
from klein import Klein
from klein.resource import KleinResource
from twisted.conch.ssh.keys import Key
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from werkzeug.exceptions import MethodNotAllowed, NotFound

from gitstratum.frontend.auth import (
    REALM,
    Authorizer,
    hash_token,
    new_token,
    parse_bearer,
    ssh_fingerprint,
)
from gitstratum.frontend.http_guard import (
    HTTPLimits,
    JSONTooDeep,
    check_json_depth,
    declared_length,
)
from gitstratum.frontend.paths import RESERVED_OWNERS, valid_repo_name
from gitstratum.frontend.threads import BlockingRunner
from gitstratum.storage.interfaces import (
    IMetadataStore,
    KeyExists,
    Permission,
    Repository,
    RepositoryExists,
    RepositoryNotFound,
    SSHKey,
    StorageError,
    User,
    UserExists,
    UserNotFound,
)

__all__ = [
    "AdminAPI",
    "ApiError",
    "MAX_BODY_BYTES",
    "MAX_JSON_DEPTH",
    "check_repo_name",
    "check_user_name",
]

#: the default bound on a request body (``AdminAPI.max_body``)
MAX_BODY_BYTES = HTTPLimits().api_max_body_bytes
#: the default bound on a request body's JSON nesting (``AdminAPI.max_json_depth``)
MAX_JSON_DEPTH = HTTPLimits().api_max_json_depth

T = TypeVar("T")

_USER_NAME = re.compile(r"\A[A-Za-z0-9_.-]{1,64}\Z")
_JSON = b"application/json"


class ApiError(Exception):
    """A refusal with its HTTP status; the API answers it as ``{"error": message}``."""

    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = dict(headers or {})


def check_repo_name(name: str) -> str:
    """Return *name* if it is a valid ``OWNER/NAME``; raise ValueError saying why not.

    The rule is ``paths.valid_repo_name``, the one every transport serves by,
    so no repository can be created that HTTP, SSH or git:// cannot reach.
    """
    if valid_repo_name(name):
        return name
    parts = name.split("/")
    if len(parts) != 2:
        raise ValueError(f"invalid repository name {name!r}: expected OWNER/NAME")
    if parts[0] in RESERVED_OWNERS:
        raise ValueError(f"invalid repository name {name!r}: {parts[0]!r} is a reserved owner")
    if any(p.endswith(".git") for p in parts):
        raise ValueError(f"invalid repository name {name!r}: leave off the '.git' suffix")
    raise ValueError(
        f"invalid repository name {name!r}: OWNER and NAME must each be 1-100 of the "
        "characters A-Z a-z 0-9 . _ -, start with a letter, digit or '_', hold no '..' "
        "and not end with '.'"
    )


def check_user_name(name: str) -> str:
    """Return *name* if it is a valid user name; raise ValueError saying why not."""
    # "." and ".." would be dot-segments in /api/v1/users/<name>/... URLs.
    if not _USER_NAME.match(name) or name in (".", ".."):
        raise ValueError(
            f"invalid user name {name!r}: use 1-64 of the characters A-Z a-z 0-9 _ . -"
        )
    return name


def _repo_json(repo: Repository) -> dict[str, Any]:
    return {"name": repo.name, "public": repo.public, "head": repo.head.decode("utf-8", "replace")}


def _user_json(user: User) -> dict[str, Any]:
    return {"name": user.name, "admin": user.is_admin}


def _key_type(blob: bytes) -> str:
    # An SSH public key blob starts with its algorithm name as an SSH string.
    n = int.from_bytes(blob[:4], "big")
    return blob[4 : 4 + n].decode("ascii", "replace")


def _key_json(key: SSHKey) -> dict[str, Any]:
    kind = _key_type(key.blob)
    line = f"{kind} {base64.b64encode(key.blob).decode('ascii')}"
    if key.comment:
        line += f" {key.comment}"
    return {
        "user": key.user,
        "fingerprint": key.fingerprint,
        "type": kind,
        "comment": key.comment,
        "key": line,
    }


def _parse_public_key(user: str, text: str) -> SSHKey:
    """An ``SSHKey`` from one OpenSSH public key line (``TYPE BASE64 [COMMENT]``)."""
    if "PRIVATE KEY" in text:
        raise ApiError(400, "that is a private key; send the public key (the .pub file)")
    line = text.strip()
    if not line or "\n" in line:
        raise ApiError(400, "expected one OpenSSH public key line: TYPE BASE64 [COMMENT]")
    fields = line.split(None, 2)
    try:
        key = Key.fromString(" ".join(fields[:2]).encode("utf-8"))
    except Exception as e:
        # Conch raises whatever its parser trips over (BadKeyError, ValueError,
        # struct.error, IndexError, ...); all of them mean "not a key".
        raise ApiError(400, "not a valid SSH public key") from e
    if not key.isPublic():
        raise ApiError(400, "that is a private key; send the public key (the .pub file)")
    blob = key.blob()
    comment = fields[2] if len(fields) > 2 else ""
    return SSHKey(user=user, fingerprint=ssh_fingerprint(blob), blob=blob, comment=comment)


def _normalise_fingerprint(fingerprint: str) -> str:
    body = fingerprint[len("SHA256:") :] if fingerprint.startswith("SHA256:") else fingerprint
    return "SHA256:" + body.rstrip("=")


_MISSING = object()


def _field(body: Mapping[str, Any], key: str, kind: type, default: Any = _MISSING) -> Any:
    value = body.get(key, default)
    if value is _MISSING:
        raise ApiError(400, f"missing field {key!r}")
    # bool is an int subclass; an exact type check keeps 1 from passing as true.
    if type(value) is not kind:
        raise ApiError(400, f"field {key!r} must be a {_KIND_NAMES[kind]}")
    return value


_KIND_NAMES = {str: "string", bool: "boolean"}


_STORE_ERRORS: dict[type[StorageError], tuple[int, str]] = {
    RepositoryExists: (409, "repository already exists"),
    RepositoryNotFound: (404, "Repository not found."),
    UserExists: (409, "user already exists"),
    UserNotFound: (404, "user not found"),
    KeyExists: (409, "that key is already registered"),
}


class _WholePathResource(KleinResource):
    """A Klein resource that routes on the full request path, not on what its parents left.

    A parent that mounts us (a branch route, ``putChild``) moves the segments
    it consumed into ``prepath``; Klein would then match only the rest, and
    ``/api/v1/repos`` would be looked up as ``/v1/repos``.
    """

    def render(self, request: IRequest) -> Any:
        path: bytes = request.path
        request.prepath = []
        request.postpath = [unquote_to_bytes(s) for s in path[1:].split(b"/")]
        return super().render(request)


class _WholePathKlein(Klein):
    def resource(self) -> KleinResource:
        return _WholePathResource(self)


_Reply = tuple[int, Any]
_Handler = Callable[..., Coroutine[Any, Any, _Reply]]


@attrs.define(eq=False)
class AdminAPI:
    """The admin API as a Klein app; serve ``app.resource()``."""

    metadata: IMetadataStore
    authorizer: Authorizer
    run: BlockingRunner
    cluster_status: Callable[[], dict[str, Any]]
    prefix: str = attrs.field(default="/api/v1", kw_only=True)
    #: bytes a request body may bring
    max_body: int = attrs.field(default=MAX_BODY_BYTES, kw_only=True)
    #: how deeply a request body's JSON may nest
    max_json_depth: int = attrs.field(default=MAX_JSON_DEPTH, kw_only=True)
    app: Klein = attrs.field(init=False, factory=_WholePathKlein)

    _log = Logger()

    def __attrs_post_init__(self) -> None:
        routes: list[tuple[str, str, _Handler]] = [
            ("/repos", "POST", self._create_repo),
            ("/repos", "GET", self._list_repos),
            ("/repos/<owner>/<name>", "GET", self._get_repo),
            ("/repos/<owner>/<name>", "PATCH", self._patch_repo),
            ("/repos/<owner>/<name>", "DELETE", self._delete_repo),
            ("/repos/<owner>/<name>/permissions/<grantee>", "PUT", self._grant),
            ("/repos/<owner>/<name>/permissions/<grantee>", "DELETE", self._revoke),
            ("/users", "POST", self._create_user),
            ("/users", "GET", self._list_users),
            ("/users/<name>/tokens", "POST", self._create_token),
            ("/users/<name>/keys", "POST", self._add_key),
            ("/users/<name>/keys", "GET", self._list_keys),
            ("/users/<name>/keys/<path:fingerprint>", "GET", self._get_key),
            ("/users/<name>/keys/<path:fingerprint>", "DELETE", self._remove_key),
            ("/cluster/status", "GET", self._cluster_status),
            ("/whoami", "GET", self._whoami),
        ]
        for path, method, handler in routes:
            self.app.route(self.prefix + path, methods=[method], endpoint=f"{method} {path}")(
                self._endpoint(handler)
            )
        self.app.handle_errors(NotFound)(self._not_found)
        self.app.handle_errors(MethodNotAllowed)(self._method_not_allowed)

    # -- plumbing -------------------------------------------------------------

    def _endpoint(self, handler: _Handler) -> Callable[..., Deferred[bytes]]:
        def endpoint(request: IRequest, **kwargs: Any) -> Deferred[bytes]:
            d: Deferred[_Reply] = ensureDeferred(handler(request, **kwargs))
            return d.addCallbacks(
                lambda reply: _respond(request, *reply),
                lambda failure: self._failed(request, failure),
            )

        return endpoint

    def _failed(self, request: IRequest, failure: Failure) -> bytes:
        error = failure.value
        if isinstance(error, ApiError):
            for name, value in error.headers.items():
                request.setHeader(name.encode("ascii"), value.encode("latin-1"))
            return _respond(request, error.status, {"error": error.message})
        for kind, (status, message) in _STORE_ERRORS.items():
            if isinstance(error, kind):
                return _respond(request, status, {"error": str(error) or message})
        self._log.failure("admin API request failed", failure)
        return _respond(request, 500, {"error": "internal server error"})

    def _not_found(self, request: IRequest, failure: Failure) -> bytes:
        return _respond(request, 404, {"error": "no such API endpoint"})

    def _method_not_allowed(self, request: IRequest, failure: Failure) -> bytes:
        error = failure.value
        assert isinstance(error, MethodNotAllowed)
        if error.valid_methods:
            request.setHeader(b"allow", ", ".join(error.valid_methods).encode("ascii"))
        return _respond(request, 405, {"error": "method not allowed"})

    def admit(self, request: IRequest) -> Deferred[bytes | None]:
        """Refuse a request that brings a body from its headers alone, before the body is read.

        ``GuardedChannel`` asks this when the headers are complete.  The
        caller must hold a valid token (else 401), be a site admin or, under
        ``/repos/OWNER/NAME``, an ADMIN grantee of that repository (else what
        the route would answer: 403 or 404), and declare no more than
        ``max_body`` bytes (else 413).  None means: read the body and route.
        """
        d: Deferred[None] = ensureDeferred(self._admit(request))
        return d.addErrback(lambda failure: self._failed(request, failure))

    async def _admit(self, request: IRequest) -> None:
        user = await self._caller(request)
        if not user.is_admin:
            path: bytes = request.path
            parts = path[len(self.prefix) :].split(b"/")
            if not path.startswith(self.prefix.encode() + b"/repos/") or len(parts) < 4:
                raise ApiError(403, "you must be a site administrator to do that")
            owner, name = (unquote_to_bytes(p).decode("utf-8", "replace") for p in parts[2:4])
            await self._repo_admin(request, owner, name)
        length = declared_length(request)
        if length is not None and length > self.max_body:
            raise ApiError(413, f"request body is larger than {self.max_body} bytes")

    async def _json(self, request: IRequest, fields: set[str]) -> dict[str, Any]:
        """The request body as a JSON object with no fields outside *fields* (parsed off the reactor)."""
        return await self._call(
            _read_json, request.content, fields, self.max_body, self.max_json_depth
        )

    async def _call(self, f: Callable[..., T], *args: Any) -> T:
        return await self.run(f, *args)

    async def _caller(self, request: IRequest) -> User:
        token = parse_bearer(request.getHeader(b"authorization"))
        challenge = {"WWW-Authenticate": f'Bearer realm="{REALM}"'}
        if token is None:
            raise ApiError(
                401, "authentication required: send Authorization: Bearer TOKEN", challenge
            )
        user = await self._call(self.authorizer.user_for_token, token)
        if user is None:
            raise ApiError(401, "invalid token", challenge)
        return user

    async def _site_admin(self, request: IRequest) -> User:
        user = await self._caller(request)
        if not user.is_admin:
            raise ApiError(403, "you must be a site administrator to do that")
        return user

    async def _repo_admin(self, request: IRequest, owner: str, name: str) -> Repository:
        """The repository, if the caller is a site admin or holds ADMIN on it."""
        user = await self._caller(request)
        repo_name = _checked(check_repo_name, f"{owner}/{name}")
        repo = await self._call(self.metadata.get_repository, repo_name)
        decision = await self._call(self.authorizer.decide, user, repo, Permission.ADMIN)
        if not decision.allowed:
            raise ApiError(decision.status, decision.message)
        assert repo is not None
        return repo

    async def _user(self, name: str) -> User:
        user = await self._call(self.metadata.get_user, _checked(check_user_name, name))
        if user is None:
            raise ApiError(404, f"user {name!r} not found")
        return user

    # -- repositories ---------------------------------------------------------

    async def _create_repo(self, request: IRequest) -> _Reply:
        await self._site_admin(request)
        body = await self._json(request, {"name", "public"})
        name = _checked(check_repo_name, _field(body, "name", str))
        public = _field(body, "public", bool, False)
        try:
            repo = await self._call(self.metadata.create_repository, name, public)
        except RepositoryExists:
            raise ApiError(409, f"repository {name!r} already exists") from None
        return 201, _repo_json(repo)

    async def _list_repos(self, request: IRequest) -> _Reply:
        await self._site_admin(request)
        repos = await self._call(self.metadata.list_repositories)
        return 200, {"repos": [_repo_json(r) for r in repos]}

    async def _get_repo(self, request: IRequest, owner: str, name: str) -> _Reply:
        repo = await self._repo_admin(request, owner, name)
        return 200, _repo_json(repo)

    async def _patch_repo(self, request: IRequest, owner: str, name: str) -> _Reply:
        repo = await self._repo_admin(request, owner, name)
        body = await self._json(request, {"public"})
        public = _field(body, "public", bool)
        repo = await self._call(self.metadata.set_public, repo.name, public)
        return 200, _repo_json(repo)

    async def _delete_repo(self, request: IRequest, owner: str, name: str) -> _Reply:
        await self._site_admin(request)
        repo_name = _checked(check_repo_name, f"{owner}/{name}")
        await self._call(self.metadata.delete_repository, repo_name)
        return 204, None

    async def _grant(self, request: IRequest, owner: str, name: str, grantee: str) -> _Reply:
        repo = await self._repo_admin(request, owner, name)
        body = await self._json(request, {"permission"})
        permission = _checked(Permission.parse, _field(body, "permission", str))
        user = await self._user(grantee)
        await self._call(self.metadata.grant, user.name, repo.name, permission)
        return 200, {"repo": repo.name, "user": user.name, "permission": permission.name.lower()}

    async def _revoke(self, request: IRequest, owner: str, name: str, grantee: str) -> _Reply:
        repo = await self._repo_admin(request, owner, name)
        user = await self._user(grantee)
        await self._call(self.metadata.grant, user.name, repo.name, None)
        return 204, None

    # -- users, tokens, keys --------------------------------------------------

    async def _create_user(self, request: IRequest) -> _Reply:
        await self._site_admin(request)
        body = await self._json(request, {"name", "admin"})
        name = _checked(check_user_name, _field(body, "name", str))
        admin = _field(body, "admin", bool, False)
        try:
            user = await self._call(self.metadata.create_user, name, admin)
        except UserExists:
            raise ApiError(409, f"user {name!r} already exists") from None
        return 201, _user_json(user)

    async def _list_users(self, request: IRequest) -> _Reply:
        await self._site_admin(request)
        users = await self._call(self.metadata.list_users)
        return 200, {"users": [_user_json(u) for u in users]}

    async def _create_token(self, request: IRequest, name: str) -> _Reply:
        await self._site_admin(request)
        user = await self._user(name)
        token = new_token()
        await self._call(self.metadata.add_token, user.name, hash_token(token))
        return 201, {"user": user.name, "token": token}

    async def _add_key(self, request: IRequest, name: str) -> _Reply:
        await self._site_admin(request)
        body = await self._json(request, {"key"})
        text = _field(body, "key", str)
        user = await self._user(name)
        key = _parse_public_key(user.name, text)
        try:
            await self._call(self.metadata.add_ssh_key, key)
        except KeyExists:
            raise ApiError(409, f"key {key.fingerprint} is already registered") from None
        return 201, _key_json(key)

    async def _list_keys(self, request: IRequest, name: str) -> _Reply:
        await self._site_admin(request)
        user = await self._user(name)
        keys = await self._call(self.metadata.list_ssh_keys, user.name)
        return 200, {"keys": [_key_json(k) for k in keys]}

    async def _get_key(self, request: IRequest, name: str, fingerprint: str) -> _Reply:
        await self._site_admin(request)
        user = await self._user(name)
        wanted = _normalise_fingerprint(fingerprint)
        for key in await self._call(self.metadata.list_ssh_keys, user.name):
            if key.fingerprint == wanted:
                return 200, _key_json(key)
        raise ApiError(404, f"user {user.name!r} has no key {wanted}")

    async def _remove_key(self, request: IRequest, name: str, fingerprint: str) -> _Reply:
        await self._site_admin(request)
        user = await self._user(name)
        wanted = _normalise_fingerprint(fingerprint)
        if not await self._call(self.metadata.remove_ssh_key, user.name, wanted):
            raise ApiError(404, f"user {user.name!r} has no key {wanted}")
        return 204, None

    # -- the rest -------------------------------------------------------------

    async def _cluster_status(self, request: IRequest) -> _Reply:
        await self._site_admin(request)
        return 200, self.cluster_status()

    async def _whoami(self, request: IRequest) -> _Reply:
        user = await self._caller(request)
        return 200, _user_json(user)


def _checked(check: Callable[[str], T], value: str) -> T:
    try:
        return check(value)
    except ValueError as e:
        raise ApiError(400, str(e)) from None


def _read_json(
    content: IO[bytes] | None, fields: set[str], max_body: int, max_depth: int
) -> dict[str, Any]:
    """A request body as a JSON object with no fields outside *fields*.

    At most *max_body* bytes are read, and the nesting is measured before
    ``json.loads`` (which recurses once per level) sees the text.
    """
    raw = content.read(max_body + 1) if content is not None else b""
    if len(raw) > max_body:
        raise ApiError(413, f"request body is larger than {max_body} bytes")
    try:
        text = raw.decode("utf-8")
        check_json_depth(text, max_depth)
        body = json.loads(text)
    except JSONTooDeep as e:
        raise ApiError(400, str(e)) from None
    except (UnicodeDecodeError, ValueError):
        raise ApiError(400, "request body must be a JSON object") from None
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object")
    unknown = sorted(set(body) - fields)
    if unknown:
        raise ApiError(400, f"unknown field {unknown[0]!r}")
    return body


def _respond(request: IRequest, status: int, body: Any) -> bytes:
    request.setResponseCode(status)
    # Responses carry tokens and ACLs; no proxy or browser should keep them.
    request.setHeader(b"cache-control", b"no-store")
    if status == 204:
        return b""
    request.setHeader(b"content-type", _JSON)
    return json.dumps(body, sort_keys=True).encode("utf-8") + b"\n"
