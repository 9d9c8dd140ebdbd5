"""Pre-warm: after a push, build the clone packs CI is about to ask for, before it asks.

``clone_requests`` lists the fetches a CI fleet sends for a new tip;
``prewarm`` plans each through an ``UploadPackService`` and starts its build
in the pack cache, depth-1 clones first.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Sequence
from fnmatch import fnmatchcase

import attrs

from gitstratum.cache.interfaces import CacheOutcome, IPackCache
from gitstratum.core.oid import ObjectID
from gitstratum.protocol.pack_key import PackRequest, normalise, pack_key
from gitstratum.protocol.upload_pack import FetchRequest
from gitstratum.protocol.upload_service import UploadPackService
from gitstratum.protocol.walker import RepoView, compute_shallow
from gitstratum.storage.interfaces import RefSnapshot, Repository

__all__ = ["prewarm", "clone_requests"]

_PREWARM_POLL = 0.05


def clone_requests(snapshot: RefSnapshot, tip: ObjectID, *, full: bool) -> list[FetchRequest]:
    """The fetches CI sends for *tip* right after a push, as git 2.39 and clone_storm.py send them.

    Seen with ``GIT_TRACE_PACKET=1`` (protocol v2 and v0 alike):
    ``git clone --depth 1`` wants the branch tip with deepen 1, thin-pack,
    ofs-delta and include-tag; clone_storm.py the same without include-tag.
    A plain ``git clone`` wants every branch and tag (no include-tag: the
    tags are wanted); clone_storm.py's full clone wants the tip alone.  With
    *full* the two full clones are listed too.  Thin-pack, progress and
    side-band never change a clone's pack, so they are left as git sends them.
    """
    # git always asks for a thin pack with ofs-delta, and clone_storm.py too.
    clone = FetchRequest(wants=(tip,), thin_pack=True, ofs_delta=True, no_progress=True)
    requests = [
        attrs.evolve(clone, depth=1, include_tag=True),
        attrs.evolve(clone, depth=1),
    ]
    if full:
        every = tuple(
            oid
            for name, oid in sorted(snapshot.refs.items())
            if name.startswith((b"refs/heads/", b"refs/tags/"))
        )
        requests.append(attrs.evolve(clone, wants=every))
        requests.append(clone)
    return requests


def prewarm(
    service: UploadPackService,
    repo: Repository,
    refs: Collection[bytes],
    patterns: Sequence[str] = (),
    *,
    wait: float = 120.0,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, CacheOutcome]:
    """Warm, through *service*, the clone packs CI will ask for after a push that updated *refs*.

    A ref counts when it is HEAD's target or matches one of the
    fnmatch *patterns* (full ref names: ``refs/heads/release/*``).  For
    each such tip the depth-1 clones are warmed first, then the full
    ones (see ``clone_requests``); keys that coincide after
    normalisation are warmed once.  Builds go through the cache's
    single-flight, so a clone arriving mid-way follows; a build that
    admission control has no room for is skipped, never waited for.
    The full clones start once no depth-1 build is running, or after
    *wait* seconds (polling with *sleep*).  Returns the outcome per key
    warmed (blocking, but never waits for a build).
    """
    cache = service.cache
    if cache is None:
        return {}
    snapshot = service.metadata.get_refs(repo)
    names = sorted(
        name
        for name in set(refs)
        if name in snapshot.refs
        and (
            name == snapshot.head
            or any(fnmatchcase(name.decode("utf-8", "replace"), p) for p in patterns)
        )
    )
    if not names:
        return {}
    view = RepoView(service.metadata, repo, snapshot)
    depth_one: list[FetchRequest] = []
    full: list[FetchRequest] = []
    for i, name in enumerate(names):
        requests = clone_requests(snapshot, snapshot.refs[name], full=True)
        depth_one += requests[:2]
        # Every tip wants the same whole-repository clone: list it once.
        full += requests[2:] if i == 0 else requests[3:]
    outcomes: dict[str, CacheOutcome] = {}
    for group in (depth_one, full):
        started = []
        for fetch in group:
            shallow = compute_shallow(view, fetch, fetch.wants)
            pack = normalise(view, PackRequest.of(fetch, fetch.wants, (), shallow))
            key = pack_key(view, pack)
            if key in outcomes:
                continue
            known = cache.contains(key) or service.is_building(key)
            if not known and service.admission is not None and not service.admission.may_build():
                continue
            # Builds run concurrently in the cache's pool: each gets a view of its own.
            build_view = RepoView(service.metadata, repo, snapshot)
            outcomes[key] = cache.warm(key, service.builder(key, build_view, pack))
            started.append(key)
        if group is depth_one:
            # CI's first jobs ask for depth 1: let those builds have the cores
            # before the (far larger) full clones start competing with them.
            _wait_for(cache, started, wait, sleep)
    return outcomes


def _wait_for(
    cache: IPackCache, keys: Sequence[str], wait: float, sleep: Callable[[float], None]
) -> None:
    """Wait (in this worker thread) until none of *keys* is being built, or give up."""
    for _ in range(int(wait / _PREWARM_POLL)):
        if not any(cache.building(k) for k in keys):
            return
        sleep(_PREWARM_POLL)
