"""End to end: malformed and hostile requests get a clear Git-level error and change nothing."""

from __future__ import annotations

import hashlib
import struct
import zlib
from pathlib import Path

import pytest

from .conftest import Server, bench_repo, free_port, git, remote_refs

pytestmark = pytest.mark.e2e

ZERO = "0" * 40


def pkt(data: bytes | str) -> bytes:
    b = data.encode() if isinstance(data, str) else data
    return b"%04x" % (len(b) + 4) + b


def entry_header(type_num: int, size: int) -> bytes:
    """A pack entry header: type and size in git's variable-length encoding."""
    c = (type_num << 4) | (size & 0x0F)
    size >>= 4
    out = bytearray()
    while size:
        out.append(c | 0x80)
        c = size & 0x7F
        size >>= 7
    out.append(c)
    return bytes(out)


def raw_pack(entries: list[bytes]) -> bytes:
    body = b"PACK" + struct.pack(">II", 2, len(entries)) + b"".join(entries)
    return body + hashlib.sha1(body).digest()


def ref_delta(base_hex: str, delta: bytes) -> bytes:
    return entry_header(7, len(delta)) + bytes.fromhex(base_hex) + zlib.compress(delta)


def blob_entry(data: bytes) -> bytes:
    return entry_header(3, len(data)) + zlib.compress(data)


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def insert_delta(base_len: int, payload: bytes) -> bytes:
    """A delta that ignores its base and inserts *payload*."""
    return varint(base_len) + varint(len(payload)) + bytes([len(payload)]) + payload


@pytest.fixture(scope="module")
def target(server: Server, ci_token: str, repo_root: Path) -> dict:
    """A repository with history that every hostile request is aimed at."""
    src = bench_repo(repo_root, files=80, commits=20, seed=7, branches=2, tags=2)
    server.cli("repo", "create", "evil/target")
    server.cli("grant", "ci", "evil/target", "write")
    url = server.url("evil/target", ci_token)
    git("push", url, "--all", cwd=src)
    git("push", url, "--tags", cwd=src)
    main = git("rev-parse", "main", cwd=src).stdout.strip().decode()
    return {"url": url, "src": src, "main": main, "refs": remote_refs(url)}


def unchanged(server: Server, target: dict) -> None:
    assert server.alive()
    assert remote_refs(target["url"]) == target["refs"]


def upload(server: Server, token: str, body: bytes, v2: bool = True) -> tuple[int, bytes]:
    headers = {**server.basic(token), "Content-Type": "application/x-git-upload-pack-request"}
    if v2:
        headers["Git-Protocol"] = "version=2"
    status, _, data = server.request("POST", "/evil/target.git/git-upload-pack", body, headers)
    return status, data


def receive(
    server: Server, token: str, body: bytes, repo: str = "evil/target"
) -> tuple[int, bytes]:
    headers = {**server.basic(token), "Content-Type": "application/x-git-receive-pack-request"}
    status, _, data = server.request("POST", f"/{repo}.git/git-receive-pack", body, headers)
    return status, data


def assert_git_error(status: int, data: bytes, *needles: bytes) -> None:
    """A 4xx, or a 200 whose body carries an ERR packet; never a 5xx or an empty 200."""
    assert status < 500, (status, data[:300])
    if status == 200:
        assert b"ERR " in data, data[:300]
    for needle in needles:
        assert needle in data, (needle, data[:300])


@pytest.mark.parametrize(
    "body,needle",
    [
        (b"zzzz", b"bad line length character"),
        (b"fff1" + b"x" * 100, b"bad line length"),
        (pkt("command=ls-refs\n")[:-3], b"unexpected end"),
        (b"0004" * 100000, b"ERR "),
    ],
    ids=["non-hex", "too-long", "truncated", "endless-empty"],
)
def test_malformed_pkt_lines(
    server: Server, ci_token: str, target: dict, body: bytes, needle: bytes
) -> None:
    """Non-hex lengths, oversize lengths, truncation and endless empty packets are refused clearly."""
    status, data = upload(server, ci_token, body)
    assert_git_error(status, data, needle)
    unchanged(server, target)


def test_unknown_command(server: Server, ci_token: str, target: dict) -> None:
    """A v2 command the server does not know is an ERR naming it."""
    status, data = upload(server, ci_token, pkt("command=frobnicate\n") + b"0000")
    assert_git_error(status, data, b"frobnicate")
    unchanged(server, target)


def test_want_unknown_object(server: Server, ci_token: str, target: dict) -> None:
    """Wanting an object the server does not have is 'not our ref'."""
    body = (
        pkt("command=fetch\n") + b"0001" + pkt("want " + "1" * 40 + "\n") + pkt("done\n") + b"0000"
    )
    status, data = upload(server, ci_token, body)
    assert_git_error(status, data, b"not our ref")
    unchanged(server, target)


def test_want_object_of_another_repository(
    server: Server, ci_token: str, target: dict, tmp_path: Path
) -> None:
    """A commit pushed only to another repository is never served from this one."""
    server.cli("repo", "create", "evil/other")
    server.cli("grant", "ci", "evil/other", "write")
    work = tmp_path / "other"
    git("init", "-q", "-b", "main", str(work))
    (work / "secret.txt").write_text("only in evil/other\n")
    git("add", ".", cwd=work)
    git("commit", "-qm", "secret", cwd=work)
    git("push", server.url("evil/other", ci_token), "main", cwd=work)
    secret = git("rev-parse", "HEAD", cwd=work).stdout.strip().decode()
    for v2 in (True, False):
        if v2:
            body = (
                pkt("command=fetch\n") + b"0001" + pkt(f"want {secret}\n") + pkt("done\n") + b"0000"
            )
        else:
            body = pkt(f"want {secret} side-band-64k ofs-delta\n") + b"0000" + pkt("done\n")
        status, data = upload(server, ci_token, body, v2=v2)
        assert_git_error(status, data, b"not our ref")
        assert b"PACK" not in data
    # and the real client cannot fetch it by SHA either
    probe = tmp_path / "probe"
    git("init", "-q", str(probe))
    assert git("fetch", target["url"], secret, cwd=probe, check=False).returncode != 0
    unchanged(server, target)


def push_body(
    commands: list[tuple[str, str, str]], pack: bytes | None, caps: str = "report-status"
) -> bytes:
    lines = b""
    for i, (old, new, ref) in enumerate(commands):
        line = f"{old} {new} {ref}"
        lines += pkt(line.encode() + (b"\0" + caps.encode() if i == 0 else b"") + b"\n")
    return lines + b"0000" + (pack or b"")


def test_corrupt_and_truncated_packs(server: Server, ci_token: str, target: dict) -> None:
    """A pack with a bad checksum, bad zlib data or cut short is an unpack error; no ref moves."""
    good = raw_pack([blob_entry(b"hello\n")])
    blob = hashlib.sha1(b"blob 6\0hello\n").hexdigest()
    cases = [
        good[:-1] + bytes([good[-1] ^ 1]),  # trailer checksum
        good[:20],  # truncated
        raw_pack([entry_header(3, 6) + b"\x78\x9cnot zlib at all"]),
        b"NOTAPACK" + good[8:],
    ]
    for pack in cases:
        status, data = receive(server, ci_token, push_body([(ZERO, blob, "refs/heads/junk")], pack))
        assert status < 500
        assert b"unpack " in data and b"unpack ok" not in data, data
        assert b"ng refs/heads/junk" in data
    unchanged(server, target)


def blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def test_delta_cycle_and_missing_base(server: Server, ci_token: str, target: dict) -> None:
    """Two deltas that are each other's base are a delta cycle; a base nobody has is missing."""
    # Insert-only deltas ignore their base, so each one's id is known: a real cycle.
    a, b = blob_id(b"xyz"), blob_id(b"abc")
    cycle = raw_pack([ref_delta(b, insert_delta(3, b"xyz")), ref_delta(a, insert_delta(3, b"abc"))])
    missing = raw_pack([ref_delta("c" * 40, insert_delta(3, b"xyz"))])
    for pack, reason in ((cycle, b"delta cycle"), (missing, b"missing bases")):
        status, data = receive(server, ci_token, push_body([(ZERO, a, "refs/heads/junk")], pack))
        assert status < 500
        assert b"unpack ok" not in data and b"ng refs/heads/junk" in data, data
        assert reason in data, data
    unchanged(server, target)


@pytest.mark.parametrize(
    "ref",
    [
        "refs/heads/a..b",
        "refs/heads/x.lock",
        "refs/heads/sp ace",
        "refs/heads/",
        "HEAD",
        "refs/heads/a@{b",
        "refs/heads//x",
        "refs/heads/tilde~1",
        "refs/foo",
    ],
)
def test_funny_ref_names(server: Server, ci_token: str, target: dict, ref: str) -> None:
    """Ref names git check-ref-format refuses are 'funny refname', sent raw to receive-pack."""
    status, data = receive(server, ci_token, push_body([(ZERO, target["main"], ref)], None))
    assert status < 500
    assert b"funny refname" in data or b"ERR" in data, data
    unchanged(server, target)


def test_stale_old_value(server: Server, ci_token: str, target: dict) -> None:
    """An update whose old value is not the ref's current value fails and leaves it."""
    src = target["src"]
    parent = git("rev-parse", "main~1", cwd=src).stdout.strip().decode()
    body = push_body([(parent, parent, "refs/heads/main")], None)
    status, data = receive(server, ci_token, body)
    assert status == 200
    assert b"ng refs/heads/main failed to update ref" in data, data
    unchanged(server, target)


def test_atomic_push_with_one_bad_ref(server: Server, ci_token: str, target: dict) -> None:
    """With atomic, one bad ref refuses all: the good one reports 'atomic push failure'."""
    main = target["main"]
    body = push_body(
        [(ZERO, main, "refs/heads/fine"), (ZERO, main, "refs/heads/bad..name")],
        None,
        caps="report-status atomic",
    )
    status, data = receive(server, ci_token, body)
    assert status == 200
    assert b"ng refs/heads/fine atomic push failure" in data, data
    assert b"ng refs/heads/bad..name funny refname" in data, data
    unchanged(server, target)


def test_atomic_push_with_real_client(
    server: Server, ci_token: str, target: dict, tmp_path: Path
) -> None:
    """git push --atomic where the server refuses one ref (a file/directory clash) moves none."""
    work = tmp_path / "w"
    git("clone", "-q", target["url"], str(work))
    git("commit", "-q", "--allow-empty", "-m", "x", cwd=work)
    out = git(
        "push",
        "--atomic",
        target["url"],
        "HEAD:refs/heads/brand-new",
        "HEAD:refs/heads/main/sub",
        cwd=work,
        check=False,
    )
    assert out.returncode != 0
    assert b"atomic push failure" in out.stderr, out.stderr
    unchanged(server, target)


@pytest.mark.parametrize(
    "path",
    [
        "/evil/../target.git/info/refs?service=git-upload-pack",
        "/evil/%2e%2e/target.git/info/refs?service=git-upload-pack",
        "/evil/%2E%2E/%2E%2E/etc/info/refs?service=git-upload-pack",
        "//etc/passwd/info/refs?service=git-upload-pack",
        "/evil/target%00.git/info/refs?service=git-upload-pack",
        "/evil%2ftarget.git/info/refs?service=git-upload-pack",
    ],
)
def test_repository_path_traversal(server: Server, ci_token: str, target: dict, path: str) -> None:
    """'..', encoded dots and slashes, absolute paths and NULs are a 4xx before any lookup."""
    status, _, body = server.request("GET", path, headers=server.basic(ci_token))
    assert 400 <= status < 500, (status, body)
    unchanged(server, target)


def test_dumb_http_is_a_clear_404(server: Server, ci_token: str, target: dict) -> None:
    """Dumb-HTTP paths answer 404 saying dumb HTTP is not supported."""
    for path in (
        "/evil/target.git/info/refs",
        "/evil/target.git/HEAD",
        "/evil/target.git/objects/info/packs",
    ):
        status, _, body = server.request("GET", path, headers=server.basic(ci_token))
        assert status == 404 and b"dumb" in body, (path, status, body)


def test_wrong_token_and_missing_permission(
    server: Server, ci_token: str, target: dict, tmp_path: Path
) -> None:
    """A wrong token is 401 with a Basic challenge; a reader pushing gets 403; others see 404."""
    status, headers, _ = server.request(
        "GET",
        "/evil/target.git/info/refs?service=git-upload-pack",
        headers=server.basic("gst_wrong"),
    )
    assert status == 401 and headers["www-authenticate"].startswith("Basic realm=")
    status, headers, _ = server.request("GET", "/evil/target.git/info/refs?service=git-upload-pack")
    assert status == 401 and "www-authenticate" in headers
    reader = server.user_with_token("reader")
    server.cli("grant", "reader", "evil/target", "read")
    status, _, _ = server.request(
        "GET",
        "/evil/target.git/info/refs?service=git-receive-pack",
        headers=server.basic(reader, "reader"),
    )
    assert status == 403
    stranger = server.user_with_token("stranger")
    status, _, _ = server.request(
        "GET",
        "/evil/target.git/info/refs?service=git-upload-pack",
        headers=server.basic(stranger, "stranger"),
    )
    assert status == 404
    # the real client: a reader's push fails and changes nothing
    work = tmp_path / "w"
    git("clone", "-q", server.url("evil/target", reader, "reader"), str(work))
    git("commit", "-q", "--allow-empty", "-m", "x", cwd=work)
    assert git("push", "origin", "HEAD:main", cwd=work, check=False).returncode != 0
    bad = git("ls-remote", server.url("evil/target", "gst_wrong"), check=False)
    assert bad.returncode != 0
    unchanged(server, target)


def limited_server(tmp_path: Path, repo: str, *options: str) -> tuple[Server, str]:
    """A server started with *options*, and a 'ci' token that may write the new *repo*."""
    srv = Server(tmp_path / "data", free_port())
    srv.data_dir.mkdir()
    srv.start(*options)
    try:
        token = srv.user_with_token("ci")
        srv.cli("repo", "create", repo)
        srv.cli("grant", "ci", repo, "write")
    except BaseException:
        srv.stop()
        raise
    return srv, token


def test_oversized_push_is_413(tmp_path: Path, repo_root: Path) -> None:
    """A push body over --max-pack-bytes is refused with 413 and the ref is not created."""
    srv, token = limited_server(tmp_path, "acme/small", "--max-pack-bytes", "20000")
    try:
        src = bench_repo(repo_root, files=80, commits=20, seed=7, branches=2, tags=2)
        out = git("push", srv.url("acme/small", token), "main", cwd=src, check=False)
        assert out.returncode != 0
        assert b"413" in out.stderr, out.stderr
        assert remote_refs(srv.url("acme/small", token)) == {}
        assert srv.alive()
    finally:
        srv.stop()


def test_too_many_ref_updates_shows_git_the_reason(tmp_path: Path, repo_root: Path) -> None:
    """A push over --max-push-commands fails with the reason printed by git, and changes no ref."""
    srv, token = limited_server(tmp_path, "acme/many", "--max-push-commands", "2")
    try:
        src = bench_repo(repo_root, files=20, commits=5, seed=11, branches=3, tags=0)
        out = git("push", srv.url("acme/many", token), "--all", cwd=src, check=False)
        assert out.returncode != 0
        assert b"remote: error: too many ref updates in one push (the limit is 2)" in out.stderr, (
            out.stderr
        )
        assert remote_refs(srv.url("acme/many", token)) == {}
        assert srv.alive()
    finally:
        srv.stop()
