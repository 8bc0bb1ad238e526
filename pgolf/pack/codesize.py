"""The code the challenge counts: the source needed to evaluate the artifact.

The files are found by following the imports of the eval stage through this repository's
packages and counted as they are. `wrapped_size` is the rule the leading entries use for their one
script (R1, docs/lineage.md#code-size): minify, brotli quality 11, base85, and count the two-line
self-extracting stub that execs it.
"""
from __future__ import annotations

import ast
import base64
from pathlib import Path

import brotli
import python_minifier

LOCAL_PACKAGES = ("pgolf", "runner", "tasks")


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


def minify(source: str) -> str:
    """R1's flags: keep local names, no literal hoisting, drop docstrings and asserts, one line per block."""
    return python_minifier.minify(source, rename_locals=False, hoist_literals=False, remove_literal_statements=True,
                                  remove_asserts=True, prefer_single_line=True)


def wrapper(source: str) -> str:
    payload = base64.b85encode(brotli.compress(minify(source).encode("utf-8"), quality=11)).decode("ascii")
    return f'import brotli as B,base64 as b\nexec(B.decompress(b.b85decode("{payload}")))\n'


def wrapped_size(source: str) -> int:
    return len(wrapper(source).encode("utf-8"))
