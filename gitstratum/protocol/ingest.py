"""The push pipeline after the request is parsed: index, fsck, connectivity, store, graph, refs.

Everything here blocks (it inflates, hashes and walks LMDB) and runs in a
worker thread.  The order is the design's: nothing a reader can see changes
until the compare-and-swap of the refs, the last step, so a push that fails
anywhere before it leaves every ref as it was.
"""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Callable, Iterable
from typing import BinaryIO

import attrs

from gitstratum.core.fsck import FsckError, check_gitmodules, check_object, check_tree
from gitstratum.core.indexer import BaseLookup, IndexedPack, PackError, PackIndexer
from gitstratum.core.limits import Limits
from gitstratum.core.memory import release_free_heap
from gitstratum.core.objects import (
    COMMIT_MODE,
    TREE_MODE,
    CommitInfo,
    ObjectParseError,
    ObjectType,
    TagInfo,
    iter_tree,
    parse_commit,
    parse_tag,
)
from gitstratum.core.oid import ZERO_OID, ObjectID, is_oid
from gitstratum.core.refs import check_ref_format, is_valid_push_ref
from gitstratum.protocol.packgen import BodyCache, CorruptObject, MissingObject, resolve_object
from gitstratum.protocol.receive_pack import Command, PushRequest, RefResult, ReportStatus
from gitstratum.storage.interfaces import (
    IMetadataStore,
    IngestBatch,
    IObjectStore,
    RefUpdate,
    Repository,
)

__all__ = ["PushProcessor", "read_object"]

Progress = Callable[[str], None]

UNPACKER_ERROR = "unpacker error"
MISSING_OBJECTS = "missing necessary objects"
SHALLOW_REFUSED = "shallow update not allowed"
ATOMIC_FAILURE = "atomic push failure"
UPDATE_FAILED = "failed to update ref"
DELETE_FAILED = "failed to delete"
FUNNY_REFNAME = "funny refname"
DELETE_CURRENT = "deletion of the current branch prohibited"


def read_object(
    store: IObjectStore, oid: ObjectID, cache: BodyCache | None = None
) -> tuple[ObjectType, bytes, int] | None:
    """The full body of a stored object, following its delta chain: (type, raw, depth).

    None when the object, or any base along its chain, is not stored (or the
    chain is corrupt).  Chains are resolved by packgen's resolver, with
    *cache* shared across the calls of one push when given.
    """
    record = store.get(oid)
    if record is None:
        return None
    try:
        body = resolve_object(store, record, cache if cache is not None else BodyCache(16 << 20))
    except (MissingObject, CorruptObject):
        return None
    return record.type, body, record.depth


def _shown(ref: bytes) -> str:
    return ref.decode("utf-8", "backslashreplace")


@attrs.define
class _PackContents:
    """What the index pass keeps of the objects that fsck and the graph need.

    Blobs are never held: only commits, trees and tags, whose bodies are
    small next to a pack and are needed again for connectivity and ingest.
    """

    commits: dict[ObjectID, tuple[ObjectID, tuple[ObjectID, ...], int]] = attrs.field(factory=dict)
    trees: dict[ObjectID, bytes] = attrs.field(factory=dict)
    tags: dict[ObjectID, TagInfo] = attrs.field(factory=dict)
    gitmodules: set[ObjectID] = attrs.field(factory=set)
    gitmodules_checked: set[ObjectID] = attrs.field(factory=set)

    def on_object(self, oid: ObjectID, type: ObjectType, raw: bytes) -> None:
        if type == ObjectType.BLOB:
            # Git checks a .gitmodules blob once it knows a pushed tree names it;
            # those seen before their tree are read back in check_gitmodules_left.
            if oid in self.gitmodules:
                check_gitmodules(oid, raw)
                self.gitmodules_checked.add(oid)
            return
        if type == ObjectType.TREE:
            self.gitmodules.update(check_tree(oid, raw))
            self.trees[oid] = raw
            return
        check_object(oid, type, raw)
        if type == ObjectType.COMMIT:
            self.commits[oid] = parse_commit(raw)
        elif type == ObjectType.TAG:
            target, target_type, name = parse_tag(raw)
            self.tags[oid] = TagInfo(oid, target, target_type, name)

    def check_gitmodules_left(self, pack: IndexedPack, stored: BaseLookup) -> None:
        """Check the .gitmodules blobs not seen after their tree: earlier in the pack, or stored.

        A stored blob may have been pushed under another name and never
        checked; one that is nowhere is left to connectivity, as git does.
        """
        for oid in sorted(self.gitmodules - self.gitmodules_checked):
            if oid in pack.objects:
                type, raw = pack.read_object(oid)
            else:
                found = stored(oid)
                if found is None:
                    continue
                type, raw, _ = found
            if type != ObjectType.BLOB:
                raise FsckError(oid, "gitmodulesBlob", "non-blob found at .gitmodules")
            check_gitmodules(oid, raw)


@attrs.define
class _Connectivity:
    """Checks that everything reachable from a new ref value is in the pack or the repository.

    Objects that are members of the repository already are taken as complete
    (every push that made them members was checked the same way), so a walk
    stops at them.  Whatever one successful walk visited is complete too, and
    later walks stop there as well.
    """

    metadata: IMetadataStore
    repo: Repository
    pack_types: dict[ObjectID, ObjectType]
    contents: _PackContents
    shallow: frozenset[ObjectID]
    complete: set[ObjectID] = attrs.field(factory=set)
    members: dict[ObjectID, ObjectType | None] = attrs.field(factory=dict)
    #: for each pack object a walk completed, the walk (command index) that did
    owner: dict[ObjectID, int] = attrs.field(factory=dict)
    #: per command index: the pack objects its walk completed, and the earlier
    #: walks whose objects it reached (its closure is the union of both)
    reached: dict[int, set[ObjectID]] = attrs.field(factory=dict)
    leans_on: dict[int, set[int]] = attrs.field(factory=dict)

    def type_of(self, oid: ObjectID) -> ObjectType | None:
        found = self.pack_types.get(oid)
        return found if found is not None else self.members.get(oid)

    def check(self, new: ObjectID, index: int = 0) -> str | None:
        """None when *new* (the value of command *index*) is connected, else the ``ng`` reason."""
        visited: set[ObjectID] = set()
        leans_on: set[int] = set()
        # (oid, the type its referrer says it has or None, reached from a client-shallow commit)
        stack: list[tuple[ObjectID, ObjectType | None, bool]] = [(new, None, False)]
        outside: dict[ObjectID, tuple[ObjectType | None, bool]] = {}
        while stack or outside:
            while stack:
                oid, expected, from_shallow = stack.pop()
                if oid in self.pack_types:
                    if expected is not None and self.pack_types[oid] != expected:
                        return MISSING_OBJECTS
                    if oid in self.complete:
                        leans_on.add(self.owner[oid])
                    elif oid not in visited:
                        visited.add(oid)
                        stack.extend(self._children(oid))
                elif oid not in visited:
                    seen_type, seen_shallow = outside.get(oid, (None, False))
                    if None not in (seen_type, expected) and seen_type != expected:
                        return MISSING_OBJECTS
                    outside[oid] = (expected or seen_type, from_shallow or seen_shallow)
            if outside:
                reason = self._check_members(outside)
                if reason is not None:
                    return reason
                visited.update(outside)
                outside.clear()
        self.complete |= visited
        ours = visited & self.pack_types.keys()
        for oid in ours:
            self.owner[oid] = index
        self.reached[index] = ours
        self.leans_on[index] = leans_on
        return None

    def closure(self, index: int) -> list[int]:
        """The walks whose objects command *index* reaches: itself and what it leans on, transitively."""
        seen = {index}
        stack = [index]
        while stack:
            for other in self.leans_on.get(stack.pop(), ()):
                if other not in seen:
                    seen.add(other)
                    stack.append(other)
        return sorted(seen)

    def _check_members(self, outside: dict[ObjectID, tuple[ObjectType | None, bool]]) -> str | None:
        unknown = [o for o in outside if o not in self.members]
        if unknown:
            found = self.metadata.object_types(self.repo, unknown)
            for o in unknown:
                self.members[o] = found.get(o)
        missing = False
        for oid, (expected, from_shallow) in outside.items():
            actual = self.members[oid]
            if actual is None or (expected is not None and actual != expected):
                if from_shallow:
                    return SHALLOW_REFUSED
                missing = True
        return MISSING_OBJECTS if missing else None

    def _children(self, oid: ObjectID) -> Iterable[tuple[ObjectID, ObjectType | None, bool]]:
        type = self.pack_types[oid]
        if type == ObjectType.COMMIT:
            tree, parents, _ = self.contents.commits[oid]
            from_shallow = oid in self.shallow
            return [(tree, ObjectType.TREE, False)] + [
                (p, ObjectType.COMMIT, from_shallow) for p in parents
            ]
        if type == ObjectType.TREE:
            return [
                (child, ObjectType.TREE if mode == TREE_MODE else ObjectType.BLOB, False)
                for mode, _, child in iter_tree(self.contents.trees[oid])
                if mode != COMMIT_MODE  # a submodule's commit lives in another repository
            ]
        if type == ObjectType.TAG:
            tag = self.contents.tags[oid]
            return [(tag.target, tag.target_type, False)]
        return ()


@attrs.define
class PushProcessor:
    """Applies one parsed push to a repository and says how each ref fared.

    ``process`` is blocking; call it from a worker thread with the pack
    spooled (bounded by the caller) and positioned at its first byte.
    """

    metadata: IMetadataStore
    objects: IObjectStore
    limits: Limits = attrs.field(factory=Limits)
    #: bytes of pack-ready records handed to the object store per put_many
    batch_bytes: int = 8 << 20
    #: told, from the push's worker thread, of the ref updates that took effect
    #: (pre-warm listens here); it must hand any real work elsewhere and return
    on_refs_updated: Callable[[Repository, tuple[RefUpdate, ...]], None] | None = None

    def process(
        self,
        repo: Repository,
        request: PushRequest,
        pack: BinaryIO | None,
        progress: Progress | None = None,
    ) -> ReportStatus:
        """Run the push and report on it; only a failing store raises.

        Whatever happens, the heap the push used is given back afterwards.
        """
        try:
            return self._process(repo, request, pack, progress)
        finally:
            release_free_heap()

    def _process(
        self,
        repo: Repository,
        request: PushRequest,
        pack: BinaryIO | None,
        progress: Progress | None = None,
    ) -> ReportStatus:
        """The push itself; see ``process``.

        *progress* gets human-readable lines for band 2 (the caller drops
        them when the client asked for ``quiet``).  Errors meant for the
        client's stderr whatever ``quiet`` says are in the report's
        ``messages``.
        """
        say = progress or (lambda _message: None)
        commands = request.commands
        messages: list[str] = []
        reasons = self._validate(repo, commands, messages)
        errors = {i: reason for i, reason in enumerate(reasons) if reason is not None}

        indexed: IndexedPack | None = None
        contents = _PackContents()
        # No pack bytes at all is taken as an empty pack, where git would
        # answer "unpack eof before pack header was fully read": a hand-made
        # request that needs no new objects still gets its per-ref answers,
        # and connectivity still refuses a ref whose objects are not there.
        if request.expects_pack and pack is not None and not _at_end(pack):
            try:
                indexed = self._index(repo, pack, contents)
            except (PackError, FsckError, ObjectParseError) as e:
                return ReportStatus(
                    unpack_error=str(e),
                    results=tuple(RefResult(c.ref, UNPACKER_ERROR) for c in commands),
                )
            deltas = sum(1 for o in indexed.objects.values() if o.delta_base is not None)
            if deltas:
                say(f"Resolving deltas: 100% ({deltas}/{deltas}), done.\n")

        pack_types = {o: e.type for o, e in indexed.objects.items()} if indexed is not None else {}
        walker = _Connectivity(
            self.metadata, repo, pack_types, contents, frozenset(request.shallow)
        )
        for i, command in enumerate(commands):
            if i in errors or command.is_delete:
                continue
            reason = walker.check(command.new, i)
            if reason is None and command.ref.startswith(b"refs/heads/"):
                if walker.type_of(command.new) != ObjectType.COMMIT:
                    messages.append(
                        f"error: trying to write non-commit object {command.new.decode()}"
                        f" to branch '{_shown(command.ref)}'"
                    )
                    reason = UPDATE_FAILED
            if reason is not None:
                errors[i] = reason
        if indexed is not None:
            say(f"Checking connectivity: {len(walker.complete)}, done.\n")

        if request.atomic and errors:
            return self._report(commands, self._atomic_failure(commands, errors), messages)
        if len(errors) == len(commands):
            return self._report(commands, errors, messages)

        if indexed is not None:
            for batch in indexed.iter_pack_ready(self.batch_bytes):
                self.objects.put_many(batch)

        self._apply(repo, request, errors, walker, contents)
        self._default_head(repo, commands, errors)
        if self.on_refs_updated is not None:
            applied = tuple(_ref_update(c) for i, c in enumerate(commands) if i not in errors)
            if applied:
                self.on_refs_updated(repo, applied)
        return self._report(commands, errors, messages)

    # -- steps --------------------------------------------------------------

    def _validate(
        self, repo: Repository, commands: tuple[Command, ...], messages: list[str]
    ) -> list[str | None]:
        """Per command, the reason it cannot be applied whatever the pack holds, or None."""
        counts = Counter(c.ref for c in commands)
        current = self._protected_head(repo, commands)
        reasons: list[str | None] = []
        for command in commands:
            reason = None
            if not (is_oid(command.old) and is_oid(command.new)):
                reason = "malformed object id"
            elif not _pushable(command):
                messages.append(
                    f"error: refusing to update funny ref '{_shown(command.ref)}' remotely"
                )
                reason = FUNNY_REFNAME
            elif len(command.ref) > self.limits.max_ref_bytes:
                messages.append(
                    f"error: refusing to create ref longer than {self.limits.max_ref_bytes} bytes"
                )
                reason = "refname too long"
            elif counts[command.ref] > 1:
                reason = f"multiple updates for ref '{_shown(command.ref)}' not allowed"
            elif command.is_delete and command.ref == current:
                messages.append(f"error: refusing to delete the current branch: {_shown(current)}")
                reason = DELETE_CURRENT
            reasons.append(reason)
        self._check_name_conflicts(repo, commands, reasons, messages)
        return reasons

    def _protected_head(self, repo: Repository, commands: tuple[Command, ...]) -> bytes | None:
        """The branch HEAD points to, when this push deletes it and that is refused (git's
        receive.denyDeleteCurrent), else None."""
        if self.limits.allow_delete_current or not any(c.is_delete for c in commands):
            return None
        return self.metadata.get_refs(repo).head

    def _check_name_conflicts(
        self,
        repo: Repository,
        commands: tuple[Command, ...],
        reasons: list[str | None],
        messages: list[str],
    ) -> None:
        """Refuse a new ref that is a directory or a file of another (git's D/F conflict).

        A client stores refs as files; refs/heads/a and refs/heads/a/b cannot
        both exist there, so git's receive-pack refuses to create the second.
        """
        creating = [i for i, c in enumerate(commands) if reasons[i] is None and not c.is_delete]
        if not creating:
            return
        deleting = {c.ref for i, c in enumerate(commands) if reasons[i] is None and c.is_delete}
        existing = set(self.metadata.get_refs(repo).refs) - deleting
        names = existing | {commands[i].ref for i in creating}
        ordered = sorted(names)
        for i in creating:
            ref = commands[i].ref
            if ref in existing:
                continue
            parts = ref.split(b"/")
            prefixes = (b"/".join(parts[:n]) for n in range(2, len(parts)))
            clash = next((p for p in prefixes if p in names), None)
            if clash is None:
                # Names under ref/ sort right after ref + "/": one bisection finds any.
                at = bisect.bisect_left(ordered, ref + b"/")
                if at < len(ordered) and ordered[at].startswith(ref + b"/"):
                    clash = ordered[at]
            if clash is not None:
                messages.append(
                    f"error: cannot lock ref '{_shown(ref)}': '{_shown(clash)}' exists;"
                    f" cannot create '{_shown(ref)}'"
                )
                reasons[i] = UPDATE_FAILED

    def _index(self, repo: Repository, pack: BinaryIO, contents: _PackContents) -> IndexedPack:
        cache = BodyCache(32 << 20)  # thin bases of one push often share their chains

        def thin_base(oid: ObjectID) -> tuple[ObjectType, bytes, int] | None:
            # Only this repository's objects may complete a thin pack (or be
            # read for fsck): an object pushed elsewhere must not leak in by
            # naming its id.
            if not self.metadata.object_types(repo, [oid]):
                return None
            return read_object(self.objects, oid, cache)

        indexed = PackIndexer(pack, self.limits, thin_base).run(on_object=contents.on_object)
        contents.check_gitmodules_left(indexed, thin_base)
        return indexed

    def _batches(
        self, repo: Repository, walker: _Connectivity, contents: _PackContents
    ) -> dict[int, IngestBatch]:
        """Per successful walk, the membership and graph records of the pack objects it completed.

        A pack object no walk reached is stored but never made a member:
        membership promises a complete closure, and nothing checked it.
        """
        new = set().union(*walker.reached.values()) if walker.reached else set()
        commits = self._commit_infos(repo, [o for o in new if o in contents.commits], contents)
        by_oid = {c.oid: c for c in commits}
        batches = {}
        for index, reached in walker.reached.items():
            ordered = sorted(reached)
            batches[index] = IngestBatch(
                objects=[(o, walker.pack_types[o]) for o in ordered],
                commits=[by_oid[o] for o in ordered if o in by_oid],
                trees=[(o, contents.trees[o]) for o in ordered if o in contents.trees],
                tags=[contents.tags[o] for o in ordered if o in contents.tags],
            )
        return batches

    def _commit_infos(
        self, repo: Repository, oids: list[ObjectID], contents: _PackContents
    ) -> list[CommitInfo]:
        """Generation numbers: 1 + the largest of the parents' (roots are 1), as git's commit-graph."""
        ours = set(oids)
        outside = {p for o in oids for p in contents.commits[o][1] if p not in ours}
        generation = {o: c.generation for o, c in self.metadata.get_commits(repo, outside).items()}
        for start in sorted(oids):
            # Post-order over pushed parents with an explicit stack: histories
            # are far deeper than Python's recursion limit.
            stack = [start]
            while stack:
                oid = stack[-1]
                if oid in generation:
                    stack.pop()
                    continue
                parents = contents.commits[oid][1]
                pending = [p for p in parents if p in ours and p not in generation]
                if pending:
                    stack.extend(pending)
                    continue
                stack.pop()
                generation[oid] = 1 + max((generation.get(p, 0) for p in parents), default=0)
        infos = []
        for oid in sorted(oids):
            tree, parents, commit_time = contents.commits[oid]
            infos.append(CommitInfo(oid, tree, parents, generation[oid], commit_time))
        return infos

    def _apply(
        self,
        repo: Repository,
        request: PushRequest,
        errors: dict[int, str],
        walker: _Connectivity,
        contents: _PackContents,
    ) -> None:
        """Compare-and-swap the refs, recording with each the objects it makes reachable.

        One store transaction: an update that loses its compare-and-swap takes
        none of its objects with it, so a refused push leaves nothing
        fetchable behind.
        """
        commands = request.commands
        todo = [i for i in range(len(commands)) if i not in errors]
        batches = self._batches(repo, walker, contents)
        order = sorted(batches)
        position = {index: n for n, index in enumerate(order)}
        needs = [
            []
            if commands[i].is_delete
            else [position[w] for w in walker.closure(i) if w in position]
            for i in todo
        ]
        stale = self.metadata.apply_push(
            repo,
            [_ref_update(commands[i]) for i in todo],
            [batches[index] for index in order],
            needs,
            request.atomic,
        )
        for i in todo:
            if commands[i].ref in stale:
                errors[i] = _stale_reason(commands[i])
        if request.atomic and stale:
            errors.update(self._atomic_failure(commands, errors))

    def _default_head(
        self, repo: Repository, commands: tuple[Command, ...], errors: dict[int, str]
    ) -> None:
        """Give an empty repository's HEAD the branch its first push created, as GitHub does."""
        created = [
            c.ref
            for i, c in enumerate(commands)
            if i not in errors and c.is_create and c.ref.startswith(b"refs/heads/")
        ]
        if not created:
            return
        snapshot = self.metadata.get_refs(repo)
        if snapshot.head in snapshot.refs:
            return
        for preferred in (b"refs/heads/main", b"refs/heads/master"):
            if preferred in snapshot.refs:
                self.metadata.set_head(repo, preferred)
                return
        first = next((ref for ref in created if ref in snapshot.refs), None)
        if first is not None:
            self.metadata.set_head(repo, first)

    @staticmethod
    def _atomic_failure(commands: tuple[Command, ...], errors: dict[int, str]) -> dict[int, str]:
        return {i: errors.get(i, ATOMIC_FAILURE) for i in range(len(commands))}

    @staticmethod
    def _report(
        commands: tuple[Command, ...], errors: dict[int, str], messages: list[str]
    ) -> ReportStatus:
        return ReportStatus(
            unpack_error=None,
            results=tuple(RefResult(c.ref, errors.get(i)) for i, c in enumerate(commands)),
            messages=tuple(messages),
        )


def _at_end(pack: BinaryIO) -> bool:
    here = pack.tell()
    end = pack.seek(0, 2)
    pack.seek(here)
    return here == end


def _pushable(command: Command) -> bool:
    # receive-pack lets a client delete a one-level ref (refs/foo) it may not create.
    if command.is_delete:
        return command.ref.startswith(b"refs/") and check_ref_format(
            command.ref[5:], allow_onelevel=True
        )
    return is_valid_push_ref(command.ref)


def _ref_update(command: Command) -> RefUpdate:
    return RefUpdate(
        command.ref,
        None if command.old == ZERO_OID else command.old,
        None if command.is_delete else command.new,
    )


def _stale_reason(command: Command) -> str:
    return DELETE_FAILED if command.is_delete else UPDATE_FAILED
