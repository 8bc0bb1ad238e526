"""SmearGate: mix the previous token's embedding into the current one, gated per token.

Variants (docs/lineage.md#architecture):
- r1 (PR #1855): on raw embeddings before the norm, x_t += lam * sigmoid(w . x_t[:W]) * x_{t-1},
  w and lam zero-init (so identity at init), masked where token_t is BOS so the last token of a
  document never leaks into the next one (R1's fix);
- pr1693: the same formula after the embedding norm, previous token zero-padded;
- classic (#549 era, PR #1383): x = (1 - sigmoid(g)) * x + sigmoid(g) * x_{t-1}, g per channel,
  input independent, after the norm.
"""
from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pgolf.model.config import ModelConfig
from pgolf.model.families import Family


class SmearGate(nn.Module):
    param_families: ClassVar = {"gate": Family.PASSTHROUGH, "lam": Family.PASSTHROUGH}

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.variant, self.window = cfg.smear_gate, cfg.gate_window
        self.bos_mask, self.bos_id = cfg.smear_bos_mask, cfg.bos_id
        if self.variant == "classic":
            self.gate = nn.Parameter(torch.zeros(cfg.model_dim))
        else:
            self.gate = nn.Parameter(torch.zeros(1, cfg.gate_window))
            self.lam = nn.Parameter(torch.zeros(1))

    @property
    def before_norm(self) -> bool:
        return self.variant == "r1"

    def forward(self, x: Tensor, input_ids: Tensor) -> Tensor:
        prev = F.pad(x[:, :-1], (0, 0, 1, 0))  # position 0 has no previous token
        if self.bos_mask:
            prev = prev * (input_ids != self.bos_id).unsqueeze(-1).to(x.dtype)
        if self.variant == "classic":
            g = torch.sigmoid(self.gate.to(x.dtype))
            return (1 - g) * x + g * prev
        g = torch.sigmoid(F.linear(x[..., :self.window], self.gate.to(x.dtype)))
        return x + self.lam.to(x.dtype) * g * prev
