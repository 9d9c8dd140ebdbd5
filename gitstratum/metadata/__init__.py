"""The metadata tier: refs and repository records, partitioned over the metadata ring.

For now only its twistd plugin (``tap``): a node that joins the cluster and
keeps its topology.
"""

__all__: list[str] = []
