"""dvc.yaml, the stage modules and params.yaml agree; each stage's deps cover the code it imports."""
from __future__ import annotations

import re
from pathlib import Path

import yaml

from pgolf.data.corpus import BUILTIN
from pgolf.pack.codesize import import_closure
from pgolf.pack.single_file import bundled_files
from tasks import pack as pack_stage, stages as registry
from tasks.stages import stage_module

ROOT = Path(__file__).resolve().parent.parent
# Imported by every stage but cannot change what a stage computes: listing them would make an
# edited error message (or progress line) rerun the whole pipeline. pack still lists those the
# exported script bundles: they are part of the code whose bytes it counts.
NEUTRAL = {"pgolf/errors.py", "pgolf/typed_params.py", "runner/params.py", "pgolf/progress.py"}
# Files a stage reads that are not code: the builtin corpus.
DATA_DEPS = {"corpus": [BUILTIN.relative_to(ROOT).as_posix()]}


def dvc_stages() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def imported_files(start: Path) -> set[str]:
    files = import_closure(start, ROOT)
    return {f.relative_to(ROOT).as_posix() for f in files if f.name != "__init__.py"}


def module_file(stage: str) -> Path:
    return ROOT / (stage_module(stage).replace(".", "/") + ".py")


def covered(rel: str, deps: list[str]) -> bool:
    return any(rel == d or rel.startswith(d.rstrip("/") + "/") for d in deps)


def test_stages_match_modules_in_order():
    stages = dvc_stages()
    assert list(stages) == list(registry.STAGES)
    for module in registry.STAGE_MODULES:
        spec = module.SPEC
        assert registry.out_of(spec.name) == spec.out, "tasks/stages.py OUTS names another output"
        assert registry.config_of(spec.name) is spec.config_cls, "tasks/stages.py CONFIGS names another class"
        stage = stages[spec.name]
        assert stage["cmd"] == f"bin/stage {spec.name}"
        assert stage["params"] == [spec.name, *[s for s in spec.reads_params if s != spec.name]]
        assert stage["outs"] == spec.outs_for_dvc()
        for path in spec.deps_for_dvc():
            assert path in stage["deps"], f"{spec.name}: input {path} missing from dvc.yaml deps"
        data = [d for d in stage["deps"] if d.startswith(("data/", "artifacts/"))]
        assert data == spec.deps_for_dvc(), f"{spec.name}: dvc.yaml reads {data}, the stage {spec.deps_for_dvc()}"


def test_a_params_check_and_a_cached_runs_records_import_no_torch(tmp_path):
    """What `pgolf run` does around `dvc repro` when every stage is cached (check params.yaml whole,
    make each output's run record its own) loads no stage and so no torch: importing it costs more
    than the whole all-cached `dvc repro` (issue 25)."""
    import subprocess
    import sys

    out = tmp_path / "artifacts" / "eval"
    out.mkdir(parents=True)
    (out / "metrics.json").write_text('{"val_bpb": 2.5}')
    code = ("import sys\n"
            "from flows.repro import refresh_records\n"
            "from runner.params import check_params_file, render, write_params\n"
            f"ws = {str(tmp_path)!r}\n"
            "write_params(render('smoke'), ws + '/params.yaml')\n"
            "check_params_file(ws + '/params.yaml')\n"
            "assert refresh_records(ws, ['train', 'eval']) == {'eval': 'unknown'}\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'triton')))\n")
    loaded = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]", loaded


def test_deps_cover_every_imported_module():
    stages = dvc_stages()
    missing = {}
    for name, stage in stages.items():
        files = imported_files(module_file(name)) - NEUTRAL
        missing[name] = sorted(f for f in files if not covered(f, stage["deps"]))
    assert not any(missing.values()), f"dvc.yaml stages run code they do not list as deps: {missing}"


def submission_files() -> set[str]:
    """What the exported train_gpt.py bundles, so what pack counts as the code."""
    return {f.relative_to(ROOT).as_posix() for f in bundled_files(pack_stage.SUBMISSION_ENTRY, ROOT)}


def test_deps_list_only_code_the_stage_runs():
    """A stray dep reruns a stage for nothing (editing shard building must not retrain). pack also
    lists the code it counts as the artifact's code."""
    stages = dvc_stages()
    stray = {}
    for name, stage in stages.items():
        files = imported_files(module_file(name))
        if name == "pack":
            files |= submission_files()
        code = [d for d in stage["deps"] if d.startswith(("pgolf", "tasks")) and d not in DATA_DEPS.get(name, [])]
        stray[name] = [d for d in code if not any(covered(f, [d]) for f in files)]
    assert not any(stray.values()), f"dvc.yaml deps that the stage never imports: {stray}"


def test_deps_exist_and_are_not_too_broad():
    for name, stage in dvc_stages().items():
        for dep in stage["deps"]:
            if dep.startswith(("pgolf", "tasks")):
                assert (ROOT / dep).exists(), f"{name}: dep {dep} does not exist"
                assert dep not in ("pgolf", "pgolf/", "tasks"), f"{name}: {dep} would rerun the stage on any edit"


def test_quantization_code_is_not_a_train_dep():
    """Of the eval code, train runs only the val_bpb metric (train.val_every)."""
    deps = dvc_stages()["train"]["deps"]
    assert not any(d.startswith(("pgolf/quant", "pgolf/pack", "pgolf/evaluate")) for d in deps
                   if d != "pgolf/evaluate/bpb.py")
    assert "pgolf/model" in deps


def test_pack_deps_cover_the_counted_code():
    """Every file the exported script bundles, __init__ files and error messages included: each is
    bytes of the count."""
    deps = dvc_stages()["pack"]["deps"]
    missing = sorted(f for f in submission_files() if not covered(f, deps))
    assert not missing, f"pack counts {missing} as code but would not rerun when they change"


def test_data_deps_are_listed():
    for name, files in DATA_DEPS.items():
        assert set(files) <= set(dvc_stages()[name]["deps"]), f"{name} reads {files}: they must be DVC deps"


def test_the_library_never_imports_the_stages():
    """tasks/ is the stages' configs and CLIs over pgolf/; an import the other way would tie the
    library (and the exported single-file script) to the pipeline's layout."""
    offenders = []
    for path in sorted((ROOT / "pgolf").rglob("*.py")):
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            words = line.split()
            if words[:1] in (["import"], ["from"]) and len(words) > 1 and words[1].split(".")[0] in ("runner", "tasks", "flows"):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, offenders


# A repository path in a comment, docstring or string: docs/stages.md, pgolf/quant/gptq.py,
# docs/lineage.md#gptq, and anchors that follow into the same file (docs/lineage.md#muon,
# #baseline-config). The lookbehind skips paths inside other paths (bench/reference/pgolf/...).
PATH_REFERENCE = re.compile(r"(?<![\w./-])((?:docs|pgolf|tasks|flows|bench)/[\w./-]*?\.(?:md|py))"
                            r"((?:#[\w-]+)?(?:, #[\w-]+)*)")


def markdown_anchors(path: Path) -> set[str]:
    """Explicit <a id> anchors and GitHub's heading slugs (lowercase, punctuation dropped, spaces to '-')."""
    text = path.read_text(encoding="utf-8")
    headings = re.findall(r"^#+ (.+)$", text, re.M)
    return set(re.findall(r'<a id="([^"]+)"></a>', text)) | {
        re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def unresolved_references(text: str) -> list[str]:
    bad = []
    for rel, anchors in PATH_REFERENCE.findall(text):
        target = ROOT / rel
        if not target.is_file():
            bad.append(rel)
            continue
        cited = re.findall(r"#([\w-]+)", anchors)
        known = markdown_anchors(target) if cited else set()
        bad += [f"{rel}#{anchor}" for anchor in cited if anchor not in known]
    return bad


def test_every_path_the_code_cites_resolves():
    """A comment that points at a moved or never-written file (or a renamed docs heading) sends
    the reader nowhere; the scan names each one."""
    planted = "docs/gone.md, pgolf/gone.py, docs/lineage.md#no-such-topic, docs/lineage.md#gptq, #no-such-either"
    planted += ", docs/stages.md#determinism"  # a heading's slug
    assert unresolved_references(planted) == ["docs/gone.md", "pgolf/gone.py", "docs/lineage.md#no-such-topic",
                                              "docs/lineage.md#no-such-either"]
    offenders, cited = [], 0
    for folder in ("pgolf", "runner", "tasks", "flows"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            text = path.read_text(encoding="utf-8")
            cited += len(PATH_REFERENCE.findall(text))
            offenders += [f"{path.relative_to(ROOT)}: {bad}" for bad in unresolved_references(text)]
    assert cited > 50  # the scan itself finds references
    assert not offenders, f"references to files or anchors that do not exist: {offenders}"


def test_pgolf_run_starts_without_torch():
    """An all-cached `pgolf run` waits for nothing but DVC (issue 25): its CLI, the stage registry
    and the cache check import no stage module, so no torch."""
    import subprocess
    import sys

    code = "import sys, flows.cli, flows.repro, runner.cache_check, tasks.stages; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
