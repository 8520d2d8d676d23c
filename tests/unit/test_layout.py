"""The import rules between the sides of the code (see the README's "How the
code is laid out"): what each package may import of the project, checked on
the sources and in fresh interpreters."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROJECT = ("param_server", "loaders", "fed_clients", "tests", "bench")

WIRE = ("param_server.federation.wire", "param_server.federation.protocol")
# Package -> the project packages its modules may import (besides itself).
# The most specific prefix wins; launch and cli may import anything.
ALLOWED: dict[str, tuple[str, ...]] = {
    "param_server": ("param_server.core",),  # the package's __init__ only
    "param_server.core": (),
    "param_server.api": ("param_server.core",),
    "param_server.store": ("param_server.core",),
    "param_server.server": (
        "param_server.core",
        "param_server.api",
        "param_server.store",
    ),
    "param_server.client": ("param_server.core", "param_server.api"),
    "param_server.federation": ("param_server.core", "param_server.client", *WIRE),
    "param_server.federation.wire": ("param_server.core", *WIRE),
    "param_server.federation.protocol": ("param_server.core", *WIRE),
    "param_server.launch": PROJECT,
    "param_server.cli": PROJECT,
    "loaders": ("param_server.core", "param_server.client"),
    "fed_clients": ("param_server.core", *WIRE),
    "bench": ("param_server", "loaders", "fed_clients"),
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _package_of(module: str) -> str:
    best = ""
    for pkg in ALLOWED:
        if (module == pkg or module.startswith(pkg + ".")) and len(pkg) > len(best):
            best = pkg
    return best


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, module) of every import that runs (not under TYPE_CHECKING)."""
    out: list[tuple[int, str]] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            out.extend((node.lineno, a.name) for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            # `from pkg import mod` imports pkg.mod when mod is a module
            out.extend((node.lineno, f"{node.module}.{a.name}") for a in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return out


def _within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _edges() -> list[tuple[str, int, str, str]]:
    """(file, line, importer package, imported name) of every project edge."""
    out = []
    for top in ("param_server", "loaders", "fed_clients", "bench"):
        for path in sorted((ROOT / top).rglob("*.py")):
            module = _module_name(path)
            pkg = _package_of(module)
            tree = ast.parse(path.read_text(), str(path))
            for line, name in _imports(tree):
                if name.split(".")[0] in PROJECT:
                    out.append((str(path.relative_to(ROOT)), line, pkg, name))
    return out


def test_every_import_edge_is_allowed() -> None:
    bad = []
    for file, line, pkg, name in _edges():
        own = pkg != "param_server" and _within(name, (pkg,))
        if own or name == "param_server":
            continue
        if not _within(name, ALLOWED[pkg]):
            bad.append(f"{file}:{line}: {pkg} imports {name}")
    assert not bad, "forbidden import edges:\n" + "\n".join(bad)


def test_the_rules_catch_an_edge_from_the_server_to_the_node_side() -> None:
    tree = ast.parse(
        "import loaders.cache\nfrom param_server.client import ParamClient"
    )
    names = [name for _, name in _imports(tree)]
    assert not _within(names[0], ALLOWED["param_server.server"])
    assert not _within(names[1], ALLOWED["param_server.server"])
    guarded = ast.parse("if TYPE_CHECKING:\n    import loaders\n")
    assert _imports(guarded) == []


def _loaded_after(statement: str) -> list[str]:
    code = (
        f"import json, sys\n{statement}\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
        f"{PROJECT!r})))"
    )
    r = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return list(json.loads(r.stdout.strip().splitlines()[-1]))


SERVER_SIDE = ("param_server.server", "param_server.store", "param_server.launch")


@pytest.mark.parametrize(
    ("statement", "forbidden"),
    [
        (
            "import loaders",
            (
                *SERVER_SIDE,
                "param_server.federation",
                "param_server.cli",
                "fed_clients",
            ),
        ),
        ("import param_server.client", (*SERVER_SIDE, "loaders", "fed_clients")),
        ("import param_server", (*SERVER_SIDE, "param_server.client", "loaders")),
        (
            "import fed_clients.app",
            (*SERVER_SIDE, "param_server.client", "loaders", "param_server.cli"),
        ),
        (
            "import param_server.federation.wire",
            (*SERVER_SIDE, "param_server.client", "loaders", "fed_clients"),
        ),
    ],
)
def test_a_side_loads_nothing_of_the_others(
    statement: str, forbidden: tuple[str, ...]
) -> None:
    loaded = _loaded_after(statement)
    wrong = [m for m in loaded if _within(m, forbidden)]
    assert not wrong, f"`{statement}` loaded {wrong}"
