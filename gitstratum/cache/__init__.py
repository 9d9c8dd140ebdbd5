"""The pack cache: raw packs stored once under an opaque key and streamed to every later identical request.

What a key means (which requests share a pack) is decided above, in ``gitstratum.protocol.pack_key``.
"""

__all__: list[str] = []
