"""The installed package declares what it imports, and its runtime never imports the test tools.

``setup.cfg`` is read as setuptools reads it; every module of ``gitstratum``
(and the Twisted plugin file, which ``pip install .`` installs too) is parsed
with ``ast``, and each third-party top-level import is mapped to the
distribution that provides it (``OpenSSL`` -> ``pyOpenSSL``, ``snappy`` ->
``python-snappy``, ``zope.interface`` -> ``zope.interface``) through
``importlib.metadata``.
"""

from __future__ import annotations

import ast
import configparser
import json
import re
import subprocess
import sys
from functools import cache
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "gitstratum"
PLUGINS = ROOT / "twisted" / "plugins"

#: the pytest mixins of ``gitstratum.testing``: they may import what the ``test`` extra declares
PYTEST_SUITES = frozenset(
    {"gitstratum.testing.conformance", "gitstratum.testing.cache_conformance"}
)
#: what no runtime module may pull in, directly or through another module
TEST_TOOLS = ("pytest", "hypothesis", "_pytest")


def canonical(name: str) -> str:
    """A distribution name as PEP 503 compares them (``Twisted`` == ``twisted``, ``zope.interface`` == ``zope-interface``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_names(text: str) -> set[str]:
    """The distribution names in a setup.cfg requirement list (extras and versions dropped)."""
    names = set()
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", line)
            assert match, f"unreadable requirement {line!r}"
            names.add(canonical(match.group()))
    return names


def declared() -> tuple[set[str], set[str]]:
    """(install_requires, the ``test`` extra) of setup.cfg."""
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    return (
        requirement_names(config["options"]["install_requires"]),
        requirement_names(config["options.extras_require"]["test"]),
    )


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def installed_sources() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py")) + sorted(PLUGINS.glob("*.py"))


def imports_of(path: Path) -> set[str]:
    """Dotted names of every absolute import in *path*, wherever it appears (functions included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


@cache
def top_level_distributions() -> dict[str, list[str]]:
    return packages_distributions()


def distribution_of(dotted: str) -> str | None:
    """The canonical distribution that provides the import *dotted*; None for ours and the stdlib."""
    top = dotted.split(".")[0]
    if top in sys.stdlib_module_names or top == "gitstratum":
        return None
    candidates = {canonical(d) for d in top_level_distributions().get(top, [])} - {"gitstratum"}
    if top == "twisted" and not candidates:
        candidates = {"twisted"}
    if len(candidates) > 1:
        # A namespace package (zope): the distribution named like the import's own prefix.
        prefixes = {canonical(".".join(dotted.split(".")[:n])) for n in (2, 3)}
        candidates &= prefixes
    assert len(candidates) == 1, f"cannot tell which distribution provides {dotted!r}"
    return candidates.pop()


def undeclared_imports() -> list[str]:
    runtime, test_extra = declared()
    problems = []
    for path in installed_sources():
        module = module_name(path)
        allowed = runtime | test_extra if module in PYTEST_SUITES else runtime
        for dotted in sorted(imports_of(path)):
            dist = distribution_of(dotted)
            if dist is not None and dist not in allowed:
                problems.append(f"{path.relative_to(ROOT)} imports {dotted} ({dist})")
    return problems


def test_every_third_party_import_is_declared() -> None:
    """Each distribution that gitstratum imports is in install_requires (the test extra for the pytest mixins)."""
    assert undeclared_imports() == []


def test_the_scan_catches_an_undeclared_import(tmp_path: Path) -> None:
    """The scan maps import names to distributions, so a missing declaration cannot slip through."""
    assert distribution_of("OpenSSL.SSL") == "pyopenssl"
    assert distribution_of("snappy") == "python-snappy"
    assert distribution_of("zope.interface.verify") == "zope-interface"
    assert distribution_of("werkzeug.exceptions") == "werkzeug"
    assert distribution_of("twisted.internet") == "twisted"
    assert distribution_of("os.path") is None and distribution_of("gitstratum.core") is None
    runtime, test_extra = declared()
    assert {"werkzeug", "cryptography", "pyopenssl", "twisted"} <= runtime
    assert "pytest" not in runtime and "pytest" in test_extra
    stray = tmp_path / "stray.py"
    stray.write_text("def later():\n    import hypothesis.strategies\n")
    assert {distribution_of(d) for d in imports_of(stray)} == {"hypothesis"}


def runtime_modules() -> list[str]:
    return [
        module_name(path)
        for path in sorted(PACKAGE.rglob("*.py"))
        if module_name(path) not in PYTEST_SUITES
    ]


def test_the_runtime_modules_never_import_the_test_tools() -> None:
    """Importing every module of gitstratum but the pytest mixins, in a fresh interpreter, loads neither pytest nor hypothesis."""
    modules = runtime_modules()
    assert "gitstratum.cli" in modules and "gitstratum.testing.raft_process" in modules
    script = (
        "import importlib, json, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {TEST_TOOLS!r})))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.splitlines()[-1]) == []


@pytest.mark.parametrize("suite", sorted(PYTEST_SUITES))
def test_the_pytest_mixins_are_the_only_modules_that_import_pytest(suite: str) -> None:
    """The exemption list is exact: each exempt module really is a pytest suite (else drop it from the list)."""
    path = ROOT / (suite.replace(".", "/") + ".py")
    assert "pytest" in {name.split(".")[0] for name in imports_of(path)}
