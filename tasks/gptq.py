"""Stage gptq: Hessians from training batches, then GPTQ with per-row SDClip scales.

Matrices with a Hessian are GPTQ'd; other large matrices (an untied input embedding) get
round-to-nearest with the same scales; tensors of at most `passthrough_max_numel` elements and
non-float tensors pass through as fp16. report.json compares each tensor's output error with
round-to-nearest's."""
from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from pgolf import dist
from pgolf.data.shards import check_vocab, verify_shards
from pgolf.model.families import declared_families
from pgolf.model.io import load_model, source_dtypes
from pgolf.typed_params import recorded_dict
from pgolf.quant.baseline_int8 import quantize_baseline_int8
from pgolf.quant.config import GPTQConfig as Config
from pgolf.quant.policy import quantize_state
from pgolf.quant.quantized_model import save_quantized
from pgolf.quant.hessian import calibration_batches, collect_hessians, self_generated_batches
from pgolf.json_files import write_json
from pgolf.compliance import training_clock
from runner.records import read_run_record, read_timings, record_matches, record_timings
from runner.ranks import run_on_ranks
from runner.stage import StageSpec, stage_main


def run(cfg: Config, inputs: dict[str, Path], out: Path) -> dict:
    if cfg.method == "gptq" and cfg.calib_source == "train":
        verify_shards(inputs["shards"], ("train",))
    run_on_ranks(SPEC, cfg, inputs, out)
    record_timings(out, training_clock=training_clock_of(cfg, inputs["train"], out))
    return json.loads((out / "report.json").read_text())["summary"]


def training_clock_of(cfg: Config, train: Path, out: Path) -> dict:
    """The challenge's training clock: the train record's timed loop + this run's calibration (the
    Hessian pass, self-generated batches included; int8_baseline calibrates nothing). The train
    record counts only if it is the record of the weights at hand (DVC may have restored them)."""
    record = read_run_record(train)
    train_seconds = None
    if record_matches(record, train):
        train_seconds = record["timings"].get("train_seconds", 0.0)  # imported weights: none trained here
    calibration = 0.0 if cfg.method == "int8_baseline" else read_timings(out).get("hessian_seconds")
    return training_clock(train_seconds, calibration)


def calibrate_and_quantize(cfg: Config, inputs: dict[str, Path], out: Path) -> dict:
    """This rank's share of calibration (all of it on one process); rank 0 quantizes and writes."""
    device = dist.resolve_device(cfg.device)
    model, model_cfg = load_model(inputs["train"], device)
    check_vocab(inputs["shards"], model_cfg.vocab_size)
    started = time.perf_counter()
    if cfg.method == "int8_baseline":
        if not dist.is_main():
            return {}
        qm, report = quantize_baseline_int8({k: v.detach().cpu() for k, v in model.state_dict().items()},
                                            recorded_dict(model_cfg), source_dtypes(inputs["train"]))
        save_quantized(qm, out / "quantized.safetensors")
        record_timings(out, quantize_seconds=round(time.perf_counter() - started, 3))
        summary = {"method": cfg.method,
                   "tensors_int8": sum(e["kind"].startswith("int8") for e in qm.entries.values()),
                   "tensors_passthrough": sum(e["kind"] == "passthrough" for e in qm.entries.values())}
        write_json(out / "report.json", {"summary": summary, "config": asdict(cfg), "tensors": report})
        return summary
    if cfg.calib_source == "self":
        batches = self_generated_batches(model, cfg.calib_batches, cfg.calib_batch_seqs, cfg.calib_seq_len,
                                         cfg.calib_temperature, cfg.seed, model_cfg.bos_id, device)
    else:
        batches = calibration_batches(inputs["shards"], cfg.calib_batches, cfg.calib_batch_seqs, cfg.calib_seq_len,
                                      cfg.seed, model_cfg.vocab_size)
    model.set_doc_attention(model_cfg.doc_attention and cfg.calib_doc_attention)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        hessians, tokens = collect_hessians(model, batches, device)
    model.set_doc_attention(model_cfg.doc_attention)
    hessian_seconds = time.perf_counter() - started
    if not dist.is_main():
        return {}
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    qm, report = quantize_state(state, hessians, cfg, recorded_dict(model_cfg), declared_families(model))
    save_quantized(qm, out / "quantized.safetensors")
    record_timings(out, hessian_seconds=round(hessian_seconds, 3),
                   quantize_seconds=round(time.perf_counter() - started - hessian_seconds, 3))
    gptq_errors = [r for r in report.values() if "error" in r]
    summary = {
        "method": cfg.method,
        "calib_tokens": tokens,
        "calib_source": cfg.calib_source,
        "calib_ranks": dist.world_size(),
        "tensors_gptq": sum(r["kind"] == "gptq" for r in report.values()),
        "tensors_rtn": sum(r["kind"] == "rtn" for r in report.values()),
        "tensors_passthrough": sum(e["kind"] == "passthrough" for e in qm.entries.values()),
        "tensors_int8_row": sum(e["kind"] == "int8_row" for e in qm.entries.values()),
        "tensors_lqer": sum("lqer" in e for e in qm.entries.values()),
        # Recoveries (docs/lineage.md#gptq): Hessians that needed more than gptq.damp to factor, and inputs never active.
        "tensors_damped_more": sum(r.get("damp", cfg.damp) > cfg.damp for r in report.values()),
        "dead_columns": sum(r.get("dead_columns", 0) for r in report.values()),
        "mean_error": sum(r["error"] for r in gptq_errors) / max(len(gptq_errors), 1),
        "mean_rtn_error": sum(r["rtn_error"] for r in gptq_errors) / max(len(gptq_errors), 1),
    }
    write_json(out / "report.json", {"summary": summary, "config": asdict(cfg), "tensors": report})
    return summary


SPEC = StageSpec(name="gptq", config_cls=Config, run=run, out="artifacts/gptq",
                 inputs={"train": "artifacts/train", "shards": "artifacts/shards"},
                 producers={"train": "train", "shards": "shards"},
                 input_parts={"shards": ("train", "manifest.json")}, per_rank=calibrate_and_quantize)

if __name__ == "__main__":
    sys.exit(stage_main(SPEC))
