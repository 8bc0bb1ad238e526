"""The fused Triton kernels (pgolf.kernels) against the eager math they replace, run in Triton's
interpreter on CPU (conftest sets TRITON_INTERPRET when there is no GPU)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")  # a dev dependency on Linux; no wheels elsewhere

from pgolf import kernels  # noqa: E402
from pgolf.evaluate.config import SGDTTTSettings, TTTSettings  # noqa: E402
from pgolf.kernels import fused_mlp as mlp_kernel, softcap_ce as softcap_ce_kernel  # noqa: E402
from pgolf.kernels.fused_mlp import fused_mlp  # noqa: E402
from pgolf.kernels.softcap_ce import softcap_cross_entropy  # noqa: E402
from pgolf.model.config import ModelConfig  # noqa: E402
from pgolf.model.gpt import GPT  # noqa: E402
from pgolf.model.layers import CastedLinear  # noqa: E402
from tests.conftest import TINY_MODEL  # noqa: E402


def eager_softcap_ce(logits, targets, cap):
    return F.cross_entropy(cap * torch.tanh(logits.float() / cap), targets)


def spy_on_kernels(monkeypatch) -> dict[str, int]:
    """Counts calls of the two kernel entry points. The model imports them at call time, so patching
    the kernel modules' attributes sees every call the model makes."""
    calls = {"fused_mlp": 0, "softcap_cross_entropy": 0}
    for module, name in ((mlp_kernel, "fused_mlp"), (softcap_ce_kernel, "softcap_cross_entropy")):
        def counted(*args, _real=getattr(module, name), _name=name, **kwargs):
            calls[_name] += 1
            return _real(*args, **kwargs)
        monkeypatch.setattr(module, name, counted)
    return calls


def test_the_kernels_run_here(monkeypatch):
    """Where they are usable, switching them on sends a training step through both kernels (else the
    fused-vs-eager tests below would compare the eager path with itself)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert kernels.usable(device)
    model = GPT(ModelConfig(**TINY_MODEL)).to(device)
    model.set_fused_kernels(cross_entropy=True, mlp=True)
    calls = spy_on_kernels(monkeypatch)
    tokens = torch.randint(0, TINY_MODEL["vocab_size"], (2, 17), device=device)
    model(tokens[:, :-1], tokens[:, 1:]).backward()
    assert calls == {"fused_mlp": TINY_MODEL["num_layers"], "softcap_cross_entropy": 1}


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
def test_a_model_trains_through_the_kernels_with_the_eager_loss_and_gradients(qat_bits, monkeypatch):
    eager, fused = model_pair()
    eager.set_qat(qat_bits)
    fused.set_qat(qat_bits)
    tokens = torch.randint(0, TINY_MODEL["vocab_size"], (2, 33))
    x, y = tokens[:, :-1], tokens[:, 1:]
    calls = spy_on_kernels(monkeypatch)
    eager_loss = eager(x, y)
    assert calls == {"fused_mlp": 0, "softcap_cross_entropy": 0}
    fused_loss = fused(x, y)
    assert calls == {"fused_mlp": TINY_MODEL["num_layers"], "softcap_cross_entropy": 1}
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


@pytest.fixture(scope="module")
def packed_without_kernels(data_dirs, tmp_path_factory):
    """A packed artifact, and the kernel calls its GPTQ calibration made."""
    from tests.test_eval import build_packed

    with pytest.MonkeyPatch.context() as monkeypatch:
        calls = spy_on_kernels(monkeypatch)
        packed = build_packed(tmp_path_factory.mktemp("kernels_eval"), data_dirs, {"mlp_activation": "leaky_relu2"})
    return packed, dict(calls)


def test_eval_builds_keep_the_eager_path(data_dirs, packed_without_kernels, tmp_path, monkeypatch):
    """What the eval stage runs, gradients included (LoRA TTT, chunked SGD TTT): the eager loss and
    MLP only, as R1 evaluates; GPTQ calibration too."""
    from tests.test_eval import run_eval

    packed, calibration_calls = packed_without_kernels
    assert calibration_calls == {"fused_mlp": 0, "softcap_cross_entropy": 0}
    calls = spy_on_kernels(monkeypatch)
    lora = TTTSettings(rank=2, alpha=2.0, lr=1e-3, chunk=16, context=64, batch_docs=8)
    sgd = SGDTTTSettings(lr=0.01, epochs=1, chunk_tokens=256, batch_seqs=4)
    for name, cfg in {"flat": {}, "lora": {"ttt": "lora", "lora": lora},
                      "sgd": {"ttt": "sgd", "stride": 32, "sgd": sgd}}.items():
        metrics = run_eval(data_dirs, packed, tmp_path / name, **cfg)
        if name != "flat":
            assert metrics["audit"]["train_steps" if name == "lora" else "sgd_steps"] > 0, name
        assert calls == {"fused_mlp": 0, "softcap_cross_entropy": 0}, name


def test_the_train_stage_switches_the_kernels_on_and_learns_the_same(data_dirs, tmp_path, monkeypatch):
    from pgolf.train import loop as training_loop
    from tasks import train as train_stage

    calls = spy_on_kernels(monkeypatch)

    def run(fused: bool):
        for name in calls:
            calls[name] = 0
        cfg = train_stage.Config(model=ModelConfig(**TINY_MODEL, mlp_activation="leaky_relu2"), nproc=1,
                                 device="cpu", iterations=4, train_batch_tokens=256, train_seq_len=64,
                                 grad_accum_steps=1, max_wallclock_seconds=0, warmup_steps=0, compile=False,
                                 log_every=1, fused_cross_entropy=fused, fused_mlp=fused)
        trainer = training_loop.Trainer(cfg, data_dirs["shards"], tmp_path / str(fused))
        (tmp_path / str(fused)).mkdir()
        metrics = trainer.train()
        assert metrics["fused_cross_entropy"] == metrics["fused_mlp"] == fused
        # every training step through both kernels (one loss, one MLP per layer), or through neither
        steps = cfg.iterations * cfg.grad_accum_steps
        assert calls["softcap_cross_entropy"] == (steps if fused else 0)
        assert calls["fused_mlp"] == (steps * TINY_MODEL["num_layers"] if fused else 0)
        return metrics["final_train_loss"]

    assert run(True) == pytest.approx(run(False), abs=1e-4)
