"""The layer diagram in ``docs/architecture.rst`` is the import graph of the code.

What counts as an import: every ``import`` and ``from ... import``
statement in every module under ``gitstratum/``, wherever it stands (at
module level, inside a function or method, under ``if TYPE_CHECKING:``,
inside ``try``), found by walking the module's syntax tree; relative
imports are resolved.  ``from P import N`` names module ``P.N`` when that is
one of ours, else ``P``.  Modules named only in strings (the plugin's
``ServiceMaker``, ``importlib``) are not imports and are not counted.

A unit is a package directly under ``gitstratum`` (``gitstratum.core`` and
everything in it) or a top-level module (``gitstratum.cli``,
``gitstratum.lmdbutil``, and ``gitstratum`` itself for ``__init__.py``).  A
unit imports another when any of its modules imports any module of the
other.  Importing ``gitstratum.x.y`` also runs the ``__init__`` of its
parent packages; the transitive checks below count that too.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

import attrs
import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "gitstratum"
DOC = ROOT / "docs" / "architecture.rst"

_EDGE_LINE = re.compile(r"^\s+([a-z_][a-z0-9_]*)\s+->(.*)$")
_RULE_LINE = re.compile(r"^\s+([a-z-]+):\s+(.*)$")
_HEADING = re.compile(r"^(\S[^\n]*)\n=+\n", re.MULTILINE)
_RULES = ("pure", "reactor-free", "seams", "wiring")


@attrs.frozen
class Import:
    """One import statement's target, where it was made."""

    source: str
    target: str
    path: str
    line: int

    def __str__(self) -> str:
        return f"{self.path}:{self.line} imports {self.target}"


@attrs.frozen
class Layers:
    """What the architecture document draws: the unit graph in order, and the module rules."""

    order: tuple[str, ...]
    edges: Mapping[str, frozenset[str]]
    rules: Mapping[str, tuple[str, ...]]


# -- reading the code -----------------------------------------------------------------------------


def modules_under(root: Path, package: str = PACKAGE) -> dict[str, Path]:
    """Every module of *package* (found under *root*) by dotted name; a package is its ``__init__``."""
    found = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def imports_in(name: str, path: Path, modules: Mapping[str, Path], root: Path) -> Iterator[Import]:
    """Every import statement anywhere in module *name*, one Import per module it names."""
    is_package = path.name == "__init__.py"
    where = str(path.relative_to(root))
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(name, alias.name, where, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".")
                anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                full = f"{base}.{alias.name}"
                ours = base == PACKAGE or base.startswith(PACKAGE + ".")
                target = base if ours and full not in modules else full
                yield Import(name, target, where, node.lineno)


def all_imports(root: Path = ROOT) -> tuple[dict[str, Path], list[Import]]:
    modules = modules_under(root)
    found = [i for name, path in modules.items() for i in imports_in(name, path, modules, root)]
    return modules, found


def unit_of(module: str) -> str | None:
    """The unit a module of ours belongs to (``gitstratum`` for the root), None for a foreign one."""
    parts = module.split(".")
    if parts[0] != PACKAGE:
        return None
    return parts[1] if len(parts) > 1 else PACKAGE


def unit_graph(
    modules: Iterable[str], imports: Iterable[Import]
) -> dict[str, dict[str, list[Import]]]:
    """unit -> imported unit -> the imports that make the edge; every unit is a key."""
    graph: dict[str, dict[str, list[Import]]] = {u: {} for m in modules if (u := unit_of(m))}
    for i in imports:
        source, target = unit_of(i.source), unit_of(i.target)
        if source is not None and target is not None and source != target:
            graph[source].setdefault(target, []).append(i)
    return graph


def find_cycle(graph: Mapping[str, Iterable[str]]) -> list[str] | None:
    """A cycle of *graph* as a path that starts and ends at the same node, or None."""
    state: dict[str, int] = {}  # 1 on the current path, 2 finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)) is not None:
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)) is not None:
            return cycle
    return None


def closure(start: str, module_edges: Mapping[str, set[str]]) -> set[str]:
    """*start* and every module of ours it imports, directly or not (parent packages included)."""
    seen: set[str] = set()
    todo = [start]
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        parts = module.split(".")
        todo += [".".join(parts[:n]) for n in range(1, len(parts))]
        todo += module_edges.get(module, ())
    return seen


# -- reading the document -------------------------------------------------------------------------


def read_layers(text: str) -> Layers:
    """The unit graph and the rules as the Layers section of the architecture document draws them."""
    start = _HEADING.search(text, 0)
    while start is not None and start.group(1) != "Layers":
        start = _HEADING.search(text, start.end())
    assert start is not None, "no Layers section"
    end = _HEADING.search(text, start.end())
    section = text[start.end() : end.start() if end else len(text)]
    order: list[str] = []
    edges: dict[str, frozenset[str]] = {}
    rules: dict[str, tuple[str, ...]] = {}
    for line in section.splitlines():
        if m := _EDGE_LINE.match(line):
            unit, deps = m.group(1), [d.strip() for d in m.group(2).split(",") if d.strip()]
            assert unit not in edges, f"{unit} has two lines in the layer diagram"
            order.append(unit)
            edges[unit] = frozenset(deps)
        elif (m := _RULE_LINE.match(line)) and m.group(1) in _RULES:
            rules[m.group(1)] = tuple(v.strip() for v in m.group(2).split(",") if v.strip())
    return Layers(tuple(order), edges, rules)


def diagram_differences(real: Mapping[str, Mapping[str, list[Import]]], drawn: Layers) -> list[str]:
    """Every way the drawn graph and the real one differ, each said with its evidence."""
    problems = []
    for unit in sorted(set(real) - set(drawn.edges)):
        problems.append(f"unit {unit} is missing from the diagram")
    for unit in sorted(set(drawn.edges) - set(real)):
        problems.append(f"unit {unit} is drawn but does not exist")
    for unit in sorted(set(real) & set(drawn.edges)):
        for target in sorted(set(real[unit]) - drawn.edges[unit]):
            first = real[unit][target][0]
            problems.append(f"{unit} -> {target} is not drawn, but {first}")
        for target in sorted(drawn.edges[unit] - set(real[unit])):
            problems.append(
                f"{unit} -> {target} is drawn, but no module of {unit} imports {target}"
            )
    return problems


def order_violations(drawn: Layers) -> list[str]:
    """Edges that point down the diagram (to a unit drawn later), which is how a cycle would start."""
    position = {unit: n for n, unit in enumerate(drawn.order)}
    return [
        f"{unit} -> {target}: {target} is drawn below {unit}"
        for unit in drawn.order
        for target in sorted(drawn.edges[unit])
        if position.get(target, len(position)) >= position[unit]
    ]


def in_units(module: str, names: Iterable[str]) -> bool:
    """Whether *module* is one of *names* (``core``, ``raft.core``) or inside one of them."""
    return any(
        module == f"{PACKAGE}.{n}"
        or module.startswith(f"{PACKAGE}.{n}.")
        or (n == PACKAGE == module)
        for n in names
    )


# -- the checks -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def code() -> tuple[dict[str, Path], list[Import]]:
    return all_imports()


@pytest.fixture(scope="module")
def drawn() -> Layers:
    return read_layers(DOC.read_text())


def test_no_two_packages_import_each_other(code: tuple[dict[str, Path], list[Import]]) -> None:
    """No chain of imports, however indirect or lazy, leads from a unit of gitstratum back to itself."""
    modules, imports = code
    graph = unit_graph(modules, imports)
    cycle = find_cycle(graph)
    assert cycle is None, (
        "units import each other: "
        + " -> ".join(cycle)
        + "".join(f"\n  {graph[a][b][0]}" for a, b in zip(cycle, cycle[1:], strict=False))
    )


def test_no_two_modules_import_each_other(code: tuple[dict[str, Path], list[Import]]) -> None:
    """Within a package too, modules form no import cycle (a lazy import does not hide one)."""
    modules, imports = code
    edges: dict[str, set[str]] = {m: set() for m in modules}
    for i in imports:
        if i.target in modules and i.target != i.source:
            edges[i.source].add(i.target)
    assert find_cycle(edges) is None, " -> ".join(find_cycle(edges) or [])


def test_the_layer_diagram_is_the_import_graph(
    code: tuple[dict[str, Path], list[Import]], drawn: Layers
) -> None:
    """Every import between units is drawn, every drawn edge is made by an import, every unit is drawn."""
    modules, imports = code
    problems = diagram_differences(unit_graph(modules, imports), drawn)
    assert not problems, "docs/architecture.rst disagrees with the code:\n" + "\n".join(problems)


def test_the_layer_diagram_reads_bottom_up(drawn: Layers) -> None:
    """Each line of the diagram imports only lines above it, so the drawing itself has no cycle."""
    assert drawn.order, "no layer diagram found in docs/architecture.rst"
    assert not order_violations(drawn)


def test_the_rules_name_real_modules(
    code: tuple[dict[str, Path], list[Import]], drawn: Layers
) -> None:
    """Each module or unit the rules name exists, so a rename cannot quietly empty a rule."""
    modules, _ = code
    assert set(drawn.rules) == set(_RULES)
    for rule, names in drawn.rules.items():
        for name in names:
            assert any(in_units(m, [name]) for m in modules), f"{rule}: no module {name}"


def _reaching(
    code: tuple[dict[str, Path], list[Import]], names: Iterable[str], bad: Callable[[str], bool]
) -> list[str]:
    """Each foreign import a module of *names* makes, itself or through modules of ours, that is *bad*."""
    modules, imports = code
    module_edges, foreign = _module_edges(modules, imports)
    return [
        f"{start}: {i}"
        for start in sorted(m for m in modules if in_units(m, names))
        for module in sorted(closure(start, module_edges))
        for i in foreign.get(module, ())
        if bad(i.target)
    ]


def test_pure_modules_import_nothing_from_twisted(
    code: tuple[dict[str, Path], list[Import]], drawn: Layers
) -> None:
    """Pure modules reach no Twisted module (reactor, Deferred, clock), directly or through ours."""
    found = _reaching(
        code, drawn.rules["pure"], lambda t: t == "twisted" or t.startswith("twisted.")
    )
    assert not found, "pure modules reach Twisted:\n" + "\n".join(found)


def test_reactor_free_units_never_import_the_reactor(
    code: tuple[dict[str, Path], list[Import]], drawn: Layers
) -> None:
    """Reactor-free units never import the global reactor, even lazily or through a module of ours."""
    found = _reaching(code, drawn.rules["reactor-free"], _is_reactor)
    assert not found, "reactor-free modules reach the reactor:\n" + "\n".join(found)


def test_only_the_wiring_imports_what_is_behind_a_seam(
    code: tuple[dict[str, Path], list[Import]], drawn: Layers
) -> None:
    """Of a package with a seam, other units import only the seam, bar the wiring (standalone, tests)."""
    modules, imports = code
    seams: dict[str | None, list[str]] = {}
    for seam in drawn.rules["seams"]:
        seams.setdefault(unit_of(f"{PACKAGE}.{seam}"), []).append(seam)
    wiring = set(drawn.rules["wiring"])
    found = [
        str(i)
        for i in imports
        if (target := unit_of(i.target)) in seams
        and unit_of(i.source) not in (target, *wiring)
        and not in_units(i.target, seams[target])
    ]
    assert not found, "imports behind a seam:\n" + "\n".join(found)


def _module_edges(
    modules: Mapping[str, Path], imports: Iterable[Import]
) -> tuple[dict[str, set[str]], dict[str, list[Import]]]:
    """Module -> modules of ours it imports, and module -> its imports of foreign modules."""
    ours: dict[str, set[str]] = {m: set() for m in modules}
    foreign: dict[str, list[Import]] = {}
    for i in imports:
        if unit_of(i.target) is None:
            foreign.setdefault(i.source, []).append(i)
        elif i.target in modules:
            ours[i.source].add(i.target)
    return ours, foreign


def _is_reactor(target: str) -> bool:
    return target == "twisted.internet.reactor" or target.startswith("twisted.internet.reactor.")


# -- the checker checks what it says ----------------------------------------------------------------


def _tree(tmp_path: Path, files: Mapping[str, str]) -> tuple[dict[str, Path], list[Import]]:
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return all_imports(tmp_path)


def test_the_checker_counts_lazy_type_checking_and_relative_imports(tmp_path: Path) -> None:
    """Imports inside functions, under TYPE_CHECKING and relative ones all make edges."""
    modules, imports = _tree(
        tmp_path,
        {
            "gitstratum/__init__.py": "",
            "gitstratum/a/__init__.py": "",
            "gitstratum/a/x.py": "def f():\n    from gitstratum.b import y\n",
            "gitstratum/a/z.py": "from typing import TYPE_CHECKING\n"
            "if TYPE_CHECKING:\n    from gitstratum.c.w import W\n",
            "gitstratum/a/r.py": "from ..d import v\nfrom . import x\n",
            "gitstratum/b/__init__.py": "",
            "gitstratum/b/y.py": "",
            "gitstratum/c/__init__.py": "",
            "gitstratum/c/w.py": "",
            "gitstratum/d/__init__.py": "",
            "gitstratum/d/v.py": "from gitstratum import __version__\n",
        },
    )
    graph = unit_graph(modules, imports)
    assert {u: set(t) for u, t in graph.items()} == {
        "gitstratum": set(),
        "a": {"b", "c", "d"},
        "b": set(),
        "c": set(),
        "d": {"gitstratum"},
    }
    assert any(i.source == "gitstratum.a.r" and i.target == "gitstratum.a.x" for i in imports)


def test_the_checker_finds_a_cycle_made_by_a_lazy_import(tmp_path: Path) -> None:
    """Two packages whose only link back is an import inside a function still form a cycle."""
    modules, imports = _tree(
        tmp_path,
        {
            "gitstratum/__init__.py": "",
            "gitstratum/a/__init__.py": "",
            "gitstratum/a/x.py": "from gitstratum.b.y import Y\n",
            "gitstratum/b/__init__.py": "",
            "gitstratum/b/y.py": "class Y:\n    def f(self):\n        import gitstratum.a.x\n",
        },
    )
    assert find_cycle(unit_graph(modules, imports)) == ["a", "b", "a"]
    assert find_cycle({"a": ["b"], "b": ["c"], "c": []}) is None


def test_the_checker_reports_both_directions_of_a_wrong_diagram(tmp_path: Path) -> None:
    """A drawn edge no import makes, an undrawn import, and an undrawn unit are each reported."""
    modules, imports = _tree(
        tmp_path,
        {
            "gitstratum/__init__.py": "",
            "gitstratum/a.py": "import gitstratum.b\n",
            "gitstratum/b.py": "",
            "gitstratum/c.py": "",
        },
    )
    drawn = read_layers(
        "Layers\n======\n\n::\n\n    gitstratum ->\n    b  -> a\n    a  ->\n\n"
        "    pure: a\n\nNext\n====\n"
    )
    assert drawn.order == ("gitstratum", "b", "a") and drawn.rules == {"pure": ("a",)}
    problems = diagram_differences(unit_graph(modules, imports), drawn)
    assert len(problems) == 3
    assert "unit c is missing" in problems[0]
    assert "a -> b is not drawn, but gitstratum/a.py:1 imports gitstratum.b" in problems[1]
    assert "b -> a is drawn, but no module of b imports a" in problems[2]
    assert order_violations(drawn) == ["b -> a: a is drawn below b"]
    assert order_violations(attrs.evolve(drawn, order=("gitstratum", "a", "b"))) == []


def test_the_checker_follows_the_reactor_through_our_modules(tmp_path: Path) -> None:
    """A module reaches the reactor through another of ours, or through a lazy import."""
    modules, imports = _tree(
        tmp_path,
        {
            "gitstratum/__init__.py": "",
            "gitstratum/p.py": "from gitstratum import q\n",
            "gitstratum/q.py": "def run():\n    from twisted.internet import reactor\n",
        },
    )
    module_edges, foreign = _module_edges(modules, imports)
    reached = [
        i
        for m in closure("gitstratum.p", module_edges)
        for i in foreign.get(m, ())
        if _is_reactor(i.target)
    ]
    assert [str(i) for i in reached] == ["gitstratum/q.py:2 imports twisted.internet.reactor"]
