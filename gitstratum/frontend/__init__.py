"""The frontend tier: smart HTTP, auth, admin API, metrics; thin adapters over the engines."""

__all__: list[str] = []
