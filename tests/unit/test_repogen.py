"""The repository generator: deterministic ids, the asked-for shape, deltas, binaries, a clean fsck."""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.python import usage

from gitstratum.testing.fixtures import git
from gitstratum.testing.repogen import Options, main, make_repo

SMALL = {"files": 60, "commits": 15}


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_repo(tmp_path_factory.mktemp("gen") / "r.git", **SMALL, branches=6, tags=4)


def refs(path: Path) -> dict[str, str]:
    out = git("for-each-ref", "--format=%(objectname) %(objecttype) %(refname)", cwd=str(path))
    return {
        name: f"{sha} {kind}"
        for sha, kind, name in (line.split() for line in out.decode().splitlines())
    }


def test_same_seed_same_ids_other_seed_differs(tmp_path: Path, repo: Path) -> None:
    """Pinned names and dates: the same seed gives the same refs and ids; another seed does not."""
    again = make_repo(tmp_path / "again.git", **SMALL, branches=6, tags=4)
    other = make_repo(tmp_path / "other.git", **SMALL, branches=6, tags=4, seed=2)
    assert refs(again) == refs(repo)
    head = git("rev-parse", "HEAD", cwd=str(repo))
    assert git("rev-parse", "HEAD", cwd=str(other)) != head


def test_shape_branches_tags_and_head(repo: Path) -> None:
    """main plus one ref per feature branch, every tag (half annotated), HEAD on main."""
    found = refs(repo)
    heads = [name for name in found if name.startswith("refs/heads/")]
    tags = {name: kind for name, kind in found.items() if name.startswith("refs/tags/")}
    assert "refs/heads/main" in heads and len(heads) == 1 + 6
    assert len(tags) == 4
    assert sum(kind.endswith(" tag") for kind in tags.values()) == 2
    assert git("symbolic-ref", "HEAD", cwd=str(repo)).strip() == b"refs/heads/main"
    log = git("rev-list", "--count", "--first-parent", "main", cwd=str(repo))
    assert int(log) == SMALL["commits"]
    assert git("rev-list", "--merges", "main", cwd=str(repo)).strip(), "no branch was merged back"


def test_no_merges_gives_a_linear_main(tmp_path: Path) -> None:
    """merges=False keeps every branch but merges none back: main is linear."""
    path = make_repo(tmp_path / "linear.git", **SMALL, branches=6, tags=4, merges=False)
    assert len([r for r in refs(path) if r.startswith("refs/heads/")]) == 7
    assert git("rev-list", "--merges", "main", cwd=str(path)).strip() == b""
    assert int(git("rev-list", "--count", "main", cwd=str(path))) == SMALL["commits"]


def test_one_pack_with_delta_chains(repo: Path) -> None:
    """The final repack leaves one pack whose objects include delta chains."""
    packs = list((repo / "objects" / "pack").glob("*.idx"))
    assert len(packs) == 1
    out = git("verify-pack", "-v", str(packs[0]), cwd=str(repo)).decode()
    chains = [line for line in out.splitlines() if line.startswith("chain length = ")]
    assert chains, "no deltas in the pack"


def test_binaries_executables_and_a_symlink(repo: Path) -> None:
    """The tree holds binary blobs (NUL bytes), executables and a symlink besides text."""
    listing = git("ls-tree", "-r", "main", cwd=str(repo)).decode().splitlines()
    modes = {line.split()[0] for line in listing}
    assert {"100644", "100755", "120000"} <= modes
    binaries = [line.split()[2] for line in listing if line.endswith(".bin")]
    assert binaries
    assert b"\0" in git("cat-file", "blob", binaries[0], cwd=str(repo))


def test_fsck_clean(repo: Path) -> None:
    """git fsck --strict finds nothing wrong (it exits non-zero on any error)."""
    git("fsck", "--strict", "--no-dangling", cwd=str(repo))


def test_big_blobs(tmp_path: Path) -> None:
    """big_blobs_mb adds a last commit of random blobs, split at big_blob_mb, sizes exact."""
    path = make_repo(
        tmp_path / "big.git", files=5, commits=2, branches=0, tags=0, big_blobs_mb=3, big_blob_mb=2
    )
    listing = git("ls-tree", "-r", "-l", "main", "assets", cwd=str(path)).decode().splitlines()
    assert sorted(int(line.split()[3]) for line in listing) == [1 << 20, 2 << 20]
    assert int(git("rev-list", "--count", "main", cwd=str(path))) == 3


@pytest.mark.parametrize("kwargs", [{"files": 0}, {"commits": 0}, {"tags": -1}, {"big_blob_mb": 0}])
def test_impossible_shapes_refused(tmp_path: Path, kwargs: dict) -> None:
    """Shapes that cannot be made are refused before anything is written."""
    with pytest.raises(ValueError):
        make_repo(tmp_path / "x.git", **kwargs)
    assert not (tmp_path / "x.git").exists()


def test_existing_output_refused(repo: Path) -> None:
    """An existing directory is never imported into."""
    with pytest.raises(FileExistsError):
        make_repo(repo)


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The command line makes the same repository as the function, and names it."""
    out = tmp_path / "cli.git"
    args = [str(out), "--files", "60", "--commits", "15", "--branches", "6", "--tags", "4"]
    assert main(args) == 0
    assert capsys.readouterr().out.strip() == str(out)
    same = make_repo(tmp_path / "fn.git", **SMALL, branches=6, tags=4)
    assert refs(out) == refs(same)
    assert main([str(out)]) == 1  # exists


@pytest.mark.parametrize(
    "args", [[], ["--files", "0", "x"], ["--branches", "-1", "x"], ["--big-blob-mb", "0", "x"]]
)
def test_cli_usage_errors(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """Missing output or bad numbers: exit 2 with the usage text and the error."""
    assert main(args) == 2
    assert "error:" in capsys.readouterr().err
    with pytest.raises(usage.UsageError):
        Options().parseOptions(args)
