"""The ``gitstratum`` admin command: a thin client of the JSON API under ``/api/v1/``.

``main`` parses the command line with ``twisted.python.usage`` (the parser of
the twistd plugins, so the project has one style) and runs one request under
``twisted.internet.task.react``.  ``execute`` is the part after parsing: it
takes any treq-style HTTP client, so tests drive it with ``StubTreq`` against
an in-memory ``AdminAPI`` and no sockets.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import IO, Any, ClassVar, NoReturn, Protocol, cast
from urllib.parse import quote

import attrs
from treq.client import HTTPClient as TreqClient
from twisted.internet import task
from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.internet.error import ConnectError, DNSLookupError
from twisted.python import usage
from twisted.web.client import Agent, ResponseFailed
from twisted.web.error import SchemeNotSupported
from twisted.web.iweb import IResponse

from gitstratum import __version__, cmdline
from gitstratum.cluster import commands as wire
from gitstratum.cluster import devcluster
from gitstratum.cluster import secret as secret_file
from gitstratum.cluster.member import parse_join
from gitstratum.cluster.status import (
    StatusUnavailable,
    cluster_status,
    control_call,
    format_status,
)

__all__ = ["main", "execute", "Options", "HTTPClient", "CLIError", "DEFAULT_URL"]

DEFAULT_URL = "http://localhost:8080"
PROG = "gitstratum"


class HTTPClient(Protocol):
    """What the CLI needs of an HTTP client: ``treq.client.HTTPClient`` and ``StubTreq`` both fit."""

    def request(
        self, method: str, url: str, *, headers: Any = ..., json: Any = ...
    ) -> Deferred[Any]: ...


class CLIError(Exception):
    """A failure to report as ``gitstratum: error: <message>`` with exit status 1."""


@attrs.frozen
class _Session:
    client: HTTPClient
    url: str
    token: str
    stdout: IO[str]
    stdin: IO[str]
    #: the running reactor, for commands that speak AMP to a control node
    reactor: Any = None

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


async def _repo_create(s: _Session, o: _Command) -> None:
    repo = await s.call("POST", ["repos"], {"name": o["repo"], "public": bool(o["public"])})
    s.print(f"created {repo['name']} ({'public' if repo['public'] else 'private'})")


async def _repo_list(s: _Session, o: _Command) -> None:
    listing = await s.call("GET", ["repos"])
    for repo in listing["repos"]:
        s.print(f"{repo['name']}\t{'public' if repo['public'] else 'private'}")


async def _repo_delete(s: _Session, o: _Command) -> None:
    await s.call("DELETE", _repo_path(o["repo"]))
    s.print(f"deleted {o['repo']}")


async def _user_create(s: _Session, o: _Command) -> None:
    user = await s.call("POST", ["users"], {"name": o["name"], "admin": bool(o["admin"])})
    s.print(f"created user {user['name']}" + (" (site admin)" if user["admin"] else ""))


async def _token_create(s: _Session, o: _Command) -> None:
    reply = await s.call("POST", ["users", o["user"], "tokens"])
    # Only the token, so that `TOKEN=$(gitstratum token create bob)` works.
    s.print(reply["token"])


async def _key_add(s: _Session, o: _Command) -> None:
    try:
        if o["pubkey_file"] == "-":
            text = s.stdin.read()
        else:
            with open(o["pubkey_file"], encoding="utf-8") as f:
                text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise CLIError(f"cannot read {o['pubkey_file']}: {reason}") from None
    key = await s.call("POST", ["users", o["user"], "keys"], {"key": text})
    s.print(f"added {key['fingerprint']} ({key['type']}) for {key['user']}")


async def _key_list(s: _Session, o: _Command) -> None:
    listing = await s.call("GET", ["users", o["user"], "keys"])
    for key in listing["keys"]:
        s.print(f"{key['fingerprint']} {key['type']} {key['comment']}".rstrip())


async def _key_remove(s: _Session, o: _Command) -> None:
    await s.call("DELETE", ["users", o["user"], "keys", o["fingerprint"]])
    s.print(f"removed {o['fingerprint']} from {o['user']}")


async def _grant(s: _Session, o: _Command) -> None:
    await s.call(
        "PUT", [*_repo_path(o["repo"]), "permissions", o["user"]], {"permission": o["permission"]}
    )
    s.print(f"granted {o['permission']} on {o['repo']} to {o['user']}")


async def _revoke(s: _Session, o: _Command) -> None:
    await s.call("DELETE", [*_repo_path(o["repo"]), "permissions", o["user"]])
    s.print(f"revoked {o['user']}'s access to {o['repo']}")


def _control(o: _Command) -> tuple[tuple[str, ...], bytes]:
    """The control addresses and the cluster secret a ``--control`` command was given."""
    try:
        return parse_join(o["control"]), secret_file.load(o["cluster-secret-file"])
    except (secret_file.SecretError, ValueError) as e:
        raise CLIError(str(e)) from None


async def _cluster_status(s: _Session, o: _Command) -> None:
    if not o["control"]:
        status = await s.call("GET", ["cluster", "status"])
        s.print(json.dumps(status, indent=2, sort_keys=True))
        return
    addresses, secret = _control(o)
    try:
        doc = await cluster_status(s.reactor, addresses, secret)
    except StatusUnavailable as e:
        raise CLIError(f"no control node answered: {e}") from None
    s.print(json.dumps(doc, indent=2, sort_keys=True) if o["json"] else format_status(doc))


async def _cluster_change(s: _Session, o: _Command, command: type[Any], done: str) -> None:
    addresses, secret = _control(o)
    try:
        answer = await control_call(s.reactor, addresses, secret, command, node=o["node"])
    except wire.Refused as e:
        raise CLIError(f"refused: {e}") from None
    except wire.NoLeader:
        raise CLIError("no control node leads right now (an election); try again") from None
    except StatusUnavailable as e:
        raise CLIError(f"no control node answered: {e}") from None
    s.print(f"{done} {o['node']} (epoch {answer['epoch']})")


async def _cluster_drain(s: _Session, o: _Command) -> None:
    await _cluster_change(s, o, wire.Drain, "draining")


async def _cluster_remove(s: _Session, o: _Command) -> None:
    await _cluster_change(s, o, wire.Remove, "removed")


# -- the grammar ------------------------------------------------------------------------

PERMISSIONS = ("read", "write", "admin")


class _Options(usage.Options):
    """What every level of the grammar shares."""

    synopsis = ""  # the words after the command's name
    longdesc = ""  # never Twisted's fallback, ``__main__.__doc__``
    subCommands: ClassVar[list[list[Any]]]

    def getSynopsis(self) -> str:
        """``Usage: gitstratum [--url URL] [--token TOKEN] repo create OWNER/NAME [--public]``."""
        words: list[str] = []
        options: usage.Options = self
        while options.parent is not None:
            words.insert(0, options.parent.subCommand or "")
            options = options.parent
        global_options = "[--url URL] [--token TOKEN]"
        return " ".join(["Usage:", PROG, global_options, *words, self.grammar()]).rstrip()

    def grammar(self) -> str:
        """The words after the command's name in its synopsis."""
        return self.synopsis

    def parseOptions(self, options: Sequence[str] | None = None) -> None:
        try:
            super().parseOptions(options)
        except usage.UsageError as e:
            # Twisted's "Unknown command: x" says neither which level nor what would do.
            if getattr(self, "subOptions", None) is None and str(e).startswith("Unknown command"):
                kind = "COMMAND" if self.parent is None else "ACTION"
                given = str(e).partition(": ")[2]
                names = ", ".join(name for name, _, _, _ in self.subCommands)
                raise usage.UsageError(f"unknown {kind} {given!r} (choose from {names})") from None
            raise

    def opt_version(self) -> NoReturn:
        """Print gitstratum's version and exit."""
        print(f"{PROG} {__version__}")
        sys.exit(0)


class _Command(cmdline.InterspersedOptions, _Options):
    """A leaf command: positional ``arguments`` checked by name; flags before or after them."""

    #: (key, METAVAR) of each positional argument, in order; "repo" and "permission" are checked
    arguments: ClassVar[tuple[tuple[str, str], ...]] = ()

    @staticmethod
    async def run(s: _Session, o: _Command) -> None:
        """Send the command's requests through *s* and print the outcome."""
        raise NotImplementedError

    def needs_token(self) -> bool:
        """Whether the command speaks to the admin API (and so needs a token)."""
        return True

    def grammar(self) -> str:
        params = [f"[--{p[0]} VALUE]" for p in getattr(self, "optParameters", [])]
        flags = [f"[--{flag[0]}]" for flag in getattr(self, "optFlags", [])]
        return " ".join([metavar for _, metavar in self.arguments] + params + flags)

    def parseArgs(self, *args: str) -> None:
        if len(args) < len(self.arguments):
            missing = " ".join(metavar for _, metavar in self.arguments[len(args) :])
            raise usage.UsageError(f"missing {missing}")
        if len(args) > len(self.arguments):
            raise usage.UsageError(f"unexpected argument {args[len(self.arguments)]!r}")
        for (key, _), value in zip(self.arguments, args, strict=True):
            if key == "repo":
                owner, sep, name = value.partition("/")
                if not sep or not owner or not name or "/" in name:
                    raise usage.UsageError(
                        f"argument OWNER/NAME: expected OWNER/NAME, not {value!r}"
                    )
            if key == "permission" and value not in PERMISSIONS:
                raise usage.UsageError(
                    f"argument PERMISSION: expected read, write or admin, not {value!r}"
                )
            self[key] = value


class _Group(_Options):
    """A command that needs an action (``repo create``)."""

    synopsis = "ACTION ..."

    def postOptions(self) -> None:
        if self.subCommand is None:
            actions = ", ".join(name for name, _, _, _ in self.subCommands)
            raise usage.UsageError(f"missing ACTION ({actions})")


class _RepoCreate(_Command):
    arguments = (("repo", "OWNER/NAME"),)
    optFlags = [["public", None, "Let anyone read it."]]
    run = staticmethod(_repo_create)


class _RepoList(_Command):
    run = staticmethod(_repo_list)


class _RepoDelete(_Command):
    arguments = (("repo", "OWNER/NAME"),)
    run = staticmethod(_repo_delete)


class _Repo(_Group):
    longdesc = "Create, list and delete repositories."
    subCommands = [
        ["create", None, _RepoCreate, "Create a repository."],
        ["list", None, _RepoList, "List every repository."],
        ["delete", None, _RepoDelete, "Delete a repository and all its data."],
    ]


class _UserCreate(_Command):
    arguments = (("name", "NAME"),)
    optFlags = [["admin", None, "Make the user a site admin."]]
    run = staticmethod(_user_create)


class _User(_Group):
    longdesc = "Create users."
    subCommands = [["create", None, _UserCreate, "Create a user."]]


class _TokenCreate(_Command):
    arguments = (("user", "USER"),)
    run = staticmethod(_token_create)


class _Token(_Group):
    longdesc = "Mint API tokens."
    subCommands = [["create", None, _TokenCreate, "Mint a token for USER and print it."]]


class _KeyAdd(_Command):
    longdesc = "PUBKEY_FILE is an OpenSSH .pub file, or - for standard input."
    arguments = (("user", "USER"), ("pubkey_file", "PUBKEY_FILE"))
    run = staticmethod(_key_add)


class _KeyList(_Command):
    arguments = (("user", "USER"),)
    run = staticmethod(_key_list)


class _KeyRemove(_Command):
    longdesc = "FINGERPRINT is as 'key list' shows it."
    arguments = (("user", "USER"), ("fingerprint", "FINGERPRINT"))
    run = staticmethod(_key_remove)


class _Key(_Group):
    longdesc = "Manage SSH public keys."
    subCommands = [
        ["add", None, _KeyAdd, "Register a public key for USER."],
        ["list", None, _KeyList, "List USER's keys."],
        ["remove", None, _KeyRemove, "Remove one of USER's keys."],
    ]


class _Grant(_Command):
    arguments = (("user", "USER"), ("repo", "OWNER/NAME"), ("permission", "read|write|admin"))
    run = staticmethod(_grant)


class _Revoke(_Command):
    arguments = (("user", "USER"), ("repo", "OWNER/NAME"))
    run = staticmethod(_revoke)


class _ControlCommand(_Command):
    """A command that can speak to a control node: ``--control`` and the cluster secret."""

    optParameters: ClassVar[list[list[Any]]] = [
        ["control", None, None, "Control-plane addresses, HOST:PORT[,...]."],
        ["cluster-secret-file", None, None, "The cluster secret (with --control)."],
    ]

    def postOptions(self) -> None:
        super().postOptions()
        if self["control"] and not self["cluster-secret-file"]:
            raise usage.UsageError("--control needs --cluster-secret-file")

    def needs_token(self) -> bool:
        return not self["control"]


class _ClusterStatus(_ControlCommand):
    longdesc = (
        "Without --control: the status the server's admin API reports, as JSON. With "
        "--control: every member of a cluster, its role, state, address, zone and last "
        "heartbeat, the ring epoch and the control plane's leader and term, asked of any "
        "control node with the cluster secret (no API token needed)."
    )
    optFlags: ClassVar[list[list[Any]]] = [["json", None, "With --control: print JSON."]]
    run = staticmethod(_cluster_status)


class _ClusterNodeChange(_ControlCommand):
    """An operator action on a node: through a control node (``--control``) for now."""

    arguments = (("node", "NODE"),)

    def postOptions(self) -> None:
        if not self["control"]:
            raise usage.UsageError("give --control HOST:PORT and --cluster-secret-file")
        super().postOptions()


class _ClusterDrain(_ClusterNodeChange):
    longdesc = "Mark NODE draining: it stays up while its data moves to the other nodes."
    run = staticmethod(_cluster_drain)


class _ClusterRemove(_ClusterNodeChange):
    longdesc = (
        "Remove NODE from the cluster. Refused for the last control node and for a node "
        "that still holds data (drain it first)."
    )
    run = staticmethod(_cluster_remove)


class _Cluster(_Group):
    longdesc = "Inspect and operate the cluster."
    subCommands = [
        ["status", None, _ClusterStatus, "Print the cluster status."],
        ["drain", None, _ClusterDrain, "Drain NODE (its data moves elsewhere)."],
        ["remove", None, _ClusterRemove, "Remove a drained NODE."],
    ]


class Options(_Options):
    """The command line of ``gitstratum`` (exposed so the README can be checked against it)."""

    synopsis = "COMMAND ..."
    longdesc = (
        "Administer a GitStratum server through its JSON API. "
        "GITSTRATUM_URL and GITSTRATUM_TOKEN stand in for --url and --token."
    )
    optParameters = [
        ["url", None, None, f"The server's base URL (default {DEFAULT_URL})."],
        ["token", None, None, "An API token (a site admin's for most commands)."],
    ]
    subCommands = [
        ["repo", None, _Repo, "Create, list and delete repositories."],
        ["user", None, _User, "Create users."],
        ["token", None, _Token, "Mint API tokens."],
        ["key", None, _Key, "Manage SSH public keys."],
        ["grant", None, _Grant, "Give USER a permission on a repository."],
        ["revoke", None, _Revoke, "Take away USER's permission on a repository."],
        ["cluster", None, _Cluster, "Inspect and operate the cluster."],
        ["dev-cluster", None, devcluster.Options, "Run a whole cluster on this machine."],
    ]

    def postOptions(self) -> None:
        if self.subCommand is None:
            raise usage.UsageError(f"missing COMMAND ({', '.join(c[0] for c in self.subCommands)})")

    def command(self) -> _Command:
        """The leaf that was parsed (``repo create``'s options, say)."""
        return cast(_Command, cmdline.deepest(self))


# -- running ------------------------------------------------------------------------------


@attrs.frozen
class _Parsed:
    command: _Command
    url: str
    token: str


@attrs.frozen
class _DevCluster:
    """``dev-cluster ...``: runs processes on this machine, no API and no reactor."""

    options: devcluster.Options


def _fail(stderr: IO[str], message: str) -> None:
    stderr.write(f"{PROG}: error: {message}\n")


async def _execute(
    parsed: _Parsed,
    client: HTTPClient,
    stdout: IO[str],
    stderr: IO[str],
    stdin: IO[str],
    reactor: Any = None,
) -> int:
    session = _Session(
        client=client,
        url=parsed.url,
        token=parsed.token,
        stdout=stdout,
        stdin=stdin,
        reactor=reactor,
    )
    try:
        await parsed.command.run(session, parsed.command)
    except CLIError as e:
        _fail(stderr, str(e))
        return 1
    return 0


def _parse(
    argv: Sequence[str] | None, env: Mapping[str, str], stdout: IO[str], stderr: IO[str]
) -> _Parsed | _DevCluster | int:
    """The parsed command with url and token resolved, or the exit status of --help or a usage error."""
    options = Options()
    status = cmdline.parse(options, argv, PROG, stdout=stdout, stderr=stderr)
    if status is not None:
        return status
    if options.subCommand == "dev-cluster":
        return _DevCluster(cast(devcluster.Options, options.subOptions))
    token = options["token"] or env.get("GITSTRATUM_TOKEN") or ""
    if not token and options.command().needs_token():
        error = "no API token: pass --token or set GITSTRATUM_TOKEN"
        cmdline.report_usage_error(options, PROG, error, stderr)
        return 2
    url = options["url"] or env.get("GITSTRATUM_URL") or DEFAULT_URL
    return _Parsed(options.command(), url, token)


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
    if isinstance(parsed, _DevCluster):
        return succeed(devcluster.run(parsed.options, out))
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
    if isinstance(parsed, _DevCluster):
        return devcluster.run(parsed.options)  # processes on this machine: no reactor needed
    options = parsed

    async def run(reactor: Any) -> None:
        client = make_client(reactor)
        status = await _execute(options, client, sys.stdout, sys.stderr, sys.stdin, reactor)
        if status:
            raise SystemExit(status)

    try:
        react(run)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
