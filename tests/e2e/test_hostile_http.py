"""End to end: hostile HTTP clients are refused from their request heads, at no cost to others.

Each test attacks a real server the way a hostile client would over raw
sockets (credentials that are wrong, bodies declared huge, heads that never
end), checks the status it answers and how soon, and then checks with
``Attack`` that the server's memory and data directory did not grow by what
was sent and that a bystander's clone still works, while the attacking
connections are still open.
"""

from __future__ import annotations

import base64
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gitstratum.testing.fixtures import make_small_repo

from .conftest import Server, free_port, git
from .hostile import Attack, MiB

pytestmark = pytest.mark.e2e

HEADER_TIMEOUT = 2.0
MAX_PACK = 4 * MiB
MAX_REQUEST = 1 * MiB
API_MAX_BODY = 64 * 1024
LIMITS = [
    "--max-pack-bytes",
    str(MAX_PACK),
    "--max-request-bytes",
    str(MAX_REQUEST),
    "--api-max-body-bytes",
    str(API_MAX_BODY),
    "--api-max-json-depth",
    "16",
    "--http-header-timeout",
    str(HEADER_TIMEOUT),
    "--http-max-uri-bytes",
    "2048",
    "--http-max-header-bytes",
    "8192",
    "--http-max-headers",
    "20",
]
PUSH = "/evil/private.git/git-receive-pack"
FETCH = "/evil/private.git/git-upload-pack"
API_REPOS = "/api/v1/repos"


@pytest.fixture(scope="module")
def hserver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server with small limits, a private repository and users of each kind."""
    base = tmp_path_factory.mktemp("hostile-http")
    srv = Server(base / "data", free_port())
    srv.data_dir.mkdir()
    srv.start(*LIMITS)
    srv.cli("repo", "create", "evil/private")
    srv.cli("repo", "create", "evil/open", "--public")
    src = make_small_repo(str(base / "src.git"))
    git("push", srv.url("evil/open", srv.admin_token, user="admin"), "--all", cwd=src)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def tokens(hserver: Server) -> dict[str, str]:
    """Tokens of a writer, a reader and a stranger to evil/private."""
    out = {name: hserver.user_with_token(name) for name in ("writer", "reader", "stranger")}
    hserver.cli("grant", "writer", "evil/private", "write")
    hserver.cli("grant", "reader", "evil/private", "read")
    return out


def attack(server: Server) -> Attack:
    return Attack(server, f"{server.base}/evil/open.git")


def basic(token: str) -> str:
    return "Basic " + base64.b64encode(f"x:{token}".encode()).decode()


def connect(server: Server) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    return s


def head(method: str, path: str, headers: dict[str, str]) -> bytes:
    lines = [
        f"{method} {path} HTTP/1.1",
        "Host: 127.0.0.1",
        *(f"{k}: {v}" for k, v in headers.items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def read_response(s: socket.socket, timeout: float = 10) -> tuple[int, bytes]:
    """The status and whole response (until the server closes) from *s*."""
    s.settimeout(timeout)
    data = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            chunk = s.recv(65536)
        except (ConnectionResetError, TimeoutError):
            break
        if not chunk:
            break
        data += chunk
        if b"\r\n\r\n" in data:
            header, _, body = data.partition(b"\r\n\r\n")
            length = [
                int(line.split(b":", 1)[1])
                for line in header.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            ]
            if length and len(body) >= length[0]:
                break
    assert data.startswith(b"HTTP/1.1 "), data[:200]
    return int(data[9:12]), data


def spooled_bytes(server: Server) -> int:
    """Bytes in the server's open spool files (unlinked, so the data dir's size misses them)."""
    total = 0
    for pid in server.pids():
        try:
            fds = list(Path(f"/proc/{pid}/fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                if "/spool/" in os.readlink(fd):
                    total += os.stat(fd).st_size
            except OSError:
                continue
    return total


def send_quietly(s: socket.socket, data: bytes) -> int:
    """Send what the server will take of *data*; the bytes sent."""
    s.settimeout(2)
    sent = 0
    try:
        while sent < len(data):
            sent += s.send(data[sent : sent + 65536])
    except OSError:
        pass
    return sent


# -- refused before the body is read ----------------------------------------------------------


@pytest.mark.parametrize(
    ("who", "path", "status"),
    [
        (None, PUSH, 401),
        ("bad", PUSH, 401),
        ("stranger", PUSH, 404),
        ("reader", PUSH, 403),
        ("bad", FETCH, 401),
        ("stranger", FETCH, 404),
        (None, API_REPOS, 401),
        ("bad", API_REPOS, 401),
        ("writer", API_REPOS, 403),
        ("stranger", "/api/v1/repos/evil/private", 404),
        ("writer", "/api/v1/repos/evil/private/permissions/writer", 403),
    ],
)
def test_unauthorised_bodies_are_refused_before_they_are_read(
    hserver: Server, tokens: dict[str, str], tmp_path: Path, who: str | None, path: str, status: int
) -> None:
    """Bad or missing credentials get their 401/403/404 at once, with a gigabyte body declared.

    Git endpoints answer as their handlers would (404 for a stranger to a
    private repository); the admin API as its routes would (403 for a
    non-admin, 404 for a repository it cannot administer).

    Eight such connections at once declare 1 GiB each and start sending it;
    the answer comes before any body byte, the server keeps none of it (disk
    and memory), and a bystander clones meanwhile.
    """
    token = tokens.get(who or "", "gst_not-a-token")
    if path.startswith("/api/"):
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}
    else:
        kind = "receive" if path == PUSH else "upload"
        headers = {
            "Content-Type": f"application/x-git-{kind}-pack-request",
            "Authorization": basic(token),
        }
    if who is None:
        del headers["Authorization"]
    headers["Content-Length"] = str(1 << 30)
    a = attack(hserver)
    socks = [connect(hserver) for _ in range(8)]
    try:
        for s in socks:
            started = time.monotonic()
            s.sendall(head("POST", path, headers))
            got, response = read_response(s)
            assert got == status, response
            assert time.monotonic() - started < 5
            assert b"Connection: close" in response
        for s in socks:
            send_quietly(s, b"\0" * (4 * MiB))
        assert spooled_bytes(hserver) == 0
        a.check(tmp_path, max_disk_growth=1 * MiB)
    finally:
        for s in socks:
            s.close()


def test_a_refused_push_reaches_the_real_git_client(hserver: Server, tmp_path: Path) -> None:
    """git itself, pushing a pack with a wrong token, is told 401 and changes nothing."""
    work = tmp_path / "w"
    git("init", "-q", "-b", "main", str(work))
    (work / "f").write_bytes(b"x" * 1000)
    git("add", "f", cwd=work)
    git("-c", "user.name=a", "-c", "user.email=a@b", "commit", "-qm", "m", cwd=work)
    a = attack(hserver)
    url = hserver.url("evil/private", "gst_wrong")
    proc = git("push", url, "main", cwd=work, check=False, env={"GIT_TERMINAL_PROMPT": "0"})
    assert proc.returncode != 0
    assert b"401" in proc.stderr or b"Authentication failed" in proc.stderr
    a.check(tmp_path)


# -- declared lengths over the endpoint's limit -----------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "kind", "limit"),
    [
        ("POST", PUSH, "receive-pack", MAX_PACK),
        ("POST", FETCH, "upload-pack", MAX_REQUEST),
        ("POST", "/api/v1/repos", "api", API_MAX_BODY),
        ("POST", "/healthz", "none", 0),
        ("GET", "/evil/open.git/info/refs?service=git-upload-pack", "none", 0),
    ],
)
def test_declared_lengths_over_the_limit_are_413_at_once(
    hserver: Server,
    tokens: dict[str, str],
    tmp_path: Path,
    method: str,
    path: str,
    kind: str,
    limit: int,
) -> None:
    """A Content-Length one byte over the endpoint's limit is 413 before the body is sent."""
    if kind == "api":
        headers = {
            "Authorization": f"Bearer {hserver.admin_token}",
            "Content-Type": "application/json",
        }
    else:
        headers = {
            "Authorization": basic(tokens["writer"]),
            "Content-Type": f"application/x-git-{kind}-request",
        }
    headers["Content-Length"] = str(limit + 1)
    a = attack(hserver)
    with connect(hserver) as s:
        s.sendall(head(method, path, headers))
        status, response = read_response(s)
        assert status == 413, response
        send_quietly(s, b"\0" * min(limit + 1, 2 * MiB))
        assert spooled_bytes(hserver) == 0
        a.check(tmp_path, max_disk_growth=1 * MiB)


# -- request heads ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_head", "status"),
    [
        (b"GET /" + b"a" * 3000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
        (b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\n\r\n", 414),
        (b"GET /healthz HTTP/1.1\r\n" + b"X-A: b\r\n" * 21 + b"\r\n", 431),
        (b"GET /healthz HTTP/1.1\r\nX-Big: " + b"b" * 9000 + b"\r\n\r\n", 431),
        (b"GET /healthz HTTP/1.1\r\n" + (b"X-Mid: " + b"m" * 1000 + b"\r\n") * 9 + b"\r\n", 431),
        (b"GET /healthz HTTP/1.1\r\nX-Endless: " + b"e" * 200_000, 431),
        (b"GET /healthz\r\n\r\n", 400),
        (b"GET /healthz HTTP/1.1\r\nno colon here\r\n\r\n", 400),
    ],
    ids=[
        "long-uri",
        "endless-uri",
        "many-headers",
        "one-big-header",
        "headers-too-large-together",
        "endless-header",
        "no-version",
        "header-without-colon",
    ],
)
def test_request_heads_are_bounded(
    hserver: Server, tmp_path: Path, request_head: bytes, status: int
) -> None:
    """Too long a URI is 414, too many or too large headers 431, a malformed head 400."""
    a = attack(hserver)
    socks = [connect(hserver) for _ in range(4)]
    try:
        for s in socks:
            send_quietly(s, request_head)
            got, response = read_response(s)
            assert got == status, response[:300]
        a.check(tmp_path)
    finally:
        for s in socks:
            s.close()


def poll(s: socket.socket) -> bytes | None:
    """Trickle one more header byte; what the server sent back (b"" if it closed), or None."""
    try:
        s.send(b"a")
    except OSError:
        pass  # the server shut its side; what it said is still to be read
    s.setblocking(False)
    try:
        return s.recv(4096)
    except BlockingIOError:
        return None
    except OSError:
        return b""


def test_slowloris_heads_are_dropped_after_the_header_timeout(
    hserver: Server, tmp_path: Path
) -> None:
    """Clients that trickle their headers get 408 and are cut after --http-header-timeout.

    Thirty connections each send a byte of header every 0.2 s, which would
    reset any idle timeout; each is still answered 408 soon after the
    deadline, and a bystander clones while they trickle.
    """
    socks = [connect(hserver) for _ in range(30)]
    a = attack(hserver)
    started = time.monotonic()
    for s in socks:
        s.sendall(b"GET /healthz HTTP/1.1\r\nX-Slow: ")
    answered: dict[int, bytes] = {}
    checked = False
    try:
        while len(answered) < len(socks) and time.monotonic() - started < HEADER_TIMEOUT + 10:
            for i, s in enumerate(socks):
                if i not in answered:
                    got = poll(s)
                    if got is not None:
                        answered[i] = got
            if not checked and time.monotonic() - started > HEADER_TIMEOUT / 2:
                assert not answered, "a slow head was cut before the deadline"
                a.check(tmp_path)  # a bystander, while the attackers still trickle
                checked = True
            time.sleep(0.2)
        assert len(answered) == len(socks), "some slow heads were never cut"
        assert all(d.startswith(b"HTTP/1.1 408 ") for d in answered.values()), answered
    finally:
        for s in socks:
            s.close()
    assert hserver.alive()


# -- JSON depth --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [b"[" * 60_000, b'{"name": ' + b"[" * 1000 + b"]" * 1000 + b"}", b"{" * 17 + b"}" * 17],
)
def test_deeply_nested_json_is_400(hserver: Server, tmp_path: Path, body: bytes) -> None:
    """An admin API body nested past --api-max-json-depth is 400 with the reason, never 500."""
    a = attack(hserver)
    status, _, data = hserver.request(
        "POST",
        "/api/v1/repos",
        body,
        {"Authorization": f"Bearer {hserver.admin_token}", "Content-Type": "application/json"},
    )
    assert status == 400, data
    assert b"nested more than 16 levels" in data
    a.check(tmp_path)
    assert hserver.api("GET", "/repos/evil/open")[0] == 200


# -- numbers in headers ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("length_headers", "status"),
    [
        (b"Content-Length: -1\r\n", 400),
        (b"Content-Length: abc\r\n", 400),
        (b"Content-Length: 1e3\r\n", 400),
        (b"Content-Length: +5\r\n", 400),
        (b"Content-Length: 5, 5\r\n", 400),
        (b"Content-Length: 99999999999999999999999\r\n", 413),
        (b"Content-Length: " + b"9" * 5000 + b"\r\n", 413),
        (b"Content-Length: 5\r\nContent-Length: 6\r\n", 400),
        (b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n", 400),
        (b"Transfer-Encoding: gzip\r\n", 400),
    ],
)
def test_malformed_and_huge_lengths_are_4xx(
    hserver: Server, tokens: dict[str, str], tmp_path: Path, length_headers: bytes, status: int
) -> None:
    """Every Content-Length a client may write gets a clear 4xx, never a 500 or a silent close."""
    a = attack(hserver)
    with connect(hserver) as s:
        s.sendall(
            f"POST {PUSH} HTTP/1.1\r\nHost: x\r\nAuthorization: {basic(tokens['writer'])}\r\n"
            "Content-Type: application/x-git-receive-pack-request\r\n".encode()
            + length_headers
            + b"\r\n"
        )
        got, response = read_response(s)
        assert got == status, response
        assert b"\r\n\r\n" in response and response.split(b"\r\n\r\n", 1)[1].strip()
    a.check(tmp_path)


def test_an_endless_chunked_push_is_413_at_its_bound(
    hserver: Server, tokens: dict[str, str], tmp_path: Path
) -> None:
    """A chunked push that passes --max-pack-bytes is 413 there, not when (if ever) it ends."""
    a = attack(hserver)
    with connect(hserver) as s:
        s.sendall(
            head(
                "POST",
                PUSH,
                {
                    "Authorization": basic(tokens["writer"]),
                    "Content-Type": "application/x-git-receive-pack-request",
                    "Transfer-Encoding": "chunked",
                },
            )
            + b"f" * 40
            + b"\r\n"
        )
        sent = send_quietly(s, b"\0" * (2 * MAX_PACK))
        got, response = read_response(s, timeout=15)
        assert got == 413, response
        assert sent <= 2 * MAX_PACK
        assert spooled_bytes(hserver) <= MAX_PACK  # the bound, of a writer's body, and no more
    a.check(tmp_path, max_disk_growth=MAX_PACK + MiB)
