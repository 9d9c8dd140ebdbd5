"""Giving freed heap back to the operating system after large transient work."""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable

__all__ = ["release_free_heap"]


def _load_malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    trim = getattr(ctypes.CDLL(name), "malloc_trim", None)  # glibc only
    if trim is None:
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


_malloc_trim = _load_malloc_trim()


def release_free_heap() -> None:
    """Return free heap pages to the OS (glibc ``malloc_trim``); a no-op elsewhere.

    Indexing a push allocates and frees many buffers below glibc's mmap
    threshold; the freed pages otherwise stay in the process for good and
    every later request is measured on top of them.
    """
    if _malloc_trim is not None:
        _malloc_trim(0)
