"""Object ids: 40 lowercase hex ASCII bytes, the form dulwich and the wire use."""

from __future__ import annotations

import binascii
import re
from typing import NewType

__all__ = ["ObjectID", "ZERO_OID", "is_oid", "oid", "to_bin", "from_bin"]

ObjectID = NewType("ObjectID", bytes)

ZERO_OID = ObjectID(b"0" * 40)

_HEX40 = re.compile(rb"\A[0-9a-f]{40}\Z")


def is_oid(value: bytes) -> bool:
    """True when *value* is a well-formed lowercase 40-hex object id."""
    return bool(_HEX40.match(value))


def oid(value: bytes | str) -> ObjectID:
    """Validate and type *value* as an ObjectID; raise ValueError when malformed."""
    if isinstance(value, str):
        value = value.encode("ascii", "replace")
    if not is_oid(value):
        raise ValueError(f"malformed object id: {value[:60]!r}")
    return ObjectID(value)


def to_bin(value: ObjectID) -> bytes:
    """The 20-byte binary form, used as LMDB keys and in tree entries."""
    return binascii.unhexlify(value)


def from_bin(value: bytes) -> ObjectID:
    """The hex form of a 20-byte binary id."""
    return ObjectID(binascii.hexlify(value))
