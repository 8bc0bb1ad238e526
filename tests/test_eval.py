"""The metric: windows score every target once, bpb on hand-worked numbers, the artifact alone."""
from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pgolf.evaluate.config import SGDTTTSettings, TTTSettings
from pgolf.errors import FormatError
from pgolf.evaluate.bpb import BpbResult, bytes_per_position, evaluate_bpb, truncate_val, windows
from pgolf.model.config import ModelConfig
from pgolf.model.gpt import GPT
from pgolf.model.io import save_model
from pgolf.tokenize.token_bytes import build_byte_luts
from tasks import evaluate as eval_stage, gptq as gptq_stage, pack as pack_stage
from runner.stage import execute
from tests.conftest import TINY_MODEL


@pytest.mark.parametrize("targets,seq_len,stride", [(64, 16, 0), (64, 16, 4), (96, 32, 5), (32, 32, 8), (48, 16, 15)])
def test_windows_score_each_target_exactly_once(targets, seq_len, stride):
    counts = np.zeros(targets + 1, dtype=int)
    for start, first in windows(targets, seq_len, stride):
        assert 0 <= start and start + seq_len <= targets and start + 1 <= first <= start + seq_len
        counts[first:start + seq_len + 1] += 1
        if stride and first > seq_len:  # every later target sees at least L - stride tokens before it
            assert first - 1 - start >= seq_len - stride
    assert counts[0] == 0 and (counts[1:] == 1).all()


def test_truncation_keeps_a_multiple_of_seq_len_plus_one():
    assert len(truncate_val(np.arange(100), 16)) == 97
    with pytest.raises(ValueError):
        truncate_val(np.arange(10), 16)


class UniformModel(torch.nn.Module):
    """Equal logits for every token: CE is ln(V) at every position."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab

    def forward_logits(self, ids):
        return torch.zeros(*ids.shape, self.vocab)


class CopyModel(torch.nn.Module):
    """An induction head by hand: predicts that what followed the current token's last earlier
    occurrence in the window comes next, else guesses uniformly. It is only as good as its context."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab

    def forward_logits(self, ids):
        logits = torch.zeros(*ids.shape, self.vocab)
        for row, seq in enumerate(ids.tolist()):
            last_seen = {}
            for t, token in enumerate(seq):
                if token in last_seen:
                    logits[row, t, seq[last_seen[token] + 1]] = 20.0
                last_seen[token] = t
        return logits


def test_bpb_of_a_uniform_model_by_hand():
    tokens = np.array([1, 5, 6, 7, 1, 8, 9, 10, 11])
    byte_counts = np.array([0, 3, 1, 2, 0, 4, 1, 1, 2])
    result = evaluate_bpb(UniformModel(16), tokens, byte_counts, seq_len=4, stride=0, batch_seqs=3,
                          device=torch.device("cpu"))
    assert result.tokens == 8 and result.bytes == 14
    assert result.val_loss == pytest.approx(math.log(16))
    assert result.val_bpb == pytest.approx(4.0 * 8 / 14)  # log2(16) bits per token, 8 tokens over 14 bytes
    sliding = evaluate_bpb(UniformModel(16), tokens, byte_counts, seq_len=4, stride=2, batch_seqs=2,
                           device=torch.device("cpu"))
    assert (sliding.tokens, sliding.bytes) == (result.tokens, result.bytes)
    assert BpbResult(10.0, 5, 20).val_bpb == pytest.approx(10 / 5 / math.log(2) * 5 / 20)


def test_bytes_per_position_lut_and_sidecar(sp):
    luts = build_byte_luts(sp, sp.vocab_size())
    ids = [1] + sp.encode("The people") + [1] + sp.encode("of the world")
    tokens = np.array(ids)
    lut = bytes_per_position(tokens, luts, None)
    assert lut[0] == 0 and lut.sum() == len("The people".encode()) + len("of the world".encode())
    sidecar = np.arange(len(ids)) % 3
    assert bytes_per_position(tokens, None, sidecar).tolist() == [0] + sidecar[1:].tolist()


def build_packed(root, data_dirs, model_extra=None, **gptq):
    torch.manual_seed(0)
    model = GPT(ModelConfig(**TINY_MODEL, **(model_extra or {})))
    for block in model.blocks:
        torch.nn.init.normal_(block.attn.proj.weight, std=0.05)
        torch.nn.init.normal_(block.mlp.proj.weight, std=0.05)
    (root / "train").mkdir(parents=True)
    save_model(model, model.cfg, root / "train")
    execute(gptq_stage.SPEC, gptq_stage.Config(calib_batches=2, calib_seq_len=32, calib_batch_seqs=4, device="cpu",
                                               passthrough_max_numel=512, **gptq),
            {"train": root / "train", "shards": data_dirs["shards"]}, root / "gptq")
    execute(pack_stage.SPEC, pack_stage.Config(), {"gptq": root / "gptq"}, root / "pack")
    return root


@pytest.fixture(scope="module")
def packed(data_dirs, tmp_path_factory):
    return build_packed(tmp_path_factory.mktemp("eval"), data_dirs)


def run_eval(data_dirs, packed, out, **cfg):
    config = eval_stage.Config(**{"seq_len": 64, "batch_seqs": 8, "device": "cpu", **cfg})
    return execute(eval_stage.SPEC, config, {"pack": packed / "pack", "shards": data_dirs["shards"],
                                             "tokenizer": data_dirs["tokenizer"]}, out)


@pytest.mark.parametrize("variant", ["plain", "families_gates_lqer"])
def test_eval_from_the_artifact_equals_the_in_memory_quantized_model(data_dirs, packed, tmp_path, variant):
    from pgolf.data.shards import load_split
    from pgolf.quant.quantized_model import load_quantized
    from pgolf.tokenize.token_bytes import load_tokenizer

    if variant != "plain":
        packed = build_packed(tmp_path / "v", data_dirs, {"attn_gate": "sparse", "attn_gate_width": 16},
                              embed_bits=7, gate_int8=True, lqer_rank=2, lqer_top_k=2, mlp_clip_sigmas=11.5)
    metrics = run_eval(data_dirs, packed, tmp_path / "e")
    qm = load_quantized(packed / "gptq/quantized.safetensors")
    model = GPT(ModelConfig(**qm.model_config))
    model.load_state_dict(qm.dequantize())
    assert (variant == "plain") == (not any("lqer" in e for e in qm.entries.values()))
    tokens = truncate_val(load_split(data_dirs["shards"], "val"), 64)
    sp, _ = load_tokenizer(data_dirs["tokenizer"])
    expected = evaluate_bpb(model, tokens, bytes_per_position(tokens, build_byte_luts(sp, 400), None), 64, 0, 8,
                            torch.device("cpu"))
    assert metrics["val_bpb"] == pytest.approx(expected.val_bpb, rel=1e-12)
    assert metrics["tokens"] == len(tokens) - 1 and metrics["mode"] == "flat"
    assert json.loads((tmp_path / "e/metrics.json").read_text())["val_bpb"] == metrics["val_bpb"]


def test_sliding_scores_the_same_tokens_and_bytes_and_helps(data_dirs, packed, tmp_path):
    flat = run_eval(data_dirs, packed, tmp_path / "flat")
    sliding = run_eval(data_dirs, packed, tmp_path / "sliding", stride=16)
    assert (sliding["tokens"], sliding["bytes"]) == (flat["tokens"], flat["bytes"])
    assert sliding["mode"] == "sliding" and math.isfinite(sliding["val_bpb"])
    # The packed model is untrained and uses no context; a model that does: on a stream of period 24,
    # flat windows of 32 see the period only for their last 8 targets, sliding ones (stride 8) for all
    # but the first window's.
    period = np.random.default_rng(0).permutation(np.arange(4, 400))[:24]
    tokens = np.concatenate([[1], np.tile(period, 8)])
    ones = np.ones(len(tokens), dtype=np.int64)
    cpu = torch.device("cpu")
    flat = evaluate_bpb(CopyModel(400), tokens, ones, 32, 0, 4, cpu)
    sliding = evaluate_bpb(CopyModel(400), tokens, ones, 32, 8, 4, cpu)
    assert (sliding.tokens, sliding.bytes) == (flat.tokens, flat.bytes)
    # Copied targets cost ~0, the others ln(400): 25 in the first window (the bos, then the period's
    # first sight), 24 in each later flat window, none in later sliding ones.
    assert flat.val_loss == pytest.approx((25 + 24 * 5) / 192 * math.log(400), rel=1e-3)
    assert sliding.val_loss == pytest.approx(25 / 192 * math.log(400), rel=1e-3)


def test_tokenizer_vocab_must_match_the_model(data_dirs, packed, tmp_path):
    from tasks import tokenizer as tok_stage

    execute(tok_stage.SPEC, tok_stage.Config(vocab_size=380, num_threads=1), {"corpus": data_dirs["corpus"]}, tmp_path / "tok")
    with pytest.raises(FormatError, match="380 pieces but the model's vocab_size is 400") as err:
        execute(eval_stage.SPEC, eval_stage.Config(seq_len=64, device="cpu"),
                {"pack": packed / "pack", "shards": data_dirs["shards"], "tokenizer": tmp_path / "tok"}, tmp_path / "e")
    assert "tokenizer.json" in str(err.value)
    assert not (tmp_path / "e").exists()


def test_stage_runs_score_first_lora_ttt_with_its_audit(data_dirs, packed, tmp_path):
    flat = run_eval(data_dirs, packed, tmp_path / "flat")
    lora = {"rank": 2, "alpha": 2.0, "lr": 3e-2, "chunk": 16, "context": 64, "batch_docs": 8}
    cfg = eval_stage.Config(seq_len=64, device="cpu", ttt="lora", lora=TTTSettings(**lora))
    metrics = execute(eval_stage.SPEC, cfg, {"pack": packed / "pack", "shards": data_dirs["shards"],
                                             "tokenizer": data_dirs["tokenizer"]}, tmp_path / "ttt")
    assert metrics["mode"] == "ttt_lora" and metrics["audit"]["passed"] and metrics["audit"]["train_steps"] > 0
    assert (metrics["tokens"], metrics["bytes"]) == (flat["tokens"], flat["bytes"])
    # The untrained model has not learned the val text's statistics; adapting to each document's
    # scored chunks must lower its bpb (measured: 4.64 against flat 4.82)
    assert metrics["val_bpb"] < flat["val_bpb"] - 0.1


def test_two_ranks_score_like_one_process(data_dirs, packed, tmp_path):
    """nproc 2 (torchrun, gloo): each rank scores its share and the totals are summed; the numbers are
    one process's for flat and sliding (bit for bit), LoRA TTT (each batch seeded by its place, whichever rank runs it)
    and chunked SGD TTT (sequences dealt over ranks, gradients summed); phased TTT passes its audit."""
    lora = TTTSettings(rank=2, alpha=2.0, lr=1e-3, chunk=16, context=64, batch_docs=4)
    sgd = SGDTTTSettings(lr=0.01, epochs=1, chunk_tokens=256, batch_seqs=4)
    phased = TTTSettings(**{**lora.__dict__, "phases": 2, "prefix_docs": 8, "global_chunk_tokens": 128,
                                       "global_seq_len": 32, "global_batch_seqs": 2})
    for name, cfg in {"flat": {}, "sliding": {"stride": 16}, "lora": {"ttt": "lora", "lora": lora},
                      "sgd": {"ttt": "sgd", "stride": 32, "sgd": sgd}, "phased": {"ttt": "lora", "lora": phased}}.items():
        one = run_eval(data_dirs, packed, tmp_path / f"{name}1", **cfg)
        two = run_eval(data_dirs, packed, tmp_path / f"{name}2", nproc=2, **cfg)
        assert two["ranks"] == 2 and one["ranks"] == 1
        assert (two["tokens"], two["bytes"]) == (one["tokens"], one["bytes"]), name
        if name == "phased":
            assert two["audit"]["passed"] and len(two["audit"]["phases"]) == 2, two["audit"]
            continue
        if name in ("flat", "sliding"):
            assert two["val_loss"] == one["val_loss"] and two["val_bpb"] == one["val_bpb"], name
        assert two["val_bpb"] == pytest.approx(one["val_bpb"], rel=1e-6 if name == "sgd" else 1e-9), name
        if two["audit"]:
            assert two["audit"]["passed"] and two["audit"]["train_steps"] == one["audit"]["train_steps"] > 0


def test_compiled_eval_matches_eager_and_keeps_the_warm_up_apart(data_dirs, packed, tmp_path):
    """eval.compile: the same scores through torch.compile (one dynamic-shape graph), its warm-up on
    random tokens reported apart from eval_seconds. LoRA TTT compiled: forward, backward and AdamW."""
    lora = TTTSettings(rank=2, alpha=2.0, lr=1e-3, chunk=16, context=64, batch_docs=4)
    for cfg in ({}, {"ttt": "lora", "lora": lora}):
        eager = run_eval(data_dirs, packed, tmp_path / "eager", **cfg)
        compiled = run_eval(data_dirs, packed, tmp_path / "compiled", compile=True, **cfg)
        assert compiled["val_bpb"] == pytest.approx(eager["val_bpb"], rel=1e-5)
        assert (compiled["tokens"], compiled["bytes"]) == (eager["tokens"], eager["bytes"])
        assert compiled["warmup_seconds"] > 0 and eager["warmup_seconds"] == 0
        assert compiled["eval_seconds"] == pytest.approx(compiled["load_seconds"] + compiled["scoring_seconds"], abs=2e-3)
        shutil.rmtree(tmp_path / "eager"), shutil.rmtree(tmp_path / "compiled")


class DeviceValue(torch.Tensor):
    """What the model computed, and everything computed from it: every read of one on the host
    (item, tolist, bool, float, cpu, numpy) is counted, the reads a GPU would wait for."""
    reads = 0

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func in (torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__float__,
                    torch.Tensor.__int__, torch.Tensor.cpu, torch.Tensor.numpy):
            DeviceValue.reads += 1
        return super().__torch_function__(func, types, args, kwargs)


def evaluate_bpb_before_issue_25(model, tokens, byte_counts, seq_len, stride, batch_seqs, join=False) -> float:
    """The loss sum as evaluate_bpb computed it before its sums moved to the device: each batch's
    NLLs to the host in float64, each window's slice summed there, the windows summed in order."""
    stream = torch.from_numpy(np.asarray(tokens, dtype=np.int64))
    plan = windows(len(tokens) - 1, seq_len, stride)
    total = 0.0
    for b in range(0, len(plan), batch_seqs):
        batch = plan[b:b + batch_seqs]
        x = torch.stack([stream[w:w + seq_len] for w, _ in batch])
        y = torch.stack([stream[w + 1:w + seq_len + 1] for w, _ in batch])
        with torch.no_grad():
            logits = model.forward_logits(x.reshape(1, -1) if join else x)
        nll = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1), reduction="none")
        nll = nll.view(len(batch), seq_len).double().cpu()
        for row, (w, first) in enumerate(batch):
            total += float(nll[row, first - (w + 1):].sum())
    return total


@pytest.mark.parametrize("mode", ["flat", "sliding", "joined"])
def test_eval_sums_on_the_device_are_the_host_sums_bit_for_bit_with_one_read(mode):
    """Issue 25: the losses stay where the model computed them until one read at the end (a GPU
    waits once per eval, not once per batch), and the loss sum is the one the host computed before,
    bit for bit (sliding windows: the first window scores from 0, the rest from seq_len - stride)."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1, doc_attention=True,
                      doc_attention_kernel="varlen", doc_attention_max_len=16)
    model = GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    rng = np.random.default_rng(0)
    tokens = rng.integers(2, 64, 32 * 13 + 1)
    tokens[rng.integers(0, len(tokens), 20)] = 1
    byte_counts = rng.integers(1, 4, len(tokens))
    stride, join = {"flat": (0, False), "sliding": (8, False), "joined": (0, True)}[mode]
    expected = evaluate_bpb_before_issue_25(model, tokens, byte_counts, 32, stride, 5, join)
    forward_logits = model.forward_logits
    model.forward_logits = lambda *a, **k: forward_logits(*a, **k).as_subclass(DeviceValue)
    DeviceValue.reads = 0
    result = evaluate_bpb(model, tokens, byte_counts, 32, stride, 5, torch.device("cpu"), join_windows=join)
    assert DeviceValue.reads == 1
    assert result.loss_sum == expected  # exactly
    assert result.tokens == len(tokens) - 1 and result.bytes == int(byte_counts[1:].sum())
