"""A member's topology file: atomic replacement, and no trust in a torn or foreign copy."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from gitstratum.cluster.topology_cache import TopologyFile


def test_store_then_load_round_trips(tmp_path: Path) -> None:
    """What was stored comes back with its epoch; the file is private to its user."""
    f = TopologyFile(str(tmp_path / "topology"))
    assert f.load() is None
    f.store(7, b"x" * 100_000)
    assert f.load() == (7, b"x" * 100_000)
    f.store(8, b"newer")
    assert f.load() == (8, b"newer")
    assert stat.S_IMODE(os.stat(tmp_path / "topology").st_mode) == 0o600
    assert not (tmp_path / "topology.tmp").exists()


def test_a_torn_copy_is_ignored(tmp_path: Path) -> None:
    """A file cut short or with a flipped byte is not loaded."""
    path = tmp_path / "topology"
    f = TopologyFile(str(path))
    f.store(3, b"abcdef" * 1000)
    whole = path.read_bytes()
    path.write_bytes(whole[:-10])
    assert f.load() is None
    path.write_bytes(whole[:-1] + bytes([whole[-1] ^ 1]))
    assert f.load() is None
    path.write_bytes(whole + b"trailing")
    assert f.load() is None


def test_a_foreign_file_is_ignored(tmp_path: Path) -> None:
    """A file that is not a topology file (another program's, or empty) is not loaded."""
    path = tmp_path / "topology"
    path.write_bytes(b"")
    assert TopologyFile(str(path)).load() is None
    path.write_bytes(b'{"json": true}')
    assert TopologyFile(str(path)).load() is None
