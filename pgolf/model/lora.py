"""Per-document LoRA adapters for test-time training (RLORA -> R0416 -> R1, docs/lineage.md#lora-ttt).

Every tensor has a leading document dimension: document b of a batch has its own A and B, so one
batched forward trains as many independent adapters as there are documents. delta(x) = (x A^T) B^T
* alpha / r, A ~ U(+-1/sqrt(in)), B = 0 (the adapted model starts as the base model). One slot per
virtual depth (looped layers get distinct adapters) with Q, K, V, O and MLP adapters, plus one on the
LM head; PR #2135 has none on K (`k=False`). O and MLP adapters read the block's normalized input, as R1's do.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from pgolf.model.config import ModelConfig
from pgolf.model.families import Family


class BatchedLoRA(nn.Module):
    # TTT's own optimizer trains them and no artifact stores them: no family rule applies.
    param_families: ClassVar = {"A": Family.PASSTHROUGH, "B": Family.PASSTHROUGH}

    def __init__(self, docs: int, in_features: int, out_features: int, rank: int, alpha: float,
                 generator: torch.Generator | None = None):
        super().__init__()
        bound = 1.0 / math.sqrt(in_features)
        self.A = nn.Parameter(torch.empty(docs, rank, in_features).uniform_(-bound, bound, generator=generator))
        self.B = nn.Parameter(torch.zeros(docs, out_features, rank))
        self.scale = alpha / rank

    def forward(self, x: Tensor) -> Tensor:
        return (x @ self.A.transpose(1, 2).to(x.dtype)) @ self.B.transpose(1, 2).to(x.dtype) * self.scale

    @torch.no_grad()
    def reset(self, generator: torch.Generator | None = None, keep_a: bool = False) -> None:
        self.B.zero_()
        if not keep_a:
            bound = 1.0 / math.sqrt(self.A.size(-1))
            self.A.uniform_(-bound, bound, generator=generator)


@dataclass
class SlotAdapters:
    q: BatchedLoRA
    k: BatchedLoRA | None
    v: BatchedLoRA
    o: BatchedLoRA
    mlp: BatchedLoRA


class DocumentAdapters(nn.Module):
    def __init__(self, cfg: ModelConfig, slots: int, docs: int, rank: int, alpha: float, seed: int = 0,
                 k: bool = True):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        d, kv = cfg.model_dim, cfg.num_kv_heads * cfg.head_dim

        def make(out_features: int) -> BatchedLoRA:
            return BatchedLoRA(docs, d, out_features, rank, alpha, g)

        def one_depth() -> nn.ModuleDict:
            # drawn in this order: without K the adapters after it draw what K's A would have
            return nn.ModuleDict({"q": make(d), **({"k": make(kv)} if k else {}), "v": make(kv), "o": make(d),
                                  "mlp": make(d)})

        self.layers = nn.ModuleList(one_depth() for _ in range(slots))
        self.head = make(cfg.vocab_size)

    def slot(self, depth: int) -> SlotAdapters:
        m = self.layers[depth]
        return SlotAdapters(m["q"], m["k"] if "k" in m else None, m["v"], m["o"], m["mlp"])

    def reset(self, generator: torch.Generator | None = None, keep_a: bool = False) -> None:
        for module in self.modules():
            if isinstance(module, BatchedLoRA):
                module.reset(generator, keep_a)
