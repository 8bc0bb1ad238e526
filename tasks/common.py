"""What every stage shares: reading its params section, checking inputs, atomic output, run records.

A stage module defines `Config` (a dataclass), `SPEC` (a StageSpec) and `run(cfg, inputs, out)`,
and ends with `if __name__ == "__main__": stage_main(SPEC)`. `run` writes into `out`, a fresh
temporary folder; only when it returns does the folder replace the stage's real output, so a
failed stage never leaves a half-written output behind.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from pgolf.errors import InputError, PgolfError
from pgolf.typed_params import from_dict, read_yaml

# What a run took (seconds, host, code revision) never goes into a stage's output: an output holds
# only what its inputs determine, so a rerun on the same inputs writes the same bytes and DVC reruns
# nothing downstream. It goes into a run record beside the output, <parent>/.runs/<name>.json
# (artifacts/eval -> artifacts/.runs/eval.json), which DVC does not track; dvc.yaml lists the eval
# and pack records as metrics, so `dvc metrics show` has the seconds too.
RUNS_DIR_NAME = ".runs"
# A stage's run() hands its own timings (load vs scoring seconds, tokens/s) to its record through
# this file in the temporary output; execute() moves it into the record before the rename.
TIMINGS_NAME = ".timings.json"


def run_record_path(out: str | Path) -> Path:
    out = Path(out)
    return out.parent / RUNS_DIR_NAME / f"{out.name}.json"


def record_timings(out: str | Path, **timings: Any) -> None:
    """Add timings to the record of the run writing `out` (rank 0 only, in multi-process stages)."""
    path = Path(out) / TIMINGS_NAME
    merged = {**(json.loads(path.read_text()) if path.exists() else {}), **timings}
    path.write_text(json.dumps(merged, indent=2, sort_keys=True, default=str) + "\n")


# A stage's module is tasks/<stage>.py, but for eval: a module named `eval` shadows the builtin
# wherever it is imported by name. bin/stage has the same one exception.
MODULE_OF_STAGE = {"eval": "evaluate"}


def stage_module(stage: str) -> str:
    return f"tasks.{MODULE_OF_STAGE.get(stage, stage)}"


@dataclass(frozen=True)
class StageSpec:
    name: str
    config_cls: type
    run: Callable[[Any, dict[str, Path], Path], dict]
    out: str
    # input name -> default path; the upstream stage that produces it, for error messages
    inputs: dict[str, str] = field(default_factory=dict)
    producers: dict[str, str] = field(default_factory=dict)
    # What DVC tracks (dvc.yaml, checked by tests/test_contract.py): the output's parts, when DVC
    # tracks them apart (the shard splits), and the parts of an input the stage reads, so that a
    # judge can pull exactly those (eval reads the val shards, never the training ones).
    dvc_outs: tuple[str, ...] = ()
    input_parts: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # Inputs DVC tracks always but the stage reads only when its config asks (train's tokenizer,
    # for val_every): missing, they are left out and the stage says when it needs one.
    optional_inputs: tuple[str, ...] = ()

    @property
    def module(self) -> str:
        return stage_module(self.name)

    def outs_for_dvc(self) -> list[str]:
        return [f"{self.out}/{part}" for part in self.dvc_outs] or [self.out]

    def deps_for_dvc(self) -> list[str]:
        return [f"{path}/{part}" if name in self.input_parts else path
                for name, path in self.inputs.items() for part in self.input_parts.get(name, ("",))]


def load_config(spec: StageSpec, params_path: str | Path = "params.yaml"):
    params = read_yaml(params_path)
    return from_dict(spec.config_cls, params.get(spec.name, {}), f"{params_path}: {spec.name}")


def check_inputs(spec: StageSpec, inputs: dict[str, Path]) -> dict[str, Path]:
    """The inputs the stage gets: every required one exists, a missing optional one is left out."""
    present = {}
    for name, path in inputs.items():
        if Path(path).exists():
            present[name] = path
        elif name not in spec.optional_inputs:
            producer = spec.producers.get(name)
            hint = f"; run the '{producer}' stage first (dvc repro {producer})" if producer else ""
            raise InputError(f"input '{name}' of stage '{spec.name}' does not exist{hint}", path)
    return present


def _replace_dir(tmp: Path, out: Path) -> None:
    if out.exists() or out.is_symlink():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_leftovers(out: Path) -> list[Path]:
    """Remove the temporary folders a killed run of this output left (`.<name>.tmp-<pid>`,
    `.<name>.old-<pid>` whose process is gone); a live run's are left alone."""
    removed = []
    if not out.parent.is_dir():
        return removed
    for path in out.parent.glob(f".{out.name}.*-*"):
        kind, _, pid = path.name.removeprefix(f".{out.name}.").partition("-")
        if kind in ("tmp", "old") and pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def execute(spec: StageSpec, cfg: Any, inputs: dict[str, Path] | None = None, out: str | Path | None = None) -> dict:
    """Run one stage into a temporary folder and rename it into place on success."""
    inputs = {k: Path(v) for k, v in (inputs or {k: v for k, v in spec.inputs.items()}).items()}
    out = Path(out or spec.out)
    inputs = check_inputs(spec, inputs)
    out.parent.mkdir(parents=True, exist_ok=True)
    for path in remove_leftovers(out):
        print(f"pgolf {spec.name}: removed {path}, left by a run that was killed", file=sys.stderr)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    started = time.time()
    try:
        metrics = spec.run(cfg, inputs, tmp) or {}
        timings_file = tmp / TIMINGS_NAME
        timings = json.loads(timings_file.read_text()) if timings_file.exists() else {}
        timings_file.unlink(missing_ok=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _replace_dir(tmp, out)
    seconds = time.time() - started
    record_run(spec.name, out, started, seconds, timings)
    return {**metrics, **timings}


def record_run(stage: str, out: Path, started: float, seconds: float, timings: dict) -> Path:
    path = run_record_path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "stage": stage,
        "out": str(out),
        "started": started,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "seconds": round(seconds, 3),
        "host": socket.gethostname(),
        "code_version": code_version(),
        "timings": timings,
    }
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=2, default=str) + "\n")
    os.replace(tmp, path)
    return path


def read_run_record(out: str | Path) -> dict | None:
    """The record of the last run that wrote `out`, or None when none did (or it is unreadable)."""
    try:
        return json.loads(run_record_path(out).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def code_version() -> str:
    """The git commit the code ran from (with `+dirty` for uncommitted edits): for run records only,
    never for an output, whose bytes must not depend on which commit wrote them."""
    root = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, cwd=root).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, check=True, cwd=root).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return rev + ("+dirty" if dirty else "")


def stage_main(spec: StageSpec, argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {spec.module}", description=f"pgolf stage '{spec.name}'")
    parser.add_argument("--params", default="params.yaml", help="params file whose '%s' section configures the stage" % spec.name)
    parser.add_argument("--out", default=spec.out, help=f"output folder (default {spec.out})")
    for name, default in spec.inputs.items():
        parser.add_argument(f"--{name.replace('_', '-')}", dest=f"input_{name}", default=default,
                            help=f"input folder '{name}' (default {default})")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(spec, args.params)
        inputs = {name: Path(getattr(args, f"input_{name}")) for name in spec.inputs}
        metrics = execute(spec, cfg, inputs, args.out)
    except PgolfError as err:
        print(f"pgolf {spec.name}: error: {err}", file=sys.stderr)
        if os.environ.get("PGOLF_TRACEBACK"):
            traceback.print_exc()
        return 2
    print(json.dumps({"stage": spec.name, **{k: v for k, v in metrics.items() if not isinstance(v, (dict, list))}}, default=str))
    return 0
