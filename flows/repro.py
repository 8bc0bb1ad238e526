"""Drive DVC from Python: reproduce stages, tell which ran and which came from the cache.

DVC is the only cache. A stage that runs writes a run record beside its output
(artifacts/.runs/<stage>.json, tasks.common.run_record_path); a stage DVC skips, or restores from its
run-cache, writes nothing. So "ran" means: a fresh record appeared during this call. Each pipeline
run (`pgolf run`, the Prefect flow) also writes artifacts/.runs/pipeline.json, what `pgolf summary`
shows afterwards.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from pgolf.errors import PgolfError
from tasks.cache_check import repro_checked
from tasks.common import RUNS_DIR_NAME, run_record_path
from tasks.params import STAGES, render_file, spec_of, write_params


class ReproError(PgolfError):
    """`dvc repro` failed; the message carries the tail of its output."""


@dataclass
class StageResult:
    stage: str
    status: str  # "ran" or "cached"
    seconds: float


PIPELINE_RECORD = Path("artifacts") / RUNS_DIR_NAME / "pipeline.json"


def dvc_env() -> dict:
    env = dict(os.environ)
    # bin/stage, which dvc.yaml's commands call, runs the stage with this interpreter (the project's).
    env.setdefault("PGOLF_PYTHON", sys.executable)
    env.setdefault("DVC_NO_ANALYTICS", "1")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def dvc_command() -> list[str]:
    """The dvc installed beside this interpreter, as a user runs it (`.venv/bin/dvc`)."""
    exe = Path(sys.executable).with_name("dvc")
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "dvc"]


def read_run_record(workspace: Path, stage: str) -> dict | None:
    try:
        return json.loads(run_record_path(Path(workspace) / spec_of(stage).out).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def results_since(workspace: Path, since: float, stages: tuple[str, ...] | list[str] = STAGES) -> list[StageResult]:
    results = []
    for stage in stages:
        record = read_run_record(workspace, stage)
        if record and record.get("started", 0) >= since:
            results.append(StageResult(stage, "ran", float(record["seconds"])))
        else:
            results.append(StageResult(stage, "cached", 0.0))
    return results


def record_pipeline_run(workspace: str | Path, started: float, results: list[StageResult], via: str,
                        preset: str | None, overrides: list[str] | tuple[str, ...] = ()) -> None:
    path = Path(workspace) / PIPELINE_RECORD
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"started": started, "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
              "seconds": round(time.time() - started, 3), "via": via, "preset": preset, "overrides": list(overrides),
              "stages": [asdict(r) for r in results]}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, path)


def last_pipeline_run(workspace: str | Path = ".") -> tuple[dict | None, list[StageResult]]:
    """The last pipeline run's record and its stages; without one (stages run by `dvc repro` or by
    hand), each stage's last run as its record says."""
    workspace = Path(workspace)
    runs = {stage: read_run_record(workspace, stage) for stage in STAGES}
    try:
        record = json.loads((workspace / PIPELINE_RECORD).read_text())
        ended = record["started"] + record["seconds"]
        # A stage run after it (by `dvc repro`, or by hand) makes it not the last run any more.
        if not any(run and run.get("started", 0) > ended for run in runs.values()):
            return record, [StageResult(**r) for r in record["stages"]]
    except (FileNotFoundError, json.JSONDecodeError, KeyError, TypeError):
        pass
    results = []
    for stage, run in runs.items():
        results.append(StageResult(stage, f"ran {run['started_at']}" if run and "started_at" in run else "never",
                                   float(run["seconds"]) if run else 0.0))
    return None, results


def default_remote(workspace: Path) -> str | None:
    """The DVC remote every worker shares (`dvc remote add -d NAME URL`), or None."""
    proc = subprocess.run(dvc_command() + ["config", "core.remote"], cwd=workspace, env=dvc_env(),
                          capture_output=True, text=True)
    if proc.returncode != 0:  # no core.remote set
        return None
    return proc.stdout.strip() or None


def dvc_repro(workspace: Path, stage: str | None = None, force: bool = False, echo: bool = True) -> None:
    """`dvc repro`; with a default remote, one cache for every worker: what a stage's run-cache entry
    on the remote holds is pulled instead of recomputed (`--pull`), and what ran is pushed after."""
    cmd = ["repro"]
    if force:
        cmd.append("--force")
    if stage:
        cmd += ["--single-item", stage]
    remote = default_remote(workspace)
    if remote:
        cmd.append("--pull")
    _dvc(workspace, cmd, echo)
    if remote:
        _dvc(workspace, ["push", "--run-cache"] + ([stage] if stage else []), echo)


def _dvc(workspace: Path, args: list[str], echo: bool) -> None:
    cmd = dvc_command() + args
    proc = subprocess.Popen(cmd, cwd=workspace, env=dvc_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    tail: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        if echo:
            sys.stdout.write(line)
            sys.stdout.flush()
        tail = (tail + [line])[-40:]
    if proc.wait() != 0:
        raise ReproError(f"`dvc {' '.join(args)}` failed in {workspace} (exit {proc.returncode}):\n{''.join(tail)}")


def reproduce(workspace: str | Path = ".", stage: str | None = None, force: bool = False, echo: bool = True) -> list[StageResult]:
    """Reproduce the whole pipeline (stage=None) or exactly one stage; report what ran."""
    workspace = Path(workspace).resolve()
    started = time.time()
    repro_checked(workspace, stage, force, echo, dvc_repro)
    return results_since(workspace, started, [stage] if stage else STAGES)


def set_params(workspace: str | Path, preset: str | None, overrides: list[str] | tuple[str, ...] = ()) -> Path:
    """Write the workspace's params.yaml for a preset and overrides, or (no preset) the overrides on
    the params.yaml there; content decides what reruns."""
    path = Path(workspace) / "params.yaml"
    params, header = render_file(path, preset, overrides)
    write_params(params, path, header)
    return path


def format_summary(results: list[StageResult], workspace: str | Path = ".") -> str:
    workspace = Path(workspace)
    width = max([7] + [len(r.status) for r in results])
    lines = [f"{'stage':<10} {'status':<{width}} {'seconds':>8}", f"{'-' * 10} {'-' * width} {'-' * 8}"]
    for r in results:
        lines.append(f"{r.stage:<10} {r.status:<{width}} {r.seconds:>8.1f}")
    metrics = _read_json(workspace / "artifacts/eval/metrics.json")
    size = _read_json(workspace / "artifacts/pack/size.json")
    lines.append("")
    if metrics:
        lines.append(f"val_bpb         {metrics['val_bpb']:.4f}  (val_loss {metrics['val_loss']:.4f}, {metrics['tokens']:,} tokens, {metrics['bytes']:,} bytes, mode {metrics.get('mode')})")
    if size:
        lines.append(f"artifact bytes  {size['total_bytes']:,}  (model {size['model_bytes']:,} + code {size['code_bytes']:,})")
        lines.append(f"cap margin      {size['margin_bytes']:,} bytes under {size['cap_bytes']:,}")
    return "\n".join(lines)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
