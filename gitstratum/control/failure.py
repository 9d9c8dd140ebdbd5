"""The failure detector: which members the leader should mark down, and which active again.

Pure: the leader's control service calls :meth:`FailureDetector.check` with
the members (``state.topology().members``) and its own clock's ``now``, on
a timer, and proposes the commands it gets. Nothing here reads a clock or
keeps state between calls, so a new leader picks up where the old one
left off from the replicated heartbeat times alone.

- A ``joining`` or ``active`` member last heard from before
  ``now - window`` gets ``MarkDown``.
- A ``down`` member heard from at or after ``now - window`` gets
  ``MarkActive``.
- ``draining`` and ``removed`` members are left alone. Control nodes are
  members like any other (the leader's own member service heartbeats to
  it too).

Each command carries the cutoff it was decided on, and ``apply`` checks it
again, so a heartbeat that commits between this look and the command wins.

**After a change of leader**, the heartbeats members sent during the
election may have gone nowhere; pass ``grace_until = took_office + window``
and no member is marked down before then. Heartbeat times are stamped by
whichever leader heard them, so the control nodes' clocks are assumed to
agree to well within the window (NTP); skew between them adds to, or
takes from, the window.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import attrs

from gitstratum.control.commands import MarkActive, MarkDown
from gitstratum.control.topology import Member, MemberState

__all__ = ["DEFAULT_WINDOW", "FailureDetector"]

#: seconds without a heartbeat before a member is marked down
DEFAULT_WINDOW = 10.0


def _positive(_: object, __: object, value: float) -> None:
    if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
        raise ValueError(f"the failure window is a positive number of seconds, not {value!r}")


_WATCHED = (MemberState.JOINING, MemberState.ACTIVE)


@attrs.frozen
class FailureDetector:
    """Compares heartbeat times with the leader's clock, over a window of *window* seconds."""

    window: float = attrs.field(default=DEFAULT_WINDOW, validator=_positive)

    def check(
        self, members: Iterable[Member], now: float, *, grace_until: float = -math.inf
    ) -> list[MarkDown | MarkActive]:
        """The commands to propose at the leader's time *now*, in member id order.

        No ``MarkDown`` while ``now < grace_until`` (a leader new in office);
        ``MarkActive`` is never held back.
        """
        # times are never negative, and apply refuses a negative cutoff
        cutoff = max(0.0, now - self.window)
        commands: list[MarkDown | MarkActive] = []
        for m in sorted(members, key=lambda m: m.id):
            if m.state in _WATCHED and m.last_heartbeat < cutoff and now >= grace_until:
                commands.append(MarkDown(m.id, cutoff))
            elif m.state is MemberState.DOWN and m.last_heartbeat >= cutoff:
                commands.append(MarkActive(m.id, cutoff))
        return commands
