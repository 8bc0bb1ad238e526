"""Late QAT (the #549-era stacks): once the lr scale falls below a threshold, the block matrices
train through a straight-through int-k fake quantizer, per row with s = max|row| / R, so the
weights settle where rounding will put them."""
from __future__ import annotations

import torch
from torch import Tensor


def fake_quantize_rows(weight: Tensor, bits: int) -> Tensor:
    r = 2 ** (bits - 1) - 1
    scale = weight.detach().abs().amax(dim=1, keepdim=True).clamp_min(1e-8) / r
    quantized = torch.clamp(torch.round(weight / scale), -r, r) * scale
    return weight + (quantized - weight).detach()  # straight-through: forward quantized, gradient identity
