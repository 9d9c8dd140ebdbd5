"""Real Git repositories for tests: the git CLI with a fixed identity, a small repository, an importer.

``import_git_repo`` fills the stores straight from a repository on disk, so
upload-pack tests can serve real history without going through a push.
"""

from __future__ import annotations

import os
import random
import subprocess
import zlib
from collections.abc import Iterable, Mapping

from dulwich.repo import Repo

from gitstratum.core.objects import (
    CommitInfo,
    ObjectType,
    PackReadyObject,
    TagInfo,
    parse_commit,
    parse_tag,
)
from gitstratum.core.oid import ObjectID
from gitstratum.storage.interfaces import (
    IMetadataStore,
    IngestBatch,
    IObjectStore,
    RefSnapshot,
    RefUpdate,
    Repository,
)

__all__ = [
    "GIT_ENV",
    "GitCommandError",
    "git",
    "make_small_repo",
    "import_git_repo",
    "generation_numbers",
    "text_blob",
    "edit_blob",
]

#: The environment every ``git`` call runs with: a fixed identity and clock, and
#: no system or user configuration, so repositories are byte-identical anywhere.
GIT_ENV: Mapping[str, str] = {
    "GIT_AUTHOR_NAME": "A U Thor",
    "GIT_AUTHOR_EMAIL": "author@example.com",
    "GIT_AUTHOR_DATE": "1700000000 +0000",
    "GIT_COMMITTER_NAME": "C O Mitter",
    "GIT_COMMITTER_EMAIL": "committer@example.com",
    "GIT_COMMITTER_DATE": "1700000000 +0000",
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_CONFIG_GLOBAL": os.devnull,
    "GIT_TERMINAL_PROMPT": "0",
    "LC_ALL": "C",
    "TZ": "UTC",
}

_BASE_TIME = 1_700_000_000
_BATCH = 1000


class GitCommandError(subprocess.CalledProcessError):
    """A git command failed; unlike its base class, the message carries git's stderr."""

    def __str__(self) -> str:
        stderr = self.stderr.decode("utf-8", "replace").strip() if self.stderr else ""
        return f"{super().__str__()}\n{stderr}" if stderr else super().__str__()


def git(
    *args: str,
    cwd: str | None = None,
    env: dict[str, str] | None = None,
    input: bytes | None = None,
) -> bytes:
    """Run the real git binary and return its stdout; raise GitCommandError on failure.

    Inherited ``GIT_*`` variables are dropped (a test run from inside a git
    hook must not act on the outer repository), then GIT_ENV and *env* apply.
    """
    run_env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    run_env.update(GIT_ENV)
    if env:
        run_env.update(env)
    proc = subprocess.run(
        ["git", *args],
        cwd=cwd,
        env=run_env,
        input=input,
        capture_output=True,
        check=False,
    )
    if proc.returncode != 0:
        raise GitCommandError(proc.returncode, ["git", *args], proc.stdout, proc.stderr)
    return proc.stdout


class _FastImport:
    """Builds a git fast-import stream with explicit marks and dates."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.next_mark = 1

    def data(self, payload: bytes) -> None:
        self.parts.append(b"data %d\n" % len(payload) + payload + b"\n")

    def commit(
        self,
        ref: str,
        when: int,
        message: str,
        parents: Iterable[int],
        changes: Iterable[tuple[str, str, bytes | None]],
    ) -> int:
        mark = self.next_mark
        self.next_mark += 1
        self.parts.append(f"commit {ref}\nmark :{mark}\n".encode())
        self.parts.append(f"author A U Thor <author@example.com> {when} +0000\n".encode())
        self.parts.append(f"committer C O Mitter <committer@example.com> {when} +0000\n".encode())
        self.data(message.encode())
        for i, parent in enumerate(parents):
            self.parts.append(f"{'from' if i == 0 else 'merge'} :{parent}\n".encode())
        for mode, path, content in changes:
            if content is None:
                self.parts.append(f"D {path}\n".encode())
            else:
                self.parts.append(f"M {mode} inline {path}\n".encode())
                self.data(content)
        self.parts.append(b"\n")
        return mark

    def annotated_tag(self, name: str, target: int, when: int, message: str) -> None:
        self.parts.append(f"tag {name}\nfrom :{target}\n".encode())
        self.parts.append(f"tagger T A Gger <tagger@example.com> {when} +0000\n".encode())
        self.data(message.encode())

    def lightweight_tag(self, name: str, target: int) -> None:
        self.parts.append(f"reset refs/tags/{name}\nfrom :{target}\n\n".encode())

    def stream(self) -> bytes:
        return b"".join(self.parts) + b"done\n"


def make_small_repo(
    path: str, *, commits: int = 5, branches: bool = True, tags: bool = True
) -> str:
    """Create a deterministic bare repository at *path* and return *path*.

    ``main`` has *commits* linear commits touching a README, nested
    directories, an executable, a symlink and a binary file (one file is
    deleted along the way).  With *branches*, ``feature`` forks from the
    middle of ``main`` with two commits of its own.  With *tags*, ``v1.0``
    is an annotated tag of ``main``'s tip and ``v0.1`` a lightweight tag of
    its first commit.  HEAD is ``refs/heads/main``.  The same arguments
    always give the same object ids.
    """
    if commits < 1:
        raise ValueError("a small repository needs at least one commit")
    git("init", "--quiet", "--bare", "--initial-branch=main", path)
    fi = _FastImport()
    rng = random.Random(1234)
    readme = b"# small repository\n"
    main_marks: list[int] = []
    for i in range(commits):
        readme += b"line %d\n" % i
        changes: list[tuple[str, str, bytes | None]] = [
            ("100644", "README.md", readme),
            ("100644", f"src/module_{i}.py", b"VALUE = %d\n" % i),
            ("100644", "src/pkg/deep/data.txt", b"data for commit %d\n" % i * (i + 1)),
        ]
        if i == 0:
            changes += [
                ("100755", "bin/run.sh", b"#!/bin/sh\necho run\n"),
                ("120000", "link-to-readme", b"README.md"),
                ("100644", "assets/blob.bin", rng.randbytes(4096)),
            ]
        if i == 3:
            changes.append(("100644", "src/module_0.py", None))
        main_marks.append(
            fi.commit(
                "refs/heads/main",
                _BASE_TIME + 60 * i,
                f"main commit {i}\n",
                main_marks[-1:],
                changes,
            )
        )
    if branches:
        fork = len(main_marks) // 2
        parent = main_marks[fork]
        for j in range(2):
            parent = fi.commit(
                "refs/heads/feature",
                _BASE_TIME + 60 * fork + 30 + 60 * j,
                f"feature commit {j}\n",
                [parent],
                [("100644", f"feature/file_{j}.txt", b"feature %d\n" % j)],
            )
    if tags:
        fi.annotated_tag("v1.0", main_marks[-1], _BASE_TIME + 60 * commits, "release 1.0\n")
        fi.lightweight_tag("v0.1", main_marks[0])
    git("fast-import", "--quiet", "--done", cwd=path, input=fi.stream())
    return path


def text_blob(seed: int, lines: int = 60) -> bytes:
    """Deterministic text of *lines* numbered lines: delta-friendly test data."""
    rng = random.Random(seed)
    return b"".join(
        b"%d %s\n" % (i, bytes(rng.choice(b"abcdefgh") for _ in range(30))) for i in range(lines)
    )


def edit_blob(body: bytes, seed: int) -> bytes:
    """*body* with three of its lines replaced, deterministically (a small delta away)."""
    rng = random.Random(seed)
    lines = body.splitlines(keepends=True)
    for _ in range(3):
        lines[rng.randrange(len(lines))] = b"edited %d\n" % rng.randrange(10**6)
    return b"".join(lines)


def generation_numbers(parents: Mapping[ObjectID, tuple[ObjectID, ...]]) -> dict[ObjectID, int]:
    """Topological levels: a root is 1, any other commit 1 + the largest of its parents.

    Parents absent from *parents* (beyond a shallow boundary) count as 0.
    Iterative, so long histories do not exhaust the recursion limit.
    """
    gen: dict[ObjectID, int] = {}
    for start in parents:
        if start in gen:
            continue
        stack = [start]
        while stack:
            c = stack[-1]
            if c in gen:
                stack.pop()
                continue
            pending = [p for p in parents[c] if p in parents and p not in gen]
            if pending:
                stack.extend(pending)
                continue
            gen[c] = 1 + max((gen.get(p, 0) for p in parents[c]), default=0)
            stack.pop()
    return gen


def import_git_repo(
    git_dir: str, metadata: IMetadataStore, objects: IObjectStore, repo: Repository
) -> RefSnapshot:
    """Copy every object and ref of the repository at *git_dir* into the stores.

    Objects go in as whole records (zlib, depth 0) in batches; membership,
    trees and tags are ingested batch by batch, commits once their
    generation numbers are known.  Refs are then made equal to the
    repository's (a compare-and-swap against the current snapshot, so a
    second import syncs) and HEAD follows the repository's symbolic HEAD.
    """
    source = Repo(git_dir)
    try:
        store = source.object_store
        seen: set[bytes] = set()
        commit_parts: dict[ObjectID, tuple[ObjectID, tuple[ObjectID, ...], int]] = {}
        records: list[PackReadyObject] = []
        members: list[tuple[ObjectID, ObjectType]] = []
        trees: list[tuple[ObjectID, bytes]] = []
        tag_infos: list[TagInfo] = []

        def flush() -> None:
            objects.put_many(records)
            metadata.ingest(repo, IngestBatch(objects=members, trees=trees, tags=tag_infos))
            records.clear()
            members.clear()
            trees.clear()
            tag_infos.clear()

        for sha in store:
            if sha in seen:
                continue
            seen.add(sha)
            oid = ObjectID(sha)
            type_num, raw = store.get_raw(sha)
            obj_type = ObjectType(type_num)
            records.append(
                PackReadyObject(
                    oid=oid,
                    type=obj_type,
                    size=len(raw),
                    data_size=len(raw),
                    compressed=zlib.compress(raw),
                )
            )
            members.append((oid, obj_type))
            if obj_type is ObjectType.COMMIT:
                commit_parts[oid] = parse_commit(raw)
            elif obj_type is ObjectType.TREE:
                trees.append((oid, raw))
            elif obj_type is ObjectType.TAG:
                target, target_type, name = parse_tag(raw)
                tag_infos.append(
                    TagInfo(oid=oid, target=target, target_type=target_type, name=name)
                )
            if len(records) >= _BATCH:
                flush()
        flush()

        generations = generation_numbers({c: parts[1] for c, parts in commit_parts.items()})
        commit_infos = [
            CommitInfo(
                oid=c,
                tree=tree,
                parents=parents,
                generation=generations[c],
                commit_time=commit_time,
            )
            for c, (tree, parents, commit_time) in commit_parts.items()
        ]
        for start in range(0, len(commit_infos), _BATCH):
            metadata.ingest(repo, IngestBatch(commits=commit_infos[start : start + _BATCH]))

        wanted: dict[bytes, ObjectID] = {}
        for name in source.refs.allkeys():
            if not name.startswith(b"refs/"):
                continue
            try:
                wanted[name] = ObjectID(source.refs[name])
            except KeyError:  # a symbolic ref pointing at nothing has no value to serve
                continue
        current = metadata.get_refs(repo).refs
        updates = [
            RefUpdate(name, current.get(name), new)
            for name, new in sorted(wanted.items())
            if current.get(name) != new
        ]
        updates += [
            RefUpdate(name, old, None)
            for name, old in sorted(current.items())
            if name not in wanted
        ]
        if updates:
            metadata.update_refs(repo, updates)
        # Compared by value: older dulwich has no typed HEAD constant to look up with.
        head = next((t for n, t in source.refs.get_symrefs().items() if n == b"HEAD"), None)
        if head is not None and head != metadata.get_refs(repo).head:
            metadata.set_head(repo, head)
        return metadata.get_refs(repo)
    finally:
        source.close()
