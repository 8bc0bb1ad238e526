"""The code the challenge counts: the source needed to evaluate the artifact.

Today the files themselves are counted, found by following the imports of the eval stage through
this repository's packages; the minified, compressed single-script form the leading entries
count is the export's job.
"""
from __future__ import annotations

import ast
from pathlib import Path

LOCAL_PACKAGES = ("pgolf", "tasks")


def _module_file(root: Path, name: str) -> Path | None:
    base = root / Path(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def import_closure(entry: Path, root: Path, packages: tuple[str, ...] = LOCAL_PACKAGES) -> list[Path]:
    """Every file of `packages` under `root` reachable from `entry` by imports (at any depth,
    including imports inside functions), with the packages' __init__ files, sorted."""
    seen: set[Path] = set()
    todo = [entry.resolve()]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            for name in names:
                parts = name.split(".")
                if parts[0] not in packages:
                    continue
                for depth in range(1, len(parts) + 1):
                    found = _module_file(root, ".".join(parts[:depth]))
                    if found is not None:
                        todo.append(found.resolve())
    return sorted(seen)


def code_bytes(files: list[Path]) -> int:
    return sum(len(f.read_bytes()) for f in files)
