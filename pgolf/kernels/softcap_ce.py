"""Softcapped cross-entropy in one pass over the logits (R1's FUSED_CE, docs/lineage.md#fused-loss).

The eager loss upcasts the [tokens, vocab] logits to fp32, softcaps them into a second fp32 copy
and lets F.cross_entropy keep a third for its backward: at R1's 98,304 targets per rank and vocab
8,192 that is 9.7 GB of activations. Here the bf16 logits are read once forward and once backward,
in fp32 registers, and only they and one fp32 lse per row are kept.

Because z = cap*tanh(x/cap) lies in (-cap, cap), exp(z - cap) never overflows and, for caps up to
pgolf.kernels.MAX_FUSED_SOFTCAP, never underflows in fp32, so the log-sum-exp needs no running maximum:
lse = cap + log(sum).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from pgolf.kernels import check_fusable_softcap


@triton.jit
def _softcap(x, cap):
    # cap*tanh(x/cap), written with sigmoid: Triton has no tanh on every backend.
    return 2.0 * cap * tl.sigmoid(2.0 * x / cap) - cap


@triton.jit
def _forward_kernel(logits_ptr, targets_ptr, loss_ptr, lse_ptr, row_stride, n_cols, cap,
                    BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    row_start = logits_ptr + row * row_stride
    total = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        inside = cols < n_cols
        x = tl.load(row_start + cols, mask=inside, other=0.0).to(tl.float32)
        total += tl.where(inside, tl.exp(_softcap(x, cap) - cap), 0.0)
    lse = cap + tl.log(tl.sum(total, axis=0))
    target = tl.load(targets_ptr + row).to(tl.int64)
    target_logit = _softcap(tl.load(row_start + target).to(tl.float32), cap)
    tl.store(loss_ptr + row, lse - target_logit)
    tl.store(lse_ptr + row, lse)


@triton.jit
def _backward_kernel(logits_ptr, targets_ptr, lse_ptr, grad_loss_ptr, grad_ptr, row_stride, grad_row_stride,
                     n_cols, cap, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    row_start = logits_ptr + row * row_stride
    grad_start = grad_ptr + row * grad_row_stride
    lse = tl.load(lse_ptr + row)
    grad_loss = tl.load(grad_loss_ptr + row).to(tl.float32)
    target = tl.load(targets_ptr + row).to(tl.int64)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        inside = cols < n_cols
        x = tl.load(row_start + cols, mask=inside, other=0.0).to(tl.float32)
        z = _softcap(x, cap)
        probability = tl.exp(z - lse)
        dz = probability - tl.where(cols == target, 1.0, 0.0)
        squashed = z / cap
        grad = grad_loss * dz * (1.0 - squashed * squashed)  # d(cap*tanh(x/cap))/dx = 1 - tanh^2
        tl.store(grad_start + cols, grad.to(grad_ptr.dtype.element_ty), mask=inside)


def _block(n_cols: int) -> int:
    return min(triton.next_power_of_2(n_cols), 4096)


def _warps(block: int) -> int:
    return 8 if block >= 2048 else 4


# The launches are custom ops with fake implementations (as R1's fused loss): torch.compile traces
# them whole in a fullgraph graph, and FakeTensor estimates their memory (bench/step_proxies.py).
@torch.library.custom_op("pgolf::softcap_ce_forward", mutates_args=())
def softcap_ce_forward(logits: Tensor, targets: Tensor, cap: float) -> tuple[Tensor, Tensor]:
    """(loss per row, lse per row), fp32; logits [rows, vocab] with unit column stride."""
    rows, cols = logits.shape
    losses = torch.empty(rows, dtype=torch.float32, device=logits.device)
    lse = torch.empty(rows, dtype=torch.float32, device=logits.device)
    block = _block(cols)
    _forward_kernel[(rows,)](logits, targets, losses, lse, logits.stride(0), cols, cap,
                             BLOCK=block, num_warps=_warps(block))
    return losses, lse


@softcap_ce_forward.register_fake
def _(logits, targets, cap):
    return logits.new_empty(logits.size(0), dtype=torch.float32), logits.new_empty(logits.size(0), dtype=torch.float32)


@torch.library.custom_op("pgolf::softcap_ce_backward", mutates_args=())
def softcap_ce_backward(logits: Tensor, targets: Tensor, lse: Tensor, grad_losses: Tensor, cap: float) -> Tensor:
    rows, cols = logits.shape
    grad = torch.empty_like(logits)
    block = _block(cols)
    _backward_kernel[(rows,)](logits, targets, lse, grad_losses, grad, logits.stride(0), grad.stride(0), cols, cap,
                              BLOCK=block, num_warps=_warps(block))
    return grad


@softcap_ce_backward.register_fake
def _(logits, targets, lse, grad_losses, cap):
    return torch.empty_like(logits)


class SoftcapCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor, cap: float) -> Tensor:
        logits = logits if logits.stride(-1) == 1 else logits.contiguous()
        targets = targets.contiguous()
        losses, lse = softcap_ce_forward(logits, targets, cap)
        ctx.save_for_backward(logits, targets, lse)
        ctx.cap = cap
        return losses

    @staticmethod
    def backward(ctx, grad_losses: Tensor):
        logits, targets, lse = ctx.saved_tensors
        return softcap_ce_backward(logits, targets, lse, grad_losses.contiguous(), ctx.cap), None, None


def softcap_cross_entropy(logits: Tensor, targets: Tensor, cap: float) -> Tensor:
    """Mean over rows of cross_entropy(cap*tanh(logits/cap), targets), logits [rows, vocab] pre-softcap."""
    check_fusable_softcap(cap)
    return SoftcapCrossEntropy.apply(logits, targets, float(cap)).mean()
