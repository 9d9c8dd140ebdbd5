"""The control plane: the replicated membership and ring configuration, and its failure detector.

Pure so far (no reactor, no I/O, no clock); the AMP service, the member
service and the twistd plugin build on it:

- ``topology``: the published value (``Topology``, ``Member``, ``Role``,
  ``MemberState``, ``RingConfig``), its compact versioned wire form, and
  the field rules (ids, addresses, weights, zones).
- ``commands``: ``Join``, ``Leave``, ``Heartbeat``, ``MarkDown``,
  ``MarkActive``, ``Drain``, ``Remove``, ``SetConfig``, the queries
  ``GetTopology`` and ``GetMember``, the ``Applied`` result and the
  deterministic encoding proposed to Raft.
- ``errors``: ``Refusal`` (every reason a command is refused),
  ``Refused`` (the result) and ``CommandRefused`` (the exception).
- ``state``: ``ControlState``, the ``IStateMachine`` a ``RaftNode`` drives.
- ``failure``: ``FailureDetector``, which tells the leader which members to
  mark down or active.

A service proposes ``encode_command(command)`` with ``RaftNode.propose``;
the Deferred fires with ``Applied`` or ``Refused`` (``commands.unwrap``
turns the latter into ``CommandRefused``). It reads with
``RaftNode.read(encode_query(GetTopology()))``, or for what it pushes to
watchers straight from ``state.topology()`` after each apply whose
``Applied.version`` moved.
"""

__all__: list[str] = []
