"""The gitstratum CLI, driven against the real admin API through StubTreq (no sockets).

At the end, the project's other command lines, which share its parser style.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import attrs
import pytest
from treq.testing import StubTreq
from twisted.internet.defer import Deferred, ensureDeferred, fail, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.python.failure import Failure

from gitstratum import cli
from gitstratum.frontend.admin_api import AdminAPI
from gitstratum.frontend.auth import Authorizer, bootstrap_admin
from gitstratum.frontend.threads import inline_runner
from gitstratum.raft import simulate
from gitstratum.storage.interfaces import Permission
from gitstratum.storage.lmdb_metadata import LMDBMetadataStore
from gitstratum.testing import raft_process

PUBKEY = (
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIP27OLKXI8YWr55tS4WHELjD30rOP1qw7euSBDRcGpcS alice@laptop"
)
PUBKEY_FINGERPRINT = "SHA256:ox8byVsK0z+376T7zfVE7/DhBO7U1GoZbgw5wHQptag"
URL = "http://gitstratum.test:8080"


@attrs.frozen
class Result:
    code: int
    out: str
    err: str


@attrs.define
class Recorder:
    """A client that remembers each request's method and URL and passes it on."""

    inner: Any
    calls: list[tuple[str, str]] = attrs.field(factory=list)

    def request(self, method: str, url: str, **kwargs: Any) -> Deferred[Any]:
        self.calls.append((method, url))
        return self.inner.request(method, url, **kwargs)


def settle(stub: StubTreq, d: Deferred[Any]) -> Any:
    """Pump the in-memory connections until *d* has fired; return its result."""
    results: list[Any] = []
    d.addBoth(results.append)
    for _ in range(20):
        if results:
            break
        stub.flush()
    (result,) = results
    if isinstance(result, Failure):
        result.raiseException()
    return result


@attrs.define
class Harness:
    store: LMDBMetadataStore
    stub: StubTreq
    token: str
    status: dict[str, Any]

    def run(
        self,
        *argv: str,
        env: dict[str, str] | None = None,
        stdin: str = "",
        client: Any = None,
    ) -> Result:
        out, err = io.StringIO(), io.StringIO()
        if env is None:
            env = {"GITSTRATUM_URL": URL, "GITSTRATUM_TOKEN": self.token}
        d = cli.execute(
            list(argv),
            client=cast(cli.HTTPClient, client or self.stub),
            env=env,
            stdout=out,
            stderr=err,
            stdin=io.StringIO(stdin),
        )
        code = settle(self.stub, d)
        return Result(code, out.getvalue(), err.getvalue())


@pytest.fixture
def h(tmp_path: Path) -> Iterator[Harness]:
    store = LMDBMetadataStore(str(tmp_path / "meta"))
    token_file = bootstrap_admin(store, str(tmp_path))
    assert token_file is not None
    status: dict[str, Any] = {"mode": "standalone", "ring": {"epoch": 1}}
    api = AdminAPI(store, Authorizer(store), inline_runner, lambda: status)
    yield Harness(store, StubTreq(api.app.resource()), Path(token_file).read_text().strip(), status)
    store.close()


# -- commands --------------------------------------------------------------------------


def test_repo_create_list_delete(h: Harness) -> None:
    """repo create/list/delete change the server and print one line each."""
    assert h.run("repo", "create", "alice/proj") == Result(0, "created alice/proj (private)\n", "")
    assert h.run("repo", "create", "alice/site", "--public").out == "created alice/site (public)\n"
    repo = h.store.get_repository("alice/site")
    assert repo is not None and repo.public
    assert h.run("repo", "list") == Result(0, "alice/proj\tprivate\nalice/site\tpublic\n", "")
    assert h.run("repo", "delete", "alice/proj") == Result(0, "deleted alice/proj\n", "")
    assert h.store.get_repository("alice/proj") is None


def test_user_create(h: Harness) -> None:
    """user create makes ordinary users, and site admins with --admin."""
    assert h.run("user", "create", "bob").out == "created user bob\n"
    assert h.run("user", "create", "root2", "--admin").out == "created user root2 (site admin)\n"
    root2 = h.store.get_user("root2")
    assert root2 is not None and root2.is_admin


def test_token_create_prints_only_a_working_token(h: Harness) -> None:
    """token create prints just the token, and that token authenticates as the user."""
    h.run("user", "create", "bob")
    result = h.run("token", "create", "bob")
    assert result.code == 0 and result.err == ""
    token = result.out.removesuffix("\n")
    assert token.startswith("gst_") and "\n" not in token and " " not in token
    # bob is no site admin, so the server (not the CLI) now refuses him by name.
    refused = h.run("--token", token, "repo", "list")
    assert refused.code == 1
    assert refused.err == "gitstratum: error: you must be a site administrator to do that\n"


def test_key_add_list_remove(h: Harness, tmp_path: Path) -> None:
    """key add reads a .pub file, key list shows its fingerprint, key remove forgets it."""
    h.run("user", "create", "bob")
    pub = tmp_path / "id_ed25519.pub"
    pub.write_text(PUBKEY + "\n")
    added = h.run("key", "add", "bob", str(pub))
    assert added == Result(0, f"added {PUBKEY_FINGERPRINT} (ssh-ed25519) for bob\n", "")
    assert [k.fingerprint for k in h.store.list_ssh_keys("bob")] == [PUBKEY_FINGERPRINT]
    assert h.run("key", "list", "bob").out == f"{PUBKEY_FINGERPRINT} ssh-ed25519 alice@laptop\n"
    removed = h.run("key", "remove", "bob", PUBKEY_FINGERPRINT)
    assert removed == Result(0, f"removed {PUBKEY_FINGERPRINT} from bob\n", "")
    assert h.store.list_ssh_keys("bob") == []
    again = h.run("key", "remove", "bob", PUBKEY_FINGERPRINT)
    assert again.code == 1 and "has no key" in again.err


def test_key_add_from_stdin(h: Harness) -> None:
    """A PUBKEY_FILE of '-' reads the key from standard input."""
    h.run("user", "create", "bob")
    assert h.run("key", "add", "bob", "-", stdin=PUBKEY).code == 0
    assert len(h.store.list_ssh_keys("bob")) == 1


def test_key_add_with_an_unreadable_file(h: Harness, tmp_path: Path) -> None:
    """A missing key file is reported as a CLI error, without a request."""
    recorder = Recorder(h.stub)
    result = h.run("key", "add", "bob", str(tmp_path / "missing.pub"), client=recorder)
    assert result.code == 1
    assert result.err.startswith("gitstratum: error: cannot read ")
    assert "No such file or directory" in result.err
    assert recorder.calls == []


def test_grant_and_revoke(h: Harness) -> None:
    """grant sets a permission on the server and revoke removes it."""
    h.run("user", "create", "bob")
    h.run("repo", "create", "org/r")
    assert h.run("grant", "bob", "org/r", "write").out == "granted write on org/r to bob\n"
    assert h.store.get_permission("bob", "org/r") == Permission.WRITE
    assert h.run("revoke", "bob", "org/r").out == "revoked bob's access to org/r\n"
    assert h.store.get_permission("bob", "org/r") is None


def test_cluster_status_prints_json(h: Harness) -> None:
    """cluster status pretty-prints what the server reports."""
    result = h.run("cluster", "status")
    assert result.code == 0
    assert result.out == '{\n  "mode": "standalone",\n  "ring": {\n    "epoch": 1\n  }\n}\n'


def test_cluster_status_of_a_control_plane_needs_the_secret_not_a_token(
    h: Harness, tmp_path: Path
) -> None:
    """--control asks a control node with the cluster secret: no token, and the secret required."""
    result = h.run("cluster", "status", "--control", "127.0.0.2:7100", env={})
    assert result.code == 2 and "--control needs --cluster-secret-file" in result.err
    missing = str(tmp_path / "no-secret")
    result = h.run(
        "cluster", "status", "--control", "127.0.0.2:7100", "--cluster-secret-file", missing, env={}
    )
    assert result.code == 1 and "no cluster secret" in result.err
    assert "token" not in result.err


def test_cluster_drain_and_remove_go_to_a_control_node(h: Harness, tmp_path: Path) -> None:
    """drain and remove name a NODE and need --control with the secret, not an API token."""
    result = h.run("cluster", "drain", env={})
    assert result.code == 2 and "missing NODE" in result.err
    result = h.run("cluster", "remove", "object-1", env={})
    assert result.code == 2 and "give --control" in result.err
    missing = str(tmp_path / "no-secret")
    for action in ("drain", "remove"):
        result = h.run(
            "cluster",
            action,
            "object-1",
            "--control",
            "127.0.0.2:7100",
            "--cluster-secret-file",
            missing,
            env={},
        )
        assert result.code == 1 and "no cluster secret" in result.err


def test_dev_cluster_runs_without_a_server_or_token(h: Harness, tmp_path: Path) -> None:
    """dev-cluster is part of the command and needs no API: status of an empty directory says so."""
    result = h.run("dev-cluster", "status", "--dir", str(tmp_path / "dc"), env={})
    assert result.code == 0 and "no dev cluster" in result.out
    result = h.run("dev-cluster", env={})
    assert result.code == 2 and "up, down or status" in result.err


# -- errors ------------------------------------------------------------------------------


def test_server_errors_are_reported_with_exit_status_1(h: Harness) -> None:
    """The API's error message is printed as 'gitstratum: error: ...' and nothing goes to stdout."""
    h.run("repo", "create", "alice/proj")
    result = h.run("repo", "create", "alice/proj")
    assert result == Result(1, "", "gitstratum: error: repository 'alice/proj' already exists\n")
    result = h.run("repo", "delete", "alice/nope")
    assert result.code == 1 and "not found" in result.err
    result = h.run("repo", "create", "alice/proj.git")
    assert result.code == 1 and "'.git'" in result.err


def test_a_bad_token_is_reported(h: Harness) -> None:
    """An unknown token gets the server's 401 message."""
    result = h.run("--token", "gst_nope", "repo", "list")
    assert result == Result(1, "", "gitstratum: error: invalid token\n")


def test_unreachable_server(h: Harness) -> None:
    """A refused connection is one clear line, not a traceback."""

    class Refusing:
        def request(self, method: str, url: str, **kwargs: Any) -> Deferred[Any]:
            return fail(ConnectionRefusedError("Connection refused"))

    result = h.run("repo", "list", client=Refusing())
    assert result.code == 1
    assert result.err.startswith(f"gitstratum: error: cannot reach {URL}: ")
    assert "Traceback" not in result.err


def test_non_json_error_pages_are_reported_by_status(h: Harness) -> None:
    """A proxy's HTML error page is reported by its HTTP status."""

    @attrs.frozen
    class Page:
        code: int = 502
        phrase: bytes = b"Bad Gateway"

        def content(self) -> Deferred[bytes]:
            return succeed(b"<html>upstream down</html>")

    class Proxy:
        def request(self, method: str, url: str, **kwargs: Any) -> Deferred[Any]:
            return succeed(Page())

    result = h.run("repo", "list", client=Proxy())
    assert result == Result(1, "", f"gitstratum: error: {URL}/api/v1/repos: HTTP 502 Bad Gateway\n")


# -- flags, environment and URLs --------------------------------------------------------------


def test_flags_override_the_environment(h: Harness) -> None:
    """--url and --token win over GITSTRATUM_URL and GITSTRATUM_TOKEN."""
    recorder = Recorder(h.stub)
    env = {"GITSTRATUM_URL": "http://env.test", "GITSTRATUM_TOKEN": "gst_wrong"}
    result = h.run(
        "--url", "http://flag.test:9/", "--token", h.token, "repo", "list", env=env, client=recorder
    )
    assert result.code == 0
    assert recorder.calls == [("GET", "http://flag.test:9/api/v1/repos")]


def test_environment_supplies_url_and_token(h: Harness) -> None:
    """Without flags, the environment names the server and the token."""
    recorder = Recorder(h.stub)
    env = {"GITSTRATUM_URL": "https://git.example", "GITSTRATUM_TOKEN": h.token}
    assert h.run("repo", "list", env=env, client=recorder).code == 0
    assert recorder.calls == [("GET", "https://git.example/api/v1/repos")]


def test_url_may_carry_a_path_prefix(h: Harness) -> None:
    """A base URL with a path (a server behind a reverse proxy) keeps that path."""
    recorder = Recorder(h.stub)
    h.run("--url", "https://git.example/gs/", "repo", "list", client=recorder)
    assert recorder.calls == [("GET", "https://git.example/gs/api/v1/repos")]


def test_default_url(h: Harness) -> None:
    """With no --url and no GITSTRATUM_URL the CLI talks to localhost:8080."""
    recorder = Recorder(h.stub)
    assert h.run("repo", "list", env={"GITSTRATUM_TOKEN": h.token}, client=recorder).code == 0
    assert recorder.calls == [("GET", "http://localhost:8080/api/v1/repos")]


def test_path_segments_are_escaped(h: Harness) -> None:
    """A fingerprint's '/' and '+' are percent-encoded into one path segment."""
    recorder = Recorder(h.stub)
    h.run("key", "remove", "bob", PUBKEY_FINGERPRINT, client=recorder)
    ((method, url),) = recorder.calls
    assert method == "DELETE"
    assert url == (
        f"{URL}/api/v1/users/bob/keys/SHA256:ox8byVsK0z%2B376T7zfVE7%2FDhBO7U1GoZbgw5wHQptag"
    )


# -- usage -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["frobnicate"],
        ["repo"],
        ["repo", "create"],
        ["repo", "create", "no-slash"],
        ["repo", "create", "a/b/c"],
        ["grant", "bob", "org/r", "owner"],
        ["revoke", "bob"],
        ["key", "add", "bob"],
        ["repo", "frob"],
        ["repo", "create", "a/b", "extra"],
        ["repo", "list", "--bogus"],
        ["--bogus", "repo", "list"],
        ["cluster"],
    ],
)
def test_usage_errors_exit_2(h: Harness, argv: list[str]) -> None:
    """Malformed command lines print usage and 'gitstratum: error:' and exit 2, sending nothing."""
    recorder = Recorder(h.stub)
    result = h.run(*argv, client=recorder)
    assert result.code == 2
    assert result.err.startswith("Usage: gitstratum")
    assert "gitstratum: error: " in result.err
    assert recorder.calls == []


@pytest.mark.parametrize(
    ("argv", "usage", "error"),
    [
        (
            ["frobnicate"],
            "Usage: gitstratum [--url URL] [--token TOKEN] COMMAND ...",
            "unknown COMMAND 'frobnicate' (choose from repo, user, token, key, grant, revoke,"
            " cluster, dev-cluster)",
        ),
        (
            ["repo", "frob"],
            "Usage: gitstratum [--url URL] [--token TOKEN] repo ACTION ...",
            "unknown ACTION 'frob' (choose from create, list, delete)",
        ),
        (
            ["repo", "create"],
            "Usage: gitstratum [--url URL] [--token TOKEN] repo create OWNER/NAME [--public]",
            "missing OWNER/NAME",
        ),
        (
            ["grant", "bob", "org/r", "owner"],
            "Usage: gitstratum [--url URL] [--token TOKEN] grant USER OWNER/NAME read|write|admin",
            "argument PERMISSION: expected read, write or admin, not 'owner'",
        ),
        (
            ["key", "remove", "bob"],
            "Usage: gitstratum [--url URL] [--token TOKEN] key remove USER FINGERPRINT",
            "missing FINGERPRINT",
        ),
    ],
)
def test_usage_errors_name_the_command_and_what_is_wrong(
    h: Harness, argv: list[str], usage: str, error: str
) -> None:
    """A usage error prints the synopsis of the command it is about, then one line saying what is wrong."""
    result = h.run(*argv)
    assert result == Result(2, "", f"{usage}\ngitstratum: error: {error}\n")


def test_flags_may_follow_the_arguments(h: Harness) -> None:
    """`repo create NAME --public` and `--public NAME` mean the same, as with git."""
    h.run("repo", "create", "--public", "org/a")
    h.run("repo", "create", "org/b", "--public")
    assert h.run("repo", "list").out == "org/a\tpublic\norg/b\tpublic\n"


def test_a_missing_token_is_a_usage_error(h: Harness) -> None:
    """With neither --token nor GITSTRATUM_TOKEN the CLI says how to give one."""
    result = h.run("repo", "list", env={})
    assert result.code == 2
    assert "gitstratum: error: no API token: pass --token or set GITSTRATUM_TOKEN" in result.err


def test_help_lists_the_subcommands(h: Harness) -> None:
    """--help exits 0 and names every subcommand."""
    result = h.run("--help")
    assert result.code == 0 and result.err == ""
    for word in ("repo", "user", "token", "key", "grant", "revoke", "cluster", "GITSTRATUM_TOKEN"):
        assert word in result.out


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["repo", "--help"], ["repo ACTION", "create", "list", "delete"]),
        (["repo", "create", "--help"], ["repo create OWNER/NAME [--public]", "--public"]),
        (["user", "create", "--help"], ["user create NAME [--admin]", "--admin"]),
        (["key", "add", "--help"], ["key add USER PUBKEY_FILE", "- for standard input"]),
        (["cluster", "status", "--help"], ["cluster status"]),
    ],
)
def test_every_command_has_help(h: Harness, argv: list[str], words: list[str]) -> None:
    """--help after any command prints that command's usage to stdout and exits 0, sending nothing."""
    recorder = Recorder(h.stub)
    result = h.run(*argv, client=recorder)
    assert result.code == 0 and result.err == ""
    assert result.out.startswith("Usage: gitstratum [--url URL] [--token TOKEN] ")
    for word in words:
        assert word in result.out
    assert recorder.calls == []


def test_version_names_gitstratum(h: Harness) -> None:
    """--version prints gitstratum's version (not Twisted's) and exits 0."""
    from gitstratum import __version__

    assert h.run("--version") == Result(0, f"gitstratum {__version__}\n", "")


# -- main() ------------------------------------------------------------------------------


def fake_react(stub: StubTreq) -> Any:
    """A stand-in for task.react: run main's coroutine against the stub, then exit like react."""

    def react(main: Any, argv: tuple[Any, ...] = ()) -> None:
        d: Deferred[Any] = ensureDeferred(main(None, *argv))
        try:
            settle(stub, d)
        except SystemExit as e:
            raise SystemExit(e.code) from None
        raise SystemExit(0)

    return react


def test_main_runs_a_command_and_returns_its_status(
    h: Harness, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """main() reads the environment, runs under react, and returns 0 or 1 as an int."""
    monkeypatch.setenv("GITSTRATUM_TOKEN", h.token)
    monkeypatch.setenv("GITSTRATUM_URL", URL)
    kw: dict[str, Any] = {"react": fake_react(h.stub), "make_client": lambda reactor: h.stub}
    assert cli.main(["repo", "create", "org/r"], **kw) == 0
    assert capsys.readouterr().out == "created org/r (private)\n"
    assert cli.main(["repo", "create", "org/r"], **kw) == 1
    assert capsys.readouterr().err == "gitstratum: error: repository 'org/r' already exists\n"


def test_main_usage_error_never_starts_the_reactor(capsys: pytest.CaptureFixture[str]) -> None:
    """A usage error returns 2 before any reactor or client exists."""

    def no_react(*args: Any) -> None:
        raise AssertionError("react must not run")

    assert cli.main(["repo", "create", "bad"], react=no_react) == 2
    err = capsys.readouterr().err
    assert "gitstratum: error: argument OWNER/NAME: expected OWNER/NAME, not 'bad'\n" in err


# -- the project's other command lines (one parser style: twisted.python.usage) ------------


@pytest.mark.parametrize("module", [simulate, raft_process])
def test_other_command_lines_have_help(module: Any, capsys: pytest.CaptureFixture[str]) -> None:
    """The simulator's and the Raft process's --help print their usage and return 0 (no reactor)."""
    assert module.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"Usage: {module.PROG} ")
    assert "--seed=" in out


@pytest.mark.parametrize(
    ("module", "argv", "error"),
    [
        (simulate, ["--nodes", "4"], "--nodes must be 3 or 5, not 4"),
        (simulate, ["--broken", "nope"], "--broken must be one of stale_reads, unsynced"),
        (simulate, ["extra"], "unexpected argument 'extra'"),
        (raft_process, ["--id", "1"], "missing --data-dir, --listen, --peers"),
        (
            raft_process,
            ["--id", "1", "--data-dir", "d", "--listen", "tcp:0", "--peers", "1=tcp:x,zz"],
            "--peers: bad peer 'zz': expected ID=ENDPOINT",
        ),
    ],
)
def test_other_command_lines_report_usage_errors(
    module: Any, argv: list[str], error: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bad command line gives the synopsis and one error line on stderr, and exit status 2."""
    assert module.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(f"Usage: {module.PROG} ")
    assert captured.err.endswith(f"{module.PROG}: error: {error}\n")


def test_raft_process_options_parse_to_typed_values() -> None:
    """The Raft process's options arrive typed: ints, floats and the peers as a mapping."""
    options = raft_process.Options()
    options.parseOptions(
        ["--id", "2", "--data-dir", "d2", "--listen", "tcp:7002", "--tick-interval", "0.01"]
        + ["--peers", "1=tcp:host=h:port=1,2=tcp:host=h:port=2", "--seed", "7"]
    )
    assert options["id"] == 2 and options["seed"] == 7 and options["tick-interval"] == 0.01
    assert options["peers"] == {1: "tcp:host=h:port=1", 2: "tcp:host=h:port=2"}
    assert options["snapshot-every"] == 10_000 and options["client"] is None
