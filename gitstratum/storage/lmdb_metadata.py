"""The local metadata store: repositories, refs, commit graph, trees, users and grants in LMDB.

Everything that belongs to a repository is keyed by its id (8 bytes,
big-endian) followed by the record's own key, so one prefix walk finds (and
deletes) all of it, and a batch of sorted object ids is read in key order.
Ids come from a counter and are never reused, so a stale ``Repository``
value can never see records of a later repository with the same name.
"""

from __future__ import annotations

import base64
import json
import struct
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import attrs
import lmdb
import snappy
from zope.interface import implementer

from gitstratum.core.objects import CommitInfo, ObjectType, TagInfo
from gitstratum.core.oid import ObjectID, from_bin, to_bin
from gitstratum.lmdbutil import MAX_KEY_SIZE, delete_prefix, iter_prefix, open_env
from gitstratum.storage.interfaces import (
    IMetadataStore,
    IngestBatch,
    KeyExists,
    Permission,
    RefConflict,
    RefSnapshot,
    RefUpdate,
    Repository,
    RepositoryExists,
    RepositoryNotFound,
    SSHKey,
    User,
    UserExists,
    UserNotFound,
)

__all__ = ["LMDBMetadataStore"]

_ID = struct.Struct(">Q")
_STATE = struct.Struct(">Q")  # ref version, then HEAD's target
_COMMIT = struct.Struct(">20sQq")  # tree, generation, commit time, then parents
_TAG = struct.Struct(">20sB")  # target, target type, then the tag name
_NEXT_REPO_ID = b"next_repo_id"

_DB_NAMES = (
    b"meta",  # counters
    b"repos",  # name -> JSON {"id", "public"}
    b"state",  # id -> version + HEAD
    b"refs",  # id + ref name -> binary oid
    b"commits",  # id + binary oid -> _COMMIT + parents
    b"trees",  # id + binary oid -> snappy(raw tree)
    b"tags",  # id + binary oid -> _TAG + name
    b"members",  # id + binary oid -> type byte
    b"users",  # name -> JSON {"admin"}
    b"tokens",  # token hash -> user name
    b"keys",  # fingerprint -> JSON {"user", "blob", "comment"}
    b"user_keys",  # user NUL fingerprint -> b""
    b"perms",  # user NUL repo -> level byte
    b"repo_perms",  # repo NUL user -> b"" (so a deleted repository drops its grants)
)


def _name_key(kind: str, name: str) -> bytes:
    # NUL separates the parts of composite keys, so it may not occur in names.
    if not name or "\0" in name:
        raise ValueError(f"invalid {kind} name {name!r}")
    key = name.encode("utf-8")
    if len(key) > MAX_KEY_SIZE // 2:
        raise ValueError(f"{kind} name too long: {name[:60]!r}")
    return key


def _json(record: dict[str, Any]) -> bytes:
    return json.dumps(record, separators=(",", ":"), sort_keys=True).encode("utf-8")


def _encode_commit(c: CommitInfo) -> bytes:
    return _COMMIT.pack(to_bin(c.tree), c.generation, c.commit_time) + b"".join(
        to_bin(p) for p in c.parents
    )


def _decode_commit(oid: ObjectID, value: bytes) -> CommitInfo:
    tree, generation, commit_time = _COMMIT.unpack_from(value)
    rest = value[_COMMIT.size :]
    parents = tuple(from_bin(rest[i : i + 20]) for i in range(0, len(rest), 20))
    return CommitInfo(
        oid=oid,
        tree=from_bin(tree),
        parents=parents,
        generation=generation,
        commit_time=commit_time,
    )


def _encode_tag(t: TagInfo) -> bytes:
    return _TAG.pack(to_bin(t.target), t.target_type) + t.name


def _decode_tag(oid: ObjectID, value: bytes) -> TagInfo:
    target, target_type = _TAG.unpack_from(value)
    return TagInfo(
        oid=oid,
        target=from_bin(target),
        target_type=ObjectType(target_type),
        name=value[_TAG.size :],
    )


@implementer(IMetadataStore)
@attrs.define(eq=False)
class LMDBMetadataStore:
    """IMetadataStore over one LMDB environment in directory ``path``.

    Each call is one transaction, so the store may be used from many
    threads at once.  Bulk reads (``get_commits`` and friends) sort their
    keys and read them with one cursor in one read transaction.
    """

    path: str
    map_size: int = attrs.field(default=1 << 36, kw_only=True)
    _env: lmdb.Environment = attrs.field(init=False)
    _dbs: dict[bytes, lmdb._Database] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._env = open_env(self.path, map_size=self.map_size, max_dbs=len(_DB_NAMES) + 2)
        self._dbs = {name: self._env.open_db(name) for name in _DB_NAMES}

    def close(self) -> None:
        """Release the environment; the store is unusable afterwards."""
        self._env.close()

    # -- helpers ------------------------------------------------------------

    def _db(self, name: bytes) -> lmdb._Database:
        return self._dbs[name]

    def _read(self) -> lmdb.Transaction[bytes]:
        return self._env.begin()

    def _write(self) -> lmdb.Transaction[bytes]:
        return self._env.begin(write=True)

    def _repository(self, txn: lmdb.Transaction[bytes], name: str, key: bytes) -> Repository | None:
        raw = txn.get(key, db=self._db(b"repos"))
        if raw is None:
            return None
        record = json.loads(raw)
        state = txn.get(_ID.pack(record["id"]), db=self._db(b"state"))
        assert state is not None, f"repository {name} has no state record"
        return Repository(
            id=record["id"],
            name=name,
            public=record["public"],
            head=bytes(state[_STATE.size :]),
        )

    def _state(self, txn: lmdb.Transaction[bytes], repo: Repository) -> tuple[int, bytes]:
        state = txn.get(_ID.pack(repo.id), db=self._db(b"state"))
        if state is None:
            raise RepositoryNotFound(f"repository '{repo.name}' not found")
        (version,) = _STATE.unpack_from(state)
        return version, bytes(state[_STATE.size :])

    def _put_state(
        self, txn: lmdb.Transaction[bytes], repo: Repository, version: int, head: bytes
    ) -> None:
        txn.put(_ID.pack(repo.id), _STATE.pack(version) + head, db=self._db(b"state"))

    def _snapshot(self, txn: lmdb.Transaction[bytes], repo: Repository) -> RefSnapshot:
        version, head = self._state(txn, repo)
        prefix = _ID.pack(repo.id)
        refs = {
            key[len(prefix) :]: from_bin(value)
            for key, value in iter_prefix(txn, self._db(b"refs"), prefix)
        }
        return RefSnapshot(refs=refs, head=head, version=version)

    def _user(self, txn: lmdb.Transaction[bytes], name: str) -> User | None:
        raw = txn.get(name.encode("utf-8"), db=self._db(b"users"))
        if raw is None:
            return None
        return User(name=name, is_admin=json.loads(raw)["admin"])

    def _lookup(
        self, repo: Repository, db_name: bytes, oids: Iterable[ObjectID]
    ) -> Iterator[tuple[ObjectID, bytes]]:
        prefix = _ID.pack(repo.id)
        keys = sorted({prefix + to_bin(o) for o in oids})
        with self._read() as txn:
            cursor = txn.cursor(self._db(db_name))
            for key, value in cursor.getmulti(keys):
                yield from_bin(bytes(key[len(prefix) :])), bytes(value)

    # -- repositories -------------------------------------------------------

    def create_repository(
        self, name: str, public: bool = False, head: bytes = b"refs/heads/main"
    ) -> Repository:
        key = _name_key("repository", name)
        with self._write() as txn:
            if txn.get(key, db=self._db(b"repos")) is not None:
                raise RepositoryExists(f"repository '{name}' already exists")
            raw_next = txn.get(_NEXT_REPO_ID, db=self._db(b"meta"))
            repo_id = 1 if raw_next is None else _ID.unpack(raw_next)[0]
            txn.put(_NEXT_REPO_ID, _ID.pack(repo_id + 1), db=self._db(b"meta"))
            txn.put(key, _json({"id": repo_id, "public": bool(public)}), db=self._db(b"repos"))
            repo = Repository(id=repo_id, name=name, public=bool(public), head=head)
            self._put_state(txn, repo, 0, head)
            return repo

    def get_repository(self, name: str) -> Repository | None:
        if not name or "\0" in name:
            return None
        with self._read() as txn:
            return self._repository(txn, name, name.encode("utf-8"))

    def list_repositories(self) -> list[Repository]:
        # UTF-8 byte order is code point order, so key order is sorted by name.
        with self._read() as txn:
            out = []
            for key in txn.cursor(self._db(b"repos")).iternext(values=False):
                name = bytes(key).decode("utf-8")
                repo = self._repository(txn, name, bytes(key))
                assert repo is not None
                out.append(repo)
            return out

    def delete_repository(self, name: str) -> None:
        with self._write() as txn:
            repo = None if "\0" in name or not name else self._repository(txn, name, name.encode())
            if repo is None:
                raise RepositoryNotFound(f"repository '{name}' not found")
            key = name.encode("utf-8")
            prefix = _ID.pack(repo.id)
            txn.delete(key, db=self._db(b"repos"))
            txn.delete(prefix, db=self._db(b"state"))
            for db_name in (b"refs", b"commits", b"trees", b"tags", b"members"):
                delete_prefix(txn, self._db(db_name), prefix)
            grant_prefix = key + b"\0"
            users = [
                k[len(grant_prefix) :]
                for k, _ in iter_prefix(txn, self._db(b"repo_perms"), grant_prefix)
            ]
            for user in users:
                txn.delete(user + b"\0" + key, db=self._db(b"perms"))
            delete_prefix(txn, self._db(b"repo_perms"), grant_prefix)

    def set_public(self, name: str, public: bool) -> Repository:
        with self._write() as txn:
            repo = None if "\0" in name or not name else self._repository(txn, name, name.encode())
            if repo is None:
                raise RepositoryNotFound(f"repository '{name}' not found")
            txn.put(
                name.encode("utf-8"),
                _json({"id": repo.id, "public": bool(public)}),
                db=self._db(b"repos"),
            )
            return attrs.evolve(repo, public=bool(public))

    # -- refs ---------------------------------------------------------------

    def get_refs(self, repo: Repository) -> RefSnapshot:
        with self._read() as txn:
            return self._snapshot(txn, repo)

    def update_refs(self, repo: Repository, updates: Sequence[RefUpdate]) -> RefSnapshot:
        names = [u.name for u in updates]
        if len(set(names)) != len(names):
            dupes = sorted({n for n in names if names.count(n) > 1})
            raise ValueError(
                "duplicate ref update for " + ", ".join(d.decode("utf-8", "replace") for d in dupes)
            )
        prefix = _ID.pack(repo.id)
        for name in names:
            if not name or len(prefix) + len(name) > MAX_KEY_SIZE:
                raise ValueError(f"invalid ref name {name[:80]!r}")
        refs_db = self._db(b"refs")
        with self._write() as txn:
            version, head = self._state(txn, repo)
            if not updates:
                return self._snapshot(txn, repo)
            stale = []
            for u in updates:
                current = txn.get(prefix + u.name, db=refs_db)
                expected = None if u.old is None else to_bin(u.old)
                if (None if current is None else bytes(current)) != expected:
                    stale.append(u.name)
            if stale:
                raise RefConflict(stale)
            for u in updates:
                if u.new is None:
                    txn.delete(prefix + u.name, db=refs_db)
                else:
                    txn.put(prefix + u.name, to_bin(u.new), db=refs_db)
            self._put_state(txn, repo, version + 1, head)
            return self._snapshot(txn, repo)

    def set_head(self, repo: Repository, target: bytes) -> None:
        # The version is bumped because a snapshot includes HEAD, and callers
        # key cached advertisements on it.
        with self._write() as txn:
            version, _ = self._state(txn, repo)
            self._put_state(txn, repo, version + 1, target)

    # -- graph, trees, tags, membership -------------------------------------

    def ingest(self, repo: Repository, batch: IngestBatch) -> None:
        with self._write() as txn:
            self._state(txn, repo)
            self._ingest(txn, repo, batch)

    def _ingest(self, txn: lmdb.Transaction, repo: Repository, batch: IngestBatch) -> None:
        prefix = _ID.pack(repo.id)
        members = sorted((prefix + to_bin(o), bytes((int(t),))) for o, t in batch.objects)
        commits = sorted((prefix + to_bin(c.oid), _encode_commit(c)) for c in batch.commits)
        tags = sorted((prefix + to_bin(t.oid), _encode_tag(t)) for t in batch.tags)
        tree_keys = sorted({prefix + to_bin(o): body for o, body in batch.trees}.items())
        for db_name, items in ((b"members", members), (b"commits", commits), (b"tags", tags)):
            txn.cursor(self._db(db_name)).putmulti(items, overwrite=False)
        trees = txn.cursor(self._db(b"trees"))
        for key, body in tree_keys:
            # Compress only what is new: a re-pushed tree costs one lookup.
            if not trees.set_key(key):
                trees.put(key, snappy.compress(body), overwrite=False)

    def apply_push(
        self,
        repo: Repository,
        updates: Sequence[RefUpdate],
        batches: Sequence[IngestBatch],
        needs: Sequence[Sequence[int]],
        atomic: bool,
    ) -> set[bytes]:
        if len(needs) != len(updates):
            raise ValueError("apply_push needs one list of batch indexes per update")
        names = [u.name for u in updates]
        if len(set(names)) != len(names):
            raise ValueError("duplicate ref update in one push")
        prefix = _ID.pack(repo.id)
        for name in names:
            if not name or len(prefix) + len(name) > MAX_KEY_SIZE:
                raise ValueError(f"invalid ref name {name[:80]!r}")
        refs_db = self._db(b"refs")
        with self._write() as txn:
            version, head = self._state(txn, repo)
            stale = set()
            for u in updates:
                current = txn.get(prefix + u.name, db=refs_db)
                expected = None if u.old is None else to_bin(u.old)
                if (None if current is None else bytes(current)) != expected:
                    stale.add(u.name)
            if atomic and stale:
                return stale
            applied: set[int] = set()
            for u, need in zip(updates, needs, strict=True):
                if u.name in stale:
                    continue
                for index in need:
                    if index not in applied:
                        applied.add(index)
                        self._ingest(txn, repo, batches[index])
                if u.new is None:
                    txn.delete(prefix + u.name, db=refs_db)
                else:
                    txn.put(prefix + u.name, to_bin(u.new), db=refs_db)
            if len(stale) < len(updates):
                self._put_state(txn, repo, version + 1, head)
            return stale

    def get_commits(self, repo: Repository, oids: Iterable[ObjectID]) -> dict[ObjectID, CommitInfo]:
        return {o: _decode_commit(o, v) for o, v in self._lookup(repo, b"commits", oids)}

    def get_trees(self, repo: Repository, oids: Iterable[ObjectID]) -> dict[ObjectID, bytes]:
        return {o: snappy.decompress(v) for o, v in self._lookup(repo, b"trees", oids)}

    def get_tags(self, repo: Repository, oids: Iterable[ObjectID]) -> dict[ObjectID, TagInfo]:
        return {o: _decode_tag(o, v) for o, v in self._lookup(repo, b"tags", oids)}

    def object_types(
        self, repo: Repository, oids: Iterable[ObjectID]
    ) -> dict[ObjectID, ObjectType]:
        return {o: ObjectType(v[0]) for o, v in self._lookup(repo, b"members", oids)}

    # -- users, tokens, keys, permissions -----------------------------------

    def create_user(self, name: str, is_admin: bool = False) -> User:
        key = _name_key("user", name)
        with self._write() as txn:
            if not txn.put(
                key, _json({"admin": bool(is_admin)}), overwrite=False, db=self._db(b"users")
            ):
                raise UserExists(f"user '{name}' already exists")
        return User(name=name, is_admin=bool(is_admin))

    def get_user(self, name: str) -> User | None:
        if not name or "\0" in name:
            return None
        with self._read() as txn:
            return self._user(txn, name)

    def list_users(self) -> list[User]:
        with self._read() as txn:
            return [
                User(name=bytes(k).decode("utf-8"), is_admin=json.loads(v)["admin"])
                for k, v in txn.cursor(self._db(b"users"))
            ]

    def add_token(self, user: str, token_hash: bytes) -> None:
        if not token_hash or len(token_hash) > MAX_KEY_SIZE:
            raise ValueError("token hash must be 1 to 511 bytes")
        with self._write() as txn:
            if self._user_or_none(txn, user) is None:
                raise UserNotFound(f"user '{user}' not found")
            txn.put(token_hash, user.encode("utf-8"), db=self._db(b"tokens"))

    def user_for_token(self, token_hash: bytes) -> User | None:
        if not token_hash or len(token_hash) > MAX_KEY_SIZE:
            return None
        with self._read() as txn:
            name = txn.get(token_hash, db=self._db(b"tokens"))
            return None if name is None else self._user(txn, bytes(name).decode("utf-8"))

    def add_ssh_key(self, key: SSHKey) -> None:
        fp = _name_key("key fingerprint", key.fingerprint)
        with self._write() as txn:
            if self._user_or_none(txn, key.user) is None:
                raise UserNotFound(f"user '{key.user}' not found")
            record = _json(
                {
                    "user": key.user,
                    "blob": base64.b64encode(key.blob).decode("ascii"),
                    "comment": key.comment,
                }
            )
            if not txn.put(fp, record, overwrite=False, db=self._db(b"keys")):
                raise KeyExists(f"key {key.fingerprint} is already in use")
            txn.put(key.user.encode("utf-8") + b"\0" + fp, b"", db=self._db(b"user_keys"))

    def list_ssh_keys(self, user: str) -> list[SSHKey]:
        if not user or "\0" in user:
            return []
        prefix = user.encode("utf-8") + b"\0"
        with self._read() as txn:
            out = []
            for index_key, _ in iter_prefix(txn, self._db(b"user_keys"), prefix):
                raw = txn.get(index_key[len(prefix) :], db=self._db(b"keys"))
                assert raw is not None, "ssh key index out of step with keys"
                out.append(self._ssh_key(index_key[len(prefix) :], raw))
            return out

    def remove_ssh_key(self, user: str, fingerprint: str) -> bool:
        if not user or "\0" in user or not fingerprint or "\0" in fingerprint:
            return False
        fp = fingerprint.encode("utf-8")
        with self._write() as txn:
            raw = txn.get(fp, db=self._db(b"keys"))
            if raw is None or json.loads(raw)["user"] != user:
                return False
            txn.delete(fp, db=self._db(b"keys"))
            txn.delete(user.encode("utf-8") + b"\0" + fp, db=self._db(b"user_keys"))
            return True

    def user_for_ssh_key(self, fingerprint: str) -> User | None:
        if not fingerprint or "\0" in fingerprint:
            return None
        with self._read() as txn:
            raw = txn.get(fingerprint.encode("utf-8"), db=self._db(b"keys"))
            return None if raw is None else self._user(txn, json.loads(raw)["user"])

    def grant(self, user: str, repo: str, permission: Permission | None) -> None:
        user_key = _name_key("user", user)
        repo_key = _name_key("repository", repo)
        with self._write() as txn:
            if permission is None:
                txn.delete(user_key + b"\0" + repo_key, db=self._db(b"perms"))
                txn.delete(repo_key + b"\0" + user_key, db=self._db(b"repo_perms"))
                return
            if self._user_or_none(txn, user) is None:
                raise UserNotFound(f"user '{user}' not found")
            if txn.get(repo_key, db=self._db(b"repos")) is None:
                raise RepositoryNotFound(f"repository '{repo}' not found")
            level = bytes((int(Permission(permission)),))
            txn.put(user_key + b"\0" + repo_key, level, db=self._db(b"perms"))
            txn.put(repo_key + b"\0" + user_key, b"", db=self._db(b"repo_perms"))

    def get_permission(self, user: str, repo: str) -> Permission | None:
        if not user or "\0" in user or not repo or "\0" in repo:
            return None
        key = user.encode("utf-8") + b"\0" + repo.encode("utf-8")
        with self._read() as txn:
            raw = txn.get(key, db=self._db(b"perms"))
            return None if raw is None else Permission(raw[0])

    def _user_or_none(self, txn: lmdb.Transaction[bytes], name: str) -> User | None:
        if not name or "\0" in name:
            return None
        return self._user(txn, name)

    @staticmethod
    def _ssh_key(fingerprint: bytes, raw: bytes) -> SSHKey:
        record = json.loads(raw)
        return SSHKey(
            user=record["user"],
            fingerprint=fingerprint.decode("utf-8"),
            blob=base64.b64decode(record["blob"]),
            comment=record["comment"],
        )
