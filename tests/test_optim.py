"""Muon's orthogonalization and the baseline's schedules, against hand-computed values."""
from __future__ import annotations

import pytest
import torch

from pgolf.optim.muon import Muon, newton_schulz
from pgolf.optim.schedule import lr_multiplier, muon_momentum


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
