"""End to end: the real git client pushes to and clones from a real standalone server."""

from __future__ import annotations

from pathlib import Path

import pytest

from .conftest import Server, bench_repo, git, refs_of, remote_refs

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def pushed(server: Server, ci_token: str, repo_root: Path) -> tuple[str, Path]:
    """bench_repo's generated repository pushed with every branch and tag to acme/app."""
    src = bench_repo(repo_root, files=600, commits=120)
    server.cli("repo", "create", "acme/app")
    server.cli("grant", "ci", "acme/app", "write")
    url = server.url("acme/app", ci_token)
    git("push", url, "--all", cwd=src)
    git("push", url, "--tags", cwd=src)
    return url, src


def test_push_all_then_refs_match(pushed: tuple[str, Path]) -> None:
    """Every branch and tag pushed is advertised back with the same object id."""
    url, src = pushed
    assert remote_refs(url) == refs_of(src)


def test_head_is_advertised_as_symref(pushed: tuple[str, Path]) -> None:
    """ls-remote --symref shows HEAD as a symref to refs/heads/main, in v2 and v0."""
    url, _ = pushed
    for version in ("2", "0"):
        out = git("-c", f"protocol.version={version}", "ls-remote", "--symref", url, "HEAD").stdout
        assert out.splitlines()[0] == b"ref: refs/heads/main\tHEAD", version


@pytest.mark.parametrize("version", ["2", "0"])
def test_full_clone_matches_and_passes_fsck(
    pushed: tuple[str, Path], tmp_path: Path, version: str
) -> None:
    """A full mirror clone over protocol v2 and v0 has every ref and passes git fsck --strict."""
    url, src = pushed
    dst = tmp_path / "mirror.git"
    git("-c", f"protocol.version={version}", "clone", "--mirror", url, str(dst))
    assert refs_of(dst) == refs_of(src)
    git("fsck", "--strict", "--no-dangling", cwd=dst)
    assert git("rev-parse", "HEAD", cwd=dst).stdout == git("rev-parse", "main", cwd=src).stdout


@pytest.mark.parametrize("depth", [1, 20])
def test_shallow_clone(pushed: tuple[str, Path], tmp_path: Path, depth: int) -> None:
    """--depth N gives exactly N commits of history and a clean fsck."""
    url, src = pushed
    dst = tmp_path / "shallow"
    git("clone", "--depth", str(depth), url, str(dst))
    count = int(git("rev-list", "--count", "HEAD", cwd=dst).stdout)
    assert count == depth
    assert (dst / ".git" / "shallow").exists()
    git("fsck", "--strict", cwd=dst)
    assert git("rev-parse", "HEAD", cwd=dst).stdout == git("rev-parse", "main", cwd=src).stdout


def test_shallow_since_and_deepen(pushed: tuple[str, Path], tmp_path: Path) -> None:
    """--shallow-since keeps commits since a date; fetch --deepen adds history below the cut."""
    url, src = pushed
    times = git("log", "--format=%ct", "main", cwd=src).stdout.split()
    cutoff = int(times[9])  # the tenth-newest commit on main
    dst = tmp_path / "since"
    git("clone", f"--shallow-since={cutoff}", "--single-branch", url, str(dst))
    expected = int(git("rev-list", "--count", f"--since={cutoff}", "main", cwd=src).stdout)
    got = int(git("rev-list", "--count", "HEAD", cwd=dst).stdout)
    assert got == expected
    git("fetch", "--deepen=5", cwd=dst)
    assert int(git("rev-list", "--count", "HEAD", cwd=dst).stdout) > got
    git("fsck", "--strict", cwd=dst)


def test_partial_clone_blob_none(pushed: tuple[str, Path], tmp_path: Path) -> None:
    """--filter=blob:none brings commits and trees only, then fetches blobs on checkout."""
    url, src = pushed
    dst = tmp_path / "partial"
    git("clone", "--filter=blob:none", "--no-checkout", url, str(dst))
    missing = git("rev-list", "--objects", "--missing=print", "HEAD", cwd=dst).stdout
    assert b"\n?" in b"\n" + missing  # blobs were left out
    git("checkout", "main", cwd=dst)  # lazily fetches the tip's blobs
    git("fsck", "--connectivity-only", cwd=dst)
    assert (
        git("rev-parse", "HEAD^{tree}", cwd=dst).stdout
        == git("rev-parse", "main^{tree}", cwd=src).stdout
    )


def test_incremental_fetch_sha_fetch_and_branch_deletion(
    server: Server, ci_token: str, repo_root: Path, tmp_path: Path
) -> None:
    """A new push reaches an existing clone, a commit can be fetched by SHA, a branch can be deleted."""
    src = bench_repo(repo_root, files=80, commits=20, seed=7, branches=2, tags=2)
    server.cli("repo", "create", "acme/incr")
    server.cli("grant", "ci", "acme/incr", "write")
    url = server.url("acme/incr", ci_token)
    work = tmp_path / "work"
    git("clone", str(src), str(work))
    git("push", url, "main", "--tags", cwd=work)
    clone = tmp_path / "clone"
    git("clone", url, str(clone))
    (work / "new.txt").write_text("a new file\n")
    git("add", "new.txt", cwd=work)
    git("commit", "-qm", "new commit", cwd=work)
    git("push", url, "main", cwd=work)
    git("fetch", cwd=clone)
    new_tip = git("rev-parse", "main", cwd=work).stdout.strip()
    assert git("rev-parse", "origin/main", cwd=clone).stdout.strip() == new_tip
    git("fsck", "--strict", cwd=clone)
    # fetch a reachable, non-tip commit by SHA, as CI checkouts do
    older = git("rev-parse", "main~3", cwd=work).stdout.strip().decode()
    bysha = tmp_path / "bysha"
    git("init", "-q", str(bysha))
    git("fetch", "--depth=1", url, older, cwd=bysha)
    assert git("rev-parse", "FETCH_HEAD", cwd=bysha).stdout.strip().decode() == older
    # push a branch, then delete it
    git("push", url, "main:refs/heads/topic", cwd=work)
    assert "refs/heads/topic" in remote_refs(url)
    git("push", url, ":refs/heads/topic", cwd=work)
    assert "refs/heads/topic" not in remote_refs(url)


def test_restart_keeps_everything(tmp_path: Path, repo_root: Path) -> None:
    """After a restart the same repositories, refs, users and tokens still work."""
    from .conftest import free_port

    srv = Server(tmp_path / "data", free_port())
    srv.data_dir.mkdir()
    srv.start()
    try:
        token = srv.user_with_token("ci")
        srv.cli("repo", "create", "acme/keep")
        srv.cli("grant", "ci", "acme/keep", "write")
        src = bench_repo(repo_root, files=80, commits=20, seed=7, branches=2, tags=2)
        git("push", srv.url("acme/keep", token), "--all", cwd=src)
        git("push", srv.url("acme/keep", token), "--tags", cwd=src)
        admin_token = srv.admin_token
        srv.stop()
        srv.start()
        assert srv.admin_token == admin_token
        assert remote_refs(srv.url("acme/keep", token)) == refs_of(src)
        dst = tmp_path / "after"
        git("clone", srv.url("acme/keep", token), str(dst))
        git("fsck", "--strict", cwd=dst)
    finally:
        srv.stop()


def test_public_repository_reads_anonymously(
    server: Server, ci_token: str, repo_root: Path, tmp_path: Path
) -> None:
    """A public repository clones without credentials; pushing anonymously asks for them."""
    server.cli("repo", "create", "acme/open", "--public")
    server.cli("grant", "ci", "acme/open", "write")
    src = bench_repo(repo_root, files=80, commits=20, seed=7, branches=2, tags=2)
    git("push", server.url("acme/open", ci_token), "main", cwd=src)
    git("clone", server.url("acme/open"), str(tmp_path / "anon"))
    denied = git("push", server.url("acme/open"), "main:refs/heads/x", cwd=src, check=False)
    assert denied.returncode != 0
    assert "refs/heads/x" not in remote_refs(server.url("acme/open"))


def test_admin_token_file_is_private(server: Server) -> None:
    """The bootstrap token file is readable by its owner only."""
    assert (server.data_dir / "admin-token").stat().st_mode & 0o777 == 0o600
    assert "admin-token" in server.log_text()


def test_metrics_and_healthz(server: Server, pushed: tuple[str, Path]) -> None:
    """/metrics shows per-service request counts and the pack-cache counters; /healthz is ok."""
    status, headers, body = server.request("GET", "/metrics")
    assert status == 200
    text = body.decode()
    assert "gitstratum_pack_cache_hits_total" in text
    assert "gitstratum_pack_cache_misses_total" in text
    assert 'service="upload-pack"' in text and 'service="receive-pack"' in text
    assert server.request("GET", "/healthz")[0] == 200
