"""Upload-pack's graph work on real repositories imported into the LMDB stores.

The expectations come from the real git binary run on the same history
(``git rev-list --objects`` with the same wants, exclusions and filters).
"""

from __future__ import annotations

import os

import attrs
import pytest

from gitstratum.core.limits import Limits
from gitstratum.core.objects import ObjectType, iter_tree
from gitstratum.core.oid import ObjectID
from gitstratum.core.pktline import DELIM_PKT, FLUSH_PKT, pkt_lines
from gitstratum.protocol.upload_pack import (
    INFINITE_DEPTH,
    FetchRequest,
    FilterKind,
    ObjectFilter,
    UploadPackError,
    parse_v2_request,
)
from gitstratum.protocol.walker import (
    Negotiator,
    RepoView,
    ShallowPlan,
    check_wants,
    compute_shallow,
    enumerate_objects,
    ref_peels,
    resolve_want_refs,
)
from gitstratum.storage.interfaces import RefUpdate
from gitstratum.storage.lmdb_metadata import LMDBMetadataStore
from gitstratum.storage.lmdb_objects import LMDBObjectStore
from gitstratum.testing.fixtures import git, import_git_repo

T0 = 1_700_000_000


def _text(args) -> list[str]:
    return [a.decode() if isinstance(a, bytes) else a for a in args]


def _write(work: str, files: dict[str, bytes | None]) -> None:
    for path, content in files.items():
        full = os.path.join(work, path)
        if content is None:
            os.unlink(full)
            continue
        os.makedirs(os.path.dirname(full), exist_ok=True)
        with open(full, "wb") as f:
            f.write(content)


def commit(
    work: str, n: int, files: dict[str, bytes | None], *, merge: str | None = None
) -> ObjectID:
    """Commit *files* at time T0 + 1000 * n; with *merge*, merge that branch first (no fast-forward)."""
    env = {
        "GIT_AUTHOR_DATE": f"{T0 + 1000 * n} +0000",
        "GIT_COMMITTER_DATE": f"{T0 + 1000 * n} +0000",
    }
    if merge:
        git("merge", "-q", "--no-ff", "--no-commit", merge, cwd=work, env=env)
    _write(work, files)
    git("add", "-A", cwd=work)
    git("commit", "-q", "--allow-empty", "-m", f"commit {n}", cwd=work, env=env)
    return ObjectID(git("rev-parse", "HEAD", cwd=work).strip())


@attrs.frozen
class History:
    """main: c1..c10 with a merge of feature (f1, f2 forked at c4) at c7; tags v1 (c3), v2 (c10), vv (tag of v1), lt (light, c5)."""

    work: str
    c: dict[int, ObjectID]
    f1: ObjectID
    f2: ObjectID
    tags: dict[str, ObjectID]

    def rev_list(self, *args: str | bytes) -> set[ObjectID]:
        out = git("rev-list", "--objects", *_text(args), "--", cwd=self.work)
        return {ObjectID(line[:40]) for line in out.splitlines()}

    def tree_objects(self, rev: str | bytes) -> set[ObjectID]:
        """A commit's root tree and every tree and blob under it."""
        rev = rev.decode() if isinstance(rev, bytes) else rev
        out = git("ls-tree", "-r", "-t", rev, cwd=self.work)
        root = git("rev-parse", rev + "^{tree}", cwd=self.work).strip()
        return {ObjectID(line.split()[2]) for line in out.splitlines()} | {ObjectID(root)}


def build_history(work: str) -> History:
    git("init", "-q", "--initial-branch=main", work)
    c: dict[int, ObjectID] = {}
    big = bytes(range(256)) * 12  # 3072 bytes
    c[1] = commit(work, 1, {"README": b"hello\n", "src/a/x.txt": b"x1\n", "src/b/y.txt": b"y1\n"})
    c[2] = commit(work, 2, {"big.bin": big, "src/a/x.txt": b"x2\n"})
    c[3] = commit(work, 3, {"src/b/y.txt": b"y3\n", "docs/guide/intro.md": b"intro\n"})
    c[4] = commit(work, 4, {"src/a/x.txt": b"x4\n"})
    git("branch", "feature", cwd=work)
    c[5] = commit(work, 5, {"src/a/deep/er/z.txt": b"z5\n"})
    c[6] = commit(work, 6, {"README": b"hello again\n"})
    git("checkout", "-q", "feature", cwd=work)
    f1 = commit(work, 51, {"feature/one.txt": b"one\n"})
    f2 = commit(work, 52, {"feature/two.txt": b"two\n", "src/b/y.txt": b"y-feature\n"})
    git("checkout", "-q", "main", cwd=work)
    c[7] = commit(work, 70, {}, merge="feature")
    c[8] = commit(work, 80, {"src/a/x.txt": b"x8\n", "big.bin": big + b"more"})
    c[9] = commit(work, 90, {"docs/guide/intro.md": None})
    c[10] = commit(work, 100, {"src/b/y.txt": b"y10\n"})
    env = {"GIT_COMMITTER_DATE": f"{T0 + 200_000} +0000"}
    git("tag", "-a", "-m", "one", "v1", c[3].decode(), cwd=work, env=env)
    git("tag", "-a", "-m", "two", "v2", c[10].decode(), cwd=work, env=env)
    git("tag", "-a", "-m", "tag of a tag", "vv", "v1", cwd=work, env=env)
    git("tag", "lt", c[5].decode(), cwd=work)
    tags = {
        name: ObjectID(git("rev-parse", f"refs/tags/{name}", cwd=work).strip())
        for name in ("v1", "v2", "vv", "lt")
    }
    return History(work, c, f1, f2, tags)


@attrs.frozen
class World:
    """One pair of LMDB stores holding two repositories: "o/a" (the history) and "o/b" (a's clone plus one commit)."""

    metadata: LMDBMetadataStore
    objects: LMDBObjectStore
    h: History
    only_in_b: ObjectID

    def view(self, name: str = "o/a") -> RepoView:
        repo = self.metadata.get_repository(name)
        assert repo is not None
        return RepoView.open(self.metadata, repo)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    base = tmp_path_factory.mktemp("walker")
    h = build_history(str(base / "a"))
    metadata = LMDBMetadataStore(str(base / "metadata"))
    objects = LMDBObjectStore(str(base / "objects"))
    import_git_repo(
        os.path.join(h.work, ".git"), metadata, objects, metadata.create_repository("o/a")
    )
    b = str(base / "b")
    git("clone", "-q", h.work, b)
    only_in_b = commit(b, 500, {"secret.txt": b"only in b\n"})
    import_git_repo(os.path.join(b, ".git"), metadata, objects, metadata.create_repository("o/b"))
    yield World(metadata, objects, h, only_in_b)
    metadata.close()
    objects.close()


def enumerate_(world: World, wants, haves=(), **kw):
    return enumerate_objects(
        world.view(), world.objects, wants=list(wants), haves=list(haves), **kw
    )


def fetch_request(*args: str | bytes) -> FetchRequest:
    body = pkt_lines("command=fetch\n") + DELIM_PKT + pkt_lines(*args) + FLUSH_PKT
    req = parse_v2_request(body, Limits())
    assert isinstance(req, FetchRequest)
    return req


# -- ref views, peeling, want validation -----------------------------------------


def test_ref_peels_follow_tag_chains(world):
    """Each annotated tag a ref names peels to its final commit, through a tag of a tag too."""
    h = world.h
    assert ref_peels(world.view()) == {
        h.tags["v1"]: h.c[3],
        h.tags["v2"]: h.c[10],
        h.tags["vv"]: h.c[3],
    }
    chain = world.view().peel([h.tags["vv"], h.c[3]])
    assert list(chain) == [h.tags["vv"]]
    assert chain[h.tags["vv"]].chain == (h.tags["vv"], h.tags["v1"])
    assert chain[h.tags["vv"]].type is ObjectType.COMMIT


def test_wants_tips_and_reachable_commits_are_ours(world):
    """Ref tips, commits reachable from them, and member trees and blobs may all be wanted."""
    h = world.h
    blob = ObjectID(git("rev-parse", f"{h.c[2].decode()}:big.bin", cwd=h.work).strip())
    tree = ObjectID(git("rev-parse", f"{h.f1.decode()}^{{tree}}", cwd=h.work).strip())
    check_wants(world.view(), [h.c[10], h.tags["v1"], h.c[1], h.f1, blob, tree])


def test_want_from_another_repository_is_not_our_ref(world):
    """A commit stored for another repository of the same stores is refused with git's words."""
    with pytest.raises(UploadPackError) as e:
        check_wants(world.view(), [world.h.c[10], world.only_in_b])
    assert str(e.value) == f"upload-pack: not our ref {world.only_in_b.decode()}"
    check_wants(world.view("o/b"), [world.only_in_b, world.h.c[3]])


def test_want_of_unknown_object_is_not_our_ref(world):
    """An id nobody stored is not our ref either."""
    with pytest.raises(UploadPackError, match="not our ref 0123456789"):
        check_wants(world.view(), [ObjectID(b"0123456789" * 4)])


def test_want_unreachable_from_every_ref_is_refused(world, tmp_path):
    """A member commit that no ref reaches any more (its branch was deleted) is not our ref."""
    h = world.h
    repo = world.metadata.create_repository("o/dangling")
    snapshot = import_git_repo(os.path.join(h.work, ".git"), world.metadata, world.objects, repo)
    world.metadata.update_refs(
        repo,
        [
            RefUpdate(b"refs/heads/main", snapshot.refs[b"refs/heads/main"], h.c[6]),
            RefUpdate(b"refs/tags/v2", snapshot.refs[b"refs/tags/v2"], None),
        ],
    )
    view = RepoView.open(world.metadata, repo)
    check_wants(view, [h.c[6], h.c[2], h.f2])
    with pytest.raises(UploadPackError, match=f"not our ref {h.c[8].decode()}"):
        check_wants(view, [h.c[2], h.c[8]])


def test_unreachable_trees_blobs_and_tags_are_refused(world):
    """Trees, blobs and tags of a deleted branch or tag are members but not our ref; history is ours."""
    h = world.h
    repo = world.metadata.create_repository("o/pruned")
    snapshot = import_git_repo(os.path.join(h.work, ".git"), world.metadata, world.objects, repo)
    world.metadata.update_refs(
        repo,
        [
            RefUpdate(b"refs/heads/main", snapshot.refs[b"refs/heads/main"], h.c[6]),
            RefUpdate(b"refs/tags/v2", snapshot.refs[b"refs/tags/v2"], None),
        ],
    )

    def rev(spec: str) -> ObjectID:
        return ObjectID(git("rev-parse", spec, cwd=h.work).strip())

    view = RepoView.open(world.metadata, repo)
    # still reachable: an old blob, an old root tree, a blob only on the feature branch
    check_wants(view, [rev(f"{h.c[1].decode()}:src/a/x.txt"), rev(f"{h.c[2].decode()}^{{tree}}")])
    check_wants(view, [rev(f"{h.f2.decode()}:feature/two.txt"), h.tags["vv"], h.tags["v1"]])
    for gone in (
        rev(f"{h.c[8].decode()}:src/a/x.txt"),
        rev(f"{h.c[10].decode()}^{{tree}}"),
        h.tags["v2"],
    ):
        with pytest.raises(UploadPackError, match=f"not our ref {gone.decode()}"):
            check_wants(RepoView.open(world.metadata, repo), [gone])


def test_resolve_want_refs(world):
    """want-ref names resolve through the snapshot; an unknown name is "unknown ref"."""
    h = world.h
    snapshot = world.view().snapshot
    assert resolve_want_refs(snapshot, [b"refs/heads/feature", b"refs/tags/v1"]) == [
        (b"refs/heads/feature", h.f2),
        (b"refs/tags/v1", h.tags["v1"]),
    ]
    with pytest.raises(UploadPackError, match="unknown ref refs/heads/nope"):
        resolve_want_refs(snapshot, [b"refs/heads/nope"])


# -- negotiation ----------------------------------------------------------------


def test_negotiator_records_haves_like_git(world):
    """A have we lack is -1, a new common one 1, a parent of an earlier have 0 (git's do_got_oid)."""
    h = world.h
    n = Negotiator(world.view(), [h.c[10]])
    n.prefetch([h.c[6], h.c[5], world.only_in_b])
    assert n.got_oid(world.only_in_b) == -1
    assert n.got_oid(h.c[6]) == 1
    assert n.got_oid(h.c[5]) == 0  # c5 is c6's parent: already known
    assert n.got_oid(h.c[6]) == 0
    assert n.have_objs == [h.c[6]]


def test_negotiator_ready_when_every_want_reaches_a_have(world):
    """ok_to_give_up holds once each want reaches something the client has, and not before."""
    h = world.h
    n = Negotiator(world.view(), [h.c[10], h.f2])
    assert not n.ok_to_give_up()  # no haves yet
    n.got_oid(h.c[9])
    assert not n.ok_to_give_up()  # f2 cannot reach c9
    assert not n.ok_to_give_up()  # asked again, same answer from the cache
    n.got_oid(h.c[3])
    assert n.ok_to_give_up()


def test_negotiator_resumes_its_walk(world):
    """A have arriving after a failed check is found among commits the earlier walk already met."""
    h = world.h
    n = Negotiator(world.view(), [h.f2])
    n.got_oid(h.c[9])
    assert not n.ok_to_give_up()  # f1 is older than c9, so the walk stopped there
    n.got_oid(h.f1)
    assert n.ok_to_give_up()


def test_negotiator_tag_want_is_peeled(world):
    """A want of an annotated tag counts as its commit when deciding readiness."""
    h = world.h
    n = Negotiator(world.view(), [h.tags["vv"]])
    n.got_oid(h.c[2])
    assert n.ok_to_give_up()


# -- enumeration ---------------------------------------------------------------


def assert_traversal_order(world: World, objects: tuple[ObjectID, ...], roots=()) -> None:
    """Commits first (newest first), then tags, then trees and blobs, each after a tree naming it.

    Only a sent commit's root tree (or one of *roots*, the explicitly wanted) may come unannounced.
    """
    view = world.view()
    types = view.types(objects)
    kinds = [types[o] for o in objects]
    n_commits = kinds.count(ObjectType.COMMIT)
    n_tags = kinds.count(ObjectType.TAG)
    assert kinds[:n_commits] == [ObjectType.COMMIT] * n_commits
    assert kinds[n_commits : n_commits + n_tags] == [ObjectType.TAG] * n_tags
    commits = view.commits(objects[:n_commits])
    gens = [commits[o].generation for o in objects[:n_commits]]
    assert gens == sorted(gens, reverse=True)
    announced = {info.tree for info in commits.values()} | set(roots)
    rest = objects[n_commits + n_tags :]
    bodies = view.trees([o for o in rest if types[o] is ObjectType.TREE])
    for oid in rest:
        assert oid in announced, oid
        if oid in bodies:
            announced.update(entry for _, _, entry in iter_tree(bodies[oid]))


def test_full_clone_matches_rev_list(world):
    """A clone of main and feature sends exactly what ``git rev-list --objects`` lists, in order."""
    h = world.h
    found = enumerate_(world, [h.c[10], h.f2])
    assert set(found.objects) == h.rev_list("main", "refs/heads/feature")
    assert len(found.objects) == len(set(found.objects))
    assert found.objects[0] == h.c[10]
    assert_traversal_order(world, found.objects)
    assert found.client_has == frozenset()


def test_incremental_fetch_sends_only_what_is_new(world):
    """With c6 as a have only objects missing from c6 go out; c6's trees are the thin-pack bases."""
    h = world.h
    found = enumerate_(world, [h.c[10]], [h.c[6]])
    assert set(found.objects) == h.rev_list("main", "--not", h.c[6])
    assert h.tree_objects(h.c[6]) <= found.client_has
    assert not set(found.objects) & h.tree_objects(h.c[6])
    assert_traversal_order(world, found.objects)


def test_fetch_with_merge_edges(world):
    """Fetching the merge from both parents' bases sends only the merge's new objects."""
    h = world.h
    found = enumerate_(world, [h.c[7]], [h.c[6], h.f2])
    assert set(found.objects) == h.rev_list(h.c[7], "--not", h.c[6], h.f2)
    assert [o for o in found.objects if o in h.c.values()] == [h.c[7]]


def test_fetch_of_what_the_client_has_is_empty(world):
    """Wanting only commits the client already has sends nothing."""
    h = world.h
    assert enumerate_(world, [h.c[5]], [h.c[10]]).objects == ()


@pytest.mark.parametrize(
    "spec", ["blob:none", "blob:limit=1000", "blob:limit=3072", "blob:limit=0", "tree:0"]
)
def test_filters_match_rev_list(world, spec):
    """Partial-clone filters select what ``git rev-list --filter`` does."""
    h = world.h
    found = enumerate_(world, [h.c[10]], [h.c[3]], filter=ObjectFilter.parse(spec.encode()))
    assert set(found.objects) == h.rev_list(f"--filter={spec}", "main", "--not", h.c[3])
    assert_traversal_order(world, found.objects)


def test_explicit_tree_and_blob_wants_survive_filters(world):
    """Trees and blobs the client names are sent whatever the filter (git's provided objects)."""
    h = world.h
    blob = ObjectID(git("rev-parse", f"{h.c[8].decode()}:big.bin", cwd=h.work).strip())
    tree = ObjectID(git("rev-parse", f"{h.c[3].decode()}:src", cwd=h.work).strip())
    found = enumerate_(world, [tree, blob], filter=ObjectFilter(FilterKind.BLOB_LIMIT, 10))
    assert set(found.objects) == h.rev_list("--filter=blob:limit=10", tree) | {blob}
    assert_traversal_order(world, found.objects, roots=(tree, blob))
    found = enumerate_(world, [tree], filter=ObjectFilter(FilterKind.TREE_DEPTH))
    assert found.objects == (tree,)
    found = enumerate_(world, [tree])
    assert set(found.objects) == h.rev_list(tree)


def test_tag_wants_are_peeled(world):
    """Wanting an annotated tag (even a tag of a tag) sends the tags and the history they name."""
    h = world.h
    found = enumerate_(world, [h.tags["vv"]])
    assert set(found.objects) == h.rev_list("vv")
    commits_end = found.objects.index(h.tags["vv"])
    assert set(found.objects[commits_end : commits_end + 2]) == {h.tags["vv"], h.tags["v1"]}
    assert_traversal_order(world, found.objects)


def test_include_tag_adds_tags_of_sent_commits(world):
    """include-tag adds every annotated tag (and tag chain) whose target goes out, and only those."""
    h = world.h
    tags = {h.tags["v1"], h.tags["v2"], h.tags["vv"]}
    plain = enumerate_(world, [h.c[10]])
    assert not set(plain.objects) & tags
    full = enumerate_(world, [h.c[10]], include_tag=True)
    assert set(full.objects) - set(plain.objects) == tags
    assert_traversal_order(world, full.objects)
    partial = enumerate_(world, [h.c[10]], [h.c[6]], include_tag=True)
    assert set(partial.objects) & tags == {h.tags["v2"]}  # c3 is not sent, so neither is v1 nor vv


# -- shallow ---------------------------------------------------------------------


def plan(world: World, *lines: str | bytes, wants=None) -> ShallowPlan:
    req = fetch_request(*lines)
    return compute_shallow(world.view(), req, list(wants if wants is not None else req.wants))


def test_depth_one_clone(world):
    """deepen 1: the wanted commit is the boundary and only its tree goes out."""
    h = world.h
    shallow = plan(world, f"want {h.c[10].decode()}\n", "deepen 1\n")
    assert shallow == ShallowPlan(shallow=(h.c[10],), cut=frozenset({h.c[10]}))
    found = enumerate_(world, [h.c[10]], shallow=shallow)
    assert set(found.objects) == h.rev_list("--max-count=1", "main")
    assert found.objects[0] == h.c[10]


def test_depth_through_a_merge(world):
    """deepen 3 from c8 cuts at the commits three generations down on both sides of the merge."""
    h = world.h
    shallow = plan(world, f"want {h.c[8].decode()}\n", "deepen 3\n")
    assert set(shallow.shallow) == {h.c[6], h.f2}
    found = enumerate_(world, [h.c[8]], shallow=shallow)
    sent = [h.c[8], h.c[7], h.f2, h.c[6]]  # f2 and c6 share a generation; f2 is newer
    assert [o for o in found.objects if o in set(h.c.values()) | {h.f1, h.f2}] == sent
    assert set(found.objects) == set(sent).union(*(h.tree_objects(c) for c in sent))


def test_depth_ignores_non_commit_wants(world):
    """Depth counts from commits (tags peeled); a wanted blob does not start a walk."""
    h = world.h
    blob = ObjectID(git("rev-parse", f"{h.c[2].decode()}:big.bin", cwd=h.work).strip())
    shallow = plan(world, "deepen 1\n", wants=[blob, h.tags["v1"]])
    assert shallow.shallow == (h.c[3],)


def test_deepen_since(world):
    """deepen-since keeps commits from that time on; those with an older parent are the boundary."""
    h = world.h
    since = T0 + 1000 * 80
    shallow = plan(world, f"want {h.c[10].decode()}\n", f"deepen-since {since}\n")
    selected = {
        ObjectID(x) for x in git("rev-list", f"--max-age={since}", "main", cwd=h.work).split()
    }
    assert selected == {h.c[8], h.c[9], h.c[10]}
    assert shallow.shallow == (h.c[8],)


def test_deepen_not(world):
    """deepen-not excludes what a ref reaches (named short, like the client sends it)."""
    h = world.h
    shallow = plan(world, f"want {h.c[10].decode()}\n", "deepen-not feature\n")
    selected = {
        ObjectID(x)
        for x in git("rev-list", "main", "--not", "refs/heads/feature", cwd=h.work).split()
    }
    boundary = {
        c
        for c in selected
        if set(git("rev-list", "--parents", "-n1", c, cwd=h.work).split()[1:]) - selected
    }
    assert set(shallow.shallow) == boundary == {h.c[5], h.c[7]}


def test_deepen_not_must_name_one_ref(world):
    """deepen-not of a name no ref (or more than one) matches is git's "ambiguous deepen-not"."""
    h = world.h
    with pytest.raises(UploadPackError, match="ambiguous deepen-not: deepen-not nosuch"):
        plan(world, f"want {h.c[10].decode()}\n", "deepen-not nosuch\n")


def test_deepen_selecting_nothing_is_an_error(world):
    """A cut that leaves no commit is refused as git does."""
    h = world.h
    with pytest.raises(UploadPackError) as e:
        plan(world, f"want {h.c[10].decode()}\n", f"deepen-since {T0 + 10_000_000}\n")
    assert str(e.value) == "no commits selected for shallow requests"
    with pytest.raises(UploadPackError, match="no commits selected"):
        plan(world, f"want {h.c[4].decode()}\n", "deepen-not main\n")


def test_shallow_lines_from_the_client(world):
    """The client's shallow commits are kept (unknown ones ignored); a non-commit is refused."""
    h = world.h
    unknown = ObjectID(b"1" * 40)
    shallow = plan(world, f"shallow {h.c[8].decode()}\n", f"shallow {unknown.decode()}\n")
    assert shallow == ShallowPlan(client=(h.c[8],), cut=frozenset({h.c[8]}))
    blob = git("rev-parse", f"{h.c[2].decode()}:big.bin", cwd=h.work).strip().decode()
    with pytest.raises(UploadPackError, match=f"invalid shallow object {blob}"):
        plan(world, f"shallow {blob}\n")


def test_fetch_into_a_shallow_clone_stops_at_its_boundary(world):
    """A client shallow at c8 fetching c10 gets c9 and c10 only, even though c8's parents are missing."""
    h = world.h
    shallow = plan(world, f"want {h.c[10].decode()}\n", f"shallow {h.c[8].decode()}\n")
    found = enumerate_(world, [h.c[10]], [h.c[8]], shallow=shallow)
    assert set(found.objects) == h.rev_list("main", "--not", h.c[8])


def test_deepen_deeper_unshallows(world):
    """A depth-2 client at c10 asking for depth 4 is told to unshallow c9 and gets two more commits."""
    h = world.h
    shallow = plan(
        world, f"want {h.c[10].decode()}\n", f"shallow {h.c[9].decode()}\n", "deepen 4\n"
    )
    assert shallow.shallow == (h.c[7],)
    assert shallow.unshallow == (h.c[9],)
    assert shallow.extra_wants == (h.c[8],)
    found = enumerate_(world, [h.c[10]], [h.c[10], h.c[9]], shallow=shallow)
    commits = [o for o in found.objects if o in set(h.c.values()) | {h.f1, h.f2}]
    assert commits == [h.c[8], h.c[7]]
    assert not set(found.objects) & (h.tree_objects(h.c[9]) | h.tree_objects(h.c[10]))
    assert set(found.objects) == (
        h.tree_objects(h.c[8]) | h.tree_objects(h.c[7]) | {h.c[8], h.c[7]}
    ) - h.tree_objects(h.c[9])


def test_deepen_relative(world):
    """deepen-relative counts from the client's boundary: two more generations below c9."""
    h = world.h
    shallow = plan(
        world,
        f"want {h.c[10].decode()}\n",
        f"shallow {h.c[9].decode()}\n",
        "deepen 2\n",
        "deepen-relative\n",
    )
    assert shallow.unshallow == (h.c[9],)
    assert shallow.shallow == (h.c[7],)
    assert shallow.extra_wants == (h.c[8],)


def test_unshallow_everything(world):
    """--unshallow (the infinite depth) unshallows every client boundary and draws no new one."""
    h = world.h
    shallow = plan(
        world,
        f"want {h.c[10].decode()}\n",
        f"shallow {h.c[10].decode()}\n",
        f"deepen {INFINITE_DEPTH}\n",
    )
    assert shallow == ShallowPlan(
        unshallow=(h.c[10],), client=(h.c[10],), extra_wants=(h.c[9],), cut=frozenset({h.c[10]})
    )
    found = enumerate_(world, [h.c[10]], [h.c[10]], shallow=shallow)
    assert set(found.objects) == h.rev_list(h.c[9]) - h.tree_objects(h.c[10])
