"""Stage eval: val_loss and val_bpb of the packed artifact alone, over the whole val split.

Reads only artifacts/pack/artifact.bin, the val shards and the tokenizer: nothing from training."""
from __future__ import annotations

import hashlib
import sys
import time
from dataclasses import dataclass, field
from typing import Literal
from pathlib import Path

import torch

from pgolf import dist
from pgolf.data.shards import load_split, read_manifest
from pgolf.errors import FormatError
from pgolf.evaluate.bpb import bytes_per_position, evaluate_bpb, truncate_val
from pgolf.evaluate.ttt import TTTSettings, evaluate_ttt
from pgolf.model.gpt import GPT
from pgolf.model.io import load_state_dict_into, model_config_from_dict
from pgolf.pack.serialize import load_artifact
from pgolf.tokenize.bytes import build_byte_luts, load_tokenizer, load_val_byte_sidecar
from tasks.common import StageSpec, stage_main, write_json


@dataclass
class Config:
    seq_len: int = 1024
    stride: int = 0  # 0: flat non-overlapping windows; > 0: sliding windows scoring `stride` new tokens each
    batch_seqs: int = 32
    device: str = "auto"
    ttt: Literal["off", "lora"] = "off"  # lora: score-first per-document LoRA test-time training
    lora: TTTSettings = field(default_factory=TTTSettings)

    def validate(self) -> None:
        if self.seq_len < 1 or self.batch_seqs < 1 or self.stride < 0:
            raise ValueError("seq_len and batch_seqs must be >= 1, stride >= 0")
        if self.stride >= self.seq_len:
            raise ValueError(f"stride {self.stride} must be smaller than seq_len {self.seq_len} (0 for flat)")


def model_from_artifact(artifact: Path, device: torch.device) -> GPT:
    qm = load_artifact(artifact)
    cfg = model_config_from_dict(qm.model_config, f"{artifact}: model config")
    model = GPT(cfg)
    load_state_dict_into(model, qm.dequantize(), artifact)
    return model.to(device)


def run(cfg: Config, inputs: dict[str, Path], out: Path) -> dict:
    started = time.perf_counter()
    device = dist.resolve_device(cfg.device)
    artifact = Path(inputs["pack"]) / "artifact.bin"
    model = model_from_artifact(artifact, device)
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
    sidecar = load_val_byte_sidecar(inputs["shards"])
    byte_counts = bytes_per_position(tokens, None if sidecar is not None else build_byte_luts(sp, vocab), sidecar)
    load_seconds = time.perf_counter() - started
    audit = None
    if cfg.ttt == "lora":
        result, audit, _ = evaluate_ttt(model, tokens, byte_counts, cfg.lora, device, model.cfg.bos_id)
        if not audit["passed"]:
            raise AssertionError(f"TTT broke the challenge's conditions: {audit['violations']}")
        mode = "ttt_lora"
    else:
        result = evaluate_bpb(model, tokens, byte_counts, cfg.seq_len, cfg.stride, cfg.batch_seqs, device)
        mode = "sliding" if cfg.stride else "flat"
    metrics = {
        "val_loss": result.val_loss,
        "val_bpb": result.val_bpb,
        "tokens": result.tokens,
        "bytes": result.bytes,
        "mode": mode,
        "audit": audit,
        "seq_len": cfg.seq_len,
        "stride": cfg.stride,
        "byte_source": "sidecar" if sidecar is not None else "lut",
        "load_seconds": round(load_seconds, 3),
        "eval_seconds": round(time.perf_counter() - started, 3),
        "artifact_sha256": hashlib.sha256(artifact.read_bytes()).hexdigest(),
    }
    write_json(out / "metrics.json", metrics)
    return metrics


SPEC = StageSpec(name="eval", config_cls=Config, run=run, out="artifacts/eval",
                 inputs={"pack": "artifacts/pack", "shards": "artifacts/shards", "tokenizer": "artifacts/tokenizer"},
                 producers={"pack": "pack", "shards": "shards", "tokenizer": "tokenizer"})

if __name__ == "__main__":
    sys.exit(stage_main(SPEC))
