"""Upload-pack's graph work over the metadata store: wants, negotiation, shallow cuts, enumeration.

Everything here blocks on IMetadataStore (and, for ``blob:limit``, on
IObjectStore) and runs in a worker thread.  It answers from the commit graph
(parents, root tree, generation number, commit time) and the parsed trees the
metadata tier keeps, so no object is inflated to plan a pack.  Lookups are
batched: a breadth-first walk asks for one whole level at a time, and a
``RepoView`` remembers commits, types and tags for the length of one request.

The semantics are git's upload-pack and pack-objects --revs: a want must be
a ref tip or reachable from one; shallow commits (the client's and the new
ones) have no parents for the walk; the objects sent are those reachable
from the wants' commits minus what the client's boundary commits hold.
"""

from __future__ import annotations

import heapq
import threading
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import TypeVar

import attrs
from dulwich.errors import ObjectFormatException
from dulwich.objects import parse_tree

from gitstratum.core.objects import (
    COMMIT_MODE,
    TREE_MODE,
    CommitInfo,
    ObjectParseError,
    ObjectType,
    TagInfo,
)
from gitstratum.core.oid import ObjectID
from gitstratum.protocol.upload_pack import (
    INFINITE_DEPTH,
    FetchRequest,
    FilterKind,
    ObjectFilter,
    UploadPackError,
)
from gitstratum.storage.interfaces import IMetadataStore, IObjectStore, RefSnapshot, Repository

__all__ = [
    "RepoView",
    "Peeled",
    "ref_peels",
    "check_wants",
    "resolve_want_refs",
    "Negotiator",
    "ShallowPlan",
    "compute_shallow",
    "Enumeration",
    "enumerate_objects",
]

# how many blob sizes one stat_many reads when blob:limit needs them
_SIZE_BATCH = 4096
# ref_rev_parse_rules: how deepen-not names a ref in short form
_DWIM_RULES = (
    b"%s",
    b"refs/%s",
    b"refs/tags/%s",
    b"refs/heads/%s",
    b"refs/remotes/%s",
    b"refs/remotes/%s/HEAD",
)


def _dedupe(oids: Iterable[ObjectID]) -> list[ObjectID]:
    return list(dict.fromkeys(oids))


_V = TypeVar("_V")


def _cached(
    cache: dict[ObjectID, _V | None],
    oids: Collection[ObjectID],
    fetch: Callable[[list[ObjectID]], Mapping[ObjectID, _V]],
) -> dict[ObjectID, _V]:
    """Look *oids* up through *cache*, fetching those never asked about in one call (misses too)."""
    missing = [o for o in oids if o not in cache]
    if missing:
        found = fetch(missing)
        for o in missing:
            cache[o] = found.get(o)
    return {o: v for o in oids if (v := cache[o]) is not None}


@attrs.frozen
class Peeled:
    """An annotated tag followed to the end: its final target and every tag on the way (itself first)."""

    target: ObjectID
    type: ObjectType
    chain: tuple[ObjectID, ...]


@attrs.define(eq=False)
class RepoView:
    """One request's view of a repository: a ref snapshot, and caches of what was looked up."""

    metadata: IMetadataStore
    repo: Repository
    snapshot: RefSnapshot
    _commits: dict[ObjectID, CommitInfo | None] = attrs.field(factory=dict, init=False)
    _types: dict[ObjectID, ObjectType | None] = attrs.field(factory=dict, init=False)
    _tags: dict[ObjectID, TagInfo | None] = attrs.field(factory=dict, init=False)
    _tip_commits: frozenset[ObjectID] | None = attrs.field(default=None, init=False)

    @classmethod
    def open(cls, metadata: IMetadataStore, repo: Repository) -> RepoView:
        return cls(metadata, repo, metadata.get_refs(repo))

    def commits(self, oids: Collection[ObjectID]) -> dict[ObjectID, CommitInfo]:
        """Commit-graph nodes among *oids* (one store call for those not seen yet)."""
        return _cached(self._commits, oids, lambda m: self.metadata.get_commits(self.repo, m))

    def commit(self, oid: ObjectID) -> CommitInfo | None:
        if oid not in self._commits:
            self.commits((oid,))
        return self._commits[oid]

    def types(self, oids: Collection[ObjectID]) -> dict[ObjectID, ObjectType]:
        """Membership: the types of those *oids* this repository holds."""
        return _cached(self._types, oids, lambda m: self.metadata.object_types(self.repo, m))

    def type(self, oid: ObjectID) -> ObjectType | None:
        if oid not in self._types:
            self.types((oid,))
        return self._types[oid]

    def trees(self, oids: Collection[ObjectID]) -> dict[ObjectID, bytes]:
        """Raw tree bodies (not cached: a walk reads each tree once)."""
        return self.metadata.get_trees(self.repo, oids) if oids else {}

    def _tag_infos(self, oids: Collection[ObjectID]) -> dict[ObjectID, TagInfo]:
        return _cached(self._tags, oids, lambda m: self.metadata.get_tags(self.repo, m))

    def peel(self, oids: Iterable[ObjectID]) -> dict[ObjectID, Peeled]:
        """For each annotated tag among *oids*, what it finally names; other ids are left out.

        A chain broken by a tag this repository lacks is left out too.
        """
        chains = {o: ([o], info) for o, info in self._tag_infos(set(oids)).items()}
        result: dict[ObjectID, Peeled] = {}
        while chains:
            targets = self._tag_infos(
                {info.target for _, info in chains.values() if info.target_type is ObjectType.TAG}
            )
            following: dict[ObjectID, tuple[list[ObjectID], TagInfo]] = {}
            for start, (chain, info) in chains.items():
                if info.target_type is not ObjectType.TAG:
                    result[start] = Peeled(info.target, info.target_type, tuple(chain))
                elif info.target in targets and info.target not in chain:
                    following[start] = ([*chain, info.target], targets[info.target])
            chains = following
        return result

    def tip_commits(self) -> frozenset[ObjectID]:
        """The commits the refs name, annotated tags peeled."""
        if self._tip_commits is None:
            values = list(set(self.snapshot.refs.values()))
            self._tip_commits = frozenset(_commit_roots(self, values))
        return self._tip_commits


def ref_peels(view: RepoView) -> dict[ObjectID, ObjectID]:
    """For the advertisement: each annotated tag a ref names -> the object it finally points at."""
    return {tag: p.target for tag, p in view.peel(set(view.snapshot.refs.values())).items()}


def _not_our_ref(oid: ObjectID) -> UploadPackError:
    return UploadPackError(f"upload-pack: not our ref {oid.decode()}")


def check_wants(view: RepoView, wants: Sequence[ObjectID]) -> None:
    """Refuse (git's "not our ref") any want that is not a ref tip or reachable from one here.

    Membership comes first (an object pushed only to another repository
    sharing the stores is never ours).  Commits are then checked on the
    commit graph, annotated tags against the refs' peel chains, and trees
    and blobs by walking trees from the tips back through history, which
    stops as soon as every wanted one is found (a partial clone's lazy
    fetches are nearly always in the tips' trees).
    """
    types = view.types(wants)
    for want in wants:
        if want not in types:
            raise _not_our_ref(want)
    tips = view.tip_commits()
    loose = [w for w in wants if types[w] is ObjectType.COMMIT and w not in tips]
    if loose:
        unreached = _unreachable(view, loose, tips)
        for want in loose:
            if want in unreached:
                raise _not_our_ref(want)
    ref_values = set(view.snapshot.refs.values())
    peeled = view.peel(ref_values)
    tags = [w for w in wants if types[w] is ObjectType.TAG and w not in ref_values]
    if tags:
        on_chains = {tag for p in peeled.values() for tag in p.chain}
        for want in tags:
            if want not in on_chains:
                raise _not_our_ref(want)
    contents = {w for w in wants if types[w] in (ObjectType.TREE, ObjectType.BLOB)}
    contents -= ref_values
    contents -= {p.target for p in peeled.values()}
    if contents:
        for want in sorted(_unreached_contents(view, contents, tips, peeled)):
            raise _not_our_ref(want)


# Per (repository id, refs version): every tree and blob reachable from the
# refs, kept after a walk had to cover all of history, so a client probing
# for unreachable ids pays for that walk once per ref update, not per request.
_REACHABLE: dict[tuple[int, int], frozenset[ObjectID]] = {}
_REACHABLE_KEEP = 4
_REACHABLE_LOCK = threading.Lock()


def _unreached_contents(
    view: RepoView,
    targets: set[ObjectID],
    tips: Collection[ObjectID],
    peeled: dict[ObjectID, Peeled],
) -> set[ObjectID]:
    """The tree and blob *targets* that no ref reaches."""
    key = (view.repo.id, view.snapshot.version)
    with _REACHABLE_LOCK:
        known = _REACHABLE.get(key)
    if known is not None:
        return targets - known
    remaining = set(targets)
    has: set[ObjectID] = set()
    roots = [p.target for p in peeled.values() if p.type in (ObjectType.TREE, ObjectType.BLOB)]
    seen = set(tips)
    frontier = list(tips)
    while frontier:
        infos = view.commits(frontier)
        _mark_reachable(view, roots + [i.tree for i in infos.values()], has, remaining)
        if not remaining:
            return set()
        roots = []
        parents = []
        for info in infos.values():
            for p in info.parents:
                if p not in seen:
                    seen.add(p)
                    parents.append(p)
        frontier = parents
    with _REACHABLE_LOCK:
        _REACHABLE[key] = frozenset(has)
        while len(_REACHABLE) > _REACHABLE_KEEP:
            del _REACHABLE[next(iter(_REACHABLE))]
    return remaining


def _unreachable(
    view: RepoView, targets: Sequence[ObjectID], tips: Collection[ObjectID]
) -> set[ObjectID]:
    """The *targets* no commit in *tips* reaches.

    A commit can only reach commits of lower generation, so the walk never
    goes below the lowest generation still sought.
    """
    infos = view.commits(targets)
    remaining = {t for t in targets if t in infos}.difference(tips)
    unknown = set(targets).difference(infos)
    if not remaining:
        return unknown
    floor = min(infos[t].generation for t in remaining)
    seen = set(tips)
    frontier = [t for t, info in view.commits(seen).items() if info.generation >= floor]
    while frontier and remaining:
        parents = []
        for info in view.commits(frontier).values():
            for p in info.parents:
                if p not in seen:
                    seen.add(p)
                    parents.append(p)
        pinfos = view.commits(parents)
        found = remaining.intersection(pinfos)
        if found:
            remaining -= found
            if not remaining:
                break
            floor = min(infos[t].generation for t in remaining)
        frontier = [p for p, info in pinfos.items() if info.generation >= floor]
    return remaining | unknown


def resolve_want_refs(
    snapshot: RefSnapshot, names: Sequence[bytes]
) -> list[tuple[bytes, ObjectID]]:
    """``want-ref`` names -> (name, oid); a ref we do not have is git's "unknown ref"."""
    resolved = []
    for name in names:
        value = snapshot.head_oid() if name == b"HEAD" else snapshot.refs.get(name)
        if value is None:
            raise UploadPackError(f"unknown ref {name.decode('utf-8', 'replace')}")
        resolved.append((name, value))
    return resolved


# -- negotiation -----------------------------------------------------------


@attrs.define(eq=False)
class _Reach:
    """A walk down from one want looking for a commit the client has, resumable as haves arrive.

    Every commit met is remembered, so a have marked later is found by a
    set lookup; commits older than the cutoff wait in ``parked`` until the
    oldest have gets older.  Over a whole request each commit is expanded
    at most once, however many times readiness is asked.
    """

    start: ObjectID
    met: set[ObjectID] = attrs.field(init=False)
    frontier: list[ObjectID] = attrs.field(init=False)
    parked: list[tuple[int, ObjectID]] = attrs.field(factory=list, init=False)
    marks_seen: int = 0

    def __attrs_post_init__(self) -> None:
        self.met = {self.start}
        self.frontier = [self.start]

    def reaches(
        self,
        view: RepoView,
        they_have: set[ObjectID],
        marks: list[ObjectID],
        cutoff: int,
        cut: frozenset[ObjectID] = frozenset(),
    ) -> bool:
        if any(m in self.met for m in marks[self.marks_seen :]):
            return True
        self.marks_seen = len(marks)
        while self.parked and -self.parked[0][0] >= cutoff:
            self.frontier.append(heapq.heappop(self.parked)[1])
        while self.frontier:
            parents = []
            for oid, info in view.commits(self.frontier).items():
                for p in () if oid in cut else info.parents:
                    if p in they_have:
                        return True
                    if p not in self.met:
                        self.met.add(p)
                        parents.append(p)
            self.frontier = []
            for p, info in view.commits(parents).items():
                if info.commit_time >= cutoff:
                    self.frontier.append(p)
                else:
                    heapq.heappush(self.parked, (-info.commit_time, p))
        return False


@attrs.define(eq=False)
class Negotiator:
    """The HaveOracle behind negotiation: what the client has, and whether we can stop.

    ``have_objs`` are the haves we hold, in the order recorded, minus commits
    already known through a child (git's have_obj); the pack excludes what
    they reach.
    """

    view: RepoView
    wants: Sequence[ObjectID]
    #: commits git has registered as shallow by the time haves are read
    #: (the new boundary and the client's shallows that stay shallow):
    #: parentless for negotiation, as git's register_shallow makes them
    cut: frozenset[ObjectID] = frozenset()
    have_objs: list[ObjectID] = attrs.field(factory=list, init=False)
    _they_have: set[ObjectID] = attrs.field(factory=set, init=False)
    _marks: list[ObjectID] = attrs.field(factory=list, init=False)  # _they_have, in order
    _oldest_have: int | None = attrs.field(default=None, init=False)
    _pending: list[_Reach] | None = attrs.field(default=None, init=False)

    def prefetch(self, haves: Collection[ObjectID]) -> None:
        """Load what the haves need in two store calls instead of two per have."""
        types = self.view.types(haves)
        self.view.commits([h for h in haves if types.get(h) is ObjectType.COMMIT])

    @property
    def have_count(self) -> int:
        return len(self.have_objs)

    def got_oid(self, oid: ObjectID) -> int:
        kind = self.view.type(oid)
        if kind is None:
            return -1
        if kind is ObjectType.COMMIT:
            known = oid in self._they_have
            info = self.view.commit(oid)
            self._mark(oid)
            if info is not None:
                if self._oldest_have is None or info.commit_time < self._oldest_have:
                    self._oldest_have = info.commit_time
                for parent in () if oid in self.cut else info.parents:
                    self._mark(parent)
            if known:
                return 0
        self.have_objs.append(oid)
        return 1

    def _mark(self, oid: ObjectID) -> None:
        if oid not in self._they_have:
            self._they_have.add(oid)
            self._marks.append(oid)

    def ok_to_give_up(self) -> bool:
        """Whether every want reaches a commit the client has (git's can_all_from_reach).

        The walk does not go below commits older than the oldest have, and a
        want once seen to reach a have stays settled.
        """
        if not self.have_objs:
            return False
        if self._pending is None:
            self._pending = [_Reach(c) for c in self._want_commits()]
        cutoff = self._oldest_have or 0
        while self._pending:
            if not self._pending[0].reaches(
                self.view, self._they_have, self._marks, cutoff, self.cut
            ):
                return False
            self._pending.pop(0)
        return True

    def _want_commits(self) -> list[ObjectID]:
        infos = self.view.commits(_commit_roots(self.view, self.wants))
        return sorted(infos, key=lambda c: infos[c].generation)


# -- shallow ---------------------------------------------------------------


@attrs.frozen
class ShallowPlan:
    """The shallow side of a fetch.

    ``shallow`` and ``unshallow`` are the lines owed to the client; ``client``
    the client's shallow commits we know; ``cut`` every commit the walk must
    treat as parentless (the client's and the new boundary); the parents of
    unshallowed commits become extra wants, and the unshallowed commits
    themselves extra haves.
    """

    shallow: tuple[ObjectID, ...] = ()
    unshallow: tuple[ObjectID, ...] = ()
    client: tuple[ObjectID, ...] = ()
    extra_wants: tuple[ObjectID, ...] = ()
    cut: frozenset[ObjectID] = frozenset()


def negotiation_cut(shallow: ShallowPlan) -> frozenset[ObjectID]:
    """The commits v0 negotiation treats as parentless: the cut, less what is being unshallowed.

    git has already answered the deepen when it reads haves: new boundary
    commits and client shallows that stay shallow are registered (their
    parents dropped), while unshallowed ones were parsed again, parents and all.
    """
    return shallow.cut - frozenset(shallow.unshallow)


def compute_shallow(
    view: RepoView, request: FetchRequest, wants: Sequence[ObjectID]
) -> ShallowPlan:
    """Work out the new shallow boundary for deepen, deepen-relative, deepen-since and deepen-not."""
    types = view.types(request.shallows)
    client: list[ObjectID] = []
    for oid in request.shallows:
        kind = types.get(oid)
        if kind is None:
            continue  # git ignores shallow lines naming objects it does not have
        if kind is not ObjectType.COMMIT:
            raise UploadPackError(f"invalid shallow object {oid.decode()}")
        client.append(oid)

    boundary: list[ObjectID]
    if request.depth == INFINITE_DEPTH:
        boundary, not_shallow = [], set(client)
    elif request.depth and request.deepen_relative:
        reachable = set(client) - _unreachable(view, client, view.tip_commits())
        roots = [c for c in client if c in reachable]
        boundary, not_shallow = _depth_walk(view, roots, request.depth + 1)
    elif request.depth:
        boundary, not_shallow = _depth_walk(view, _commit_roots(view, wants), request.depth)
    elif request.deepen_rev_list:
        boundary, not_shallow = _rev_list_cut(view, request, wants)
    else:
        return ShallowPlan(client=tuple(client), cut=frozenset(client))

    known = set(client)
    unshallow = [c for c in client if c in not_shallow]
    extra: list[ObjectID] = []
    for info in view.commits(unshallow).values():
        extra.extend(info.parents)
    return ShallowPlan(
        shallow=tuple(c for c in _dedupe(boundary) if c not in known),
        unshallow=tuple(unshallow),
        client=tuple(client),
        extra_wants=tuple(_dedupe(extra)),
        cut=frozenset(known.union(boundary)),
    )


def _commit_roots(view: RepoView, oids: Sequence[ObjectID]) -> list[ObjectID]:
    """The commits among *oids*, annotated tags peeled; anything else is dropped."""
    types = view.types(oids)
    peeled = view.peel([o for o in oids if types.get(o) is ObjectType.TAG])
    roots = []
    for oid in oids:
        if types.get(oid) is ObjectType.COMMIT:
            roots.append(oid)
        elif oid in peeled and peeled[oid].type is ObjectType.COMMIT:
            roots.append(peeled[oid].target)
    return _dedupe(roots)


def _depth_walk(
    view: RepoView, roots: Sequence[ObjectID], depth: int
) -> tuple[list[ObjectID], set[ObjectID]]:
    """git's get_shallow_commits: (commits at exactly *depth*, commits above it).

    The roots are at depth 1.  Breadth first, so each commit is met first at
    its smallest depth, which is what git's depth-first walk converges to.
    """
    boundary: list[ObjectID] = []
    above: set[ObjectID] = set()
    seen = set(roots)
    frontier = list(roots)
    level = 1
    while frontier:
        parents = []
        infos = view.commits(frontier)
        for c in frontier:
            info = infos.get(c)
            if info is None:
                continue
            if level >= depth:
                boundary.append(c)
                continue
            above.add(c)
            for p in info.parents:
                if p not in seen:
                    seen.add(p)
                    parents.append(p)
        frontier = parents
        level += 1
    return boundary, above


def _resolve_deepen_not(snapshot: RefSnapshot, name: bytes) -> ObjectID:
    found = []
    for rule in _DWIM_RULES:
        full = rule % name
        value = snapshot.head_oid() if full == b"HEAD" else snapshot.refs.get(full)
        if value is not None:
            found.append(value)
    if len(found) != 1:
        raise UploadPackError(
            f"git upload-pack: ambiguous deepen-not: deepen-not {name.decode('utf-8', 'replace')}"
        )
    return found[0]


def _rev_list_cut(
    view: RepoView, request: FetchRequest, wants: Sequence[ObjectID]
) -> tuple[list[ObjectID], set[ObjectID]]:
    """git's get_shallow_commits_by_rev_list: ``rev-list --max-age=T wants --not refs``.

    The selected commits with a parent outside the selection are the new
    boundary; the rest are above it.
    """
    excluded = [_resolve_deepen_not(view.snapshot, name) for name in request.deepen_not]
    selected, _ = _walk_commits(
        view,
        _commit_roots(view, wants),
        _commit_roots(view, excluded),
        since=request.deepen_since,
    )
    if not selected:
        raise UploadPackError("no commits selected for shallow requests")
    chosen = set(selected)
    infos = view.commits(selected)
    boundary = [c for c in selected if any(p not in chosen for p in infos[c].parents)]
    return boundary, chosen.difference(boundary)


# -- enumeration -----------------------------------------------------------


def _walk_commits(
    view: RepoView,
    include: Sequence[ObjectID],
    exclude: Sequence[ObjectID],
    *,
    cut: Collection[ObjectID] = frozenset(),
    since: int | None = None,
) -> tuple[list[ObjectID], set[ObjectID]]:
    """Commits reachable from *include* and not from *exclude*, newest first; and the edges.

    Commits are taken highest generation first, so by the time one is taken
    every descendant that could make it uninteresting has been; the walk
    ends when nothing interesting is left to take.  Commits in *cut* have
    no parents here.  With *since*, older commits are neither selected nor
    walked through.  The edges are the excluded parents of selected commits.
    """
    infos = view.commits([*include, *exclude])
    uninteresting: dict[ObjectID, bool] = {}
    taken: set[ObjectID] = set()
    heap: list[tuple[int, int, ObjectID]] = []
    live = 0  # interesting commits queued

    def queue(oid: ObjectID, info: CommitInfo, excluded: bool) -> None:
        nonlocal live
        before = uninteresting.get(oid)
        if before is None:
            uninteresting[oid] = excluded
            heapq.heappush(heap, (-info.generation, -info.commit_time, oid))
            if not excluded:
                live += 1
        elif excluded and not before and oid not in taken:
            uninteresting[oid] = True
            live -= 1

    for oid in exclude:
        if oid in infos:
            queue(oid, infos[oid], True)
    for oid in include:
        if oid in infos:
            queue(oid, infos[oid], False)

    selected: list[ObjectID] = []
    while live > 0:
        _, _, oid = heapq.heappop(heap)
        taken.add(oid)
        excluded = uninteresting[oid]
        info = view.commit(oid)
        assert info is not None
        if not excluded:
            live -= 1
            if since is not None and info.commit_time < since:
                continue
            selected.append(oid)
        if oid in cut or not info.parents:
            continue
        for parent, pinfo in view.commits(info.parents).items():
            queue(parent, pinfo, excluded)

    edges: set[ObjectID] = set()
    for info in view.commits(selected).values():
        if info.oid not in cut:
            edges.update(p for p in info.parents if uninteresting.get(p))
    return selected, edges


@attrs.frozen
class Enumeration:
    """What goes into the pack, in pack order, and what the client is known to hold.

    ``client_has`` (the boundary commits, the haves and every tree and blob of
    the boundary's trees) is what a thin pack may use as delta bases.
    """

    objects: tuple[ObjectID, ...]
    client_has: frozenset[ObjectID]


def enumerate_objects(
    view: RepoView,
    store: IObjectStore,
    *,
    wants: Sequence[ObjectID],
    haves: Sequence[ObjectID],
    shallow: ShallowPlan = ShallowPlan(),
    filter: ObjectFilter | None = None,
    include_tag: bool = False,
) -> Enumeration:
    """The objects a fetch sends: commits newest first, then tags, then trees and blobs.

    Trees and blobs come in traversal order (each tree before what it holds),
    skipping everything reachable from the boundary commits' trees, so an
    incremental fetch carries only what is new and never descends into a
    subtree the client has.  *store* is read only for blob sizes under
    ``blob:limit``.
    """
    wants = _dedupe([*wants, *shallow.extra_wants])
    haves = _dedupe([*haves, *shallow.unshallow])
    types = view.types([*wants, *haves])
    peeled = view.peel([o for o in (*wants, *haves) if types.get(o) is ObjectType.TAG])

    tags: dict[ObjectID, None] = {}
    by_type: dict[ObjectType, list[ObjectID]] = {t: [] for t in ObjectType}
    for oid in wants:
        kind = types.get(oid)
        if kind is ObjectType.TAG and oid in peeled:
            tags.update(dict.fromkeys(peeled[oid].chain))
            kind, oid = peeled[oid].type, peeled[oid].target
        if kind is not None:
            by_type[kind].append(oid)
    tags.update(dict.fromkeys(by_type.pop(ObjectType.TAG)))

    has: set[ObjectID] = set()
    have_by_type: dict[ObjectType, list[ObjectID]] = {t: [] for t in ObjectType}
    for oid in haves:
        kind = types.get(oid)
        if kind is None:
            continue
        has.add(oid)
        if kind is ObjectType.TAG and oid in peeled:
            has.update(peeled[oid].chain)
            kind, oid = peeled[oid].type, peeled[oid].target
            has.add(oid)
        have_by_type[kind].append(oid)

    have_commits = have_by_type[ObjectType.COMMIT]
    commits, edges = _walk_commits(view, by_type[ObjectType.COMMIT], have_commits, cut=shallow.cut)
    boundary = edges.union(shallow.unshallow)
    if shallow.cut:
        # A shallow client's haves may share no history with what it fetches.
        boundary.update(have_commits)
    has.update(boundary)
    boundary_trees = [info.tree for info in view.commits(boundary).values()]
    _mark_reachable(view, [*boundary_trees, *have_by_type[ObjectType.TREE]], has)

    tree_roots: list[ObjectID] = []
    if filter is None or filter.kind is not FilterKind.TREE_DEPTH:
        infos = view.commits(commits)
        tree_roots = [infos[c].tree for c in commits]
    contents = _walk_trees(
        view,
        store,
        tree_roots,
        by_type[ObjectType.TREE],
        by_type[ObjectType.BLOB],
        has,
        filter,
    )

    if include_tag:
        sent = set(commits).union(contents, tags)
        tag_refs = sorted(
            (name, oid)
            for name, oid in view.snapshot.refs.items()
            if name.startswith(b"refs/tags/")
        )
        ref_peeled = view.peel(oid for _, oid in tag_refs)
        for _, oid in tag_refs:
            tagged = ref_peeled.get(oid)
            if tagged is None or tagged.target not in sent or oid in sent or oid in has:
                continue
            for tag in tagged.chain:
                if tag not in sent and tag not in has:
                    tags[tag] = None
                    sent.add(tag)

    return Enumeration(
        objects=(*commits, *tags, *contents),
        client_has=frozenset(has),
    )


def _entries(raw: bytes) -> list[tuple[bytes, int, ObjectID]]:
    """A tree's (name, mode, id) entries from one C call.

    The walks below see about a million entries for a full clone of a
    12,000-file, 3,000-commit repository, nearly all already seen; a list
    they can filter in one comprehension costs half of iter_tree's
    per-entry generator.
    """
    try:
        return parse_tree(raw, 20)  # type: ignore[return-value]  # the C version returns a list
    except ObjectFormatException as e:
        raise ObjectParseError(f"bad tree: {e}") from e


def _mark_reachable(
    view: RepoView,
    roots: Iterable[ObjectID],
    has: set[ObjectID],
    sought: set[ObjectID] | None = None,
) -> None:
    """Add every tree and blob under *roots* to *has*, a level of trees per store call.

    With *sought*, what is found is removed from it, and the walk ends as
    soon as it is empty.
    """
    frontier = [t for t in _dedupe(roots) if t not in has]
    has.update(frontier)
    if sought is not None:
        sought.difference_update(frontier)
    while frontier and (sought is None or sought):
        subtrees = []
        for raw in view.trees(frontier).values():
            fresh = [(o, m) for _, m, o in _entries(raw) if o not in has and m != COMMIT_MODE]
            for oid, mode in fresh:
                if oid not in has:
                    has.add(oid)
                    if mode == TREE_MODE:
                        subtrees.append(oid)
                    if sought is not None:
                        sought.discard(oid)
        frontier = subtrees


def _walk_trees(
    view: RepoView,
    store: IObjectStore,
    roots: Sequence[ObjectID],
    wanted_trees: Sequence[ObjectID],
    wanted_blobs: Sequence[ObjectID],
    has: Collection[ObjectID],
    filter: ObjectFilter | None,
) -> list[ObjectID]:
    """Trees and blobs under *roots* that the client lacks, depth first in tree order.

    The store is read breadth first (one call per level); each new object is
    filed under the tree that first named it, and that forest is then laid
    out depth first.  Explicitly wanted trees and blobs are sent whatever
    the filter says (as git does unless asked to filter provided objects).
    """
    kind = filter.kind if filter is not None else None
    take_blobs = kind is None or kind is FilterKind.BLOB_LIMIT
    seen = set(has)
    starts: list[ObjectID] = []
    frontier: list[ObjectID] = []
    for tree in roots:
        if tree not in seen:
            seen.add(tree)
            starts.append(tree)
            frontier.append(tree)
    started = set(starts)
    for tree in wanted_trees:
        if tree not in started:
            seen.add(tree)
            started.add(tree)
            starts.append(tree)
            if kind is not FilterKind.TREE_DEPTH:
                frontier.append(tree)

    children: dict[ObjectID, list[tuple[ObjectID, bool]]] = {}
    too_big: set[ObjectID] = set()
    while frontier:
        subtrees: list[ObjectID] = []
        blobs: list[ObjectID] = []
        bodies = view.trees(frontier)
        for tree in frontier:
            raw = bodies.get(tree)
            if raw is None:
                continue
            if take_blobs:
                fresh = [(o, m) for _, m, o in _entries(raw) if o not in seen and m != COMMIT_MODE]
            else:
                fresh = [(o, m) for _, m, o in _entries(raw) if m == TREE_MODE and o not in seen]
            kids = []
            for oid, mode in fresh:
                if oid in seen:  # named twice in this tree
                    continue
                seen.add(oid)
                is_tree = mode == TREE_MODE
                kids.append((oid, is_tree))
                (subtrees if is_tree else blobs).append(oid)
            if kids:
                children[tree] = kids
        if filter is not None and kind is FilterKind.BLOB_LIMIT and blobs:
            too_big.update(_blobs_at_least(store, blobs, filter.limit))
        frontier = subtrees

    out: list[ObjectID] = []
    for start in starts:
        out.append(start)
        stack = list(reversed(children.get(start, ())))
        while stack:
            oid, is_tree = stack.pop()
            if is_tree:
                out.append(oid)
                stack.extend(reversed(children.get(oid, ())))
            elif oid not in too_big:
                out.append(oid)
    sent = set(out)
    out.extend(blob for blob in _dedupe(wanted_blobs) if blob not in sent)
    return out


def _blobs_at_least(store: IObjectStore, blobs: Sequence[ObjectID], limit: int) -> set[ObjectID]:
    """The *blobs* whose size is *limit* or more (blob:limit keeps only smaller ones)."""
    big = set()
    for start in range(0, len(blobs), _SIZE_BATCH):
        for oid, stat in store.stat_many(blobs[start : start + _SIZE_BATCH]).items():
            if stat.size >= limit:
                big.add(oid)
    return big
