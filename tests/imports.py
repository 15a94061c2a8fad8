"""Static import walking for the layer and DVC-deps tests: every import statement, wherever it sits,
except those under `if TYPE_CHECKING:` (annotations only: never executed)."""

from __future__ import annotations

import ast
from pathlib import Path


def _type_checking_only(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and isinstance(test, ast.Name) and test.id == "TYPE_CHECKING"


def imported_names(path: Path) -> set[str]:
    """Dotted names `path` imports: `import a.b` gives a.b; `from a import b` gives a and a.b."""
    names: set[str] = set()
    pending = [ast.parse(path.read_text())]
    while pending:
        node = pending.pop()
        if _type_checking_only(node):
            pending.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
        pending.extend(ast.iter_child_nodes(node))
    return names


def imported_project_files(
    path: Path, root: Path, packages: tuple[str, ...], stop: frozenset[str] = frozenset(), seen: set[str] | None = None
) -> set[str]:
    """Files under `root` that `path` imports, transitively, within `packages`.

    Files in `stop` are listed but not followed. A package that imports its own modules by
    discovery (a registry using pkgutil) brings every module in its folder."""
    seen = set() if seen is None else seen
    for name in imported_names(path):
        if name.split(".")[0] not in packages:
            continue
        for candidate in (f"{name.replace('.', '/')}.py", f"{name.replace('.', '/')}/__init__.py"):
            if (root / candidate).is_file() and candidate not in seen:
                seen.add(candidate)
                if candidate in stop:
                    continue
                imported_project_files(root / candidate, root, packages, stop, seen)
                if candidate.endswith("__init__.py") and "pkgutil.iter_modules" in (root / candidate).read_text():
                    for module in sorted((root / candidate).parent.glob("*.py")):
                        relative = str(module.relative_to(root))
                        if relative not in seen:
                            seen.add(relative)
                            imported_project_files(module, root, packages, stop, seen)
    return seen
