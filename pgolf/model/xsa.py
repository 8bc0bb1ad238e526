"""Exclusive self-attention (XSA): remove from each head's output its component along the
(normalized) value vector of the same position, so attention adds what the token does not
already carry (R0325 lineage; R1 uses it on all 11 layers)."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def exclusive(y: Tensor, v: Tensor) -> Tensor:
    """y: [B, H, T, d] attention output; v: [B, H_kv, T, d] values; GQA groups share a v."""
    groups = y.size(1) // v.size(1)
    v_hat = F.normalize(v, dim=-1)
    if groups > 1:
        v_hat = v_hat.repeat_interleave(groups, dim=1)
    return y - (y * v_hat).sum(-1, keepdim=True) * v_hat
