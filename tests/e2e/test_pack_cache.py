"""End to end: the pack cache, pre-warm and admission control on real servers with the real git.

Each scenario runs its own standalone server (the options differ), judged by
what ``/metrics`` says and by ``git fsck`` of what the clones received.
"""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gitstratum.testing.wire import read_response

from .conftest import Server, bench_repo, free_port, git

pytestmark = pytest.mark.e2e

REPO = "acme/cache"
FETCH_HEADERS = {
    "Content-Type": "application/x-git-upload-pack-request",
    "Git-Protocol": "version=2",
}


def metric(server: Server, name: str, **labels: str) -> float:
    """One sample of the server's /metrics (0 when absent)."""
    status, _, body = server.request("GET", "/metrics")
    assert status == 200
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    return 0.0


def wait_until(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for the server")
        time.sleep(0.05)


def cache_bytes(server: Server) -> int:
    return sum(p.stat().st_size for p in (server.data_dir / "pack-cache").glob("??/*.pack"))


def start_server(root: Path, name: str, *options: str) -> Server:
    srv = Server(root / name, free_port())
    srv.data_dir.mkdir()
    srv.start(*options)
    return srv


def populate(srv: Server, src: Path) -> tuple[str, str]:
    """A user 'ci' with write access to REPO, which gets every branch and tag of *src*."""
    token = srv.user_with_token("ci")
    srv.cli("repo", "create", REPO)
    srv.cli("grant", "ci", REPO, "write")
    url = srv.url(REPO, token)
    git("push", "-q", url, "--all", cwd=src)
    git("push", "-q", url, "--tags", cwd=src)
    return url, token


def fetch_body(want: str, depth: int = 1) -> bytes:
    """clone_storm.py's fetch: thin-pack, ofs-delta, no-progress, deepen, one want."""

    def pkt(s: str) -> bytes:
        return b"%04x" % (len(s) + 4) + s.encode()

    body = pkt("command=fetch\n") + pkt("object-format=sha1\n") + b"0001"
    body += pkt("thin-pack\n") + pkt("ofs-delta\n") + pkt("no-progress\n")
    if depth:
        body += pkt(f"deepen {depth}\n")
    return body + pkt(f"want {want}\n") + pkt("done\n") + b"0000"


def depth_one_clones(url: str, into: Path, count: int) -> list[Path]:
    """*count* concurrent ``git clone --depth 1`` of *url*, into *into*/0, *into*/1, ..."""

    def clone(i: int) -> Path:
        dst = into / str(i)
        git("clone", "-q", "--depth", "1", url, str(dst))
        return dst

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(clone, range(count)))


@pytest.fixture(scope="module")
def source(repo_root: Path) -> Path:
    return bench_repo(repo_root, files=600, commits=120)


@pytest.fixture(scope="module")
def storm_server(tmp_path_factory: pytest.TempPathFactory, source: Path) -> Iterator[Server]:
    """A server without pre-warm, so that clones build their own packs."""
    srv = start_server(tmp_path_factory.mktemp("storm"), "data", "--prewarm-refs", "none")
    try:
        populate(srv, source)
        yield srv
    finally:
        srv.stop()


def test_forty_identical_depth_one_clones_build_once(
    storm_server: Server, source: Path, tmp_path: Path
) -> None:
    """40 concurrent `git clone --depth 1`: one build, 39+ hits or followers, same pack, clean fsck."""
    srv = storm_server
    url = srv.url(REPO, srv.user_with_token("ci"))
    builds = metric(srv, "gitstratum_pack_cache_builds_total")
    clones = depth_one_clones(url, tmp_path / "c", 40)
    assert metric(srv, "gitstratum_pack_cache_builds_total") - builds == 1
    served = metric(srv, "gitstratum_pack_cache_hits_total") + metric(
        srv, "gitstratum_pack_cache_followers_total"
    )
    assert served >= 39
    assert metric(srv, "gitstratum_pack_cache_misses_total") == 1
    # A pack is named by its checksum: one name means the same bytes everywhere.
    names = {
        tuple(sorted(p.name for p in (c / ".git/objects/pack").glob("*.pack"))) for c in clones
    }
    assert len(names) == 1
    tip = git("rev-parse", "main", cwd=source).stdout
    for c in clones:
        git("fsck", "--strict", cwd=c)
        assert git("rev-parse", "HEAD", cwd=c).stdout == tip
    assert metric(srv, "gitstratum_pack_cache_served_bytes_total") > 0
    assert metric(srv, "gitstratum_pack_cache_cpu_seconds_saved_total") > 0


def test_no_read_access_is_never_served_from_the_cache(storm_server: Server, source: Path) -> None:
    """A cached pack is still 404 for a user without access and 401 anonymously; no hit counted."""
    srv = storm_server
    token = srv.user_with_token("ci")
    want = git("rev-parse", "main", cwd=source).stdout.decode().strip()
    path = f"/{REPO}.git/git-upload-pack"
    assert (
        srv.request("POST", path, fetch_body(want), {**FETCH_HEADERS, **srv.basic(token)})[0] == 200
    )
    hits = metric(srv, "gitstratum_pack_cache_hits_total")
    stranger = srv.user_with_token("stranger")
    assert (
        srv.request(
            "POST", path, fetch_body(want), {**FETCH_HEADERS, **srv.basic(stranger, "stranger")}
        )[0]
        == 404
    )
    assert srv.request("POST", path, fetch_body(want), FETCH_HEADERS)[0] == 401
    assert metric(srv, "gitstratum_pack_cache_hits_total") == hits


def test_entries_survive_a_restart(storm_server: Server, source: Path, tmp_path: Path) -> None:
    """After a restart the depth-1 clone is a hit: the entry and its index were kept on disk."""
    srv = storm_server
    url = srv.url(REPO, srv.user_with_token("ci"))
    git("clone", "-q", "--depth", "1", url, str(tmp_path / "before"))
    srv.stop()
    srv.start("--prewarm-refs", "none")
    git("clone", "-q", "--depth", "1", url, str(tmp_path / "after"))
    assert metric(srv, "gitstratum_pack_cache_hits_total") == 1
    assert metric(srv, "gitstratum_pack_cache_builds_total") == 0
    git("fsck", "--strict", cwd=tmp_path / "after")


def test_a_push_to_main_prewarms_the_next_depth_one_clone(
    tmp_path_factory: pytest.TempPathFactory, source: Path, tmp_path: Path
) -> None:
    """After a push to main the depth-1 pack is built in the background; the next clone is a hit."""
    srv = start_server(tmp_path_factory.mktemp("prewarm"), "data")
    try:
        url, _ = populate(srv, source)
        work = tmp_path / "work"
        git("clone", "-q", str(source), str(work))
        (work / "ci.txt").write_text("trigger a pipeline\n")
        git("add", "ci.txt", cwd=work)
        git("commit", "-qm", "a commit CI will build", cwd=work)
        built = metric(srv, "gitstratum_pack_cache_prewarms_total", outcome="build")
        git("push", "-q", url, "main", cwd=work)
        wait_until(
            lambda: (
                metric(srv, "gitstratum_pack_cache_prewarms_total", outcome="build") > built
                and metric(srv, "gitstratum_pack_builds_in_progress") == 0
            )
        )
        hits = metric(srv, "gitstratum_pack_cache_hits_total")
        misses = metric(srv, "gitstratum_pack_cache_misses_total")
        dst = tmp_path / "ci"
        git("clone", "-q", "--depth", "1", url, str(dst))
        assert metric(srv, "gitstratum_pack_cache_hits_total") == hits + 1
        assert metric(srv, "gitstratum_pack_cache_misses_total") == misses
        assert git("rev-parse", "HEAD", cwd=dst).stdout == git("rev-parse", "HEAD", cwd=work).stdout
        git("fsck", "--strict", cwd=dst)
    finally:
        srv.stop()


def test_over_the_limit_is_429_with_retry_after_while_others_are_served(
    tmp_path_factory: pytest.TempPathFactory, source: Path, tmp_path: Path
) -> None:
    """A user past its burst gets 429 + Retry-After; another user's clone goes through meanwhile."""
    srv = start_server(
        tmp_path_factory.mktemp("limits"),
        "data",
        "--rate-per-user=0.01",
        "--burst-per-user=2",
        "--prewarm-refs=none",
    )
    try:
        url, token = populate(srv, source)
        want = git("rev-parse", "main", cwd=source).stdout.decode().strip()
        path = f"/{REPO}.git/git-upload-pack"
        headers = {**FETCH_HEADERS, **srv.basic(token)}
        assert [srv.request("POST", path, fetch_body(want), headers)[0] for _ in range(2)] == [
            200,
            200,
        ]
        status, got, body = srv.request("POST", path, fetch_body(want), headers)
        assert status == 429
        assert int(got["retry-after"]) >= 1
        assert b"server busy: too many requests for this user" in body
        other = srv.user_with_token("other")
        srv.cli("grant", "other", REPO, "read")
        dst = tmp_path / "other"
        git("clone", "-q", "--depth", "1", srv.url(REPO, other, user="other"), str(dst))
        git("fsck", "--strict", cwd=dst)
        refused = git("clone", "-q", "--depth", "1", url, str(tmp_path / "refused"), check=False)
        assert refused.returncode != 0 and b"429" in refused.stderr
        assert metric(srv, "gitstratum_admission_rejected_total", reason="user_rate") == 2
    finally:
        srv.stop()


def test_eviction_keeps_the_cache_under_its_byte_bound(
    tmp_path_factory: pytest.TempPathFactory, source: Path, tmp_path: Path
) -> None:
    """With room for a few packs, clones of many depths evict the oldest; the bound always holds."""
    root = tmp_path_factory.mktemp("evict")
    srv = start_server(root, "probe", "--prewarm-refs=none")
    try:
        url, _ = populate(srv, source)
        git("clone", "-q", "--depth", "1", url, str(tmp_path / "probe"))
        smallest = cache_bytes(srv)
    finally:
        srv.stop()
    bound = 3 * smallest
    srv = start_server(root, "data", f"--pack-cache-bytes={bound}", "--prewarm-refs=none")
    try:
        url, _ = populate(srv, source)
        for depth in (1, 2, 3, 4, 5, 6, 8):
            dst = tmp_path / f"d{depth}"
            git("clone", "-q", "--depth", str(depth), url, str(dst))
            assert cache_bytes(srv) <= bound, depth
        git("fsck", "--strict", cwd=tmp_path / "d8")
        assert metric(srv, "gitstratum_pack_cache_evictions_total") > 0
        # The newest entry survived: cloning it again is a hit.
        hits = metric(srv, "gitstratum_pack_cache_hits_total")
        git("clone", "-q", "--depth", "8", url, str(tmp_path / "again"))
        assert metric(srv, "gitstratum_pack_cache_hits_total") == hits + 1
    finally:
        srv.stop()


def test_git_daemon_refusal_is_an_err_line_git_prints(
    tmp_path_factory: pytest.TempPathFactory, source: Path, tmp_path: Path
) -> None:
    """Over git:// a fetch past the per-IP burst fails with git's "remote error: server busy"."""
    srv = start_server(
        tmp_path_factory.mktemp("daemon"),
        "data",
        "--rate-per-ip=0.01",
        "--burst-per-ip=1",
        "--prewarm-refs=none",
    )
    try:
        token = srv.user_with_token("ci")
        srv.cli("repo", "create", REPO, "--public")
        srv.cli("grant", "ci", REPO, "write")
        git("push", "-q", srv.url(REPO, token), "main", cwd=source)
        git("clone", "-q", "--depth", "1", srv.git_url(REPO), str(tmp_path / "first"))
        refused = subprocess.run(
            ["git", "clone", "-q", "--depth", "1", srv.git_url(REPO), str(tmp_path / "second")],
            capture_output=True,
            timeout=60,
        )
        assert refused.returncode != 0
        assert b"remote error: server busy: too many requests from this address" in refused.stderr
    finally:
        srv.stop()


def test_two_workers_share_sockets_cache_and_metrics(tmp_path: Path, source: Path) -> None:
    """--workers 2: both processes serve one port, an entry is built once across them, /metrics sums both."""
    srv = start_server(tmp_path, "data", "--workers", "2", "--prewarm-refs", "none")
    try:
        url, token = populate(srv, source)
        builds = metric(srv, "gitstratum_pack_cache_builds_total")
        clones = depth_one_clones(url, tmp_path / "w", 24)
        assert metric(srv, "gitstratum_pack_cache_builds_total") - builds == 1
        served = metric(srv, "gitstratum_pack_cache_hits_total") + metric(
            srv, "gitstratum_pack_cache_followers_total"
        )
        assert served >= 23
        for c in clones[:3]:
            git("fsck", "--strict", cwd=c)
        # every worker process that recorded a metric left its own file in the shared dir
        pids = {p.stem.rsplit("_", 1)[-1] for p in (srv.data_dir / "metrics").glob("*.db")}
        assert len(pids) >= 2, pids
    finally:
        srv.stop()
    # stopping the supervisor ends its workers: the port is free again
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # only a listener blocks this
        s.bind(("127.0.0.1", srv.port))


def test_a_hit_is_sent_whole_with_its_length_and_the_same_bytes_as_the_build(
    storm_server: Server, source: Path
) -> None:
    """A hit goes out with Content-Length (sendfile on TCP), byte for byte what the build streamed."""
    srv = storm_server
    token = srv.user_with_token("ci")
    tip = git("rev-parse", "main", cwd=source).stdout.decode().strip()
    # depth 2: no other test asks for it, so the first request builds.
    body = fetch_body(tip, depth=2)
    headers = {**FETCH_HEADERS, **srv.basic(token)}
    served = metric(srv, "gitstratum_pack_cache_served_bytes_total")
    status, built_headers, built = srv.request(
        "POST", f"/{REPO}.git/git-upload-pack", body, headers
    )
    assert status == 200 and "content-length" not in built_headers
    status, hit_headers, hit = srv.request("POST", f"/{REPO}.git/git-upload-pack", body, headers)
    assert status == 200 and int(hit_headers["content-length"]) == len(hit)
    assert read_response(hit).lines == read_response(built).lines
    pack = bytes(read_response(hit).pack)
    assert pack.startswith(b"PACK") and pack == bytes(read_response(built).pack)
    # The last chunk is counted when its send completes, which can be just after
    # the client has read it: wait for the count rather than race it.
    wait_until(
        lambda: metric(srv, "gitstratum_pack_cache_served_bytes_total") - served >= len(pack),
        timeout=10,
    )
