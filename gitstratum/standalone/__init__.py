"""The embedded default: every tier in one process (``twistd gitstratum-standalone``)."""

__all__: list[str] = []
