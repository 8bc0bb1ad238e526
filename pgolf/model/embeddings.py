"""Extra embeddings of the PR #1383 lineage: BigramHash (added to the token embedding) and value
embeddings (added to V on chosen layers)."""
from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pgolf.model.config import ModelConfig
from pgolf.model.families import Family
from pgolf.model.layers import CastedLinear


def bigram_hash(input_ids: Tensor, table_rows: int) -> Tensor:
    """h_t = (36313 t_i XOR 27191 t_{i-1}) mod (V_b - 1); position 0 gets the reserved row V_b - 1."""
    prev = F.pad(input_ids[:, :-1], (1, 0))
    h = torch.bitwise_xor(36313 * input_ids, 27191 * prev) % (table_rows - 1)
    h[:, 0] = table_rows - 1
    return h


class BigramHashEmbedding(nn.Module):
    param_families: ClassVar = {"table": Family.PASSTHROUGH, "proj.weight": Family.PASSTHROUGH,
                                "scale": Family.PASSTHROUGH}

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.rows = cfg.bigram_vocab
        self.table = nn.Parameter(torch.zeros(cfg.bigram_vocab, cfg.bigram_dim))
        self.proj = CastedLinear(cfg.bigram_dim, cfg.model_dim, zero_init=True)
        self.scale = nn.Parameter(torch.full((1,), 0.05))

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.scale * self.proj(F.embedding(bigram_hash(input_ids, self.rows), self.table))


class ValueEmbedding(nn.Module):
    """One table shared by the chosen layers; each layer adds it to V with its own scale."""
    param_families: ClassVar = {"table": Family.PASSTHROUGH, "proj.weight": Family.PASSTHROUGH,
                                "scale": Family.PASSTHROUGH}

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        kv_dim = cfg.num_kv_heads * cfg.head_dim
        self.table = nn.Parameter(torch.randn(cfg.vocab_size, cfg.ve_dim) * 0.01)
        self.proj = CastedLinear(cfg.ve_dim, kv_dim, zero_init=True)
        self.scale = nn.Parameter(torch.full((1,), 0.1))

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.scale * self.proj(F.embedding(input_ids, self.table))
