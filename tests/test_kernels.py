"""The fused Triton kernels (pgolf.kernels) against the eager math they replace, run in Triton's
interpreter on CPU (conftest sets TRITON_INTERPRET when there is no GPU)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")  # a dev dependency on Linux; no wheels elsewhere

from pgolf import kernels  # noqa: E402
from pgolf.kernels.mlp import fused_mlp  # noqa: E402
from pgolf.kernels.softcap_ce import softcap_cross_entropy  # noqa: E402
from pgolf.model.config import ModelConfig  # noqa: E402
from pgolf.model.gpt import GPT  # noqa: E402
from pgolf.model.layers import CastedLinear  # noqa: E402
from tests.conftest import TINY_MODEL  # noqa: E402


def eager_softcap_ce(logits, targets, cap):
    return F.cross_entropy(cap * torch.tanh(logits.float() / cap), targets)


def test_the_kernels_run_here():
    assert kernels.usable(torch.device("cuda" if torch.cuda.is_available() else "cpu"))


@pytest.mark.parametrize("vocab", [1000, 5000])  # one block; two blocks with a ragged tail
def test_softcap_cross_entropy_equals_the_eager_loss_and_gradient(vocab):
    torch.manual_seed(0)
    logits = (torch.randn(9, vocab) * 25).requires_grad_()  # far into the cap's curve
    targets = torch.randint(0, vocab, (9,))
    targets[0] = vocab - 1  # the last column, past the last full block
    fused = softcap_cross_entropy(logits, targets, 30.0)
    (fused_grad,) = torch.autograd.grad(fused, logits)
    eager = eager_softcap_ce(logits, targets, 30.0)
    (eager_grad,) = torch.autograd.grad(eager, logits)
    torch.testing.assert_close(fused, eager, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fused_grad, eager_grad, rtol=1e-5, atol=1e-9)


def test_softcap_cross_entropy_keeps_bf16_logits_bf16():
    torch.manual_seed(1)
    logits = (torch.randn(6, 300) * 10).to(torch.bfloat16).requires_grad_()
    targets = torch.randint(0, 300, (6,))
    fused = softcap_cross_entropy(logits, targets, 30.0)
    (grad,) = torch.autograd.grad(fused, logits)
    assert fused.dtype == torch.float32 and grad.dtype == torch.bfloat16
    eager = eager_softcap_ce(logits, targets, 30.0)
    (eager_grad,) = torch.autograd.grad(eager, logits)
    torch.testing.assert_close(fused, eager, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad, eager_grad.to(torch.bfloat16), rtol=2e-2, atol=1e-5)


def test_softcap_cross_entropy_refuses_caps_it_cannot_sum_exactly():
    with pytest.raises(ValueError, match="logit_softcap"):
        softcap_cross_entropy(torch.zeros(2, 8), torch.zeros(2, dtype=torch.long), 60.0)


@pytest.mark.parametrize("slope", [0.5, 0.0])  # LeakyReLU(0.5)^2 and relu^2
def test_fused_mlp_equals_the_eager_mlp_forward_and_backward(slope):
    torch.manual_seed(2)
    # Ragged in every dim against the 128x128x64 tiles: 2 row tiles, 3 column tiles, 3 K steps.
    x = torch.randn(200, 150, requires_grad=True)
    w_fc = (torch.randn(300, 150) / 12).requires_grad_()
    w_proj = (torch.randn(150, 300) / 17).requires_grad_()
    upstream = torch.randn(200, 150)
    y = fused_mlp(x, w_fc, w_proj, slope)
    fused_grads = torch.autograd.grad(y, (x, w_fc, w_proj), upstream)
    eager = F.linear(F.leaky_relu(F.linear(x, w_fc), slope).square(), w_proj)
    eager_grads = torch.autograd.grad(eager, (x, w_fc, w_proj), upstream)
    torch.testing.assert_close(y, eager, rtol=1e-5, atol=1e-5)
    for fused_grad, eager_grad in zip(fused_grads, eager_grads):
        torch.testing.assert_close(fused_grad, eager_grad, rtol=1e-4, atol=1e-4)


def test_fused_mlp_needs_one_dtype():
    with pytest.raises(TypeError, match="one dtype"):
        fused_mlp(torch.zeros(2, 4), torch.zeros(8, 4, dtype=torch.bfloat16), torch.zeros(4, 8), 0.5)


def model_pair(**extra):
    cfg = ModelConfig(**{**TINY_MODEL, "mlp_activation": "leaky_relu2", **extra})
    torch.manual_seed(3)
    eager = GPT(cfg)
    for p in eager.parameters():  # zero-init projections would hide the MLP's backward
        p.data.normal_(0, 0.2)
    fused = GPT(cfg)
    fused.load_state_dict(eager.state_dict())
    fused.set_fused_kernels(cross_entropy=True, mlp=True)
    return eager, fused


@pytest.mark.parametrize("qat_bits", [0, 6])
def test_a_model_trains_through_the_kernels_with_the_eager_loss_and_gradients(qat_bits):
    eager, fused = model_pair()
    eager.set_qat(qat_bits)
    fused.set_qat(qat_bits)
    tokens = torch.randint(0, TINY_MODEL["vocab_size"], (2, 33))
    x, y = tokens[:, :-1], tokens[:, 1:]
    eager_loss, fused_loss = eager(x, y), fused(x, y)
    eager_loss.backward()
    fused_loss.backward()
    torch.testing.assert_close(fused_loss, eager_loss, rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(eager.named_parameters(), fused.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_the_fused_mlp_runs_only_with_gradients_so_calibration_hooks_see_every_input():
    _, fused = model_pair()
    seen = []
    for module in fused.modules():
        if isinstance(module, CastedLinear):
            module.register_forward_hook(lambda m, args, out: seen.append(m))
    tokens = torch.randint(0, TINY_MODEL["vocab_size"], (1, 16))
    fused(tokens[:, :-1], tokens[:, 1:])
    with_grad = len(seen)
    seen.clear()
    with torch.no_grad():
        fused(tokens[:, :-1], tokens[:, 1:])
    mlp_linears = 2 * TINY_MODEL["num_layers"]
    assert len(seen) == with_grad + mlp_linears  # no_grad: the eager MLP, through its CastedLinears


def test_eval_builds_keep_the_eager_path():
    model = GPT(ModelConfig(**TINY_MODEL))
    assert not model.fused_cross_entropy and not any(getattr(m, "fused", False) for m in model.modules())


def test_the_train_stage_switches_the_kernels_on_and_learns_the_same(data_dirs, tmp_path):
    from tasks import train as train_stage

    def run(fused: bool):
        cfg = train_stage.Config(model=ModelConfig(**TINY_MODEL, mlp_activation="leaky_relu2"), nproc=1,
                                 device="cpu", iterations=4, train_batch_tokens=256, train_seq_len=64,
                                 grad_accum_steps=1, max_wallclock_seconds=0, warmup_steps=0, compile=False,
                                 log_every=1, fused_cross_entropy=fused, fused_mlp=fused)
        trainer = train_stage.Trainer(cfg, data_dirs["shards"], tmp_path / str(fused))
        (tmp_path / str(fused)).mkdir()
        metrics = trainer.train()
        assert metrics["fused_cross_entropy"] == metrics["fused_mlp"] == fused
        return metrics["final_train_loss"]

    assert run(True) == pytest.approx(run(False), abs=1e-4)
