"""Where a key sits on the ring: object ids as they are, names hashed first.

The keyspace is the 64-bit integers. An object id is uniformly random
already, so its first eight bytes are its position: no hashing on the hot
path, and a BucketStore keyed by object id keeps every ring range one
contiguous cursor range. A repository (for its metadata partition) and a
pack-cache key are not uniform, so they are hashed with BLAKE2b first.
"""

from __future__ import annotations

import binascii
import hashlib

__all__ = [
    "KEYSPACE",
    "hash64",
    "metadata_partition",
    "partition_position",
    "position_of_name",
    "position_of_oid",
]

KEYSPACE = 1 << 64


def hash64(data: bytes) -> int:
    """A stable 64-bit hash (BLAKE2b-64): the same in every process and Python version."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


def position_of_oid(oid: bytes) -> int:
    """The ring position of an object id, in hex (40 bytes) or binary (20 bytes) form."""
    if len(oid) == 40:
        oid = binascii.unhexlify(oid)
    elif len(oid) != 20:
        raise ValueError(f"not an object id: {oid[:64]!r}")
    return int.from_bytes(oid[:8], "big")


def position_of_name(name: bytes | str) -> int:
    """The ring position of a name (a pack-cache key, a repository), hashed first."""
    if isinstance(name, str):
        name = name.encode("utf-8")
    return hash64(b"name\0" + name)


def metadata_partition(repository: str, partitions: int) -> int:
    """The metadata partition (0 to *partitions* - 1) a repository lives in."""
    if partitions < 1:
        raise ValueError("the number of partitions must be at least 1")
    return hash64(b"repository\0" + repository.encode("utf-8")) % partitions


def partition_position(partition: int) -> int:
    """The ring position of a metadata partition, which places its Raft group's replicas."""
    return hash64(b"partition\0%d" % partition)
