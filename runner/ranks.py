"""The one launcher of the stages that run on ranks (train, gptq, eval), and the one owner of their
process group: a stage's per-rank body (SPEC.per_rank) runs inside it and never joins or leaves it.

`run_on_ranks` runs the body in this process when the stage asks for one process on one node (no
torchrun); otherwise it writes the config into the output folder and launches
`python -m runner.ranks --worker <stage>` on `nproc` torchrun ranks per node. The ranks read the config
back, share the work inside one process group, and rank 0 writes the stage's files; the config
copy is then removed. A failing rank's own message becomes the stage's error (pgolf.dist.launch).
The exported script's main (runner/submission.py) runs train, gptq and eval in one group it owns.

Over `nnodes` machines, node 0 runs the stage (`dvc repro`, `python -m tasks.<stage>`) and every
other node joins it with `python -m runner.ranks <stage>`, each told its number and node 0's
rendezvous endpoint by its environment (PGOLF_NODE_RANK, PGOLF_RDZV_ENDPOINT).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pgolf import dist
from pgolf.errors import ConfigError, PgolfError, StageInterrupted
from pgolf.typed_params import from_dict
from pgolf.json_files import write_json
from runner.stage import StageSpec, check_inputs, compile_cache_outside_tmpdir, load_config
from tasks.stages import spec_of

# Hidden: train's own outputs include a config.json.
WORKER_CONFIG = ".ranks-config.json"
WORKER_FLAG = "--worker"
# Named, not __name__: `python -m runner.ranks STAGE` (another node joining) runs this as __main__.
MODULE = "runner.ranks"
RANK_STAGES = ("train", "gptq", "eval")



def run_on_ranks(spec: StageSpec, cfg: Any, inputs: dict[str, Path], out: Path) -> None:
    """`spec.per_rank(cfg, inputs, out)` on every rank the config asks for (`nproc` per node, `nnodes`)."""
    nodes = dist.Nodes.from_environment(cfg.nnodes)
    if cfg.nproc == 1 and nodes.count == 1:
        dist.pin_threads()
        with dist.process_group(dist.resolve_device(cfg.device)):
            spec.per_rank(cfg, inputs, out)
        return
    if nodes.rank != 0:
        raise ConfigError(f"this is node {nodes.rank} of {nodes.count} ({dist.NODE_RANK_ENV}): node 0 runs the "
                          f"'{spec.name}' stage and writes its output; join it here with "
                          f"`python -m runner.ranks {spec.name}`")
    launch_ranks(spec, cfg, inputs, out, nodes)


def launch_ranks(spec: StageSpec, cfg: Any, inputs: dict[str, Path], out: Path, nodes: dist.Nodes) -> None:
    config = out / WORKER_CONFIG
    write_json(config, asdict(cfg))
    try:
        dist.launch(MODULE, [WORKER_FLAG, spec.name, "--out", str(out), *[f"--{k}={v}" for k, v in inputs.items()]],
                    cfg.nproc, nodes, run_name=spec.module)
    finally:
        config.unlink(missing_ok=True)


def worker_main(spec: StageSpec, argv: list[str]) -> int:
    """A rank launched by run_on_ranks (`python -m runner.ranks --worker <stage>`): its share of the
    stage. An error is reported to the launching process, which makes it the stage's error."""
    dist.die_with_launcher()
    try:
        parser = argparse.ArgumentParser(prog=f"python -m {MODULE} {WORKER_FLAG} {spec.name}")
        parser.add_argument("--out", required=True)
        for name in spec.inputs:
            parser.add_argument(f"--{name}", required=name not in spec.optional_inputs, default=None)
        args = parser.parse_args(argv)
        out = Path(args.out)
        text = (out / WORKER_CONFIG).read_text()
        cfg = from_dict(spec.config_cls, json.loads(text), str(out / WORKER_CONFIG))
        dist.pin_threads()
        with dist.process_group(dist.resolve_device(cfg.device)):
            check_same_config(text)
            spec.per_rank(cfg, {name: Path(getattr(args, name)) for name in spec.inputs if getattr(args, name) is not None}, out)
    except BaseException as err:
        if isinstance(err, SystemExit) or not dist.report_rank_error(err):
            raise
        if isinstance(err, (KeyboardInterrupt, StageInterrupted)):
            # Ctrl-C: the launching process prints the one line (where rank 0 stopped), so this rank is quiet.
            dist.leave_now(StageInterrupted.EXIT_CODE)
        return 1
    return 0


def check_same_config(text: str) -> None:
    """Every node reads its own params.yaml: ranks that were given different configs would
    compute a wrong result without any error, so they stop here."""
    digest = hashlib.sha256(text.encode()).hexdigest()
    digests = dist.all_gather_objects(digest)
    differing = [r for r, d in enumerate(digests) if d != digests[0]]
    if differing:
        raise ConfigError(f"ranks {differing} run with another config than rank 0: every node needs the same "
                          "params.yaml section (and the same inputs)")


def join_main(argv: list[str], prog: str = "python -m runner.ranks") -> int:
    """`pgolf ranks STAGE` (python -m runner.ranks STAGE): this node's ranks of a multi-node stage
    that node 0 runs."""
    parser = argparse.ArgumentParser(prog=prog, description=join_main.__doc__)
    parser.add_argument("stage", choices=RANK_STAGES)
    parser.add_argument("--params", default="params.yaml")
    stage = argv[0] if argv and argv[0] in RANK_STAGES else parser.parse_args(argv).stage
    spec = spec_of(stage)
    for name, default in spec.inputs.items():
        parser.add_argument(f"--{name.replace('_', '-')}", dest=f"input_{name}", default=default,
                            help=f"this node's copy of input '{name}' (default {default})")
    args = parser.parse_args(argv)
    compile_cache_outside_tmpdir()
    try:
        cfg = load_config(spec, args.params)
        nodes = dist.Nodes.from_environment(cfg.nnodes)
        if nodes.rank == 0:
            raise ConfigError(f"node 0 runs the stage itself (`python -m {spec.module}` or `dvc repro -s "
                              f"{spec.name}`); `python -m runner.ranks` is for the other nodes")
        # Only global rank 0, on node 0, writes the stage's files; this node's ranks write nothing.
        with tempfile.TemporaryDirectory(prefix=f"pgolf-{spec.name}-node{nodes.rank}-") as scratch:
            inputs = check_inputs(spec, {n: Path(getattr(args, f"input_{n}")) for n in spec.inputs})
            launch_ranks(spec, cfg, inputs, Path(scratch), nodes)
    except PgolfError as err:
        print(f"pgolf {spec.name} (node {os.environ.get(dist.NODE_RANK_ENV)}): error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == [WORKER_FLAG]:
        sys.exit(worker_main(spec_of(sys.argv[2]), sys.argv[3:]))
    sys.exit(join_main(sys.argv[1:]))
