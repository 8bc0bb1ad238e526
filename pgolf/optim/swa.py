"""Stochastic weight averaging as the #549-era stacks run it: once the lr scale falls below a
threshold, add the weights to a running mean every `every` steps. Those stacks accumulated it and
then loaded EMA instead; `apply` decides which one the model ends with."""
from __future__ import annotations

import torch
from torch import nn


class SWA:
    def __init__(self, model: nn.Module):
        self.count = 0
        self.mean = {k: torch.zeros_like(v, dtype=torch.float32) for k, v in model.state_dict().items()}

    @torch.no_grad()
    def add(self, model: nn.Module) -> None:
        self.count += 1
        for k, v in model.state_dict().items():
            if v.is_floating_point():
                self.mean[k].add_(v.detach().float() - self.mean[k], alpha=1.0 / self.count)
            else:
                self.mean[k].copy_(v)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        if self.count == 0:
            return
        state = model.state_dict()
        model.load_state_dict({k: self.mean[k].to(state[k].dtype) for k in state})

    def state_dict(self) -> dict:
        return {"count": self.count, "mean": self.mean}

    def load_state_dict(self, state: dict) -> None:
        self.count = state["count"]
        self.mean = {k: v.clone() for k, v in state["mean"].items()}
