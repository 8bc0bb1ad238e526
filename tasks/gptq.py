"""Stage gptq: Hessians from training batches, then GPTQ with per-row SDClip scales.

Matrices with a Hessian are GPTQ'd; other large matrices (an untied input embedding) get
round-to-nearest with the same scales; tensors of at most `passthrough_max_numel` elements and
non-float tensors pass through as fp16. report.json compares each tensor's output error with
round-to-nearest's."""
from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from pgolf import dist
from pgolf.data.shards import check_vocab
from pgolf.model.io import load_model
from pgolf.quant.format import QuantizedModel, save_quantized
from pgolf.quant.gptq import gptq_quantize, output_error, quantize_rtn, sdclip_scales
from pgolf.quant.hessian import calibration_batches, collect_hessians
from tasks.common import StageSpec, stage_main, write_json


@dataclass
class Config:
    calib_batches: int = 16
    calib_seq_len: int = 1024
    calib_batch_seqs: int = 8
    bits: int = 6
    clip_sigmas: float = 12.85
    damp: float = 0.01
    block_size: int = 128
    act_order: bool = True
    passthrough_max_numel: int = 65536
    device: str = "auto"
    seed: int = 1337

    def validate(self) -> None:
        if self.bits not in (6, 8):
            raise ValueError(f"bits {self.bits}: supported are 6 and 8")
        if self.calib_batches < 1 or self.calib_batch_seqs < 1 or self.calib_seq_len < 1:
            raise ValueError("calib_batches, calib_batch_seqs and calib_seq_len must be >= 1")
        if not 0 < self.damp < 1:
            raise ValueError("damp must be in (0, 1)")


def quantize_state(state: dict[str, torch.Tensor], hessians: dict[str, torch.Tensor], cfg: Config,
                   model_config: dict) -> tuple[QuantizedModel, dict]:
    tensors, entries, report = {}, {}, {}
    for name, tensor in sorted(state.items()):
        entry = {"shape": list(tensor.shape), "dtype": str(tensor.dtype).removeprefix("torch.")}
        if not tensor.is_floating_point() or tensor.numel() <= cfg.passthrough_max_numel or tensor.ndim != 2:
            tensors[name] = tensor.to(torch.float16) if tensor.is_floating_point() else tensor
            entries[name] = {**entry, "kind": "passthrough"}
            continue
        weight = tensor.float()
        scale = sdclip_scales(weight, cfg.bits, cfg.clip_sigmas)
        rtn = quantize_rtn(weight, scale, cfg.bits)
        hessian = hessians.get(name)
        if hessian is None:
            codes, kind = rtn.to(torch.int8), "rtn"
        else:
            codes, scale16 = gptq_quantize(weight, hessian, cfg.bits, cfg.clip_sigmas, cfg.damp, cfg.block_size,
                                           cfg.act_order, name)
            assert torch.equal(scale16.float(), scale)
            kind = "gptq"
        tensors[f"{name}.q"], tensors[f"{name}.scale"] = codes, scale.to(torch.float16)
        entries[name] = {**entry, "kind": kind, "bits": cfg.bits, "clip_sigmas": cfg.clip_sigmas}
        if hessian is not None:
            err = output_error(weight, codes.float() * scale[:, None], hessian)
            err_rtn = output_error(weight, rtn * scale[:, None], hessian)
            report[name] = {"kind": kind, "bits": cfg.bits, "clip_sigmas": cfg.clip_sigmas, "error": err,
                            "rtn_error": err_rtn, "ratio": err / err_rtn if err_rtn > 0 else 1.0}
        else:
            report[name] = {"kind": kind, "bits": cfg.bits, "clip_sigmas": cfg.clip_sigmas}
    return QuantizedModel(model_config, tensors, entries), report


def run(cfg: Config, inputs: dict[str, Path], out: Path) -> dict:
    device = dist.resolve_device(cfg.device)
    model, model_cfg = load_model(inputs["train"], device)
    check_vocab(inputs["shards"], model_cfg.vocab_size)
    started = time.perf_counter()
    batches = calibration_batches(inputs["shards"], cfg.calib_batches, cfg.calib_batch_seqs, cfg.calib_seq_len,
                                  cfg.seed, model_cfg.vocab_size)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        hessians, tokens = collect_hessians(model, batches, device)
    hessian_seconds = time.perf_counter() - started
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    qm, report = quantize_state(state, hessians, cfg, asdict(model_cfg))
    save_quantized(qm, out / "quantized.safetensors")
    gptq_errors = [r for r in report.values() if "error" in r]
    summary = {
        "calib_tokens": tokens,
        "hessian_seconds": round(hessian_seconds, 3),
        "quantize_seconds": round(time.perf_counter() - started - hessian_seconds, 3),
        "tensors_gptq": sum(r["kind"] == "gptq" for r in report.values()),
        "tensors_rtn": sum(r["kind"] == "rtn" for r in report.values()),
        "tensors_passthrough": sum(e["kind"] == "passthrough" for e in qm.entries.values()),
        "mean_error": sum(r["error"] for r in gptq_errors) / max(len(gptq_errors), 1),
        "mean_rtn_error": sum(r["rtn_error"] for r in gptq_errors) / max(len(gptq_errors), 1),
    }
    write_json(out / "report.json", {"summary": summary, "config": asdict(cfg), "tensors": report})
    return summary


SPEC = StageSpec(name="gptq", config_cls=Config, run=run, out="artifacts/gptq",
                 inputs={"train": "artifacts/train", "shards": "artifacts/shards"},
                 producers={"train": "train", "shards": "shards"})

if __name__ == "__main__":
    sys.exit(stage_main(SPEC))
