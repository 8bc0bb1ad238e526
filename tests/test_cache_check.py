"""A corrupted DVC cache entry is recomputed, never used (runner/cache_check.py).

One workspace for the module, a pipeline of corpus and tokenizer only (the two cheapest stages);
the tests run in file order and each builds on the last.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flows.repro import dvc_command, dvc_env, reproduce, set_params
from runner.cache_check import Hasher, cache_dir, object_path, tree_digest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent
TINY = ["corpus.max_docs=300", "tokenizer.vocab_size=512", "train.model.vocab_size=512"]
MODEL = "artifacts/tokenizer/tokenizer.model"


def ran(results) -> list[str]:
    return [r.stage for r in results if r.status == "ran"]


def dvc(ws: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(dvc_command() + list(args), cwd=ws, env=dvc_env(), capture_output=True, text=True)


def lock_out(ws: Path, stage: str) -> dict:
    return yaml.safe_load((ws / "dvc.lock").read_text())["stages"][stage]["outs"][0]


def file_object(ws: Path, stage: str, relpath: str) -> Path:
    """The cache object of one file of a stage's output folder, found through its .dir manifest."""
    cache = cache_dir(ws)
    manifest = json.loads(object_path(cache, lock_out(ws, stage)["md5"]).read_text())
    return object_path(cache, next(e["md5"] for e in manifest if e["relpath"] == relpath))


def flip_byte(path: Path) -> None:
    """Bit rot: the bytes change, the read-only mode DVC gave the object stays (DVC trusts an object
    with that mode without hashing it; one it finds writable it hashes and drops)."""
    mode = path.stat().st_mode
    os.chmod(path, 0o644)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    os.chmod(path, mode)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    ws = tmp_path_factory.mktemp("cachecheck")
    for item in ("pgolf", "runner", "tasks", "flows", "presets", "bin"):
        shutil.copytree(ROOT / item, ws / item, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / ".dvcignore", ws / ".dvcignore")
    pipeline = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    pipeline = {"stages": {k: pipeline["stages"][k] for k in ("corpus", "tokenizer")}}
    (ws / "dvc.yaml").write_text(yaml.safe_dump(pipeline, sort_keys=False))
    (ws / "data").mkdir()
    (ws / "artifacts").mkdir()
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=ws, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "config", "core.analytics", "false"], cwd=ws, check=True)
    set_params(ws, "smoke", TINY)
    assert ran(reproduce(ws, echo=False)) == ["corpus", "tokenizer"]
    return ws


def test_digests_are_dvcs(workspace):
    hasher = Hasher(workspace)
    for stage in ("corpus", "tokenizer"):
        out = lock_out(workspace, stage)
        assert hasher.out(workspace / out["path"]) == out["md5"]
    assert tree_digest([]) == "d751713988987e9331980363e24189ce.dir"  # DVC's empty folder


def test_pgolf_run_recomputes_a_corrupt_cache_entry(workspace, capfd):
    good = (workspace / MODEL).read_bytes()
    obj = file_object(workspace, "tokenizer", "tokenizer.model")
    flip_byte(obj)
    shutil.rmtree(workspace / "artifacts/tokenizer")
    results = reproduce(workspace, echo=False)
    assert ran(results) == ["tokenizer"]
    assert (workspace / MODEL).read_bytes() == good
    err = capfd.readouterr().err
    assert "artifacts/tokenizer (stage tokenizer) has md5" in err and "removed 1 corrupt cache object(s)" in err, err
    # The corrupt object was replaced by the recomputed bytes, so a later restore is right too.
    assert obj.read_bytes() == good
    assert dvc(workspace, "status").stdout.strip().endswith("up to date.")


def test_dvc_alone_restores_the_corrupt_bytes(workspace):
    """Why the check exists: DVC's own repro (no stage runs after the restore) uses what the cache holds."""
    good = (workspace / MODEL).read_bytes()
    flip_byte(file_object(workspace, "tokenizer", "tokenizer.model"))
    shutil.rmtree(workspace / "artifacts/tokenizer")
    proc = dvc(workspace, "repro")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (workspace / MODEL).read_bytes() != good, proc.stdout
    assert ran(reproduce(workspace, echo=False)) == ["tokenizer"]
    assert (workspace / MODEL).read_bytes() == good


def test_a_stage_refuses_a_corrupt_input_and_pgolf_run_repairs_it(workspace):
    corpus = workspace / "data/corpus"
    good = {p.name: p.read_bytes() for p in corpus.iterdir()}
    flip_byte(file_object(workspace, "corpus", "docs.jsonl"))
    shutil.rmtree(corpus)
    set_params(workspace, "smoke", TINY + ["tokenizer.seed=7"])  # the tokenizer must run, on the restored corpus
    proc = dvc(workspace, "repro")
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "data/corpus: input of stage 'tokenizer' has md5" in out and "dvc.lock records" in out, out
    assert "removed 1 corrupt object(s)" in out, out
    assert ran(reproduce(workspace, echo=False)) == ["corpus", "tokenizer"]
    assert {p.name: p.read_bytes() for p in corpus.iterdir()} == good
