"""AsymLogit Rescale (PR #1923 -> PR #2130 -> PR #2135, docs/lineage.md#asymlogit): the logit softcap
with a learned cap for positive logits and another for negative ones, c+ tanh(z / c+) where z >= 0 and
c- tanh(z / c-) below, both starting at logit_softcap (so it starts as the symmetric cap).

Where PR #2135's code reads logits (its eval, its per-document TTT scoring and LoRA updates) the pair
caps them; its training loss and its global TTT pass do not: both run its fused softcapped CE with the
constant cap, and no optimizer holds the pair. So in its run the pair never receives an update and stays
at its init; GPT.forward and param_groups do the same here (bench/pr2135_parity.py's step row checks it).
"""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from pgolf.model.families import Family


class AsymSoftcap(nn.Module):
    param_families: ClassVar = {"pos": Family.PASSTHROUGH, "neg": Family.PASSTHROUGH}

    def __init__(self, cap: float):
        super().__init__()
        # 0-dim, as PR #2135's torch.tensor(logit_softcap): its artifacts store them so
        self.pos = nn.Parameter(torch.tensor(float(cap)))
        self.neg = nn.Parameter(torch.tensor(float(cap)))

    def forward(self, logits: Tensor) -> Tensor:
        pos, neg = self.pos.to(logits.dtype), self.neg.to(logits.dtype)
        return torch.where(logits >= 0, pos * torch.tanh(logits / pos), neg * torch.tanh(logits / neg))
