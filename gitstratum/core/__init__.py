"""Pure Git building blocks: ids, objects, pkt-line, ref names, packs. No reactor here."""

__all__: list[str] = []
