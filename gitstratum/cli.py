"""The ``gitstratum`` admin command: a thin client of the JSON API under ``/api/v1/``.

``main`` parses the command line and runs one request under
``twisted.internet.task.react``.  ``execute`` is the part after parsing: it
takes any treq-style HTTP client, so tests drive it with ``StubTreq`` against
an in-memory ``AdminAPI`` and no sockets.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import IO, Any, NoReturn, Protocol
from urllib.parse import quote

import attrs
from treq.client import HTTPClient as TreqClient
from twisted.internet import task
from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.internet.error import ConnectError, DNSLookupError
from twisted.web.client import Agent, ResponseFailed
from twisted.web.error import SchemeNotSupported
from twisted.web.iweb import IResponse

__all__ = ["main", "execute", "build_parser", "HTTPClient", "CLIError", "DEFAULT_URL"]

DEFAULT_URL = "http://localhost:8080"
PROG = "gitstratum"


class HTTPClient(Protocol):
    """What the CLI needs of an HTTP client: ``treq.client.HTTPClient`` and ``StubTreq`` both fit."""

    def request(
        self, method: str, url: str, *, headers: Any = ..., json: Any = ...
    ) -> Deferred[Any]: ...


class CLIError(Exception):
    """A failure to report as ``gitstratum: error: <message>`` with exit status 1."""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose subcommands also say "gitstratum: error: ..."."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(2, f"{PROG}: error: {message}\n")


def _repo_name(text: str) -> str:
    owner, sep, name = text.partition("/")
    if not sep or not owner or not name or "/" in name:
        raise argparse.ArgumentTypeError(f"expected OWNER/NAME, not {text!r}")
    return text


def build_parser() -> argparse.ArgumentParser:
    """The command-line grammar (exposed so the README can be checked against it)."""
    parser = _Parser(
        prog=PROG,
        description="Administer a GitStratum server through its JSON API.",
        epilog="GITSTRATUM_URL and GITSTRATUM_TOKEN stand in for --url and --token.",
    )
    parser.add_argument("--url", help=f"the server's base URL (default {DEFAULT_URL})")
    parser.add_argument("--token", help="an API token (a site admin's for most commands)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    repo = commands.add_parser("repo", help="create, list and delete repositories")
    repo_cmds = repo.add_subparsers(dest="action", metavar="ACTION", required=True)
    create = repo_cmds.add_parser("create", help="create a repository")
    create.add_argument("repo", metavar="OWNER/NAME", type=_repo_name)
    create.add_argument("--public", action="store_true", help="let anyone read it")
    create.set_defaults(run=_repo_create)
    repo_cmds.add_parser("list", help="list every repository").set_defaults(run=_repo_list)
    delete = repo_cmds.add_parser("delete", help="delete a repository and all its data")
    delete.add_argument("repo", metavar="OWNER/NAME", type=_repo_name)
    delete.set_defaults(run=_repo_delete)

    user = commands.add_parser("user", help="create users")
    user_cmds = user.add_subparsers(dest="action", metavar="ACTION", required=True)
    create = user_cmds.add_parser("create", help="create a user")
    create.add_argument("name", metavar="NAME")
    create.add_argument("--admin", action="store_true", help="make the user a site admin")
    create.set_defaults(run=_user_create)

    token = commands.add_parser("token", help="mint API tokens")
    token_cmds = token.add_subparsers(dest="action", metavar="ACTION", required=True)
    create = token_cmds.add_parser("create", help="mint a token for USER and print it")
    create.add_argument("user", metavar="USER")
    create.set_defaults(run=_token_create)

    key = commands.add_parser("key", help="manage SSH public keys")
    key_cmds = key.add_subparsers(dest="action", metavar="ACTION", required=True)
    add = key_cmds.add_parser("add", help="register a public key for USER")
    add.add_argument("user", metavar="USER")
    add.add_argument(
        "pubkey_file", metavar="PUBKEY_FILE", help="an OpenSSH .pub file, or - for stdin"
    )
    add.set_defaults(run=_key_add)
    listing = key_cmds.add_parser("list", help="list USER's keys")
    listing.add_argument("user", metavar="USER")
    listing.set_defaults(run=_key_list)
    remove = key_cmds.add_parser("remove", help="remove one of USER's keys")
    remove.add_argument("user", metavar="USER")
    remove.add_argument("fingerprint", metavar="FINGERPRINT", help="as shown by 'key list'")
    remove.set_defaults(run=_key_remove)

    grant = commands.add_parser("grant", help="give USER a permission on a repository")
    grant.add_argument("user", metavar="USER")
    grant.add_argument("repo", metavar="OWNER/NAME", type=_repo_name)
    grant.add_argument("permission", choices=["read", "write", "admin"])
    grant.set_defaults(run=_grant)

    revoke = commands.add_parser("revoke", help="take away USER's permission on a repository")
    revoke.add_argument("user", metavar="USER")
    revoke.add_argument("repo", metavar="OWNER/NAME", type=_repo_name)
    revoke.set_defaults(run=_revoke)

    cluster = commands.add_parser("cluster", help="inspect the cluster")
    cluster_cmds = cluster.add_subparsers(dest="action", metavar="ACTION", required=True)
    cluster_cmds.add_parser("status", help="print the cluster status as JSON").set_defaults(
        run=_cluster_status
    )
    return parser


@attrs.frozen
class _Session:
    client: HTTPClient
    url: str
    token: str
    stdout: IO[str]
    stdin: IO[str]

    async def call(
        self, method: str, path: Sequence[str], body: Mapping[str, Any] | None = None
    ) -> Any:
        """Send one API request; return the decoded JSON body (None for 204) or raise CLIError."""
        url = self.url.rstrip("/") + "/api/v1/" + "/".join(quote(p, safe=":") for p in path)
        kwargs: dict[str, Any] = {
            "headers": {"Authorization": f"Bearer {self.token}", "Accept": "application/json"}
        }
        if body is not None:
            kwargs["json"] = body
        try:
            response = await self.client.request(method, url, **kwargs)
            content: bytes = await response.content()
        except (ConnectError, DNSLookupError, ResponseFailed, SchemeNotSupported) as e:
            raise CLIError(f"cannot reach {self.url}: {_describe(e)}") from None
        if response.code == 204:
            return None
        try:
            decoded = json.loads(content) if content else None
        except ValueError:
            decoded = None
        if 200 <= response.code < 300:
            if decoded is None:
                raise CLIError(f"{url}: the server answered {response.code} without JSON")
            return decoded
        if isinstance(decoded, dict) and isinstance(decoded.get("error"), str):
            raise CLIError(decoded["error"])
        raise CLIError(f"{url}: HTTP {response.code} {_phrase(response)}".rstrip())

    def print(self, line: str) -> None:
        self.stdout.write(line + "\n")


def _describe(error: Exception) -> str:
    if isinstance(error, ResponseFailed) and error.reasons:
        return str(error.reasons[0].value) or type(error.reasons[0].value).__name__
    return str(error) or type(error).__name__


def _phrase(response: IResponse) -> str:
    phrase = response.phrase
    return phrase.decode("latin-1") if isinstance(phrase, bytes) else str(phrase)


def _repo_path(name: str) -> list[str]:
    owner, _, repo = name.partition("/")
    return ["repos", owner, repo]


async def _repo_create(s: _Session, o: argparse.Namespace) -> None:
    repo = await s.call("POST", ["repos"], {"name": o.repo, "public": o.public})
    s.print(f"created {repo['name']} ({'public' if repo['public'] else 'private'})")


async def _repo_list(s: _Session, o: argparse.Namespace) -> None:
    listing = await s.call("GET", ["repos"])
    for repo in listing["repos"]:
        s.print(f"{repo['name']}\t{'public' if repo['public'] else 'private'}")


async def _repo_delete(s: _Session, o: argparse.Namespace) -> None:
    await s.call("DELETE", _repo_path(o.repo))
    s.print(f"deleted {o.repo}")


async def _user_create(s: _Session, o: argparse.Namespace) -> None:
    user = await s.call("POST", ["users"], {"name": o.name, "admin": o.admin})
    s.print(f"created user {user['name']}" + (" (site admin)" if user["admin"] else ""))


async def _token_create(s: _Session, o: argparse.Namespace) -> None:
    reply = await s.call("POST", ["users", o.user, "tokens"])
    # Only the token, so that `TOKEN=$(gitstratum token create bob)` works.
    s.print(reply["token"])


async def _key_add(s: _Session, o: argparse.Namespace) -> None:
    try:
        if o.pubkey_file == "-":
            text = s.stdin.read()
        else:
            with open(o.pubkey_file, encoding="utf-8") as f:
                text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise CLIError(f"cannot read {o.pubkey_file}: {reason}") from None
    key = await s.call("POST", ["users", o.user, "keys"], {"key": text})
    s.print(f"added {key['fingerprint']} ({key['type']}) for {key['user']}")


async def _key_list(s: _Session, o: argparse.Namespace) -> None:
    listing = await s.call("GET", ["users", o.user, "keys"])
    for key in listing["keys"]:
        s.print(f"{key['fingerprint']} {key['type']} {key['comment']}".rstrip())


async def _key_remove(s: _Session, o: argparse.Namespace) -> None:
    await s.call("DELETE", ["users", o.user, "keys", o.fingerprint])
    s.print(f"removed {o.fingerprint} from {o.user}")


async def _grant(s: _Session, o: argparse.Namespace) -> None:
    await s.call("PUT", [*_repo_path(o.repo), "permissions", o.user], {"permission": o.permission})
    s.print(f"granted {o.permission} on {o.repo} to {o.user}")


async def _revoke(s: _Session, o: argparse.Namespace) -> None:
    await s.call("DELETE", [*_repo_path(o.repo), "permissions", o.user])
    s.print(f"revoked {o.user}'s access to {o.repo}")


async def _cluster_status(s: _Session, o: argparse.Namespace) -> None:
    status = await s.call("GET", ["cluster", "status"])
    s.print(json.dumps(status, indent=2, sort_keys=True))


def _fail(stderr: IO[str], message: str) -> None:
    stderr.write(f"{PROG}: error: {message}\n")


async def _execute(
    options: argparse.Namespace,
    client: HTTPClient,
    stdout: IO[str],
    stderr: IO[str],
    stdin: IO[str],
) -> int:
    run: Callable[[_Session, argparse.Namespace], Awaitable[None]] = options.run
    session = _Session(
        client=client, url=options.url, token=options.token, stdout=stdout, stdin=stdin
    )
    try:
        await run(session, options)
    except CLIError as e:
        _fail(stderr, str(e))
        return 1
    return 0


def _parse(
    argv: Sequence[str] | None, env: Mapping[str, str], stdout: IO[str], stderr: IO[str]
) -> argparse.Namespace | int:
    """Parsed options with url and token resolved, or the exit status of a usage error."""
    parser = build_parser()
    # argparse prints --help and usage errors to the sys streams; point them at ours.
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            options = parser.parse_args(argv)
            options.url = options.url or env.get("GITSTRATUM_URL") or DEFAULT_URL
            options.token = options.token or env.get("GITSTRATUM_TOKEN")
            if not options.token:
                parser.error("no API token: pass --token or set GITSTRATUM_TOKEN")
        except SystemExit as e:
            return e.code if isinstance(e.code, int) else 2
    return options


def execute(
    argv: Sequence[str],
    *,
    client: HTTPClient,
    env: Mapping[str, str] | None = None,
    stdout: IO[str] | None = None,
    stderr: IO[str] | None = None,
    stdin: IO[str] | None = None,
) -> Deferred[int]:
    """Run one command line against *client*; fires with the exit status (0, 1 or 2)."""
    out, err, inp = stdout or sys.stdout, stderr or sys.stderr, stdin or sys.stdin
    parsed = _parse(argv, os.environ if env is None else env, out, err)
    if isinstance(parsed, int):
        return succeed(parsed)
    return ensureDeferred(_execute(parsed, client, out, err, inp))


def _treq_client(reactor: Any) -> HTTPClient:
    # Agent's own pool is not persistent, so a one-shot command leaves no socket open.
    return TreqClient(Agent(reactor))


def main(
    argv: Sequence[str] | None = None,
    *,
    react: Callable[..., Any] = task.react,
    make_client: Callable[[Any], HTTPClient] = _treq_client,
) -> int:
    """The console script: parse *argv* (default ``sys.argv[1:]``), run, return the exit status.

    *react* and *make_client* are seams for tests; the defaults run the real
    reactor with a real treq client.
    """
    parsed = _parse(argv, os.environ, sys.stdout, sys.stderr)
    if isinstance(parsed, int):
        return parsed
    options = parsed

    async def run(reactor: Any) -> None:
        status = await _execute(options, make_client(reactor), sys.stdout, sys.stderr, sys.stdin)
        if status:
            raise SystemExit(status)

    try:
        react(run)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
