"""End to end: the real ssh and git clients against a standalone server's SSH and git:// ports."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest

from .conftest import Server, bench_repo, free_port, git, refs_of, remote_refs

pytestmark = pytest.mark.e2e

OWNER_REPO = "sshci/app"  # written by "sshci" over SSH
PUBLIC_REPO = "sshci/open"  # public: readable over git://
PRIVATE_REPO = "sshci/secret"  # nobody but sshci


@attrs.frozen
class SSHUser:
    """A user with a registered key, and the environment that makes git use it."""

    name: str
    key: Path
    known_hosts: Path
    port: int

    def ssh_command(self, strict: str = "accept-new") -> str:
        return (
            f"ssh -i {self.key} -o IdentitiesOnly=yes -o IdentityAgent=none"
            f" -o UserKnownHostsFile={self.known_hosts} -o StrictHostKeyChecking={strict}"
            f" -o BatchMode=yes -o LogLevel=ERROR -p {self.port}"
        )

    def env(self, **extra: str) -> dict[str, str]:
        return {"GIT_SSH_COMMAND": self.ssh_command(), "GIT_SSH_VARIANT": "ssh", **extra}

    def ssh(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        """Run the real ssh client as this user against the server, without a terminal."""
        return subprocess.run(
            [*self.ssh_command().split(), "-T", "git@127.0.0.1", *args],
            capture_output=True,
            stdin=subprocess.DEVNULL,
            timeout=timeout,
        )


def make_key(directory: Path, name: str) -> Path:
    key = directory / f"id_{name}"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"{name}@test", "-f", str(key)],
        check=True,
        capture_output=True,
    )
    return key


def ssh_user(server: Server, directory: Path, name: str, *, register: bool = True) -> SSHUser:
    """Create *name* through the CLI and register a fresh ed25519 key for it (unless told not to)."""
    key = make_key(directory, name)
    if register:
        server.user_with_token(name)
        server.cli("key", "add", name, str(key) + ".pub")
    return SSHUser(name, key, directory / f"known_hosts_{name}", server.ssh_port)


@pytest.fixture(scope="module")
def keys_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("sshkeys")


@pytest.fixture(scope="module")
def owner(server: Server, keys_dir: Path) -> SSHUser:
    user = ssh_user(server, keys_dir, "sshci")
    for repo, public in ((OWNER_REPO, False), (PUBLIC_REPO, True), (PRIVATE_REPO, False)):
        server.cli("repo", "create", repo, *(["--public"] if public else []))
        server.cli("grant", "sshci", repo, "write")
    return user


@pytest.fixture(scope="module")
def reader(server: Server, keys_dir: Path, owner: SSHUser) -> SSHUser:
    """A user who may read OWNER_REPO but not write it, and has no access to PRIVATE_REPO."""
    user = ssh_user(server, keys_dir, "sshreader")
    server.cli("grant", "sshreader", OWNER_REPO, "read")
    return user


@pytest.fixture(scope="module")
def pushed(server: Server, owner: SSHUser, repo_root: Path) -> Path:
    """bench_repo's generated repository pushed over SSH with every branch and tag to OWNER_REPO."""
    src = bench_repo(repo_root, files=300, commits=60)
    url = server.ssh_url(OWNER_REPO)
    git("push", url, "--all", cwd=src, env=owner.env())
    git("push", url, "--tags", cwd=src, env=owner.env())
    return src


def test_push_over_ssh_then_refs_match_http(
    server: Server, owner: SSHUser, pushed: Path, ci_token: str
) -> None:
    """Refs pushed over SSH are the source's, seen the same over SSH and over HTTP."""
    server.cli("grant", "ci", OWNER_REPO, "read")
    ssh_refs = _ls_remote(server.ssh_url(OWNER_REPO), owner.env())
    http_refs = remote_refs(server.url(OWNER_REPO, ci_token))
    assert ssh_refs == http_refs == refs_of(pushed)


def _ls_remote(url: str, env: dict[str, str]) -> dict[str, str]:
    out = git("ls-remote", url, env=env).stdout.decode()
    refs = {}
    for line in out.splitlines():
        sha, name = line.split("\t")
        if not name.endswith("^{}") and name != "HEAD":
            refs[name] = sha
    return refs


@pytest.mark.parametrize("version", ["2", "0"])
def test_clone_over_ssh_passes_fsck(
    server: Server, owner: SSHUser, pushed: Path, tmp_path: Path, version: str
) -> None:
    """A mirror clone over SSH (protocol v2 and v0) has every ref and passes fsck --strict."""
    dst = tmp_path / "mirror.git"
    git(
        "-c",
        f"protocol.version={version}",
        "clone",
        "--mirror",
        server.ssh_url(OWNER_REPO),
        str(dst),
        env=owner.env(),
    )
    assert refs_of(dst) == refs_of(pushed)
    git("fsck", "--strict", "--no-dangling", cwd=dst)


def test_shallow_clone_and_fetch_over_ssh(
    server: Server, reader: SSHUser, pushed: Path, tmp_path: Path
) -> None:
    """A reader's depth-1 clone, then a deepening fetch, over SSH; fsck stays clean."""
    dst = tmp_path / "shallow"
    git("clone", "--depth", "1", server.ssh_url(OWNER_REPO), str(dst), env=reader.env())
    assert int(git("rev-list", "--count", "HEAD", cwd=dst).stdout) == 1
    git("fetch", "--deepen=5", cwd=dst, env=reader.env())
    assert int(git("rev-list", "--count", "HEAD", cwd=dst).stdout) == 6
    git("fsck", "--strict", cwd=dst)
    head = git("rev-parse", "main", cwd=pushed).stdout
    assert git("rev-parse", "HEAD", cwd=dst).stdout == head


def test_ssh_sessions_really_use_protocol_v2(
    server: Server, owner: SSHUser, pushed: Path, tmp_path: Path
) -> None:
    """GIT_TRACE_PACKET shows the server answering "version 2" over SSH (GIT_PROTOCOL via SendEnv)."""
    dst = tmp_path / "v2"
    proc = git(
        "-c",
        "protocol.version=2",
        "clone",
        "--depth",
        "1",
        server.ssh_url(OWNER_REPO),
        str(dst),
        env=owner.env(GIT_TRACE_PACKET="1"),
    )
    trace = proc.stderr.decode()
    assert "< version 2" in trace
    assert "> command=ls-refs" in trace and "> command=fetch" in trace
    git("fsck", "--strict", cwd=dst)


def test_push_a_new_commit_over_ssh_and_fetch_it(
    server: Server, owner: SSHUser, reader: SSHUser, pushed: Path, tmp_path: Path
) -> None:
    """A commit pushed over SSH is fetched by another user over SSH."""
    work = tmp_path / "work"
    git("clone", server.ssh_url(OWNER_REPO), str(work), env=owner.env())
    (work / "ssh-note.txt").write_text("pushed over ssh\n")
    git("add", "ssh-note.txt", cwd=work)
    git("commit", "-q", "-m", "over ssh", cwd=work)
    git("push", "origin", "HEAD:refs/heads/ssh-topic", cwd=work, env=owner.env())
    head = git("rev-parse", "HEAD", cwd=work).stdout.decode().strip()
    other = tmp_path / "other"
    git("clone", "-b", "ssh-topic", server.ssh_url(OWNER_REPO), str(other), env=reader.env())
    assert git("rev-parse", "HEAD", cwd=other).stdout.decode().strip() == head
    git("fsck", "--strict", cwd=other)


# -- refusals ------------------------------------------------------------------------------


def _fails(proc: subprocess.CompletedProcess, *expected: str) -> str:
    err = proc.stderr.decode()
    assert proc.returncode != 0, err
    for text in expected:
        assert text in err, err
    assert "Traceback" not in err
    return err


def test_unknown_key_is_refused(server: Server, owner: SSHUser, keys_dir: Path) -> None:
    """A key nobody registered: ssh says "Permission denied (publickey)"; the server is unaffected."""
    stranger = ssh_user(server, keys_dir, "stranger", register=False)
    proc = git("ls-remote", server.ssh_url(PUBLIC_REPO), check=False, env=stranger.env())
    _fails(proc, "Permission denied (publickey)", "Could not read from remote repository")
    assert server.alive()


def test_known_key_without_read_access_sees_not_found(
    server: Server, reader: SSHUser, tmp_path: Path
) -> None:
    """A private repository the user cannot read looks like a missing one."""
    proc = git(
        "clone", server.ssh_url(PRIVATE_REPO), str(tmp_path / "x"), check=False, env=reader.env()
    )
    _fails(proc, "ERROR: Repository not found.", "Could not read from remote repository")
    assert server.alive()


def test_known_key_without_write_access_cannot_push(
    server: Server, reader: SSHUser, pushed: Path
) -> None:
    """A reader pushing gets "Permission to OWNER/NAME.git denied to USER."."""
    proc = git(
        "push",
        server.ssh_url(OWNER_REPO),
        "main:refs/heads/not-allowed",
        cwd=pushed,
        check=False,
        env=reader.env(),
    )
    _fails(proc, f"ERROR: Permission to {OWNER_REPO}.git denied to sshreader.")
    assert "refs/heads/not-allowed" not in _ls_remote(server.ssh_url(OWNER_REPO), reader.env())
    assert server.alive()


def test_missing_repository_is_not_found(server: Server, owner: SSHUser) -> None:
    """A repository that does not exist: "ERROR: Repository not found."."""
    proc = git("ls-remote", server.ssh_url("sshci/nope"), check=False, env=owner.env())
    _fails(proc, "ERROR: Repository not found.", "Could not read from remote repository")
    assert server.alive()


def test_ssh_without_a_command_gets_the_greeting(server: Server, owner: SSHUser) -> None:
    """``ssh git@host`` authenticates, is told there is no shell, and exits with status 1."""
    proc = owner.ssh()
    assert proc.returncode == 1
    assert (
        "Hi sshci! You've successfully authenticated, but GitStratum does not provide shell access."
        in proc.stderr.decode()
    )
    assert server.alive()


def test_ssh_with_another_command_gets_the_greeting(server: Server, owner: SSHUser) -> None:
    """``ssh git@host ls`` is refused the same way, with status 1 and nothing on stdout."""
    proc = owner.ssh("ls", "-la", "/")
    assert proc.returncode == 1 and proc.stdout == b""
    assert "does not provide shell access" in proc.stderr.decode()
    assert server.alive()


@pytest.mark.parametrize(
    "command",
    [
        "git-upload-pack '../../etc/passwd'",
        "git-upload-pack 'sshci/../sshci/app.git'",
        "git-receive-pack '/sshci/app/..'",
        "git-upload-pack 'sshci/app.git",
    ],
)
def test_traversal_and_bad_quoting_are_refused(
    server: Server, owner: SSHUser, command: str
) -> None:
    """Paths with ".." and unbalanced quotes get an ERROR line and status 1, nothing else."""
    proc = owner.ssh(command)
    assert proc.returncode == 1 and proc.stdout == b""
    assert proc.stderr.decode().startswith("ERROR: Invalid ")
    assert server.alive()


def test_git_refuses_a_dotdot_url_with_the_server_s_message(server: Server, owner: SSHUser) -> None:
    """git itself sends a ".." path unchanged; the server's refusal is what the user reads."""
    url = f"ssh://git@127.0.0.1:{server.ssh_port}/sshci/../sshci/app.git"
    proc = git("ls-remote", url, check=False, env=owner.env())
    _fails(proc, "ERROR: Invalid repository path", "Could not read from remote repository")


# -- host keys -----------------------------------------------------------------------------


def _host_fingerprints(port: int) -> set[str]:
    scan = subprocess.run(
        ["ssh-keyscan", "-p", str(port), "-t", "ed25519,rsa", "127.0.0.1"],
        capture_output=True,
        timeout=30,
        check=True,
    )
    listed = subprocess.run(
        ["ssh-keygen", "-l", "-f", "-"], input=scan.stdout, capture_output=True, check=True
    )
    return {line.split()[1] for line in listed.stdout.decode().splitlines()}


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[Server]:
    """A server of this test's own, which the test may restart."""
    srv = Server(tmp_path / "data", free_port())
    srv.data_dir.mkdir()
    srv.start()
    yield srv
    srv.stop()


def test_host_key_fingerprint_survives_a_restart(own_server: Server, tmp_path: Path) -> None:
    """Both host keys keep their fingerprints across a restart, so known_hosts stays valid."""
    before = _host_fingerprints(own_server.ssh_port)
    assert len(before) == 2
    for name in ("ssh_host_ed25519_key", "ssh_host_rsa_key"):
        assert (own_server.data_dir / name).stat().st_mode & 0o777 == 0o600
    user = ssh_user(own_server, tmp_path, "restart")
    own_server.cli("repo", "create", "restart/r", "--public")
    git("ls-remote", own_server.ssh_url("restart/r"), env=user.env())  # records the host key
    own_server.stop()
    own_server.start()
    assert _host_fingerprints(own_server.ssh_port) == before
    strict = {"GIT_SSH_COMMAND": user.ssh_command(strict="yes")}
    git("ls-remote", own_server.ssh_url("restart/r"), env=strict)


# -- git:// --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def public_pushed(server: Server, owner: SSHUser, repo_root: Path) -> Path:
    src = bench_repo(repo_root, files=200, commits=30, seed=3)
    git("push", server.ssh_url(PUBLIC_REPO), "--all", cwd=src, env=owner.env())
    git("push", server.ssh_url(PUBLIC_REPO), "--tags", cwd=src, env=owner.env())
    return src


@pytest.mark.parametrize("version", ["2", "0"])
def test_clone_a_public_repository_over_git_protocol(
    server: Server, public_pushed: Path, tmp_path: Path, version: str
) -> None:
    """An anonymous git:// clone (v2 and v0) of a public repository has every ref and passes fsck."""
    dst = tmp_path / "anon.git"
    proc = git(
        "-c",
        f"protocol.version={version}",
        "clone",
        "--mirror",
        server.git_url(PUBLIC_REPO),
        str(dst),
        env={"GIT_TRACE_PACKET": "1"},
    )
    assert refs_of(dst) == refs_of(public_pushed)
    git("fsck", "--strict", "--no-dangling", cwd=dst)
    assert ("< version 2" in proc.stderr.decode()) == (version == "2")


def test_push_over_git_protocol_is_refused(
    server: Server, public_pushed: Path, owner: SSHUser
) -> None:
    """git:// is read-only: a push gets "service not enabled" and changes nothing."""
    before = _ls_remote(server.ssh_url(PUBLIC_REPO), owner.env())
    proc = git(
        "push", server.git_url(PUBLIC_REPO), "main:refs/heads/anon", cwd=public_pushed, check=False
    )
    _fails(proc, "remote error: service not enabled: /sshci/open.git")
    assert _ls_remote(server.ssh_url(PUBLIC_REPO), owner.env()) == before
    assert server.alive()


@pytest.mark.parametrize("repo", [PRIVATE_REPO, "sshci/nope"])
def test_private_or_missing_repositories_are_not_exported_over_git_protocol(
    server: Server, owner: SSHUser, repo: str, tmp_path: Path
) -> None:
    """git:// serves public repositories only; the rest get git daemon's refusal."""
    proc = git("clone", server.git_url(repo), str(tmp_path / "x"), check=False)
    _fails(proc, f"access denied or repository not exported: /{repo}.git")
