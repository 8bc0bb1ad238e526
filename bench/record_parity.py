"""The record preset against R1's own train_gpt.py (PR #1855), part by part, on CPU at small dims:
the counterpart of bench/reference_parity.py for the #1 record.

    python bench/record_parity.py                       # R1's script in bench/reference/r1/ (git-ignored)
    python bench/record_parity.py --reference PATH/train_gpt.py --json out.json

R1's script imports flash_attn_interface (FlashAttention 3, CUDA only): this bench puts the parity
benches' CPU stand-in (bench/parity_common.py) in sys.modules first (plain causal SDPA per row;
varlen: one causal SDPA per cu_seqlens segment), and otherwise calls R1's functions as they are: its
GPT, loader, collect_hessians, gptq_mixed_quantize and Muon (@torch.compile unwrapped to its eager
function, CUDA streams in its Optimizers made no-ops). Nothing of R1's math is edited. pgolf's side is the
record preset (presets/record.yaml) with only the sizes shrunk, so a preset value that is not
R1's shows up here.

Model: 6 layers x 384 (6 heads of 64, 3 KV heads: R1's head size, so its 16 RoPE dims), MLP x4,
vocab 512, loop 2..3 x2, parallel lanes from 4, XSA everywhere, SmearGate, sparse gate; big
enough that every matrix is over R1's 65,536-value passthrough threshold, so gptq_mixed_quantize
runs unmodified. pgolf's weights are drawn at random and copied into R1's banks.

Rows of the table (max abs or relative difference, or counts):
  logits       R1's forward_logits vs pgolf's, looping on/off, R1's varlen segments (a flat row,
               cu_seqlens from its _build_cu_seqlens) vs doc_attention + doc_attention_max_len,
               and plain causal rows; plus pgolf's old layout (rows of train_seq_len) for contrast
  loader       R1's DocumentPackingLoader vs pgolf's (flat_batches) on the same shards: tokens
               and attention segments, batch by batch, over shard changes, on 2 ranks
  hessians     R1's collect_hessians vs pgolf's (calib_doc_attention false) on the same batches
  gptq         R1's gptq_mixed_quantize vs pgolf's quantize_state (record gptq config): codes,
               scales, int8 gates, LQER factors
  step         one training step: loss and gradients of both models on one batch, the clip norm,
               then one optimizer step of every group (Muon banks, token AdamW, scalar AdamW)
               from the same gradients: R1's Optimizers vs pgolf's build_optimizers, in bf16 as
               R1 runs (muon_bf16) and in fp32 (R1's statements with bf16 read as fp32)
  schedules    lr multiplier, Muon momentum warm-up and looping start over R1's logged run
  ema          R1's EMA statements vs pgolf's EMA over a parameter path
  artifact     an artifact R1's serialize() code writes (pergroup and brotli), read by pgolf's own
               reader (pgolf import-r1) and scored by its flat eval vs R1's deserialize + eval_val
  ttt          R1's eval_val_ttt_phased vs pgolf's evaluate_ttt, LoRA only and with 3 phases of
               global SGD: totals and every document's loss (each LoRA gets the A R1 drew)
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import math
import re
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from pgolf.data.loader import DocumentPackingLoader  # noqa: E402
from pgolf.train.optimizers import build_optimizers  # noqa: E402
from pgolf.model.families import declared_families  # noqa: E402
from pgolf.quant.policy import quantize_state  # noqa: E402
from pgolf.data.shards import write_shard  # noqa: E402
from pgolf.model.config import ModelConfig  # noqa: E402
from pgolf.model.docmask import segment_ids  # noqa: E402
from pgolf.model.gpt import GPT  # noqa: E402
from pgolf.typed_params import from_dict  # noqa: E402
from pgolf.quant.hessian import collect_hessians  # noqa: E402
from tasks import gptq as gptq_stage  # noqa: E402
from runner import params as presets  # noqa: E402
from tasks import train as train_stage  # noqa: E402
from parity_common import (  # noqa: E402
    eval_stream, install_flash_attention, pgolf_eval_of_r1, random_pgolf, sparse_pgolf, tiny_overrides)

SIZES = dict(vocab_size=512, num_layers=6, model_dim=384, num_heads=6, num_kv_heads=3, loop_start=2, loop_end=3,
             parallel_start_layer=4, xsa_last_n=6)
SEQ_LEN = 128  # train_seq_len (and doc_attention_max_len) at this scale; R1 2048
BOS = 1
ROWS = ("logits", "loader", "hessians", "gptq", "step", "schedules", "ema", "artifact", "ttt")
# pgolf's names -> the script's, where they differ (the AsymLogit pair: PR #2135's script, which this bench's
# helpers also serve: bench/pr2135_parity.py)
RENAMED = {"smear.gate": "smear_gate.weight", "smear.lam": "smear_lambda", "softcap.pos": "softcap_pos",
           "softcap.neg": "softcap_neg"}


# --- R1's script with a CPU FlashAttention -------------------------------------------------------

def load_r1(script: Path):
    install_flash_attention("flash_attn_interface")
    spec = importlib.util.spec_from_file_location("r1_train_gpt", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # main() runs only as __main__
    module.BOS_ID = BOS
    # eager Newton-Schulz: the same function without its @torch.compile wrapper
    module.zeropower_via_newtonschulz5 = getattr(module.zeropower_via_newtonschulz5, "_torchdynamo_orig_callable",
                                                 module.zeropower_via_newtonschulz5)
    return module


@contextlib.contextmanager
def cpu_for_r1():
    """R1 pins loader memory and steps its Adams on a side CUDA stream: both are no-ops here."""
    saved = (torch.Tensor.pin_memory, torch.empty, torch.cuda.Stream, torch.cuda.stream, torch.cuda.current_stream)
    real_empty = torch.empty

    class Stream:
        def wait_stream(self, other):
            pass

    torch.Tensor.pin_memory = lambda self, *a, **k: self
    torch.empty = lambda *a, pin_memory=False, **k: real_empty(*a, **k)
    torch.cuda.Stream, torch.cuda.current_stream = Stream, lambda *a: Stream()
    torch.cuda.stream = lambda s: contextlib.nullcontext()
    try:
        yield
    finally:
        torch.Tensor.pin_memory, torch.empty, torch.cuda.Stream, torch.cuda.stream, torch.cuda.current_stream = saved


def r1_hyperparameters(ref, cfg: ModelConfig, tcfg: train_stage.Config, qcfg: gptq_stage.Config, shards: Path):
    """R1's Hyperparameters as its run set them (train_seed42.log), at this bench's sizes."""
    h = ref.Hyperparameters()
    values = dict(vocab_size=cfg.vocab_size, num_layers=cfg.num_layers, model_dim=cfg.model_dim,
                  num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads, mlp_mult=cfg.mlp_mult,
                  xsa_last_n=cfg.xsa_last_n, rope_dims=cfg.rope_dims, rope_yarn=cfg.rope_yarn,
                  qk_gain_init=cfg.qk_gain_init, num_loops=cfg.num_loops, loop_start=cfg.loop_start,
                  loop_end=cfg.loop_end, parallel_start_layer=cfg.parallel_start_layer,
                  smear_gate_enabled=True, gate_window=cfg.gate_window, sparse_attn_gate_enabled=True,
                  sparse_attn_gate_scale=cfg.sparse_attn_gate_scale, fused_ce_enabled=False,
                  train_seq_len=SEQ_LEN, eval_seq_len=SEQ_LEN, train_files=str(shards / "fineweb_train_*.bin"),
                  matrix_lr=tcfg.matrix_lr, scalar_lr=tcfg.scalar_lr, tied_embed_lr=tcfg.tied_embed_lr,
                  muon_momentum=tcfg.muon_momentum, muon_wd=tcfg.muon_wd, embed_wd=tcfg.embed_wd,
                  adam_wd=tcfg.adam_wd, beta1=tcfg.beta1, beta2=tcfg.beta2, adam_eps=tcfg.adam_eps,
                  muon_row_normalize=True, muon_backend_steps=tcfg.muon_backend_steps,
                  gated_attn_quant_gate=True, embed_bits=qcfg.embed_bits, matrix_bits=qcfg.bits,
                  embed_clip_sigmas=qcfg.embed_clip_sigmas, mlp_clip_sigmas=qcfg.mlp_clip_sigmas,
                  attn_clip_sigmas=qcfg.attn_clip_sigmas, lqer_enabled=True, lqer_rank=qcfg.lqer_rank,
                  lqer_top_k=qcfg.lqer_top_k, lqer_asym_enabled=True, lqer_asym_group=qcfg.lqer_group,
                  rank=0, world_size=1, is_main_process=False, logfile=None)
    for k, v in values.items():
        setattr(h, k, v)
    ref.set_logging_hparams(h)  # is_main_process False: its log() stays quiet
    return h


# --- pgolf's record preset at the bench's sizes ----------------------------------------------------

def record_configs() -> tuple[ModelConfig, train_stage.Config, gptq_stage.Config]:
    rendered = presets.render("record")
    model = {**rendered["train"]["model"], **SIZES, "doc_attention_max_len": SEQ_LEN}
    train = from_dict(train_stage.Config, {**rendered["train"], "model": model, "train_seq_len": SEQ_LEN,
                                           "nproc": 1, "device": "cpu", "compile": False}, "record")
    model = train.model
    return model, train, from_dict(gptq_stage.Config, rendered["gptq"], "record")


def to_r1_state(model: GPT, r1_model) -> dict[str, torch.Tensor]:
    """pgolf's parameters under R1's names: matrices into its banks, lane lambdas into its [L, ...]."""
    n = model.cfg.num_layers
    sd = {k: v.detach().clone() for k, v in r1_model.state_dict().items()}
    ours = model.state_dict()
    for i in range(n):
        sd["qo_bank"][i], sd["qo_bank"][n + i] = ours[f"blocks.{i}.attn.c_q.weight"], ours[f"blocks.{i}.attn.proj.weight"]
        sd["kv_bank"][i], sd["kv_bank"][n + i] = ours[f"blocks.{i}.attn.c_k.weight"], ours[f"blocks.{i}.attn.c_v.weight"]
        sd["mlp_up_bank"][i], sd["mlp_down_bank"][i] = ours[f"blocks.{i}.mlp.fc.weight"], ours[f"blocks.{i}.mlp.proj.weight"]
    for name, t in ours.items():
        if re.search(r"\.(c_q|c_k|c_v|proj|fc)\.weight$", name) and name.startswith("blocks."):
            continue
        lanes = re.fullmatch(r"blocks\.(\d+)\.(parallel_(?:post|resid)_lambdas)", name)
        if lanes:
            sd[lanes.group(2)][int(lanes.group(1))] = t
            continue
        r1_name = RENAMED.get(name, name.replace(".attn.gate.", ".attn."))
        if r1_name not in sd or sd[r1_name].shape != t.shape:
            raise KeyError(f"{name} has no counterpart in R1's GPT ({r1_name})")
        sd[r1_name] = t.clone()
    return sd


def r1_named_grads(model: GPT, r1_model) -> dict[str, torch.Tensor]:
    """R1's gradients (or parameters) under pgolf's names, the inverse of to_r1_state."""
    n = model.cfg.num_layers
    r1 = dict(r1_model.named_parameters())
    out = {}
    for name, _ in model.named_parameters():
        m = re.fullmatch(r"blocks\.(\d+)\.(attn\.c_q|attn\.proj|attn\.c_k|attn\.c_v|mlp\.fc|mlp\.proj)\.weight", name)
        lanes = re.fullmatch(r"blocks\.(\d+)\.(parallel_(?:post|resid)_lambdas)", name)
        if m:
            i, kind = int(m.group(1)), m.group(2)
            bank, idx = {"attn.c_q": ("qo_bank", i), "attn.proj": ("qo_bank", n + i), "attn.c_k": ("kv_bank", i),
                         "attn.c_v": ("kv_bank", n + i), "mlp.fc": ("mlp_up_bank", i), "mlp.proj": ("mlp_down_bank", i)}[kind]
            out[name] = (r1[bank], idx)
        elif lanes:
            out[name] = (r1[lanes.group(2)], int(lanes.group(1)))
        else:
            r1_name = RENAMED.get(name, name.replace(".attn.gate.", ".attn."))
            out[name] = (r1[r1_name], None)
    return out


def pick(param_and_index, what: str) -> torch.Tensor:
    p, idx = param_and_index
    t = p.grad if what == "grad" else p.detach()
    return t if idx is None else t[idx]


# --- data ------------------------------------------------------------------------------------------

def write_shards(folder: Path, vocab: int, seed: int = 0) -> None:
    """Two train shards of [BOS] + tokens documents, some longer than SEQ_LEN, the first shard
    starting inside a document (the fragment R1's loader skips)."""
    rng = np.random.default_rng(seed)
    for index in range(2):
        tokens = list(rng.integers(2, vocab, 37))
        while len(tokens) < 6000:
            length = int(rng.choice([5, 40, 90, SEQ_LEN - 1, SEQ_LEN, 300]))
            tokens += [BOS] + list(rng.integers(2, vocab, length))
        write_shard(folder / f"fineweb_train_{index:06d}.bin", np.array(tokens, dtype=np.int64))


def partition(labels: list[int]) -> list[tuple[int, int]]:
    """Runs of equal labels as (start, end); segments are contiguous in both codes."""
    runs, start = [], 0
    for i in range(1, len(labels) + 1):
        if i == len(labels) or labels[i] != labels[i - 1]:
            runs.append((start, i))
            start = i
    return runs


def cu_partition(cu: torch.Tensor) -> list[tuple[int, int]]:
    bounds = sorted(set(cu.tolist()))
    return list(zip(bounds, bounds[1:]))


# --- the comparisons -------------------------------------------------------------------------------

@torch.no_grad()
def compare_logits(ref, ours: GPT, theirs, tokens: torch.Tensor) -> dict:
    row = tokens[None, : 4 * SEQ_LEN]
    bos = (row[0] == BOS).nonzero(as_tuple=True)[0].tolist()
    cu, max_len = ref._build_cu_seqlens(bos, row.size(1), row.device, SEQ_LEN, 64)
    rows = row.reshape(4, SEQ_LEN)
    out = {}
    for looping in (True, False):
        ours.set_looping(looping)
        theirs.looping_active = looping
        tag = "loop" if looping else "noloop"
        ours.set_doc_attention(True)
        a, b = ours.forward_logits(row), theirs.forward_logits(row, cu_seqlens=cu, max_seqlen=max_len)
        out[f"varlen_{tag}"] = float((a - b).abs().max())
        out[f"max_abs_logit_{tag}"] = float(b.abs().max())
        if looping:
            old = ours.forward_logits(rows).reshape(1, -1, a.size(-1))  # pgolf before issue 13: rows of seq_len
            out["rows_layout_positions_differing"] = int(((old - b).abs().amax(-1) > 1e-3).sum())
            out["positions"] = row.size(1)
        ours.set_doc_attention(False)
        a, b = ours.forward_logits(rows), theirs.forward_logits(rows)
        out[f"causal_{tag}"] = float((a - b).abs().max())
    ours.set_doc_attention(True)
    ours.set_looping(True)
    theirs.looping_active = True
    return out


def compare_loaders(ref, h, shards: Path, cfg: ModelConfig, batches: int = 12) -> dict:
    world, global_tokens = 2, 2 * 4 * SEQ_LEN
    equal_tokens = equal_segments = total = 0
    shard_changes = 0
    with cpu_for_r1():
        r1_loaders = []
        for rank in range(world):
            h.rank, h.world_size = rank, world
            r1_loaders.append(ref.DocumentPackingLoader(h, torch.device("cpu")))
        h.rank, h.world_size = 0, 1
        ours = [DocumentPackingLoader(shards, r, world, torch.device("cpu"), cfg.vocab_size, BOS, flat=True)
                for r in range(world)]
        last_file = ours[0].file_index
        for _ in range(batches):
            for rank in range(world):
                x, y, cu, _ = r1_loaders[rank].next_batch(global_tokens, 1)
                ox, oy = ours[rank].next_batch(global_tokens, SEQ_LEN, 1)
                total += 1
                equal_tokens += int(torch.equal(x, ox) and torch.equal(y, oy))
                seg = segment_ids(ox, BOS, cfg.doc_attention_max_len)[0].tolist()
                equal_segments += int(partition(seg) == cu_partition(cu))
            shard_changes += int(ours[0].file_index != last_file)
            last_file = ours[0].file_index
    return {"batches": total, "tokens_equal": equal_tokens, "segments_equal": equal_segments,
            "shard_changes": shard_changes}


def calibration_rows(shards: Path, count: int, seed: int = 1) -> list[torch.Tensor]:
    tokens = np.fromfile(sorted(shards.glob("fineweb_train_*.bin"))[0], dtype="<u2", offset=1024).astype(np.int64)
    rng = np.random.default_rng(seed)
    return [torch.from_numpy(np.stack([tokens[s:s + SEQ_LEN] for s in rng.integers(0, len(tokens) - SEQ_LEN, 4)]))
            for _ in range(count)]


def compare_hessians(ref, h, ours: GPT, theirs, batches: list[torch.Tensor]) -> tuple[dict, dict, dict]:
    class Batches:  # R1's collect_hessians asks its loader for (x, y)
        def __init__(self):
            self.it = iter(batches)

        def next_batch(self, *_):
            return next(self.it), None

    # calibration follows training, which ends with looping on (R1's serialize gets base_model so)
    theirs.looping_active = True
    ours.set_looping(True)
    r1_h = ref.collect_hessians(theirs, Batches(), h, torch.device("cpu"), n_calibration_batches=len(batches))
    per_batch = batches[0].numel()
    ours.set_doc_attention(False)
    plain, _ = collect_hessians(ours, batches, torch.device("cpu"))
    ours.set_doc_attention(True)
    masked, _ = collect_hessians(ours, batches, torch.device("cpu"))

    def rel(a, b):
        return float((a - b).abs().max() / b.abs().max())

    names = sorted(r1_h)
    assert set(names) == set(plain), (sorted(set(names) ^ set(plain)))[:5]
    scaled = {n: r1_h[n] / per_batch for n in names}  # R1 averages per batch, pgolf per token
    out = {"hessians": len(names), "max_rel_calib_doc_attention_false": max(rel(plain[n], scaled[n]) for n in names),
           "differing_with_doc_mask": sum(rel(masked[n], scaled[n]) > 1e-4 for n in names),
           "max_rel_with_doc_mask": max(rel(masked[n], scaled[n]) for n in names)}
    return out, r1_h, plain


def compare_gptq(ref, h, ours: GPT, theirs, r1_h: dict, our_h: dict, qcfg: gptq_stage.Config) -> dict:
    r1_state = ref._unbank_state_dict(theirs.state_dict(), ours.cfg.num_layers)
    r1_q, meta = ref.gptq_mixed_quantize(r1_state, r1_h, h)
    state = {k: v.detach().cpu() for k, v in ours.state_dict().items()}
    qm, _ = quantize_state(state, our_h, qcfg, {}, declared_families(ours))
    ours_t = qm.tensors
    codes = same_codes = 0
    scales_equal = gates_equal = True
    lqer = {"tensors_r1": 0, "tensors_pgolf": 0, "factors_equal": 0}
    for name, kind in meta.items():
        pg = name.replace(".attn.attn_gate_w", ".attn.gate.attn_gate_w")
        pg = {"smear_gate.weight": "smear.gate", "smear_lambda": "smear.lam"}.get(pg, pg)
        if kind.startswith("gptq"):
            a, b = r1_q[name + ".q"], ours_t[pg + ".q"]
            codes += a.numel()
            same_codes += int((a == b).sum())
            scales_equal &= torch.equal(r1_q[name + ".scale"], ours_t[pg + ".scale"])
            if "lqer" in kind:
                lqer["tensors_r1"] += 1
                keys = [".lqA_a", ".lqAs_a", ".lqB_a", ".lqBs_a"] if "asym" in kind else [".lqA", ".lqAs", ".lqB", ".lqBs"]
                equal = all(pg + k in ours_t and torch.equal(r1_q[name + k].flatten(), ours_t[pg + k].flatten())
                            for k in keys)
                lqer["factors_equal"] += int(equal)
                if not equal:  # the factors fit the residual of the codes: where those differ, so may they
                    lqer.setdefault("unequal", {})[pg] = {
                        "codes_equal_fraction": float((a == b).float().mean()),
                        "factor_values_equal_fraction": float(torch.cat([
                            (r1_q[name + k].flatten() == ours_t[pg + k].flatten()).float() for k in keys
                            if pg + k in ours_t and r1_q[name + k].numel() == ours_t[pg + k].numel()]).mean())}
        elif kind == "gate_int8_row":
            gates_equal &= torch.equal(r1_q[name + ".gq"], ours_t[pg + ".q"]) and torch.equal(r1_q[name + ".gs"], ours_t[pg + ".scale"])
    lqer["tensors_pgolf"] = sum(1 for k in ours_t if k.endswith((".lqA_a", ".lqA")))
    return {"codes": codes, "codes_equal_fraction": same_codes / max(codes, 1), "scales_bit_equal": bool(scales_equal),
            "gates_int8_equal": bool(gates_equal), "lqer": lqer}


@contextlib.contextmanager
def r1_in_fp32():
    """R1's Muon hard-codes bf16 (its buffers, the gradient cast, Newton-Schulz). For the formula
    check its statements run unchanged with bf16 read as fp32, so both sides round alike."""
    saved = torch.bfloat16, torch.Tensor.bfloat16
    torch.bfloat16, torch.Tensor.bfloat16 = torch.float32, lambda self, *a, **k: self.float()
    try:
        yield
    finally:
        torch.bfloat16, torch.Tensor.bfloat16 = saved


def optimizer_kind(name: str, tensor: torch.Tensor) -> str:
    if name == "tok_emb.weight":
        return "embed"
    return "muon" if tensor.ndim == 2 and re.search(r"\.(c_q|c_k|c_v|proj|fc)\.weight$", name) else "scalar"


def one_step(ref, h, cfg: ModelConfig, tcfg: train_stage.Config, grads: dict[str, torch.Tensor], bf16: bool) -> tuple[dict, dict]:
    """Both optimizers, freshly built, take one step from the same weights and the same (clipped)
    gradients; returns each side's update per pgolf parameter."""
    ours = random_pgolf(cfg)
    theirs = ref.GPT(h)
    theirs.load_state_dict(to_r1_state(ours, theirs))
    mapping = r1_named_grads(ours, theirs)
    for p in theirs.parameters():
        p.grad = torch.zeros_like(p)  # R1's [L, ...] lane lambdas: rows of layers without lanes get zeros
    for n, p in ours.named_parameters():
        if n in grads:
            p.grad = grads[n].clone()
            r1_param, idx = mapping[n]
            (r1_param.grad if idx is None else r1_param.grad[idx]).copy_(grads[n])
    before = {n: p.detach().clone() for n, p in ours.named_parameters()}
    optimizers = build_optimizers(ours, dataclasses.replace(tcfg, muon_bf16=bf16), fused=False)
    optimizers[0].param_groups[0]["momentum"] = tcfg.muon_momentum_warmup_start
    for opt in optimizers:
        opt.step()
    with cpu_for_r1(), (contextlib.nullcontext() if bf16 else r1_in_fp32()):
        r1_opt = ref.Optimizers(h, theirs)
        for group in r1_opt.optimizer_muon.param_groups:
            group["momentum"] = tcfg.muon_momentum_warmup_start
        r1_opt.step(distributed=False)
    ours_delta = {n: p.detach() - before[n] for n, p in ours.named_parameters() if n in grads}
    theirs_delta = {n: pick(mapping[n], "param") - before[n] for n in ours_delta}
    return ours_delta, theirs_delta


def compare_step(ref, h, cfg: ModelConfig, tcfg: train_stage.Config, batch: tuple[torch.Tensor, torch.Tensor]) -> dict:
    """A training step in two halves. Loss and gradients: both models' backward on the same batch.
    The update: both optimizers from the same gradients (pgolf's, clipped), so that the step's own
    arithmetic is compared and not gradient rounding, which Adam's first step g/(|g|+eps) blows up
    for entries near eps. fp32: R1's Muon read in fp32 (r1_in_fp32), so the formulas are compared
    at one rounding. bf16: R1 as it runs against muon_bf16; bf16 Newton-Schulz is not bit-stable
    (a batched and a single CPU matmul already differ), so the gap is set beside R1's own bf16
    against its fp32 result (`r1_bf16_vs_fp32`), the rounding R1 itself carries."""
    x, y = batch
    ours = random_pgolf(cfg)
    theirs = ref.GPT(h)
    theirs.load_state_dict(to_r1_state(ours, theirs))
    for block in theirs.blocks:
        block.mlp.use_fused = False  # its Triton MLP needs CUDA; the eager one is its own math too
    theirs.looping_active = True
    ours.set_looping(True)
    ours.train(), theirs.train()
    loss_ours = ours(x, y)
    loss_ours.backward()
    bos = (x[0] == BOS).nonzero(as_tuple=True)[0].tolist()
    cu, _ = ref._build_cu_seqlens(bos, x.size(1), x.device, SEQ_LEN, 64)
    loss_theirs = theirs(x, y, cu_seqlens=cu, max_seqlen=SEQ_LEN)
    loss_theirs.backward()
    loss_ours, loss_theirs = loss_ours.detach(), loss_theirs.detach()
    mapping = r1_named_grads(ours, theirs)
    used = {n for n, p in ours.named_parameters() if p.grad is not None}
    out = {"loss_abs": abs(float(loss_ours) - float(loss_theirs)),
           "grad_max_rel": max(float((p.grad - pick(mapping[n], "grad")).abs().max()
                                     / pick(mapping[n], "grad").abs().max().clamp_min(1e-30))
                               for n, p in ours.named_parameters() if n in used),
           # the clip norm: as both compute it (fp32; torch's reduction over R1's million-entry
           # banks rounds more than over pgolf's matrices) and exactly (fp64)
           "clip_norm_fp64_rel": abs(math.sqrt(sum(float(p.grad.double().norm()) ** 2 for p in ours.parameters() if p.grad is not None))
                                     / math.sqrt(sum(float(p.grad.double().norm()) ** 2 for p in theirs.parameters()
                                                 if p.grad is not None)) - 1)}
    norm_ours = torch.nn.utils.clip_grad_norm_(ours.parameters(), tcfg.grad_clip_norm)
    norm_theirs = torch.nn.utils.clip_grad_norm_(theirs.parameters(), tcfg.grad_clip_norm)
    out["clip_norm_fp32_rel"] = abs(float(norm_ours) / float(norm_theirs) - 1)
    grads = {n: p.grad.detach().clone() for n, p in ours.named_parameters() if n in used}
    # Parameters no forward reads (the lane lambdas of layers without lanes): R1's AdamW decays its
    # rows of them, pgolf's have no gradient and stay; neither model's output changes.
    out["unread"] = sorted(n for n, _ in ours.named_parameters() if n not in used)
    fp32_ours, fp32_theirs = one_step(ref, h, cfg, tcfg, grads, bf16=False)
    bf16_ours, bf16_theirs = one_step(ref, h, cfg, tcfg, grads, bf16=True)

    def per_kind(a: dict, b: dict, frobenius: bool) -> dict:
        worst: dict[str, float] = {}
        for n, delta in a.items():
            kind = optimizer_kind(n, delta)
            gap = ((delta - b[n]).norm() / b[n].norm().clamp_min(1e-30) if frobenius
                   else (delta - b[n]).abs().max() / b[n].abs().max().clamp_min(1e-30))
            worst[kind] = max(worst.get(kind, 0.0), float(gap))
        return worst

    out["fp32_max_rel"] = per_kind(fp32_ours, fp32_theirs, frobenius=False)
    out["bf16_rel_frobenius"] = per_kind(bf16_ours, bf16_theirs, frobenius=True)
    out["r1_bf16_vs_fp32_rel_frobenius"] = per_kind(bf16_theirs, fp32_theirs, frobenius=True)
    return out


# --- whole-run schedules and EMA: R1 keeps them inside train_model ----------------------------------

R1_RUN = dict(steps=4945, train_ms=599_592.0)  # R1's train_seed42.log: stopping_early at step 4945, 599,592 ms


def r1_inner(ref, names: tuple[str, ...]) -> dict:
    """Statements of R1's train_model taken out of its source as they are (ast, not edited):
    the nested functions `names`, the Muon momentum warm-up (the `if step <= ...` in step_fn) and
    the EMA update (the `with torch.no_grad()` over _ema_pairs), each compiled on its own."""
    import ast
    import inspect
    tree = ast.parse(inspect.getsource(ref))
    train_model = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "train_model")
    found = {}
    for node in ast.walk(train_model):
        if isinstance(node, ast.FunctionDef) and node.name in names:
            found[node.name] = node
        elif isinstance(node, ast.If) and "muon_momentum_warmup_steps" in ast.unparse(node.test):
            found["momentum"] = node
        elif isinstance(node, ast.With) and "_ema_pairs" in ast.unparse(node):
            found["ema"] = node
    missing = (set(names) | {"momentum", "ema"}) - set(found)
    if missing:
        raise SystemExit(f"R1's train_model has no {sorted(missing)}: another version of its script?")
    return {k: compile(ast.Module([v], []), f"r1:train_model:{k}", "exec") for k, v in found.items()}


def compare_schedules(ref, h, tcfg: train_stage.Config) -> dict:
    from pgolf.optim.schedule import muon_momentum, training_fraction, warmdown_multiplier
    code = r1_inner(ref, ("training_frac", "lr_mul"))
    cap_ms = 1e3 * tcfg.max_wallclock_seconds - 1e3 * tcfg.gptq_reserve_seconds
    for k in ("warmdown_frac", "min_lr", "muon_momentum", "muon_momentum_warmup_start",
              "muon_momentum_warmup_steps", "iterations", "enable_looping_at"):
        setattr(h, k, getattr(tcfg, k) if hasattr(tcfg, k) else getattr(tcfg.model, k))
    space = {"h": h, "max_wallclock_ms": cap_ms}
    exec(code["training_frac"], space)
    exec(code["lr_mul"], space)

    class Group(dict):
        pass

    groups = [Group()]
    space["optimizers"] = types.SimpleNamespace(optimizer_muon=types.SimpleNamespace(param_groups=groups))
    step_ms = R1_RUN["train_ms"] / R1_RUN["steps"]
    lr_diff = mom_diff = 0.0
    loop_r1 = loop_ours = None
    for step in range(R1_RUN["steps"]):
        elapsed = step * step_ms
        frac_r1 = space["training_frac"](step, elapsed)
        frac = training_fraction(step, elapsed, tcfg.iterations, cap_ms)
        lr_diff = max(lr_diff, abs(space["lr_mul"](frac_r1) - warmdown_multiplier(frac, tcfg.warmdown_frac, tcfg.min_lr)))
        space["step"] = step
        exec(code["momentum"], space)  # R1 leaves the momentum as it was after its warm-up
        ours = muon_momentum(step, tcfg.muon_momentum_warmup_start, tcfg.muon_momentum, tcfg.muon_momentum_warmup_steps)
        mom_diff = max(mom_diff, abs(groups[0]["momentum"] - ours))
        loop_r1 = step if loop_r1 is None and frac_r1 >= h.enable_looping_at else loop_r1
        loop_ours = step if loop_ours is None and frac >= tcfg.model.enable_looping_at else loop_ours
    return {"steps": R1_RUN["steps"], "lr_scale_max_abs": lr_diff, "muon_momentum_max_abs": mom_diff,
            "looping_from_step": {"r1": loop_r1, "pgolf": loop_ours}}


def compare_ema(ref, cfg: ModelConfig, tcfg: train_stage.Config, steps: int = 20) -> dict:
    """pgolf's EMA and R1's update statement over the same parameter trajectory."""
    from pgolf.optim.ema import EMA
    code = r1_inner(ref, ())
    model = random_pgolf(cfg, seed=3)
    ema = EMA(model, tcfg.ema_decay)
    live = model.state_dict(keep_vars=True)
    ema_state = {name: t.detach().float().clone() for name, t in live.items()}  # R1's initial copy
    space = {"torch": torch, "ema_decay": tcfg.ema_decay, "_ema_pairs": [(ema_state[n], t) for n, t in live.items()]}
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for _ in range(steps):
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.01)
            ema.update(model)
            exec(code["ema"], space)
    diff = max(float((ema.shadow[n] - ema_state[n]).abs().max()) for n in ema_state)
    return {"steps": steps, "decay": tcfg.ema_decay, "tensors": len(ema_state), "max_abs": diff}


# --- an artifact R1's serialize() wrote, read and scored by pgolf ---------------------------------

LRZIP_STANDIN = '''#!{python}
"""Stand-in for the lrzip program (not installed here): zlib behind lrzip's command line, for
R1's _lrzip_compress/_lrzip_decompress and pgolf's reader alike. Only the coder is replaced."""
import sys, zlib
args = sys.argv[1:]
out = args[args.index("-o") + 1]
data = open(args[-1], "rb").read()
open(out, "wb").write(zlib.compress(data, 9) if "-z" in args else zlib.decompress(data))
'''


@contextlib.contextmanager
def lrzip_on_path(folder: Path):
    """The real lrzip when installed; else the stand-in above, first on PATH."""
    import os
    import shutil
    if shutil.which("lrzip"):
        yield "lrzip"
        return
    script = folder / "lrzip"
    script.write_text(LRZIP_STANDIN.format(python=sys.executable))
    script.chmod(0o755)
    saved = os.environ["PATH"]
    os.environ["PATH"] = f"{folder}{os.pathsep}{saved}"
    try:
        yield "zlib stand-in"
    finally:
        os.environ["PATH"] = saved


def write_r1_artifact(ref, h, theirs, hessians: dict, form: str, path: Path) -> None:
    """What R1's serialize() does after collecting Hessians (which needs CUDA there): its
    _unbank_state_dict, gptq_mixed_quantize, then _serialize_pergroup or torch.save + _compress."""
    import io
    quant_result, quant_meta = ref.gptq_mixed_quantize(ref._unbank_state_dict(theirs.state_dict(), h.num_layers), hessians, h)
    if form == "pergroup":
        with tempfile.TemporaryDirectory() as tmp:
            blob = ref._serialize_pergroup(quant_result, quant_meta, h.num_layers, tmp)
    else:
        buffer = io.BytesIO()
        torch.save({"w": quant_result, "m": quant_meta}, buffer)
        blob = ref._compress(buffer.getvalue(), form)
    path.write_bytes(blob)


def r1_eval(ref, h, path: Path, form: str, tokens: torch.Tensor, byte_counts: torch.Tensor, fp32: bool) -> tuple[float, float]:
    """R1's deserialize() then eval_val on `tokens`; fp32: its eval model cast to fp32 (its bf16
    embedding keeps its bf16 values), else as deserialize() leaves it (bf16 activations on CPU)."""
    import types as _types
    h.quantized_model_path, h.compressor = str(path), form if form != "pergroup" else "brotli"
    model = ref.deserialize(h, torch.device("cpu"))
    model.looping_active = True  # as R1's train_and_eval sets it on its eval model
    if fp32:
        model.float()
    for block in model.blocks:
        block.mlp.use_fused = False
    val = _types.SimpleNamespace(val_tokens=tokens, val_bytes=byte_counts)
    with torch.no_grad():
        return ref.eval_val(h, torch.device("cpu"), val, model)


def compare_artifact(ref, h, theirs, cfg: ModelConfig, hessians: dict, stream: torch.Tensor, folder: Path) -> dict:
    batch_seqs = 4
    h.val_batch_tokens = batch_seqs * SEQ_LEN * h.world_size * h.grad_accum_steps  # R1: one row of 4 windows
    tokens, byte_counts = eval_stream(stream, windows=4 * batch_seqs, seq_len=SEQ_LEN)
    out = {}
    with lrzip_on_path(folder) as coder:
        for form in ("pergroup", "brotli"):
            path = folder / f"final_model.{form}.int6.ptz"
            write_r1_artifact(ref, h, theirs, hessians, form, path)
            r1_loss, r1_bpb = r1_eval(ref, h, path, form, tokens, byte_counts, fp32=True)
            r1_bf16_loss, r1_bf16_bpb = r1_eval(ref, h, path, form, tokens, byte_counts, fp32=False)
            loss, bpb, seen, _ = pgolf_eval_of_r1(path, cfg, tokens, byte_counts, batch_seqs, SEQ_LEN)
            out[form] = {"bytes": path.stat().st_size, "read_as": seen, "r1_val_bpb": r1_bpb, "pgolf_val_bpb": bpb,
                         "bpb_abs": abs(bpb - r1_bpb), "loss_abs": abs(loss - r1_loss),
                         "r1_bf16_bpb_abs": abs(r1_bf16_bpb - r1_bpb)}
        out["lrzip"] = coder
    out["targets"] = int(tokens.numel() - 1)
    return out


# --- LoRA TTT and phased global-SGD TTT: R1's eval_val_ttt_phased vs pgolf's evaluate_ttt ----------

def ttt_settings(phases: int, prefix_docs: int):
    """The record preset's eval.lora at this bench's sizes."""
    from pgolf.evaluate.config import TTTSettings
    lora = presets.render("record")["eval"]["lora"]
    return from_dict(TTTSettings, {**lora, "context": SEQ_LEN, "batch_docs": 4, "phases": phases,
                                   "prefix_docs": prefix_docs, "global_chunk_tokens": 4 * SEQ_LEN,
                                   "global_seq_len": SEQ_LEN, "global_batch_seqs": 4}, "record eval.lora")


def r1_ttt_hyperparameters(h, s) -> None:
    values = dict(ttt_lora_rank=s.rank, ttt_lora_lr=s.lr, ttt_beta1=s.beta1, ttt_beta2=s.beta2,
                  ttt_weight_decay=s.weight_decay, ttt_chunk_size=s.chunk, ttt_eval_seq_len=s.context,
                  ttt_batch_size=s.batch_docs, ttt_grad_steps=1, ttt_k_lora=True, ttt_mlp_lora=True, ttt_o_lora=True,
                  ttt_optimizer="adam", ttt_eval_batches="", val_doc_fraction=1.0,
                  phased_ttt_prefix_docs=s.prefix_docs if s.phases else 0, phased_ttt_num_phases=max(s.phases, 1),
                  global_ttt_lr=s.global_lr, global_ttt_momentum=s.global_momentum, global_ttt_epochs=1,
                  global_ttt_chunk_tokens=s.global_chunk_tokens, global_ttt_batch_seqs=s.global_batch_seqs,
                  global_ttt_warmup_chunks=0, global_ttt_warmup_start_lr=0.0, global_ttt_grad_clip=s.global_clip,
                  global_ttt_respect_doc_boundaries=True, eval_seq_len=s.global_seq_len)
    for k, v in values.items():
        setattr(h, k, v)


def r1_ttt(ref, h, s, model_state: dict, tokens: torch.Tensor, byte_counts: torch.Tensor, folder: Path):
    """R1's eval_val_ttt_phased on a copy of the model: (val_loss, val_bpb), the loss of every
    document in its processing order, and the A of every LoRA it built, in order."""
    import types as _types
    r1_ttt_hyperparameters(h, s)
    h.run_id = f"bench-{folder.name}"
    model = ref.GPT(h)
    model.load_state_dict(model_state)
    model.looping_active = True
    for block in model.blocks:
        block.mlp.use_fused = False
    ref.BatchedLinearLoRA._ALPHA, ref.BatchedLinearLoRA._WARM_START_A = s.alpha, s.warm_start_a
    built, per_doc = [], []
    real_init, real_accumulate = ref.BatchedTTTLoRA.__init__, ref._accumulate_bpb

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        built.append({name: p.detach().clone() for name, p in self.named_parameters() if name.endswith(".A")})

    def accumulate(ptl, x, y, chunk_offsets, chunk_lens, pos_idx, *args, **kwargs):
        pos = pos_idx[: x.size(1)].unsqueeze(0)
        mask = (pos >= chunk_offsets.unsqueeze(1)) & (pos < (chunk_offsets + chunk_lens).unsqueeze(1))
        rows = (ptl.double() * mask).sum(dim=1).tolist()
        if bool((chunk_offsets == 0).all()):  # a batch's first chunk: a new batch of documents
            per_doc.append([0.0] * len(rows))
        per_doc[-1] = [a + b for a, b in zip(per_doc[-1], rows)]
        return real_accumulate(ptl, x, y, chunk_offsets, chunk_lens, pos_idx, *args, **kwargs)

    ref.BatchedTTTLoRA.__init__, ref._accumulate_bpb = init, accumulate
    try:
        val = _types.SimpleNamespace(val_tokens=tokens, val_bytes=byte_counts, caseops_enabled=True,
                                     base_bytes_lut=None, has_leading_space_lut=None, is_boundary_token_lut=None)
        with cpu_for_r1():
            loss, bpb = ref.eval_val_ttt_phased(h, model, torch.device("cpu"), val,
                                                lambda x, y, lora: model.forward_ttt(x, y, lora=lora))
    finally:
        ref.BatchedTTTLoRA.__init__, ref._accumulate_bpb = real_init, real_accumulate
    return loss, bpb, [d for batch in per_doc for d in batch], built


def pgolf_ttt(cfg: ModelConfig, s, tokens: torch.Tensor, byte_counts: torch.Tensor, r1_adapters: list[dict]):
    """pgolf's evaluate_ttt on the same weights, each LoRA it builds given the A R1 drew for its
    counterpart (both draw A at random; the rest of the run is each side's own)."""
    from pgolf.evaluate import lora_ttt
    from pgolf.evaluate.lora_ttt import evaluate_ttt, find_documents
    queue = list(r1_adapters)
    real = lora_ttt.DocumentAdapters

    class WithR1sA(real):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            drawn = queue.pop(0)
            with torch.no_grad():
                self.head.A.copy_(drawn["lm_head_lora.A"])
                for slot, layer in enumerate(self.layers):
                    for ours, theirs in (("q", "q_loras"), ("k", "k_loras"), ("v", "v_loras"), ("o", "o_loras"),
                                         ("mlp", "mlp_loras")):
                        layer[ours].A.copy_(drawn[f"{theirs}.{slot}.A"])

    lora_ttt.DocumentAdapters = WithR1sA
    try:
        model = random_pgolf(cfg)
        result, summary, nll = evaluate_ttt(model, tokens.numpy(), byte_counts.numpy().astype(np.int64), s,
                                            torch.device("cpu"), BOS)
    finally:
        lora_ttt.DocumentAdapters = real
    docs = find_documents(tokens.numpy(), BOS)
    ascending = sorted(range(len(docs)), key=lambda i: (docs[i][1] - docs[i][0], i))
    batches = [ascending[i:i + s.batch_docs] for i in range(0, len(ascending), s.batch_docs)]
    batches.sort(key=lambda b: -max(docs[d][1] - docs[d][0] for d in b))  # R1's processing order
    per_doc = [float(np.sum(nll[docs[d][0] + 1:docs[d][1]])) for b in batches for d in b]
    return result.val_loss, result.val_bpb, per_doc, summary, len(queue)


def compare_ttt(ref, h, cfg: ModelConfig, stream: torch.Tensor, folder: Path) -> dict:
    tokens = stream[:4000].clone()
    tokens[0] = BOS
    rng = np.random.default_rng(4)
    byte_counts = torch.from_numpy(rng.integers(1, 7, tokens.numel()).astype(np.int32))
    state = None
    out = {}
    for label, phases in (("lora", 0), ("phased", 3)):
        s = ttt_settings(phases, prefix_docs=12)
        ours_model = random_pgolf(cfg)
        theirs = ref.GPT(h)
        state = to_r1_state(ours_model, theirs)
        r1_loss, r1_bpb, r1_docs, adapters = r1_ttt(ref, h, s, state, tokens, byte_counts, folder)
        loss, bpb, docs, summary, unused = pgolf_ttt(cfg, s, tokens, byte_counts, adapters)
        r1_docs, docs = np.array(r1_docs), np.array(docs)
        out[label] = {"documents": len(docs), "phases": [p["boundary"] for p in summary["phases"]],
                      "bpb_abs": abs(bpb - r1_bpb), "loss_abs": abs(loss - r1_loss),
                      "doc_loss_max_rel": float(np.max(np.abs(docs - r1_docs) / np.maximum(np.abs(r1_docs), 1e-12))),
                      "adapters_built": {"r1": len(adapters), "pgolf_unused_r1": unused}}
    return out


def write_fixture(ref, folder: Path) -> dict:
    """tests/golden/r1_tiny/: a tiny R1 model's artifact as R1's code writes it (brotli, and
    pergroup through the lrzip stand-in), eval tokens and bytes, and R1's eval_val of it, for the
    CPU test of `pgolf import-r1` that runs where R1's script is not."""
    folder.mkdir(parents=True, exist_ok=True)
    overrides = tiny_overrides(SEQ_LEN)
    rendered = presets.render("record", overrides)
    cfg = from_dict(ModelConfig, rendered["train"]["model"], "tiny")
    _, tcfg, qcfg = record_configs()
    with tempfile.TemporaryDirectory() as tmp:
        shards = Path(tmp)
        write_shards(shards, cfg.vocab_size, seed=5)
        h = r1_hyperparameters(ref, cfg, tcfg, qcfg, shards)
        ours = sparse_pgolf(cfg, seed=5)
        theirs = ref.GPT(h)
        theirs.load_state_dict(to_r1_state(ours, theirs))
        theirs.eval()
        _, r1_h, _ = compare_hessians(ref, h, ours, theirs, calibration_rows(shards, 2))
        stream = torch.from_numpy(np.fromfile(shards / "fineweb_train_000001.bin", dtype="<u2", offset=1024).astype(np.int64))
        batch_seqs = 2
        h.val_batch_tokens = batch_seqs * SEQ_LEN * h.world_size * h.grad_accum_steps
        tokens, byte_counts = eval_stream(stream, windows=2 * batch_seqs, seq_len=SEQ_LEN)
        expected = {"overrides": overrides, "seq_len": SEQ_LEN,
                    "batch_seqs": batch_seqs, "forms": {}}
        with lrzip_on_path(shards) as coder:
            for form in ("brotli", "pergroup"):
                path = folder / f"final_model.{form}.int6.ptz"
                write_r1_artifact(ref, h, theirs, r1_h, form, path)
                loss, bpb = r1_eval(ref, h, path, form, tokens, byte_counts, fp32=True)
                expected["forms"][form] = {"file": path.name, "r1_val_loss": loss, "r1_val_bpb": bpb,
                                           "lrzip": coder if form == "pergroup" else None}
    tokens.numpy().astype("<u2").tofile(folder / "val_tokens.u16")
    byte_counts.numpy().astype("<u2").tofile(folder / "val_bytes.u16")
    (folder / "r1_eval.json").write_text(json.dumps(expected, indent=1, sort_keys=True) + "\n")
    return expected


def progress(what: str, started: list[float]) -> None:
    import time
    now = time.perf_counter()
    print(f"[{now - started[0]:7.1f} s] {what}", file=sys.stderr, flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", type=Path, default=ROOT / "bench/reference/r1/train_gpt.py")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--rows", help=f"comma-separated subset of {','.join(ROWS)} (default: all)")
    parser.add_argument("--write-fixture", type=Path, metavar="DIR",
                        help="write the R1 artifact fixture of tests/test_r1_artifact.py to DIR (tests/golden/r1_tiny) and stop")
    args = parser.parse_args()
    if not args.reference.is_file():
        parser.error(f"{args.reference}: R1's train_gpt.py is not there (bench/reference/ is git-ignored; copy "
                     "records/track_10min_16mb/2026-04-27_SP8192_LQER_SparseGate_BOSSmearFix_9HpStack_1.0611/ there)")
    import time
    t0 = [time.perf_counter()]
    ref = load_r1(args.reference)
    progress("R1 loaded", t0)
    if args.write_fixture:
        print(json.dumps(write_fixture(ref, args.write_fixture), indent=1))
        return 0
    torch.set_num_threads(max(1, torch.get_num_threads()))
    cfg, tcfg, qcfg = record_configs()
    report = {}
    with tempfile.TemporaryDirectory() as tmp:
        shards = Path(tmp)
        write_shards(shards, cfg.vocab_size)
        h = r1_hyperparameters(ref, cfg, tcfg, qcfg, shards)
        ours = random_pgolf(cfg)
        theirs = ref.GPT(h)
        theirs.load_state_dict(to_r1_state(ours, theirs))
        theirs.eval(), ours.eval()
        report["params"] = {"pgolf": sum(p.numel() for p in ours.parameters()),
                            "r1_used": sum(p.numel() for p in theirs.parameters())}
        want = set(args.rows.split(",")) if args.rows else set(ROWS)
        if want - set(ROWS):
            parser.error(f"--rows: unknown {sorted(want - set(ROWS))}; rows are {','.join(ROWS)}")
        stream = torch.from_numpy(np.fromfile(shards / "fineweb_train_000000.bin", dtype="<u2", offset=1024).astype(np.int64))
        if "logits" in want:
            progress("logits", t0)
            report["logits"] = compare_logits(ref, ours, theirs, stream[37:])
            print(json.dumps({"logits": report["logits"]}), file=sys.stderr, flush=True)
        if "loader" in want:
            progress("loader", t0)
            report["loader"] = compare_loaders(ref, h, shards, cfg)
            print(json.dumps({"loader": report["loader"]}), file=sys.stderr, flush=True)
        if want & {"hessians", "gptq", "artifact"}:
            progress("hessians", t0)
            report["hessians"], r1_h, our_h = compare_hessians(ref, h, ours, theirs, calibration_rows(shards, 4))
            print(json.dumps({"hessians": report["hessians"]}), file=sys.stderr, flush=True)
        if "gptq" in want:
            progress("gptq", t0)
            report["gptq"] = compare_gptq(ref, h, ours, theirs, r1_h, our_h, qcfg)
            print(json.dumps({"gptq": report["gptq"]}), file=sys.stderr, flush=True)
        if "step" in want:
            progress("step", t0)
            loader = DocumentPackingLoader(shards, 0, 1, torch.device("cpu"), cfg.vocab_size, BOS, flat=True)
            report["step"] = compare_step(ref, h, cfg, tcfg, loader.next_batch(2 * SEQ_LEN, SEQ_LEN, 1))
            print(json.dumps({"step": report["step"]}), file=sys.stderr, flush=True)
        if "schedules" in want:
            progress("schedules", t0)
            report["schedules"] = compare_schedules(ref, h, tcfg)
            print(json.dumps({"schedules": report["schedules"]}), file=sys.stderr, flush=True)
        if "ema" in want:
            progress("ema", t0)
            report["ema"] = compare_ema(ref, cfg, tcfg)
            print(json.dumps({"ema": report["ema"]}), file=sys.stderr, flush=True)
        if "artifact" in want:
            progress("artifact", t0)
            report["artifact"] = compare_artifact(ref, h, theirs, cfg, r1_h, stream, shards)
            print(json.dumps({"artifact": report["artifact"]}), file=sys.stderr, flush=True)
        if "ttt" in want:
            progress("ttt", t0)
            report["ttt"] = compare_ttt(ref, h, cfg, stream, shards)
            print(json.dumps({"ttt": report["ttt"]}), file=sys.stderr, flush=True)
    print(json.dumps(report, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
