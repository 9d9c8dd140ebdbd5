"""Ref-name validation: the same verdicts as ``git check-ref-format``."""

from __future__ import annotations

import subprocess

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from gitstratum.core.refs import (
    RefNameError,
    check_push_ref,
    check_ref_format,
    is_valid_push_ref,
)

# Pieces that exercise every rule, glued together at random.
_TOKENS = [
    b"a",
    b"B",
    b"refs",
    b"heads",
    b"/",
    b"/",
    b".",
    b"..",
    b".lock",
    b"lock",
    b"@",
    b"{",
    b"}",
    b"*",
    b"-",
    b"~",
    b"^",
    b":",
    b"?",
    b"[",
    b"]",
    b"\\",
    b" ",
    b"\t",
    b"\x01",
    b"\x1f",
    b"\x7f",
    b"\xc3\xa9",
    b"\xff",
    b"#",
    b"!",
]

# Plain pieces are drawn twice as often as the rest, so that many of the
# names are valid and both verdicts get compared.
_PLAIN = [b"a", b"B", b"refs", b"heads", b"/", b"-", b"x1"]
names = st.lists(
    st.one_of(st.sampled_from(_PLAIN), st.sampled_from(_PLAIN), st.sampled_from(_TOKENS)),
    max_size=8,
).map(b"".join)


def git_accepts(name: bytes, *, allow_onelevel: bool, refspec_pattern: bool) -> bool:
    args = [b"git", b"check-ref-format"]
    if allow_onelevel:
        args.append(b"--allow-onelevel")
    if refspec_pattern:
        args.append(b"--refspec-pattern")
    result = subprocess.run([*args, name], capture_output=True, check=False)
    assert result.returncode in (0, 1), result.stderr
    return result.returncode == 0


@settings(max_examples=200, deadline=None, derandomize=True)
@given(name=names, allow_onelevel=st.booleans(), refspec_pattern=st.booleans())
def test_agrees_with_git_check_ref_format(name, allow_onelevel, refspec_pattern):
    """On generated names, check_ref_format gives the real git binary's verdict."""
    assume(not name.startswith(b"-"))  # git would read it as an option
    ours = check_ref_format(name, allow_onelevel=allow_onelevel, refspec_pattern=refspec_pattern)
    theirs = git_accepts(name, allow_onelevel=allow_onelevel, refspec_pattern=refspec_pattern)
    assert ours == theirs


@pytest.mark.parametrize(
    "name",
    [
        b"refs/heads/main",
        b"heads/feature/x-1",
        b"refs/tags/v1.0",
        b"a/@",
        b"a/b@c",
        b"a/{",
        b"a/b}",
        b"-x/y",
        b"refs/heads/caf\xc3\xa9",
        b"refs/heads/\xff",
        b"a/b.lockx",
        b"a/x.lockx/b",
    ],
)
def test_valid_names(name):
    """Names git accepts, including UTF-8 and other bytes above 0x7f."""
    assert check_ref_format(name)


@pytest.mark.parametrize(
    "name",
    [
        b"",
        b"main",
        b"@",
        b"refs/heads/a..b",
        b"refs/heads/.hidden",
        b"refs/heads/x.lock",
        b"refs/heads/x.lock/y",
        b"refs/heads/x.",
        b"refs/heads/x/",
        b"/refs/heads/x",
        b"refs//heads",
        b"refs/heads/a@{1}",
        b"refs/heads/a b",
        b"refs/heads/a\tb",
        b"refs/heads/a~1",
        b"refs/heads/a^",
        b"refs/heads/a:b",
        b"refs/heads/a?",
        b"refs/heads/a[b",
        b"refs/heads/a\\b",
        b"refs/heads/a*",
        b"refs/heads/a\x00b",
        b"refs/heads/a\x7f",
        b"refs/heads/a\x1b",
    ],
)
def test_invalid_names(name):
    """Each of git's rules rejects a name on its own."""
    assert not check_ref_format(name)


def test_allow_onelevel():
    """A single component is only valid with allow_onelevel; "@" never is."""
    assert not check_ref_format(b"HEAD")
    assert check_ref_format(b"HEAD", allow_onelevel=True)
    assert not check_ref_format(b"@", allow_onelevel=True)
    assert not check_ref_format(b"", allow_onelevel=True)


def test_refspec_pattern_allows_one_star():
    """With refspec_pattern a single "*" is allowed anywhere, but never two."""
    assert check_ref_format(b"refs/heads/*", refspec_pattern=True)
    assert check_ref_format(b"refs/heads/feature-*", refspec_pattern=True)
    assert check_ref_format(b"refs/*/main", refspec_pattern=True)
    assert not check_ref_format(b"refs/*/*", refspec_pattern=True)
    assert not check_ref_format(b"refs/heads/a*b*", refspec_pattern=True)
    assert not check_ref_format(b"refs/heads/*")


@pytest.mark.parametrize(
    ("name", "ok"),
    [
        (b"refs/heads/main", True),
        (b"refs/tags/v1", True),
        (b"refs/x/y", True),
        (b"refs/x", False),
        (b"refs/heads", False),
        (b"refs/", False),
        (b"refs", False),
        (b"HEAD", False),
        (b"heads/main", False),
        (b"refs/heads/a..b", False),
        (b"refs/.git/x", False),
        (b"refs/heads/*", False),
    ],
)
def test_is_valid_push_ref(name, ok):
    """receive-pack takes only refs/<name> where <name> is itself a valid multi-level name."""
    assert is_valid_push_ref(name) is ok


def test_push_ref_needs_two_levels_below_refs():
    """receive-pack checks name[5:] with no flags, so "refs/x" is a funny ref but "refs/x/y" is not."""
    assert not is_valid_push_ref(b"refs/main")
    assert is_valid_push_ref(b"refs/main/x")


def test_check_push_ref_message():
    """A refused ref reads as receive-pack's "funny ref" message."""
    check_push_ref(b"refs/heads/ok")
    with pytest.raises(
        RefNameError, match="refusing to create funny ref 'refs/heads/a..b' remotely"
    ):
        check_push_ref(b"refs/heads/a..b")
