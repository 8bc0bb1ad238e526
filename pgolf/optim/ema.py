"""Exponential moving average of every state tensor, kept in fp32 and loaded at the end of
training (R1: decay 0.9965, updated after every optimizer step).

The (average, live tensor) pairs are fixed once, as R1 fixes its `_ema_pairs`: a step is one
foreach multiply and one foreach add per (device, dtype) of the live tensors, not a walk of the
state dict with an fp32 copy of every tensor (issue 25). The live tensors are the model's own
parameters and buffers, so they must be updated in place (optimizers, load_state_dict) after the
EMA is made, never rebound; `.to()` the model before making it.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn


class EMA:
    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        live = model.state_dict(keep_vars=True)
        self.shadow = {k: v.detach().float().clone() for k, v in live.items()}
        # Same arithmetic as shadow.mul_(d).add_(v.float(), alpha=1-d) per tensor: a bf16 live
        # tensor (the embedding on CUDA) is promoted inside the add, exactly as .float() would.
        self.groups: dict[tuple[torch.device, torch.dtype], tuple[list[Tensor], list[Tensor]]] = {}
        self.copied: tuple[list[Tensor], list[Tensor]] = ([], [])
        for k, v in live.items():
            shadows, lives = self.groups.setdefault((v.device, v.dtype), ([], [])) if v.is_floating_point() else self.copied
            shadows.append(self.shadow[k])
            lives.append(v)

    @torch.no_grad()
    def update(self, model: nn.Module | None = None) -> None:
        """`model` is the one the EMA was made of; its tensors are already paired."""
        for shadows, lives in self.groups.values():
            torch._foreach_mul_(shadows, self.decay)
            torch._foreach_add_(shadows, lives, alpha=1.0 - self.decay)
        if self.copied[0]:
            torch._foreach_copy_(*self.copied)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        state = model.state_dict()
        model.load_state_dict({k: self.shadow[k].to(state[k].dtype) for k in state})

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": self.shadow}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """In place: the pairs keep pointing at these averages."""
        self.decay = state["decay"]
        if state["shadow"].keys() != self.shadow.keys():
            raise ValueError("the EMA state names other tensors than this model's")
        for k, v in state["shadow"].items():
            self.shadow[k].copy_(v)
