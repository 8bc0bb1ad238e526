"""The MLP: relu^2 (baseline) or LeakyReLU(0.5)^2 (the record lineage), hidden = mlp_mult x dim."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pgolf.model.config import ModelConfig
from pgolf.model.layers import CastedLinear


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden = int(cfg.mlp_mult * cfg.model_dim)
        self.fc = CastedLinear(cfg.model_dim, hidden, orthogonal=cfg.orthogonal_init)
        self.proj = CastedLinear(hidden, cfg.model_dim, zero_init=True)
        self.leaky = cfg.mlp_activation == "leaky_relu2"
        self.slope = cfg.leaky_slope

    def activation(self, h: Tensor) -> Tensor:
        return (F.leaky_relu(h, self.slope) if self.leaky else torch.relu(h)).square()

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(self.activation(self.fc(x)))
