"""The linearizability checker: hand-made histories, generated ones, and a brute-force cross-check."""

from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gitstratum.raft.kv import Cas, Command, Get, Put, Result, execute
from gitstratum.raft.linearizability import Operation, check

A, B = b"a", b"b"


def op(
    client: int, call: float, ret: float | None, command: Command, output: Result = None
) -> Operation:
    return Operation(client, call, ret, command, output)


# -- hand-crafted ----------------------------------------------------------------------------


def test_empty_history_is_linearizable() -> None:
    """No operations: trivially linearizable."""
    assert check([]).ok


def test_sequential_history() -> None:
    """Non-overlapping operations that match a sequential store are linearizable."""
    history = [
        op(1, 0, 1, Put(A, b"1")),
        op(2, 2, 3, Get(A), b"1"),
        op(1, 4, 5, Cas(A, b"1", b"2"), True),
        op(2, 6, 7, Cas(A, b"1", b"3"), False),
        op(1, 8, 9, Get(A), b"2"),
        op(2, 10, 11, Get(B), None),
    ]
    assert check(history).ok


def test_stale_read_after_completed_write_is_caught() -> None:
    """A read that starts after a write returned and sees the older value is not linearizable."""
    history = [
        op(1, 0, 1, Put(A, b"1")),
        op(1, 2, 3, Put(A, b"2")),
        op(2, 4, 5, Get(A), b"1"),
    ]
    result = check(history)
    assert not result.ok
    assert result.key == A
    assert "get(b'a') -> b'1'" in result.explanation
    assert "not linearizable" in result.explanation


def test_concurrent_read_may_see_either_value() -> None:
    """A read overlapping a write may return the old or the new value."""
    for seen in (b"1", b"2"):
        history = [
            op(1, 0, 1, Put(A, b"1")),
            op(1, 2, 6, Put(A, b"2")),
            op(2, 3, 5, Get(A), seen),
        ]
        assert check(history).ok, seen


def test_reads_must_not_flip_back() -> None:
    """Two sequential reads overlapping one write cannot see new then old (the classic non-linearizable pair)."""
    history = [
        op(1, 0, 10, Put(A, b"1")),
        op(2, 1, 2, Get(A), b"1"),
        op(3, 3, 4, Get(A), None),
    ]
    assert not check(history).ok


def test_two_cas_cannot_both_win() -> None:
    """Two concurrent compare-and-swaps from the same expected value cannot both succeed."""
    history = [
        op(1, 0, 1, Put(A, b"0")),
        op(1, 2, 5, Cas(A, b"0", b"1"), True),
        op(2, 3, 6, Cas(A, b"0", b"2"), True),
    ]
    assert not check(history).ok
    history[2] = op(2, 3, 6, Cas(A, b"0", b"2"), False)
    assert check(history).ok


def test_cas_expecting_absence() -> None:
    """A CAS with expected None succeeds only while the key is absent."""
    assert check([op(1, 0, 1, Cas(A, None, b"1"), True), op(1, 2, 3, Get(A), b"1")]).ok
    history = [op(1, 0, 1, Put(A, b"x")), op(1, 2, 3, Cas(A, None, b"1"), True)]
    assert not check(history).ok


def test_unreturned_write_may_or_may_not_take_effect() -> None:
    """A write that never returned may be seen by later reads, or not, but not both in turn."""
    pending = op(1, 0, None, Put(A, b"1"))
    assert check([pending, op(2, 5, 6, Get(A), b"1")]).ok
    assert check([pending, op(2, 5, 6, Get(A), None)]).ok
    assert check([pending, op(2, 5, 6, Get(A), None), op(2, 7, 8, Get(A), b"1")]).ok
    assert not check([pending, op(2, 5, 6, Get(A), b"1"), op(2, 7, 8, Get(A), None)]).ok


def test_unreturned_write_cannot_take_effect_before_its_call() -> None:
    """An operation that never returned still cannot be seen by a read that finished before it was called."""
    history = [op(2, 0, 1, Get(A), b"1"), op(1, 2, None, Put(A, b"1"))]
    assert not check(history).ok


def test_lost_write_is_caught() -> None:
    """An acknowledged put that later reads never see is not linearizable."""
    history = [
        op(1, 0, 1, Put(A, b"1")),
        op(1, 2, 3, Put(A, b"2")),
        op(2, 4, 5, Cas(A, b"1", b"3"), True),
    ]
    assert not check(history).ok


def test_keys_are_independent() -> None:
    """A violation on one key is reported on that key even when the other key is fine."""
    history = [
        op(1, 0, 1, Put(A, b"1")),
        op(1, 2, 3, Put(B, b"1")),
        op(2, 4, 5, Get(B), None),
        op(2, 6, 7, Get(A), b"1"),
    ]
    result = check(history)
    assert not result.ok
    assert result.key == B


def test_return_before_call_is_refused() -> None:
    """An operation that returns before it is called is a malformed history."""
    with pytest.raises(ValueError):
        check([op(1, 5, 4, Get(A))])


def test_step_budget_reports_timeout() -> None:
    """With a tiny step budget the checker says it gave up instead of claiming an answer."""
    history = [op(c, 0, 100, Put(A, bytes([c])), None) for c in range(12)]
    history.append(op(99, 101, 102, Get(A), b"zz"))
    result = check(history, max_steps=5)
    assert not result.ok
    assert result.timed_out


# -- generated histories ---------------------------------------------------------------------


def _generate(
    rng: random.Random, n_ops: int, clients: int, keys: list[bytes], bug: str | None = None
) -> list[Operation]:
    """Clients run operations against one store, each taking effect at one instant inside its call.

    ``bug`` breaks the store on purpose: ``"stale"`` serves reads from a
    replica that applies writes several events late; ``"lost"`` acknowledges
    some writes without applying them.
    """
    store: dict[bytes, bytes] = {}
    lagging: dict[bytes, bytes] = {}
    backlog: list[tuple[int, bytes, bytes | None]] = []  # (due time, key, value)
    # per client: None (idle) or [phase, call time, command, output]
    busy: dict[int, list] = {}
    history: list[Operation] = []
    started = 0
    now = 0
    while started < n_ops or busy:
        now += 1
        while backlog and backlog[0][0] <= now:
            _, k, v = backlog.pop(0)
            if v is None:
                lagging.pop(k, None)
            else:
                lagging[k] = v
        client = rng.randrange(clients)
        state = busy.get(client)
        if state is None:
            if started >= n_ops:
                continue
            key = rng.choice(keys)
            kind = rng.random()
            command: Command
            if kind < 0.35:
                command = Put(key, str(rng.randrange(4)).encode())
            elif kind < 0.7:
                command = Get(key)
            else:
                expected = rng.choice([None, b"0", b"1", b"2", b"3"])
                command = Cas(key, expected, str(rng.randrange(4)).encode())
            busy[client] = ["called", now, command, None]
            started += 1
        elif state[0] == "called":
            command = state[2]
            output: Result
            if bug == "stale" and isinstance(command, Get):
                output = lagging.get(command.key)
            else:
                output, new = execute(store.get(command.key), command)
                if not (bug == "lost" and isinstance(command, Put) and rng.random() < 0.3):
                    if new is None:
                        store.pop(command.key, None)
                    else:
                        store[command.key] = new
                    backlog.append((now + rng.randrange(1, 30), command.key, new))
                    backlog.sort(key=lambda item: item[0])
            state[0] = "applied"
            state[3] = output
        else:
            # Now and then a client never hears back (its server crashed).
            ret = None if rng.random() < 0.05 else now
            history.append(Operation(client, state[1], ret, state[2], state[3]))
            del busy[client]
    return history


@pytest.mark.parametrize("seed", range(40))
def test_correct_store_histories_are_linearizable(seed: int) -> None:
    """Any interleaving of clients against a correct atomic store is accepted."""
    rng = random.Random(seed)
    history = _generate(rng, 300, clients=5, keys=[A, B, b"c"])
    result = check(history)
    assert result.ok, result.explanation


@pytest.mark.parametrize("bug", ["stale", "lost"])
def test_broken_store_histories_are_caught(bug: str) -> None:
    """Stale follower reads and lost writes are reported as non-linearizable."""
    caught = sum(
        not check(_generate(random.Random(seed), 200, clients=4, keys=[A, B], bug=bug)).ok
        for seed in range(30)
    )
    # The bug shows in almost every run of 200 operations; a checker that
    # says yes to everything catches none.
    assert caught >= 25


def _brute_force(history: list[Operation]) -> bool:
    """The definition, by enumeration: some subset of the unreturned ops plus all returned ones,
    in an order that respects real time, reproduces every answer."""
    done = [o for o in history if o.return_time is not None]
    pending = [o for o in history if o.return_time is None]
    for r in range(len(pending) + 1):
        for chosen in itertools.combinations(pending, r):
            ops = done + list(chosen)
            for order in itertools.permutations(ops):
                if _fits(order):
                    return True
    return False


def _fits(order: tuple[Operation, ...]) -> bool:
    for i, later in enumerate(order):
        for earlier in order[i + 1 :]:
            # ``earlier`` is placed after ``later`` yet returned before ``later`` was called.
            if earlier.return_time is not None and earlier.return_time < later.call_time:
                return False
    values: dict[bytes, bytes | None] = {}
    for o in order:
        result, values[o.input.key] = execute(values.get(o.input.key), o.input)
        if o.return_time is not None and result != o.output:
            return False
    return True


small_commands = st.one_of(
    st.builds(Put, st.sampled_from([A, B]), st.sampled_from([b"1", b"2"])),
    st.builds(Get, st.sampled_from([A, B])),
    st.builds(
        Cas,
        st.sampled_from([A, B]),
        st.sampled_from([None, b"1", b"2"]),
        st.sampled_from([b"1", b"2"]),
    ),
)


@st.composite
def small_histories(draw: st.DrawFn) -> list[Operation]:
    n = draw(st.integers(0, 6))
    history = []
    for client in range(n):
        command = draw(small_commands)
        call = draw(st.integers(0, 8))
        ret = draw(st.none() | st.integers(call, 10))
        if isinstance(command, Get):
            output: Result = draw(st.sampled_from([None, b"1", b"2"]))
        elif isinstance(command, Cas):
            output = draw(st.booleans())
        else:
            output = None
        history.append(Operation(client, call, ret, command, output))
    return history


@settings(max_examples=400, deadline=None)
@given(small_histories())
def test_agrees_with_brute_force(history: list[Operation]) -> None:
    """On small random histories the checker's verdict equals the definition's, by enumeration."""
    assert check(history).ok == _brute_force(history)


def test_long_history_is_fast() -> None:
    """A few thousand concurrent operations on three keys are decided within a modest step count."""
    history = _generate(random.Random(7), 3000, clients=8, keys=[A, B, b"c"])
    result = check(history)
    assert result.ok, result.explanation
    assert result.steps < 200_000
