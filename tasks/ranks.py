"""Stages that run on several torchrun ranks (eval, gptq): the stage process writes its config into
the output folder and launches `python -m tasks.<stage> --worker` on N ranks, which read it back,
share the work, and rank 0 writes the stage's files; the config copy is then removed."""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

from pgolf import dist
from pgolf.params import from_dict
from tasks.common import StageSpec, write_json

WORKER_CONFIG = "config.json"


def run_on_ranks(spec: StageSpec, cfg: Any, inputs: dict[str, Path], out: Path, nproc: int) -> None:
    """Run the stage's `python -m tasks.<stage> --worker` on `nproc` torchrun ranks: they read the
    config written into `out` (removed afterwards: the stage's own files are the output)."""
    write_json(out / WORKER_CONFIG, asdict(cfg))
    dist.launch(f"tasks.{spec.name}", ["--worker", "--out", str(out), *[f"--{k}={v}" for k, v in inputs.items()]],
                nproc)
    (out / WORKER_CONFIG).unlink()


def worker_main(spec: StageSpec, body: Callable[[Any, dict[str, Path], Path], Any], argv: list[str]) -> int:
    """The `--worker` entry point of a stage run by run_on_ranks: this rank's share of `body`."""
    parser = argparse.ArgumentParser(prog=f"python -m tasks.{spec.name} --worker")
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--out", required=True)
    for name in spec.inputs:
        parser.add_argument(f"--{name}", required=True)
    args = parser.parse_args(argv)
    out = Path(args.out)
    cfg = from_dict(spec.config_cls, json.loads((out / WORKER_CONFIG).read_text()), str(out / WORKER_CONFIG))
    body(cfg, {name: Path(getattr(args, name)) for name in spec.inputs}, out)
    return 0
