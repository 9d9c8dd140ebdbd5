"""The smart-HTTP path parser: repository names, endpoints and traversal refusals."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gitstratum.frontend.paths import BadPath, GitPath, parse_git_path, valid_repo_name


@pytest.mark.parametrize(
    "raw,expected",
    [
        (b"/acme/app.git/info/refs", GitPath("acme/app", b"info/refs")),
        (b"/acme/app/info/refs", GitPath("acme/app", b"info/refs")),
        (b"/acme/app.git/git-upload-pack", GitPath("acme/app", b"git-upload-pack")),
        (b"/acme/app.git/git-receive-pack", GitPath("acme/app", b"git-receive-pack")),
        (b"/acme/my.repo.git/HEAD", GitPath("acme/my.repo", b"dumb")),
        (b"/acme/app.git/objects/pack/pack-1.pack", GitPath("acme/app", b"dumb")),
    ],
)
def test_good_paths(raw: bytes, expected: GitPath) -> None:
    """OWNER/NAME with or without .git maps to the repository and its endpoint."""
    assert parse_git_path(raw) == expected


@pytest.mark.parametrize(
    "raw",
    [
        b"/acme/../app.git/info/refs",
        b"/acme/%2e%2e/app.git/info/refs",
        b"/acme/%2E%2E/x/info/refs",
        b"//etc/passwd/info/refs",
        b"/acme/app%00.git/info/refs",
        b"/acme%2fapp.git/info/refs",
        b"/acme/./app.git/info/refs",
        b"/acme//app.git/info/refs",
        b"/acme/app\\x/info/refs",
    ],
)
def test_traversal_is_refused(raw: bytes) -> None:
    """Dot segments (plain or encoded), encoded slashes, NULs and empty segments raise BadPath."""
    with pytest.raises(BadPath):
        parse_git_path(raw)


@pytest.mark.parametrize(
    "raw",
    [
        b"/",
        b"/acme",
        b"/acme/app.git",
        b"/acme/app.git/info/other",
        b"/a/b/c/info/refs",
        b"/acme/.git/info/refs",
        b"/-x/app/info/refs",
    ],
)
def test_non_git_paths_are_none(raw: bytes) -> None:
    """Paths that are safe but name no Git endpoint give None (a 404)."""
    assert parse_git_path(raw) is None


@given(st.binary(max_size=60))
def test_never_crashes_and_never_yields_dots(raw: bytes) -> None:
    """Whatever the path, the parser raises BadPath or returns a safe repository name."""
    try:
        result = parse_git_path(b"/" + raw)
    except BadPath:
        return
    if result is not None:
        assert valid_repo_name(result.repo)
        assert ".." not in result.repo.split("/")


@given(
    st.text(alphabet="ab.-_/~\\x0 ", min_size=1, max_size=12),
)
def test_every_entry_point_agrees_on_repository_names(name: str) -> None:
    """A name the admin API accepts is exactly one HTTP and SSH can serve, and vice versa."""
    from gitstratum.frontend.admin_api import check_repo_name
    from gitstratum.frontend.ssh import CommandError, repo_from_path

    try:
        check_repo_name(name)
        api = True
    except ValueError:
        api = False
    try:
        http = parse_git_path(f"/{name}.git/info/refs".encode()) == GitPath(name, b"info/refs")
    except BadPath:
        http = False
    try:
        ssh = repo_from_path(f"/{name}.git") == name
    except CommandError:
        ssh = False
    assert api == http == ssh, (name, api, http, ssh)
