"""The storage seams every tier goes through.

Both interfaces are *blocking*: a call returns its result or raises.  The
local LMDB implementations answer point reads in microseconds; anything that
walks or writes many records is called from the reactor's thread pool (see
``gitstratum.frontend.threads``), never inline on the reactor thread.  A
cluster implementation over AMP satisfies the same contract from a worker
thread with ``blockingCallFromThread``, and runs the same conformance suites
in ``gitstratum.testing``.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Sequence

import attrs
from zope.interface import Attribute, Interface

from gitstratum.core.objects import CommitInfo, ObjectType, PackReadyObject, TagInfo
from gitstratum.core.oid import ObjectID

__all__ = [
    "IObjectStore",
    "IMetadataStore",
    "Repository",
    "RefSnapshot",
    "RefUpdate",
    "IngestBatch",
    "ObjectStat",
    "Permission",
    "User",
    "SSHKey",
    "StorageError",
    "RepositoryExists",
    "RepositoryNotFound",
    "UserExists",
    "UserNotFound",
    "KeyExists",
    "RefConflict",
]


class StorageError(Exception):
    """Base class of storage-level failures that callers map to user errors."""


class RepositoryExists(StorageError):
    pass


class RepositoryNotFound(StorageError):
    pass


class UserExists(StorageError):
    pass


class UserNotFound(StorageError):
    pass


class KeyExists(StorageError):
    pass


class RefConflict(StorageError):
    """A compare-and-swap found refs whose current value is not the expected one.

    ``refs`` names every ref of the batch whose old value did not match.
    """

    def __init__(self, refs: Sequence[bytes]):
        super().__init__(
            "stale old value for " + ", ".join(r.decode("utf-8", "replace") for r in refs)
        )
        self.refs = tuple(refs)


class Permission(enum.IntEnum):
    """Access levels, ordered so that ``>=`` means "at least"."""

    READ = 1
    WRITE = 2
    ADMIN = 3

    @classmethod
    def parse(cls, text: str) -> Permission:
        try:
            return cls[text.upper()]
        except KeyError:
            raise ValueError(f"unknown permission {text!r}: use read, write or admin") from None


@attrs.frozen
class Repository:
    """A repository record.  ``name`` is ``OWNER/NAME`` without ``.git``."""

    id: int
    name: str
    public: bool = False
    head: bytes = b"refs/heads/main"  # HEAD's symref target


@attrs.frozen
class RefSnapshot:
    """The refs of one repository at one version (every CAS bumps ``version``)."""

    refs: Mapping[bytes, ObjectID]
    head: bytes
    version: int

    def head_oid(self) -> ObjectID | None:
        return self.refs.get(self.head)


@attrs.frozen
class RefUpdate:
    """One compare-and-swap: ``old`` None means "must not exist", ``new`` None means delete."""

    name: bytes
    old: ObjectID | None
    new: ObjectID | None


@attrs.frozen
class IngestBatch:
    """What a push adds to a repository's metadata, written in one transaction.

    ``objects`` records membership (which objects this repository holds, so an
    object pushed only elsewhere is never served here); ``trees`` are raw tree
    bodies; ``commits`` carry generation numbers computed by the caller.
    """

    objects: Sequence[tuple[ObjectID, ObjectType]] = ()
    commits: Sequence[CommitInfo] = ()
    trees: Sequence[tuple[ObjectID, bytes]] = ()
    tags: Sequence[TagInfo] = ()


@attrs.frozen
class ObjectStat:
    """What a stored record costs to send, read without copying its bytes."""

    type: ObjectType
    size: int  # the inflated object
    stored_bytes: int  # the compressed payload as stored
    delta_base: ObjectID | None = None


@attrs.frozen
class User:
    name: str
    is_admin: bool = False


@attrs.frozen
class SSHKey:
    """A public key: ``fingerprint`` is OpenSSH's ``SHA256:...`` form of ``blob``."""

    user: str
    fingerprint: str
    blob: bytes
    comment: str = ""


class IObjectStore(Interface):
    """Content-addressed Git objects, each kept pack-ready (see PackReadyObject)."""

    def contains(oids: Iterable[ObjectID]) -> set[ObjectID]:
        """Return the subset of *oids* that are stored."""

    def get(oid: ObjectID) -> PackReadyObject | None:
        """Return the stored record, or None."""

    def get_many(oids: Iterable[ObjectID]) -> dict[ObjectID, PackReadyObject]:
        """Return the records that exist among *oids* (missing ones are absent)."""

    def stat_many(oids: Iterable[ObjectID]) -> dict[ObjectID, ObjectStat]:
        """Type, sizes and delta base of the stored records among *oids*, without their bytes.

        Pack assembly uses it to fetch records in batches bounded in bytes,
        and ``blob:limit`` filtering to learn blob sizes.
        """

    def put_many(objects: Iterable[PackReadyObject]) -> int:
        """Store records durably; an id already stored keeps its first record.

        Returns how many were newly written.
        """

    def delete_many(oids: Iterable[ObjectID]) -> int:
        """Remove records (used by garbage collection and tests); returns how many."""


class IMetadataStore(Interface):
    """Repositories, refs, commit graph, trees, users, tokens, keys and permissions."""

    # -- repositories -------------------------------------------------------
    def create_repository(
        name: str, public: bool = False, head: bytes = b"refs/heads/main"
    ) -> Repository:
        """Create a repository; raise RepositoryExists."""

    def get_repository(name: str) -> Repository | None:
        """Return the repository called *name* (``OWNER/NAME``), or None."""

    def list_repositories() -> list[Repository]:
        """Every repository, sorted by name."""

    def delete_repository(name: str) -> None:
        """Delete a repository and all of its refs, graph, trees and grants; raise RepositoryNotFound."""

    def set_public(name: str, public: bool) -> Repository:
        """Change visibility; raise RepositoryNotFound."""

    # -- refs ---------------------------------------------------------------
    def get_refs(repo: Repository) -> RefSnapshot:
        """A consistent snapshot of every ref and HEAD."""

    def update_refs(repo: Repository, updates: Sequence[RefUpdate]) -> RefSnapshot:
        """Apply every update or none (one atomic compare-and-swap).

        Raise RefConflict naming every ref whose current value differs from
        its ``old``.  Returns the snapshot after the update.
        """

    def apply_push(
        repo: Repository,
        updates: Sequence[RefUpdate],
        batches: Sequence[IngestBatch],
        needs: Sequence[Sequence[int]],
        atomic: bool,
    ) -> set[bytes]:
        """Apply a push's ref updates, and the records they make reachable, in one transaction.

        ``needs[i]`` lists the indexes of the *batches* that update *i* makes
        reachable.  Each update whose old value matches is applied together
        with the batches it needs; a batch no applied update needs is never
        recorded, so objects of a refused update never become members.  With
        *atomic*, one stale update refuses them all.  Returns the names of
        the refused (stale) updates; the version is bumped once if anything
        changed.
        """

    def set_head(repo: Repository, target: bytes) -> None:
        """Point HEAD at *target* (a full ref name; it may be unborn)."""

    # -- graph, trees, tags, membership -------------------------------------
    def ingest(repo: Repository, batch: IngestBatch) -> None:
        """Record membership, commits, trees and tags in one transaction (idempotent)."""

    def get_commits(repo: Repository, oids: Iterable[ObjectID]) -> dict[ObjectID, CommitInfo]:
        """Commit-graph nodes of this repository among *oids*."""

    def get_trees(repo: Repository, oids: Iterable[ObjectID]) -> dict[ObjectID, bytes]:
        """Raw tree bodies of this repository among *oids*."""

    def get_tags(repo: Repository, oids: Iterable[ObjectID]) -> dict[ObjectID, TagInfo]:
        """Annotated tags of this repository among *oids*."""

    def object_types(repo: Repository, oids: Iterable[ObjectID]) -> dict[ObjectID, ObjectType]:
        """Membership: the types of those *oids* that this repository holds."""

    # -- users, tokens, keys, permissions -----------------------------------
    def create_user(name: str, is_admin: bool = False) -> User:
        """Create a user; raise UserExists."""

    def get_user(name: str) -> User | None:
        """Return the user, or None."""

    def list_users() -> list[User]:
        """Every user, sorted by name."""

    def add_token(user: str, token_hash: bytes) -> None:
        """Remember a token by its hash (never the token); raise UserNotFound."""

    def user_for_token(token_hash: bytes) -> User | None:
        """The owner of the token with this hash, or None."""

    def add_ssh_key(key: SSHKey) -> None:
        """Register a public key; raise UserNotFound or KeyExists."""

    def list_ssh_keys(user: str) -> list[SSHKey]:
        """The user's keys."""

    def remove_ssh_key(user: str, fingerprint: str) -> bool:
        """Forget a key; return whether it existed."""

    def user_for_ssh_key(fingerprint: str) -> User | None:
        """The owner of the key with this fingerprint, or None."""

    def grant(user: str, repo: str, permission: Permission | None) -> None:
        """Set (or with None, revoke) a user's permission on a repository."""

    def get_permission(user: str, repo: str) -> Permission | None:
        """The user's explicit permission on the repository, or None."""

    path = Attribute("The on-disk directory of this store, or None for remote stores.")
