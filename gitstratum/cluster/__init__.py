"""What every cluster node shares: node authentication, the member service and its topology cache.

``secret`` makes and loads the cluster secret; ``auth`` is the AMP
connection that proves it before any other command.
"""

__all__: list[str] = []
