"""The baseline GPT: parameter count, names, causality, zero-init, loss at init, checkpoint I/O."""
from __future__ import annotations

import math

import pytest
import torch

from pgolf.errors import FormatError, InputError
from pgolf.model.config import ModelConfig
from pgolf.model.gpt import GPT, CastedLinear, ForwardInputs, count_parameters, param_groups
from pgolf.model.io import load_model, save_model
from tests.conftest import TINY_MODEL


def tiny(**kw) -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(**{**TINY_MODEL, **kw}))


def test_baseline_parameter_count_matches_the_challenge():
    assert count_parameters(ModelConfig()) == 17_059_912


def test_parameter_names_are_the_api():
    names = {n for n, _ in tiny().named_parameters()}
    for i in range(2):
        for suffix in ("attn.c_q.weight", "attn.c_k.weight", "attn.c_v.weight", "attn.proj.weight", "attn.q_gain",
                       "mlp.fc.weight", "mlp.proj.weight", "attn_scale", "mlp_scale", "resid_mix"):
            assert f"blocks.{i}.{suffix}" in names
    assert {"tok_emb.weight", "skip_weights"} <= names and "lm_head.weight" not in names
    assert "lm_head.weight" in {n for n, _ in tiny(tie_embeddings=False).named_parameters()}
    assert all(isinstance(m, CastedLinear) for n, m in tiny().named_modules() if n.endswith(("c_q", "proj", "fc")))


def test_optimizer_groups():
    groups = {k: [n for n, _ in v] for k, v in param_groups(tiny()).items()}
    assert groups["embed"] == ["tok_emb.weight"]
    assert all(n.startswith("blocks.") and n.endswith(".weight") for n in groups["matrix"]) and len(groups["matrix"]) == 12
    assert "skip_weights" in groups["scalar"] and "blocks.0.attn.q_gain" in groups["scalar"]


def test_output_projections_start_at_zero_and_block_is_identity():
    model = tiny()
    for block in model.blocks:
        assert not block.attn.proj.weight.any() and not block.mlp.proj.weight.any()
    x = torch.randn(2, 5, 32)
    block = model.blocks[0]
    assert torch.allclose(block(x, ForwardInputs(torch.zeros_like(x), None, None, None), 0), x)


def test_causal_changing_the_future_leaves_the_past():
    model = tiny()
    for block in model.blocks:  # give the zero-init projections weight so attention matters
        torch.nn.init.normal_(block.attn.proj.weight, std=0.2)
        torch.nn.init.normal_(block.mlp.proj.weight, std=0.2)
    ids = torch.randint(0, 400, (2, 16))
    changed = ids.clone()
    changed[:, 9:] = torch.randint(0, 400, (2, 7))
    a, b = model.forward_logits(ids), model.forward_logits(changed)
    assert torch.allclose(a[:, :9], b[:, :9], atol=1e-6)
    assert not torch.allclose(a[:, 9:], b[:, 9:])


def test_loss_at_init_is_near_uniform_and_softcap_bounds_logits():
    model = tiny()
    ids = torch.randint(0, 400, (2, 16))
    loss = model(ids, torch.roll(ids, -1, 1))
    assert abs(loss.item() - math.log(400)) < 0.1
    with torch.no_grad():
        model.tok_emb.weight.mul_(1000)
    assert model.forward_logits(ids).abs().max() <= 30.0


def test_checkpoint_round_trip_and_errors(tmp_path):
    model = tiny()
    save_model(model, model.cfg, tmp_path, {"train": {"seed": 1}})
    loaded, cfg = load_model(tmp_path)
    assert cfg == model.cfg
    for (n, p), (_, q) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(p, q), n
    first = (tmp_path / "model.safetensors").read_bytes()
    save_model(model, model.cfg, tmp_path)
    assert (tmp_path / "model.safetensors").read_bytes() == first
    (tmp_path / "model.safetensors").write_bytes(first[:100])
    with pytest.raises(FormatError, match="corrupt or truncated"):
        load_model(tmp_path)
    save_model(tiny(num_layers=3), ModelConfig(**{**TINY_MODEL, "num_layers": 3}), tmp_path)
    (tmp_path / "config.json").write_text('{"model": {"vocab_size": 400, "num_layers": 2, "model_dim": 32, "num_heads": 2, "num_kv_heads": 1}}')
    with pytest.raises(FormatError, match="unexpected"):
        load_model(tmp_path)
    with pytest.raises(InputError):
        load_model(tmp_path / "nothing")
