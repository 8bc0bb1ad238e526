"""FiLM for shared blocks (PR #1383, "neuromodulatory recurrence"): after each virtual depth whose
block runs more than once, x = gamma_v * x + beta_v, so a reused block can act differently at each
depth. gamma starts at 1 and beta at 0: identity at init."""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from pgolf.model.families import Family


class FiLM(nn.Module):
    param_families: ClassVar = {"film_gamma": Family.PASSTHROUGH, "film_beta": Family.PASSTHROUGH}

    def __init__(self, slots: int, dim: int):
        super().__init__()
        self.film_gamma = nn.Parameter(torch.ones(slots, dim))
        self.film_beta = nn.Parameter(torch.zeros(slots, dim))

    def forward(self, x: Tensor, slot: int) -> Tensor:
        return self.film_gamma[slot].to(x.dtype) * x + self.film_beta[slot].to(x.dtype)
