"""A tier node's membership service, bound to the control plane's Join encoding and topology decoder.

``cluster`` cannot import ``control`` (the control server imports
``cluster``), so ``cluster.node.member_node`` takes the two as arguments;
every tier's plugin binds them the same way, here.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import IService

from gitstratum.cluster.node import MemberOptions, member_node
from gitstratum.control.commands import Join, encode_command
from gitstratum.control.topology import Topology

__all__ = ["member_service"]


def member_service(options: MemberOptions, reactor: Any) -> IService:
    """The service tree of a node that, for now, only holds its place in the cluster."""
    return member_node(
        options,
        join=lambda **kw: encode_command(Join(**kw)),
        decode=Topology.decode,
        reactor=reactor,
    )
