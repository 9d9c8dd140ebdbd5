"""Deterministic, realistic Git repositories for tests and benchmarks, of any size.

``make_repo`` streams a history into ``git fast-import`` as it invents it, so
a repository of thousands of files and commits takes seconds and the stream
is never held in memory.  What it makes looks like a project's history:

- text files of varied sizes (a log-normal number of lines) in nested
  directories, a few executables and a symlink, and a few binaries;
- every commit on ``main`` edits a handful of files, sometimes adds,
  deletes or renames one, so each file has many versions a small delta
  apart (real delta chains once packed);
- ``branches`` feature branches fork from ``main`` with commits of their
  own, and about half are merged back later (merge commits) unless
  ``merges=False`` (a linear ``main``, for tests that count along it);
- ``tags`` tags on ``main``, annotated and lightweight alternately;
- with ``big_blobs_mb``, a last commit on ``main`` adds that many MiB of
  random (incompressible) blobs, written in chunks;
- a final ``git repack -a -d`` leaves one pack with deltas, and
  ``git pack-refs`` packs the refs, as on a served repository.

Names, e-mails and dates are pinned in the stream, so the same arguments
and seed give the same object ids on any machine and git version.

    python -m gitstratum.testing.repogen OUT.git [--files 3000] [--commits 400]
        [--seed 1] [--branches 5] [--tags 10] [--big-blobs-mb 0] [--no-merges]
"""

from __future__ import annotations

import math
import os
import random
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import IO, Any

import attrs
from twisted.python import usage

from gitstratum import cmdline
from gitstratum.cmdline import InterspersedOptions
from gitstratum.testing.fixtures import GIT_ENV, GitCommandError, git

__all__ = ["make_repo", "Options", "main"]

_VOCABULARY = (
    "reactor deferred callback errback protocol factory transport endpoint service "
    "plugin producer consumer object tree commit blob tag ref pack delta shallow "
    "clone fetch push cache ring node quorum replica raft leader follower term "
    "index snapshot bucket stream window offset header checksum buffer queue"
).split()
_PEOPLE = (
    ("Ada Quill", "ada@example.com"),
    ("Bo Lindqvist", "bo@example.com"),
    ("Chidi Okafor", "chidi@example.com"),
    ("Dana Ruiz", "dana@example.com"),
    ("Emeka Obi", "emeka@example.com"),
    ("Fumiko Sato", "fumiko@example.com"),
    ("Greta Holm", "greta@example.com"),
)
_ZONES = ("+0000", "+0100", "-0500", "+0530", "+0900")
_TEXT_KINDS = ("py", "py", "py", "c", "h", "rst", "txt", "json", "md")
_EPOCH = 1_700_000_000
_CHUNK = 1 << 20
#: fast-import and repack never look for deltas of blobs larger than this
_NO_DELTA_ABOVE = "16m"


@attrs.frozen
class _RandomBlob:
    """*size* random bytes from their own seed, produced in chunks when written."""

    size: int
    seed: str

    def chunks(self) -> Iterable[bytes]:
        rng = random.Random(self.seed)
        left = self.size
        while left:
            n = min(left, _CHUNK)
            yield rng.randbytes(n)
            left -= n


#: one change in a commit: (mode, path, content); content None deletes, a str renames from it
_Change = tuple[str, str, "bytes | _RandomBlob | str | None"]


class _FastImportStream:
    """Writes fast-import commands to *sink* as they are made; hands out marks."""

    def __init__(self, sink: IO[bytes]) -> None:
        self._write = sink.write
        self._marks = 0

    def _data(self, content: bytes | _RandomBlob) -> None:
        if isinstance(content, _RandomBlob):
            self._write(b"data %d\n" % content.size)
            for chunk in content.chunks():
                self._write(chunk)
        else:
            self._write(b"data %d\n" % len(content))
            self._write(content)
        self._write(b"\n")

    def commit(
        self,
        ref: str,
        author: tuple[str, str, int, str],
        committer: tuple[str, str, int, str],
        message: str,
        parents: Sequence[int],
        changes: Iterable[_Change],
    ) -> int:
        self._marks += 1
        self._write(b"commit %s\nmark :%d\n" % (ref.encode(), self._marks))
        for role, (name, email, when, zone) in (("author", author), ("committer", committer)):
            self._write(f"{role} {name} <{email}> {when} {zone}\n".encode())
        self._data(message.encode())
        for i, parent in enumerate(parents):
            self._write(b"%s :%d\n" % (b"merge" if i else b"from", parent))
        for mode, path, content in changes:
            if content is None:
                self._write(b"D %s\n" % path.encode())
            elif isinstance(content, str):
                self._write(b'R "%s" "%s"\n' % (content.encode(), path.encode()))
            else:
                self._write(b"M %s inline %s\n" % (mode.encode(), path.encode()))
                self._data(content)
        self._write(b"\n")
        return self._marks

    def annotated_tag(self, name: str, target: int, tagger: tuple[str, str, int, str]) -> None:
        who, email, when, zone = tagger
        self._write(f"tag {name}\nfrom :{target}\ntagger {who} <{email}> {when} {zone}\n".encode())
        self._data(f"Release {name}\n".encode())

    def lightweight_tag(self, name: str, target: int) -> None:
        self._write(b"reset refs/tags/%s\nfrom :%d\n\n" % (name.encode(), target))

    def done(self) -> None:
        self._write(b"done\n")


class _History:
    """Invents the repository's history from one seeded RNG and streams it out."""

    def __init__(self, out: _FastImportStream, seed: int) -> None:
        self.out = out
        self.rng = random.Random(seed)
        self.now = _EPOCH
        # path -> (mode, content); ``order`` keeps the paths in a list for O(1) random picks
        self.tree: dict[str, tuple[str, bytes]] = {}
        self.order: list[str] = []
        self.where: dict[str, int] = {}
        self.dirs: list[str] = []

    # -- contents --

    def words(self, low: int, high: int) -> str:
        return " ".join(self.rng.choice(_VOCABULARY) for _ in range(self.rng.randint(low, high)))

    def text(self, lines: int) -> bytes:
        rng = self.rng
        body = [f"{'    ' * rng.randint(0, 3)}{self.words(2, 12)}" for _ in range(lines)]
        return ("\n".join(body) + "\n").encode()

    def binary(self) -> bytes:
        return self.rng.randbytes(self.rng.randint(2_000, 256_000))

    def edit(self, path: str) -> bytes:
        """A new version of *path* a small delta away from the current one."""
        old = self.tree[path][1]
        rng = self.rng
        if path.endswith(".bin"):
            # a binary asset exported again: one stretch of it changes
            at, n = rng.randrange(len(old)), rng.randint(64, 4096)
            return old[:at] + rng.randbytes(n) + old[at + n :]
        lines = old.split(b"\n")
        for _ in range(rng.randint(1, 6)):
            at = rng.randrange(len(lines))
            roll = rng.random()
            if roll < 0.5:
                lines[at] = self.words(2, 10).encode()
            elif roll < 0.85:
                lines[at:at] = [self.words(2, 10).encode() for _ in range(rng.randint(1, 5))]
            elif len(lines) > 4:
                del lines[at]
        return b"\n".join(lines)

    # -- the tree --

    def put(self, path: str, mode: str, content: bytes) -> _Change:
        if path not in self.tree:
            self.where[path] = len(self.order)
            self.order.append(path)
        self.tree[path] = (mode, content)
        return (mode, path, content)

    def forget(self, path: str) -> None:
        del self.tree[path]
        at = self.where.pop(path)
        last = self.order.pop()
        if last != path:
            self.order[at] = last
            self.where[last] = at

    def new_path(self, tag: str, kind: str | None = None) -> str:
        kind = kind or self.rng.choice(_TEXT_KINDS)
        return f"{self.rng.choice(self.dirs)}/{self.rng.choice(_VOCABULARY)}_{tag}.{kind}"

    # -- people and time --

    def person(self, minutes: tuple[int, int] = (1, 360)) -> tuple[str, str, int, str]:
        self.now += 60 * self.rng.randint(*minutes)
        name, email = self.rng.choice(_PEOPLE)
        return name, email, self.now, self.rng.choice(_ZONES)

    def commit(
        self, ref: str, message: str, parents: Sequence[int], changes: Iterable[_Change]
    ) -> int:
        author = self.person()
        # most commits are committed by their author; some are applied by someone else
        committer = author if self.rng.random() < 0.8 else self.person((0, 30))
        return self.out.commit(ref, author, committer, message, parents, changes)

    def message(self, n: int) -> str:
        subject = f"{self.rng.choice(('Fix', 'Add', 'Tidy', 'Speed up', 'Document'))} {self.words(2, 6)} (#{n})"
        if self.rng.random() < 0.4:
            return f"{subject}\n\n{self.words(8, 30)}\n"
        return subject + "\n"

    # -- the history --

    def initial(self, files: int) -> int:
        rng = self.rng
        for _ in range(max(1, files // 30)):
            depth = rng.randint(1, 3)
            top = rng.choice(("src", "src", "src", "tests", "docs", "tools"))
            self.dirs.append("/".join([top, *(rng.choice(_VOCABULARY) for _ in range(depth))]))
        binaries = set(rng.sample(range(files), min(files, max(1, files // 100))))
        changes = [self.put("README.md", "100644", self.text(40))]
        changes.append(("120000", "README", b"README.md"))
        for i in range(files - 1):
            if i in binaries:
                changes.append(self.put(self.new_path(str(i), "bin"), "100644", self.binary()))
            elif i % 97 == 0:
                script = b"#!/bin/sh\n" + self.text(rng.randint(5, 60))
                changes.append(self.put(f"tools/run_{i}.sh", "100755", script))
            else:
                lines = min(5_000, int(rng.lognormvariate(3.8, 1.1)) + 1)
                changes.append(self.put(self.new_path(str(i)), "100644", self.text(lines)))
        changes.sort(key=lambda change: change[1])
        return self.commit("refs/heads/main", "Initial import\n", [], changes)

    def change(self, n: int) -> list[_Change]:
        rng = self.rng
        changes = []
        # dict, not set: the order must not depend on string hashing
        for path in dict.fromkeys(rng.choice(self.order) for _ in range(rng.randint(1, 8))):
            mode, _ = self.tree[path]
            changes.append(self.put(path, mode, self.edit(path)))
        if rng.random() < 0.25:
            changes.append(
                self.put(self.new_path(f"n{n}"), "100644", self.text(rng.randint(5, 300)))
            )
        touched = {change[1] for change in changes}
        spare = [p for p in (rng.choice(self.order) for _ in range(2)) if p not in touched]
        if spare and len(self.order) > 10:
            roll = rng.random()
            if roll < 0.04:
                self.forget(spare[0])
                changes.append(("", spare[0], None))
            elif roll < 0.06:
                old = spare[0]
                mode, content = self.tree[old]
                new = self.new_path(f"r{n}", old.rsplit(".", 1)[-1])
                if new not in self.tree:
                    self.forget(old)
                    self.put(new, mode, content)
                    changes.append((mode, new, old))
        return changes

    def feature(self, name: str, fork: int) -> tuple[int, list[tuple[str, str, bytes]]]:
        """A branch of 1-3 commits from *fork*: its tip and the files it added."""
        tip, added = fork, []
        for k in range(self.rng.randint(1, 3)):
            change = ("100644", f"features/{name}/part_{k}.md", self.text(self.rng.randint(10, 80)))
            added.append(change)
            tip = self.commit(f"refs/heads/feature/{name}", self.message(k), [tip], [change])
        return tip, added

    def run(
        self,
        files: int,
        commits: int,
        branches: int,
        tags: int,
        big_blobs_mb: int,
        big_blob_mb: int,
        merges_wanted: bool,
    ) -> None:
        rng = self.rng
        forks: dict[int, list[int]] = {}
        for b in range(branches):
            forks.setdefault(rng.randrange(commits), []).append(b)
        tag_points = sorted(rng.randrange(commits) for _ in range(tags))
        merges: dict[int, list[tuple[int, list[tuple[str, str, bytes]]]]] = {}
        main = [self.initial(files)]
        for n in range(commits):
            if n:
                parents, changes = [main[-1]], self.change(n)
                for tip, added in merges.pop(n, []):
                    parents.append(tip)
                    changes.extend(self.put(path, mode, content) for mode, path, content in added)
                main.append(self.commit("refs/heads/main", self.message(n), parents, changes))
            for b in forks.get(n, []):
                name = f"{rng.choice(_VOCABULARY)}-{b}"
                tip, added = self.feature(name, main[n])
                if merges_wanted and n + 1 < commits and rng.random() < 0.5:
                    merges.setdefault(rng.randint(n + 1, commits - 1), []).append((tip, added))
        for i, point in enumerate(tag_points):
            name = f"v1.{i}.0"
            if i % 2:
                self.out.lightweight_tag(name, main[point])
            else:
                self.out.annotated_tag(name, main[point], self.person((0, 10)))
        if big_blobs_mb:
            total, size = big_blobs_mb << 20, big_blob_mb << 20
            assets: list[_Change] = [
                (
                    "100644",
                    f"assets/large_{i}.bin",
                    _RandomBlob(min(size, total - i * size), f"{rng.random()}-{i}"),
                )
                for i in range(math.ceil(total / size))
            ]
            self.commit("refs/heads/main", "Add large assets\n", [main[-1]], assets)
        self.out.done()


def make_repo(
    out: Path,
    *,
    files: int = 3000,
    commits: int = 400,
    seed: int = 1,
    branches: int = 5,
    tags: int = 10,
    big_blobs_mb: int = 0,
    big_blob_mb: int = 64,
    merges: bool = True,
) -> Path:
    """Create the bare repository *out* (default branch ``main``) and return it.

    *files* files in the first commit, *commits* commits on ``main`` in all
    (plus one more holding *big_blobs_mb* MiB of random blobs of at most
    *big_blob_mb* MiB each, when asked), *branches* feature branches
    (``refs/heads/feature/...``; with *merges* about half are merged back,
    otherwise ``main`` is linear) and *tags* tags.  ValueError for an
    impossible shape; GitCommandError when git fails; FileExistsError when
    *out* exists.
    """
    if files < 1 or commits < 1:
        raise ValueError("a repository needs at least one file and one commit")
    if min(branches, tags, big_blobs_mb) < 0 or big_blob_mb < 1:
        raise ValueError("branches, tags and big blob sizes cannot be negative")
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists")
    git("init", "--quiet", "--bare", "--initial-branch=main", str(out))
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env.update(GIT_ENV)
    args = ["git", "fast-import", "--quiet", "--done", f"--big-file-threshold={_NO_DELTA_ABOVE}"]
    with tempfile.TemporaryFile() as errors:
        proc = subprocess.Popen(args, cwd=out, env=env, stdin=subprocess.PIPE, stderr=errors)
        assert proc.stdin is not None
        try:
            with proc.stdin:
                _History(_FastImportStream(proc.stdin), seed).run(
                    files, commits, branches, tags, big_blobs_mb, big_blob_mb, merges
                )
        except BrokenPipeError:
            pass  # fast-import died: its exit status and stderr say why
        if proc.wait():
            errors.seek(0)
            raise GitCommandError(proc.returncode, args, b"", errors.read())
    # fast-import's packs delta each file only against its previous version;
    # a repack searches wider and leaves one pack, as a served repository has
    git(
        "-c",
        f"core.bigFileThreshold={_NO_DELTA_ABOVE}",
        "repack",
        "-a",
        "-d",
        "-q",
        "--window=10",
        "--depth=50",
        cwd=str(out),
    )
    git("pack-refs", "--all", cwd=str(out))
    return out


class Options(InterspersedOptions):
    synopsis = "python -m gitstratum.testing.repogen OUT.git [options]"
    longdesc = "Create a deterministic, realistic bare Git repository at OUT.git."
    optParameters: list[list[Any]] = [
        ["files", None, 3000, "Files in the first commit.", int],
        ["commits", None, 400, "Commits on main, the first importing every file.", int],
        ["seed", None, 1, "Seed: the same seed and sizes give the same object ids.", int],
        ["branches", None, 5, "Feature branches besides main (about half merged back).", int],
        ["tags", None, 10, "Tags on main, annotated and lightweight alternately.", int],
        ["big-blobs-mb", None, 0, "MiB of random blobs added by a last commit on main.", int],
        ["big-blob-mb", None, 64, "Largest single random blob, MiB.", int],
    ]
    optFlags: list[list[Any]] = [["no-merges", None, "Merge no branch back: a linear main."]]

    def parseArgs(self, out: str) -> None:  # type: ignore[override]
        self["out"] = out

    def postOptions(self) -> None:
        if self["files"] < 1 or self["commits"] < 1:
            raise usage.UsageError("--files and --commits must be at least 1")
        for name in ("branches", "tags", "big-blobs-mb"):
            if self[name] < 0:
                raise usage.UsageError(f"--{name} cannot be negative")
        if self["big-blob-mb"] < 1:
            raise usage.UsageError("--big-blob-mb must be at least 1")


def main(argv: Sequence[str] | None = None) -> int:
    options = Options()
    status = cmdline.parse(options, argv, "repogen")
    if status is not None:
        return status
    try:
        make_repo(
            Path(options["out"]),
            files=options["files"],
            commits=options["commits"],
            seed=options["seed"],
            branches=options["branches"],
            tags=options["tags"],
            big_blobs_mb=options["big-blobs-mb"],
            big_blob_mb=options["big-blob-mb"],
            merges=not options["no-merges"],
        )
    except (FileExistsError, GitCommandError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(options["out"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
