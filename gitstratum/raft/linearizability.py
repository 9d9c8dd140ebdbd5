"""A linearizability checker for histories of the Raft key-value store (Wing & Gong, as Porcupine does it).

A history is a sequence of ``Operation``: when a client called, when it got
the answer (``None`` if it never did: the operation may or may not have
taken effect), the command and the answer.  ``check`` decides whether some
total order of the operations respects real time (an operation that
returned before another was called comes first) and, applied one after
another to an empty store, gives every answer the clients saw.

The search is Porcupine's ``checkSingle``: walk the calls and returns in
time order; at a call, try to linearize that operation now (if the model
gives the recorded answer), at a return whose operation is not yet
linearized, backtrack.  Pairs of (set of linearized operations, model
state) already explored are cached, which turns the worst case from
factorial into something that is fast for real histories.  Keys are
independent in this model, so the history is split per key first (the
P-compositionality Porcupine also uses) and each part checked on its own.

An operation that never returned is given a return time after everything
else and accepts any answer, so it can always be placed last, where it
changes nothing another client saw: exactly "may or may not have happened".
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import attrs

from gitstratum.raft.kv import Cas, Command, Get, Put, Result, execute

__all__ = ["Operation", "CheckResult", "check"]

_CALL = 0
_RETURN = 1


@attrs.frozen
class Operation:
    """One client operation; times are any totally ordered numbers (the simulator uses an event counter)."""

    client: int
    call_time: float
    #: ``None``: the client never learned the outcome (it may or may not have taken effect)
    return_time: float | None
    input: Command
    #: the answer the client saw; ignored when ``return_time`` is ``None``
    output: Result = None


@attrs.frozen
class CheckResult:
    """The verdict; when it is no, ``explanation`` says which key and where the search got stuck."""

    ok: bool
    explanation: str = ""
    #: the key whose operations cannot be linearized
    key: bytes | None = None
    #: the longest order of that key's operations the search could justify
    longest_prefix: tuple[Operation, ...] = ()
    #: the search gave up (``max_steps``) before deciding; ``ok`` is then False
    timed_out: bool = False
    #: search steps taken (for tuning and tests)
    steps: int = 0


def _describe(op: Operation) -> str:
    command = op.input
    if isinstance(command, Put):
        what = f"put({command.key!r}, {command.value!r})"
    elif isinstance(command, Get):
        what = f"get({command.key!r})"
    elif isinstance(command, Cas):
        what = f"cas({command.key!r}, {command.expected!r}, {command.new!r})"
    else:
        raise TypeError(f"not a KV command: {command!r}")
    if op.return_time is None:
        return f"client {op.client}: {what} -> ? [{op.call_time}, never returned]"
    return f"client {op.client}: {what} -> {op.output!r} [{op.call_time}, {op.return_time}]"


@attrs.frozen
class _Verdict:
    ok: bool
    steps: int
    timed_out: bool = False
    longest: tuple[int, ...] = ()
    state_after_longest: bytes | None = None


def _check_key(ops: Sequence[Operation], max_steps: int | None) -> _Verdict:
    """Porcupine's DFS over one key's operations, with (linearized set, state) memoization."""
    n = len(ops)
    events: list[tuple[float, int, int]] = []
    for j, op in enumerate(ops):
        events.append((op.call_time, _CALL, j))
        events.append((math.inf if op.return_time is None else op.return_time, _RETURN, j))
    # At equal times calls sort before returns: the two operations are then
    # treated as concurrent, the permissive reading of a tie.
    events.sort(key=lambda e: (e[0], e[1], e[2]))

    # A doubly linked list over the events, with a sentinel head at 2n and
    # -1 for the end, so linearized operations can be lifted out and put back
    # in O(1) as the search goes down and backtracks.
    head = 2 * n
    kind = [0] * (2 * n)
    op_of = [0] * (2 * n)
    match = [0] * (2 * n)
    call_node = [0] * n
    ret_node = [0] * n
    for node, (_, k, j) in enumerate(events):
        kind[node] = k
        op_of[node] = j
        if k == _CALL:
            call_node[j] = node
        else:
            ret_node[j] = node
    for j in range(n):
        match[call_node[j]] = ret_node[j]
    nxt = list(range(1, 2 * n)) + [-1, 0 if n else -1]
    prv = [head] + list(range(0, 2 * n - 1)) + [-1]

    def lift(call: int) -> None:
        for node in (call, match[call]):
            p, q = prv[node], nxt[node]
            nxt[p] = q
            if q != -1:
                prv[q] = p

    def unlift(call: int) -> None:
        for node in (match[call], call):
            p, q = prv[node], nxt[node]
            nxt[p] = node
            if q != -1:
                prv[q] = node

    state: bytes | None = None
    linearized = 0
    cache: set[tuple[int, bytes | None]] = set()
    stack: list[tuple[int, bytes | None]] = []
    longest: tuple[int, ...] = ()
    state_after_longest: bytes | None = None
    steps = 0
    entry = nxt[head]
    while nxt[head] != -1:
        steps += 1
        if max_steps is not None and steps > max_steps:
            return _Verdict(False, steps, True, longest, state_after_longest)
        if kind[entry] == _CALL:
            j = op_of[entry]
            op = ops[j]
            result, new_state = execute(state, op.input)
            if op.return_time is None or result == op.output:
                key = (linearized | (1 << j), new_state)
                if key not in cache:
                    cache.add(key)
                    stack.append((entry, state))
                    state = new_state
                    linearized = key[0]
                    lift(entry)
                    if len(stack) > len(longest):
                        longest = tuple(op_of[c] for c, _ in stack)
                        state_after_longest = state
                    entry = nxt[head]
                    continue
            entry = nxt[entry]
        else:
            if not stack:
                return _Verdict(False, steps, False, longest, state_after_longest)
            entry, state = stack.pop()
            linearized &= ~(1 << op_of[entry])
            unlift(entry)
            entry = nxt[entry]
    return _Verdict(True, steps)


def _explain(key: bytes, ops: Sequence[Operation], verdict: _Verdict) -> str:
    done = set(verdict.longest)
    rest = [j for j in range(len(ops)) if j not in done]
    lines = [
        f"operations on key {key!r} are not linearizable:",
        f"  the longest order found ({len(verdict.longest)} of {len(ops)} operations):",
    ]
    lines.extend(f"    {_describe(ops[j])}" for j in verdict.longest[-10:])
    lines.append(
        f"  leaves the value {verdict.state_after_longest!r}, and then none of these fits:"
    )
    if rest:
        # The operation that must come next at the latest is the first to
        # return; show it and whatever overlaps it.
        returns = [ops[j].return_time for j in rest]
        first_return = min((t for t in returns if t is not None), default=math.inf)
        stuck = [j for j in rest if ops[j].call_time <= first_return]
        lines.extend(f"    {_describe(ops[j])}" for j in stuck[:10])
    return "\n".join(lines)


def check(history: Sequence[Operation], *, max_steps: int | None = None) -> CheckResult:
    """Whether ``history`` is linearizable against the key-value model.

    ``max_steps`` bounds the search per key; a search that runs out gives
    ``ok=False, timed_out=True`` rather than an unproven yes.
    """
    by_key: dict[bytes, list[Operation]] = {}
    for op in history:
        if op.return_time is not None and op.return_time < op.call_time:
            raise ValueError(f"operation returns before it is called: {op!r}")
        if op.return_time is None and isinstance(op.input, Get):
            # A read nobody saw cannot constrain anything.
            continue
        by_key.setdefault(op.input.key, []).append(op)
    steps = 0
    for key in sorted(by_key):
        ops = by_key[key]
        verdict = _check_key(ops, max_steps)
        steps += verdict.steps
        if verdict.timed_out:
            return CheckResult(
                False,
                f"gave up on key {key!r} after {verdict.steps} steps ({len(ops)} operations)",
                key,
                tuple(ops[j] for j in verdict.longest),
                timed_out=True,
                steps=steps,
            )
        if not verdict.ok:
            return CheckResult(
                False,
                _explain(key, ops, verdict),
                key,
                tuple(ops[j] for j in verdict.longest),
                steps=steps,
            )
    return CheckResult(True, steps=steps)
