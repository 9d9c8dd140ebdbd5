"""``twistd gitstratum-metadata``: a metadata node; for now its membership of the cluster only."""

from __future__ import annotations

from twisted.application.service import IService

from gitstratum.cluster.node import MemberOptions, member_node
from gitstratum.control.commands import Join, encode_command
from gitstratum.control.topology import Role, Topology

__all__ = ["Options", "makeService"]


class Options(MemberOptions):
    """Options of a metadata node."""

    role = Role.METADATA.value


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    return member_node(
        options,
        join=lambda **kw: encode_command(Join(**kw)),
        decode=Topology.decode,
        reactor=reactor,
    )
