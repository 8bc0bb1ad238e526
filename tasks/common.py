"""What every stage shares: reading its params section, checking inputs, atomic output, run records.

A stage module defines `Config` (a dataclass), `SPEC` (a StageSpec) and `run(cfg, inputs, out)`,
and ends with `if __name__ == "__main__": stage_main(SPEC)`. `run` writes into `out`, a fresh
temporary folder; only when it returns does the folder replace the stage's real output, so a
failed stage never leaves a half-written output behind.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from pgolf.errors import FormatError, InputError, PgolfError
from pgolf.params import from_dict, read_yaml

# Records of stage executions live beside the outputs but outside them, so timing never changes
# an output's hash (which would make DVC recompute everything downstream).
RUNS_DIR = Path("artifacts/.runs")


@dataclass(frozen=True)
class StageSpec:
    name: str
    config_cls: type
    run: Callable[[Any, dict[str, Path], Path], dict]
    out: str
    # input name -> default path; the upstream stage that produces it, for error messages
    inputs: dict[str, str] = field(default_factory=dict)
    producers: dict[str, str] = field(default_factory=dict)


def load_config(spec: StageSpec, params_path: str | Path = "params.yaml"):
    params = read_yaml(params_path)
    return from_dict(spec.config_cls, params.get(spec.name, {}), f"{params_path}: {spec.name}")


def check_inputs(spec: StageSpec, inputs: dict[str, Path]) -> None:
    for name, path in inputs.items():
        if not Path(path).exists():
            producer = spec.producers.get(name)
            hint = f"; run the '{producer}' stage first (dvc repro {producer})" if producer else ""
            raise InputError(f"input '{name}' of stage '{spec.name}' does not exist{hint}", path)


def _replace_dir(tmp: Path, out: Path) -> None:
    if out.exists() or out.is_symlink():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def execute(spec: StageSpec, cfg: Any, inputs: dict[str, Path] | None = None, out: str | Path | None = None) -> dict:
    """Run one stage into a temporary folder and rename it into place on success."""
    inputs = {k: Path(v) for k, v in (inputs or {k: v for k, v in spec.inputs.items()}).items()}
    out = Path(out or spec.out)
    check_inputs(spec, inputs)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    started = time.time()
    try:
        metrics = spec.run(cfg, inputs, tmp) or {}
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _replace_dir(tmp, out)
    seconds = time.time() - started
    record_run(spec.name, started, seconds, metrics)
    return metrics


def record_run(stage: str, started: float, seconds: float, metrics: dict) -> None:
    RUNS_DIR.mkdir(parents=True, exist_ok=True)
    record = {"stage": stage, "started": started, "seconds": round(seconds, 3), "metrics": metrics}
    tmp = RUNS_DIR / f".{stage}.json.tmp"
    tmp.write_text(json.dumps(record, indent=2, default=str) + "\n")
    os.replace(tmp, RUNS_DIR / f"{stage}.json")


def write_json(path: str | Path, obj: Any) -> None:
    """Deterministic JSON (sorted keys, fixed separators) so identical content gives identical bytes.
    Strict: NaN and Infinity are not JSON, and a metric that holds one is a failed run, not a file
    that other tools misread, so it is an error naming the keys."""
    try:
        text = json.dumps(obj, indent=2, sort_keys=True, default=str, allow_nan=False)
    except ValueError as err:
        raise FormatError(f"refusing to write {', '.join(non_finite_keys(obj))} = NaN or Infinity, which strict JSON "
                          "cannot hold", path) from err
    Path(path).write_text(text + "\n", encoding="utf-8")


def non_finite_keys(obj: Any, where: str = "") -> list[str]:
    if isinstance(obj, float) and not math.isfinite(obj):
        return [where or "value"]
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    return [key for k, v in items for key in non_finite_keys(v, f"{where}.{k}" if where else str(k))]


def stage_main(spec: StageSpec, argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m tasks.{spec.name}", description=f"pgolf stage '{spec.name}'")
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
