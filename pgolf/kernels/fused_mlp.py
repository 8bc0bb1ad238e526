"""The MLP's up-projection with its activation in the GEMM epilogue (R1's fused MLP, docs/lineage.md#architecture).

Eager, h = x W_fc^T goes to memory, is read back by leaky_relu, whose output is read back by
square, and autograd keeps h, leaky(h) and the square for the backward: three [tokens, hidden]
tensors written and read again. Here the up-projection's epilogue writes h and act(h) once, and
in the backward the GEMM that produces dL/d act(h) (= dL/dy W_proj) multiplies by act'(h) before
it stores, so dL/dh never exists unfused. The other three GEMMs of the backward stay cuBLAS.

act(h) = leaky_relu(h, slope)^2, act'(h) = 2h for h > 0 else 2 slope^2 h; slope 0 is relu^2.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from pgolf.kernels import interpreting

_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=3, num_warps=8),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=3, num_warps=8),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=4, num_warps=4),
]


@triton.jit
def _matmul_activation_kernel(a_ptr, b_ptr, out_ptr, h_ptr, M, N, K,
                              stride_am, stride_ak, stride_bk, stride_bn, stride_om, stride_on, slope,
                              EPILOGUE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                              BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """acc = A @ B. EPILOGUE 0 (forward): h = acc -> h_ptr, act(h) -> out_ptr.
    EPILOGUE 1 (backward): out = acc * act'(h), h read from h_ptr."""
    pid = tl.program_id(0)
    # Grouped tile order: GROUP_M row tiles share each column tile while it is in L2.
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    tiles_in_group = GROUP_M * tiles_n
    first_m = (pid // tiles_in_group) * GROUP_M
    group_rows = min(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % tiles_in_group) % group_rows
    pid_n = (pid % tiles_in_group) // group_rows

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    depth = tl.arange(0, BLOCK_K)
    a_tile = a_ptr + rows[:, None].to(tl.int64) * stride_am + depth[None, :] * stride_ak
    b_tile = b_ptr + depth[:, None] * stride_bk + cols[None, :].to(tl.int64) * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        left = K - k * BLOCK_K
        a = tl.load(a_tile, mask=(rows[:, None] < M) & (depth[None, :] < left), other=0.0)
        b = tl.load(b_tile, mask=(depth[:, None] < left) & (cols[None, :] < N), other=0.0)
        acc = tl.dot(a, b, acc)
        a_tile += BLOCK_K * stride_ak
        b_tile += BLOCK_K * stride_bk

    inside = (rows[:, None] < M) & (cols[None, :] < N)
    offsets = rows[:, None].to(tl.int64) * stride_om + cols[None, :] * stride_on
    if EPILOGUE == 0:
        # act() reads h as it is stored (rounded to the activation dtype), as the eager ops would.
        h = acc.to(h_ptr.dtype.element_ty)
        tl.store(h_ptr + offsets, h, mask=inside)
        hf = h.to(tl.float32)
        leaky = tl.where(hf > 0, hf, slope * hf)
        tl.store(out_ptr + offsets, (leaky * leaky).to(out_ptr.dtype.element_ty), mask=inside)
    else:
        hf = tl.load(h_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
        derivative = tl.where(hf > 0, 2.0 * hf, 2.0 * slope * slope * hf)
        tl.store(out_ptr + offsets, (acc * derivative).to(out_ptr.dtype.element_ty), mask=inside)


# Autotuning times configs on a GPU; the interpreter has none, so it runs the first config as given.
_TUNED = None if interpreting() else triton.autotune(configs=_CONFIGS, key=["M", "N", "K", "EPILOGUE"])(
    _matmul_activation_kernel)


def _launch(a: Tensor, b: Tensor, out: Tensor, h: Tensor, slope: float, epilogue: int) -> None:
    M, K = a.shape
    N = b.shape[1]

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    args = (a, b, out, h, M, N, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1),
            slope)
    if _TUNED is None:
        config = _CONFIGS[0]
        _matmul_activation_kernel[grid(config.kwargs)](*args, EPILOGUE=epilogue, **config.kwargs)
    else:
        _TUNED[grid](*args, EPILOGUE=epilogue)


# The launches are custom ops with fake implementations: torch.compile traces them whole in a
# fullgraph graph, and FakeTensor estimates their memory (bench/step_proxies.py).
@torch.library.custom_op("pgolf::mlp_up_activation", mutates_args=())
def mlp_up_activation(x: Tensor, w_fc: Tensor, slope: float) -> tuple[Tensor, Tensor]:
    """(h = x W_fc^T, act(h)), both [tokens, hidden] in x's dtype; x contiguous."""
    h = torch.empty(x.shape[0], w_fc.shape[0], dtype=x.dtype, device=x.device)
    activated = torch.empty_like(h)
    _launch(x, w_fc.t(), activated, h, slope, epilogue=0)
    return h, activated


@mlp_up_activation.register_fake
def _(x, w_fc, slope):
    h = x.new_empty(x.shape[0], w_fc.shape[0])
    return h, torch.empty_like(h)


@torch.library.custom_op("pgolf::mlp_activation_grad", mutates_args=())
def mlp_activation_grad(grad_y: Tensor, w_proj: Tensor, h: Tensor, slope: float) -> Tensor:
    """dL/dh = (dL/dy W_proj) * act'(h), grad_y contiguous."""
    grad_h = torch.empty_like(h)
    _launch(grad_y, w_proj, grad_h, h, slope, epilogue=1)
    return grad_h


@mlp_activation_grad.register_fake
def _(grad_y, w_proj, h, slope):
    return torch.empty_like(h)


class FusedMLP(torch.autograd.Function):
    """y = act(x W_fc^T) W_proj^T for x [tokens, dim], W_fc [hidden, dim], W_proj [dim, hidden]."""

    @staticmethod
    def forward(ctx, x: Tensor, w_fc: Tensor, w_proj: Tensor, slope: float) -> Tensor:
        x = x.contiguous()
        h, activated = mlp_up_activation(x, w_fc, slope)
        ctx.save_for_backward(x, w_fc, w_proj, h, activated)
        ctx.slope = slope
        return activated @ w_proj.t()

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        x, w_fc, w_proj, h, activated = ctx.saved_tensors
        grad_y = grad_y.contiguous()
        grad_w_proj = grad_y.t() @ activated
        grad_h = mlp_activation_grad(grad_y, w_proj, h, ctx.slope)
        grad_w_fc = grad_h.t() @ x
        grad_x = grad_h @ w_fc
        return grad_x, grad_w_fc, grad_w_proj, None


def fused_mlp(x: Tensor, w_fc: Tensor, w_proj: Tensor, slope: float) -> Tensor:
    """act(x @ w_fc.T) @ w_proj.T over the last dim of x; all three in one dtype."""
    if not (x.dtype == w_fc.dtype == w_proj.dtype):
        raise TypeError(f"fused_mlp needs one dtype, got x {x.dtype}, w_fc {w_fc.dtype}, w_proj {w_proj.dtype}")
    shape = x.shape
    y = FusedMLP.apply(x.reshape(-1, shape[-1]), w_fc, w_proj, float(slope))
    return y.reshape(*shape[:-1], y.shape[-1])
