"""Stage eval: val_loss and val_bpb of the packed artifact alone, over the whole val split.

Reads only artifacts/pack/artifact.bin, the val shards and the tokenizer: nothing from training.
With nproc > 1 (or nnodes > 1) the stage launches torchrun (runner.ranks); every rank loads the artifact and scores its share,
the totals are summed over ranks and rank 0 writes metrics.json (the same numbers as one process,
up to the order of float64 sums, except where a TTT mode's schedule depends on the rank count)."""
from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import replace
from pathlib import Path

import torch

from pgolf import dist
from pgolf.compliance import eval_clock
from pgolf.data.shards import list_shards, load_split, read_manifest, verify_shards
from pgolf.errors import FormatError
from pgolf.evaluate.bpb import evaluate_bpb, truncate_val
from pgolf.evaluate.budget import Budget
from pgolf.evaluate.config import EvalConfig as Config
from pgolf.evaluate.ngram_tilt import ScoreSampler, TiltScorer, audit as audit_tilt, token_hints
from pgolf.evaluate.sgd_ttt import evaluate_sgd_ttt
from pgolf.evaluate.lora_ttt import evaluate_ttt
from pgolf.evaluate.warmup import compile_forward, warm_up
from pgolf.model.gpt import GPT
from pgolf.model.io import load_state_dict_into, model_config_from_dict
from pgolf.pack.serialize import load_artifact
from pgolf.tokenize.token_bytes import load_tokenizer, val_byte_counts
from pgolf.json_files import write_json
from runner.ranks import run_on_ranks
from runner.records import record_timings
from runner.stage import StageSpec, stage_main


MODES = {"off": "flat", "lora": "ttt_lora", "sgd": "ttt_sgd"}


def model_from_artifact(artifact: Path, device: torch.device) -> GPT:
    qm = load_artifact(artifact)
    cfg = model_config_from_dict(qm.model_config, f"{artifact}: model config")
    model = GPT(cfg)
    load_state_dict_into(model, qm.dequantize(), artifact)
    return model.to(device)


def cut_documents_every(model: GPT, seq_len: int) -> None:
    """R1's and PR #2135's evals cut a document's attention every eval_seq_len tokens (the cu_seqlens of
    their eval_val and global TTT), where training cut it every train_seq_len: the same 2048 in R1,
    2560 against 2048 in PR #2135. A model without cuts (doc_attention_max_len 0) keeps none."""
    if model.cfg.doc_attention_max_len:
        model.cfg = replace(model.cfg, doc_attention_max_len=seq_len)


def run(cfg: Config, inputs: dict[str, Path], out: Path) -> dict:
    verify_shards(inputs["shards"], ("val", "val_bytes"))
    run_on_ranks(SPEC, cfg, inputs, out)
    return json.loads((out / "metrics.json").read_text())


def evaluate(cfg: Config, inputs: dict[str, Path], out: Path) -> dict:
    """This rank's share of the eval (all of it on one process); rank 0 writes metrics.json."""
    budget = Budget(cfg.budget_s)
    device = dist.resolve_device(cfg.device)
    artifact = Path(inputs["pack"]) / "artifact.bin"
    model = model_from_artifact(artifact, device)
    load_seconds = budget.elapsed()
    sp, tok = load_tokenizer(inputs["tokenizer"])
    vocab = model.cfg.vocab_size
    if sp.vocab_size() != vocab:
        raise FormatError(f"the tokenizer has {sp.vocab_size()} pieces but the model's vocab_size is {vocab}: "
                          "evaluate with the tokenizer the model was trained with", Path(inputs["tokenizer"]) / "tokenizer.json")
    manifest = read_manifest(inputs["shards"])
    if manifest.get("tokenizer_sha256") not in (None, tok["sha256"]):
        raise FormatError("the shards were built with a different tokenizer than artifacts/tokenizer",
                          Path(inputs["shards"]) / "manifest.json")
    tokens = truncate_val(load_split(inputs["shards"], "val", vocab), cfg.seq_len)
    byte_counts = val_byte_counts(tokens, sp, vocab, inputs["shards"])
    cut_documents_every(model, cfg.seq_len)
    precompute_seconds = budget.elapsed() - load_seconds
    warmup_seconds = compile_and_warm_up(cfg, model, device) if cfg.compile else 0.0
    budget.started += warmup_seconds
    hints = scorer = None
    hint_seconds = 0.0
    if cfg.tilt.on:
        hints = token_hints(tokens, cfg.tilt)
        scorer = TiltScorer(hints, ScoreSampler())
        hint_seconds = budget.elapsed() - load_seconds - precompute_seconds
    summary = None
    if cfg.ttt == "lora":
        result, summary, _ = evaluate_ttt(model, tokens, byte_counts, cfg.lora, device, model.cfg.bos_id, budget,
                                          scorer)
    elif cfg.ttt == "sgd":
        result, summary, _ = evaluate_sgd_ttt(model, tokens, byte_counts, cfg.seq_len, cfg.stride, cfg.batch_seqs,
                                              cfg.sgd, device, budget)
    else:
        if cfg.join_windows and not model.cfg.doc_attention:
            raise FormatError("eval.join_windows needs a model with doc_attention: without it a joined row is one "
                              f"causal context of {cfg.batch_seqs * cfg.seq_len} tokens", artifact)
        result = evaluate_bpb(model, tokens, byte_counts, cfg.seq_len, cfg.stride, cfg.batch_seqs, device,
                              cfg.join_windows, scorer)
    if summary is not None and not summary["passed"]:
        raise AssertionError(f"TTT broke the challenge's conditions: {summary['violations']}")
    eval_seconds = budget.elapsed()
    summary, ttt_seconds = split_seconds(summary)
    tilt = None
    if hints is not None:
        # the audit checks the run (outside its clock): hints from the prefix alone, scores renormalized
        tilt = audit_tilt(tokens, cfg.tilt, hints, scorer.sampler)
        if not tilt["passed"]:
            raise AssertionError(f"the n-gram tilt broke the challenge's conditions: {tilt}")
    metrics = {
        "val_loss": result.val_loss,
        "val_bpb": result.val_bpb,
        "tokens": result.tokens,
        "bytes": result.bytes,
        "mode": "sliding" if cfg.ttt == "off" and cfg.stride else MODES[cfg.ttt],
        "audit": summary,
        **({"tilt": tilt} if tilt is not None else {}),
        "seq_len": cfg.seq_len,
        "stride": cfg.stride,
        "ranks": dist.world_size(),
        "byte_source": "sidecar" if list_shards(inputs["shards"], "val_bytes") else "lut",
        "budget_s": cfg.budget_s,
        "artifact_sha256": hashlib.sha256(artifact.read_bytes()).hexdigest(),
        # whether val is the challenge's (the shards' certificate, pgolf.data.certify)
        "canonical": manifest.get("canonical"),
    }
    # What the seconds include: load = artifact read, decompression, dequantization, model build;
    # precompute = val tokens and their bytes, and the n-gram tilt's hints (eval.tilt, hint_seconds);
    # scoring = everything after (TTT training included). eval_seconds = load + precompute + scoring,
    # the figure eval.budget_s holds; the compile warm-up is apart. eval_clock splits them into the
    # phases the challenge's rule names (pgolf.compliance). They go to the run record, not
    # metrics.json: a rerun on the same artifact must write the same bytes.
    scored_seconds = eval_seconds - load_seconds - precompute_seconds - hint_seconds
    timings = {
        "load_seconds": round(load_seconds + precompute_seconds, 3),
        "warmup_seconds": round(warmup_seconds, 3),
        **({"hint_seconds": round(hint_seconds, 3)} if hints is not None else {}),
        "scoring_seconds": round(scored_seconds, 3),
        "eval_seconds": round(eval_seconds, 3),
        "within_budget": cfg.budget_s == 0 or eval_seconds <= cfg.budget_s,
        "eval_clock": eval_clock({"load_decompress": load_seconds, "warmup": warmup_seconds,
                                  "precompute": precompute_seconds + hint_seconds, "scoring": scored_seconds - ttt_seconds,
                                  "ttt": ttt_seconds}),
    }
    if dist.is_main():
        write_json(out / "metrics.json", metrics)
        record_timings(out, **timings)
    return {**metrics, **timings}


def split_seconds(summary: dict | None) -> tuple[dict | None, float]:
    """A TTT summary without its seconds (they belong in the run record: metrics.json must be the
    same bytes on every rerun), and the seconds its test-time training took."""
    if summary is None:
        return None, 0.0
    ttt = float(summary.get("global_sgd_seconds") or 0.0) + float(summary.get("training_seconds") or 0.0)

    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if not k.endswith("seconds")}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value

    return strip(summary), ttt


def compile_and_warm_up(cfg: Config, model, device: torch.device) -> float:
    """Compile, then run every shape this mode will run (R1 warms up at chunk and context width)."""
    compile_forward(model)
    if cfg.ttt == "lora":
        lora = cfg.lora
        seconds = warm_up(model, device, [(lora.batch_docs, lora.chunk), (lora.batch_docs, lora.context)],
                          lora=(lora.batch_docs, lora.rank, lora.alpha), lora_k=lora.adapt_k)
        if lora.phases:
            seconds += warm_up(model, device, [(lora.global_batch_seqs, lora.global_seq_len)], train=True)
        return seconds
    seconds = warm_up(model, device, [(cfg.batch_seqs, cfg.seq_len)])
    if cfg.ttt == "sgd":
        seconds += warm_up(model, device, [(cfg.sgd.batch_seqs, cfg.seq_len)], train=True)
    return seconds


SPEC = StageSpec(name="eval", config_cls=Config, run=run, out="artifacts/eval",
                 inputs={"pack": "artifacts/pack", "shards": "artifacts/shards", "tokenizer": "artifacts/tokenizer"},
                 producers={"pack": "pack", "shards": "shards", "tokenizer": "tokenizer"},
                 input_parts={"shards": ("val", "manifest.json")}, per_rank=evaluate)

if __name__ == "__main__":
    sys.exit(stage_main(SPEC))
