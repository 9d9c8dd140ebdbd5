"""The pack-cache key: a hash of exactly what decides a pack's bytes, and of nothing else.

Two requests share a key when they would get the same pack: the same
repository and read-ACL class, the same (sorted, deduplicated) wants and
common haves, the same shallow plan, filter and byte-changing
capabilities.  Who asks, with which agent, and whether progress or
side-band was requested never enter it: a cached pack is raw and framed at
send time, and identity in the key would split one CI fleet's clones into
as many entries as it has tokens.

The encoding is versioned, so changing it (or what a pack generator makes of
the same request) can never serve an entry built under the old meaning.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from gitstratum.protocol.upload_service import PackRequest
from gitstratum.storage.interfaces import Repository

__all__ = ["cache_key", "KEY_VERSION", "ENCODED_FIELDS"]

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
