"""dvc.yaml, the stage modules and params.yaml agree; each stage's deps cover the code it imports."""
from __future__ import annotations

import ast
from pathlib import Path

import yaml

from tasks import params as P

ROOT = Path(__file__).resolve().parent.parent
# Imported by every stage but cannot change what a stage computes: listing them would make an
# edited error message rerun the whole pipeline.
NEUTRAL = {"pgolf/errors.py", "pgolf/params.py", "tasks/params.py"}


def dvc_stages() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def module_file(name: str) -> Path | None:
    base = ROOT / Path(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_files(start: Path) -> set[str]:
    """Repo files reachable from `start` through imports of pgolf.* and tasks.* (any depth)."""
    seen: set[str] = set()
    todo = [start]
    while todo:
        path = todo.pop()
        rel = path.relative_to(ROOT).as_posix()
        if rel in seen:
            continue
        seen.add(rel)
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for name in names:
                if name.split(".")[0] in ("pgolf", "tasks"):
                    found = module_file(name)
                    if found is not None:
                        todo.append(found)
    return {f for f in seen if not f.endswith("__init__.py")}


def covered(rel: str, deps: list[str]) -> bool:
    return any(rel == d or rel.startswith(d.rstrip("/") + "/") for d in deps)


def test_stages_match_modules_in_order():
    stages = dvc_stages()
    assert list(stages) == list(P.STAGES)
    for module in P.STAGE_MODULES:
        spec = module.SPEC
        stage = stages[spec.name]
        assert stage["cmd"] == f"python -m tasks.{spec.name}"
        assert stage["params"] == [spec.name]
        assert stage["outs"] == [spec.out]
        for path in spec.inputs.values():
            assert path in stage["deps"], f"{spec.name}: input {path} missing from dvc.yaml deps"


def test_deps_cover_every_imported_module():
    stages = dvc_stages()
    for name, stage in stages.items():
        files = imported_files(ROOT / "tasks" / f"{name}.py") - NEUTRAL
        missing = sorted(f for f in files if not covered(f, stage["deps"]))
        assert not missing, f"dvc.yaml stage {name!r} runs {missing} but does not list them as deps"


def test_deps_exist_and_are_not_too_broad():
    for name, stage in dvc_stages().items():
        for dep in stage["deps"]:
            if dep.startswith(("pgolf", "tasks")):
                assert (ROOT / dep).exists(), f"{name}: dep {dep} does not exist"
                assert dep not in ("pgolf", "pgolf/", "tasks"), f"{name}: {dep} would rerun the stage on any edit"


def test_quantization_code_is_not_a_train_dep():
    deps = dvc_stages()["train"]["deps"]
    assert not any(d.startswith(("pgolf/quant", "pgolf/pack", "pgolf/evaluate")) for d in deps)
    assert "pgolf/model" in deps
