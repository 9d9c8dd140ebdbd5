"""The object tier: Git objects placed on the object ring, replicated and handed off.

For now only its twistd plugin (``tap``): a node that joins the cluster and
keeps its topology.
"""

__all__: list[str] = []
