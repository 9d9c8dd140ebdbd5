"""The pack cache: raw packs stored once by a normalised request key and streamed to every later identical request."""

__all__: list[str] = []
