"""``twistd gitstratum-frontend``: a cluster frontend; for now its membership of the cluster only.

The frontend's Git and admin services over the cluster tiers come with the
frontend issue; this plugin joins the cluster with the public HTTP and SSH
addresses clients will use.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import IService

from gitstratum.cluster.node import MemberOptions
from gitstratum.control.membership import member_service
from gitstratum.control.topology import Role

__all__ = ["Options", "makeService"]


class Options(MemberOptions):
    """Options of a frontend: a member's, and the public addresses clients dial."""

    role = Role.FRONTEND.value
    public_addresses = True
    optParameters: list[Any] = [
        *MemberOptions.optParameters,
        ["http", None, None, "Public HOST:PORT of Git over HTTP."],
        ["ssh", None, None, "Public HOST:PORT of Git over SSH."],
    ]


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    return member_service(options, reactor)
