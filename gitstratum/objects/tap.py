"""``twistd gitstratum-object``: an object node; for now its membership of the cluster only."""

from __future__ import annotations

from twisted.application.service import IService

from gitstratum.cluster.node import MemberOptions
from gitstratum.control.membership import member_service
from gitstratum.control.topology import Role

__all__ = ["Options", "makeService"]


class Options(MemberOptions):
    """Options of an object node."""

    role = Role.OBJECT.value


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    return member_service(options, reactor)
