"""What every tier's twistd plugin shares: membership options and the member's service tree.

A tier's ``tap`` subclasses :class:`MemberOptions` (naming its role) and
calls :func:`member_node` with the control plane's ``Join`` encoder and
topology decoder (``cluster`` does not import ``control``). The tree is an
AMP listener on ``--listen`` that answers nothing until the peer proves
the cluster secret, and a :class:`~gitstratum.cluster.member.MemberService`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from typing import Any

from twisted.application import strports
from twisted.application.service import MultiService
from twisted.internet.protocol import Factory
from twisted.python import usage

from gitstratum.cluster.auth import NodeAMP
from gitstratum.cluster.member import MemberService, TopologyLike, parse_join
from gitstratum.cluster.secret import SecretError, load

__all__ = ["MemberOptions", "listen_address", "member_node"]


def listen_address(listen: str) -> str | None:
    """The ``HOST:PORT`` others dial for a ``tcp:PORT:interface=HOST`` listen string, if it says."""
    parts = [p.replace("\\:", ":") for p in re.split(r"(?<!\\):", listen)]
    if parts[0] not in ("tcp", "tcp6", "ssl"):
        return None
    named = dict(p.split("=", 1) for p in parts[1:] if "=" in p)
    positional = [p for p in parts[1:] if "=" not in p]
    port = named.get("port", positional[0] if positional else None)
    host = named.get("interface")
    if not port or not port.isdigit() or host in (None, "", "0.0.0.0", "::"):
        return None
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


class MemberOptions(usage.Options):
    """The options of a cluster member; a subclass sets ``role`` and may add its own."""

    role = ""
    #: a frontend gives its public HTTP and SSH addresses
    public_addresses = False

    optParameters: list[Any] = [
        ["data-dir", "d", None, "Directory for this node's data (made if missing)."],
        ["listen", "l", "tcp:7100:interface=127.0.0.1", "AMP endpoint other nodes dial."],
        ["address", None, None, "HOST:PORT others dial (default: the --listen interface/port)."],
        ["join", "j", None, "Control addresses, HOST:PORT[,...]."],
        [
            "cluster-secret-file",
            None,
            None,
            "The cluster secret (default DATA_DIR/cluster.secret).",
        ],
        ["name", "n", None, "This node's id, unique in the cluster."],
        ["zone", "z", None, "Failure zone (replicas go to distinct zones)."],
        ["weight", "w", 1.0, "Share of the ring relative to other nodes.", float],
        ["heartbeat-interval", None, 1.0, "Seconds between heartbeats.", float],
        ["watch-wait", None, 30.0, "Seconds a topology watch waits before asking again.", float],
        ["request-timeout", None, 10.0, "Seconds a control request may take.", float],
        ["retry-max", None, 10.0, "Longest wait between dials of the control plane.", float],
    ]

    def postOptions(self) -> None:
        for required in ("data-dir", "join", "name"):
            if not self[required]:
                raise usage.UsageError(f"--{required} is required")
        try:
            self["control"] = parse_join(self["join"])
        except ValueError as e:
            raise usage.UsageError(str(e)) from None
        if self["address"] is None:
            self["address"] = listen_address(self["listen"])
            if self["address"] is None:
                raise usage.UsageError("give --address HOST:PORT: --listen does not say one")
        for name in ("weight", "heartbeat-interval", "watch-wait", "request-timeout", "retry-max"):
            if not self[name] > 0:
                raise usage.UsageError(f"--{name} must be positive")
        if self.public_addresses:
            for name in ("http", "ssh"):
                if not self[name]:
                    raise usage.UsageError(f"--{name} (the public HOST:PORT) is required")
        if self["cluster-secret-file"] is None:
            self["cluster-secret-file"] = os.path.join(self["data-dir"], "cluster.secret")


def member_node(
    options: MemberOptions,
    *,
    join: Callable[..., bytes],
    decode: Callable[[bytes], TopologyLike],
    reactor: Any,
) -> MultiService:
    """The service tree of a member: the authenticated AMP listener and the member service.

    *join* is called with the member's fields (``id``, ``roles``,
    ``address``, ``at``, ``http``, ``ssh``, ``zone``, ``weight``) and
    returns the bytes ``Join`` carries.
    """
    data_dir = options["data-dir"]
    os.makedirs(data_dir, mode=0o700, exist_ok=True)
    try:
        secret = load(options["cluster-secret-file"])
    except SecretError as e:
        raise usage.UsageError(str(e)) from None
    name = options["name"]
    public = options.public_addresses
    member = join(
        id=name,
        roles=(options.role,),
        address=options["address"],
        at=0.0,
        http=options["http"] if public else None,
        ssh=options["ssh"] if public else None,
        zone=options["zone"],
        weight=options["weight"],
    )
    top = MultiService()
    factory = Factory.forProtocol(lambda: NodeAMP(secret, name, reactor))
    strports.service(options["listen"], factory, reactor=reactor).setServiceParent(top)
    membership: MemberService[Any] = MemberService(
        reactor=reactor,
        control=options["control"],
        secret=secret,
        node_id=name,
        member=member,
        data_dir=data_dir,
        decode=decode,
        heartbeat_interval=options["heartbeat-interval"],
        watch_wait=options["watch-wait"],
        request_timeout=options["request-timeout"],
        retry_max=options["retry-max"],
    )
    membership.setName("membership")
    membership.setServiceParent(top)
    return top
