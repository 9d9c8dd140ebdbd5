"""Raft consensus: a pure core, an LMDB log, an AMP transport and the one driver that ties them to the reactor."""

__all__: list[str] = []
