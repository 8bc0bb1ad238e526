"""Drive DVC from Python: reproduce stages, tell which ran and which came from the cache.

DVC is the only cache. A stage that runs writes artifacts/.runs/<stage>.json (tasks.common);
a stage DVC skips, or restores from its run-cache, writes nothing. So "ran" means: a fresh record
appeared during this call.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from pgolf.errors import PgolfError
from tasks.common import RUNS_DIR
from tasks.params import STAGES, header_for, render, write_params


class ReproError(PgolfError):
    """`dvc repro` failed; the message carries the tail of its output."""


@dataclass
class StageResult:
    stage: str
    status: str  # "ran" or "cached"
    seconds: float


def dvc_env() -> dict:
    env = dict(os.environ)
    # `python` in dvc.yaml must be this interpreter (the project's venv), whoever started us.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.setdefault("DVC_NO_ANALYTICS", "1")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def read_run_record(workspace: Path, stage: str) -> dict | None:
    path = workspace / RUNS_DIR / f"{stage}.json"
    try:
        return json.loads(path.read_text())
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


def dvc_repro(workspace: Path, stage: str | None = None, force: bool = False, echo: bool = True) -> None:
    cmd = [sys.executable, "-m", "dvc", "repro"]
    if force:
        cmd.append("--force")
    if stage:
        cmd += ["--single-item", stage]
    proc = subprocess.Popen(cmd, cwd=workspace, env=dvc_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    tail: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        if echo:
            sys.stdout.write(line)
            sys.stdout.flush()
        tail = (tail + [line])[-40:]
    if proc.wait() != 0:
        raise ReproError(f"`{' '.join(cmd[1:])}` failed in {workspace} (exit {proc.returncode}):\n{''.join(tail)}")


def reproduce(workspace: str | Path = ".", stage: str | None = None, force: bool = False, echo: bool = True) -> list[StageResult]:
    """Reproduce the whole pipeline (stage=None) or exactly one stage; report what ran."""
    workspace = Path(workspace).resolve()
    started = time.time()
    dvc_repro(workspace, stage, force, echo)
    return results_since(workspace, started, [stage] if stage else STAGES)


def set_params(workspace: str | Path, preset: str | None, overrides: list[str] | tuple[str, ...] = ()) -> Path:
    """Write the workspace's params.yaml for a preset and overrides (content decides what reruns)."""
    path = Path(workspace) / "params.yaml"
    write_params(render(preset, overrides), path, header_for(preset, overrides))
    return path


def format_summary(results: list[StageResult], workspace: str | Path = ".") -> str:
    workspace = Path(workspace)
    lines = [f"{'stage':<10} {'status':<7} {'seconds':>8}", f"{'-' * 10} {'-' * 7} {'-' * 8}"]
    for r in results:
        lines.append(f"{r.stage:<10} {r.status:<7} {r.seconds:>8.1f}")
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
