"""Muon: momentum SGD whose 2-D updates are orthogonalized by a Newton-Schulz iteration.

From Keller Jordan's modded-nanogpt, as the challenge's baseline uses it (docs/lineage.md#muon, #baseline-config):
Nesterov momentum, 5 quintic Newton-Schulz steps, update scaled by sqrt(max(1, rows/cols)). The
record lineage adds Polar-Express per-iteration coefficients (arXiv:2505.16932), MuonEq-R (each
row of the update normalized before orthogonalizing, R0405) and decoupled weight decay
p *= 1 - lr * wd with the scheduled lr. With several ranks the matrices are split round-robin:
each rank orthogonalizes its share and one all-reduce assembles every update.
"""
from __future__ import annotations

import functools

import torch
import torch.distributed as dist
from torch import Tensor

from pgolf.train.config import MUON_COEFFICIENTS

STOCK_NS5 = ((3.4445, -4.7750, 2.0315),) * 5
POLAR_EXPRESS_NS5 = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
COEFFICIENTS = {"stock": STOCK_NS5, "polar_express": POLAR_EXPRESS_NS5}
assert tuple(COEFFICIENTS) == MUON_COEFFICIENTS, "train.muon_coefficients validates against these names"


def newton_schulz(grad: Tensor, steps: int = 5, coefficients=STOCK_NS5, eps: float = 1e-7,
                  bf16: bool = False) -> Tensor:
    """Approximately orthogonalize `grad` [..., rows, cols] (singular values pushed towards 1);
    leading dims are a batch of matrices, each normalized on its own. In bf16 on CUDA or when
    asked (`bf16`: R1's arithmetic on every device), else in fp32 (CPU bf16 matmuls are slow)."""
    dtype = torch.bfloat16 if grad.is_cuda or bf16 else torch.float32
    x = grad if grad.dtype == dtype else grad.to(dtype)
    x = x / (torch.linalg.matrix_norm(x, keepdim=True) + eps)
    transposed = x.size(-2) > x.size(-1)
    if transposed:
        x = x.mT
    for i in range(steps):
        a, b, c = coefficients[min(i, len(coefficients) - 1)]
        gram = x @ x.mT
        # In bf16 the grouping shows (up to ~7% of an entry): the baseline computes (c * A) @ A,
        # R1, whose precision `bf16` asks for, c * (A @ A).
        quartic = c * (gram @ gram) if bf16 else c * gram @ gram
        x = a * x + (b * gram + quartic) @ x
    return x.mT if transposed else x


@functools.cache
def compiled_newton_schulz():
    """newton_schulz under torch.compile, as the baseline and R1 run it: its small matmuls and
    elementwise steps are launch-bound eager (one graph per matrix shape)."""
    return torch.compile(newton_schulz, dynamic=False, fullgraph=True)


def _rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def orthogonal_update(grad: Tensor, buf: Tensor, group: dict) -> Tensor:
    """Momentum (in place on `buf`), optional MuonEq-R row normalization, Newton-Schulz, and the
    sqrt(max(1, rows/cols)) scale; works on one matrix or a bank [n, rows, cols]. With
    group["bf16"] (R1's precision) the gradient, `buf` (bf16, see state_dtype) and the row
    normalization are bf16 too, the row norms taken in fp32 as R1 takes them. Returns fp32."""
    bf16 = group.get("bf16", False)
    if bf16 and grad.dtype != torch.bfloat16:
        grad = grad.bfloat16()
    buf.mul_(group["momentum"]).add_(grad)
    g = grad.add(buf, alpha=group["momentum"]) if group["nesterov"] else buf
    if group["row_normalize"]:
        norms = g.float().norm(dim=-1, keepdim=True).clamp_min(1e-7) if bf16 else g.norm(dim=-1, keepdim=True).clamp_min(1e-7)
        g = g / norms.to(g.dtype)
    orthogonalize = compiled_newton_schulz() if group.get("compiled") and g.is_cuda else newton_schulz
    g = orthogonalize(g, group["backend_steps"], COEFFICIENTS[group["coefficients"]], 1e-7, bf16)
    if g.dtype != torch.float32:
        g = g.float()
    scale = max(1.0, g.size(-2) / g.size(-1)) ** 0.5
    # x 1.0 is exact: skipping it changes no bit and saves a kernel per square or wide matrix
    return g * scale if scale != 1.0 else g


def apply_update(p: Tensor, update: Tensor, group: dict) -> None:
    if group["weight_decay"]:
        p.mul_(1.0 - group["lr"] * group["weight_decay"])
    update = update.view_as(p)
    p.add_(update if update.dtype == p.dtype else update.to(p.dtype), alpha=-group["lr"])


def apply_bank_update(params: list[Tensor], updates: Tensor, group: dict) -> None:
    """apply_update for every matrix of a bank at once: the same arithmetic per element (a foreach
    op runs the per-tensor op on each pair), one launch per bank instead of one per matrix."""
    if group["weight_decay"]:
        torch._foreach_mul_(params, 1.0 - group["lr"] * group["weight_decay"])
    if updates.dtype != params[0].dtype:
        updates = updates.to(params[0].dtype)
    torch._foreach_add_(params, updates[:len(params)].unbind(0), alpha=-group["lr"])


def state_dtype(group: dict, grad: Tensor) -> torch.dtype:
    """The momentum buffer's dtype: bf16 in R1's precision, else the gradient's."""
    return torch.bfloat16 if group.get("bf16", False) else grad.dtype


class Muon(torch.optim.Optimizer):
    def __init__(self, params, lr: float, momentum: float, backend_steps: int = 5, nesterov: bool = True,
                 coefficients: str = "stock", row_normalize: bool = False, weight_decay: float = 0.0,
                 compiled: bool = False, bf16: bool = False):
        if coefficients not in COEFFICIENTS:
            raise ValueError(f"unknown Newton-Schulz coefficients {coefficients!r}; use {sorted(COEFFICIENTS)}")
        super().__init__(params, dict(lr=lr, momentum=momentum, backend_steps=backend_steps, nesterov=nesterov,
                                      coefficients=coefficients, row_normalize=row_normalize,
                                      weight_decay=weight_decay, compiled=compiled, bf16=bf16))

    def _momentum(self, p: Tensor, grad: Tensor, group: dict) -> Tensor:
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(grad, dtype=state_dtype(group, grad))
        return state["momentum_buffer"]

    @torch.no_grad()
    def step(self, closure=None):
        rank, world = _rank_and_world()
        for group in self.param_groups:
            params = group["params"]
            if not params:
                continue
            if world == 1:
                # Nothing to assemble across ranks: each update goes straight into its matrix.
                for p in params:
                    if p.grad is not None:
                        apply_update(p, orthogonal_update(p.grad, self._momentum(p, p.grad, group), group), group)
                    elif group["weight_decay"]:
                        apply_update(p, torch.zeros_like(p, dtype=torch.float32), group)
                continue
            total = sum(p.numel() for p in params)
            updates = torch.zeros(total, device=params[0].device, dtype=torch.float32)
            offset = 0
            for i, p in enumerate(params):
                if i % world == rank and p.grad is not None:
                    updates[offset:offset + p.numel()] = orthogonal_update(p.grad, self._momentum(p, p.grad, group),
                                                                           group).flatten()
                offset += p.numel()
            dist.all_reduce(updates, op=dist.ReduceOp.SUM)
            offset = 0
            for p in params:
                apply_update(p, updates[offset:offset + p.numel()], group)
                offset += p.numel()


class ShardedMuon(Muon):
    """R1's "parallel Muon" (docs/lineage.md#muon): matrices of one shape form a bank; its gradients are
    reduce-scattered so each rank holds the average of its share, the rank keeps momentum and runs
    Newton-Schulz only for that share (batched), and an all-gather returns every update. Banks go
    largest first. The optimizer does its own gradient averaging: leave its parameters out of any
    all-reduce.

    A bank is fixed at the first step, with a buffer its gradients are stacked into (one copy per
    bank, in the reduce-scatter's dtype, zero rows padding it to a multiple of the ranks) and the
    update applied to its matrices with foreach ops: per step a few launches per bank, none per
    matrix, as R1's banked parameters get (issue 25)."""

    def _banks(self, group_index: int, world: int) -> list[tuple[list[Tensor], Tensor]]:
        cache = self.__dict__.setdefault("_bank_cache", {})
        params = self.param_groups[group_index]["params"]
        key = (group_index, world, tuple(id(p) for p in params))
        if key not in cache:
            group = self.param_groups[group_index]
            by_shape: dict[tuple[int, ...], list[Tensor]] = {}
            for p in params:
                by_shape.setdefault(tuple(p.shape), []).append(p)
            # R1 reduce-scatters bf16 gradients when its precision is asked for
            dtype = torch.bfloat16 if group.get("bf16", False) else torch.float32
            banks = []
            for shape, members in sorted(by_shape.items(), key=lambda kv: -len(kv[1]) * kv[1][0].numel()):
                per_rank = -(-len(members) // world)
                stacked = torch.zeros(per_rank * world, *shape, device=members[0].device, dtype=dtype)
                banks.append((members, stacked))
            cache.clear()
            cache[key] = banks
        return cache[key]

    @torch.no_grad()
    def step(self, closure=None):
        rank, world = _rank_and_world()
        for index, group in enumerate(self.param_groups):
            for params, stacked in self._banks(index, world):
                grads = [p.grad for p in params]
                if any(g is None for g in grads):  # a matrix that took no part in the loss updates by zero
                    grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
                torch.stack(grads, out=stacked[:len(params)])
                if world > 1:
                    shard = torch.empty(stacked.size(0) // world, *stacked.shape[1:], device=stacked.device,
                                        dtype=stacked.dtype)
                    dist.reduce_scatter_tensor(shard, stacked)
                    shard /= world
                else:
                    shard = stacked
                state = self.state[params[0]]
                if "bank_momentum" not in state:
                    state["bank_momentum"] = torch.zeros_like(shard)
                g = orthogonal_update(shard, state["bank_momentum"], group)
                if world > 1:
                    full = torch.empty(stacked.shape, device=stacked.device, dtype=g.dtype)
                    dist.all_gather_into_tensor(full, g.contiguous())
                else:
                    full = g
                apply_bank_update(params, full, group)
