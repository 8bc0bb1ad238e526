"""Every preset renders, is consistent, and builds the model its system trains."""
from __future__ import annotations

import pytest
import torch

from pgolf.errors import ConfigError
from pgolf.model.config import ModelConfig
from pgolf.model.gpt import GPT, count_parameters
from pgolf.params import from_dict
from tasks import params as P

# docs/lineage.md: R1 #r1 (35,945,671), baseline #baseline-config (17,059,912), PR #2116 #pr2116 (35,991,751).
# Derived here: PR #1693 has R1's sizes, PR #1790 adds 8 x 12 gate weights per layer (width 24),
# PR #1383's count follows from the sizes its preset chooses.
EXPECTED = {
    "baseline": 17_059_912,
    "record": 35_945_671,
    "pr2116": 35_991_751,
    "pr1693": 35_945_671,
    "pr1790": 35_946_727,
    "pr1383": 22_275_147,
}


def model_config(preset: str) -> ModelConfig:
    return from_dict(ModelConfig, P.render(preset)["train"]["model"], preset)


@pytest.mark.parametrize("preset", sorted(EXPECTED))
def test_parameter_count(preset):
    assert count_parameters(model_config(preset)) == EXPECTED[preset]


def test_every_preset_is_listed_here():
    assert set(P.list_presets()) == set(EXPECTED) | {"smoke"}


@pytest.mark.parametrize("preset", sorted(EXPECTED))
def test_builds_and_runs_a_forward(preset):
    torch.manual_seed(0)
    model = GPT(model_config(preset))
    ids = torch.randint(0, model.cfg.vocab_size, (1, 16))
    loss = model(ids, ids)
    assert torch.isfinite(loss)


def test_tokenizer_and_model_vocab_must_agree():
    with pytest.raises(ConfigError, match="tokenizer.vocab_size 4096 != train.model.vocab_size 1024"):
        P.render("baseline", ["tokenizer.vocab_size=4096"])


def test_record_preset_is_r1s_run_command():
    p = P.render("record")
    t = p["train"]
    assert (t["warmdown_frac"], t["min_lr"], t["beta2"], t["ema_decay"], t["grad_clip_norm"]) == (0.85, 0.1, 0.99, 0.9965, 0.3)
    assert (t["matrix_lr"], t["muon_wd"], t["embed_wd"], t["adam_wd"]) == (0.026, 0.095, 0.085, 0.02)
    assert t["max_wallclock_seconds"] - t["gptq_reserve_seconds"] == 599.5
    assert t["train_batch_tokens"] == 8 * 98_304 and t["train_seq_len"] == 2048
    assert t["model"]["enable_looping_at"] == 0.35


@pytest.mark.parametrize("preset", sorted(EXPECTED))
def test_trains_with_a_bf16_embedding_under_autocast(preset):
    """The GPU training dtypes (bf16 tok_emb, bf16 autocast), here on CPU: every technique accepts a
    bf16 stream, and the baseline's stream stays bf16 end to end, as in the challenge's script."""
    torch.manual_seed(0)
    model = GPT(model_config(preset))
    model.store_embedding_in_bf16()
    ids = torch.randint(0, model.cfg.vocab_size, (1, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(ids, ids)
        hidden = model.hidden(ids)
    loss.backward()
    assert torch.isfinite(loss) and model.tok_emb.weight.grad.dtype == torch.bfloat16
    if preset == "baseline":
        assert hidden.dtype == torch.bfloat16
