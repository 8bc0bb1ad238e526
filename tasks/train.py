"""Stage train: the baseline GPT with Muon + Adam on train.nproc ranks per node, train.nnodes nodes.

One process trains in the stage's own process; more are launched by runner.ranks under torchrun
(this module with --worker), and rank 0 writes the weights, the log and the metrics into the output.
The loop itself is pgolf.train.loop.Trainer.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from pgolf import dist
from pgolf.data.shards import check_vocab, read_manifest, verify_shards
from pgolf.json_files import write_json
from pgolf.model.io import import_state_dict, save_model
from pgolf.train.config import TrainConfig as Config
from pgolf.train.loop import Trainer
from pgolf.typed_params import recorded_dict
from runner.ranks import run_on_ranks
from runner.records import record_timings
from runner.stage import StageSpec, stage_main


def run(cfg: Config, inputs: dict[str, Path], out: Path) -> dict:
    check_vocab(inputs["shards"], cfg.model.vocab_size)
    if not cfg.import_from:
        verify_shards(inputs["shards"], ("train", "val", "val_bytes") if cfg.val_every else ("train",))
    if cfg.import_from:
        resolved = resolved_config(cfg)
        model, dtypes = import_state_dict(cfg.import_from, cfg.model)
        save_model(model, cfg.model, out,
                   extra_config={**{k: v for k, v in resolved.items() if k != "model"}, "source_dtypes": dtypes})
        metrics = {"steps": 0, "imported_from": cfg.import_from}
        write_json(out / "metrics.json", metrics)
        return metrics
    run_on_ranks(SPEC, cfg, inputs, out)
    from pgolf.train.plots import write_train_plots  # the pipeline's only: no exported script draws

    write_train_plots(out)
    return json.loads((out / "metrics.json").read_text())


def resolved_config(cfg: Config) -> dict:
    """What config.json records beside the weights: only what determines them (the code's commit and
    the host go to the run record)."""
    return {"model": recorded_dict(cfg.model), "train": recorded_dict(cfg)}


def train_rank(cfg: Config, inputs: dict[str, Path], out: Path) -> dict:
    """This rank's share of the training run (all of it on one process)."""
    return train_in_process(cfg, inputs["shards"], out, resolved_config(cfg), tokenizer=inputs.get("tokenizer"))


def train_in_process(cfg: Config, shards: Path, out: Path, resolved: dict, tokenizer: Path | None = None) -> dict:
    """This process's share of a (torchrun) training run, in the process group its caller owns
    (runner.ranks, or the exported script's main); rank 0 writes the weights and metrics."""
    trainer = Trainer(cfg, shards, out, tokenizer)
    # whether the data is the challenge's (the shards' certificate, pgolf.data.certify)
    metrics = {**trainer.train(), "canonical": read_manifest(shards).get("canonical")}
    if dist.is_main():
        record_timings(out, **trainer.timings)
        save_model(trainer.model, cfg.model, out, extra_config={k: v for k, v in resolved.items() if k != "model"})
        write_json(out / "metrics.json", metrics)
    return metrics


# DVC deps cannot depend on a param, so the val shards and the tokenizer that val_every reads are
# deps always. That reruns nothing extra: both come from the stages that write the train shards
# (val_docs and the tokenizer change them too), so any change to them changes a train dep anyway.
SPEC = StageSpec(name="train", config_cls=Config, run=run, out="artifacts/train",
                 inputs={"shards": "artifacts/shards", "tokenizer": "artifacts/tokenizer"},
                 producers={"shards": "shards", "tokenizer": "tokenizer"}, optional_inputs=("tokenizer",),
                 input_parts={"shards": ("train", "val", "manifest.json")}, per_rank=train_rank)

if __name__ == "__main__":
    sys.exit(stage_main(SPEC))
