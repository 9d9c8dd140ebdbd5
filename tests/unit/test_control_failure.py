"""The failure detector: which members the leader marks down or active, and when."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gitstratum.control.commands import (
    Applied,
    Command,
    Drain,
    Heartbeat,
    Join,
    MarkActive,
    MarkDown,
    Remove,
    encode_command,
)
from gitstratum.control.errors import Refusal, Refused
from gitstratum.control.failure import DEFAULT_WINDOW, FailureDetector
from gitstratum.control.state import ControlState
from gitstratum.control.topology import Member, MemberState, RingConfig, Role

WATCHED = (MemberState.JOINING, MemberState.ACTIVE)


class Leader:
    """A ControlState and the leader's clock: what the control service will do, without the reactor."""

    def __init__(self, detector: FailureDetector | None = None) -> None:
        self.state = ControlState(config=RingConfig(vnodes=4))
        self.detector = detector or FailureDetector()
        self.now = 0.0

    def apply(self, command: Command) -> Applied | Refused:
        result = self.state.apply(self.state.applied_index + 1, encode_command(command))
        assert isinstance(result, Applied | Refused)
        return result

    def join(self, node_id: str, *roles: str, host: int) -> None:
        result = self.apply(Join(node_id, roles, f"127.0.0.{host}:7000", at=self.now))
        assert isinstance(result, Applied)

    def check(self, grace_until: float = -math.inf) -> list[MarkDown | MarkActive]:
        """Run the detector and propose (apply) what it says; return what it said."""
        commands = self.detector.check(
            self.state.topology().members, self.now, grace_until=grace_until
        )
        for command in commands:
            assert isinstance(self.apply(command), Applied), command
        return commands

    def state_of(self, node_id: str) -> MemberState:
        return self.state.members[node_id].state


def member(node_id: str, state: MemberState, last: float, *roles: Role) -> Member:
    return Member(
        id=node_id,
        roles=frozenset(roles or (Role.FRONTEND,)),
        address=f"{node_id}.example:1",
        state=state,
        last_heartbeat=last,
    )


def test_the_window_defaults_to_ten_seconds_and_is_an_option() -> None:
    """The window is 10 s unless given, and decides who is down."""
    assert FailureDetector().window == DEFAULT_WINDOW == 10.0
    members = [member("a", MemberState.ACTIVE, 100.0)]
    assert FailureDetector().check(members, 105.0) == []
    assert FailureDetector(window=2.0).check(members, 105.0) == [MarkDown("a", 103.0)]


@pytest.mark.parametrize("window", [0, -1.0, math.nan, math.inf, "10"])
def test_a_window_that_is_not_a_positive_number_is_refused(window: object) -> None:
    """A window must be a finite positive number of seconds."""
    with pytest.raises(ValueError, match="window"):
        FailureDetector(window=window)  # type: ignore[arg-type]


def test_silent_members_go_down_and_heard_ones_come_back() -> None:
    """joining/active silent past the window: MarkDown; down and heard within it: MarkActive; in id order."""
    members = [
        member("e-active-silent", MemberState.ACTIVE, 80.0),
        member("d-joining-silent", MemberState.JOINING, 50.0),
        member("c-active-fresh", MemberState.ACTIVE, 95.0),
        member("b-down-fresh", MemberState.DOWN, 91.0),
        member("a-down-silent", MemberState.DOWN, 10.0),
        member("f-draining-silent", MemberState.DRAINING, 0.0),
        member("g-removed-silent", MemberState.REMOVED, 0.0),
    ]
    assert FailureDetector().check(members, 100.0) == [
        MarkActive("b-down-fresh", 90.0),
        MarkDown("d-joining-silent", 90.0),
        MarkDown("e-active-silent", 90.0),
    ]


def test_the_window_boundary() -> None:
    """Heard exactly one window ago is still alive; a moment earlier is down."""
    detector = FailureDetector(window=10.0)
    assert detector.check([member("a", MemberState.ACTIVE, 90.0)], 100.0) == []
    assert detector.check([member("a", MemberState.ACTIVE, 89.99)], 100.0) == [MarkDown("a", 90.0)]
    assert detector.check([member("a", MemberState.DOWN, 90.0)], 100.0) == [MarkActive("a", 90.0)]


def test_control_nodes_are_watched_like_any_member() -> None:
    """A silent control node is marked down, and active when it is heard again."""
    leader = Leader()
    leader.join("control-1", "control", host=2)
    leader.join("control-2", "control", host=3)
    leader.now = 5.0
    leader.apply(Heartbeat(("control-1", "control-2"), at=5.0))
    leader.now = 12.0
    leader.apply(Heartbeat(("control-1",), at=12.0))
    leader.now = 16.0
    assert leader.check() == [MarkDown("control-2", 6.0)]
    assert leader.state_of("control-2") is MemberState.DOWN
    leader.apply(Heartbeat(("control-2",), at=16.5))
    leader.now = 17.0
    assert leader.check() == [MarkActive("control-2", 7.0)]
    assert leader.state_of("control-2") is MemberState.ACTIVE


def test_a_new_leader_waits_out_its_grace_before_marking_down() -> None:
    """No MarkDown while now < grace_until (heartbeats may have been lost in the election); MarkActive goes."""
    members = [member("a", MemberState.ACTIVE, 0.0), member("b", MemberState.DOWN, 105.0)]
    detector = FailureDetector()
    assert detector.check(members, 100.0, grace_until=110.0) == [MarkActive("b", 90.0)]
    assert detector.check(members, 110.0, grace_until=110.0) == [
        MarkDown("a", 100.0),
        MarkActive("b", 100.0),
    ]


def test_a_leader_clock_younger_than_the_window_proposes_valid_commands() -> None:
    """Before the window has passed once (a test Clock at 0), cutoffs are 0, which apply accepts."""
    leader = Leader()
    leader.join("a", "frontend", host=2)
    leader.apply(MarkDown("a", cutoff=1.0))
    leader.apply(Heartbeat(("a",), at=2.0))
    leader.now = 3.0
    assert leader.check() == [MarkActive("a", 0.0)]
    assert leader.state_of("a") is MemberState.ACTIVE


def test_a_heartbeat_that_commits_first_wins() -> None:
    """A MarkDown decided before a heartbeat committed is refused when applied after it."""
    leader = Leader()
    leader.join("a", "object", host=2)
    leader.now = 20.0
    commands = leader.detector.check(leader.state.topology().members, leader.now)
    assert commands == [MarkDown("a", 10.0)]
    leader.apply(Heartbeat(("a",), at=19.9))
    result = leader.apply(commands[0])
    assert isinstance(result, Refused) and result.reason is Refusal.STALE_HEARTBEAT
    assert leader.state_of("a") is MemberState.ACTIVE


def test_a_killed_member_is_down_within_the_window_and_active_after_restart() -> None:
    """Heartbeats every second, the detector every second: down within window + 1 s of the last beat."""
    leader = Leader(FailureDetector(window=5.0))
    leader.join("control-1", "control", host=2)
    leader.join("object-1", "object", host=3)
    down_at = active_at = None
    for tick in range(1, 61):
        leader.now = float(tick)
        alive = ["control-1"] + (["object-1"] if not 20 <= tick < 40 else [])
        leader.apply(Heartbeat(tuple(alive), at=leader.now))
        for command in leader.check():
            assert command.id == "object-1"
            if isinstance(command, MarkDown):
                down_at = tick
            else:
                active_at = tick
    # last heard at 19: down once 19 < now - 5, at 25; heard again at 40
    assert down_at == 25 and active_at == 40
    assert leader.state_of("object-1") is MemberState.ACTIVE
    # a down node kept its place on the ring throughout
    assert "object-1" in leader.state.topology().ring(Role.OBJECT).nodes


def test_drained_and_removed_members_are_left_alone() -> None:
    """Draining and removed members are never marked down or active."""
    leader = Leader()
    leader.join("control-1", "control", host=2)
    leader.join("o", "object", host=3)
    leader.join("f", "frontend", host=4)
    leader.apply(Drain("o"))
    leader.apply(Remove("f"))
    leader.now = 1000.0
    leader.apply(Heartbeat(("control-1",), at=1000.0))
    assert leader.check() == []


states = st.sampled_from(list(MemberState))


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(states, st.floats(0, 200)), max_size=12),
    st.floats(0, 200),
    st.floats(0.1, 50),
    st.floats(0, 250),
)
def test_the_detector_matches_its_specification(
    specs: list[tuple[MemberState, float]], now: float, window: float, grace_until: float
) -> None:
    """For any members and clock: MarkDown exactly for watched members silent past the window (after
    grace), MarkActive exactly for down members heard within it, nothing else, each id once."""
    members = [member(f"m{i:02d}", s, last) for i, (s, last) in enumerate(specs)]
    commands = FailureDetector(window=window).check(members, now, grace_until=grace_until)
    cutoff = max(0.0, now - window)
    down = {c.id for c in commands if isinstance(c, MarkDown)}
    active = {c.id for c in commands if isinstance(c, MarkActive)}
    assert down == {
        m.id
        for m in members
        if m.state in WATCHED and m.last_heartbeat < cutoff and now >= grace_until
    }
    assert active == {
        m.id for m in members if m.state is MemberState.DOWN and m.last_heartbeat >= cutoff
    }
    assert [c.id for c in commands] == sorted(down | active)
    assert all(c.cutoff == cutoff for c in commands)
