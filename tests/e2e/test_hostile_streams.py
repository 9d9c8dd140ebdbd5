"""End to end: hostile input over SSH and git:// (and HTTP where the same class reaches it).

Each class of attack is sent to a real server and checked three ways: the
answer (a clear ``ERR``, ``ng`` or timeout), what it cost the server
(``Attack``: alive, memory and data directory bounded, a bystander's clone
whole), and for pushes that no ref changed.  The last test checks the data
directory's permissions on a server started with a permissive umask.
"""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gitstratum.core.limits import INT32_MAX
from gitstratum.core.pktline import DELIM_PKT, FLUSH_PKT, pkt_line, pkt_lines
from gitstratum.testing.fixtures import make_small_repo

from .conftest import Server, free_port, git, remote_refs
from .hostile import Attack
from .test_ssh import SSHUser, ssh_user

pytestmark = pytest.mark.e2e

REPO = "hs/app"  # private, written by "hs" over SSH
OPEN = "hs/open"  # public: readable over git:// and anonymous HTTP
IDLE = 2.0  # the strict server's --stream-idle-timeout
MAX_PACK = 4 << 20


@pytest.fixture(scope="module")
def strict(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server of its own with a short stream timeout and a small pack limit."""
    base = tmp_path_factory.mktemp("strict")
    srv = Server(base / "data", free_port())
    srv.data_dir.mkdir()
    srv.start(
        "--stream-idle-timeout", str(IDLE), "--max-pack-bytes", str(MAX_PACK), "--max-wants", "64"
    )
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def user(strict: Server, tmp_path_factory: pytest.TempPathFactory) -> SSHUser:
    owner = ssh_user(strict, tmp_path_factory.mktemp("hskeys"), "hs")
    for repo, public in ((REPO, False), (OPEN, True)):
        strict.cli("repo", "create", repo, *(["--public"] if public else []))
        strict.cli("grant", "hs", repo, "write")
    return owner


@pytest.fixture(scope="module")
def src(strict: Server, user: SSHUser, repo_root: Path) -> Path:
    """A small repository with branches and tags, pushed over SSH to both repositories."""
    src = Path(make_small_repo(str(repo_root / "hostile-src.git"), commits=20))
    for repo in (REPO, OPEN):
        git("push", strict.ssh_url(repo), "--all", cwd=src, env=user.env())
    return src


def head_oid(src: Path) -> bytes:
    return git("rev-parse", "refs/heads/main", cwd=src).stdout.strip()


def attack(server: Server) -> Attack:
    return Attack(server, server.git_url(OPEN))


# -- raw clients ---------------------------------------------------------------------------


def read_until_closed(sock: socket.socket, timeout: float = 20) -> bytes:
    """Everything the server sends until it closes the connection (AssertionError if it never)."""
    sock.settimeout(timeout)
    out = bytearray()
    while True:
        try:
            data = sock.recv(65536)
        except TimeoutError:
            raise AssertionError(
                f"the server kept the connection open; got {bytes(out)!r}"
            ) from None
        if not data:
            return bytes(out)
        out += data


def git_daemon(server: Server, repo: str, version: int, *requests: bytes) -> bytes:
    """A git:// upload-pack session: the request line, then *requests*; all the server said."""
    extra = b"\0version=2\0" if version == 2 else b""
    with socket.create_connection(("127.0.0.1", server.git_port)) as sock:
        line = b"git-upload-pack /" + repo.encode() + b".git\0host=127.0.0.1\0" + extra
        sock.sendall(pkt_line(line) + b"".join(requests))
        return read_until_closed(sock)


def ssh_git(
    user: SSHUser, command: str, data: bytes, *, version: int = 0
) -> subprocess.CompletedProcess:
    """The real ssh client running *command* with *data* on its stdin."""
    setenv = ["-o", "SetEnv=GIT_PROTOCOL=version=2"] if version == 2 else []
    args = user.ssh_command().split()
    return subprocess.run(
        [args[0], *setenv, *args[1:], "-T", "git@127.0.0.1", command],
        input=data,
        capture_output=True,
        timeout=60,
    )


def v2_fetch(*args: bytes) -> bytes:
    return (
        pkt_lines(b"command=fetch\n", b"agent=hostile/1\n", b"object-format=sha1\n")
        + DELIM_PKT
        + pkt_lines(*args)
        + FLUSH_PKT
    )


def v0_wants(oid: bytes, *lines: bytes) -> bytes:
    caps = b" multi_ack_detailed side-band-64k ofs-delta shallow filter agent=hostile/1"
    return pkt_lines(b"want " + oid + caps + b"\n", *lines) + FLUSH_PKT


# -- numbers -------------------------------------------------------------------------------

HOSTILE_LINES = [
    (b"deepen -1\n", "Invalid deepen: deepen -1 ('-1' is not a decimal number)"),
    (
        b"deepen 2147483648\n",
        f"Invalid deepen: deepen 2147483648 (2147483648 is not between 1 and {INT32_MAX})",
    ),
    (b"deepen " + b"9" * 5000 + b"\n", "Invalid deepen: deepen 9999"),
    (b"deepen-since +5\n", "Invalid deepen-since: deepen-since +5 ('+5' is not a decimal number)"),
    (b"deepen-since  7\n", "Invalid deepen-since: deepen-since  7 (' 7' is not a decimal number)"),
    (b"filter blob:limit=99999999999g\n", "invalid filter-spec 'blob:limit=99999999999g'"),
    (b"filter tree:1_0\n", "invalid filter-spec 'tree:1_0' ('1_0' is not a decimal number)"),
]


@pytest.mark.parametrize(("line", "message"), HOSTILE_LINES)
def test_hostile_numbers_get_err_on_every_transport_and_version(
    strict: Server, user: SSHUser, src: Path, line: bytes, message: str
) -> None:
    """The same bad number is the same ERR over git://, SSH and HTTP, v0 and v2 on each; the
    server stays up and a bystander's clone still works."""
    oid = head_oid(src)
    v2 = v2_fetch(b"want " + oid + b"\n", line, b"done\n")
    v0 = v0_wants(oid, line) + pkt_line(b"done\n")
    check = attack(strict)
    expected = b"ERR " + message.encode()
    answers = {
        "git:// v0": git_daemon(strict, OPEN, 0, v0),
        "git:// v2": git_daemon(strict, OPEN, 2, v2),
        "ssh v0": ssh_git(user, f"git-upload-pack '{REPO}.git'", v0).stdout,
        "ssh v2": ssh_git(user, f"git-upload-pack '{REPO}.git'", v2, version=2).stdout,
    }
    for version, body in ((0, v0), (2, v2)):
        status, headers, answer = strict.request(
            "POST",
            f"/{OPEN}.git/git-upload-pack",
            body,
            {
                "Content-Type": "application/x-git-upload-pack-request",
                **({"Git-Protocol": "version=2"} if version == 2 else {}),
            },
        )
        assert status == 200 and headers["content-type"] == "application/x-git-upload-pack-result"
        answers[f"http v{version}"] = answer
    for where, answer in answers.items():
        assert expected in answer, f"{where}: {answer[-300:]!r}"
        assert b"PACK" not in answer and b"Traceback" not in answer, where
    check.check(strict.data_dir.parent)


# -- limits on every path ------------------------------------------------------------------


def test_want_limit_holds_over_git_and_ssh(strict: Server, user: SSHUser, src: Path) -> None:
    """--max-wants (64 here) refuses a 65-want request over git:// and SSH, v0 and v2 alike."""
    oid = head_oid(src)
    fake = [b"%040x" % n for n in range(1, 65)]
    v0 = pkt_lines(b"want " + oid + b" ofs-delta\n", *(b"want " + f + b"\n" for f in fake))
    v0 += FLUSH_PKT + pkt_line(b"done\n")
    v2 = v2_fetch(b"want " + oid + b"\n", *(b"want " + f + b"\n" for f in fake), b"done\n")
    check = attack(strict)
    expected = b"ERR upload-pack: too many wants (the limit is 64)"
    assert expected in git_daemon(strict, OPEN, 0, v0)
    assert expected in git_daemon(strict, OPEN, 2, v2)
    assert expected in ssh_git(user, f"git-upload-pack '{REPO}.git'", v0).stdout
    assert expected in ssh_git(user, f"git-upload-pack '{REPO}.git'", v2, version=2).stdout
    check.check(strict.data_dir.parent)


def test_pack_limit_holds_over_ssh(
    strict: Server, user: SSHUser, src: Path, tmp_path: Path
) -> None:
    """--max-pack-bytes refuses a real `git push` over SSH of a pack past it; no ref changes."""
    work = tmp_path / "big"
    git("init", "-q", "-b", "main", str(work))
    (work / "noise").write_bytes(os.urandom(MAX_PACK + (1 << 20)))
    git("add", "noise", cwd=work)
    git("-c", "user.name=a", "-c", "user.email=a@b", "commit", "-qm", "big", cwd=work)
    check = attack(strict)
    refs_before = _ssh_refs(strict, user)
    proc = git(
        "push", strict.ssh_url(REPO), "main:refs/heads/big", cwd=work, env=user.env(), check=False
    )
    assert proc.returncode != 0
    assert b"pack exceeds maximum allowed size" in proc.stderr
    assert _ssh_refs(strict, user) == refs_before
    check.check(tmp_path)


def _ssh_refs(server: Server, user: SSHUser) -> dict[str, str]:
    out = git("ls-remote", server.ssh_url(REPO), env=user.env()).stdout.decode()
    return dict(reversed(line.split("\t")) for line in out.splitlines())  # type: ignore[misc]


# -- clients that stop -------------------------------------------------------------------


def spool_files(server: Server) -> list[str]:
    """Spool files the server holds open (they are unlinked at once: found through /proc)."""
    spool = str(server.data_dir / "spool")
    found = []
    for pid in server.pids():
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith(spool):
                found.append(target)
    return found


def test_a_push_that_stops_mid_pack_over_ssh_is_timed_out(
    strict: Server, user: SSHUser, src: Path, tmp_path: Path
) -> None:
    """Commands and half a pack, then silence with the connection open: within about
    1.25 x --stream-idle-timeout the client gets the timeout on band 3 and the channel
    closes; the spool is gone and no ref changed."""
    oid = head_oid(src)
    pack = git("pack-objects", "--stdout", "--revs", cwd=src, input=b"refs/heads/main\n").stdout
    refs_before = _ssh_refs(strict, user)
    check = attack(strict)
    args = user.ssh_command().split()
    proc = subprocess.Popen(
        [*args, "-T", "git@127.0.0.1", f"git-receive-pack '{REPO}.git'"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdin is not None
    command = b"0" * 40 + b" " + oid + b" refs/heads/stalled\0report-status side-band-64k\n"
    proc.stdin.write(pkt_line(command) + FLUSH_PKT + pack[: len(pack) // 2])
    proc.stdin.flush()
    started = time.monotonic()
    time.sleep(IDLE / 2)
    assert proc.poll() is None and len(spool_files(strict)) == 1  # still receiving
    try:
        proc.wait(timeout=IDLE * 5)  # stdin stays open: the server must hang up by itself
    finally:
        proc.kill()
    waited = time.monotonic() - started
    assert proc.stdout is not None
    out = proc.stdout.read()
    assert IDLE <= waited <= IDLE * 3, waited
    assert b"\x03timeout: nothing received for 2 s" in out
    assert spool_files(strict) == []
    assert _ssh_refs(strict, user) == refs_before
    check.check(tmp_path)


def test_a_fetch_that_stops_mid_negotiation_over_git_is_timed_out(
    strict: Server, src: Path, tmp_path: Path
) -> None:
    """git://: wants, then half a have line, then silence: ERR timeout and the connection
    closed within about 1.25 x the timeout, while a bystander's clone works meanwhile."""
    check = attack(strict)
    with socket.create_connection(("127.0.0.1", strict.git_port)) as sock:
        sock.sendall(pkt_line(b"git-upload-pack /" + OPEN.encode() + b".git\0host=127.0.0.1\0"))
        sock.sendall(v0_wants(head_oid(src)) + pkt_line(b"have " + b"1" * 40 + b"\n")[:20])
        started = time.monotonic()
        check.check(tmp_path)  # the attacker's connection is still open here
        answer = read_until_closed(sock, timeout=IDLE * 5)
    assert time.monotonic() - started <= IDLE * 3 + 5  # the bystander's clone took some too
    assert answer.endswith(pkt_line(b"ERR timeout: nothing received for 2 s\n"))


def test_an_ssh_login_that_runs_nothing_is_dropped(strict: Server, user: SSHUser) -> None:
    """A client that logs in and never runs a command does not hold its connection for ever."""
    args = user.ssh_command().split()
    started = time.monotonic()
    proc = subprocess.run(
        [*args, "-N", "git@127.0.0.1"], capture_output=True, stdin=subprocess.DEVNULL, timeout=30
    )
    assert time.monotonic() - started <= IDLE * 3 + 2
    assert proc.returncode != 0
    assert "no git command for 2" in strict.log_text()


# -- deleting the current branch ---------------------------------------------------------


def test_git_push_delete_of_the_current_branch_is_refused(
    strict: Server, user: SSHUser, src: Path, tmp_path: Path
) -> None:
    """`git push --delete origin main` (HEAD's branch) gets git's ng over SSH and HTTP; main
    stays; deleting another branch in the same way still works."""
    token = strict.user_with_token("hs")
    clone = tmp_path / "clone"
    git("clone", "-q", strict.ssh_url(REPO), str(clone), env=user.env())
    refs_before = _ssh_refs(strict, user)
    for url in (strict.ssh_url(REPO), strict.url(REPO, token, user="hs")):
        proc = git("push", "--delete", url, "main", cwd=clone, env=user.env(), check=False)
        assert proc.returncode != 0
        assert b"deletion of the current branch prohibited" in proc.stderr, proc.stderr
        assert b"refusing to delete the current branch: refs/heads/main" in proc.stderr
        assert _ssh_refs(strict, user) == refs_before
    git("push", strict.ssh_url(REPO), "main:refs/heads/scratch", cwd=clone, env=user.env())
    git("push", "--delete", strict.ssh_url(REPO), "scratch", cwd=clone, env=user.env())
    assert _ssh_refs(strict, user) == refs_before


# -- the data directory ------------------------------------------------------------------


def loose_paths(root: Path) -> list[str]:
    """Every directory under *root* (itself included) that is not 0700, and file not 0600."""
    loose = []
    for path in [root, *root.rglob("*")]:
        mode = path.lstat().st_mode
        if stat.S_ISDIR(mode) or stat.S_ISREG(mode):
            expected = 0o700 if stat.S_ISDIR(mode) else 0o600
            if stat.S_IMODE(mode) != expected:
                loose.append(f"{path.relative_to(root)} {stat.S_IMODE(mode):o}")
    return loose


def start_with_umask(server: Server, *extra: str) -> None:
    old = os.umask(0o022)
    try:
        server.start(*extra)
    finally:
        os.umask(old)


def test_data_directory_is_private_whatever_the_umask(tmp_path: Path) -> None:
    """Started with umask 022 and two workers: after a push and a clone every directory under
    the data dir is 0700 and every file 0600; after a restart over a loosened data dir too;
    and --allow-delete-current (given at that restart) lets HEAD's branch go."""
    server = Server(tmp_path / "data", free_port())
    server.data_dir.mkdir(mode=0o755)
    os.chmod(server.data_dir, 0o755)
    start_with_umask(server, "--workers", "2")
    try:
        token = server.user_with_token("perm")
        server.cli("repo", "create", "perm/app")
        server.cli("grant", "perm", "perm/app", "write")
        src = make_small_repo(str(tmp_path / "src.git"), commits=20)
        url = server.url("perm/app", token, user="perm")
        git("push", url, "--all", cwd=src)
        git("clone", "-q", url, str(tmp_path / "clone"))
        assert (server.data_dir / "pack-cache").is_dir() and (server.data_dir / "spool").is_dir()
        assert loose_paths(server.data_dir) == []
    finally:
        server.stop()
    # A data dir left loose by an older version, or by hand.
    for path in [server.data_dir, *server.data_dir.rglob("*")]:
        if not path.is_symlink():
            os.chmod(path, 0o755 if path.is_dir() else 0o644)
    (server.data_dir / "stray").mkdir(mode=0o777)
    (server.data_dir / "stray" / "note").write_text("x")
    assert loose_paths(server.data_dir) != []
    start_with_umask(server, "--allow-delete-current")
    try:
        assert loose_paths(server.data_dir) == []
        assert "Made" in server.log_text() and "private" in server.log_text()
        git("clone", "-q", url, str(tmp_path / "clone2"))
        git("push", "--delete", url, "main", cwd=tmp_path / "clone2")
        assert "refs/heads/main" not in remote_refs(url)
        assert loose_paths(server.data_dir) == []
    finally:
        server.stop()
