"""The optimizers of a training run: Muon for the blocks' matrices, AdamW for the rest, with the
learning rate of each family (pgolf.model.families) from the train stage's config."""
from __future__ import annotations

import torch

from pgolf.model.gpt import GPT, param_groups
from pgolf.optim.muon import Muon, ShardedMuon
from pgolf.train.config import TrainConfig


def build_optimizers(model: GPT, cfg: TrainConfig, fused: bool) -> list[torch.optim.Optimizer]:
    """[Muon, AdamW]; `cfg` is the train stage's Config (tasks/train.py). Each group keeps its
    configured lr as base_lr, which the schedules scale."""
    groups = param_groups(model)
    muon_cls = ShardedMuon if cfg.muon_sharded else Muon
    muon = muon_cls([p for _, p in groups["matrix"]], lr=cfg.matrix_lr, momentum=cfg.muon_momentum,
                backend_steps=cfg.muon_backend_steps, coefficients=cfg.muon_coefficients,
                row_normalize=cfg.muon_row_normalize, weight_decay=cfg.muon_wd, compiled=cfg.compile,
                bf16=cfg.muon_bf16)
    adam_groups = [
        {"params": [p for _, p in groups["embed"]],
         "lr": cfg.tied_embed_lr if cfg.model.tie_embeddings else cfg.embed_lr, "weight_decay": cfg.embed_wd},
        {"params": [p for _, p in groups["scalar"]], "lr": cfg.scalar_lr, "weight_decay": cfg.adam_wd},
    ]
    if groups["head"]:
        adam_groups.append({"params": [p for _, p in groups["head"]], "lr": cfg.head_lr, "weight_decay": 0.0})
    # AdamW: decoupled decay, as the record lineage; with zero decay it is the baseline's Adam.
    adam = torch.optim.AdamW(adam_groups, betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps, fused=fused)
    optimizers = [muon, adam]
    for opt in optimizers:
        for group in opt.param_groups:
            group["base_lr"] = group["lr"]
    return optimizers


def learning_rates(cfg: TrainConfig) -> str:
    """The configured learning rates a diverged or stuck run is told to look at."""
    embed_lr = cfg.tied_embed_lr if cfg.model.tie_embeddings else cfg.embed_lr
    return (f"matrix_lr={cfg.matrix_lr:g}, scalar_lr={cfg.scalar_lr:g}, "
            f"{'tied_embed_lr' if cfg.model.tie_embeddings else 'embed_lr'}={embed_lr:g}")
