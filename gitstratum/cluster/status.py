"""Ask any control node for the cluster's status: every member, its state, the epoch, the leader.

``cluster_status`` dials the given control addresses in turn, proves the
cluster secret and sends ``ClusterStatus``; the first node that answers
wins. ``format_status`` renders the answer as a table. Run it as::

    python -m gitstratum.cluster.status --control 127.0.0.2:7100,127.0.0.3:7100 \
        --cluster-secret-file D/cluster.secret [--json]

``gitstratum cluster status --control ...`` is the same, inside the
admin command.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from typing import Any

from twisted.internet import defer, task
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import connectProtocol
from twisted.internet.error import ConnectError, ConnectionClosed
from twisted.internet.interfaces import IReactorTime
from twisted.protocols import amp
from twisted.python import usage

from gitstratum import cmdline
from gitstratum.cluster import secret as secret_file
from gitstratum.cluster.auth import AuthenticationFailed, NodeAMP, NotAuthenticated
from gitstratum.cluster.commands import ClusterStatus
from gitstratum.cluster.member import control_endpoint, parse_join

__all__ = ["StatusUnavailable", "cluster_status", "control_call", "format_status", "main"]

#: every way one control node can fail to answer; the next one is tried
_NO_ANSWER = (
    ConnectError,
    ConnectionClosed,
    defer.TimeoutError,
    defer.CancelledError,
    AuthenticationFailed,
    NotAuthenticated,
    amp.RemoteAmpError,
    ValueError,
)


class StatusUnavailable(Exception):
    """No control node answered; the message lists why, address by address."""


async def control_call(
    reactor: Any,
    control: Sequence[str],
    secret: bytes,
    command: type[amp.Command],
    *,
    timeout: float = 5.0,
    **arguments: Any,
) -> dict[str, Any]:
    """Send *command* to the first of *control* that answers; its answer.

    A node that cannot be reached, or does not prove the secret, is passed
    over for the next; what a node answers (a ``Refused`` or ``NoLeader``
    included) is the answer. ``StatusUnavailable`` when none answers.
    """
    errors = []
    for address in control:
        proto = NodeAMP(secret, "gitstratum-cli", reactor, timeout=timeout)
        try:
            await _within(
                reactor, connectProtocol(control_endpoint(reactor, address), proto), timeout
            )
            await _within(reactor, proto.authenticate(), timeout)
            return dict(await _within(reactor, proto.callRemote(command, **arguments), timeout))
        except _NO_ANSWER as e:
            errors.append(f"{address}: {e or type(e).__name__}")
        finally:
            if proto.transport is not None:
                proto.transport.loseConnection()
    raise StatusUnavailable("; ".join(errors) or "no control address given")


async def cluster_status(
    reactor: Any, control: Sequence[str], secret: bytes, *, timeout: float = 5.0
) -> dict[str, Any]:
    """The ``ClusterStatus`` document from the first of *control* that answers."""
    answer = await control_call(reactor, control, secret, ClusterStatus, timeout=timeout)
    return dict(json.loads(answer["status"]))


def _within(reactor: IReactorTime, d: Deferred[Any], timeout: float) -> Deferred[Any]:
    return d.addTimeout(timeout, reactor)


def format_status(status: dict[str, Any]) -> str:
    """A table of the members, then the epoch, the leader and its term."""
    rows = [("NAME", "ROLE", "STATE", "ADDRESS", "ZONE", "LAST HEARTBEAT")]
    for node in status.get("nodes", []):
        beat = node.get("last_heartbeat")
        rows.append(
            (
                str(node.get("name")),
                str(node.get("role")),
                str(node.get("state")),
                str(node.get("address")),
                str(node.get("zone") or "-"),
                time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(beat))
                if isinstance(beat, int | float) and beat > 0
                else "-",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.append(
        f"epoch {status.get('epoch')}  leader {status.get('leader') or '-'}"
        f"  term {status.get('term')}"
    )
    return "\n".join(lines)


class Options(usage.Options):
    synopsis = "python -m gitstratum.cluster.status --control HOST:PORT[,...] [options]"
    optParameters = [
        ["control", "c", None, "Control-plane addresses, HOST:PORT[,...]."],
        ["cluster-secret-file", None, None, "The cluster secret."],
        ["timeout", None, 5.0, "Seconds to wait for each control node.", float],
    ]
    optFlags = [["json", None, "Print the status document as JSON."]]

    def postOptions(self) -> None:
        if not self["control"] or not self["cluster-secret-file"]:
            raise usage.UsageError("--control and --cluster-secret-file are required")
        try:
            self["addresses"] = parse_join(self["control"])
        except ValueError as e:
            raise usage.UsageError(str(e)) from None


def main(argv: Sequence[str] | None = None) -> int:
    """Print the cluster's status; exits 1 when no control node answers."""
    options = Options()
    status = cmdline.parse(options, argv, "cluster-status")
    if status is not None:
        return status
    try:
        secret = secret_file.load(options["cluster-secret-file"])
    except secret_file.SecretError as e:
        print(f"cluster-status: error: {e}", file=sys.stderr)
        return 1

    async def run(reactor: Any) -> None:
        try:
            doc = await cluster_status(
                reactor, options["addresses"], secret, timeout=options["timeout"]
            )
        except StatusUnavailable as e:
            print(f"cluster-status: error: no control node answered: {e}", file=sys.stderr)
            raise SystemExit(1) from None
        print(json.dumps(doc, indent=2, sort_keys=True) if options["json"] else format_status(doc))

    # react() stops the reactor and exits the process with run's outcome
    task.react(lambda reactor: defer.ensureDeferred(run(reactor)), [])
    return 0


if __name__ == "__main__":
    sys.exit(main())
