"""Why the control plane refuses a command: a closed set of reasons, as a value and as an exception.

A refused command changes nothing, on every replica alike, so a refusal is
an ordinary *result* of ``ControlState.apply`` (a :class:`Refused` value),
not an exception that would stop the Raft driver.  The service layer turns
it into an exception with :meth:`Refused.raise_` (or
:func:`gitstratum.control.commands.unwrap`) and maps the
:class:`CommandRefused` it gets to the wire: the ``reason`` is the stable
tag (``DUPLICATE_ID``), the message says which value was wrong.
"""

from __future__ import annotations

import enum
from typing import NoReturn

import attrs

__all__ = ["CommandRefused", "Refusal", "Refused"]


class Refusal(enum.Enum):
    """Every reason a command can be refused; the value is the wire tag."""

    #: bytes that are not a command of this version (wrong type, unknown key, bad JSON)
    MALFORMED = "MALFORMED"
    #: the command carried ``expect_epoch`` and the epoch has moved on
    STALE_EPOCH = "STALE_EPOCH"
    BAD_ID = "BAD_ID"
    UNKNOWN_ROLE = "UNKNOWN_ROLE"
    BAD_ADDRESS = "BAD_ADDRESS"
    BAD_WEIGHT = "BAD_WEIGHT"
    BAD_ZONE = "BAD_ZONE"
    #: a time that is not a finite, non-negative number of seconds
    BAD_TIME = "BAD_TIME"
    #: the id is a member already, with another address or other settings
    DUPLICATE_ID = "DUPLICATE_ID"
    #: another member (or this member's other service) already uses the address
    DUPLICATE_ADDRESS = "DUPLICATE_ADDRESS"
    #: no member with this id, or it was removed
    UNKNOWN_NODE = "UNKNOWN_NODE"
    #: the member's state does not allow the transition (mark a draining node down)
    BAD_STATE = "BAD_STATE"
    #: the member was heard from after the failure detector looked
    STALE_HEARTBEAT = "STALE_HEARTBEAT"
    #: it would remove the last control node
    LAST_CONTROL = "LAST_CONTROL"
    #: it would remove a node that still holds data; drain it first
    HOLDS_DATA = "HOLDS_DATA"
    BAD_CONFIG = "BAD_CONFIG"
    #: vnodes and partitions are fixed once any member is on a ring
    CONFIG_LOCKED = "CONFIG_LOCKED"
    #: the ring has no room for the joiner's tokens
    RING_FULL = "RING_FULL"


class CommandRefused(ValueError):
    """A command the control plane would not apply; nothing changed."""

    def __init__(self, reason: Refusal, message: str) -> None:
        super().__init__(f"{reason.value}: {message}")
        self.reason = reason
        self.message = message

    @property
    def refused(self) -> Refused:
        return Refused(self.reason, self.message)


@attrs.frozen
class Refused:
    """The result of a refused command: why, and which value was wrong."""

    reason: Refusal
    message: str

    def raise_(self) -> NoReturn:
        raise CommandRefused(self.reason, self.message)
