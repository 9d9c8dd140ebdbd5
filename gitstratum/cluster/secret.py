"""The cluster secret: 32 random bytes every node holds, in a file only its user can read.

The first control node makes it (``load_or_create``); every other node is
given the file (``--cluster-secret-file``) and only reads it (``load``).
A node without it cannot join the cluster or send any command to a node.
"""

from __future__ import annotations

import binascii
import os
import secrets
import stat

__all__ = ["SECRET_BYTES", "SecretError", "load", "load_or_create"]

SECRET_BYTES = 32


class SecretError(Exception):
    """The secret file is missing, malformed, or readable by other users."""


def load(path: str) -> bytes:
    """The secret in *path* (hex, one line); refuse a file group or others can read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise SecretError(f"no cluster secret at {path}") from None
    except OSError as e:
        raise SecretError(f"cannot read the cluster secret at {path}: {e.strerror}") from None
    try:
        mode = os.fstat(fd).st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise SecretError(f"{path} is readable by other users; chmod 600 it")
        text = os.read(fd, 4096).decode("ascii", "replace").strip()
    finally:
        os.close(fd)
    try:
        secret = binascii.unhexlify(text)
    except binascii.Error:
        raise SecretError(f"{path} does not hold a hex secret") from None
    if len(secret) < SECRET_BYTES:
        raise SecretError(f"{path} holds {len(secret)} bytes; a secret has {SECRET_BYTES}")
    return secret


def load_or_create(path: str) -> bytes:
    """The secret in *path*, made first (mode 0600, never replacing a file) if there is none."""
    secret = secrets.token_bytes(SECRET_BYTES)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        return load(path)
    try:
        os.write(fd, binascii.hexlify(secret) + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    return secret
