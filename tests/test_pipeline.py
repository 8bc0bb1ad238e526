"""The whole smoke pipeline end to end, and DVC as the one cache under both DVC and Prefect.

One workspace for the module; the tests run in file order and each builds on the last.
"""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from flows.repro import reproduce, set_params
from tasks.stages import STAGES

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent
# The smoke preset, smaller still: the point here is the chain and the cache, not the numbers.
TINY = [
    "corpus.max_docs=1200",
    "shards.val_docs=120",
    "train.iterations=6",
    "gptq.calib_batches=2",
]


def ran(results) -> list[str]:
    return [r.stage if hasattr(r, "stage") else r["stage"] for r in results
            if (r.status if hasattr(r, "status") else r["status"]) == "ran"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    ws = tmp_path_factory.mktemp("workspace")
    for item in ("pgolf", "runner", "tasks", "flows", "presets", "bin"):
        shutil.copytree(ROOT / item, ws / item, ignore=shutil.ignore_patterns("__pycache__"))
    for item in ("dvc.yaml", ".dvcignore"):
        shutil.copy(ROOT / item, ws / item)
    (ws / "data").mkdir()
    (ws / "artifacts").mkdir()
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=ws, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "config", "core.analytics", "false"], cwd=ws, check=True)
    return ws


@pytest.fixture(scope="module")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def test_prefect_flow_runs_whole_pipeline(workspace, prefect_harness):
    from flows.pipeline import pipeline

    outcome = pipeline(preset="smoke", overrides=TINY, workspace=str(workspace), isolate=False)
    assert ran(outcome["stages"]) == list(STAGES)
    metrics = json.loads((workspace / "artifacts/eval/metrics.json").read_text())
    size = json.loads((workspace / "artifacts/pack/size.json").read_text())
    assert math.isfinite(metrics["val_bpb"]) and 0 < metrics["val_bpb"] < 20
    assert metrics["tokens"] > 0 and metrics["bytes"] > metrics["tokens"]
    assert size["total_bytes"] == size["model_bytes"] + size["code_bytes"] <= size["cap_bytes"]
    assert (workspace / "artifacts/pack/artifact.bin").stat().st_size == size["model_bytes"]
    leftovers = [p.name for p in (workspace / "artifacts").iterdir() if ".tmp-" in p.name or ".old-" in p.name]
    assert leftovers == []
    assert outcome["val_bpb"] == metrics["val_bpb"] and outcome["total_bytes"] == size["total_bytes"]


def test_dvc_after_prefect_recomputes_nothing(workspace):
    assert ran(reproduce(workspace, echo=False)) == []


def test_eval_param_reruns_pack_and_eval_only(workspace):
    """The exported script carries the eval settings, so pack recounts its code; the model's bytes
    stay the same."""
    artifact = (workspace / "artifacts/pack/artifact.bin").read_bytes()
    set_params(workspace, "smoke", TINY + ["eval.stride=64"])
    assert ran(reproduce(workspace, echo=False)) == ["pack", "eval"]
    assert json.loads((workspace / "artifacts/eval/metrics.json").read_text())["stride"] == 64
    assert (workspace / "artifacts/pack/artifact.bin").read_bytes() == artifact


def test_prefect_after_dvc_recomputes_nothing(workspace, prefect_harness):
    from flows.pipeline import pipeline

    outcome = pipeline(preset="smoke", overrides=TINY + ["eval.stride=64"], workspace=str(workspace), isolate=False)
    assert ran(outcome["stages"]) == []


def test_a_crashed_stage_is_retried_and_a_refusal_is_final(workspace, prefect_harness, monkeypatch):
    import flows.pipeline as flow_module
    from flows.repro import StageCrash
    from pgolf.errors import InputError

    calls = []
    real = flow_module.reproduce_stage

    def crashes_once(ws, stage, known_up_to_date=False, on_line=None):
        calls.append(stage)
        if calls.count(stage) == 1:
            raise StageCrash("rank 1 was killed")
        return real(ws, stage, known_up_to_date, on_line)

    def refuses(ws, stage, known_up_to_date=False, on_line=None):
        calls.append(stage)
        raise InputError("header does not match the manifest", "artifacts/shards/val/val_000000.bin")

    monkeypatch.setattr(flow_module, "stage_task", flow_module.stage_task.with_options(retry_delay_seconds=0))
    monkeypatch.setattr(flow_module, "reproduce_stage", crashes_once)
    outcome = flow_module.pipeline(preset="smoke", overrides=TINY + ["eval.stride=64"], workspace=str(workspace),
                                   isolate=False, stages=["eval"])
    assert calls == ["eval", "eval"] and outcome["stages"][0]["status"] == "cached"
    calls.clear()
    monkeypatch.setattr(flow_module, "reproduce_stage", refuses)
    with pytest.raises(InputError, match="val_000000.bin"):
        flow_module.pipeline(preset="smoke", overrides=TINY + ["eval.stride=64"], workspace=str(workspace),
                             isolate=False, stages=["eval"])
    assert calls == ["eval"]


def test_train_param_reruns_train_and_downstream_only(workspace):
    set_params(workspace, "smoke", TINY + ["eval.stride=64", "train.iterations=8"])
    assert ran(reproduce(workspace, echo=False)) == ["train", "gptq", "pack", "eval"]


def test_run_cache_restores_a_configuration_seen_before(workspace):
    set_params(workspace, "smoke", TINY + ["eval.stride=64"])
    assert ran(reproduce(workspace, echo=False)) == []
    assert json.loads((workspace / "artifacts/train/metrics.json").read_text())["steps"] == 6


def test_single_stage_repro_runs_only_that_stage(workspace):
    assert ran(reproduce(workspace, stage="eval", force=True, echo=False)) == ["eval"]
    assert ran(reproduce(workspace, stage="gptq", echo=False)) == []


def test_same_seed_same_bytes_for_weights_and_artifact(workspace):
    outputs = ["artifacts/tokenizer/tokenizer.model", "artifacts/shards/manifest.json",
               "artifacts/train/model.safetensors", "artifacts/pack/artifact.bin"]
    before = {p: (workspace / p).read_bytes() for p in outputs}
    for stage in ("tokenizer", "shards", "train", "gptq", "pack"):
        assert ran(reproduce(workspace, stage=stage, force=True, echo=False)) == [stage]
    for path in outputs:
        assert (workspace / path).read_bytes() == before[path], path


def test_ctrl_c_during_pgolf_run_is_one_line_and_exit_130(workspace):
    """Ctrl-C (SIGINT to the terminal's process group: pgolf, DVC, the stage, torchrun) while
    training on two ranks: the stage's one line, no traceback, no DVC error, exit 130, no half-written
    output; the configuration before it comes back from the cache (DVC removed the old output when
    the stage started)."""
    import os
    import signal

    before = (workspace / "artifacts/train/model.safetensors").read_bytes()
    set_params(workspace, "smoke", TINY + ["eval.stride=64", "train.iterations=100000", "train.log_every=1"])
    proc = subprocess.Popen([str(Path(sys.executable).with_name("pgolf")), "run"], cwd=workspace, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("step 3/"):
            break
    os.killpg(proc.pid, signal.SIGINT)
    rest = proc.communicate(timeout=180)[0]
    assert proc.returncode == 130, "".join(seen) + rest
    lines = [line for line in rest.splitlines() if line.strip() and not line.startswith(("step ", "pgolf: train steps"))]
    assert len(lines) == 1 and lines[0].startswith("pgolf train: interrupted at step "), rest
    assert "a rerun restarts training" in lines[0]
    assert not [p.name for p in (workspace / "artifacts").iterdir() if ".tmp-" in p.name]
    set_params(workspace, "smoke", TINY + ["eval.stride=64"])
    assert ran(reproduce(workspace, echo=False)) == []
    assert (workspace / "artifacts/train/model.safetensors").read_bytes() == before
