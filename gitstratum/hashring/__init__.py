"""The hash ring: vnode placement, preference lists, epochs and the diff between two rings.

Pure: no reactor, no I/O, no clock, and nothing of ours but ``core``. Every
process that holds the same membership (with its tokens) computes the same
ring, the same preference lists and the same diff. ``keys`` maps object ids,
repositories and pack-cache keys to ring positions; ``ring`` is the rest.
"""

__all__: list[str] = []
