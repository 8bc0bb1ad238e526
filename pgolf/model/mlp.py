"""The MLP: relu^2 (baseline) or LeakyReLU(0.5)^2 (the record lineage), hidden = mlp_mult x dim."""
from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pgolf.model.config import ModelConfig
from pgolf.model.families import Family
from pgolf.model.layers import CastedLinear


class MLP(nn.Module):
    param_families: ClassVar = {"fc.weight": Family.MATRIX, "proj.weight": Family.MATRIX}

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden = int(cfg.mlp_mult * cfg.model_dim)
        self.fc = CastedLinear(cfg.model_dim, hidden, orthogonal=cfg.orthogonal_init)
        self.proj = CastedLinear(hidden, cfg.model_dim, zero_init=True)
        self.leaky = cfg.mlp_activation == "leaky_relu2"
        self.slope = cfg.leaky_slope
        self.fused = False  # set by GPT.set_fused_kernels (the train stage's choice)

    def activation(self, h: Tensor) -> Tensor:
        return (F.leaky_relu(h, self.slope) if self.leaky else torch.relu(h)).square()

    def forward(self, x: Tensor) -> Tensor:
        if self.fused and torch.is_grad_enabled():
            from pgolf.kernels.fused_mlp import fused_mlp

            dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
            return fused_mlp(x.to(dtype), self.fc.effective_weight().to(dtype), self.proj.effective_weight().to(dtype),
                             self.slope if self.leaky else 0.0)
        return self.proj(self.activation(self.fc(x)))
