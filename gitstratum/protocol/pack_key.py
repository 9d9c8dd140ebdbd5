"""What identifies a pack: the ``PackRequest``, its normal form and its cache key.

The key is a hash of exactly what decides a pack's bytes, and of nothing else.

Two requests share a key when they would get the same pack: the same
repository and read-ACL class, the same (sorted, deduplicated) wants and
common haves, the same shallow plan, filter and byte-changing
capabilities.  Who asks, with which agent, and whether progress or
side-band was requested never enter it: a cached pack is raw and framed at
send time, and identity in the key would split one CI fleet's clones into
as many entries as it has tokens.

The encoding is versioned, so changing it (or what a pack generator makes of
the same request) can never serve an entry built under the old meaning.

The key lives beside the request it hashes, not in ``gitstratum.cache``: a
pack cache stores entries under opaque keys and never needs to know what a
fetch is, so the cache package sits below the protocol package.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

import attrs

from gitstratum.core.objects import ObjectType
from gitstratum.core.oid import ObjectID
from gitstratum.protocol.upload_pack import FetchRequest, ObjectFilter
from gitstratum.protocol.walker import Peeled, RepoView, ShallowPlan
from gitstratum.storage.interfaces import Repository

__all__ = ["PackRequest", "cache_key", "normalise", "pack_key", "KEY_VERSION", "ENCODED_FIELDS"]


@attrs.frozen
class PackRequest:
    """Everything that decides the bytes of a pack, normalised (sorted ids).

    Identity, agent and progress options are deliberately absent: two
    clients asking for the same thing get the same pack.
    """

    wants: tuple[ObjectID, ...]
    haves: tuple[ObjectID, ...]
    shallow: ShallowPlan = ShallowPlan()
    filter: ObjectFilter | None = None
    include_tag: bool = False
    ofs_delta: bool = False
    thin_pack: bool = False

    @classmethod
    def of(
        cls,
        request: FetchRequest,
        wants: Sequence[ObjectID],
        haves: Sequence[ObjectID],
        shallow: ShallowPlan,
    ) -> PackRequest:
        return cls(
            wants=tuple(sorted(set(wants))),
            haves=tuple(sorted(set(haves))),
            shallow=shallow,
            filter=request.filter,
            include_tag=request.include_tag,
            ofs_delta=request.ofs_delta,
            thin_pack=request.thin_pack,
        )


#: bump when the encoding or the bytes of a pack for the same request change
KEY_VERSION = 1

#: the PackRequest fields the key encodes; a test checks this against the class
ENCODED_FIELDS = frozenset(
    {"wants", "haves", "shallow", "filter", "include_tag", "ofs_delta", "thin_pack"}
)


def _ids(name: bytes, values: Iterable[bytes]) -> bytes:
    # Count and length prefixes keep the encoding injective whatever the bytes are.
    items = sorted(set(values))
    return b"%s %d\n" % (name, len(items)) + b"".join(b"%d:%s\n" % (len(v), v) for v in items)


def _flag(name: bytes, value: bool) -> bytes:
    return b"%s %d\n" % (name, int(value))


def cache_key(repo: Repository, pack: PackRequest) -> str:
    """The hex SHA-256 key of *pack* asked of *repo*: equal exactly when the packs would be."""
    shallow = pack.shallow
    # A thin pack may only delta against objects the client has; with no
    # haves and no shallow commits of its own it has none, so the pack is
    # the same either way and both requests should share it.
    thin = pack.thin_pack and bool(pack.haves or shallow.client)
    spec = b"-" if pack.filter is None else pack.filter.spec
    material = b"".join(
        [
            b"gitstratum pack-cache key %d\n" % KEY_VERSION,
            b"repo %d\n" % repo.id,
            b"acl %s\n" % (b"public" if repo.public else b"private"),
            _ids(b"wants", pack.wants),
            _ids(b"haves", pack.haves),
            _ids(b"shallow.client", shallow.client),
            _ids(b"shallow.shallow", shallow.shallow),
            _ids(b"shallow.unshallow", shallow.unshallow),
            _ids(b"shallow.extra_wants", shallow.extra_wants),
            _ids(b"shallow.cut", shallow.cut),
            b"filter %d:%s\n" % (len(spec), spec),
            _flag(b"ofs_delta", pack.ofs_delta),
            _flag(b"thin_pack", thin),
            _flag(b"include_tag", pack.include_tag),
        ]
    )
    return hashlib.sha256(material).hexdigest()


def normalise(view: RepoView, pack: PackRequest) -> PackRequest:
    """*pack* with include-tag dropped where it provably adds nothing, so more requests share a key.

    include-tag adds an annotated tag whose target the pack carries.
    It cannot when no ref under ``refs/tags/`` is an annotated tag, nor
    when the pack's commits are exactly its wanted commits (each one is
    on the shallow cut, as in a depth-1 clone) and every annotated tag
    names some other commit.  ``git clone --depth 1`` (include-tag) and
    a fetch without it then share one entry for an untagged tip.
    """
    if not pack.include_tag:
        return pack
    tags = _annotated_tags(view)
    if tags:
        types = view.types([*pack.wants, *pack.shallow.extra_wants])
        peeled = view.peel([o for o, t in types.items() if t is ObjectType.TAG])
        commits: set[ObjectID] = set()
        for oid in (*pack.wants, *pack.shallow.extra_wants):
            kind = types.get(oid)
            if kind is ObjectType.TAG and oid in peeled:
                kind, oid = peeled[oid].type, peeled[oid].target
            if kind is ObjectType.COMMIT:
                commits.add(oid)
        if not commits <= pack.shallow.cut:
            return pack
        for tag in tags.values():
            if tag.type is not ObjectType.COMMIT or tag.target in commits:
                return pack
    return attrs.evolve(pack, include_tag=False)


def pack_key(view: RepoView, pack: PackRequest) -> str:
    """The cache key of *pack* (normalised) asked of the view's repository.

    With include-tag, the pack also depends on the annotated tags under
    ``refs/tags/`` (which to add, in ref-name order), so their names
    and ids are folded in: a tag pushed later gives a new key.
    """
    key = cache_key(view.repo, pack)
    if not pack.include_tag:
        return key
    material = hashlib.sha256(b"include-tag %s\n" % key.encode("ascii"))
    for name, oid in sorted(_annotated_tag_refs(view)):
        material.update(b"%d:%s %s\n" % (len(name), name, oid))
    return material.hexdigest()


def _annotated_tag_refs(view: RepoView) -> list[tuple[bytes, ObjectID]]:
    """The refs under ``refs/tags/`` that name annotated tags (what include-tag can add)."""
    tags = _annotated_tags(view)
    return [
        (name, oid)
        for name, oid in view.snapshot.refs.items()
        if name.startswith(b"refs/tags/") and oid in tags
    ]


def _annotated_tags(view: RepoView) -> dict[ObjectID, Peeled]:
    values = {oid for name, oid in view.snapshot.refs.items() if name.startswith(b"refs/tags/")}
    return view.peel(values)
