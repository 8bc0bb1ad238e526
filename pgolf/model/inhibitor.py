"""Inhibitory gates (PR #2116): a low-rank sigmoid gate sigmoid(U (D x) + b) multiplying a block's
attention and MLP residual scales. U is zero-init and b = 3, so the gate starts at sigmoid(3) ~ 0.95
("5% suppression") and learns where to suppress more."""
from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pgolf.model.families import Family


class InhibitorGate(nn.Module):
    param_families: ClassVar = {"down": Family.GATE, "up": Family.GATE, "bias": Family.PASSTHROUGH}

    def __init__(self, dim: int, rank: int, bias: float):
        super().__init__()
        self.down = nn.Parameter(torch.empty(rank, dim))
        nn.init.kaiming_uniform_(self.down, a=math.sqrt(5))  # nn.Linear's default, as PR #2116 leaves it
        self.up = nn.Parameter(torch.zeros(dim, rank))
        self.bias = nn.Parameter(torch.full((dim,), bias))

    def forward(self, x: Tensor) -> Tensor:
        return torch.sigmoid(F.linear(F.linear(x, self.down.to(x.dtype)), self.up.to(x.dtype)) + self.bias.to(x.dtype))
