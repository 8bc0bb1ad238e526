"""The main of an exported train_gpt.py: train, quantize, pack and evaluate with the stages' own
code, under torchrun inside a records folder.

    torchrun --standalone --nproc_per_node=8 train_gpt.py --shards DIR --tokenizer DIR [--out DIR]

Every rank trains and calibrates GPTQ on its share; rank 0 quantizes and packs (counting this
script the records' way) while the others wait; every rank evaluates its share, and rank 0 prints
one `pgolf_final {...}` JSON line.
"""
from __future__ import annotations

import argparse
import json
import sys
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from pathlib import Path

import torch

from pgolf import dist
from pgolf.typed_params import from_dict
from tasks import evaluate as eval_stage, gptq, pack, train
from pgolf.json_files import write_json
from runner.stage import execute


@contextmanager
def spread_or_solo(nproc: int):
    with nullcontext() if nproc > 1 else dist.solo(), pipeline_threads(nproc):
        yield


@contextmanager
def pipeline_threads(nproc: int):
    """The CPU threads the pipeline gives a stage of `nproc` processes (pgolf.dist.threads_per_process).
    torchrun sets OMP_NUM_THREADS=1 in every process, and on CPU the thread count changes how float
    sums round: a GPTQ or eval stage with fewer threads than the pipeline's gives a val_bpb a few
    1e-6 off and other model bytes. So each stage here runs with the pipeline's count."""
    before = torch.get_num_threads()
    torch.set_num_threads(dist.threads_per_process(nproc))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def main(params: dict, script: str, argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=Path(script).name, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", required=True, help="a shards stage output (fineweb_*.bin + manifest.json)")
    parser.add_argument("--tokenizer", required=True, help="a tokenizer stage output (tokenizer.model + .json)")
    parser.add_argument("--out", default="run", help="where train/, gptq/, pack/, eval/ go")
    args = parser.parse_args(argv)
    train_cfg = from_dict(train.Config, params["train"], "train")
    # One process group for the three stages, owned here as runner.ranks owns a stage's.
    with dist.process_group(dist.resolve_device(train_cfg.device)):
        return train_to_score(params, script, args, train_cfg)


def train_to_score(params: dict, script: str, args: argparse.Namespace, train_cfg) -> int:
    out = Path(args.out)
    train_dir = out / "train"
    train_dir.mkdir(parents=True, exist_ok=True)
    resolved = {"model": params["train"]["model"], "train": params["train"], "code_version": "exported"}
    write_json(train_dir / "config.json", resolved)
    with pipeline_threads(train_cfg.nproc):
        train.train_in_process(train_cfg, Path(args.shards), train_dir, resolved, tokenizer=Path(args.tokenizer))
    # Already under torchrun: gptq and eval run in this process group, on every rank when their
    # nproc asks for more than one process (calibration and scoring spread), else on rank 0 alone,
    # as the pipeline's stages would. Only rank 0 writes.
    gptq_cfg = from_dict(gptq.Config, params["gptq"], "gptq")
    gptq_inputs = {"train": train_dir, "shards": Path(args.shards)}
    if dist.is_main():
        with spread_or_solo(gptq_cfg.nproc):
            execute(replace(gptq.SPEC, run=gptq.SPEC.per_rank), gptq_cfg, gptq_inputs, out / "gptq")
        pack_cfg = from_dict(pack.Config, {**params["pack"], "code_file": str(Path(script).resolve())}, "pack")
        execute(pack.SPEC, pack_cfg, {"gptq": out / "gptq"}, out / "pack")
    elif gptq_cfg.nproc > 1:
        with pipeline_threads(gptq_cfg.nproc):
            gptq.SPEC.per_rank(gptq_cfg, gptq_inputs, out / "gptq")
    dist.barrier()
    eval_cfg = from_dict(eval_stage.Config, params["eval"], "eval")
    eval_inputs = {"pack": out / "pack", "shards": Path(args.shards), "tokenizer": Path(args.tokenizer)}
    if not dist.is_main():
        if eval_cfg.nproc > 1:
            with pipeline_threads(eval_cfg.nproc):
                eval_stage.SPEC.per_rank(eval_cfg, eval_inputs, out / "eval")
        return 0
    with spread_or_solo(eval_cfg.nproc):
        metrics = execute(replace(eval_stage.SPEC, run=eval_stage.SPEC.per_rank), eval_cfg, eval_inputs, out / "eval")
    size = json.loads((out / "pack" / "size.json").read_text())
    final = {"val_loss": metrics["val_loss"], "val_bpb": metrics["val_bpb"], "artifact_bytes": size["total_bytes"],
             "code_bytes": size["code_bytes"], "model_bytes": size["model_bytes"]}
    print("pgolf_final " + json.dumps(final), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit("run this through an exported train_gpt.py (python -m flows.export)")
