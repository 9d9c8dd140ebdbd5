"""The object model: types, pack-ready records and parsed summaries, parsed with dulwich."""

from __future__ import annotations

import enum
from collections.abc import Iterator

import attrs
from dulwich.objects import Commit, Tag, parse_tree

from gitstratum.core.oid import ObjectID, oid

__all__ = [
    "ObjectType",
    "OFS_DELTA",
    "REF_DELTA",
    "PackReadyObject",
    "CommitInfo",
    "TagInfo",
    "ObjectParseError",
    "parse_commit",
    "parse_tag",
    "iter_tree",
    "TREE_MODE",
    "COMMIT_MODE",
]

OFS_DELTA = 6
REF_DELTA = 7

TREE_MODE = 0o040000
COMMIT_MODE = 0o160000  # a gitlink (submodule) entry


class ObjectType(enum.IntEnum):
    """Git's object types, numbered as in a pack entry header."""

    COMMIT = 1
    TREE = 2
    BLOB = 3
    TAG = 4

    @property
    def type_name(self) -> bytes:
        return self.name.lower().encode("ascii")

    @classmethod
    def from_name(cls, name: bytes) -> ObjectType:
        try:
            return cls[name.decode("ascii").upper()]
        except (KeyError, UnicodeDecodeError):
            raise ObjectParseError(f"unknown object type {name[:20]!r}") from None


class ObjectParseError(ValueError):
    """An object's bytes do not parse as the type they claim to be."""


@attrs.frozen
class PackReadyObject:
    """One object stored exactly as it goes into a pack.

    ``compressed`` is the zlib stream of the entry payload: the whole object
    when ``delta_base`` is None, else the delta instructions against
    ``delta_base``.  ``data_size`` is the inflated length of that payload (what
    the pack entry header carries); ``size`` is the inflated size of the object
    itself.  ``depth`` is the delta chain length (0 for a whole object).
    """

    oid: ObjectID
    type: ObjectType
    size: int
    data_size: int
    compressed: bytes
    delta_base: ObjectID | None = None
    depth: int = 0

    @property
    def is_delta(self) -> bool:
        return self.delta_base is not None


@attrs.frozen
class CommitInfo:
    """A commit-graph node: what negotiation and shallow cuts need, nothing more."""

    oid: ObjectID
    tree: ObjectID
    parents: tuple[ObjectID, ...]
    generation: int
    commit_time: int


@attrs.frozen
class TagInfo:
    """An annotated tag: what peeling and include-tag need."""

    oid: ObjectID
    target: ObjectID
    target_type: ObjectType
    name: bytes


def parse_commit(raw: bytes) -> tuple[ObjectID, tuple[ObjectID, ...], int]:
    """Return (tree, parents, commit_time) of a raw commit body."""
    try:
        c = Commit.from_raw_string(Commit.type_num, raw)
        assert isinstance(c, Commit)
        return oid(c.tree), tuple(oid(p) for p in c.parents), int(c.commit_time)
    except Exception as e:  # dulwich raises many types for malformed input
        raise ObjectParseError(f"bad commit: {e}") from e


def parse_tag(raw: bytes) -> tuple[ObjectID, ObjectType, bytes]:
    """Return (target, target type, tag name) of a raw tag body."""
    try:
        t = Tag.from_raw_string(Tag.type_num, raw)
        assert isinstance(t, Tag)
        target_cls, target = t.object
        return oid(target), ObjectType(target_cls.type_num), t.name
    except Exception as e:
        raise ObjectParseError(f"bad tag: {e}") from e


def iter_tree(raw: bytes) -> Iterator[tuple[int, bytes, ObjectID]]:
    """Yield (mode, name, oid) for each entry of a raw tree body."""
    try:
        entries = parse_tree(raw, 20)
    except Exception as e:
        raise ObjectParseError(f"bad tree: {e}") from e
    for name, mode, sha in entries:
        yield mode, name, ObjectID(sha)
