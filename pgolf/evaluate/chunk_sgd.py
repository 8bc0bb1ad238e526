"""The SGD both score-first TTT modes train with on chunks of tokens already scored (PR #461's
recipe): phased TTT's global SGD (pgolf/evaluate/lora_ttt.py) and chunked SGD TTT
(pgolf/evaluate/sgd_ttt.py). Momentum SGD at a cosine lr over chunks; each step sums its sequences'
gradients over ranks, weighted by their share of the step, and clips them. Which sequences make a
step, and how ranks share them, stays with each mode: R1 deals a chunk to ranks in contiguous
shares, one step per chunk, R0409 deals each step round-robin, several steps per chunk.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch

from pgolf import dist


@contextmanager
def sgd_training(model, params: list[torch.nn.Parameter], lr: float, momentum: float) -> Iterator[torch.optim.SGD]:
    """Only `params` take gradients while inside; afterwards none does and the model is in eval mode."""
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
        p.grad = torch.zeros_like(p)  # every rank reduces every gradient, also with no sequence of its own
    try:
        yield torch.optim.SGD(params, lr=lr, momentum=momentum)
    finally:
        for p in params:
            p.requires_grad_(False)
            p.grad = None
        model.eval()


def set_cosine_lr(optimizer: torch.optim.Optimizer, base_lr: float, chunk: int, n_chunks: int) -> None:
    for group in optimizer.param_groups:
        group["lr"] = base_lr * 0.5 * (1 + math.cos(math.pi * chunk / max(n_chunks - 1, 1)))


def sgd_step(model, optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter],
             pieces: Iterable[tuple[torch.Tensor, torch.Tensor, int]], step_rows: int, clip: float,
             device: torch.device) -> None:
    """One step on this rank's `pieces` (inputs, targets, the sequences they hold): each mean loss
    weighted by its sequences over `step_rows`, the step's sequences on all ranks, so that the sum
    over ranks is the step's mean loss."""
    optimizer.zero_grad(set_to_none=False)
    for x, y, rows in pieces:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model(x.to(device), y.to(device))
        (loss * rows / step_rows).backward()
    dist.average_gradients(params, mean=False)
    torch.nn.utils.clip_grad_norm_(params, clip)
    optimizer.step()
