"""GPTQ (Frantar et al., 2022) with per-row SDClip scales, as the leading entries run it
(docs/lineage.md#gptq): dead columns zeroed, 1% damping, act-order by descending diag(H), upper
Cholesky factor of H^-1, 128-column blocks with lazy cross-block error updates."""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from pgolf.errors import PgolfError


class QuantError(PgolfError):
    """A tensor cannot be quantized as asked (e.g. its Hessian stays singular after damping)."""


def qmax(bits: int) -> int:
    return 2 ** (bits - 1) - 1


def sdclip_scales(weight: Tensor, bits: int, clip_sigmas: float) -> Tensor:
    """Per-row scale k * std(row) / R, rounded to fp16 before use so the stored scale is exactly
    the one the codes were computed with. q = clamp(round(w / s)) then clips at +-k sigma."""
    std = weight.float().std(dim=1)
    scale = (clip_sigmas * std / qmax(bits)).clamp_min(1e-7)
    return scale.to(torch.float16).float()


def quantize_rtn(weight: Tensor, scale: Tensor, bits: int) -> Tensor:
    r = qmax(bits)
    return torch.clamp(torch.round(weight.float() / scale[:, None]), -r, r)


def output_error(weight: Tensor, approx: Tensor, hessian: Tensor) -> float:
    """tr(E H E^T) / tr(W H W^T): the relative squared error of the layer's output on the
    calibration inputs (H = sum of x x^T), which is what GPTQ minimizes."""
    w, e = weight.double(), (weight.double() - approx.double())
    h = hessian.double()
    denom = torch.einsum("ij,jk,ik->", w, h, w).item()
    return torch.einsum("ij,jk,ik->", e, h, e).item() / max(denom, 1e-30)


class GPTQResult(NamedTuple):
    codes: Tensor  # int8 in [-R, R]
    scale: Tensor  # fp16 per row
    damp: float  # the damping that made H positive definite (x mean diag H): `damp`, or 10^k times it
    dead_columns: int  # inputs that were always zero: their weights quantize to 0


def _inverse_cholesky_upper(hessian: Tensor, damp: float, name: str, retries: int = 6) -> tuple[Tensor, float]:
    """Upper Cholesky factor of (H + d mean(diag H) I)^-1, retrying with d ten times larger while
    the factorization fails (a Hessian of too few tokens is singular in float32)."""
    mean_diag = hessian.diagonal().mean().item()
    eye = torch.eye(hessian.size(0), dtype=hessian.dtype)
    damping = damp
    for _ in range(retries + 1):
        try:
            chol = torch.linalg.cholesky(hessian + damping * mean_diag * eye)
            hinv = torch.cholesky_inverse(chol)
            return torch.linalg.cholesky(hinv, upper=True), damping
        except torch.linalg.LinAlgError:
            damping *= 10.0
    raise QuantError(f"tensor {name}: Hessian is not positive definite even with damping {damping / 10:g} x mean(diag); "
                     "calibrate on more tokens (gptq.calib_batches) or raise gptq.damp")


def gptq_quantize(weight: Tensor, hessian: Tensor, bits: int, clip_sigmas: float, damp: float = 0.01,
                  block_size: int = 128, act_order: bool = True, name: str = "tensor") -> GPTQResult:
    """Codes and fp16 per-row scales for `weight` [rows, cols] given the Hessian [cols, cols] of its
    inputs, with the recoveries it needed (more damping, dead columns) for the report."""
    w = weight.detach().float().clone()
    h = hessian.detach().float().clone()
    if h.shape != (w.size(1), w.size(1)):
        raise QuantError(f"tensor {name}: Hessian shape {tuple(h.shape)} does not match {tuple(w.shape)}")
    if not torch.isfinite(h).all():
        raise QuantError(f"tensor {name}: Hessian has non-finite values; the calibration forward diverged")
    scale = sdclip_scales(w, bits, clip_sigmas)
    r = qmax(bits)
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    # Stable: equal diagonals (dead columns, all set to 1) keep their index order on every device.
    perm = torch.argsort(h.diagonal(), descending=True, stable=True) if act_order else torch.arange(w.size(1))
    w, h = w[:, perm], h[perm][:, perm]
    u, damp_used = _inverse_cholesky_upper(h, damp, name)
    codes = torch.zeros_like(w)
    s = scale[:, None]
    for i1 in range(0, w.size(1), block_size):
        i2 = min(i1 + block_size, w.size(1))
        block = w[:, i1:i2].clone()
        errors = torch.zeros_like(block)
        u_block = u[i1:i2, i1:i2]
        for j in range(i2 - i1):
            col = block[:, j:j + 1]
            q = torch.clamp(torch.round(col / s), -r, r)
            codes[:, i1 + j:i1 + j + 1] = q
            err = (col - q * s) / u_block[j, j]
            block[:, j:] -= err * u_block[j:j + 1, j:]
            errors[:, j:j + 1] = err
        w[:, i2:] -= errors @ u[i1:i2, i2:]
    codes = codes[:, torch.argsort(perm)]
    return GPTQResult(codes.to(torch.int8), scale.to(torch.float16), damp_used, int(dead.sum()))
