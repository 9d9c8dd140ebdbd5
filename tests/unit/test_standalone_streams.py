"""``twistd gitstratum-standalone``'s stream and push options, and its private data directory."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import attrs
import pytest
from twisted.python import usage

from gitstratum.core.limits import Limits
from gitstratum.standalone.tap import Options, _secure_data_dir, make_private, worker_argv


def parsed(*argv: str) -> Options:
    options = Options()
    options.parseOptions(list(argv))
    return options


def test_stream_and_push_options_default_to_the_limits_defaults() -> None:
    """With no options the tier runs with Limits()'s values: 60 s, deleting HEAD's branch refused."""
    limits = parsed().limits()
    assert limits.stream_idle_timeout == Limits().stream_idle_timeout == 60.0
    assert limits.allow_delete_current is False


def test_stream_and_push_options_reach_the_limits() -> None:
    """--stream-idle-timeout and --allow-delete-current set their Limits fields."""
    limits = parsed("--stream-idle-timeout", "2.5", "--allow-delete-current").limits()
    assert limits.stream_idle_timeout == 2.5 and limits.allow_delete_current is True


def test_a_non_number_timeout_is_a_usage_error() -> None:
    """The option is typed: a word is refused at start, not at the first stalled client."""
    with pytest.raises(usage.UsageError):
        parsed("--stream-idle-timeout", "soon")


@pytest.mark.parametrize("flag", [(), ("--allow-delete-current",)])
def test_workers_are_started_with_options_they_can_parse(flag: tuple[str, ...]) -> None:
    """The supervisor's argv for a worker parses back to the same limits (a flag is passed as
    a bare flag, never as --flag=0)."""
    options = parsed("--stream-idle-timeout", "7", "--workers", "3", *flag)
    argv = worker_argv(options, "/srv/data")
    assert "--data-dir=/srv/data" in argv and not any(a.startswith("--workers") for a in argv)
    assert parsed(*argv).limits() == options.limits()


def modes(root: Path) -> dict[str, int]:
    return {
        str(p.relative_to(root)): stat.S_IMODE(p.lstat().st_mode)
        for p in [root, *root.rglob("*")]
        if not p.is_symlink()
    }


def test_make_private_takes_group_and_other_bits_off_everything(tmp_path: Path) -> None:
    """Directories end 0700 and files 0600 (owner bits kept); a symlink is not followed."""
    root = tmp_path / "data"
    (root / "metadata").mkdir(parents=True)
    (root / "metadata" / "data.mdb").write_bytes(b"x")
    (root / "admin-token").write_bytes(b"t")
    outside = tmp_path / "outside"
    outside.write_bytes(b"o")
    os.chmod(outside, 0o644)
    (root / "link").symlink_to(outside)
    for path, mode in ((root, 0o755), (root / "metadata", 0o777), (root / "admin-token", 0o644)):
        os.chmod(path, mode)
    os.chmod(root / "metadata" / "data.mdb", 0o664)
    assert make_private(str(root)) == 4
    assert modes(root) == {
        ".": 0o700,
        "metadata": 0o700,
        "metadata/data.mdb": 0o600,
        "admin-token": 0o600,
    }
    assert stat.S_IMODE(outside.stat().st_mode) == 0o644
    assert make_private(str(root)) == 0  # nothing left to change
    assert make_private(str(tmp_path / "absent")) == 0


def test_make_private_skips_a_path_removed_while_it_walks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file another worker removes between the listing and the chmod is no error."""
    (tmp_path / "kept").write_bytes(b"k")
    os.chmod(tmp_path / "kept", 0o644)
    os.chmod(tmp_path, 0o700)
    real_walk = os.walk

    def walk(path: str) -> Any:
        for root, dirs, files in real_walk(path):
            yield root, dirs, [*files, "vanished"]

    monkeypatch.setattr(os, "walk", walk)
    assert make_private(str(tmp_path)) == 1
    assert stat.S_IMODE((tmp_path / "kept").stat().st_mode) == 0o600


def test_every_limit_is_an_option_and_documented() -> None:
    """Each Limits field can be set from the command line, and docs/operations.rst names it."""
    options = Options()
    names = {o[0] for o in options.optParameters} | {f[0] for f in options.optFlags}
    docs = (Path(__file__).parents[2] / "docs" / "operations.rst").read_text()
    for field in attrs.fields(Limits):
        flag = field.name.replace("_", "-")
        assert flag in names, f"Limits.{field.name} has no --{flag}"
        assert f"``--{flag}``" in docs, f"--{flag} is not in docs/operations.rst"


@pytest.mark.skipif(os.geteuid() != 0, reason="making a file another user owns needs root")
def test_make_private_leaves_other_users_files_alone(tmp_path: Path) -> None:
    """A path owned by someone else is not the server's to change (e.g. in a shared cache dir)."""
    theirs = tmp_path / "theirs"
    theirs.write_bytes(b"t")
    os.chmod(theirs, 0o644)
    os.chown(theirs, 12345, 12345)
    os.chmod(tmp_path, 0o700)
    assert make_private(str(tmp_path)) == 0
    assert stat.S_IMODE(theirs.stat().st_mode) == 0o644


class Warnings:
    def __init__(self) -> None:
        self.seen: list[str] = []

    def warn(self, text: str, **fields: Any) -> None:
        self.seen.append(text.format(**fields))


def test_start_sets_umask_077_and_tightens_the_data_and_cache_dirs(tmp_path: Path) -> None:
    """At start: umask 077, the data dir and a dedicated --pack-cache-dir made private; a
    shared (sticky, like /tmp) cache dir is left as it is, with a warning."""
    data, cache, shared = tmp_path / "data", tmp_path / "cache", tmp_path / "shared"
    for d in (data, cache, shared):
        d.mkdir()
        (d / "f").write_bytes(b"x")
        os.chmod(d / "f", 0o644)
        os.chmod(d, 0o755)
    os.chmod(shared, 0o1777)
    old = os.umask(0o022)
    try:
        log = Warnings()
        _secure_data_dir(parsed("--pack-cache-dir", str(cache)), str(data), log)  # type: ignore[arg-type]
        assert os.umask(0o022) == 0o077
        _secure_data_dir(parsed("--pack-cache-dir", str(shared)), str(data), log)  # type: ignore[arg-type]
    finally:
        os.umask(old)
    assert modes(data) == {".": 0o700, "f": 0o600} and modes(cache) == {".": 0o700, "f": 0o600}
    assert modes(shared) == {".": 0o1777, "f": 0o644}
    assert len(log.seen) == 3 and "shared --pack-cache-dir" in log.seen[2]
