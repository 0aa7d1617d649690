"""The package's layering, read from every module's imports (docs/architecture.md): what runs in a job never
imports the control plane, tracking never imports publishing, and no import circle exists between modules."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "platform" / "tuneplane"

# importer prefix -> prefixes it must never import
FORBIDDEN = {
    "tuneplane.train": ("tuneplane.api", "tuneplane.store", "tuneplane.backends", "tuneplane.control"),
    "tuneplane.data": (
        "tuneplane.api",
        "tuneplane.store",
        "tuneplane.backends",
        "tuneplane.control",
        "tuneplane.train",
        "tuneplane.publishing",
    ),
    "tuneplane.publishing": ("tuneplane.api", "tuneplane.store", "tuneplane.backends", "tuneplane.control"),
    "tuneplane.tracking": ("tuneplane.publishing", "tuneplane.train", "tuneplane.api", "tuneplane.control"),
    "tuneplane.spec": ("tuneplane.",),  # the spec stands alone (but for errors and itself)
    "tuneplane.store": ("tuneplane.api", "tuneplane.control", "tuneplane.backends"),
    "tuneplane.backends": ("tuneplane.api", "tuneplane.control", "tuneplane.train"),
}
SPEC_MAY_IMPORT = ("tuneplane.spec", "tuneplane.errors", "tuneplane.quantity")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """Module -> the tuneplane modules it imports (at any depth of the file: lazy imports count too)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py") if "migrations" not in p.parts}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                base = node.module
                for alias in node.names:  # `from tuneplane.tracking import auth` imports a module
                    found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def test_no_module_imports_across_a_layer() -> None:
    wrong = []
    for module, imported in _imports().items():
        for importer, banned in FORBIDDEN.items():
            if not (module == importer or module.startswith(importer + ".")):
                continue
            for target in imported:
                if importer == "tuneplane.spec" and target.startswith(SPEC_MAY_IMPORT):
                    continue
                if target.startswith(banned):
                    wrong.append(f"{module} imports {target}")
    assert not wrong, "\n".join(sorted(wrong))


def test_no_import_circles() -> None:
    """Between modules, lazy imports inside functions included (a package's module importing the package's
    __init__ is not a circle)."""
    graph = {m: {t for t in ts if not m.startswith(t + ".")} for m, ts in _imports().items()}
    seen: dict[str, int] = {}  # 1: on the current path, 2: done
    circles: list[str] = []

    def visit(node: str, path: list[str]) -> None:
        seen[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if seen.get(nxt) == 1:
                circles.append(" -> ".join([*path[path.index(nxt) :], nxt]))
            elif nxt not in seen:
                visit(nxt, [*path, nxt])
        seen[node] = 2

    for node in sorted(graph):
        if node not in seen:
            visit(node, [node])
    assert not circles, "\n".join(circles)


# Who may call Ray: the recipes reach Ray Train through train/worker.py only; the launcher builds the job.
RAY_CALLERS = {
    "tuneplane.train.worker",
    "tuneplane.train.launcher",
    "tuneplane.raylocal",
    "tuneplane.backends.local",
    "tuneplane.devtools.cluster",
}


def test_ray_is_called_from_few_places() -> None:
    callers = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = (
                [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else []
            )
            if any(name == "ray" or name.startswith("ray.") for name in names):
                callers.add(_module_name(path))
    assert callers <= RAY_CALLERS, sorted(callers - RAY_CALLERS)
