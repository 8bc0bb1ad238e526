"""LQER: low-rank correction of the quantization error (R1, docs/lineage.md#lqer).

For the tensors with the largest ||W - Q s||_F, the error's top-r SVD E ~ A B (A = U_r S_r,
B = V_r^T) is stored in a few bits: asymmetric packing puts A in INT2 ([-2, 1], one fp16 scale
max|A| / 1.5) and B in INT4 ([-8, 7]) with one fp16 scale per group of 64 values (max|g| / 7.5);
when B does not split into whole groups, both factors fall back to INT4 with per-row scales.
"""
from __future__ import annotations

import torch
from torch import Tensor


def low_rank_factors(error: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """The SVD in float32, as R1 takes it: a singular vector's sign is the SVD's choice, and with
    A's lopsided INT2 range [-2, 1] a flipped sign changes the stored codes, so a float64 SVD (a
    sign of its own) would store other factors than R1 for the same error."""
    u, s, vh = torch.linalg.svd(error.float(), full_matrices=False)
    r = min(rank, s.numel())
    return (u[:, :r] * s[:r]).contiguous(), vh[:r].contiguous()


def _sym_rows(x: Tensor, levels: float, lo: int, hi: int) -> tuple[Tensor, Tensor]:
    scale = (x.abs().amax(dim=1, keepdim=True) / levels).clamp_min(1e-12).half().float()
    return torch.clamp(torch.round(x / scale), lo, hi).to(torch.int8), scale.squeeze(1).half()


def pack_factors(a: Tensor, b: Tensor, group: int) -> dict[str, Tensor]:
    """Quantized factors as stored tensors (suffixes appended to the weight's name)."""
    if b.numel() % group == 0:
        sa = (a.abs().max() / 1.5).clamp_min(1e-12).half()
        qa = torch.clamp(torch.round(a / sa.float()), -2, 1).to(torch.int8)
        groups = b.reshape(-1, group)
        sb = (groups.abs().amax(dim=1) / 7.5).clamp_min(1e-12).half()
        qb = torch.clamp(torch.round(groups / sb.float()[:, None]), -8, 7).to(torch.int8).reshape(b.shape)
        return {".lqA_a": qa, ".lqAs_a": sa.reshape(1), ".lqB_a": qb, ".lqBs_a": sb}
    qa, sa = _sym_rows(a, 7.0, -7, 7)
    qb, sb = _sym_rows(b, 7.0, -7, 7)
    return {".lqA": qa, ".lqAs": sa, ".lqB": qb, ".lqBs": sb}


def correction(tensors: dict[str, Tensor], name: str, group: int) -> Tensor | None:
    """A @ B rebuilt from the stored factors of `name`, or None if it has none."""
    if f"{name}.lqA_a" in tensors:
        qa, sa = tensors[f"{name}.lqA_a"].float(), tensors[f"{name}.lqAs_a"].float()
        qb, sb = tensors[f"{name}.lqB_a"].float(), tensors[f"{name}.lqBs_a"].float()
        b = (qb.reshape(-1, group) * sb[:, None]).reshape(qb.shape)
        return (qa * sa) @ b
    if f"{name}.lqA" in tensors:
        a = tensors[f"{name}.lqA"].float() * tensors[f"{name}.lqAs"].float()[:, None]
        b = tensors[f"{name}.lqB"].float() * tensors[f"{name}.lqBs"].float()[:, None]
        return a @ b
    return None
