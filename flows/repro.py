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
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from pgolf.errors import PgolfError
from tasks.cache_check import repro_checked
from tasks.common import RUNS_DIR_NAME, run_record_path
from tasks.params import render_file, write_params
from tasks.stages import STAGES, spec_of


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


_CWD_LOCK = threading.Lock()


@contextmanager
def dvc_repo(workspace: str | Path) -> Iterator:
    """DVC's Repo for in-process questions (a dvc launch costs a second, most of an all-cached run's
    time). DVC resolves stage paths against the current directory, as its CLI runs from the repo
    root, so the block runs there; the lock keeps two threads from moving the process's cwd at once."""
    from dvc.repo import Repo

    with _CWD_LOCK:
        before = os.getcwd()
        os.chdir(workspace)
        try:
            with Repo(str(workspace)) as repo:
                yield repo
        finally:
            os.chdir(before)


def default_remote(workspace: Path) -> str | None:
    """The DVC remote every worker shares (`dvc remote add -d NAME URL`), or None."""
    with dvc_repo(workspace) as repo:
        return repo.config["core"].get("remote") or None


def stages_up_to_date(workspace: Path, stages: list[str] | tuple[str, ...] = STAGES) -> set[str]:
    """The stages whose outputs in the workspace match dvc.lock, deps and params included: what
    `dvc status` reports clean, asked in-process (a tenth of a second a stage, no dvc launch)."""
    with dvc_repo(workspace) as repo:
        changed = {name.rsplit(":", 1)[-1] for name in repo.status(targets=list(stages))}
    return {stage for stage in stages if stage not in changed}


class StageCrash(RuntimeError):
    """A stage's process died for no reason of its inputs (killed, out of memory, a lost rank): worth
    a retry. Not a PgolfError: a stage exits 2 on bad input (tasks.common.stage_main), which a retry
    cannot mend, and that is a ReproError."""


def dvc_repro(workspace: Path, stage: str | None = None, force: bool = False, echo: bool = True,
              on_line=None) -> None:
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
    _dvc(workspace, cmd, echo, on_line)
    if remote:
        _dvc(workspace, ["push", "--run-cache"] + ([stage] if stage else []), echo, on_line)


def _dvc(workspace: Path, args: list[str], echo: bool, on_line=None) -> None:
    cmd = dvc_command() + args
    proc = subprocess.Popen(cmd, cwd=workspace, env=dvc_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    tail: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        if on_line is not None:
            on_line(line.rstrip("\n"))
        elif echo:
            sys.stdout.write(line)
            sys.stdout.flush()
        tail = (tail + [line])[-40:]
    if proc.wait() != 0:
        message = f"`dvc {' '.join(args)}` failed in {workspace} (exit {proc.returncode}):\n{''.join(tail)}"
        exited = re.findall(r"exited with (-?\d+)", "".join(tail))
        if exited and int(exited[-1]) != 2:
            raise StageCrash(message)
        raise ReproError(message)


def reproduce(workspace: str | Path = ".", stage: str | None = None, force: bool = False, echo: bool = True,
              on_line=None) -> list[StageResult]:
    """Reproduce the whole pipeline (stage=None) or exactly one stage; report what ran."""
    workspace = Path(workspace).resolve()
    started = time.time()
    repro_checked(workspace, stage, force, echo,
                  lambda ws, st, f, e: dvc_repro(ws, st, f, e, on_line))
    return results_since(workspace, started, [stage] if stage else STAGES)


def reproduce_stage(workspace: str | Path, stage: str, known_up_to_date: bool = False, on_line=None) -> StageResult:
    """One stage, launching dvc only when it has something to do: a stage that `stages_up_to_date`
    found clean (and nothing upstream has run since) is reported cached at no cost."""
    if known_up_to_date:
        return StageResult(stage, "cached", 0.0)
    (result,) = reproduce(workspace, stage=stage, on_line=on_line)
    return result


def set_params(workspace: str | Path, preset: str | None, overrides: list[str] | tuple[str, ...] = ()) -> Path:
    """Write the workspace's params.yaml for a preset and overrides, or (no preset) the overrides on
    the params.yaml there; content decides what reruns."""
    path = Path(workspace) / "params.yaml"
    params, header = render_file(path, preset, overrides)
    write_params(params, path, header)
    return path


def score_of(workspace: str | Path = ".") -> dict:
    """What a run scored and weighs, from the eval and pack outputs there (keys absent where a stage
    has not run)."""
    workspace = Path(workspace)
    metrics = _read_json(workspace / "artifacts/eval/metrics.json") or {}
    size = _read_json(workspace / "artifacts/pack/size.json") or {}
    score = {k: metrics[k] for k in ("val_bpb", "val_loss", "tokens", "bytes", "mode") if k in metrics}
    score.update({k: size[k] for k in ("total_bytes", "model_bytes", "code_bytes", "margin_bytes", "cap_bytes") if k in size})
    return score


def format_summary(results: list[StageResult], workspace: str | Path = ".") -> str:
    width = max([7] + [len(r.status) for r in results])
    lines = [f"{'stage':<10} {'status':<{width}} {'seconds':>8}", f"{'-' * 10} {'-' * width} {'-' * 8}"]
    for r in results:
        lines.append(f"{r.stage:<10} {r.status:<{width}} {r.seconds:>8.1f}")
    score = score_of(workspace)
    lines.append("")
    if "val_bpb" in score:
        lines.append(f"val_bpb         {score['val_bpb']:.4f}  (val_loss {score['val_loss']:.4f}, {score['tokens']:,} tokens, "
                     f"{score['bytes']:,} bytes, mode {score.get('mode')})")
    if "total_bytes" in score:
        lines.append(f"artifact bytes  {score['total_bytes']:,}  (model {score['model_bytes']:,} + code {score['code_bytes']:,})")
        lines.append(f"cap margin      {score['margin_bytes']:,} bytes under {score['cap_bytes']:,}")
    return "\n".join(lines)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
