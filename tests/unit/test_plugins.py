"""The twistd plugins: every tier is listed by ``twistd --help`` and parses its membership options.

The plugin file of this checkout is put first on ``twisted.plugins``'s
path, so an older installed copy of it cannot hide a new plugin.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
from twisted.internet.task import Clock
from twisted.python import usage

from gitstratum.cluster.node import MemberOptions, listen_address, member_node
from gitstratum.cluster.secret import load_or_create
from gitstratum.control.commands import Join, decode_command, encode_command
from gitstratum.control.topology import Topology
from gitstratum.frontend import cluster_tap
from gitstratum.metadata import tap as metadata_tap
from gitstratum.objects import tap as object_tap

ROOT = Path(__file__).resolve().parents[2]
PLUGINS = ROOT / "twisted" / "plugins"
TWISTD = (
    "import sys, twisted.plugins;"
    "twisted.plugins.__path__.insert(0, sys.argv.pop(1));"
    "from twisted.scripts.twistd import run; run()"
)
TIERS = ("gitstratum-metadata", "gitstratum-object", "gitstratum-frontend")


def twistd(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run(
        [sys.executable, "-c", TWISTD, str(PLUGINS), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )


def declared_tapnames() -> set[str]:
    """The tapname (last argument) of every ServiceMaker in the plugin file."""
    tree = ast.parse((PLUGINS / "gitstratum_plugins.py").read_text())
    return {
        node.args[-1].value
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and getattr(node.func, "id", None) == "ServiceMaker"
        and isinstance(node.args[-1], ast.Constant)
    }


def test_twistd_lists_every_plugin() -> None:
    """``twistd --help`` lists the standalone server and every tier the plugin file declares."""
    out = twistd("--help")
    assert out.returncode == 0, out.stderr
    declared = declared_tapnames()
    assert {"gitstratum-standalone", *TIERS} <= declared
    for name in declared:
        assert name in out.stdout, name


@pytest.mark.parametrize("tapname", TIERS)
def test_each_tier_has_its_membership_options(tapname: str) -> None:
    """``twistd TIER --help`` works and names --data-dir, --listen and --join."""
    out = twistd(tapname, "--help")
    assert out.returncode == 0, out.stderr
    for option in ("--data-dir", "--listen", "--join", "--cluster-secret-file", "--name"):
        assert option in out.stdout
    assert ("--http" in out.stdout) == (tapname == "gitstratum-frontend")


BASE = ["--data-dir", "D", "--join", "127.0.0.2:7000", "--name", "object-1"]


def parsed(options: MemberOptions, *args: str) -> MemberOptions:
    options.parseOptions([*BASE, *args])
    return options


def test_the_member_address_comes_from_listen_unless_given() -> None:
    """--listen tcp:PORT:interface=HOST gives HOST:PORT; a wildcard interface needs --address."""
    options = parsed(object_tap.Options(), "--listen", "tcp:7105:interface=127.0.0.5")
    assert options["address"] == "127.0.0.5:7105"
    assert options["control"] == ("127.0.0.2:7000",)
    assert options["cluster-secret-file"] == os.path.join("D", "cluster.secret")
    with pytest.raises(usage.UsageError, match="--address"):
        parsed(object_tap.Options(), "--listen", "tcp:7105")
    assert parsed(object_tap.Options(), "--listen", "tcp:7105", "--address", "10.0.0.1:7105")
    assert listen_address(r"tcp:port=7105:interface=\:\:1") == "[::1]:7105"
    assert listen_address("tcp:7105:interface=0.0.0.0") is None


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--data-dir", "D", "--name", "n"], "--join"),
        (["--join", "127.0.0.2:7000", "--name", "n"], "--data-dir"),
        (["--data-dir", "D", "--join", "127.0.0.2:7000"], "--name"),
        ([*BASE[:2], "--join", "nowhere", *BASE[4:]], "HOST:PORT"),
        ([*BASE, "--weight", "0"], "--weight"),
        ([*BASE, "--heartbeat-interval", "-1"], "--heartbeat-interval"),
    ],
)
def test_bad_member_options_are_refused(args: list[str], message: str) -> None:
    """A missing or malformed membership option is a usage error that names it."""
    with pytest.raises(usage.UsageError, match=message):
        metadata_tap.Options().parseOptions(args)


def test_a_frontend_needs_its_public_addresses() -> None:
    """A frontend joins with the public HTTP and SSH addresses; both are required."""
    with pytest.raises(usage.UsageError, match="--http"):
        parsed(cluster_tap.Options())
    options = parsed(cluster_tap.Options(), "--http", "127.0.0.9:8080", "--ssh", "127.0.0.9:2222")
    assert options["http"] == "127.0.0.9:8080"


def test_a_member_node_is_a_listener_and_a_member_service(tmp_path: Path) -> None:
    """The service tree joins with the options' description and the control plane's decoder."""
    secret = tmp_path / "secret"
    load_or_create(str(secret))
    options = cluster_tap.Options()
    options.parseOptions(
        ["--data-dir", str(tmp_path / "d"), "--join", "127.0.0.2:7000", "--name", "front-0"]
        + ["--cluster-secret-file", str(secret), "--listen", "tcp:7109:interface=127.0.0.9"]
        + ["--http", "127.0.0.9:8080", "--ssh", "127.0.0.9:2222", "--zone", "z1"]
    )
    joins: list[bytes] = []

    def join(**kw: object) -> bytes:
        joins.append(encode_command(Join(**kw)))  # type: ignore[arg-type]
        return joins[-1]

    top = member_node(options, join=join, decode=Topology.decode, reactor=Clock())
    membership = top.getServiceNamed("membership")
    assert membership.node_id == "front-0"  # type: ignore[attr-defined]
    assert len(list(top)) == 2
    assert decode_command(joins[0]) == Join(
        "front-0",
        ("frontend",),
        "127.0.0.9:7109",
        at=0.0,
        http="127.0.0.9:8080",
        ssh="127.0.0.9:2222",
        zone="z1",
    )
    assert oct((tmp_path / "d").stat().st_mode & 0o777) == "0o700"


def test_a_member_without_the_secret_file_is_refused(tmp_path: Path) -> None:
    """No secret file: a usage error naming it, not a node that cannot join."""
    options = parsed(object_tap.Options(), "--listen", "tcp:7105:interface=127.0.0.5")
    options["data-dir"] = str(tmp_path)
    options["cluster-secret-file"] = str(tmp_path / "missing")
    with pytest.raises(usage.UsageError, match="no cluster secret"):
        member_node(options, join=lambda **kw: b"", decode=Topology.decode, reactor=Clock())


def test_only_the_cluster_tap_brings_the_cluster_into_the_frontend() -> None:
    """No frontend module but ``cluster_tap`` imports ``cluster`` or ``control`` (the layer prose)."""
    offenders = []
    for path in sorted((ROOT / "gitstratum" / "frontend").glob("*.py")):
        if path.name == "cluster_tap.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [
                f"{path.name}: {n}"
                for n in names
                if n.startswith(("gitstratum.cluster", "gitstratum.control"))
            ]
    assert not offenders
