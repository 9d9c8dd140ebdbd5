"""The object checks of ``git fsck`` / ``receive.fsckObjects``, on raw object bodies.

A port of the rules in git's fsck.c (with the name tests of utf8.c and
path.c, the config syntax of config.c and the URL tests of
submodule-config.c and urlmatch.c).  What fails is what fails under
``index-pack --strict``, which ``receive.fsckObjects`` runs (so warnings such
as ``hasDotgit``, ``nullSha1`` and ``nulInCommit`` are errors), except:

* ``badFilemode`` is an error (git only notes it): trees we serve to others
  hold only the modes git itself writes;
* ``zeroPaddedFilemode`` and the legacy mode 100664 are accepted, since old
  histories carry them and they are harmless;
* object ids inside commits and tags must be lowercase hex (git accepts
  uppercase), because every id we store is lowercase;
* a submodule name may not be absolute (git allows it).

Git's INFO-level findings (``badTagName``, ``missingTaggerEntry``,
``gitmodulesParse``) and ignored ones (extra tag headers) never fail a check.
Whether each ``.gitmodules`` entry is a blob and is present
(``gitmodulesBlob``, ``gitmodulesMissing``) is for the caller to check.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator

from gitstratum.core.objects import ObjectType
from gitstratum.core.oid import ObjectID, from_bin
from gitstratum.core.refs import check_ref_format

__all__ = [
    "FsckError",
    "check_object",
    "check_tree",
    "gitmodules_blobs",
    "check_gitmodules",
    "MAX_GITMODULES_BYTES",
]

#: Names longer than this are ``largePathname``, git's default for the check.
MAX_TREE_ENTRY_LEN = 4096
#: A bigger ``.gitmodules`` is ``gitmodulesLarge``.  Git's bound is its
#: big-file threshold (512 MiB); parsing here is Python, so ours is far lower
#: (real files are a few KiB; 8 MiB parses in about three seconds).
MAX_GITMODULES_BYTES = 8 * 1024 * 1024

# Findings git reports at INFO level or lower, or which we accept on purpose
# (see the module docstring): a report of one of these does not fail.
_ACCEPTED = frozenset({"badTagName", "missingTaggerEntry", "zeroPaddedFilemode", "gitmodulesParse"})

_GOOD_MODES = frozenset({0o100644, 0o100755, 0o120000, 0o040000, 0o160000, 0o100664})

_HEX40 = re.compile(rb"[0-9a-f]{40}")
_TREE_ENTRY = re.compile(rb"([0-7]+) ([^\0]*)\0(.{20})", re.DOTALL)
_NULL_SHA = b"\0" * 20
_TAG_TARGET_TYPES = frozenset({b"blob", b"tree", b"commit", b"tag"})
_DIGITS = frozenset(b"0123456789")
_TIME_MAX_DIGITS = 23  # git gives up parsing a timestamp past this many digits


class FsckError(ValueError):
    """An object fails one of git's fsck checks; str() reads like git's own report."""

    def __init__(self, oid: bytes, msg_id: str, message: str) -> None:
        super().__init__(oid, msg_id, message)
        self.oid = oid
        self.msg_id = msg_id
        self.message = message

    def __str__(self) -> str:
        return f"object {self.oid.decode('ascii', 'replace')}: {self.msg_id}: {self.message}"


def _report(oid: bytes, msg_id: str, message: str) -> None:
    if msg_id not in _ACCEPTED:
        raise FsckError(oid, msg_id, message)


def _show(value: bytes) -> str:
    return value.decode("utf-8", "backslashreplace")


def _lower(c: int) -> int:
    """ASCII tolower() on one byte, as git's locale-free ctype does."""
    return c + 32 if 0x41 <= c <= 0x5A else c


def check_object(oid: ObjectID, type: ObjectType, raw: bytes) -> None:
    """Raise FsckError if the body *raw* of object *oid* fails git's checks for *type*.

    Blobs always pass here; a blob found at ``.gitmodules`` (see
    ``gitmodules_blobs``) must also go through ``check_gitmodules``.
    """
    if type is ObjectType.COMMIT:
        _check_commit(oid, raw)
    elif type is ObjectType.TREE:
        _check_tree(oid, raw)
    elif type is ObjectType.TAG:
        _check_tag(oid, raw)


# -- commits and tags -------------------------------------------------------


def _header_lines(oid: bytes, raw: bytes) -> list[bytes]:
    """The header lines of a commit or tag, after git's verify_headers()."""
    end = raw.find(b"\n\n")
    header = raw if end < 0 else raw[: end + 1]
    nul = header.find(b"\0")
    if nul >= 0:
        _report(oid, "nulInHeader", f"unterminated header: NUL at offset {nul}")
    if not header.endswith(b"\n"):
        _report(oid, "unterminatedHeader", "unterminated header")
    return header[:-1].split(b"\n")


def _check_ident(oid: bytes, ident: bytes) -> None:
    """git's fsck_ident() on the text after ``author ``/``committer ``/``tagger ``."""
    s = ident + b"\n"

    def at(i: int) -> int:
        return s[i] if i < len(s) else 0

    prefix = "invalid author/committer line - "
    if s[0] == ord("<"):
        return _report(oid, "missingNameBeforeEmail", prefix + "missing space before email")
    p = 0
    while True:
        c = s[p]
        if c == ord("\n"):
            return _report(oid, "missingEmail", prefix + "missing email")
        if c == ord(">"):
            return _report(oid, "badName", prefix + "bad name")
        if c == ord("<"):
            break
        p += 1
    if s[p - 1] != ord(" "):
        return _report(oid, "missingSpaceBeforeEmail", prefix + "missing space before email")
    p += 1
    while True:
        c = s[p]
        if c in b"<\n":
            return _report(oid, "badEmail", prefix + "bad email")
        if c == ord(">"):
            break
        p += 1
    p += 1
    if s[p] != ord(" "):
        return _report(oid, "missingSpaceBeforeDate", prefix + "missing space before date")
    p += 1
    while s[p] in b" \t":
        p += 1
    if s[p] not in _DIGITS:
        return _report(oid, "badDate", prefix + "bad date")
    if s[p] == ord("0") and s[p + 1] != ord(" "):
        return _report(oid, "zeroPaddedDate", prefix + "zero-padded date")
    start = p
    while s[p] in _DIGITS:
        p += 1
    digits = s[start:p]
    # git keeps dates in a 64-bit signed time_t.
    if len(digits) > _TIME_MAX_DIGITS or int(digits) >= 1 << 63:
        return _report(oid, "badDateOverflow", prefix + "date causes integer overflow")
    if s[p] != ord(" "):
        return _report(oid, "badDate", prefix + "bad date")
    p += 1
    if (
        at(p) not in b"+-"
        or not all(at(p + k) in _DIGITS for k in range(1, 5))
        or at(p + 5) != ord("\n")
    ):
        return _report(oid, "badTimezone", prefix + "bad time zone")
    return None


def _check_commit(oid: bytes, raw: bytes) -> None:
    lines = _header_lines(oid, raw)
    lines.append(b"")  # so that running off the header reads as a blank line
    i = 0
    if not lines[i].startswith(b"tree "):
        return _report(oid, "missingTree", "invalid format - expected 'tree' line")
    if not _HEX40.fullmatch(lines[i], 5):
        _report(oid, "badTreeSha1", "invalid 'tree' line format - bad sha1")
    i += 1
    while lines[i].startswith(b"parent "):
        if not _HEX40.fullmatch(lines[i], 7):
            _report(oid, "badParentSha1", "invalid 'parent' line format - bad sha1")
        i += 1
    authors = 0
    while lines[i].startswith(b"author "):
        authors += 1
        _check_ident(oid, lines[i][7:])
        i += 1
    if authors < 1:
        _report(oid, "missingAuthor", "invalid format - expected 'author' line")
    elif authors > 1:
        _report(oid, "multipleAuthors", "invalid format - multiple 'author' lines")
    if not lines[i].startswith(b"committer "):
        return _report(oid, "missingCommitter", "invalid format - expected 'committer' line")
    _check_ident(oid, lines[i][10:])
    if b"\0" in raw:
        _report(oid, "nulInCommit", "NUL byte in the commit object body")
    return None


def _check_tag(oid: bytes, raw: bytes) -> None:
    # verify_headers() guarantees every header line ends in LF, so git's
    # "unexpected end after 'type' line" cases cannot arise here.
    lines = _header_lines(oid, raw)
    lines.append(b"")
    if not lines[0].startswith(b"object "):
        return _report(oid, "missingObject", "invalid format - expected 'object' line")
    if not _HEX40.fullmatch(lines[0], 7):
        _report(oid, "badObjectSha1", "invalid 'object' line format - bad sha1")
    if not lines[1].startswith(b"type "):
        return _report(oid, "missingTypeEntry", "invalid format - expected 'type' line")
    if lines[1][5:] not in _TAG_TARGET_TYPES:
        _report(oid, "badType", "invalid 'type' value")
    if not lines[2].startswith(b"tag "):
        return _report(oid, "missingTagEntry", "invalid format - expected 'tag' line")
    name = lines[2][4:]
    if not check_ref_format(b"refs/tags/" + name):
        _report(oid, "badTagName", f"invalid 'tag' name: {_show(name)}")
    if not lines[3].startswith(b"tagger "):
        # early tags do not carry a tagger
        return _report(oid, "missingTaggerEntry", "invalid format - expected 'tagger' line")
    _check_ident(oid, lines[3][7:])
    return None


# -- trees ------------------------------------------------------------------


def _parse_tree(oid: bytes, raw: bytes) -> list[tuple[bytes, bytes, bytes]]:
    """Split a tree into (mode digits, name, binary id), strictly; badTree if it cannot."""
    entries: list[tuple[bytes, bytes, bytes]] = []
    pos = 0
    for match in _TREE_ENTRY.finditer(raw):
        if match.start() != pos:  # finditer skipped bytes that are no entry
            break
        entries.append((match[1], match[2], match[3]))
        pos = match.end()
    if pos != len(raw):
        _report(oid, "badTree", "cannot be parsed as a tree")
    return entries


def _after_backslashes(name: bytes) -> Iterator[bytes]:
    """What follows each backslash: fsck reads one as a directory separator, as Windows would."""
    at = name.find(b"\\")
    while at >= 0:
        yield name[at + 1 :]
        at = name.find(b"\\", at + 1)


def _may_alias_dotfile(name: bytes) -> bool:
    """A cheap filter: only these names can be an alias of ".git" or ".gitmodules".

    Every alias starts with ".", with a non-ASCII byte (an HFS+ ignorable code
    point), has "~" in an 8.3 short name, or has a backslash before the alias.
    """
    return name[:1] == b"." or name[:1] >= b"\x80" or b"~" in name[:8] or b"\\" in name


def _is_dotgitmodules(name: bytes) -> bool:
    if not _may_alias_dotfile(name):
        return False
    if _is_hfs_dot(name, b"gitmodules"):
        return True
    return any(
        _is_ntfs_dot(tail, b"gitmodules", b"gi7eba") for tail in (name, *_after_backslashes(name))
    )


def _is_dotgit(name: bytes) -> bool:
    if not _may_alias_dotfile(name):
        return False
    if _is_hfs_dot(name, b"git"):
        return True
    return any(_is_ntfs_dotgit(tail) for tail in (name, *_after_backslashes(name)))


def _is_dir(mode: int) -> bool:
    return mode & 0o170000 == 0o040000


def _is_symlink(mode: int) -> bool:
    return mode & 0o170000 == 0o120000


_TREE_UNORDERED = -1
_TREE_HAS_DUPS = -2
_SLASH = ord("/")


def _is_less_than_slash(c: int) -> bool:
    return 0 < c < _SLASH


def _verify_ordered(
    mode1: int, name1: bytes, mode2: int, name2: bytes, candidates: list[bytes]
) -> int:
    """git's verify_ordered(): compare consecutive entries in tree order.

    A directory sorts as its name plus "/".  A file "foo" and a directory
    "foo" need not be neighbours ("foo", "foo.bar", "foo/"), so file names
    that could still clash with a later directory wait in *candidates*.
    """
    n = min(len(name1), len(name2))
    if name1[:n] < name2[:n]:
        return 0
    if name1[:n] > name2[:n]:
        return _TREE_UNORDERED
    c1 = name1[n] if len(name1) > n else 0
    c2 = name2[n] if len(name2) > n else 0
    if not c1 and not c2:
        return _TREE_HAS_DUPS
    if not c1 and _is_dir(mode1):
        c1 = _SLASH
    if not c2 and _is_dir(mode2):
        c2 = _SLASH
    if not c1 and _is_less_than_slash(c2):
        candidates.append(name1)
    elif c2 == _SLASH and _is_less_than_slash(c1):
        while candidates:
            file_name = candidates.pop()
            if not name2.startswith(file_name):
                continue
            rest = name2[len(file_name) :]
            if not rest:
                return _TREE_HAS_DUPS
            if _is_less_than_slash(rest[0]):
                candidates.append(file_name)
                break
    return 0 if c1 < c2 else _TREE_UNORDERED


# A name that cannot be ".", "..", empty, contain "/" or alias ".git" or
# ".gitmodules" (see _may_alias_dotfile); nearly every real name is one.
_PLAIN_NAME = re.compile(rb"[^.\x80-\xff/\\~][^\x80-\xff/\\~]*\Z")


def check_tree(oid: ObjectID, raw: bytes) -> list[ObjectID]:
    """Check a tree like ``check_object``; return what ``gitmodules_blobs`` would.

    One parse serves both, because receive-pack needs both for every pushed tree.
    """
    return _check_tree(oid, raw)


def _check_tree(oid: bytes, raw: bytes) -> list[ObjectID]:
    found: set[str] = set()
    gitmodules: list[ObjectID] = []
    candidates: list[bytes] = []
    modes = _MODE_CACHE
    plain = _PLAIN_NAME.match
    prev_mode = 0
    prev_name: bytes | None = None
    for mode_digits, name, sha in _parse_tree(oid, raw):
        mode = modes.get(mode_digits)
        if mode is None:
            mode = int(mode_digits, 8)
            if mode_digits.startswith(b"0"):
                found.add("zeroPaddedFilemode")
            if mode not in _GOOD_MODES:
                found.add("badFilemode")
        if sha == _NULL_SHA:
            found.add("nullSha1")
        if plain(name) is None:
            if b"/" in name:
                found.add("fullPathname")
            if not name:
                found.add("emptyName")
            if name == b".":
                found.add("hasDot")
            if name == b"..":
                found.add("hasDotdot")
            if _is_dotgit(name):
                found.add("hasDotgit")
            if _is_dotgitmodules(name):
                if _is_symlink(mode):
                    _report(oid, "gitmodulesSymlink", ".gitmodules is a symbolic link")
                else:
                    gitmodules.append(from_bin(sha))
        if len(name) > MAX_TREE_ENTRY_LEN:
            found.add("largePathname")
        if prev_name is not None and not (prev_name < name and not name.startswith(prev_name)):
            # Only a prefix relation needs git's full rule (files vs "dir/").
            order = _verify_ordered(prev_mode, prev_name, mode, name, candidates)
            if order == _TREE_UNORDERED:
                found.add("treeNotSorted")
            elif order == _TREE_HAS_DUPS:
                found.add("duplicateEntries")
        prev_mode, prev_name = mode, name
    for msg_id, message in _TREE_FINDINGS:
        if msg_id in found:
            _report(oid, msg_id, message)
    return gitmodules


# The canonical modes, parsed once; anything else takes the slow path above.
_MODE_CACHE = {b"%o" % m: m for m in _GOOD_MODES}


# In the order git reports them.
_TREE_FINDINGS = (
    ("nullSha1", "contains entries pointing to null sha1"),
    ("fullPathname", "contains full pathnames"),
    ("emptyName", "contains empty pathname"),
    ("hasDot", "contains '.'"),
    ("hasDotdot", "contains '..'"),
    ("hasDotgit", "contains '.git'"),
    ("zeroPaddedFilemode", "contains zero-padded file modes"),
    ("badFilemode", "contains bad file modes"),
    ("duplicateEntries", "contains duplicate file entries"),
    ("treeNotSorted", "not properly sorted"),
    ("largePathname", "contains excessively large pathname"),
)


def gitmodules_blobs(tree_raw: bytes) -> list[ObjectID]:
    """Ids of the entries of a tree that Git would check out as ``.gitmodules``.

    That covers case and the HFS+ and NTFS spellings of the name.  Symbolic
    links are left out (``check_object`` refuses them); gitlinks are not, so
    the caller must check that each id is a blob (git's ``gitmodulesBlob``).
    """
    ids: list[ObjectID] = []
    for mode_digits, name, sha in _parse_tree(_tree_oid(tree_raw), tree_raw):
        if _is_dotgitmodules(name) and not _is_symlink(int(mode_digits, 8)):
            ids.append(from_bin(sha))
    return ids


def _tree_oid(raw: bytes) -> bytes:
    return hashlib.sha1(b"tree %d\0" % len(raw) + raw).hexdigest().encode("ascii")


# -- names Git must never check out ----------------------------------------

# Code points HFS+ ignores when it compares names (git's next_hfs_char()).
_HFS_IGNORED = frozenset(
    [0x200C, 0x200D, 0x200E, 0x200F, 0x202A, 0x202B, 0x202C, 0x202D, 0x202E]
    + [0x206A, 0x206B, 0x206C, 0x206D, 0x206E, 0x206F, 0xFEFF]
)


def _utf8_char(s: bytes, pos: int) -> tuple[int, int]:
    """Decode one UTF-8 character at *pos* as git's pick_one_utf8_char(); pos -1 if invalid."""
    if pos >= len(s):
        return 0, pos
    c = s[pos]
    rest = s[pos + 1 : pos + 4]
    if c < 0x80:
        return c, pos + 1
    if c & 0xE0 == 0xC0:
        if len(rest) < 1 or rest[0] & 0xC0 != 0x80 or c & 0xFE == 0xC0:
            return 0, -1
        return (c & 0x1F) << 6 | rest[0] & 0x3F, pos + 2
    if c & 0xF0 == 0xE0:
        if (
            len(rest) < 2
            or rest[0] & 0xC0 != 0x80
            or rest[1] & 0xC0 != 0x80
            or (c == 0xE0 and rest[0] & 0xE0 == 0x80)  # overlong
            or (c == 0xED and rest[0] & 0xE0 == 0xA0)  # surrogate
            or (c == 0xEF and rest[0] == 0xBF and rest[1] & 0xFE == 0xBE)  # U+FFFE/F
        ):
            return 0, -1
        return (c & 0x0F) << 12 | (rest[0] & 0x3F) << 6 | rest[1] & 0x3F, pos + 3
    if c & 0xF8 == 0xF0:
        if (
            len(rest) < 3
            or any(b & 0xC0 != 0x80 for b in rest)
            or (c == 0xF0 and rest[0] & 0xF0 == 0x80)  # overlong
            or (c == 0xF4 and rest[0] > 0x8F)
            or c > 0xF4
        ):
            return 0, -1
        value = (c & 0x07) << 18 | (rest[0] & 0x3F) << 12 | (rest[1] & 0x3F) << 6
        return value | rest[2] & 0x3F, pos + 4
    return 0, -1


def _next_hfs_char(s: bytes, pos: int) -> tuple[int, int]:
    while True:
        c, pos = _utf8_char(s, pos)
        if pos < 0:
            # Malformed UTF-8 reads as the end of the name, as in git.
            return 0, -1
        if c not in _HFS_IGNORED:
            return c, pos


def _is_hfs_dot(name: bytes, needle: bytes) -> bool:
    """Would HFS+ take *name* for "." + *needle*? (git's is_hfs_dot_generic())."""
    c, pos = _next_hfs_char(name, 0)
    if c != ord("."):
        return False
    for want in needle:
        c, pos = _next_hfs_char(name, pos)
        if c > 127 or _lower(c) != want:
            return False
    c, pos = _next_hfs_char(name, pos)
    return not c or c == _SLASH


def _only_spaces_and_periods(name: bytes, i: int) -> bool:
    """NTFS drops trailing dots and spaces, and ":" starts a data stream name."""
    for c in name[i:]:
        if c == ord(":"):
            return True
        if c not in b" .":
            return False
    return True


def _is_ntfs_dotgit(name: bytes) -> bool:
    """Would NTFS take *name* for ".git" (".git. ", "git~1", ".git::$INDEX_ALLOCATION")?"""
    if name[:4].lower() == b".git":
        i = 4
    elif name[:5].lower() == b"git~1":
        i = 5
    else:
        return False
    for c in name[i:]:
        if c in b"/\\:":
            return True
        if c not in b". ":
            return False
    return True


def _is_ntfs_dot(name: bytes, dotgit_name: bytes, short_prefix: bytes) -> bool:
    """git's is_ntfs_dot_generic(): "." + *dotgit_name* or one of its 8.3 short names."""
    n = len(dotgit_name)
    if name[:1] == b"." and name[1 : 1 + n].lower() == dotgit_name:
        return _only_spaces_and_periods(name, n + 1)
    if (
        name[:6].lower() == dotgit_name[:6]
        and name[6:7] == b"~"
        and name[7:8] in (b"1", b"2", b"3", b"4")
    ):
        return _only_spaces_and_periods(name, 8)
    # The fall-back short name: up to six characters of a hash prefix, "~",
    # then a digit 1-9 and further digits, eight characters in all.
    saw_tilde = False
    i = 0
    while i < 8:
        if i >= len(name):
            return False
        c = name[i]
        if saw_tilde:
            if c not in _DIGITS:
                return False
        elif c == ord("~"):
            i += 1
            if name[i : i + 1] not in (b"1", b"2", b"3", b"4", b"5", b"6", b"7", b"8", b"9"):
                return False
            saw_tilde = True
        elif i >= 6 or c & 0x80 or _lower(c) != short_prefix[i]:
            return False
        i += 1
    return _only_spaces_and_periods(name, i)


# -- .gitmodules ------------------------------------------------------------


class _ConfigSyntaxError(Exception):
    pass


_CONFIG_SPACE = frozenset(b" \t\n\r")
_LF = ord("\n")
_ESCAPES = {ord("t"): ord("\t"), ord("b"): ord("\b"), ord("n"): _LF}


def _is_keychar(c: int) -> bool:
    return c < 0x80 and (chr(c).isalnum() or c == ord("-"))


def _is_alpha(c: int) -> bool:
    return c < 0x80 and chr(c).isalpha()


class _ConfigReader:
    """git's config parser (config.c, git_parse_source()) over a byte string.

    ``items()`` yields each ``(variable, value)`` as it is read, the way git
    calls its callback, then raises _ConfigSyntaxError where git would stop
    with "bad config line"; a value is None for a bare ``key`` line.
    """

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0
        self._eof = False

    def _next(self) -> int:
        # git folds CRLF to LF and reads end of input as one more LF.
        if self._pos >= len(self._data):
            self._eof = True
            return _LF
        c = self._data[self._pos]
        self._pos += 1
        if c == ord("\r") and self._data[self._pos : self._pos + 1] == b"\n":
            self._pos += 1
            return _LF
        return c

    def items(self) -> Iterator[tuple[bytes, bytes | None]]:
        bom = b"\xef\xbb\xbf"
        bom_seen: int | None = 0
        comment = False
        var = bytearray()
        base_len = 0
        while True:
            c = self._next()
            if bom_seen is not None and bom_seen < len(bom):
                if c == bom[bom_seen]:
                    bom_seen += 1
                    continue
                if bom_seen:
                    raise _ConfigSyntaxError("partial byte order mark")
                bom_seen = None
            if c == _LF:
                if self._eof:
                    return
                comment = False
                continue
            if comment or c in _CONFIG_SPACE:
                continue
            if c in b"#;":
                comment = True
                continue
            if c == ord("["):
                var = self._section()
                var.append(ord("."))
                base_len = len(var)
                continue
            if not _is_alpha(c):
                raise _ConfigSyntaxError("bad character")
            del var[base_len:]
            var.append(_lower(c))
            value = self._key_value(var)
            yield bytes(var), value

    def _section(self) -> bytearray:
        name = bytearray()
        while True:
            c = self._next()
            if self._eof:
                raise _ConfigSyntaxError("unterminated section header")
            if c == ord("]"):
                break
            if c in _CONFIG_SPACE:
                self._subsection(name, c)
                break
            if not _is_keychar(c) and c != ord("."):
                raise _ConfigSyntaxError("bad section name")
            name.append(_lower(c))
        if not name:
            raise _ConfigSyntaxError("empty section name")
        return name

    def _subsection(self, name: bytearray, c: int) -> None:
        while True:
            if c == _LF:
                raise _ConfigSyntaxError("unterminated section header")
            c = self._next()
            if c not in _CONFIG_SPACE:
                break
        if c != ord('"'):
            raise _ConfigSyntaxError("expected '\"' in section header")
        name.append(ord("."))
        while True:
            c = self._next()
            if c == _LF:
                raise _ConfigSyntaxError("unterminated subsection name")
            if c == ord('"'):
                break
            if c == ord("\\"):
                c = self._next()
                if c == _LF:
                    raise _ConfigSyntaxError("unterminated subsection name")
            name.append(c)
        if self._next() != ord("]"):
            raise _ConfigSyntaxError("expected ']' after subsection name")

    def _key_value(self, name: bytearray) -> bytes | None:
        while True:
            c = self._next()
            if self._eof or not _is_keychar(c):
                break
            name.append(_lower(c))
        while c in b" \t":
            c = self._next()
        if c == _LF:
            return None
        if c != ord("="):
            raise _ConfigSyntaxError("expected '='")
        return self._value()

    def _value(self) -> bytes:
        quote = comment = False
        trim_len = 0
        value = bytearray()
        while True:
            c = self._next()
            if c == _LF:
                if quote:
                    raise _ConfigSyntaxError("unterminated quote")
                if trim_len:
                    del value[trim_len:]
                return bytes(value)
            if comment:
                continue
            if c in _CONFIG_SPACE and not quote:
                # Inner whitespace is kept; trailing whitespace is cut at the end.
                if not trim_len:
                    trim_len = len(value)
                if value:
                    value.append(c)
                continue
            if not quote and c in b";#":
                comment = True
                continue
            trim_len = 0
            if c == ord("\\"):
                c = self._next()
                if c == _LF:
                    continue
                if c in _ESCAPES:
                    c = _ESCAPES[c]
                elif c not in b'\\"':
                    raise _ConfigSyntaxError("bad escape")
                value.append(c)
                continue
            if c == ord('"'):
                quote = not quote
                continue
            value.append(c)


def _cstr(value: bytes) -> bytes:
    # git hands config names and values around as C strings.
    return value.split(b"\0", 1)[0]


def check_gitmodules(oid: ObjectID, raw: bytes, *, max_size: int = MAX_GITMODULES_BYTES) -> None:
    """Raise FsckError if a ``.gitmodules`` blob sets something git refuses to obey.

    Content that does not parse as git config is accepted, as git does
    (``gitmodulesParse`` is only informational), but keys read before the
    bad line are still checked.
    """
    if len(raw) > max_size:
        _report(oid, "gitmodulesLarge", ".gitmodules too large to parse")
    try:
        for var, value in _ConfigReader(raw).items():
            _check_gitmodules_entry(oid, _cstr(var), None if value is None else _cstr(value))
    except _ConfigSyntaxError:
        _report(oid, "gitmodulesParse", "could not parse gitmodules blob")


def _check_gitmodules_entry(oid: bytes, var: bytes, value: bytes | None) -> None:
    if not var.startswith(b"submodule."):
        return
    dot = var.rfind(b".")
    if dot == len(b"submodule"):
        return  # no subsection: not about any one submodule
    name = var[len(b"submodule.") : dot]
    key = var[dot + 1 :]
    if not _submodule_name_ok(name):
        _report(oid, "gitmodulesName", f"disallowed submodule name: {_show(name)}")
    if key == b"url" and value is not None and not _submodule_url_ok(value):
        _report(oid, "gitmodulesUrl", f"disallowed submodule url: {_show(value)}")
    if key == b"path" and value is not None and value.startswith(b"-"):
        _report(oid, "gitmodulesPath", f"disallowed submodule path: {_show(value)}")
    if key == b"update" and value is not None and value.startswith(b"!"):
        _report(oid, "gitmodulesUpdate", f"disallowed submodule update setting: {_show(value)}")


def _submodule_name_ok(name: bytes) -> bool:
    """The name is a path under .git/modules: no "..", and (stricter than git) not absolute."""
    if not name or name[:1] in (b"/", b"\\"):
        return False
    return b".." not in re.split(rb"[/\\]", name)


def _starts_with_dot_slash(url: bytes) -> bool:
    return url[:2] in (b"./", b".\\")


def _starts_with_dot_dot_slash(url: bytes) -> bool:
    return url[:3] in (b"../", b"..\\")


_URL_ESCAPE = re.compile(rb"%([0-9A-Fa-f]{2})")


def _unescape(match: re.Match[bytes]) -> bytes:
    value = int(match[1], 16)
    return bytes([value]) if value else match[0]


def _url_decode(url: bytes) -> bytes:
    """git's url_decode(): undo %XX escapes (but not %00) after the scheme."""
    colon = url.find(b":")
    start = colon if colon > 0 else 0
    return url[:start] + _URL_ESCAPE.sub(_unescape, url[start:])


def _submodule_url_ok(url: bytes) -> bool:
    """git's check_submodule_url(): no option-like URLs, and none that can smuggle a
    newline into a credential helper or climb out of the host part with "../"."""
    if url.startswith(b"-"):
        return False
    if _starts_with_dot_slash(url) or _starts_with_dot_dot_slash(url) or url.startswith(b"git://"):
        if b"\n" in _url_decode(url):
            return False
        rest = url
        climbs = 0
        while True:
            if _starts_with_dot_dot_slash(rest):
                climbs += 1
                rest = rest[3:]
            elif _starts_with_dot_slash(rest):
                rest = rest[2:]
            else:
                break
        return not (climbs > 0 and rest[:1] in (b":", b"/"))
    curl_url = _curl_url(url)
    if curl_url is not None:
        # A newline survives url_normalize() as %0A, so decoding the
        # original finds it just the same.
        return _url_normalizes(curl_url) and b"\n" not in _url_decode(curl_url)
    return True


def _curl_url(url: bytes) -> bytes | None:
    """The URL git-remote-curl would get for *url*, or None if curl would not see it."""
    for helper in (b"http::", b"https::", b"ftp::", b"ftps::"):
        if url.startswith(helper):
            return url[len(helper) :]
    if url.startswith((b"http://", b"https://", b"ftp://", b"ftps://")):
        return url
    return None


_URL_SCHEME = re.compile(rb"[A-Za-z][A-Za-z0-9+.-]*://")
_URL_HOST_CHARS = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789.-_[:]")
_BAD_ESCAPE = re.compile(rb"%(?![0-9A-Fa-f]{2})")


def _url_normalizes(url: bytes) -> bool:
    """Whether git's url_normalize() accepts *url* (it returns NULL for a broken URL)."""
    scheme = _URL_SCHEME.match(url)
    if scheme is None:
        return False
    rest = url[scheme.end() :]
    path_at = len(rest)
    for delimiter in b"/?#":
        found = rest.find(bytes([delimiter]))
        if 0 <= found < path_at:
            path_at = found
    at = rest.find(b"@")
    if 0 <= at < path_at:
        if _BAD_ESCAPE.search(rest, 0, at):
            return False
        rest, path_at = rest[at + 1 :], path_at - at - 1
    authority, tail = rest[:path_at], rest[path_at:]
    if not authority or authority[:1] == b":":
        return False  # a host is required for every scheme curl handles
    host, port = authority, b""
    colon = max(authority.rfind(b":"), authority.rfind(b"]"))
    if colon > 0 and authority[colon] == ord(":"):
        host, port = authority[:colon], authority[colon + 1 :]
    if any(c not in _URL_HOST_CHARS for c in host):
        return False
    if port and not _port_ok(url.lower(), port.lstrip(b"0")):
        return False
    return _url_path_ok(tail)


def _port_ok(url: bytes, digits: bytes) -> bool:
    """An empty ":" is the default port; otherwise 1-65535, leading zeros aside."""
    if (url.startswith(b"http:") and digits == b"80") or (
        url.startswith(b"https:") and digits == b"443"
    ):
        return True
    return digits.isdigit() and len(digits) <= 5 and 1 <= int(digits) <= 65535


def _url_path_ok(tail: bytes) -> bool:
    """Escapes are well formed and no ".." segment climbs above the root."""
    if _BAD_ESCAPE.search(tail):
        return False
    end = len(tail)
    for delimiter in b"?#":
        found = tail.find(bytes([delimiter]))
        if 0 <= found < end:
            end = found
    path = tail[:end]
    if path.startswith(b"/"):
        path = path[1:]
    depth = 0
    for segment in path.split(b"/"):
        segment = re.sub(rb"%2[eE]", b".", segment)
        if segment == b".":
            continue
        if segment == b"..":
            if depth == 0:
                return False
            depth -= 1
        else:
            depth += 1
    return True
