"""GPTQ against round-to-nearest, its edge cases, and the stage's passthrough rules."""
from __future__ import annotations

import json

import pytest
import torch

from pgolf.quant.quantized_model import load_quantized
from pgolf.quant.gptq import QuantError, gptq_quantize, output_error, quantize_rtn, sdclip_scales
from tasks import gptq as gptq_stage
from runner.stage import execute


def correlated_layer(rows=48, cols=96, tokens=4096, seed=0):
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(cols, cols, generator=g) / cols**0.5
    x = torch.randn(tokens, cols, generator=g) @ mixing + 0.1 * torch.randn(tokens, cols, generator=g)
    w = torch.randn(rows, cols, generator=g) * 0.05
    return w, x.T @ x / tokens


def errors(w, h, bits, clip=12.85, **kw):
    codes, scale, _, _ = gptq_quantize(w, h, bits, clip, **kw)
    s = sdclip_scales(w, bits, clip)
    assert torch.equal(scale.float(), s) and codes.dtype == torch.int8
    assert codes.abs().max() <= 2 ** (bits - 1) - 1
    gptq = output_error(w, codes.float() * s[:, None], h)
    rtn = output_error(w, quantize_rtn(w, s, bits) * s[:, None], h)
    return gptq, rtn


def test_gptq_beats_round_to_nearest_on_correlated_inputs():
    w, h = correlated_layer()
    gptq, rtn = errors(w, h, 6)
    assert gptq < 0.7 * rtn


def test_more_bits_less_error_and_act_order_and_blocks_work():
    w, h = correlated_layer(seed=1)
    assert errors(w, h, 8)[0] < errors(w, h, 6)[0]
    plain, _ = errors(w, h, 6, act_order=False, block_size=16)
    ordered, rtn = errors(w, h, 6, act_order=True, block_size=16)
    assert plain < rtn and ordered < rtn
    # Blocks only batch the error updates (lazy across blocks): every block size, down to one
    # column, gives the codes of a single block over all 96 columns, in either order, up to a code
    # that float summation order tips over a rounding boundary (none here; 18-25% without the
    # cross-block update).
    for act_order in (False, True):
        whole = gptq_quantize(w, h, 6, 12.85, act_order=act_order, block_size=w.size(1)).codes
        for block_size in (1, 16, 40):
            blocked = gptq_quantize(w, h, 6, 12.85, act_order=act_order, block_size=block_size).codes
            assert (blocked != whole).float().mean() < 0.01, (act_order, block_size)
    # Inputs whose scales span two decades: quantizing the loud columns first (act order) leaves the
    # quiet ones to absorb the error, which plain left-to-right order cannot (measured ratio 0.57-0.66).
    loud = torch.logspace(-1, 1, h.size(0))[torch.randperm(h.size(0), generator=torch.Generator().manual_seed(1))]
    h = loud[:, None] * h * loud[None, :]
    plain, _ = errors(w, h, 4, act_order=False, block_size=16)
    ordered, _ = errors(w, h, 4, act_order=True, block_size=16)
    assert ordered < 0.8 * plain
    plain_codes = gptq_quantize(w, h, 4, 12.85, act_order=False, block_size=16).codes
    ordered_codes = gptq_quantize(w, h, 4, 12.85, act_order=True, block_size=16).codes
    assert (plain_codes != ordered_codes).float().mean() > 0.2  # measured 0.49


def test_dead_columns_get_zero_codes():
    w, h = correlated_layer(rows=8, cols=32)
    h[5, :] = 0
    h[:, 5] = 0
    result = gptq_quantize(w, h, 6, 12.85)
    assert not result.codes[:, 5].any() and result.codes[:, 4].any()
    assert result.dead_columns == 1 and result.damp == 0.01


def test_singular_hessian_is_rescued_by_damping_and_bad_ones_are_errors():
    w, _ = correlated_layer(rows=8, cols=16)
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(2))
    rank_deficient = x.T @ x  # rank 4 of 16: needs the damping
    with pytest.raises(torch.linalg.LinAlgError):  # as asked, the damping is too small to factor it
        torch.linalg.cholesky(rank_deficient + 1e-10 * rank_deficient.diagonal().mean() * torch.eye(16))
    result = gptq_quantize(w, rank_deficient, 6, 12.85, damp=1e-10)
    assert result.codes.shape == w.shape and result.damp > 1e-10  # recovered by a retry with 10x the damping
    with pytest.raises(QuantError, match="not positive definite"):
        gptq_quantize(w, -torch.eye(16), 6, 12.85)
    with pytest.raises(QuantError, match="non-finite"):
        gptq_quantize(w, torch.full((16, 16), float("nan")), 6, 12.85, name="blocks.0.attn.c_q.weight")
    with pytest.raises(QuantError, match="does not match"):
        gptq_quantize(w, torch.eye(8), 6, 12.85)


def test_scales_are_fp16_exact_and_clip_at_k_sigma():
    w = torch.randn(4, 256)
    w[0, 0] = 100.0  # an outlier is clipped at the row's k sigma, not allowed to set the scale
    s = sdclip_scales(w, 6, 12.85)
    assert torch.equal(s, s.half().float())
    q = quantize_rtn(w, s, 6)
    assert q[0, 0] == 31


@pytest.fixture(scope="module")
def trained(data_dirs, tmp_path_factory):
    from pgolf.model.config import ModelConfig
    from pgolf.model.gpt import GPT
    from pgolf.model.io import save_model
    from tests.conftest import TINY_MODEL

    torch.manual_seed(0)
    model = GPT(ModelConfig(**TINY_MODEL))
    for block in model.blocks:
        torch.nn.init.normal_(block.attn.proj.weight, std=0.05)
        torch.nn.init.normal_(block.mlp.proj.weight, std=0.05)
    folder = tmp_path_factory.mktemp("train")
    save_model(model, model.cfg, folder)
    return folder


def run_gptq(data_dirs, trained, out, **kw):
    cfg = gptq_stage.Config(**{"calib_batches": 2, "calib_seq_len": 32, "calib_batch_seqs": 4, "device": "cpu",
                               "passthrough_max_numel": 512, **kw})
    return execute(gptq_stage.SPEC, cfg, {"train": trained, "shards": data_dirs["shards"]}, out)


def test_stage_quantizes_matrices_and_passes_small_tensors(data_dirs, trained, tmp_path):
    summary = run_gptq(data_dirs, trained, tmp_path / "q")
    qm = load_quantized(tmp_path / "q/quantized.safetensors")
    kinds = {n: e["kind"] for n, e in qm.entries.items()}
    assert kinds["tok_emb.weight"] == "gptq" and kinds["blocks.0.attn.c_q.weight"] == "gptq"
    assert kinds["blocks.0.attn_scale"] == "passthrough" and kinds["skip_weights"] == "passthrough"
    assert qm.tensors["blocks.0.mlp.fc.weight.q"].dtype == torch.int8
    assert qm.tensors["blocks.0.mlp.fc.weight.scale"].dtype == torch.float16
    assert qm.tensors["blocks.0.attn_scale"].dtype == torch.float16
    report = json.loads((tmp_path / "q/report.json").read_text())
    assert summary["mean_error"] < summary["mean_rtn_error"]
    assert report["tensors"]["blocks.1.mlp.proj.weight"]["ratio"] < 1.0
    deq = qm.dequantize()
    assert set(deq) == set(kinds) and all(v.dtype == torch.float32 for v in deq.values())


def test_stage_reports_dead_inputs_and_zeroes_their_weights(data_dirs, tmp_path):
    """A hidden unit that never fires (its fc row is zero, relu^2 keeps it at 0) is a dead column of
    mlp.proj's Hessian: GPTQ zeroes that column and report.json counts it."""
    from pgolf.model.config import ModelConfig
    from pgolf.model.gpt import GPT
    from pgolf.model.io import save_model
    from tests.conftest import TINY_MODEL

    torch.manual_seed(0)
    model = GPT(ModelConfig(**TINY_MODEL))
    with torch.no_grad():
        for block in model.blocks:
            torch.nn.init.normal_(block.mlp.proj.weight, std=0.05)
        model.blocks[0].mlp.fc.weight[3] = 0.0
    (tmp_path / "train").mkdir()
    save_model(model, model.cfg, tmp_path / "train")
    summary = run_gptq(data_dirs, tmp_path / "train", tmp_path / "q")
    report = json.loads((tmp_path / "q/report.json").read_text())["tensors"]
    assert report["blocks.0.mlp.proj.weight"]["dead_columns"] == 1 and summary["dead_columns"] == 1
    assert report["blocks.1.mlp.proj.weight"]["dead_columns"] == 0 and summary["tensors_damped_more"] == 0
    codes = load_quantized(tmp_path / "q/quantized.safetensors").tensors["blocks.0.mlp.proj.weight.q"]
    assert not codes[:, 3].any() and codes[:, 2].any()


def test_same_inputs_same_quantized_bytes(data_dirs, trained, tmp_path):
    run_gptq(data_dirs, trained, tmp_path / "a")
    run_gptq(data_dirs, trained, tmp_path / "b")
    assert (tmp_path / "a/quantized.safetensors").read_bytes() == (tmp_path / "b/quantized.safetensors").read_bytes()


def test_family_bits_and_clip_sigmas_follow_the_names():
    cfg = gptq_stage.Config(bits=6, embed_bits=7, clip_sigmas=12.85, attn_clip_sigmas=13.0, mlp_clip_sigmas=11.5,
                            embed_clip_sigmas=14.0)
    assert cfg.family("tok_emb.weight") == (7, 14.0)
    assert cfg.family("blocks.3.mlp.fc.weight") == (6, 11.5)
    assert cfg.family("blocks.3.attn.c_q.weight") == (6, 13.0)
    assert cfg.family("bigram.proj.weight") == (6, 12.85)
    assert gptq_stage.Config().family("blocks.0.mlp.fc.weight") == (6, 12.85)


def test_lqer_removes_error_and_dequantizes_with_its_correction():
    from pgolf.quant.lqer import correction, low_rank_factors, pack_factors

    torch.manual_seed(0)
    error = torch.randn(64, 4) @ torch.randn(4, 128) * 0.1  # exactly rank 4
    a, b = low_rank_factors(error, 4)
    assert torch.allclose(a @ b, error, atol=1e-5)
    # 4 x 128 = 512 splits into groups of 64 (INT2 A, INT4 B) but not of 48 (INT4 both, per row):
    # the coarse INT2 A keeps less of the correction, which is what R1 trades for bytes.
    for group, key, kept in ((64, ".lqA_a", 0.75), (48, ".lqA", 0.3)):
        packed = pack_factors(a, b, group)
        assert key in packed
        tensors = {"w" + k: v for k, v in packed.items()}
        approx = correction(tensors, "w", group)
        assert torch.linalg.matrix_norm(error - approx) < kept * torch.linalg.matrix_norm(error)
    qa = pack_factors(a, b, 64)[".lqA_a"]
    assert qa.min() >= -2 and qa.max() <= 1  # INT2
    assert pack_factors(a, b, 64)[".lqB_a"].abs().max() <= 8  # INT4


def test_stage_with_families_gates_and_lqer(data_dirs, tmp_path):
    from pgolf.model.config import ModelConfig
    from pgolf.model.gpt import GPT
    from pgolf.model.io import save_model
    from tests.conftest import TINY_MODEL

    torch.manual_seed(0)
    model = GPT(ModelConfig(**TINY_MODEL, attn_gate="sparse", attn_gate_width=16))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    (tmp_path / "train").mkdir()
    save_model(model, model.cfg, tmp_path / "train")
    summary = run_gptq(data_dirs, tmp_path / "train", tmp_path / "q", embed_bits=7, gate_int8=True, lqer_rank=2,
                       lqer_top_k=2, mlp_clip_sigmas=11.5)
    assert summary["tensors_int8_row"] == 2 and summary["tensors_lqer"] == 2
    qm = load_quantized(tmp_path / "q/quantized.safetensors")
    assert qm.entries["tok_emb.weight"]["bits"] == 7 and qm.tensors["tok_emb.weight.q"].abs().max() <= 63
    assert qm.entries["blocks.0.attn.gate.attn_gate_w"]["kind"] == "int8_row"
    report = json.loads((tmp_path / "q/report.json").read_text())["tensors"]
    corrected = [r for r in report.values() if "lqer" in r]
    assert len(corrected) == 2 and all(r["lqer"]["error_removed"] > 0 for r in corrected)
    deq = qm.dequantize()
    gate = model.state_dict()["blocks.0.attn.gate.attn_gate_w"]
    assert torch.allclose(deq["blocks.0.attn.gate.attn_gate_w"], gate, atol=gate.abs().max().item() / 100)


def test_self_generated_calibration_is_deterministic_and_starts_at_bos(data_dirs, trained, tmp_path):
    from pgolf.model.io import load_model
    from pgolf.quant.hessian import self_generated_batches

    model, cfg = load_model(trained)
    a = list(self_generated_batches(model, 2, 3, 12, 0.8, 7, cfg.bos_id, torch.device("cpu")))
    b = list(self_generated_batches(model, 2, 3, 12, 0.8, 7, cfg.bos_id, torch.device("cpu")))
    assert [t.shape for t in a] == [(3, 12), (3, 12)] and all(torch.equal(x, y) for x, y in zip(a, b))
    assert (a[0][:, 0] == cfg.bos_id).all()
    summary = run_gptq(data_dirs, trained, tmp_path / "q", calib_source="self", calib_seq_len=16)
    assert summary["calib_source"] == "self" and summary["calib_tokens"] == 2 * 4 * 16
    assert summary["mean_error"] < summary["mean_rtn_error"]


@pytest.mark.parametrize("source,batches", [("train", 3), ("self", 1)])
def test_calibration_spread_over_two_ranks_is_one_process_calibration(data_dirs, trained, tmp_path, source, batches):
    """nproc 2 (torchrun, gloo): batch i calibrates on rank i mod 2 and the Hessians are summed over
    ranks (with 1 batch, rank 1 has none and adds zeros). Same tokens, the same Hessians, so the same
    quantized.safetensors bytes as one process."""
    one = run_gptq(data_dirs, trained, tmp_path / "one", calib_source=source, calib_batches=batches)
    two = run_gptq(data_dirs, trained, tmp_path / "two", calib_source=source, calib_batches=batches, nproc=2)
    assert two["calib_ranks"] == 2 and one["calib_ranks"] == 1
    assert two["calib_tokens"] == one["calib_tokens"] == batches * 4 * 32
    assert two["mean_error"] == one["mean_error"] and two["hessian_seconds"] > 0
    assert (tmp_path / "one/quantized.safetensors").read_bytes() == (tmp_path / "two/quantized.safetensors").read_bytes()
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())


def test_hessians_do_not_depend_on_how_batches_are_grouped(trained):
    """What two ranks compute, in one process: the batches in another order sum to the same float32
    Hessians (the float64 totals absorb the order), and they are x^T x / tokens."""
    from pgolf.model.io import load_model
    from pgolf.quant.hessian import collect_hessians

    model, _ = load_model(trained)
    g = torch.Generator().manual_seed(5)
    batches = [torch.randint(0, 400, (4, 32), generator=g) for _ in range(5)]
    in_order, tokens = collect_hessians(model, batches, torch.device("cpu"))
    regrouped, _ = collect_hessians(model, batches[0::2] + batches[1::2], torch.device("cpu"))
    assert tokens == 5 * 4 * 32 and set(in_order) == set(regrouped)
    assert all(torch.equal(in_order[n], regrouped[n]) for n in in_order)
    x = torch.cat([model.hidden(b).reshape(-1, model.cfg.model_dim) for b in batches]).double()
    assert torch.allclose(in_order["tok_emb.weight"].double(), x.T @ x / tokens, rtol=1e-5, atol=1e-7)


def percentile_clip(a: torch.Tensor) -> torch.Tensor:
    """The 99.99984th percentile of each row of `a`, linearly interpolated between the two order
    statistics around the float32 position q (n - 1), computed here from a sort."""
    n = a.size(-1)
    ordered = a.sort(dim=-1).values
    position = torch.tensor(0.9999984, dtype=torch.float32) * (n - 1)
    below = int(position)
    return torch.lerp(ordered[..., below], ordered[..., min(below + 1, n - 1)], position - below)


def test_baseline_int8_is_the_baseline_rule():
    """int8_clean_per_row_v1 (docs/lineage.md#model-formats) against the rule computed here step by step: the
    codes, the stored scales and the dequantized weights are the same bits."""
    from pgolf.quant.baseline_int8 import quantize_baseline_int8

    g = torch.Generator().manual_seed(0)
    matrix = torch.randn(300, 400, generator=g) * 0.02
    matrix[3, 7] = 5.0  # an outlier that the 99.99984th percentile clips
    matrix[5] = 0.0  # a dead row: scale floors at 1/127
    embedding = (torch.randn(400, 200, generator=g) * 0.05).bfloat16()  # the baseline trains it in bf16
    state = {"blocks.0.mlp.fc.weight": matrix, "long_vector": torch.randn(70_000, generator=g),
             "tok_emb.weight": embedding.float(), "blocks.0.attn_scale": torch.randn(400, generator=g),
             "blocks.0.norm_gain": torch.randn(400, generator=g), "blocks.0.resid_mix": torch.randn(2, 400, generator=g),
             "step": torch.tensor(7)}
    qm, report = quantize_baseline_int8(state, {}, {"tok_emb.weight": "bfloat16"})
    deq = qm.dequantize()
    for name in ("blocks.0.mlp.fc.weight", "tok_emb.weight"):
        w = state[name]
        clip = percentile_clip(w.abs())
        scale = torch.where(clip / 127 > 1 / 127, clip / 127, torch.tensor(1 / 127))
        codes = torch.round(torch.minimum(torch.maximum(w, -clip[:, None]), clip[:, None]) / scale[:, None])
        assert torch.equal(qm.tensors[f"{name}.q"], codes.clamp(-127, 127).to(torch.int8)), name
        assert torch.equal(qm.tensors[f"{name}.scale"], scale.half()), name
        expected = qm.tensors[f"{name}.q"].float() * scale.half().float()[:, None]
        assert torch.equal(deq[name], expected if name != "tok_emb.weight" else expected.bfloat16().float()), name
        assert qm.entries[name]["kind"] == "int8_row"
    assert qm.entries["tok_emb.weight"]["dtype"] == "bfloat16"
    assert not torch.equal(deq["tok_emb.weight"], qm.tensors["tok_emb.weight.q"].float()
                           * qm.tensors["tok_emb.weight.scale"].float()[:, None])  # the bf16 rounding is real
    assert qm.tensors["blocks.0.mlp.fc.weight.q"][3, 7] == 127
    assert qm.tensors["blocks.0.mlp.fc.weight.scale"][5] == torch.tensor(1 / 127).half()
    v = state["long_vector"]
    vclip = percentile_clip(v.abs())
    assert qm.entries["long_vector"]["kind"] == "int8_tensor"
    assert qm.tensors["long_vector.scale"].dtype == torch.float32 and qm.tensors["long_vector.scale"].ndim == 0
    assert torch.equal(qm.tensors["long_vector.scale"], vclip / 127)
    assert torch.equal(qm.tensors["long_vector.q"], torch.round(v.clamp(-vclip, vclip) / (vclip / 127)).to(torch.int8))
    assert torch.equal(deq["long_vector"], qm.tensors["long_vector.q"].float() * (vclip / 127))
    # control tensors stay fp32 exactly, other small floats go through fp16, integers stay
    for name in ("blocks.0.attn_scale", "blocks.0.resid_mix"):
        assert qm.tensors[name].dtype == torch.float32 and torch.equal(deq[name], state[name]), name
    assert qm.tensors["blocks.0.norm_gain"].dtype == torch.float16
    assert torch.equal(deq["blocks.0.norm_gain"], state["blocks.0.norm_gain"].half().float())
    assert torch.equal(qm.tensors["step"], state["step"])
    assert report["blocks.0.mlp.fc.weight"]["kind"] == "int8_row" and report["tok_emb.weight"]["error_fro"] > 0


def test_baseline_checkpoint_names_are_pgolf_names():
    """The bench's stand-in for a baseline final_model.pt, built from the baseline script's modules,
    has exactly the names and shapes of pgolf's GPT at the same shape (so it imports unchanged)."""
    from bench.reference_int8 import baseline_state_dict
    from pgolf.model.config import ModelConfig
    from pgolf.model.gpt import GPT

    for shape in (dict(vocab_size=64, num_layers=3, model_dim=32, num_heads=4, num_kv_heads=2),
                  dict(vocab_size=64, num_layers=4, model_dim=48, num_heads=3, num_kv_heads=1, tie_embeddings=False)):
        ours = {k: tuple(v.shape) for k, v in GPT(ModelConfig(**shape)).state_dict().items()}
        theirs = baseline_state_dict(**shape)
        assert {k: tuple(v.shape) for k, v in theirs.items()} == ours
        assert {k for k, v in theirs.items() if v.dtype != torch.float32} == {"tok_emb.weight"}


def test_imported_baseline_checkpoint_through_int8_baseline_pack_and_eval(data_dirs, tmp_path):
    """A baseline-style final_model.pt (bf16 embedding) -> train import -> gptq int8_baseline -> pack
    (zlib 9) -> eval: the artifact dequantizes to the baseline's own round trip and eval runs on it."""
    from bench.reference_int8 import baseline_state_dict
    from pgolf.pack.serialize import load_artifact
    from pgolf.quant.baseline_int8 import quantize_rows
    from tasks import evaluate as eval_stage, pack as pack_stage, train as train_stage
    from tests.conftest import TINY_MODEL

    shape = {**TINY_MODEL, "model_dim": 192, "num_heads": 4}  # embedding and MLP above 65,536 values
    checkpoint = baseline_state_dict(**shape, seed=1)
    torch.save(checkpoint, tmp_path / "final_model.pt")
    from pgolf.model.config import ModelConfig

    train_cfg = train_stage.Config(model=ModelConfig(**shape), import_from=str(tmp_path / "final_model.pt"))
    execute(train_stage.SPEC, train_cfg, {"shards": data_dirs["shards"]}, tmp_path / "train")
    assert json.loads((tmp_path / "train/config.json").read_text())["source_dtypes"] == {"tok_emb.weight": "bfloat16"}
    summary = run_gptq(data_dirs, tmp_path / "train", tmp_path / "q", method="int8_baseline")
    assert summary["method"] == "int8_baseline" and summary["tensors_int8"] == 1 + 2 * 2
    execute(pack_stage.SPEC, pack_stage.Config(compressor="zlib", level=9), {"gptq": tmp_path / "q"}, tmp_path / "p")
    deq = load_artifact(tmp_path / "p/artifact.bin").dequantize()
    assert {e["kind"] for e in load_quantized(tmp_path / "q/quantized.safetensors").entries.values()} == \
        {"int8_row", "passthrough"}
    codes, scale = quantize_rows(checkpoint["tok_emb.weight"])
    assert torch.equal(deq["tok_emb.weight"], (codes.float() * scale.float()[:, None]).bfloat16().float())
    assert torch.equal(deq["blocks.0.attn_scale"], checkpoint["blocks.0.attn_scale"])  # fp32 control tensor
    metrics = execute(eval_stage.SPEC, eval_stage.Config(seq_len=32, device="cpu"),
                      {"pack": tmp_path / "p", "shards": data_dirs["shards"], "tokenizer": data_dirs["tokenizer"]},
                      tmp_path / "e")
    # eval scores the baseline's own round trip: the metric of a model holding the dequantized weights
    from pgolf.data.shards import load_split
    from pgolf.evaluate.bpb import bytes_per_position, evaluate_bpb, truncate_val
    from pgolf.model.gpt import GPT
    from pgolf.tokenize.token_bytes import build_byte_luts, load_tokenizer

    model = GPT(ModelConfig(**shape))
    model.load_state_dict(deq)
    tokens = truncate_val(load_split(data_dirs["shards"], "val"), 32)
    sp, _ = load_tokenizer(data_dirs["tokenizer"])
    expected = evaluate_bpb(model, tokens, bytes_per_position(tokens, build_byte_luts(sp, 400), None), 32, 0, 32,
                            torch.device("cpu"))
    assert metrics["tokens"] == len(tokens) - 1 == expected.tokens
    assert metrics["val_bpb"] == pytest.approx(expected.val_bpb, rel=1e-9)


def test_calibration_without_the_document_mask_is_r1s_plain_causal(data_dirs, tmp_path):
    """calib_doc_attention false (the record preset): a doc_attention model calibrates as the same
    weights without the mask would (R1's collect_hessians passes no cu_seqlens); on, it differs."""
    from pgolf.model.config import ModelConfig
    from pgolf.model.gpt import GPT
    from pgolf.model.io import save_model
    from tests.conftest import TINY_MODEL

    torch.manual_seed(0)
    model = GPT(ModelConfig(**TINY_MODEL, doc_attention=True))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    plain = GPT(ModelConfig(**TINY_MODEL))
    plain.load_state_dict(model.state_dict())
    for name, m in (("doc", model), ("plain", plain)):
        (tmp_path / name).mkdir()
        save_model(m, m.cfg, tmp_path / name)
    run_gptq(data_dirs, tmp_path / "doc", tmp_path / "off", calib_doc_attention=False, calib_seq_len=128)
    run_gptq(data_dirs, tmp_path / "doc", tmp_path / "on", calib_seq_len=128)
    run_gptq(data_dirs, tmp_path / "plain", tmp_path / "ref", calib_seq_len=128)
    off, on, ref = (load_quantized(tmp_path / f"{n}/quantized.safetensors") for n in ("off", "on", "ref"))
    assert all(torch.equal(off.tensors[k], ref.tensors[k]) for k in ref.tensors)
    assert any(not torch.equal(on.tensors[k], ref.tensors[k]) for k in ref.tensors)


@pytest.fixture(scope="module")
def wide_trained(tmp_path_factory):
    """A model wide enough (MLP 4 x 128 = 512 columns) that BLAS and LAPACK split its sums over
    threads: with any solve left multi-threaded, one and two threads write other codes here."""
    from pgolf.model.config import ModelConfig
    from pgolf.model.gpt import GPT
    from pgolf.model.io import save_model
    from tests.conftest import TINY_MODEL

    torch.manual_seed(0)
    model = GPT(ModelConfig(**{**TINY_MODEL, "model_dim": 128, "num_heads": 4, "num_kv_heads": 2}))
    for block in model.blocks:
        torch.nn.init.normal_(block.attn.proj.weight, std=0.05)
        torch.nn.init.normal_(block.mlp.proj.weight, std=0.05)
    folder = tmp_path_factory.mktemp("wide_train")
    save_model(model, model.cfg, folder)
    return folder


def test_the_gptq_stage_writes_the_same_bytes_under_load_and_on_one_or_two_threads(data_dirs, wide_trained, tmp_path):
    """`python -m tasks.gptq` as DVC runs it, five times: two at once (each slowing the other) and
    with OMP_NUM_THREADS 1 and 2. A process that never pins its threads leaves MKL free to use fewer
    at run time, and a multi-threaded solve rounds by the thread count; either writes other codes."""
    import hashlib
    import subprocess
    import sys
    from concurrent.futures import ThreadPoolExecutor

    from tests.conftest import ROOT, stage_env, write_params

    params = write_params(tmp_path / "params.yaml", gptq=gptq_stage.Config(
        calib_batches=4, calib_seq_len=64, calib_batch_seqs=8, device="cpu", passthrough_max_numel=512, lqer_rank=2))

    def run(name: str, threads: str | None) -> str:
        env = stage_env(**({"OMP_NUM_THREADS": threads} if threads else {}))
        out = tmp_path / name
        subprocess.run([sys.executable, "-m", "tasks.gptq", "--params", str(params), "--train", str(wide_trained),
                        "--shards", str(data_dirs["shards"]), "--out", str(out)], cwd=ROOT, env=env, check=True,
                       capture_output=True)
        return hashlib.sha256((out / "quantized.safetensors").read_bytes()).hexdigest()

    with ThreadPoolExecutor(2) as pool:
        at_once = list(pool.map(lambda i: run(f"at_once{i}", None), range(3)))
    threads = [run("one_thread", "1"), run("two_threads", "2")]
    assert len(set(at_once + threads)) == 1, (at_once, threads)
