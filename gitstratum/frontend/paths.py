"""Parsing smart-HTTP request paths into (repository, endpoint), refusing traversal.

The raw request path is checked before anything is looked up: a percent-
encoded dot segment, an encoded slash, a NUL or an empty segment is an
attack or a mistake, never a repository name.
"""

from __future__ import annotations

import re
from urllib.parse import unquote_to_bytes

import attrs

__all__ = [
    "GitPath",
    "BadPath",
    "parse_git_path",
    "REPO_PART",
    "RESERVED_OWNERS",
    "valid_repo_name",
]

REPO_PART = re.compile(r"\A[A-Za-z0-9_][A-Za-z0-9._-]{0,99}\Z")

_ENDPOINTS = (b"info/refs", b"git-upload-pack", b"git-receive-pack")
# What a dumb-HTTP client asks for; answered with a clear 404.
_DUMB = re.compile(
    rb"\A(HEAD|objects/.*|info/packs|info/alternates|info/http-alternates|info/refs)\Z"
)


class BadPath(ValueError):
    """A path that can never name a repository (traversal, NUL, encoded separators)."""


@attrs.frozen
class GitPath:
    repo: str  # OWNER/NAME without .git
    endpoint: bytes  # one of _ENDPOINTS, or b"dumb"


#: owners that would collide with the server's own routes
RESERVED_OWNERS = frozenset({"api", "healthz", "metrics"})


def valid_repo_name(name: str) -> bool:
    """True for OWNER/NAME that every transport can serve.

    Each part starts with a letter, digit or ``_`` and holds only
    ``A-Z a-z 0-9 . _ -``; neither holds ``..`` (SSH and git:// refuse any
    path with it before looking anything up); neither ends in ``.git`` (the
    suffix is optional in URLs); NAME does not end in ``.`` (``NAME.git``
    would then hold ``..``); OWNER is not one of the server's own routes.
    """
    parts = name.split("/")
    return (
        len(parts) == 2
        and all(REPO_PART.match(p) and ".." not in p for p in parts)
        and not any(p.endswith(".git") for p in parts)
        and not parts[1].endswith(".")
        and parts[0] not in RESERVED_OWNERS
    )


def parse_git_path(raw_path: bytes) -> GitPath | None:
    """Split a raw (still percent-encoded) request path.

    Returns None when the path is well-formed but names no Git endpoint, and
    raises BadPath for traversal attempts and other paths that are unsafe.
    """
    decoded = unquote_to_bytes(raw_path)
    if b"\x00" in decoded or b"\\" in decoded:
        raise BadPath("invalid repository path: NUL or backslash")
    if raw_path.lower().count(b"%2f") or raw_path.lower().count(b"%5c"):
        raise BadPath("invalid repository path: encoded separator")
    if not decoded.startswith(b"/") or decoded.startswith(b"//"):
        raise BadPath("invalid repository path: absolute or empty segment")
    if decoded == b"/":
        return None
    segments = decoded[1:].split(b"/")
    if any(s in (b".", b"..") for s in segments):
        raise BadPath("invalid repository path: '..' is not allowed")
    if any(s == b"" for s in segments):
        raise BadPath("invalid repository path: empty segment")
    if len(segments) < 3:
        return None
    owner, name = segments[0], segments[1]
    rest = b"/".join(segments[2:])
    try:
        owner_s, name_s = owner.decode("ascii"), name.decode("ascii")
    except UnicodeDecodeError:
        return None
    if name_s.endswith(".git"):
        name_s = name_s[:-4]
    repo = f"{owner_s}/{name_s}"
    if not valid_repo_name(repo):
        return None
    if rest in _ENDPOINTS:
        return GitPath(repo, rest)
    if _DUMB.match(rest):
        return GitPath(repo, b"dumb")
    return None
