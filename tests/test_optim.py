"""Muon's orthogonalization and the baseline's schedules, against hand-computed values."""
from __future__ import annotations

import pytest
import torch

from pgolf.optim.ema import EMA
from pgolf.optim.swa import SWA
from pgolf.optim.muon import POLAR_EXPRESS_NS5, Muon, newton_schulz
from pgolf.optim.schedule import lr_multiplier, muon_momentum, training_fraction, warmdown_multiplier


@pytest.mark.parametrize("shape", [(64, 64), (32, 96), (96, 32)])
def test_newton_schulz_pushes_singular_values_near_one(shape):
    torch.manual_seed(0)
    k = min(shape)
    u = torch.linalg.qr(torch.randn(shape[0], k))[0]
    v = torch.linalg.qr(torch.randn(shape[1], k))[0]
    g = u @ torch.diag(torch.linspace(0.1, 1.0, k)) @ v.T  # condition number 10
    s = torch.linalg.svdvals(newton_schulz(g, steps=5))
    assert s.min() > 0.5 and s.max() < 1.3
    # the polar factor's direction is kept
    assert torch.nn.functional.cosine_similarity(newton_schulz(g).flatten(), (u @ v.T).flatten(), dim=0) > 0.95


def test_muon_step_scales_tall_matrices():
    p = torch.nn.Parameter(torch.zeros(8, 2))
    p.grad = torch.randn(8, 2)
    Muon([p], lr=0.1, momentum=0.0, nesterov=False).step()
    expected = -0.1 * 2.0 * newton_schulz(p.grad)  # sqrt(max(1, 8/2)) = 2
    assert torch.allclose(p.data, expected, atol=1e-6)


def test_lr_multiplier_by_iterations():
    # 100 iterations, warmdown 20: constant to step 80, then (100 - step) / 20
    values = [lr_multiplier(s, 0.0, 100, 20, None) for s in (0, 79, 80, 90, 99)]
    assert values == pytest.approx([1.0, 1.0, 1.0, 0.5, 0.05])
    assert lr_multiplier(5, 0.0, 100, 0, None) == 1.0


def test_lr_multiplier_by_wallclock():
    # 10 ms/step so far, warmdown 100 steps = 1000 ms; cap 5000 ms
    assert lr_multiplier(100, 1000.0, 10**9, 100, 5000.0) == 1.0  # 4000 ms left > 1000
    assert lr_multiplier(450, 4500.0, 10**9, 100, 5000.0) == pytest.approx(0.5)
    assert lr_multiplier(500, 5000.0, 10**9, 100, 5000.0) == 0.0


def test_momentum_warmup():
    assert muon_momentum(0, 0.85, 0.95, 500) == pytest.approx(0.85)
    assert muon_momentum(250, 0.85, 0.95, 500) == pytest.approx(0.90)
    assert muon_momentum(10_000, 0.85, 0.95, 500) == pytest.approx(0.95)
    assert muon_momentum(3, 0.85, 0.95, 0) == 0.95


def test_polar_express_orthogonalizes_tighter_than_stock():
    torch.manual_seed(3)
    k = 64
    u = torch.linalg.qr(torch.randn(k, k))[0]
    v = torch.linalg.qr(torch.randn(k, k))[0]
    g = u @ torch.diag(torch.linspace(0.05, 1.0, k)) @ v.T
    stock = torch.linalg.svdvals(newton_schulz(g))
    polar = torch.linalg.svdvals(newton_schulz(g, coefficients=POLAR_EXPRESS_NS5))
    assert (polar - 1).abs().max() < (stock - 1).abs().max()
    assert polar.min() > 0.6 and polar.max() < 1.25


def test_muon_bf16_is_r1s_precision():
    """muon_bf16: R1's Muon step, written out here: gradient and momentum buffer in bf16, Nesterov,
    row norms taken in fp32 and divided in bf16, Polar-Express Newton-Schulz in bf16 (R1 transposes
    a tall matrix, then normalizes), the update scaled by sqrt(rows/cols) into the fp32 weights."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(16, 8))
    ref = p.detach().clone()
    opt = Muon([p], lr=0.1, momentum=0.9, row_normalize=True, coefficients="polar_express", bf16=True)
    buf = torch.zeros(16, 8, dtype=torch.bfloat16)
    for _ in range(3):
        g = torch.randn(16, 8)
        p.grad = g.clone()
        opt.step()
        gb = g.bfloat16()
        buf.mul_(0.9).add_(gb)
        u = gb.add(buf, alpha=0.9)
        u = u / u.float().norm(dim=-1, keepdim=True).clamp_min(1e-7).to(u.dtype)
        x = u.bfloat16().mT
        x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)
        for a, b, c in POLAR_EXPRESS_NS5:
            gram = x @ x.mT
            x = a * x + (b * gram + c * (gram @ gram)) @ x
        ref.add_(x.mT, alpha=-0.1 * 2**0.5)
        assert opt.state[p]["momentum_buffer"].dtype == torch.bfloat16
        assert torch.allclose(p.data, ref, atol=1e-6, rtol=0)
    fp32 = torch.nn.Parameter(ref.clone())
    fp32.grad = torch.randn(16, 8)
    bf = torch.nn.Parameter(ref.clone())
    bf.grad = fp32.grad.clone()
    Muon([fp32], lr=0.1, momentum=0.9, row_normalize=True, coefficients="polar_express").step()
    Muon([bf], lr=0.1, momentum=0.9, row_normalize=True, coefficients="polar_express", bf16=True).step()
    assert not torch.allclose(fp32.data, bf.data, atol=1e-5)  # on CPU the default is fp32 throughout


def test_row_normalization_and_decoupled_weight_decay():
    p = torch.nn.Parameter(torch.ones(4, 4))
    p.grad = torch.diag(torch.tensor([100.0, 1.0, 1.0, 1.0]))
    opt = Muon([p], lr=0.1, momentum=0.0, nesterov=False, row_normalize=True, weight_decay=0.5)
    opt.step()
    # rows normalized first -> identity -> orthogonal already: update = NS(I); decay shrinks p by 1 - 0.1*0.5
    expected = 0.95 * torch.ones(4, 4) - 0.1 * newton_schulz(torch.eye(4))
    assert torch.allclose(p.data, expected, atol=1e-5)


def test_record_warmdown_by_fraction_with_floor():
    # R1: warmdown_frac 0.85, min_lr 0.1 -> constant for the first 15% of the wallclock
    assert warmdown_multiplier(0.10, 0.85, 0.1) == 1.0
    assert warmdown_multiplier(0.15, 0.85, 0.1) == pytest.approx(1.0)
    assert warmdown_multiplier(0.575, 0.85, 0.1) == pytest.approx(0.5)
    assert warmdown_multiplier(0.99, 0.85, 0.1) == pytest.approx(0.1)
    assert warmdown_multiplier(0.5, 0.0, 0.1) == 1.0
    assert training_fraction(10, 299_750.0, 100, 599_500.0) == pytest.approx(0.5)
    assert training_fraction(25, 0.0, 100, None) == 0.25


def test_ema_tracks_and_replaces_weights():
    model = torch.nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema = EMA(model, decay=0.5)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model)
    ema.update(model)
    ema.copy_to(model)
    assert torch.allclose(model.weight, torch.full((2, 2), 0.75))


def test_swa_is_the_running_mean_of_its_snapshots():
    model = torch.nn.Linear(2, 2, bias=False)
    swa = SWA(model)
    for value in (1.0, 2.0, 6.0):
        with torch.no_grad():
            model.weight.fill_(value)
        swa.add(model)
    swa.copy_to(model)
    assert swa.count == 3 and torch.allclose(model.weight, torch.full((2, 2), 3.0))


def per_matrix_muon_step(params, grads, bufs, group, banked: bool):
    """The optimizers' step as written before issue 25: every matrix on its own (Muon), or each
    bank rebuilt from zeros and one copy per matrix and applied matrix by matrix (ShardedMuon)."""
    from pgolf.optim.muon import COEFFICIENTS as coefficients, newton_schulz as ns

    def update(grad, buf):
        bf16 = group["bf16"]
        grad = grad.bfloat16() if bf16 else grad
        buf.mul_(group["momentum"]).add_(grad)
        g = grad.add(buf, alpha=group["momentum"])
        if group["row_normalize"]:
            norms = (g.float() if bf16 else g).norm(dim=-1, keepdim=True).clamp_min(1e-7)
            g = g / norms.to(g.dtype)
        g = ns(g, 5, coefficients[group["coefficients"]], 1e-7, bf16).float()
        return g * max(1.0, g.size(-2) / g.size(-1)) ** 0.5

    def apply(p, u):
        if group["weight_decay"]:
            p.mul_(1.0 - group["lr"] * group["weight_decay"])
        p.add_(u.view_as(p).to(p.dtype), alpha=-group["lr"])

    if not banked:
        for p, grad, buf in zip(params, grads, bufs):
            flat = torch.zeros(p.numel())
            flat[:] = update(grad, buf).flatten()
            apply(p, flat)
        return
    stacked = torch.zeros(len(params), *params[0].shape, dtype=torch.bfloat16 if group["bf16"] else torch.float32)
    for i, grad in enumerate(grads):
        stacked[i] = grad.to(stacked.dtype)
    full = update(stacked, bufs[0])
    for i, p in enumerate(params):
        apply(p, full[i])


@pytest.mark.parametrize("banked", [False, True])
@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("shape", [(8, 8), (16, 8), (8, 16)])
def test_muon_steps_are_bit_identical_to_the_per_matrix_steps(banked, bf16, shape):
    """Issue 25: Muon applies each update in place without a flat buffer, ShardedMuon stacks a
    bank with one copy and applies it with foreach ops; neither may move a bit of the result."""
    from pgolf.optim.muon import ShardedMuon

    torch.manual_seed(0)
    group = dict(lr=0.03, momentum=0.95, row_normalize=True, coefficients="polar_express", weight_decay=0.1,
                 bf16=bf16)
    params = [torch.nn.Parameter(torch.randn(shape)) for _ in range(3)]
    ref = [p.detach().clone() for p in params]
    cls = ShardedMuon if banked else Muon
    opt = cls(params, lr=group["lr"], momentum=group["momentum"], row_normalize=True, coefficients="polar_express",
              weight_decay=0.1, bf16=bf16)
    dtype = torch.bfloat16 if bf16 else torch.float32
    bufs = [torch.zeros(3, *shape, dtype=dtype)] if banked else [torch.zeros(shape, dtype=dtype) for _ in params]
    for step in range(4):
        grads = [torch.randn(shape) for _ in params]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.param_groups[0]["lr"] = group["lr"] = 0.03 * (1 - step / 8)
        opt.step()
        per_matrix_muon_step(ref, grads, bufs, group, banked)
        for p, r in zip(params, ref):
            assert torch.equal(p.data, r), f"step {step}"


def test_ema_update_is_bit_identical_to_the_state_dict_walk():
    """Issue 25: the EMA pairs its averages with the live tensors once and updates them with
    foreach ops; the averages are exactly those of shadow.mul_(d).add_(v.float(), alpha=1-d)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.LayerNorm(7), torch.nn.Linear(7, 3, bias=False))
    model[2].to(torch.bfloat16)  # a bf16 live tensor, as the embedding on CUDA
    decay = 0.9965
    ema = EMA(model, decay)
    ref = {k: v.detach().float().clone() for k, v in model.state_dict().items()}
    for _ in range(5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update(model)
        for k, v in model.state_dict().items():
            ref[k].mul_(decay).add_(v.detach().float(), alpha=1.0 - decay)
    assert all(torch.equal(ema.shadow[k], ref[k]) for k in ref)
    saved = {k: v.clone() for k, v in ema.state_dict()["shadow"].items()}
    ema.update(model)
    ema.load_state_dict({"decay": decay, "shadow": saved})  # resume: in place, the pairs still hold
    ema.update(model)
    for k, v in model.state_dict().items():
        ref[k].mul_(decay).add_(v.detach().float(), alpha=1.0 - decay)
    assert all(torch.equal(ema.shadow[k], ref[k]) for k in ref)
