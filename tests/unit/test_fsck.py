"""fsck checks on raw objects: each git message id, good objects, and agreement with git fsck."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from dulwich.objects import Blob, Commit, Tag, Tree
from hypothesis import given, settings
from hypothesis import strategies as st

from gitstratum.core.fsck import FsckError, check_gitmodules, check_object, gitmodules_blobs
from gitstratum.core.objects import ObjectType
from gitstratum.core.oid import ObjectID, to_bin

COMMIT, TREE, TAG, BLOB = ObjectType.COMMIT, ObjectType.TREE, ObjectType.TAG, ObjectType.BLOB

EMPTY_BLOB = ObjectID(b"e69de29bb2d1d6434b8b29ae775ad8c2e48c5391")
EMPTY_TREE = ObjectID(b"4b825dc642cb6eb9a060e54bf8d69288fbee4904")
SOME_COMMIT = ObjectID(b"1" * 40)

# Severities that make `git fsck --strict` judge as we do (see the fsck
# module docstring for why ours differ from git's defaults).
GIT_SEVERITIES = [
    "-c",
    "fsck.zeroPaddedFilemode=ignore",
    "-c",
    "fsck.badFilemode=error",
    "-c",
    "fsck.badTagName=ignore",
    "-c",
    "fsck.missingTaggerEntry=ignore",
    "-c",
    "fsck.extraHeaderEntry=ignore",
]
# `git fsck` parses an object before checking it, and reports one its parser
# refuses only as unparseable; these are the ids that can hide behind that.
UNPARSEABLE = "unparseable"
HIDDEN_BY_PARSER = {"missingTree", "badTreeSha1", "badParentSha1", "unterminatedHeader"}


def object_id(type: ObjectType, raw: bytes) -> ObjectID:
    header = b"%s %d\0" % (type.type_name, len(raw))
    return ObjectID(hashlib.sha1(header + raw).hexdigest().encode())


def fsck_id(type: ObjectType, raw: bytes) -> str | None:
    """The msg id check_object raises for *raw*, or None when it passes."""
    try:
        check_object(object_id(type, raw), type, raw)
    except FsckError as e:
        return e.msg_id
    return None


def gitmodules_id(raw: bytes) -> str | None:
    try:
        check_gitmodules(object_id(BLOB, raw), raw)
    except FsckError as e:
        return e.msg_id
    return None


def entry(mode: bytes, name: bytes, oid: bytes = EMPTY_BLOB) -> bytes:
    return mode + b" " + name + b"\0" + to_bin(ObjectID(oid))


def tree(*entries: bytes) -> bytes:
    return b"".join(entries)


IDENT = b"A U Thor <author@example.com> 1700000000 +0100"
REAL_COMMIT_RAW = b"tree %s\nauthor %s\ncommitter %s\n\nroot\n" % (EMPTY_TREE, IDENT, IDENT)
REAL_COMMIT = object_id(COMMIT, REAL_COMMIT_RAW)


def commit(
    *,
    tree_line: bytes = b"tree " + EMPTY_TREE,
    parents: tuple[bytes, ...] = (),
    author: bytes | None = IDENT,
    committer: bytes | None = IDENT,
    extra: bytes = b"",
    body: bytes = b"\nmessage\n",
) -> bytes:
    out = tree_line + b"\n"
    for parent in parents:
        out += b"parent " + parent + b"\n"
    if author is not None:
        out += b"author " + author + b"\n"
    if committer is not None:
        out += b"committer " + committer + b"\n"
    return out + extra + body


def tag(
    *,
    object_line: bytes = b"object " + EMPTY_BLOB,
    type_line: bytes = b"type blob",
    tag_line: bytes = b"tag v1.0",
    tagger: bytes | None = IDENT,
    body: bytes = b"\nrelease\n",
) -> bytes:
    out = object_line + b"\n" + type_line + b"\n" + tag_line + b"\n"
    if tagger is not None:
        out += b"tagger " + tagger + b"\n"
    return out + body


# -- a scratch repository for asking the real git ---------------------------


class GitFsck:
    """Writes one object at a time into a scratch repository and runs `git fsck` on it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.git("init", "-q", str(path), cwd=path.parent)
        self.base = {
            self.write(BLOB, b""),
            self.write(TREE, b""),
            self.write(COMMIT, REAL_COMMIT_RAW),
        }

    def git(self, *args: str, stdin: bytes = b"", cwd: Path | None = None) -> bytes:
        result = subprocess.run(
            ["git", *args], input=stdin, capture_output=True, cwd=cwd or self.path, check=True
        )
        return result.stdout

    def forget(self, oid: str) -> None:
        if oid not in self.base:
            os.unlink(self.path / ".git" / "objects" / oid[:2] / oid[2:])

    def write(self, type: ObjectType, raw: bytes) -> str:
        args = ["hash-object", "-t", type.type_name.decode(), "--literally", "-w", "--stdin"]
        return self.git(*args, stdin=raw).decode().strip()

    def errors(self, *objects: tuple[ObjectType, bytes]) -> list[str]:
        """The msg ids `git fsck --strict` reports as errors with *objects* in the repository."""
        written = [self.write(type, raw) for type, raw in objects]
        try:
            result = subprocess.run(
                ["git", *GIT_SEVERITIES, "fsck", "--strict", "--no-dangling"],
                capture_output=True,
                cwd=self.path,
                check=False,
            )
        finally:
            for oid in set(written):
                self.forget(oid)
        output = result.stdout + result.stderr
        found = re.findall(rb"^error in \w+ [0-9a-f]{40}: (\w+):", output, re.M)
        # Whether a .gitmodules entry is a blob is checked by the caller, not here.
        ids = [i.decode() for i in found if i not in (b"gitmodulesBlob", b"gitmodulesMissing")]
        if b"could not be parsed" in output:
            ids.insert(0, UNPARSEABLE)
        return ids

    def mktag(self, raw: bytes) -> str | None:
        """The msg id `git mktag` (git's strict tag check) refuses *raw* with, or None."""
        result = subprocess.run(
            ["git", *GIT_SEVERITIES, "mktag"], input=raw, capture_output=True, cwd=self.path
        )
        if result.returncode == 0:
            self.forget(result.stdout.decode().strip())
            return None
        found = re.search(rb"does not pass fsck: (\w+):", result.stderr)
        assert found, result.stderr
        return found[1].decode()


@pytest.fixture(scope="module")
def git_fsck(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GitFsck]:
    yield GitFsck(tmp_path_factory.mktemp("fsck") / "repo")


# -- FsckError --------------------------------------------------------------


def test_fsck_error_reads_like_git():
    """str() is git's "object <oid>: <msgId>: <message>" and the parts stay reachable."""
    oid = object_id(COMMIT, b"")
    with pytest.raises(FsckError) as caught:
        check_object(oid, COMMIT, b"")
    error = caught.value
    assert str(error) == f"object {oid.decode()}: unterminatedHeader: unterminated header"
    assert (error.oid, error.msg_id, error.message) == (
        oid,
        "unterminatedHeader",
        "unterminated header",
    )
    assert isinstance(error, ValueError)


def test_blobs_always_pass():
    """A blob's bytes are never judged by check_object (only .gitmodules blobs, separately)."""
    check_object(object_id(BLOB, b"\0\xff["), BLOB, b"\0\xff[")


# -- commits ----------------------------------------------------------------

BAD_DATE_PREFIX = b"A <a@example.com> "

COMMIT_CASES = [
    ("good", commit(), None),
    ("good-parents", commit(parents=(SOME_COMMIT, b"2" * 40)), None),
    ("good-no-message", commit(body=b""), None),
    ("good-extra-headers", commit(extra=b"encoding ISO-8859-1\ngpgsig -----BEGIN\n sig\n"), None),
    ("good-date-zero", commit(author=b"A <a@b> 0 +0000"), None),
    ("good-empty-name", commit(author=b" <a@b> 1 +0000"), None),
    ("good-spaces-before-date", commit(author=b"A <a@b>  \t 5 -1200"), None),
    ("good-largest-date", commit(author=b"A <a@b> %d +0000" % (2**63 - 1)), None),
    ("missingTree", commit(tree_line=b"parent " + SOME_COMMIT), "missingTree"),
    ("missingTree-blank", b"\ntree " + EMPTY_TREE + b"\n", "missingTree"),
    ("badTreeSha1-short", commit(tree_line=b"tree " + EMPTY_TREE[:39]), "badTreeSha1"),
    ("badTreeSha1-trailing", commit(tree_line=b"tree " + EMPTY_TREE + b" "), "badTreeSha1"),
    ("badTreeSha1-hex", commit(tree_line=b"tree " + b"g" * 40), "badTreeSha1"),
    ("badParentSha1", commit(parents=(SOME_COMMIT, b"xyz")), "badParentSha1"),
    ("missingAuthor", commit(author=None), "missingAuthor"),
    (
        "missingAuthor-no-space",
        b"tree %s\nauthor\ncommitter %s\n" % (EMPTY_TREE, IDENT),
        "missingAuthor",
    ),
    (
        "missingAuthor-after-committer",
        b"tree %s\ncommitter %s\nauthor %s\n" % (EMPTY_TREE, IDENT, IDENT),
        "missingAuthor",
    ),
    ("multipleAuthors", commit(author=IDENT + b"\nauthor " + IDENT), "multipleAuthors"),
    ("missingCommitter", commit(committer=None), "missingCommitter"),
    (
        "missingCommitter-after-blank",
        commit(committer=None, body=b"\ncommitter " + IDENT + b"\n"),
        "missingCommitter",
    ),
    ("nulInHeader", commit(extra=b"x\0y\n"), "nulInHeader"),
    ("unterminatedHeader", b"tree " + EMPTY_TREE, "unterminatedHeader"),
    ("nulInCommit", commit(body=b"\nmess\0age\n"), "nulInCommit"),
    ("missingNameBeforeEmail", commit(author=b"<a@b> 1 +0000"), "missingNameBeforeEmail"),
    ("missingEmail", commit(author=b"A U Thor"), "missingEmail"),
    ("missingEmail-empty", commit(author=b""), "missingEmail"),
    ("badName", commit(author=b"A > <a@b> 1 +0000"), "badName"),
    ("missingSpaceBeforeEmail", commit(author=b"A<a@b> 1 +0000"), "missingSpaceBeforeEmail"),
    ("badEmail-unclosed", commit(author=b"A <a@b 1 +0000"), "badEmail"),
    ("badEmail-nested", commit(author=b"A <a<b> 1 +0000"), "badEmail"),
    ("missingSpaceBeforeDate", commit(author=b"A <a@b>1 +0000"), "missingSpaceBeforeDate"),
    ("badDate-none", commit(author=b"A <a@b> +0000"), "badDate"),
    ("badDate-letters", commit(author=b"A <a@b> 12x +0000"), "badDate"),
    ("badDate-no-zone", commit(author=b"A <a@b> 12"), "badDate"),
    ("zeroPaddedDate", commit(author=b"A <a@b> 0123 +0000"), "zeroPaddedDate"),
    ("badDateOverflow", commit(author=b"A <a@b> %d +0000" % 2**63), "badDateOverflow"),
    ("badDateOverflow-long", commit(author=b"A <a@b> " + b"9" * 30 + b" +0000"), "badDateOverflow"),
    (
        "badDateOverflow-huge",
        commit(author=b"A <a@b> " + b"9" * 5000 + b" +0000"),
        "badDateOverflow",
    ),
    ("badTimezone-short", commit(author=b"A <a@b> 1 +010"), "badTimezone"),
    ("badTimezone-long", commit(author=b"A <a@b> 1 +01000"), "badTimezone"),
    ("badTimezone-sign", commit(author=b"A <a@b> 1 0100"), "badTimezone"),
    ("badTimezone-letters", commit(author=b"A <a@b> 1 +01a0"), "badTimezone"),
    ("committer-badEmail", commit(committer=b"C <c@d 1 +0000"), "badEmail"),
]


@pytest.mark.parametrize(
    ("raw", "expected"), [c[1:] for c in COMMIT_CASES], ids=[c[0] for c in COMMIT_CASES]
)
def test_commit_checks(raw, expected):
    """Each malformed commit is refused with git's msg id; well-formed ones pass."""
    assert fsck_id(COMMIT, raw) == expected


@pytest.mark.parametrize(
    ("raw", "expected"), [c[1:] for c in COMMIT_CASES], ids=[c[0] for c in COMMIT_CASES]
)
def test_commit_checks_agree_with_git(git_fsck, raw, expected):
    """git fsck --strict reports the same first error for the same commit (or none)."""
    errors = git_fsck.errors((COMMIT, raw))
    if errors[:1] == [UNPARSEABLE]:
        assert expected in HIDDEN_BY_PARSER
    else:
        assert (errors[0] if errors else None) == expected


def test_commit_with_uppercase_ids_is_refused():
    """We take only lowercase ids (git reads uppercase too; every id we store is lowercase)."""
    assert fsck_id(COMMIT, commit(tree_line=b"tree " + EMPTY_TREE.upper())) == "badTreeSha1"
    assert fsck_id(COMMIT, commit(parents=(b"A" * 40,))) == "badParentSha1"


# -- tags -------------------------------------------------------------------

TAG_CASES = [
    ("good", tag(), None),
    ("good-commit", tag(object_line=b"object " + REAL_COMMIT, type_line=b"type commit"), None),
    ("good-no-message", tag(body=b""), None),
    ("badTagName-accepted", tag(tag_line=b"tag bad..name"), None),
    ("missingTaggerEntry-accepted", tag(tagger=None), None),
    ("extra-headers-accepted", tag(body=b"gpgsig x\n y\nother\n\nmsg\n"), None),
    ("missingObject", tag(object_line=b"obj " + EMPTY_BLOB), "missingObject"),
    ("badObjectSha1", tag(object_line=b"object " + EMPTY_BLOB[:-1] + b"Z"), "badObjectSha1"),
    ("missingTypeEntry", tag(type_line=b"kind blob"), "missingTypeEntry"),
    ("badType", tag(type_line=b"type blobby"), "badType"),
    ("badType-empty", tag(type_line=b"type "), "badType"),
    ("missingTagEntry", tag(tag_line=b"name v1"), "missingTagEntry"),
    ("tagger-badDate", tag(tagger=b"T <t@x> soon +0000"), "badDate"),
    ("tagger-missingEmail", tag(tagger=b"T"), "missingEmail"),
    ("nulInHeader", tag(tag_line=b"tag v\0"), "nulInHeader"),
    ("unterminatedHeader", b"object " + EMPTY_BLOB + b"\ntype blob", "unterminatedHeader"),
]


@pytest.mark.parametrize(
    ("raw", "expected"), [c[1:] for c in TAG_CASES], ids=[c[0] for c in TAG_CASES]
)
def test_tag_checks(raw, expected):
    """Each malformed tag is refused with git's msg id; info-level findings are accepted."""
    assert fsck_id(TAG, raw) == expected


@pytest.mark.parametrize(
    ("raw", "expected"), [c[1:] for c in TAG_CASES], ids=[c[0] for c in TAG_CASES]
)
def test_tag_checks_agree_with_git(git_fsck, raw, expected):
    """git mktag, which runs git's strict tag check, refuses the same tags with the same id."""
    assert git_fsck.mktag(raw) == expected


_IDENT_PIECES = [b"A", b" ", b" ", b"<", b">", b"a@b", b"0", b"1", b"17", b"9" * 20, b"+", b"-"]
_IDENT_PIECES += [b"\t", b"0100", b"x", b"<a@b>", b" 1 +0000", b" 0 -1234"]


@settings(max_examples=150, deadline=None, derandomize=True)
@given(ident=st.lists(st.sampled_from(_IDENT_PIECES), max_size=10).map(b"".join))
def test_random_idents_agree_with_git(git_fsck, ident):
    """On generated tagger lines, git mktag's strict check and ours give the same verdict."""
    raw = tag(tagger=ident)
    assert fsck_id(TAG, raw) == git_fsck.mktag(raw)


# -- trees ------------------------------------------------------------------

B, X, L, D, G = b"100644", b"100755", b"120000", b"40000", b"160000"

TREE_CASES = [
    (
        "good",
        tree(entry(B, b"a"), entry(X, b"b"), entry(L, b"c"), entry(D, b"d", EMPTY_TREE)),
        None,
    ),
    ("good-empty", b"", None),
    ("good-gitlink", tree(entry(G, b"sub", SOME_COMMIT)), None),
    ("good-order", tree(entry(B, b"a.c"), entry(D, b"a", EMPTY_TREE), entry(B, b"a0")), None),
    ("good-not-dotgit", tree(entry(B, b".git-x"), entry(B, b".gitx"), entry(B, b"git~2")), None),
    ("good-dotgitmodules", tree(entry(B, b".gitmodules")), None),
    ("zeroPaddedFilemode-accepted", tree(entry(b"040000", b"d", EMPTY_TREE)), None),
    ("nullSha1", tree(entry(B, b"a", b"0" * 40)), "nullSha1"),
    ("fullPathname", tree(entry(B, b"a/b")), "fullPathname"),
    ("hasDot", tree(entry(D, b".", EMPTY_TREE)), "hasDot"),
    ("hasDotdot", tree(entry(D, b"..", EMPTY_TREE)), "hasDotdot"),
    ("hasDotgit", tree(entry(D, b".git", EMPTY_TREE)), "hasDotgit"),
    ("hasDotgit-case", tree(entry(B, b".GiT")), "hasDotgit"),
    ("hasDotgit-ntfs-dots", tree(entry(B, b".git. . .")), "hasDotgit"),
    ("hasDotgit-ntfs-short", tree(entry(D, b"GIT~1", EMPTY_TREE)), "hasDotgit"),
    ("hasDotgit-ntfs-stream", tree(entry(D, b".git::$INDEX_ALLOCATION", EMPTY_TREE)), "hasDotgit"),
    ("hasDotgit-backslash", tree(entry(B, b"x\\.git\\config")), "hasDotgit"),
    ("hasDotgit-hfs-zwnj", tree(entry(B, ".g\u200cit".encode())), "hasDotgit"),
    ("hasDotgit-hfs-bom", tree(entry(B, "\ufeff.GIT\u200f".encode())), "hasDotgit"),
    ("badFilemode", tree(entry(b"100600", b"a")), "badFilemode"),
    ("badFilemode-dir", tree(entry(b"40755", b"d", EMPTY_TREE)), "badFilemode"),
    ("duplicateEntries", tree(entry(B, b"a"), entry(B, b"a")), "duplicateEntries"),
    (
        "duplicateEntries-file-dir",
        tree(entry(B, b"a"), entry(D, b"a", EMPTY_TREE)),
        "duplicateEntries",
    ),
    (
        "duplicateEntries-apart",
        tree(
            entry(B, b"foo"),
            entry(B, b"foo.bar"),
            entry(B, b"foo.bar.baz"),
            entry(D, b"foo", EMPTY_TREE),
        ),
        "duplicateEntries",
    ),
    ("treeNotSorted", tree(entry(B, b"b"), entry(B, b"a")), "treeNotSorted"),
    (
        "treeNotSorted-dir-slash",
        tree(entry(D, b"a", EMPTY_TREE), entry(B, b"a.c")),
        "treeNotSorted",
    ),
    ("gitmodulesSymlink", tree(entry(L, b".gitmodules")), "gitmodulesSymlink"),
    ("gitmodulesSymlink-ntfs", tree(entry(L, b"GITMOD~1")), "gitmodulesSymlink"),
    ("gitmodulesSymlink-hfs", tree(entry(L, ".gitmodules\u200c".encode())), "gitmodulesSymlink"),
    ("gitmodulesSymlink-backslash", tree(entry(L, b"a\\.gitmodules")), "gitmodulesSymlink"),
]


@pytest.mark.parametrize(
    ("raw", "expected"), [c[1:] for c in TREE_CASES], ids=[c[0] for c in TREE_CASES]
)
def test_tree_checks(raw, expected):
    """Each malformed tree is refused with git's msg id; well-formed ones pass."""
    assert fsck_id(TREE, raw) == expected


@pytest.mark.parametrize(
    ("raw", "expected"), [c[1:] for c in TREE_CASES], ids=[c[0] for c in TREE_CASES]
)
def test_tree_checks_agree_with_git(git_fsck, raw, expected):
    """git fsck --strict reports the same first error for the same tree (or none)."""
    errors = git_fsck.errors((TREE, raw))
    assert (errors[0] if errors else None) == expected


@pytest.mark.parametrize(
    "raw",
    [
        entry(B, b"a")[:-1],
        entry(B, b"a") + b"100644 b",
        entry(B, b"a") + b"100644 b\0" + b"x" * 19,
        b"100644a\0" + b"x" * 20,
        b" a\0" + b"x" * 20,
        b"10064x a\0" + b"x" * 20,
        b"\0",
    ],
    ids=[
        "short-id",
        "no-nul",
        "short-second-id",
        "no-space",
        "empty-mode",
        "non-octal-mode",
        "nul",
    ],
)
def test_truncated_or_malformed_tree_is_bad_tree(raw):
    """Entries that cannot be parsed (cut short, no mode, no NUL) are badTree."""
    assert fsck_id(TREE, raw) == "badTree"


def test_empty_name():
    """An entry with an empty name is emptyName (git's parser calls the whole tree bad)."""
    assert fsck_id(TREE, tree(entry(B, b""))) == "emptyName"


def test_large_pathname():
    """A name over 4096 bytes is refused, as receive.fsckObjects does."""
    assert fsck_id(TREE, tree(entry(B, b"n" * 4096))) is None
    assert fsck_id(TREE, tree(entry(B, b"n" * 4097))) == "largePathname"


def test_legacy_group_writable_mode_is_accepted():
    """100664, which early git wrote, is accepted (git warns about it at most)."""
    assert fsck_id(TREE, tree(entry(b"100664", b"a"))) is None


def test_first_finding_is_reported_in_git_order():
    """With several problems the one git lists first wins, whatever the entry order."""
    raw = tree(entry(B, b"z"), entry(B, b".git"), entry(b"100600", b"a"))
    assert fsck_id(TREE, raw) == "hasDotgit"


# -- a property: our verdict on random trees is git's -----------------------

_PLAIN_NAMES = [b"a", b"a.b", b"a-b", b"a0", b"b", b"foo", b"foo.bar", b"foo.bar.baz", b"\xff"]
_TRICKY_NAMES = [
    b"a/b",
    b".",
    b"..",
    b".git",
    b".GIT",
    b"git~1",
    b".git.",
    b".git ",
    b".git::$INDEX_ALLOCATION",
    b"x\\.git",
    ".g\u200cit".encode(),
    b".gitmodules",
    b"GITMOD~1",
    b"gi7eba~9",
    b".gitmodules . .",
]
_MODES = [B, B, X, L, D, D, b"040000", G, b"100600"]


@st.composite
def random_trees(draw: st.DrawFn) -> bytes:
    """Mostly plain names, in git's order or not, with the odd tricky name or mode."""
    names = st.sampled_from(_PLAIN_NAMES * 6 + _TRICKY_NAMES)
    unique = draw(st.integers(0, 2)) > 0  # duplicates are common otherwise
    entry_lists = st.lists(
        st.tuples(st.sampled_from(_MODES), names),
        max_size=6,
        unique_by=(lambda e: e[1]) if unique else None,
    )
    entries = draw(entry_lists)
    if draw(st.booleans()):
        entries.sort(key=lambda e: e[1] + b"/" if e[0].lstrip(b"0") == D else e[1])
    out = b""
    for mode, name in entries:
        target = EMPTY_TREE if mode.lstrip(b"0") == D else SOME_COMMIT if mode == G else EMPTY_BLOB
        out += entry(mode, name, target)
    return out


@settings(max_examples=100, deadline=None, derandomize=True)
@given(raw=random_trees())
def test_random_trees_agree_with_git(git_fsck, raw):
    """For trees of tricky names and modes, we fail exactly when git fsck --strict does,
    and with the first msg id it reports."""
    errors = git_fsck.errors((TREE, raw))
    assert fsck_id(TREE, raw) == (errors[0] if errors else None)


# -- good objects from dulwich and from git ---------------------------------


def test_dulwich_objects_pass():
    """Objects serialised by dulwich pass every check."""
    blob = Blob.from_string(b"hello\n")
    sub = Tree()
    sub.add(b"file", 0o100644, blob.id)
    root = Tree()
    root.add(b"a.c", 0o100755, blob.id)
    root.add(b"a", 0o040000, sub.id)
    root.add(b"link", 0o120000, blob.id)
    root.add(b"module", 0o160000, SOME_COMMIT)
    c = Commit()
    c.tree = root.id
    c.parents = [SOME_COMMIT]
    c.author = c.committer = b"D U Lwich <dulwich@example.com>"
    c.author_time = c.commit_time = 1700000000
    c.author_timezone = c.commit_timezone = -3600
    c.message = b"made by dulwich\n"
    t = Tag()
    t.object = (Commit, c.id)
    t.name = b"v1.0"
    t.tagger = b"T <t@example.com>"
    t.tag_time = 1700000001
    t.tag_timezone = 19800
    t.message = b"tagged\n"
    for obj, type in ((sub, TREE), (root, TREE), (c, COMMIT), (t, TAG), (blob, BLOB)):
        check_object(ObjectID(obj.id), type, obj.as_raw_string())


def run_git(repo: Path, *args: str) -> bytes:
    return subprocess.run(["git", *args], cwd=repo, capture_output=True, check=True).stdout


@pytest.fixture(scope="module")
def git_made_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("made")
    sub = base / "sub"
    sub.mkdir()
    run_git(sub, "init", "-q")
    (sub / "x").write_text("x\n")
    run_git(sub, "add", "x")
    run_git(sub, "commit", "-q", "-m", "sub")
    repo = base / "repo"
    repo.mkdir()
    run_git(repo, "init", "-q")
    for name in ("a", "a.c", "a-b", "b/c", "b.d/e", "é"):
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_text(name + "\n")
    (repo / "run.sh").write_text("#!/bin/sh\n")
    (repo / "run.sh").chmod(0o755)
    os.symlink("a", repo / "link")
    run_git(repo, "add", ".")
    run_git(repo, "commit", "-q", "-m", "first")
    run_git(
        repo, "-c", "protocol.file.allow=always", "submodule", "add", "-q", "../sub", "libs/sub"
    )
    run_git(repo, "commit", "-q", "-m", "second\n\nwith a body")
    run_git(repo, "tag", "-a", "-m", "release", "v1.0")
    run_git(repo, "checkout", "-q", "-b", "side", "HEAD~1")
    (repo / "side").write_text("side\n")
    run_git(repo, "add", "side")
    run_git(repo, "commit", "-q", "-m", "side")
    run_git(repo, "merge", "-q", "--no-edit", "master")
    return repo


def git_objects(repo: Path) -> Iterator[tuple[ObjectID, ObjectType, bytes]]:
    data = run_git(repo, "cat-file", "--batch-all-objects", "--batch")
    pos = 0
    while pos < len(data):
        header_end = data.index(b"\n", pos)
        oid, type_name, size = data[pos:header_end].split()
        start = header_end + 1
        yield ObjectID(oid), ObjectType.from_name(type_name), data[start : start + int(size)]
        pos = start + int(size) + 1


def test_git_made_objects_pass(git_made_repo):
    """Every object of a repository made by git (merge, tag, submodule, symlink) passes."""
    objects = list(git_objects(git_made_repo))
    assert {t for _, t, _ in objects} == {COMMIT, TREE, BLOB, TAG}
    blobs = {oid: raw for oid, t, raw in objects if t is BLOB}
    gitmodules = []
    for oid, type, raw in objects:
        check_object(oid, type, raw)
        if type is TREE:
            gitmodules.extend(gitmodules_blobs(raw))
    assert gitmodules
    for oid in gitmodules:
        assert b"[submodule" in blobs[oid]
        check_gitmodules(oid, blobs[oid])


# -- gitmodules_blobs -------------------------------------------------------


def test_gitmodules_blobs_finds_every_spelling():
    """Any name Git would check out as .gitmodules is found; symlinks and look-alikes are not."""
    ids = [ObjectID(b"%040x" % i) for i in range(1, 10)]
    raw = tree(
        entry(B, b".GITMODULES", ids[0]),
        entry(B, b".gitmodules", ids[1]),
        entry(B, b".gitmodules. ", ids[2]),
        entry(B, b"GI7EBA~1", ids[3]),
        entry(B, b"a\\.gitmodules", ids[4]),
        entry(B, ".gitmodules\u200d".encode(), ids[5]),
        entry(L, b".gitmodulez", ids[6]),
        entry(B, b"gitmodules", ids[7]),
        entry(B, b"x.gitmodules", ids[8]),
    )
    assert gitmodules_blobs(raw) == ids[:6]


def test_gitmodules_blobs_skips_symlinks_and_keeps_gitlinks():
    """A symlink is check_object's business; a gitlink is returned for the caller to refuse."""
    link_target = ObjectID(b"2" * 40)
    raw = tree(entry(L, b".gitmodules", link_target), entry(G, b"gitmod~1", SOME_COMMIT))
    assert gitmodules_blobs(raw) == [SOME_COMMIT]


def test_gitmodules_blobs_of_a_broken_tree():
    """A tree that does not parse is badTree, named by its own id."""
    raw = entry(B, b".gitmodules")[:-3]
    with pytest.raises(FsckError) as caught:
        gitmodules_blobs(raw)
    assert caught.value.msg_id == "badTree"
    assert caught.value.oid == object_id(TREE, raw)


# -- .gitmodules contents ---------------------------------------------------

GITMODULES_CASES = [
    ("good", b'[submodule "libs/sub"]\n\tpath = libs/sub\n\turl = ../sub\n', None),
    ("good-empty", b"", None),
    (
        "good-comments",
        b'# c\n; c\n[submodule "a"] # c\n  url = https://example.com/a.git ; c\n',
        None,
    ),
    ("good-scp", b'[submodule "a"]\nurl = git@example.com:a/b.git\n', None),
    ("good-ssh", b'[submodule "a"]\nurl = ssh://example.com/a\n', None),
    ("good-port", b'[submodule "a"]\nurl = https://example.com:8443/a\n', None),
    ("good-default-port", b'[submodule "a"]\nurl = https://example.com:0443/a\n', None),
    ("good-userinfo", b'[submodule "a"]\nurl = https://u:p%40ss@example.com/a\n', None),
    ("good-dotdot-inside", b'[submodule "a"]\nurl = https://example.com/a/../b\n', None),
    ("good-helper", b'[submodule "a"]\nurl = http::https://example.com/a\n', None),
    ("good-update", b'[submodule "a"]\nupdate = rebase\n', None),
    ("good-bare-key", b'[submodule "a"]\nurl\npath\n', None),
    ("good-dotted-name", b'[submodule "a..b"]\nurl = ../x\n', None),
    ("good-other-section", b"[core]\nurl = -x\n[submodule]\nurl = -x\n", None),
    ("good-crlf-bom", b'\xef\xbb\xbf[submodule "a"]\r\n\turl = ../a\r\n', None),
    ("parse-error-accepted", b'[submodule "a"\nurl = x\n', None),
    ("parse-error-garbage", b"\x00\x01 what is this", None),
    ("parse-error-partial-bom", b'\xef\xbb[submodule ".."]\nurl = x\n', None),
    ("gitmodulesName", b'[submodule "../escape"]\n\tpath = a\n', "gitmodulesName"),
    ("gitmodulesName-inner", b'[submodule "a/../b"]\n\tpath = a\n', "gitmodulesName"),
    ("gitmodulesName-trailing", b'[submodule "a/.."]\n\tpath = a\n', "gitmodulesName"),
    ("gitmodulesName-backslash", b'[submodule "a\\\\..\\\\b"]\n\tpath = a\n', "gitmodulesName"),
    ("gitmodulesName-empty", b'[submodule ""]\n\tpath = a\n', "gitmodulesName"),
    ("gitmodulesName-dotted-header", b"[submodule...]\n\tpath = a\n", "gitmodulesName"),
    ("parse-error-dotted-header", b"[submodule.a/../b]\n\tpath = a\n", None),
    ("gitmodulesName-before-garbage", b'[submodule ".."]\nurl = x\n[[[', "gitmodulesName"),
    ("gitmodulesUrl-option", b'[submodule "a"]\nurl = -oProxyCommand=evil\n', "gitmodulesUrl"),
    ("gitmodulesUrl-quoted-option", b'[submodule "a"]\nurl = "-u./payload"\n', "gitmodulesUrl"),
    ("gitmodulesUrl-continued-option", b'[submodule "a"]\nurl = \\\n-x\n', "gitmodulesUrl"),
    ("gitmodulesUrl-newline", b'[submodule "a"]\nurl = https://example.com/%0a\n', "gitmodulesUrl"),
    (
        "gitmodulesUrl-escaped-newline",
        b'[submodule "a"]\nurl = "https://example.com/\\n"\n',
        "gitmodulesUrl",
    ),
    (
        "gitmodulesUrl-relative-newline",
        b'[submodule "a"]\nurl = ./a%0Ahost=evil\n',
        "gitmodulesUrl",
    ),
    (
        "gitmodulesUrl-git-newline",
        b'[submodule "a"]\nurl = git://example.com/%0a\n',
        "gitmodulesUrl",
    ),
    (
        "gitmodulesUrl-climb-colon",
        b'[submodule "a"]\nurl = ../../:example.com/x\n',
        "gitmodulesUrl",
    ),
    (
        "gitmodulesUrl-climb-slash",
        b'[submodule "a"]\nurl = .././..//example.com/x\n',
        "gitmodulesUrl",
    ),
    (
        "gitmodulesUrl-no-host",
        b'[submodule "a"]\nurl = http::https:///example.com/x\n',
        "gitmodulesUrl",
    ),
    ("gitmodulesUrl-no-slashes", b'[submodule "a"]\nurl = https::example.com/x\n', "gitmodulesUrl"),
    (
        "gitmodulesUrl-bad-host",
        b'[submodule "a"]\nurl = https://ex%61mple.com/x\n',
        "gitmodulesUrl",
    ),
    (
        "gitmodulesUrl-bad-port",
        b'[submodule "a"]\nurl = https://example.com:99999/x\n',
        "gitmodulesUrl",
    ),
    (
        "gitmodulesUrl-port-zero",
        b'[submodule "a"]\nurl = https://example.com:00/x\n',
        "gitmodulesUrl",
    ),
    (
        "gitmodulesUrl-bad-escape",
        b'[submodule "a"]\nurl = https://example.com/%zz\n',
        "gitmodulesUrl",
    ),
    (
        "gitmodulesUrl-climb-root",
        b'[submodule "a"]\nurl = https://example.com/a/../../b\n',
        "gitmodulesUrl",
    ),
    ("gitmodulesPath", b'[submodule "a"]\n\tpath = --output=/tmp/x\n', "gitmodulesPath"),
    ("gitmodulesUpdate", b'[submodule "a"]\n\tupdate = !rm -rf /\n', "gitmodulesUpdate"),
]


@pytest.mark.parametrize(
    ("raw", "expected"), [c[1:] for c in GITMODULES_CASES], ids=[c[0] for c in GITMODULES_CASES]
)
def test_gitmodules_checks(raw, expected):
    """Each dangerous .gitmodules setting is refused with git's msg id; unparseable text passes."""
    assert gitmodules_id(raw) == expected


# Refused by url_normalize(), which git's check_submodule_url() uses since
# after the installed git 2.39 (that one parsed the URL as a credential).
URL_NORMALIZE_CASES = {
    "gitmodulesUrl-bad-host",
    "gitmodulesUrl-bad-port",
    "gitmodulesUrl-port-zero",
    "gitmodulesUrl-bad-escape",
    "gitmodulesUrl-climb-root",
}
GITMODULES_GIT_CASES = [c for c in GITMODULES_CASES if c[0] not in URL_NORMALIZE_CASES]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [c[1:] for c in GITMODULES_GIT_CASES],
    ids=[c[0] for c in GITMODULES_GIT_CASES],
)
def test_gitmodules_checks_agree_with_git(git_fsck, raw, expected):
    """git fsck --strict refuses the same .gitmodules blobs, with the same first msg id."""
    errors = git_fsck.errors((BLOB, raw), (TREE, entry(B, b".gitmodules", object_id(BLOB, raw))))
    assert (errors[0] if errors else None) == expected


def test_absolute_submodule_names_are_refused():
    """We refuse absolute submodule names too (git allows them), as they name no safe path."""
    assert gitmodules_id(b'[submodule "/etc"]\n\tpath = a\n') == "gitmodulesName"
    assert gitmodules_id(b'[submodule "\\\\x"]\n\tpath = a\n') == "gitmodulesName"


def test_gitmodules_error_message():
    """The message names the offending value, as git's does."""
    raw = b'[submodule "a"]\n\tpath = -x\n'
    with pytest.raises(FsckError) as caught:
        check_gitmodules(object_id(BLOB, raw), raw)
    assert caught.value.message == "disallowed submodule path: -x"


# -- the git-config reader behind check_gitmodules --------------------------

_VALUE_PIECES = [b"a", b"Z9", b" ", b"\t", b'"', b"\\n", b"\\t", b'\\"', b"\\\\", b"\\x"]
_VALUE_PIECES += [b"\\\n", b";", b"#", b"-", b"..", b"/", b"=", b"\xc3\xa9", b"\r"]
_SUBSECTION_PIECES = [b"a", b"B", b".", b"..", b"/", b" ", b'\\"', b"\\\\", b"\\x", b"]", b"\xff"]
_JUNK_PIECES = [b"[", b"]", b'"', b"\\", b"=", b"x", b" ", b"\n", b"\xef\xbb\xbf", b"-", b"1"]


def _joined(pieces: list[bytes], max_size: int) -> st.SearchStrategy[bytes]:
    return st.lists(st.sampled_from(pieces), max_size=max_size).map(b"".join)


_spaces = st.sampled_from([b"", b" ", b"\t", b" \t "])
_config_lines = st.one_of(
    st.tuples(
        st.just(b"["),
        st.sampled_from([b"submodule", b"Submodule", b"core", b"sub.Mod", b"", b"a-b"]),
        st.one_of(
            st.just(b""),
            st.tuples(_spaces, st.just(b' "'), _joined(_SUBSECTION_PIECES, 5), st.just(b'"')).map(
                b"".join
            ),
        ),
        st.sampled_from([b"]", b"] ; c", b"]x", b""]),
    ).map(b"".join),
    st.tuples(
        _spaces,
        st.sampled_from([b"url", b"Path", b"update", b"x-1", b"1x", b"k_"]),
        st.one_of(
            st.just(b""),
            st.tuples(_spaces, st.just(b"="), _joined(_VALUE_PIECES, 8)).map(b"".join),
        ),
    ).map(b"".join),
    st.sampled_from([b"", b"# comment", b"; comment [x", b"  \t"]),
    _joined(_JUNK_PIECES, 4),
)
config_texts = st.tuples(
    st.sampled_from([b"", b"", b"\xef\xbb\xbf"]),
    st.lists(_config_lines, max_size=8),
    st.sampled_from([b"\n", b"\r\n"]),
    st.booleans(),
).map(lambda t: t[0] + t[2].join(t[1]) + (t[2] if t[3] else b""))


def git_config_items(tmp: Path, raw: bytes) -> tuple[list[tuple[bytes, bytes | None]], bool]:
    """What `git config --list` reads from *raw*, and whether it read all of it."""
    (tmp / "config").write_bytes(raw)
    result = subprocess.run(
        ["git", "config", "--file", str(tmp / "config"), "--list", "-z"],
        capture_output=True,
        check=False,
    )
    items: list[tuple[bytes, bytes | None]] = []
    for record in result.stdout.split(b"\0")[:-1]:
        name, newline, value = record.partition(b"\n")
        items.append((name, value if newline else None))
    return items, result.returncode == 0


@settings(max_examples=150, deadline=None, derandomize=True)
@given(raw=config_texts)
def test_config_reader_agrees_with_git_config(tmp_path_factory, raw):
    """The config reader yields the variables and values `git config --list` does, and
    stops at a syntax error exactly when git does."""
    from gitstratum.core import fsck

    expected, complete = git_config_items(tmp_path_factory.mktemp("config"), raw)
    items = []
    try:
        items.extend(fsck._ConfigReader(raw).items())
    except fsck._ConfigSyntaxError:
        ok = False
    else:
        ok = True
    assert (_fold_blanks(items), ok) == (_fold_blanks(expected), complete)


def _fold_blanks(items: list[tuple[bytes, bytes | None]]) -> list[tuple[bytes, bytes | None]]:
    # git before 2.45 (as installed here) turned each blank inside a value into
    # a space; since then, and in our reader, blanks are kept as written.
    table = bytes.maketrans(b"\t\r", b"  ")
    return [(name, None if value is None else value.translate(table)) for name, value in items]


def test_oversized_gitmodules_is_refused():
    """A .gitmodules over the size bound is gitmodulesLarge rather than parsed at length."""
    raw = b'[submodule "a"]\n\tpath = a\n'
    check_gitmodules(object_id(BLOB, raw), raw, max_size=len(raw))
    with pytest.raises(FsckError) as caught:
        check_gitmodules(object_id(BLOB, raw), raw, max_size=len(raw) - 1)
    assert caught.value.msg_id == "gitmodulesLarge"
