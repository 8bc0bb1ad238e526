"""Per-head attention output gates, applied after XSA and before the output projection.

- attn_out (R0416, PR #1667; width 24 in PR #1790): y_h *= 2 sigmoid(W_h . src[:width]), W zero-init,
  so the gate is exactly 1 at init; src is the normed attention input, the pre-norm block input
  (PR #1693) or the raw q projection;
- sparse (R1): y_h *= sigmoid(s * W_h . n[:width]), W zero-init (0.5 at init), s = 0.5.
"""
from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pgolf.model.config import ModelConfig
from pgolf.model.families import Family


class AttnOutputGate(nn.Module):
    param_families: ClassVar = {"attn_gate_w": Family.GATE}

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.kind, self.width, self.src = cfg.attn_gate, cfg.attn_gate_width, cfg.attn_gate_src
        self.scale = cfg.sparse_attn_gate_scale
        self.attn_gate_w = nn.Parameter(torch.zeros(cfg.num_heads, cfg.attn_gate_width))

    def source(self, normed: Tensor, prenorm: Tensor, q: Tensor) -> Tensor:
        if self.kind == "sparse" or self.src == "norm":
            return normed
        return prenorm if self.src == "prenorm" else q

    def forward(self, y: Tensor, src: Tensor) -> Tensor:
        """y: [B, H, T, d]; src: [B, T, D]."""
        logits = F.linear(src[..., :self.width], self.attn_gate_w.to(src.dtype)).transpose(1, 2).unsqueeze(-1)
        if self.kind == "sparse":
            return y * torch.sigmoid(self.scale * logits)
        return y * (2.0 * torch.sigmoid(logits))
