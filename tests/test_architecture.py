"""The package's layering: imports only point down, there are no import cycles, and
``import trio_embarcadero`` / ``trio-embarcadero serve`` never load the tools.

The import graph is built statically with :mod:`ast` from the source files, so
it sees every import: module level, inside functions and under
``if TYPE_CHECKING:``. The layers and what each may not import are the two
tables below; extend them when the layout grows.
"""

from __future__ import annotations

import ast
import fnmatch
import importlib.util
import itertools
import json
import os
import re
import select
import signal
import subprocess
import sys
import textwrap
import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from test_cli import clean_env, write_config

from trio_embarcadero.cli.main import _is_x86_64_glibc

# -- the layout -------------------------------------------------------------------------

PACKAGE = "trio_embarcadero"
PACKAGE_DIR = Path(__file__).resolve().parent.parent / PACKAGE

#: Layer name -> the modules in it, as fnmatch patterns on dotted module names
#: (a package's ``__init__`` is the package's own name). A pattern ``x.*``
#: also requires ``x`` to be a package. Every module must be in exactly one layer.
LAYERS: dict[str, tuple[str, ...]] = {
    "base": (
        f"{PACKAGE}.wire",
        f"{PACKAGE}.errors",
        f"{PACKAGE}.config",
        f"{PACKAGE}.transport",
    ),
    "log": (f"{PACKAGE}.log", f"{PACKAGE}.log.*"),
    "broker": (f"{PACKAGE}.broker", f"{PACKAGE}.broker.*"),
    "client": (f"{PACKAGE}.client", f"{PACKAGE}.client.*"),
    "tools": (f"{PACKAGE}.tools", f"{PACKAGE}.tools.*"),
    "top": (PACKAGE, f"{PACKAGE}.cli", f"{PACKAGE}.cli.*", f"{PACKAGE}.__main__"),
}


@dataclass(frozen=True)
class Rule:
    """What the modules of one layer may not import.

    Attributes:
        layer: The layer the rule is about.
        forbidden: Layers it may not import at all (any kind of import).
        external: Outside modules (top-level names) it may not import, directly
            or through the package modules it imports at run time.
        lazy_only: Layers it may import only inside functions.
    """

    layer: str
    forbidden: frozenset[str] = frozenset()
    external: frozenset[str] = frozenset()
    lazy_only: frozenset[str] = frozenset()


def _rule(layer: str, forbidden: str = "", external: str = "", lazy_only: str = "") -> Rule:
    return Rule(
        layer,
        frozenset(forbidden.split()),
        frozenset(external.split()),
        frozenset(lazy_only.split()),
    )


RULES: tuple[Rule, ...] = (
    _rule("base", forbidden="log broker client tools top"),
    _rule("log", forbidden="broker client tools top", external="trio socket"),
    _rule("broker", forbidden="client tools top"),
    _rule("client", forbidden="log broker tools top"),
    _rule("tools", forbidden="top"),
    # The command line may load the tools, but only lazily, so `serve` never pays for them.
    _rule("top", lazy_only="tools"),
)

# -- the import graph -------------------------------------------------------------------

MODULE = "module"  # runs when the importing module is imported
FUNCTION = "function"  # runs when a function is called
TYPE_CHECKING = "TYPE_CHECKING"  # never runs (type checkers only)
RUNTIME = frozenset({MODULE, FUNCTION})


@dataclass(frozen=True)
class Import:
    """One imported module of one import statement.

    Attributes:
        importer: Dotted name of the importing module.
        target: Dotted name of the imported module (for an outside module,
            its top-level name).
        internal: Whether the target is in the package.
        kind: MODULE, FUNCTION or TYPE_CHECKING.
        where: ``file:line`` of the statement.
        statement: The statement's source.
    """

    importer: str
    target: str
    internal: bool
    kind: str
    where: str
    statement: str

    def describe(self) -> str:
        kind = "" if self.kind == MODULE else f" [{self.kind}]"
        return f"{self.where}: `{self.statement}`{kind}"


@dataclass
class ImportGraph:
    """Every import of every module of one package."""

    package: str
    modules: dict[str, Path] = field(default_factory=dict)
    packages: set[str] = field(default_factory=set)
    imports: list[Import] = field(default_factory=list)

    def edges(
        self, kinds: Iterable[str] = (MODULE, FUNCTION, TYPE_CHECKING)
    ) -> dict[str, set[str]]:
        """Importer -> imported modules of the package, for imports of ``kinds``."""
        wanted = set(kinds)
        graph: dict[str, set[str]] = {name: set() for name in self.modules}
        for imp in self.imports:
            if imp.internal and imp.kind in wanted and imp.target in self.modules:
                graph[imp.importer].add(imp.target)
        return graph

    def first_import(self, importer: str, target: str) -> Import:
        return next(i for i in self.imports if i.importer == importer and i.target == target)


def _module_names(package_dir: Path, package: str) -> dict[str, Path]:
    names = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = [package, *path.relative_to(package_dir).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _statements(tree: ast.AST) -> Iterable[tuple[ast.Import | ast.ImportFrom, str]]:
    """Every import statement with its kind."""
    todo: list[tuple[ast.AST, bool, bool]] = [(tree, False, False)]
    while todo:
        node, in_function, in_tc = todo.pop()
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node, TYPE_CHECKING if in_tc else FUNCTION if in_function else MODULE
            continue
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            todo.extend((child, in_function, True) for child in node.body)
            todo.extend((child, in_function, in_tc) for child in node.orelse)
            continue
        inner = in_function or isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
        todo.extend((child, inner, in_tc) for child in ast.iter_child_nodes(node))


def build_import_graph(package_dir: Path, package: str | None = None) -> ImportGraph:
    """Parse every module under ``package_dir`` and resolve its imports.

    * ``import a.b`` and ``from a.b import c``: an edge to ``a.b``; for
      ``from``, an edge to ``a.b.c`` instead when that is a module.
    * Relative imports resolve against the importing module's package (a
      package's ``__init__`` is its own package).
    * ``from .pkg import Name`` is an edge to ``pkg`` (its ``__init__``) unless
      ``Name`` is a submodule of ``pkg``.
    """
    package = package or package_dir.name
    graph = ImportGraph(package, _module_names(package_dir, package))
    graph.packages = {n for n, p in graph.modules.items() if p.name == "__init__.py"}
    shown_root = package_dir.parent
    for name, path in graph.modules.items():
        source = path.read_text(encoding="utf-8")
        tree = ast.parse(source, filename=str(path))
        own_package = name if name in graph.packages else name.rpartition(".")[0]
        for node, kind in _statements(tree):
            where = f"{path.relative_to(shown_root)}:{node.lineno}"
            targets = _targets(node, own_package, graph.modules.keys(), where)
            for target in targets:
                internal = target == package or target.startswith(package + ".")
                imported = target if internal else target.partition(".")[0]
                graph.imports.append(
                    Import(name, imported, internal, kind, where, ast.unparse(node))
                )
    return graph


def _targets(
    node: ast.Import | ast.ImportFrom, own_package: str, modules: Iterable[str], where: str
) -> list[str]:
    """The absolute names of the modules one statement imports."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level:
        parts = own_package.split(".")
        if node.level - 1 >= len(parts):
            raise ValueError(f"{where}: relative import beyond the package")
        base = ".".join(parts[: len(parts) - (node.level - 1)])
        if node.module:
            base = f"{base}.{node.module}"
    else:
        base = node.module or ""
    known = set(modules)
    return [
        f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names
    ]


def find_cycles(
    graph: ImportGraph, kinds: Iterable[str] = RUNTIME | {TYPE_CHECKING}
) -> list[list[str]]:
    """Import cycles, each as ``[a, b, ..., a]``.

    Tarjan's algorithm finds the groups of modules that import each other; for
    every module of a group the shortest cycle through it is reported, so each
    back-reference shows up, not just the first.
    """
    edges = graph.edges(kinds)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[set[str]] = []

    def connect(v: str) -> None:  # Tarjan
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.add(w)
                if w == v:
                    break
            if len(group) > 1 or v in edges[v]:
                groups.append(group)

    for v in sorted(edges):
        if v not in index:
            connect(v)

    # For each module of a group, the shortest cycle through it, written from
    # its smallest module on (so each cycle appears once).
    cycles: set[tuple[str, ...]] = set()
    for group in groups:
        for start in sorted(group):
            path = _shortest_cycle(edges, group, start)
            i = path.index(min(path))
            cycles.add((*path[i:-1], *path[:i], path[i]))
    return [list(cycle) for cycle in sorted(cycles)]


def _shortest_cycle(edges: Mapping[str, set[str]], group: set[str], start: str) -> list[str]:
    came_from: dict[str, str] = {}
    todo = deque([start])
    while True:
        v = todo.popleft()  # there is a cycle: the group is strongly connected
        if start in edges[v]:
            path = [start]
            while v != start:
                path.append(v)
                v = came_from[v]
            path.append(start)
            return path[::-1]
        for w in sorted(edges[v] & group):
            if w not in came_from and w != start:
                came_from[w] = v
                todo.append(w)


def describe_cycle(graph: ImportGraph, cycle: list[str]) -> str:
    lines = [" -> ".join(cycle)]
    for a, b in itertools.pairwise(cycle):
        lines.append(f"    {a} imports {b} at {graph.first_import(a, b).describe()}")
    return "\n".join(lines)


def layer_of(module: str, layers: Mapping[str, tuple[str, ...]]) -> list[str]:
    return [
        name
        for name, patterns in layers.items()
        if any(fnmatch.fnmatchcase(module, p) for p in patterns)
    ]


def layout_problems(graph: ImportGraph, layers: Mapping[str, tuple[str, ...]]) -> list[str]:
    """Packages the layers need that are missing, and modules in no or several layers."""
    problems = [
        f"layer {name!r}: {pattern[:-2]} is not a package"
        for name, patterns in layers.items()
        for pattern in patterns
        if pattern.endswith(".*") and pattern[:-2] not in graph.packages
    ]
    for module in sorted(graph.modules):
        found = layer_of(module, layers)
        if len(found) != 1:
            problems.append(f"{module} is in {len(found) or 'no'} layer(s) {found or ''}".rstrip())
    return problems


def rule_violations(
    graph: ImportGraph, rule: Rule, layers: Mapping[str, tuple[str, ...]]
) -> list[str]:
    """Every import that breaks ``rule``, as ``file:line: statement: why``."""
    members = {m for m in graph.modules if rule.layer in layer_of(m, layers)}
    problems = []
    for imp in graph.imports:
        if imp.importer not in members:
            continue
        if imp.internal:
            for target_layer in layer_of(imp.target, layers):
                if target_layer in rule.forbidden:
                    problems.append(
                        f"{imp.describe()}: {rule.layer} must not import {target_layer} "
                        f"({imp.target})"
                    )
                elif target_layer in rule.lazy_only and imp.kind != FUNCTION:
                    problems.append(
                        f"{imp.describe()}: {rule.layer} may import {target_layer} "
                        f"({imp.target}) only inside a function"
                    )
        elif imp.target in rule.external:
            problems.append(f"{imp.describe()}: {rule.layer} must not import {imp.target}")
    if rule.external:
        problems += _indirect_external(graph, rule, members)
    return problems


def _indirect_external(graph: ImportGraph, rule: Rule, members: set[str]) -> list[str]:
    """Forbidden outside modules a layer reaches through other package modules at run time."""
    edges = graph.edges(RUNTIME)
    problems = []
    for start in sorted(members):
        came_from: dict[str, str] = {start: start}
        todo = deque([start])
        while todo:
            v = todo.popleft()
            for w in sorted(edges[v]):
                if w not in came_from:
                    came_from[w] = v
                    todo.append(w)
        for module in sorted(came_from.keys() - members):
            for imp in graph.imports:
                if (
                    imp.importer == module
                    and not imp.internal
                    and imp.kind in RUNTIME
                    and imp.target in rule.external
                ):
                    chain = [module]
                    while chain[-1] != start:
                        chain.append(came_from[chain[-1]])
                    problems.append(
                        f"{imp.describe()}: {rule.layer} must not import {imp.target}, "
                        f"and reaches it through {' -> '.join(reversed(chain))}"
                    )
    return problems


# -- the graph builder, on synthetic packages --------------------------------------------


def write_package(root: Path, files: Mapping[str, str]) -> Path:
    """Write ``files`` (paths relative to the package directory) under ``root/pkg``."""
    package_dir = root / "pkg"
    for name, text in files.items():
        path = package_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text), encoding="utf-8")
    return package_dir


def edge_set(graph: ImportGraph) -> set[tuple[str, str, str, int]]:
    return {
        (i.importer, i.target, i.kind, int(i.where.rpartition(":")[2]))
        for i in graph.imports
        if i.internal
    }


def test_builder_finds_a_cycle_through_a_function_level_import(tmp_path: Path) -> None:
    package_dir = write_package(
        tmp_path,
        {
            "__init__.py": "",
            "a.py": "from . import b\n",
            "b.py": "from .c import thing\n",
            "c.py": "def thing():\n    import pkg.a\n",
            "d.py": "from .a import x\n",
        },
    )
    graph = build_import_graph(package_dir)
    assert find_cycles(graph) == [["pkg.a", "pkg.b", "pkg.c", "pkg.a"]]
    assert graph.first_import("pkg.c", "pkg.a").kind == FUNCTION
    text = describe_cycle(graph, find_cycles(graph)[0])
    assert "pkg.a -> pkg.b -> pkg.c -> pkg.a" in text
    assert "pkg/c.py:2: `import pkg.a` [function]" in text
    # Without function-level imports there is no cycle.
    assert find_cycles(graph, {MODULE}) == []


def test_builder_counts_type_checking_imports(tmp_path: Path) -> None:
    package_dir = write_package(
        tmp_path,
        {
            "__init__.py": "",
            "x.py": """\
                from typing import TYPE_CHECKING
                if TYPE_CHECKING:
                    from .y import Y
                else:
                    from . import z
                """,
            "y.py": """\
                import typing
                if typing.TYPE_CHECKING:
                    from pkg.x import X
                """,
            "z.py": "",
        },
    )
    graph = build_import_graph(package_dir)
    assert {(e[0], e[1], e[2]) for e in edge_set(graph)} == {
        ("pkg.x", "pkg.y", TYPE_CHECKING),
        ("pkg.x", "pkg.z", MODULE),  # the else branch runs
        ("pkg.y", "pkg.x", TYPE_CHECKING),
    }
    assert find_cycles(graph) == [["pkg.x", "pkg.y", "pkg.x"]]
    assert find_cycles(graph, RUNTIME) == []


def test_builder_resolves_relative_imports(tmp_path: Path) -> None:
    package_dir = write_package(
        tmp_path,
        {
            "__init__.py": "from .sub import helper\n",
            "top.py": "",
            "sub/__init__.py": "from .mod import f\nfrom . import name_in_init\nNAME = 1\n",
            "sub/helper.py": "",
            "sub/mod.py": """\
                import json
                import pkg.sub.helper as h
                from .. import top
                from ..sub import helper
                from ..sub import NAME
                from . import helper, NAME
                from ..top import *
                from os import path
                """,
        },
    )
    graph = build_import_graph(package_dir)
    assert edge_set(graph) == {
        ("pkg", "pkg.sub.helper", MODULE, 1),  # Name is a submodule: not pkg.sub
        ("pkg.sub", "pkg.sub.mod", MODULE, 1),  # __init__ is its own package
        ("pkg.sub", "pkg.sub", MODULE, 2),  # a name of the package itself
        ("pkg.sub.mod", "pkg.sub.helper", MODULE, 2),
        ("pkg.sub.mod", "pkg.top", MODULE, 3),
        ("pkg.sub.mod", "pkg.sub.helper", MODULE, 4),
        ("pkg.sub.mod", "pkg.sub", MODULE, 5),  # a name, so pkg/sub/__init__
        ("pkg.sub.mod", "pkg.sub.helper", MODULE, 6),
        ("pkg.sub.mod", "pkg.sub", MODULE, 6),
        ("pkg.sub.mod", "pkg.top", MODULE, 7),
    }
    assert {(i.importer, i.target) for i in graph.imports if not i.internal} == {
        ("pkg.sub.mod", "json"),
        ("pkg.sub.mod", "os"),
    }
    # The package importing a name of itself is a cycle of one.
    assert ["pkg.sub", "pkg.sub"] in find_cycles(graph)


def test_builder_rejects_a_relative_import_beyond_the_package(tmp_path: Path) -> None:
    package_dir = write_package(tmp_path, {"__init__.py": "", "a.py": "from .. import b\n"})
    with pytest.raises(ValueError, match=r"pkg/a\.py:1: relative import beyond the package"):
        build_import_graph(package_dir)


def test_rule_checks_on_a_synthetic_package(tmp_path: Path) -> None:
    package_dir = write_package(
        tmp_path,
        {
            "__init__.py": "",
            "core/__init__.py": "from . import io\n",
            "core/io.py": "from .. import net\n",
            "net.py": "import socket\n",
            "tools/__init__.py": "",
            "cli.py": """\
                from . import core
                from .tools import x
                def main():
                    from . import tools
                """,
        },
    )
    graph = build_import_graph(package_dir)
    layers = {
        "low": ("pkg.net",),
        "core": ("pkg.core", "pkg.core.*"),
        "tools": ("pkg.tools", "pkg.tools.*"),
        "top": ("pkg", "pkg.cli"),
    }
    assert layout_problems(graph, layers) == []
    assert layout_problems(graph, {**layers, "gone": ("pkg.gone.*",)}) == [
        "layer 'gone': pkg.gone is not a package"
    ]
    assert layout_problems(graph, {"low": ("pkg.net",)})[0] == "pkg is in no layer(s)"

    top = Rule("top", lazy_only=frozenset({"tools"}))
    assert rule_violations(graph, top, layers) == [
        "pkg/cli.py:2: `from .tools import x`: top may import tools (pkg.tools) only inside "
        "a function"
    ]
    core = Rule("core", forbidden=frozenset({"top"}), external=frozenset({"socket"}))
    assert rule_violations(graph, core, layers) == [
        "pkg/net.py:1: `import socket`: core must not import socket, and reaches it through "
        "pkg.core -> pkg.core.io -> pkg.net",
        "pkg/net.py:1: `import socket`: core must not import socket, and reaches it through "
        "pkg.core.io -> pkg.net",
    ]
    low = Rule("low", forbidden=frozenset({"core"}), external=frozenset({"socket"}))
    assert rule_violations(graph, low, layers) == [
        "pkg/net.py:1: `import socket`: low must not import socket"
    ]


# -- the real package -------------------------------------------------------------------


@pytest.fixture(scope="module")
def graph() -> ImportGraph:
    return build_import_graph(PACKAGE_DIR)


def test_rules_name_known_layers() -> None:
    for rule in RULES:
        assert {rule.layer, *rule.forbidden, *rule.lazy_only} <= LAYERS.keys(), rule


def test_layout(graph: ImportGraph) -> None:
    problems = layout_problems(graph, LAYERS)
    assert not problems, "the package does not have the layered layout:\n" + "\n".join(problems)


def test_no_import_cycles(graph: ImportGraph) -> None:
    cycles = find_cycles(graph)
    assert not cycles, "import cycles (every kind of import counts):\n" + "\n".join(
        describe_cycle(graph, cycle) for cycle in cycles
    )


@pytest.mark.parametrize("rule", RULES, ids=[rule.layer for rule in RULES])
def test_layer_rule(graph: ImportGraph, rule: Rule) -> None:
    members = [m for m in graph.modules if rule.layer in layer_of(m, LAYERS)]
    assert members, f"layer {rule.layer!r} has no modules ({', '.join(LAYERS[rule.layer])})"
    problems = rule_violations(graph, rule, LAYERS)
    assert not problems, f"imports that break the {rule.layer!r} rule:\n" + "\n".join(problems)


# -- what actually gets loaded ----------------------------------------------------------

TIMEOUT = 30.0
LISTENING = re.compile(rb"listening on \S+:\d+")
TOOLS = f"{PACKAGE}.tools"


def is_tools(module: str) -> bool:
    return module == TOOLS or module.startswith(TOOLS + ".")


def require_tools_package() -> None:
    # Without the package the checks above pass without proving anything.
    assert importlib.util.find_spec(TOOLS) is not None, f"there is no {TOOLS} package yet"


def _loaded_by(statement: str) -> list[str]:
    """The package's modules a fresh interpreter has loaded after ``statement``."""
    code = (
        f"import json, sys; {statement}; "
        f"print(json.dumps(sorted(m for m in sys.modules if m.startswith('{PACKAGE}'))))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=TIMEOUT,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    loaded: list[str] = json.loads(result.stdout)
    return loaded


def test_importing_the_package_loads_nothing_else() -> None:
    """Its public names load their modules when first used: a process that
    needs the wire format alone (the load generator) never loads the broker."""
    assert _loaded_by(f"import {PACKAGE}") == [PACKAGE]
    require_tools_package()


def test_a_public_name_loads_its_module_when_used() -> None:
    loaded = _loaded_by(f"import {PACKAGE}; {PACKAGE}.open_broker; {PACKAGE}.Subscriber")
    assert {f"{PACKAGE}.broker", f"{PACKAGE}.client"} <= set(loaded)
    assert [m for m in loaded if is_tools(m)] == []
    with pytest.raises(AttributeError, match="has no attribute 'nothing'"):
        importlib.import_module(PACKAGE).nothing  # noqa: B018 (the access is the test)


def test_every_public_name_is_loaded_and_typed_as_the_package_lists_it() -> None:
    """Each name of ``__all__`` resolves, and the type checkers' imports (under
    ``if TYPE_CHECKING:``) name the same modules as the lazy table."""
    package = importlib.import_module(PACKAGE)
    exports: dict[str, str] = package._EXPORTS
    for name in exports:
        assert getattr(package, name) is getattr(
            importlib.import_module(exports[name], PACKAGE), name
        )
    tree = ast.parse((PACKAGE_DIR / "__init__.py").read_text())
    typed = {
        alias.name: "." * node.level + (node.module or "")
        for block in tree.body
        if isinstance(block, ast.If) and ast.unparse(block.test) == "TYPE_CHECKING"
        for node in block.body
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
    }
    assert typed == exports
    assert set(package.__all__) == {*exports, "__version__"}


def test_the_command_line_loads_only_the_config_until_a_command_runs() -> None:
    """``serve`` starts itself again once (a glibc tunable) before it loads the broker."""
    loaded = _loaded_by(f"import {PACKAGE}.cli")
    assert [m for m in loaded if m.startswith((f"{PACKAGE}.broker", f"{PACKAGE}.log"))] == []
    assert [m for m in loaded if is_tools(m) or m.startswith(f"{PACKAGE}.client")] == []


def test_the_load_generator_loads_no_broker() -> None:
    loaded = _loaded_by(f"import {PACKAGE}.tools.loadgen")
    assert f"{PACKAGE}.wire" in loaded
    assert [m for m in loaded if m.startswith((f"{PACKAGE}.broker", f"{PACKAGE}.log"))] == []


def test_serve_loads_no_tools(tmp_path: Path, cxl_path: str) -> None:
    config = write_config(tmp_path, cxl_path)  # the CLI tests' small broker
    proc = subprocess.Popen(
        [
            *(sys.executable, "-X", "importtime", "-m", PACKAGE, "serve"),
            *("--config", str(config), "--port", "0", "--log-level", "info"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        # Unset, so that serve starts itself again to set it (x86-64 glibc).
        env={k: v for k, v in clean_env().items() if k != "GLIBC_TUNABLES"},
    )
    try:
        assert proc.stderr is not None
        fd = proc.stderr.fileno()
        seen = b""
        deadline = time.monotonic() + TIMEOUT
        while LISTENING.search(seen) is None:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"no 'listening on' line in time; stderr: {seen.decode()}"
            ready, _, _ = select.select([fd], [], [], remaining)
            if ready:
                chunk = os.read(fd, 65536)
                assert chunk, f"serve exited before listening: {seen.decode()}"
                seen += chunk
        proc.send_signal(signal.SIGINT)
        _, rest = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=TIMEOUT)
    stderr = (seen + rest).decode()
    assert proc.returncode == 0, stderr
    imported = [
        line.rpartition("|")[2].strip()
        for line in stderr.splitlines()
        if line.startswith("import time:")
    ]
    assert f"{PACKAGE}.cli" in imported, "no -X importtime lines seen"
    assert [m for m in imported if is_tools(m)] == []
    # Where serve starts itself again (x86-64 glibc), the first start loaded
    # the config only: the broker is loaded once, by the process that serves.
    assert imported.count(f"{PACKAGE}.broker") == 1, imported
    if _is_x86_64_glibc():  # where serve starts itself again
        assert imported.count(f"{PACKAGE}.cli.main") == 2, "serve did not start itself again"
    require_tools_package()
