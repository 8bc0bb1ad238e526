"""Tensor families (pgolf.model.families): every parameter of every preset has the family its modules
declare, the one the name rules gave before, and the optimizer groups, GPTQ, the pack's size groups
and the int8 baseline all follow it."""
from __future__ import annotations

import pytest
import torch

from pgolf.model.config import ModelConfig
from pgolf.model import gpt as gpt_module
from pgolf.model.families import Family, UndeclaredParameter, declared_families
from pgolf.model.gpt import GPT, param_groups
from pgolf.model.lora import DocumentAdapters
from pgolf.typed_params import from_dict
from pgolf.quant.baseline_int8 import quantize_baseline_int8
from tasks import gptq as gptq_stage
from runner import params as P
from pgolf.pack.groups import tensor_group
from pgolf.quant.policy import quantize_state

PRESETS = sorted(p.stem for p in P.PRESETS_DIR.glob("*.yaml"))
TINY = dict(vocab_size=400, model_dim=32, num_heads=2, num_kv_heads=1)


# The name rules that classified parameters before modules declared their families, frozen here as
# the oracle: every preset's model must get from its declarations exactly the family these gave.
def family_by_the_old_name_rules(name: str, tensor: torch.Tensor) -> Family:
    if name in ("tok_emb.weight", "lm_head.weight"):
        return Family.EMBEDDING
    if name.startswith("blocks.") and (".attn.c_" in name or ".attn.proj." in name or ".mlp." in name):
        return Family.MATRIX
    if any(g in name for g in ("attn_gate_w", "_inhibitor.")) and tensor.ndim == 2 and 32 <= tensor.numel() <= 8192:
        return Family.GATE
    if any(p in name for p in ("attn_scale", "attn_scales", "mlp_scale", "mlp_scales", "resid_mix", "resid_mixes",
                               "q_gain", "skip_weight", "skip_weights")):
        return Family.SCALAR
    return Family.PASSTHROUGH


def tiny_model(preset: str) -> GPT:
    section = P.render(preset, [f"train.model.{k}={v}" for k, v in TINY.items()] + ["tokenizer.vocab_size=400"])
    torch.manual_seed(0)
    return GPT(from_dict(ModelConfig, section["train"]["model"], preset))


@pytest.fixture(scope="module", params=PRESETS)
def model(request) -> GPT:
    return tiny_model(request.param)


def test_every_parameter_keeps_the_family_the_old_name_rules_gave(model):
    old = {n: family_by_the_old_name_rules(n, p) for n, p in model.named_parameters()}
    assert declared_families(model) == old
    assert {Family.EMBEDDING, Family.MATRIX, Family.SCALAR} <= set(old.values())


@pytest.mark.parametrize("preset", PRESETS)
def test_full_size_models_keep_the_old_families(preset):
    """At each preset's own dims (on the meta device: shapes only), where the gates' size bounds bite."""
    section = P.render(preset, [])
    with torch.device("meta"):
        model = GPT(from_dict(ModelConfig, section["train"]["model"], preset))
    old = {n: family_by_the_old_name_rules(n, p) for n, p in model.named_parameters()}
    assert declared_families(model) == old


def test_the_presets_cover_every_family():
    families = {f for preset in PRESETS for f in declared_families(tiny_model(preset)).values()}
    assert families == set(Family)


def test_an_undeclared_parameter_fails_the_build(monkeypatch):
    class BlockWithAnExtra(gpt_module.Block):
        def __init__(self, cfg, spec):
            super().__init__(cfg, spec)
            self.extra_gain = torch.nn.Parameter(torch.ones(cfg.model_dim))

    monkeypatch.setattr(gpt_module, "Block", BlockWithAnExtra)
    with pytest.raises(UndeclaredParameter, match=r"blocks\.0\.extra_gain of BlockWithAnExtra"):
        tiny_model("baseline")


def test_the_ttt_adapters_declare_their_families():
    cfg = tiny_model("record").cfg
    assert set(declared_families(DocumentAdapters(cfg, slots=2, docs=1, rank=2, alpha=1.0)).values()) == {
        Family.PASSTHROUGH}


def test_optimizer_groups_follow_the_families(model):
    expect = {Family.EMBEDDING: {"embed", "head"}, Family.MATRIX: {"matrix"}}
    families = declared_families(model)
    for group, members in param_groups(model).items():
        for name, p in members:
            assert group in expect.get(families[name], {"scalar"}), (name, group)


def test_gptq_quantizes_gates_and_embeddings_by_family(model):
    state = {n: p.detach() for n, p in model.named_parameters()}
    cfg = gptq_stage.Config(gate_int8=True, passthrough_max_numel=0, embed_bits=7, embed_clip_sigmas=14.0,
                            mlp_clip_sigmas=11.5, attn_clip_sigmas=13.0)
    families = declared_families(model)
    qm, _ = quantize_state(state, {}, cfg, model.cfg.__dict__, families)
    for name, tensor in state.items():
        family, kind = families[name], qm.entries[name]["kind"]
        assert (kind == "int8_row") == (family is Family.GATE), name
        if family is Family.EMBEDDING:
            assert qm.entries[name]["bits"] == 7
        if family is Family.MATRIX:
            assert cfg.family(name)[1] == (11.5 if ".mlp." in name else 13.0), name


def test_pack_groups_follow_the_families(model):
    families = declared_families(model)
    for name, p in model.named_parameters():
        family, group = families[name], tensor_group(f"{name}.q")
        assert (group == "embedding") == (family is Family.EMBEDDING), name
        if family is Family.MATRIX:
            assert group in ("attention", "mlp"), name
        assert tensor_group(f"{name}.scale") == "scales"


def test_the_int8_baseline_keeps_scalars_in_fp32(model):
    state = {n: p.detach() for n, p in model.named_parameters()}
    qm, _ = quantize_baseline_int8(state, model.cfg.__dict__)
    families = declared_families(model)
    for name, tensor in state.items():
        if qm.entries[name]["kind"] == "passthrough":
            scalar = families[name] is Family.SCALAR
            assert qm.tensors[name].dtype == (torch.float32 if scalar else torch.float16), name
