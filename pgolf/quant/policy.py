"""Which format each tensor gets, by its family (pgolf.model.families), and the quantized model
that results: GPTQ with per-row SDClip scales for matrices with a Hessian, round-to-nearest with the
same scales for other large matrices, int8 per row for gates (when asked), fp16 passthrough for
small and non-float tensors, then LQER's low-rank correction of the worst tensors.

`cfg` is the gptq stage's Config (tasks/gptq.py), read by attribute.
"""
from __future__ import annotations

import torch

from pgolf.dist import one_thread
from pgolf.model.families import Family, block_part, is_embedding
from pgolf.progress import tracked
from pgolf.quant.gptq import gptq_quantize, output_error, quantize_rtn, sdclip_scales
from pgolf.quant.lqer import correction, low_rank_factors, pack_factors
from pgolf.quant.quantized_model import QuantizedModel
from pgolf.quant.config import GPTQConfig


def matrix_bits_and_clip(cfg: GPTQConfig, name: str) -> tuple[int, float]:
    """(bits, clip sigmas) of a matrix, by its name (docs/lineage.md#gptq)."""
    if is_embedding(name):
        return cfg.embed_bits or cfg.bits, cfg.embed_clip_sigmas or cfg.clip_sigmas
    part = block_part(name)
    if part == "mlp":
        return cfg.bits, cfg.mlp_clip_sigmas or cfg.clip_sigmas
    if part == "attention":
        return cfg.bits, cfg.attn_clip_sigmas or cfg.clip_sigmas
    return cfg.bits, cfg.clip_sigmas


def quantize_state(state: dict[str, torch.Tensor], hessians: dict[str, torch.Tensor], cfg: GPTQConfig,
                   model_config: dict, families: dict[str, Family]) -> tuple[QuantizedModel, dict]:
    """The quantized model and its report; `families`: the model's declared families
    (pgolf.model.families.declared_families), one per tensor of `state`. Every solve (Cholesky,
    GPTQ's column updates, LQER's SVD) runs on one CPU thread: a LAPACK or BLAS sum split over
    threads rounds by the thread count, and one rounding flips a code, so the same inputs must give the same codes whatever
    threads the stage runs with (docs/stages.md#determinism)."""
    with one_thread():
        return _quantize_state(state, hessians, cfg, model_config, families)


def _quantize_state(state, hessians, cfg: GPTQConfig, model_config, families) -> tuple[QuantizedModel, dict]:
    tensors, entries, report = {}, {}, {}
    for name, tensor in tracked(sorted(state.items()), "gptq tensors"):
        entry = {"shape": list(tensor.shape), "dtype": str(tensor.dtype).removeprefix("torch.")}
        if cfg.gate_int8 and tensor.is_floating_point() and families[name] is Family.GATE:
            # R1's GATED_ATTN_QUANT_GATE: symmetric int8 per row, s = max|row| / 127.
            scale = (tensor.float().abs().amax(dim=1) / 127).clamp_min(1e-12).half()
            tensors[f"{name}.q"] = torch.clamp(torch.round(tensor.float() / scale.float()[:, None]), -127, 127).to(torch.int8)
            tensors[f"{name}.scale"] = scale
            entries[name] = {**entry, "kind": "int8_row", "bits": 8}
            report[name] = {"kind": "int8_row", "bits": 8}
            continue
        if not tensor.is_floating_point() or tensor.numel() <= cfg.passthrough_max_numel or tensor.ndim != 2:
            tensors[name] = tensor.to(torch.float16) if tensor.is_floating_point() else tensor
            entries[name] = {**entry, "kind": "passthrough"}
            continue
        bits, clip = matrix_bits_and_clip(cfg, name)
        weight = tensor.float()
        scale = sdclip_scales(weight, bits, clip)
        rtn = quantize_rtn(weight, scale, bits)
        hessian = hessians.get(name)
        if hessian is None:
            codes, kind = rtn.to(torch.int8), "rtn"
        else:
            result = gptq_quantize(weight, hessian, bits, clip, cfg.damp, cfg.block_size, cfg.act_order, name)
            assert torch.equal(result.scale.float(), scale)
            codes, kind = result.codes, "gptq"
        tensors[f"{name}.q"], tensors[f"{name}.scale"] = codes, scale.to(torch.float16)
        entries[name] = {**entry, "kind": kind, "bits": bits, "clip_sigmas": clip}
        report[name] = {"kind": kind, "bits": bits, "clip_sigmas": clip,
                        "error_fro": float(torch.linalg.matrix_norm(weight - codes.float() * scale[:, None]))}
        if hessian is not None:
            err = output_error(weight, codes.float() * scale[:, None], hessian)
            err_rtn = output_error(weight, rtn * scale[:, None], hessian)
            report[name].update(error=err, rtn_error=err_rtn, ratio=err / err_rtn if err_rtn > 0 else 1.0,
                                damp=result.damp, dead_columns=result.dead_columns)
    if cfg.lqer_rank > 0:
        apply_lqer(state, tensors, entries, report, hessians, cfg)
    return QuantizedModel(model_config, tensors, entries), report


def apply_lqer(state, tensors, entries, report, hessians, cfg: GPTQConfig) -> None:
    """Rank-r correction of the top-k tensors by ||W - Q s||_F; the report says how much error it removes."""
    candidates = sorted((r["error_fro"], n) for n, r in report.items() if "error_fro" in r)
    for _, name in reversed(candidates[-cfg.lqer_top_k:] if cfg.lqer_top_k else []):
        weight = state[name].float()
        approx = tensors[f"{name}.q"].float() * tensors[f"{name}.scale"].float()[:, None]
        a, b = low_rank_factors(weight - approx, cfg.lqer_rank)
        packed = pack_factors(a, b, cfg.lqer_group)
        for suffix, value in packed.items():
            tensors[name + suffix] = value
        entries[name]["lqer"] = {"rank": a.size(1), "group": cfg.lqer_group, "asym": ".lqA_a" in packed}
        corrected = approx + correction(tensors, name, cfg.lqer_group)
        report[name]["lqer"] = {
            "rank": a.size(1), "asym": ".lqA_a" in packed,
            "error_fro_after": float(torch.linalg.matrix_norm(weight - corrected)),
            "error_removed": 1.0 - float(torch.linalg.matrix_norm(weight - corrected)) / max(report[name]["error_fro"], 1e-30),
        }
        if name in hessians:
            report[name]["lqer"]["output_error_after"] = output_error(weight, corrected, hessians[name])
