"""The server's packages in layers: a module imports only from its own package or a lower layer,
and no two packages import each other, even through a third. Every import counts: module level,
under `if TYPE_CHECKING:` and inside functions (a lazy import is still a dependency)."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

SERVER = Path(__file__).resolve().parents[2] / "server"

# Lowest first. A package may import from the packages before it, never from those after it.
LAYERS = (
    "settings",  # configuration from the environment
    "model",  # the backbone, its loading and layout, the edit hook
    "editor",  # the LKS method: facts, detection, scope, hypernetwork, split, cache, training
    "gate",  # the scope gate: encoder, rule, table, relation head
    "packs",  # pack format, store, names, validation, live edit sets and their registry
    "evaluation",  # metrics over benchmark items, the datasets
    "builder",  # one pack version built from facts: editor + gate + packs + quality checks
    "engine",  # prepared requests, batching, KV cache, sampling
    "jobs",  # the durable job store and the worker that builds and publishes versions
    "api",  # HTTP: routes, serving classes, auth, metrics
    "cli",  # the `lks` command
)
RANK = {name: rank for rank, name in enumerate(LAYERS)}


def _package(path: Path) -> str:
    """The top-level part of server/ a file belongs to: `editor` for server/editor/train.py,
    `cli` for server/cli.py."""
    return path.relative_to(SERVER).parts[0].removesuffix(".py")


def _module_name(path: Path) -> str:
    parts = ("server", *path.relative_to(SERVER).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported_packages(path: Path, text: str | None = None) -> set[tuple[str, int]]:
    """(server package, line) for every import of a server module in the file (or in `text`,
    read as if it were that file)."""
    tree = ast.parse(path.read_text() if text is None else text, filename=str(path))
    module = _module_name(path)
    is_package = path.name == "__init__.py"
    found: set[tuple[str, int]] = set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = module.split(".")
                base = base if is_package else base[:-1]
                base = base[: len(base) - (node.level - 1)]
                names = [".".join([*base, *([node.module] if node.module else [])])]
            else:
                names = [node.module or ""]
            if names == ["server"]:  # `from server import x`: x is a package or a name of
                names = [  # server/__init__.py (which imports nothing and is everyone's)
                    f"server.{alias.name}"
                    for alias in node.names
                    if (SERVER / alias.name).is_dir() or (SERVER / f"{alias.name}.py").is_file()
                ]
        for name in names:
            parts = name.split(".")
            if parts[0] == "server" and len(parts) > 1:
                found.add((parts[1], node.lineno))
    return found


def _modules() -> list[Path]:
    return sorted(p for p in SERVER.rglob("*.py") if "migrations" not in p.parts)


def _graph() -> dict[str, dict[str, list[str]]]:
    """package -> imported package -> where ("file:line")."""
    graph: dict[str, dict[str, list[str]]] = {}
    for path in _modules():
        source = _package(path)
        if source == "__init__":
            continue
        for target, line in _imported_packages(path):
            if target != source:
                where = f"{path.relative_to(SERVER.parent)}:{line}"
                graph.setdefault(source, {}).setdefault(target, []).append(where)
    return graph


def test_every_package_has_a_layer() -> None:
    packages = {_package(p) for p in _modules()} - {"__init__"}
    assert packages == set(LAYERS), (
        f"unlisted: {sorted(packages - set(LAYERS))}, gone: {sorted(set(LAYERS) - packages)}"
    )


def test_no_import_from_a_higher_layer() -> None:
    upward = [
        f"{where}: {source} imports {target}"
        for source, targets in _graph().items()
        for target, wheres in targets.items()
        for where in wheres
        if target not in RANK or RANK[target] > RANK[source]
    ]
    assert upward == []


def test_no_import_cycle_between_packages() -> None:
    graph = {source: set(targets) for source, targets in _graph().items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append([*path[path.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for start in sorted(graph):
        if start not in state:
            visit(start, [start])
    assert cycles == []


@pytest.mark.parametrize("low", ["model", "editor"])
def test_model_and_editor_import_no_serving_or_storage_code(low: str) -> None:
    forbidden = {"packs", "engine", "jobs", "api", "cli"}
    assert set(_graph().get(low, {})) & forbidden == set()


def test_the_checker_sees_lazy_and_type_checking_imports(tmp_path: Path) -> None:
    source = tmp_path / "mod.py"
    source.write_text(
        "from typing import TYPE_CHECKING\n"
        "import server.settings\n"
        "if TYPE_CHECKING:\n"
        "    from server.packs.format import Pack\n"
        "def f():\n"
        "    from server.api import create_app\n"
        "    import server.jobs.store\n"
    )
    # read as if it lived in server/model/
    found = _imported_packages(SERVER / "model" / "mod.py", source.read_text())
    assert {package for package, _ in found} == {"settings", "packs", "api", "jobs"}


def test_lazy_package_exports_are_their_submodules_objects() -> None:
    """`server.packs` and `server.api` export on first use (PEP 562): every name listed
    resolves to the object its submodule defines, and an unknown name is an error."""
    packs = importlib.import_module("server.packs")
    for name in packs.__all__:
        submodule = importlib.import_module(f"server.packs.{packs._EXPORTS[name]}")
        assert getattr(packs, name) is getattr(submodule, name)
    api = importlib.import_module("server.api")
    assert api.__all__ == ["create_app"]
    assert api.create_app is importlib.import_module("server.api.app").create_app
    for lazy in (packs, api):
        with pytest.raises(AttributeError, match="no attribute 'Nonexistent'"):
            lazy.Nonexistent  # noqa: B018
