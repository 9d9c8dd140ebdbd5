"""Ref-name validation with exactly the rules of ``git check-ref-format``.

The rules are those of git's refs.c (``check_refname_component`` and
``check_or_sanitize_refname``), applied to raw bytes: anything at or above
0x80 is allowed, so UTF-8 names pass untouched.
"""

from __future__ import annotations

__all__ = ["RefNameError", "check_ref_format", "is_valid_push_ref", "check_push_ref"]

_LOCK_SUFFIX = b".lock"

# What each byte does inside a component, as in git's refname_disposition:
# _OK ordinary, _DOT may not follow a dot, _BRACE may not follow "@",
# _BAD never allowed, _STAR allowed once when matching refspec patterns.
_OK, _DOT, _BRACE, _BAD, _STAR = range(5)
_DISPOSITION = [_OK] * 256
for _byte in [*range(0x20), 0x7F, *b" :?[\\^~"]:
    _DISPOSITION[_byte] = _BAD
_DISPOSITION[ord(".")] = _DOT
_DISPOSITION[ord("{")] = _BRACE
_DISPOSITION[ord("*")] = _STAR
del _byte


class RefNameError(ValueError):
    """A ref name that git would refuse; str() is git's wording."""


def check_ref_format(
    name: bytes, *, allow_onelevel: bool = False, refspec_pattern: bool = False
) -> bool:
    """True when ``git check-ref-format`` (with the same flags) accepts *name*."""
    if name == b"@":
        return False
    star_allowed = refspec_pattern
    components = name.split(b"/")
    for component in components:
        if not component or component.startswith(b".") or component.endswith(_LOCK_SUFFIX):
            return False
        last = 0
        for byte in component:
            disposition = _DISPOSITION[byte]
            if disposition == _BAD:
                return False
            if disposition == _DOT and last == 0x2E:
                return False
            if disposition == _BRACE and last == 0x40:
                return False
            if disposition == _STAR:
                # git clears the pattern flag at the first "*": one per name.
                if not star_allowed:
                    return False
                star_allowed = False
            last = byte
    if name.endswith(b"."):
        return False
    return allow_onelevel or len(components) >= 2


def is_valid_push_ref(name: bytes) -> bool:
    """receive-pack's rule for a ref a client may create or update."""
    return name.startswith(b"refs/") and check_ref_format(name[5:])


def check_push_ref(name: bytes) -> None:
    """Raise RefNameError, worded as receive-pack does, unless *name* may be pushed."""
    if not is_valid_push_ref(name):
        shown = name.decode("utf-8", "backslashreplace")
        raise RefNameError(f"refusing to create funny ref '{shown}' remotely")
