"""The eval stage with PR #2135's eval changes: the n-gram tilt (its hints inside the clock, its audit
in metrics.json), LoRA TTT without K, and documents cut at eval.seq_len."""
from __future__ import annotations

import json
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pgolf.data.shards import load_split
from pgolf.evaluate import ngram_tilt
from pgolf.evaluate.bpb import bytes_per_position, truncate_val
from pgolf.evaluate.config import TTTSettings, TiltSettings
from pgolf.evaluate.ngram_tilt import token_hints
from pgolf.model.config import ModelConfig
from pgolf.model.lora import DocumentAdapters
from pgolf.tokenize.token_bytes import build_byte_luts, load_tokenizer
from tasks import evaluate as eval_stage
from runner.stage import execute
from tests.conftest import TINY_MODEL
from tests.test_eval import build_packed

# The fixture's val text is random words: short contexts recur, 16-token ones do not.
TILT = TiltSettings(order=3, threshold=0.3, boost=2.625)
LORA = TTTSettings(rank=2, alpha=2.0, lr=3e-2, chunk=16, context=64, batch_docs=8)


@pytest.fixture(scope="module")
def packed(data_dirs, tmp_path_factory):
    return build_packed(tmp_path_factory.mktemp("tilt"), data_dirs)


def run_eval(data_dirs, packed, out, **cfg):
    config = eval_stage.Config(**{"seq_len": 64, "batch_seqs": 8, "device": "cpu", **cfg})
    return execute(eval_stage.SPEC, config, {"pack": packed / "pack", "shards": data_dirs["shards"],
                                             "tokenizer": data_dirs["tokenizer"]}, out)


def test_flat_tilted_eval_is_the_renormalized_tilted_softmax_by_hand(data_dirs, packed, tmp_path):
    plain = run_eval(data_dirs, packed, tmp_path / "plain")
    tilted = run_eval(data_dirs, packed, tmp_path / "tilt", tilt=TILT)
    assert "tilt" not in json.loads((tmp_path / "plain/metrics.json").read_text()) and "hint_seconds" not in plain
    audit = json.loads((tmp_path / "tilt/metrics.json").read_text())["tilt"]
    assert audit["passed"] and audit["hinted_targets"] > 100 and audit["scores"]["hinted"] == 32
    assert audit["causal"] == {"cut": audit["causal"]["cut"], "prefix_equal": True, "changed_suffix_equal": True}
    # the hints are inside the clock, after the load, and reported apart
    assert tilted["hint_seconds"] > 0
    assert tilted["eval_seconds"] == pytest.approx(tilted["load_seconds"] + tilted["hint_seconds"]
                                                   + tilted["scoring_seconds"], abs=2e-3)
    # by hand: every window's logits, the hint's logit raised by beta where gated, a plain softmax NLL
    model = eval_stage.model_from_artifact(packed / "pack/artifact.bin", torch.device("cpu"))
    tokens = truncate_val(load_split(data_dirs["shards"], "val"), 64)
    hints = token_hints(tokens, TILT)
    total = 0.0
    with torch.no_grad():
        for w in range(0, len(tokens) - 1, 64):
            x = torch.from_numpy(tokens[w:w + 64].astype(np.int64))[None]
            y = torch.from_numpy(tokens[w + 1:w + 65].astype(np.int64))
            logits = model.forward_logits(x)[0]
            boost = TILT.boost * F.one_hot(torch.from_numpy(hints.token[w + 1:w + 65]), logits.size(-1))
            logits = logits + boost * torch.from_numpy(hints.gated[w + 1:w + 65])[:, None]
            total += float(F.cross_entropy(logits.double(), y, reduction="sum"))
    assert tilted["val_loss"] == pytest.approx(total / (len(tokens) - 1), rel=1e-6)
    assert tilted["val_loss"] != plain["val_loss"] and tilted["tokens"] == plain["tokens"]


def test_lora_ttt_with_the_tilt_and_without_k(data_dirs, packed, tmp_path):
    no_k = TTTSettings(**{**LORA.__dict__, "adapt_k": False})
    plain = run_eval(data_dirs, packed, tmp_path / "plain", ttt="lora", lora=no_k)
    tilted = run_eval(data_dirs, packed, tmp_path / "tilt", ttt="lora", lora=no_k, tilt=TILT)
    assert plain["audit"]["passed"] and tilted["audit"]["passed"] and tilted["tilt"]["passed"]
    assert tilted["audit"]["train_steps"] == plain["audit"]["train_steps"] > 0
    # the adapters train on the untilted loss: only the scores move
    assert tilted["tokens"] == plain["tokens"] and tilted["val_loss"] != plain["val_loss"]
    with_k = run_eval(data_dirs, packed, tmp_path / "k", ttt="lora", lora=LORA)
    assert with_k["val_loss"] != plain["val_loss"]


def test_adapters_without_k_have_none_and_the_rest_as_before():
    cfg = ModelConfig(**TINY_MODEL)
    full = DocumentAdapters(cfg, 2, 3, 4, 4.0, seed=5)
    no_k = DocumentAdapters(cfg, 2, 3, 4, 4.0, seed=5, k=False)
    assert all(layer.keys() == {"q", "v", "o", "mlp"} for layer in no_k.layers)
    assert no_k.slot(0).k is None and full.slot(0).k is not None
    assert sum(p.numel() for p in full.parameters()) - sum(p.numel() for p in no_k.parameters()) == 2 * 3 * 4 * (32 + 16)
    assert torch.equal(full.layers[0]["q"].A, no_k.layers[0]["q"].A)  # drawn first either way


def test_a_broken_tilt_fails_the_stage_and_writes_nothing(data_dirs, packed, tmp_path, monkeypatch):
    real = ngram_tilt.tilt_nll
    monkeypatch.setattr(ngram_tilt, "tilt_nll", lambda nll, log_q, target, hint, gated, boost: real(
        nll, torch.full_like(log_q, -80.0), target, hint, gated, boost))  # log Z computed for another q
    with pytest.raises(AssertionError, match="n-gram tilt broke"):
        run_eval(data_dirs, packed, tmp_path / "e", tilt=TILT)
    assert not (tmp_path / "e").exists()


def test_the_budget_counts_the_hint_precompute(data_dirs, packed, tmp_path, monkeypatch):
    """A precompute that takes 1,000 s (a fake clock) leaves no time for the global SGD phase: it is
    skipped and the run is over its budget; the same run without the tilt trains its phase."""
    from pgolf.evaluate import budget as budget_module
    shift = [0.0]
    clock = budget_module.time.perf_counter
    monkeypatch.setattr(budget_module, "time", types.SimpleNamespace(perf_counter=lambda: clock() + shift[0]))
    slow = ngram_tilt.token_hints

    def slow_hints(tokens, settings):
        shift[0] += 1000.0
        return slow(tokens, settings)

    monkeypatch.setattr(eval_stage, "token_hints", slow_hints)
    phased = TTTSettings(**{**LORA.__dict__, "phases": 1, "prefix_docs": 8, "global_chunk_tokens": 128,
                            "global_seq_len": 32, "global_batch_seqs": 2})
    over = run_eval(data_dirs, packed, tmp_path / "over", ttt="lora", lora=phased, tilt=TILT, budget_s=600.0)
    assert over["audit"]["phases"] == [] and over["audit"]["phases_skipped_at"] == [8]
    assert over["hint_seconds"] >= 1000 and not over["within_budget"]
    shift[0] = 0.0
    fits = run_eval(data_dirs, packed, tmp_path / "fits", ttt="lora", lora=phased, budget_s=600.0)
    assert len(fits["audit"]["phases"]) == 1 and fits["within_budget"]


def test_sgd_ttt_with_the_tilt_is_refused():
    from pgolf.errors import ConfigError
    from pgolf.typed_params import from_dict
    with pytest.raises(ConfigError, match="tilt"):
        from_dict(eval_stage.Config, {"ttt": "sgd", "stride": 8, "tilt": {"order": 16}}, "eval")


def test_eval_cuts_documents_at_its_seq_len():
    """R1 and PR #2135 cut a document's attention every eval_seq_len tokens in eval (2048 and 2560),
    where training cut it every train_seq_len (2048 both)."""
    from pgolf.model.gpt import GPT
    model = GPT(ModelConfig(**TINY_MODEL, doc_attention=True, doc_attention_max_len=32))
    eval_stage.cut_documents_every(model, 48)
    assert model.cfg.doc_attention_max_len == 48
    uncut = GPT(ModelConfig(**TINY_MODEL, doc_attention=True))
    eval_stage.cut_documents_every(uncut, 48)
    assert uncut.cfg.doc_attention_max_len == 0


def test_two_ranks_tilt_like_one_process(data_dirs, packed, tmp_path):
    one = run_eval(data_dirs, packed, tmp_path / "one", tilt=TILT)
    two = run_eval(data_dirs, packed, tmp_path / "two", tilt=TILT, nproc=2)
    assert (two["val_loss"], two["val_bpb"], two["ranks"]) == (one["val_loss"], one["val_bpb"], 2)
    assert two["tilt"]["passed"] and two["tilt"]["hinted_targets"] == one["tilt"]["hinted_targets"]


def test_byte_counts_unchanged_by_the_tilt(data_dirs):
    sp, _ = load_tokenizer(data_dirs["tokenizer"])
    tokens = truncate_val(load_split(data_dirs["shards"], "val"), 64)
    assert bytes_per_position(tokens, build_byte_luts(sp, 400), None).sum() > 0
