"""The pr2135 preset against PR #2135's own train_gpt.py, online_ngram_tilt.py and online_ngram_state.c
(docs/lineage.md#pr2135), part by part, on CPU at small dims: bench/record_parity.py's counterpart
for the standing #1, with its CPU FlashAttention and its weight mapping.

    python bench/pr2135_parity.py                 # the PR's folder in bench/reference/pr2135/ (git-ignored)
    python bench/pr2135_parity.py --rows tilt --stream-docs DOCS.jsonl.gz --json out.json

bench/reference/pr2135/ holds the PR's record folder as `git show refs/pull/2135/head:<folder>/<file>`
writes it (openai/parameter-golf; <folder> = records/track_10min_16mb/2026-05-01_SP8192_PR2130Base_Calib32):
train_gpt.py, online_ngram_tilt.py, online_ngram_state.c, train_seed42.log and
tokenizers/fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model. Its scripts run as written:
its Hyperparameters take every value its seed-42 log dumps (then this bench's sizes), its tilt
helper compiles its C file with gcc as it does on its first use, and FlashAttention is the parity
benches' CPU stand-in (bench/parity_common.py). Its run's environment (SMEAR_GATE_BOS_FIX=0,
TTT_LORA_EMA_DECAY=0, TTT_UPDATE_EVERY=1) is set as its README's command sets it. pgolf's side is the
pr2135 preset with the sizes shrunk: 6 layers x 384, vocab 512, train_seq_len 128, eval_seq_len 160
(2560/2048 of it).

Rows:
  settings   every preset value against the log's hyperparameters, else the script's default or the
             run command; what pgolf fixes (one lane mean, adapters on O and MLP) against its value
  params     the preset's model against the log's model_params; the bench model on both sides
  logits     forward_logits with the AsymLogit caps moved apart (7 and 11), looping on and off, its
             varlen segments cut at train_seq_len and at eval_seq_len, and plain causal rows
  step       one training step (record_parity's): loss, gradients, one optimizer update; the AsymLogit
             pair gets no gradient and no optimizer on either side
  gptq       Hessians from 32 calibration batches, then codes, scales, LQER (group 32), gates fp16
  ttt        its eval_val_ttt_phased (its settings: no K, one phase, context = eval_seq_len, lr 8e-5, wd 2)
             vs evaluate_ttt on the same weights, every LoRA given the A it drew: totals and every
             document's loss, plain and tilted (hints: its own build_hints_for_targets)
  tilt       hints: its build_hints_for_targets (its C state machine) vs token_hints on one stream,
             position for position; tilted losses: its apply_tilt_to_ptl_torch_fast vs score_tilted;
             the hint precompute's seconds on one core each, its C call alone and pgolf's
  artifact   an artifact its serialize() code writes (its pergroup frame and brotli), read by `pgolf
             import-r1`'s reader and scored by pgolf's flat eval vs its deserialize() + eval_val

--stream-docs DOCS.jsonl.gz: the tilt row's stream from real text, as the challenge's val stream is made
([BOS] + tokens per document: pgolf's CaseOps transform, the PR's tokenizer; cached in bench/out/).
Without it: a stream of documents quoting each other, 2M tokens.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gzip
import hashlib
import io
import json
import os
import re
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import record_parity as rp  # noqa: E402
from parity_common import (  # noqa: E402
    dig, eval_stream, logged_hyperparameters, pgolf_eval_of_r1, random_pgolf, sparse_pgolf, tiny_overrides)
from pgolf.evaluate.config import TTTSettings, TiltSettings  # noqa: E402
from pgolf.evaluate.lora_ttt import evaluate_ttt, find_documents  # noqa: E402
from pgolf.evaluate.ngram_tilt import TiltScorer, score_tilted, token_hints  # noqa: E402
from pgolf.model.config import ModelConfig  # noqa: E402
from pgolf.model.gpt import GPT, count_parameters, param_groups  # noqa: E402
from pgolf.typed_params import from_dict  # noqa: E402
from tasks import evaluate as eval_stage, gptq as gptq_stage, train as train_stage # noqa: E402
from runner import params as presets  # noqa: E402

FOLDER = "records/track_10min_16mb/2026-05-01_SP8192_PR2130Base_Calib32"
TOKENIZER = "tokenizers/fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model"
SEQ_LEN = rp.SEQ_LEN  # train_seq_len at this scale (the run: 2048)
EVAL_LEN = SEQ_LEN * 2560 // 2048  # eval_seq_len and ttt_eval_seq_len (the run: 2560)
BOS = rp.BOS
RUN_ENV = {"SMEAR_GATE_BOS_FIX": "0", "TTT_LORA_EMA_DECAY": "0.0", "TTT_UPDATE_EVERY": "1"}
ROWS = ("settings", "params", "logits", "step", "gptq", "ttt", "tilt", "artifact")
# values of the log this bench does not set: paths, the run's identity, its world
UNSET = {"artifact_dir", "data_dir", "datasets_dir", "logfile", "model_path", "quantized_model_path", "run_id",
         "tokenizer_path", "train_files", "val_files", "val_bytes_files", "distributed", "is_main_process", "rank",
         "local_rank", "world_size", "ttt_eval_batches"}


# --- the PR's script ----------------------------------------------------------------------------------

def logged_value(text: str, current):
    if isinstance(current, bool):
        return text == "True"
    if isinstance(current, int):
        return int(text)
    if isinstance(current, float):
        return float(text)
    if isinstance(current, list):
        return json.loads(text)
    return text


def load_pr(ref: Path):
    os.environ.update(RUN_ENV)
    sys.path.insert(0, str(ref))  # its eval imports online_ngram_tilt from beside it
    pr = rp.load_r1(ref / "train_gpt.py")

    class AsItsRunBuildsIt(pr.GPT):
        """Its train_model and deserialize build GPT(h).bfloat16() and return the parameters, not the
        buffers, to fp32 (restore_fp32_params): RoPE's inverse frequencies keep bf16 values. The same,
        then fp32 throughout for the CPU comparison."""

        def __init__(self, h):
            super().__init__(h)
            self.bfloat16()
            pr.restore_fp32_params(self)
            self.float()

    pr.GPT = AsItsRunBuildsIt
    return pr


def pr_hyperparameters(pr, ref: Path, cfg: ModelConfig, shards: Path):
    """Its Hyperparameters as its seed-42 run set them, then this bench's sizes."""
    h = pr.Hyperparameters()
    for key, text in logged_hyperparameters(ref / "train_seed42.log").items():
        if key not in UNSET and hasattr(h, key):
            setattr(h, key, logged_value(text, getattr(h, key)))
    sizes = dict(vocab_size=cfg.vocab_size, num_layers=cfg.num_layers, model_dim=cfg.model_dim,
                 num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads, mlp_mult=cfg.mlp_mult,
                 xsa_last_n=cfg.xsa_last_n, num_loops=cfg.num_loops, loop_start=cfg.loop_start, loop_end=cfg.loop_end,
                 parallel_start_layer=cfg.parallel_start_layer,
                 train_seq_len=SEQ_LEN, eval_seq_len=EVAL_LEN, ttt_eval_seq_len=EVAL_LEN,
                 train_files=str(shards / "fineweb_train_*.bin"), tokenizer_path=str(ref / TOKENIZER),
                 fused_ce_enabled=False,  # its Triton CE needs CUDA; its eager path is the same loss
                 ngram_tilt_enabled=False,  # the bench hands its eval the hints its own builder made
                 rank=0, world_size=1, is_main_process=False, logfile=None)
    for k, v in sizes.items():
        setattr(h, k, v)
    pr.set_logging_hparams(h)
    return h


# --- pgolf's pr2135 preset at the bench's sizes ----------------------------------------------------

def pgolf_configs():
    rendered = presets.render("pr2135")
    model = {**rendered["train"]["model"], **rp.SIZES, "doc_attention_max_len": SEQ_LEN}
    train = from_dict(train_stage.Config, {**rendered["train"], "model": model, "train_seq_len": SEQ_LEN,
                                           "nproc": 1, "device": "cpu", "compile": False}, "pr2135")
    return train.model, train, from_dict(gptq_stage.Config, rendered["gptq"], "pr2135"), rendered["eval"]


def pair_of_models(pr, h, cfg: ModelConfig, caps=(7.0, 11.0), seed: int = 0):
    """pgolf's model with every weight moved off its init and the AsymLogit caps set apart, and the PR's
    GPT holding the same weights."""
    ours = random_pgolf(cfg, seed)
    with torch.no_grad():
        ours.softcap.pos.fill_(caps[0])
        ours.softcap.neg.fill_(caps[1])
    theirs = pr.GPT(h)
    theirs.load_state_dict(rp.to_r1_state(ours, theirs))
    for block in theirs.blocks:
        block.mlp.use_fused = False
    return ours, theirs


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


# --- settings -------------------------------------------------------------------------------------

# (log key, preset path); a value the log does not dump comes from the script's default or the run command
SETTINGS = [
    ("vocab_size", "train.model.vocab_size"), ("num_layers", "train.model.num_layers"),
    ("model_dim", "train.model.model_dim"), ("num_heads", "train.model.num_heads"),
    ("num_kv_heads", "train.model.num_kv_heads"), ("mlp_mult", "train.model.mlp_mult"),
    ("rope_dims", "train.model.rope_dims"), ("rope_base", "train.model.rope_base"),
    ("rope_yarn", "train.model.rope_yarn"), ("qk_gain_init", "train.model.qk_gain_init"),
    ("ln_scale", "train.model.ln_scale"), ("xsa_last_n", "train.model.xsa_last_n"),
    ("skip_gates_enabled", "train.model.skip_gates"), ("parallel_start_layer", "train.model.parallel_start_layer"),
    ("num_loops", "train.model.num_loops"), ("loop_start", "train.model.loop_start"),
    ("loop_end", "train.model.loop_end"), ("enable_looping_at", "train.model.enable_looping_at"),
    ("gate_window", "train.model.gate_window"), ("gate_window", "train.model.attn_gate_width"),
    ("sparse_attn_gate_scale", "train.model.sparse_attn_gate_scale"), ("logit_softcap", "train.model.logit_softcap"),
    ("asym_logit_rescale", "train.model.asym_softcap"), ("tie_embeddings", "train.model.tie_embeddings"),
    ("tied_embed_init_std", "train.model.tied_embed_init_std"), ("seed", "train.seed"),
    ("train_batch_tokens", "train.train_batch_tokens"), ("train_seq_len", "train.train_seq_len"),
    ("train_seq_len", "train.model.doc_attention_max_len"), ("grad_accum_steps", "train.grad_accum_steps"),
    ("iterations", "train.iterations"), ("max_wallclock_seconds", "train.max_wallclock_seconds"),
    ("gptq_reserve_seconds", "train.gptq_reserve_seconds"), ("warmup_steps", "train.warmup_steps"),
    ("warmdown_frac", "train.warmdown_frac"), ("min_lr", "train.min_lr"), ("matrix_lr", "train.matrix_lr"),
    ("scalar_lr", "train.scalar_lr"), ("tied_embed_lr", "train.tied_embed_lr"), ("muon_momentum", "train.muon_momentum"),
    ("muon_momentum_warmup_start", "train.muon_momentum_warmup_start"),
    ("muon_momentum_warmup_steps", "train.muon_momentum_warmup_steps"),
    ("muon_backend_steps", "train.muon_backend_steps"), ("muon_row_normalize", "train.muon_row_normalize"),
    ("muon_wd", "train.muon_wd"), ("embed_wd", "train.embed_wd"), ("adam_wd", "train.adam_wd"),
    ("beta1", "train.beta1"), ("beta2", "train.beta2"), ("adam_eps", "train.adam_eps"),
    ("grad_clip_norm", "train.grad_clip_norm"), ("ema_decay", "train.ema_decay"),
    ("gptq_calibration_batches", "gptq.calib_batches"), ("train_seq_len", "gptq.calib_seq_len"),
    ("matrix_bits", "gptq.bits"), ("embed_bits", "gptq.embed_bits"), ("matrix_clip_sigmas", "gptq.clip_sigmas"),
    ("attn_clip_sigmas", "gptq.attn_clip_sigmas"), ("mlp_clip_sigmas", "gptq.mlp_clip_sigmas"),
    ("embed_clip_sigmas", "gptq.embed_clip_sigmas"), ("gated_attn_quant_gate", "gptq.gate_int8"),
    ("lqer_rank", "gptq.lqer_rank"), ("lqer_top_k", "gptq.lqer_top_k"), ("lqer_asym_group", "gptq.lqer_group"),
    ("eval_seq_len", "eval.seq_len"), ("ttt_lora_rank", "eval.lora.rank"), ("ttt_lora_lr", "eval.lora.lr"),
    ("ttt_beta1", "eval.lora.beta1"), ("ttt_beta2", "eval.lora.beta2"), ("ttt_weight_decay", "eval.lora.weight_decay"),
    ("ttt_chunk_size", "eval.lora.chunk"), ("ttt_eval_seq_len", "eval.lora.context"),
    ("ttt_batch_size", "eval.lora.batch_docs"), ("ttt_k_lora", "eval.lora.adapt_k"),
    ("phased_ttt_num_phases", "eval.lora.phases"), ("phased_ttt_prefix_docs", "eval.lora.prefix_docs"),
    ("global_ttt_lr", "eval.lora.global_lr"), ("global_ttt_momentum", "eval.lora.global_momentum"),
    ("global_ttt_chunk_tokens", "eval.lora.global_chunk_tokens"), ("eval_seq_len", "eval.lora.global_seq_len"),
    ("global_ttt_batch_seqs", "eval.lora.global_batch_seqs"), ("global_ttt_grad_clip", "eval.lora.global_clip"),
    ("token_order", "eval.tilt.order"), ("token_threshold", "eval.tilt.threshold"), ("token_boost", "eval.tilt.boost"),
]
# not in the log: (script variable, its default or the run command's value, preset path)
UNLOGGED = [
    ("TTT_LORA_ALPHA", "144", "eval.lora.alpha"), ("TTT_WARM_START_A", "1", "eval.lora.warm_start_a"),
    ("SMEAR_GATE_BOS_FIX (run command)", "0", "train.model.smear_bos_mask"),
]
# what pgolf has no switch for: (log key, the value pgolf's code fixes)
FIXED = [
    ("parallel_final_lane", "mean"), ("ttt_o_lora", "True"), ("ttt_mlp_lora", "True"), ("ttt_optimizer", "adam"),
    ("ttt_grad_steps", "1"), ("global_ttt_epochs", "1"), ("global_ttt_optimizer", "sgd"),
    ("global_ttt_warmup_chunks", "0"), ("global_ttt_respect_doc_boundaries", "True"), ("lqer_enabled", "True"),
    ("lqer_asym_enabled", "True"), ("lqer_factor_bits", "4"), ("muon_huber_wd", "False"), ("optrot_enabled", "False"),
    ("qk_gain_schedule", "[]"), ("attn_out_gate_enabled", "False"), ("gated_attn_enabled", "False"),
    ("sparse_attn_gate_enabled", "True"), ("smear_gate_enabled", "True"), ("caseops_enabled", "True"),
    ("ngram_hint_precompute_outside", "False"), ("val_doc_fraction", "1.0"),
    # its word and within-word channels, gated off: a frequency (at most 1) never reaches 99
    ("within_tau", "99.0"), ("word_tau", "99.0"), ("agree_add_boost", "0.0"),
]


def same(text: str, ours) -> bool:
    if isinstance(ours, bool):
        return (text in ("True", "1")) == ours
    try:
        return float(text) == float(ours)
    except (TypeError, ValueError):
        return str(text) == str(ours)


def row_settings(ref: Path) -> dict:
    logged = logged_hyperparameters(ref / "train_seed42.log")
    script = (ref / "train_gpt.py").read_text()
    rendered = presets.render("pr2135")
    rows, differ = [], []
    for key, path in SETTINGS:
        ours = dig(rendered, path)
        ok = same(logged[key], ours)
        rows.append(f"{path} = {ours} (log {key}: {logged[key]})")
        differ += [] if ok else [rows[-1]]
    for name, theirs, path in UNLOGGED:
        ours = dig(rendered, path)
        ok = same(theirs, ours) if "BOS_FIX" not in name else (ours is (theirs == "1"))
        m = re.search(rf'"{name.split()[0]}",\s*"([^"]+)"', script)
        default = m.group(1) if m else None
        rows.append(f"{path} = {ours} ({name}: {theirs}; script default {default})")
        differ += [] if ok else [rows[-1]]
    casts = len(re.findall(r"GPT\(h\)\.to\(device\)\.bfloat16\(\)", script))
    rows.append(f"train.model.rope_bf16_freqs = {dig(rendered, 'train.model.rope_bf16_freqs')} "
                f"(GPT(h).to(device).bfloat16() in its script {casts} times: train_model, deserialize)")
    if not (casts == 2 and dig(rendered, "train.model.rope_bf16_freqs")):
        differ.append(rows[-1])
    fixed_ok = [key for key, value in FIXED if logged.get(key) == value]
    differ += [f"{key}: log {logged.get(key)}, pgolf fixes {value}" for key, value in FIXED if logged.get(key) != value]
    return {"compared": len(SETTINGS) + len(UNLOGGED) + 1, "fixed_in_pgolf": len(FIXED), "fixed_equal": len(fixed_ok),
            "differing": differ, "values": rows}


def row_params(pr, ref: Path, cfg: ModelConfig, h) -> dict:
    logged = int(re.search(r"model_params:(\d+)", (ref / "train_seed42.log").read_text()).group(1))
    full = from_dict(ModelConfig, presets.render("pr2135")["train"]["model"], "pr2135")
    full_h = pr.Hyperparameters()
    for key, text in logged_hyperparameters(ref / "train_seed42.log").items():
        if key not in UNSET and hasattr(full_h, key):
            setattr(full_h, key, logged_value(text, getattr(full_h, key)))
    with torch.device("meta"):
        theirs_full = sum(p.numel() for p in pr.GPT(full_h).parameters())
        theirs_bench = sum(p.numel() for p in pr.GPT(h).parameters())
    return {"log_model_params": logged, "preset": count_parameters(full), "pr_gpt_full_size": theirs_full,
            "bench_pgolf": count_parameters(cfg), "bench_pr": theirs_bench}


# --- logits, step, gptq ---------------------------------------------------------------------------

@torch.no_grad()
def row_logits(pr, h, cfg: ModelConfig, stream: torch.Tensor) -> dict:
    ours, theirs = pair_of_models(pr, h, cfg)
    ours.eval(), theirs.eval()
    row = stream[None, :4 * EVAL_LEN]
    bos = (row[0] == BOS).nonzero(as_tuple=True)[0].tolist()
    out = {}
    for looping in (True, False):
        ours.set_looping(looping)
        theirs.looping_active = looping
        tag = "loop" if looping else "noloop"
        for name, cut in (("train_cut", SEQ_LEN), ("eval_cut", EVAL_LEN)):
            ours.cfg = dataclasses.replace(ours.cfg, doc_attention_max_len=cut)
            cu, longest = pr._build_cu_seqlens(bos, row.size(1), row.device, cut, 64)
            a, b = ours.forward_logits(row), theirs.forward_logits(row, cu_seqlens=cu, max_seqlen=longest)
            out[f"varlen_{name}_{tag}"] = max_abs(a, b)
        ours.set_doc_attention(False)
        rows = row.reshape(4, EVAL_LEN)
        out[f"causal_{tag}"] = max_abs(ours.forward_logits(rows), theirs.forward_logits(rows))
        ours.set_doc_attention(True)
        out[f"logit_range_{tag}"] = [round(float(b.min()), 3), round(float(b.max()), 3)]  # inside (-11, 7)
    # the contrast: RoPE's frequencies in fp32 (rope_bf16_freqs off), as a model built without its cast has them
    for block in ours.blocks:
        block.attn.rotary.bf16_freqs, block.attn.rotary._cache = False, {}
    rows = row.reshape(4, EVAL_LEN)
    out["causal_loop_fp32_rope_freqs"] = max_abs(ours.forward_logits(rows), theirs.forward_logits(rows))
    return out


def row_step(pr, h, cfg: ModelConfig, tcfg, shards: Path) -> dict:
    from pgolf.data.loader import DocumentPackingLoader
    from pgolf.train.optimizers import build_optimizers
    loader = DocumentPackingLoader(shards, 0, 1, torch.device("cpu"), cfg.vocab_size, BOS, flat=True)
    batch = loader.next_batch(2 * SEQ_LEN, SEQ_LEN, 1)
    out = rp.compare_step(pr, h, cfg, tcfg, batch)
    # the AsymLogit pair through its training loss and its optimizers
    ours, theirs = pair_of_models(pr, h, cfg)
    x, y = batch
    ours.set_looping(True)
    theirs.looping_active = True
    ours(x, y).backward()
    cu, _ = pr._build_cu_seqlens((x[0] == BOS).nonzero(as_tuple=True)[0].tolist(), x.size(1), x.device, SEQ_LEN, 64)
    theirs(x, y, cu_seqlens=cu, max_seqlen=SEQ_LEN).backward()
    with rp.cpu_for_r1():
        held = {id(p) for opt in pr.Optimizers(h, theirs) for g in opt.param_groups for p in g["params"]}
    ours_held = {id(p) for opt in build_optimizers(ours, tcfg, fused=False) for g in opt.param_groups for p in g["params"]}
    out["asym_pair"] = {"grad_pr": [theirs.softcap_pos.grad is not None, theirs.softcap_neg.grad is not None],
                        "grad_pgolf": [ours.softcap.pos.grad is not None, ours.softcap.neg.grad is not None],
                        "in_optimizer_pr": id(theirs.softcap_pos) in held or id(theirs.softcap_neg) in held,
                        "in_optimizer_pgolf": id(ours.softcap.pos) in ours_held or id(ours.softcap.neg) in ours_held,
                        "in_param_groups_pgolf": any(n.startswith("softcap.") for g in param_groups(ours).values()
                                                     for n, _ in g)}
    return out


def row_gptq(pr, h, cfg: ModelConfig, qcfg, shards: Path) -> tuple[dict, dict]:
    ours, theirs = pair_of_models(pr, h, cfg)
    theirs.eval(), ours.eval()
    batches = rp.calibration_rows(shards, h.gptq_calibration_batches)  # the run's 32
    hessians, pr_h, our_h = rp.compare_hessians(pr, h, ours, theirs, batches)
    out = {"calibration_batches": len(batches), "hessians": hessians,
           "quantized": rp.compare_gptq(pr, h, ours, theirs, pr_h, our_h, qcfg)}
    _, meta = pr.gptq_mixed_quantize(pr._unbank_state_dict(theirs.state_dict(), h.num_layers), pr_h, h)
    from pgolf.model.families import declared_families
    from pgolf.quant.policy import quantize_state
    qm, _ = quantize_state({k: v.detach() for k, v in ours.state_dict().items()}, our_h, qcfg, {},
                           declared_families(ours))
    out["gates_pr"] = sorted({v for k, v in meta.items() if "attn_gate_w" in k})
    out["gates_pgolf"] = sorted({e["kind"] for k, e in qm.entries.items() if "attn_gate_w" in k})
    out["lqer_groups"] = {"pr": h.lqer_asym_group, "pgolf": sorted({e["lqer"]["group"] for e in qm.entries.values()
                                                                   if "lqer" in e})}
    return out, pr_h


# --- TTT -------------------------------------------------------------------------------------------

def quoting_stream(n: int, vocab: int, seed: int = 0) -> np.ndarray:
    """Documents that quote each other (recurring 15-token contexts, so the tilt hints), [BOS] + tokens each."""
    rng = np.random.default_rng(seed)
    phrases = [rng.integers(2, vocab, int(rng.integers(20, 60))) for _ in range(40)]
    out = [BOS]
    while len(out) < n:
        if rng.random() < 0.04:
            out.append(BOS)
        out.extend(phrases[int(rng.integers(0, len(phrases)))] if rng.random() < 0.6 else rng.integers(2, vocab, 8))
    return np.array(out[:n], dtype=np.int64)


def ttt_settings(eval_section: dict) -> TTTSettings:
    """The preset's eval.lora at this bench's sizes: 4 documents a batch, its one phase after the first
    batch (the stream's 7 documents make a batch of the 3 longest, then one of 4), so that the second
    batch is scored by weights the global SGD moved."""
    return from_dict(TTTSettings, {**eval_section["lora"], "context": EVAL_LEN, "batch_docs": 4, "prefix_docs": 3,
                                   "global_chunk_tokens": 4 * EVAL_LEN, "global_seq_len": EVAL_LEN,
                                   "global_batch_seqs": 4}, "pr2135 eval.lora")


def pr_hints(ref: Path, tokens: np.ndarray, tilt: TiltSettings):
    """Its build_hints_for_targets on the targets (tokens[1:]) with its run's channel settings."""
    import online_ngram_tilt as theirs
    quiet = lambda *a, **k: None  # noqa: E731
    pkg = theirs.build_hints_for_targets(
        target_token_ids_np=np.ascontiguousarray(tokens[1:].astype(np.uint16)), tokenizer_path=str(ref / TOKENIZER),
        vocab_size=8192, log0=quiet, token_order=tilt.order, token_threshold=tilt.threshold, token_boost=tilt.boost,
        within_tau=99.0, within_boost=0.0, word_order=4, word_normalize="strip_punct_lower", word_tau=99.0,
        word_boost=0.0, agree_add_boost=0.0)
    return pkg


def pr_ttt(pr, h, s: TTTSettings, state: dict, tokens: torch.Tensor, byte_counts: torch.Tensor, hints, run: str):
    """Its eval_val_ttt_phased on the weights `state`: (loss, bpb), every document's summed (tilted)
    loss in its processing order, and per batch in processing order the A of the LoRA that scored
    it. Per batch, not per LoRA built: it builds a LoRA of ttt_batch_size documents before the first
    batch (and after each phase) and uses it only for full batches, so the first LoRA it builds is
    not the first batch's whenever that batch is the short one (the longest documents come first)."""
    h.ttt_batch_size, h.phased_ttt_prefix_docs = s.batch_docs, s.prefix_docs
    h.global_ttt_chunk_tokens, h.global_ttt_batch_seqs = s.global_chunk_tokens, s.global_batch_seqs
    h.run_id = f"pr2135-bench-{run}-{os.getpid()}"
    model = pr.GPT(h)
    model.load_state_dict(state)
    model.looping_active = True
    for block in model.blocks:
        block.mlp.use_fused = False
    used, per_doc = [], []
    real_claim, real_accumulate = pr._claim_next_batch, pr._accumulate_bpb
    claimed = [0]

    def claim(*args, **kwargs):
        claimed[0] += 1
        return real_claim(*args, **kwargs)

    def forward_ttt(x, y, lora, hint_ids=None):
        if len(used) < claimed[0]:  # the batch's first forward: its LoRA as the batch starts
            used.append({n: p.detach().clone() for n, p in lora.named_parameters() if n.endswith(".A")})
        return model.forward_ttt(x, y, lora=lora, hint_ids=hint_ids)

    def accumulate(ptl, x, y, chunk_offsets, chunk_lens, pos_idx, *args, **kwargs):
        pos = pos_idx[: x.size(1)].unsqueeze(0)
        mask = (pos >= chunk_offsets.unsqueeze(1)) & (pos < (chunk_offsets + chunk_lens).unsqueeze(1))
        rows = (ptl.double() * mask).sum(dim=1).tolist()
        if bool((chunk_offsets == 0).all()):
            per_doc.append([0.0] * len(rows))
        per_doc[-1] = [a + b for a, b in zip(per_doc[-1], rows)]
        return real_accumulate(ptl, x, y, chunk_offsets, chunk_lens, pos_idx, *args, **kwargs)

    pr._claim_next_batch, pr._accumulate_bpb = claim, accumulate
    precomputed = None
    if hints is not None:
        precomputed = (torch.from_numpy(hints["hint_ids"].astype("int64")), torch.from_numpy(hints["gate_mask"]),
                       torch.from_numpy(hints["boost"].astype("float32")))
    try:
        val = types.SimpleNamespace(val_tokens=tokens, val_bytes=byte_counts, caseops_enabled=True,
                                    base_bytes_lut=None, has_leading_space_lut=None, is_boundary_token_lut=None)
        with rp.cpu_for_r1():
            loss, bpb = pr.eval_val_ttt_phased(
                h, model, torch.device("cpu"), val,
                forward_ttt, precomputed_hints=precomputed)
    finally:
        pr._claim_next_batch, pr._accumulate_bpb = real_claim, real_accumulate
    return loss, bpb, [d for batch in per_doc for d in batch], used


def pgolf_ttt(ours: GPT, s: TTTSettings, tokens: torch.Tensor, byte_counts: torch.Tensor, pr_adapters: list,
              scorer):
    """evaluate_ttt with each adapter built given the A the PR's LoRA had on the batch it is built for
    (evaluate_ttt seeds an adapter with its batch's place in processing order)."""
    from pgolf.evaluate import lora_ttt
    unused = set(range(len(pr_adapters)))
    real = lora_ttt.DocumentAdapters

    class WithItsA(real):
        def __init__(self, cfg, depth, n_docs, rank, alpha, seed, **kwargs):
            super().__init__(cfg, depth, n_docs, rank, alpha, seed, **kwargs)
            batch = seed - s.seed * 1_000_003
            unused.discard(batch)
            drawn = pr_adapters[batch]
            with torch.no_grad():
                self.head.A.copy_(drawn["lm_head_lora.A"])
                for slot, layer in enumerate(self.layers):
                    for name, module in layer.items():
                        module.A.copy_(drawn[f"{name}_loras.{slot}.A"])

    lora_ttt.DocumentAdapters = WithItsA
    try:
        result, summary, scores = evaluate_ttt(ours, tokens.numpy(), byte_counts.numpy().astype(np.int64), s,
                                               torch.device("cpu"), BOS, scorer=scorer)
    finally:
        lora_ttt.DocumentAdapters = real
    docs = find_documents(tokens.numpy(), BOS)
    ascending = sorted(range(len(docs)), key=lambda i: (docs[i][1] - docs[i][0], i))
    batches = [ascending[i:i + s.batch_docs] for i in range(0, len(ascending), s.batch_docs)]
    batches.sort(key=lambda b: -max(docs[d][1] - docs[d][0] for d in b))  # its processing order
    per_doc = [float(np.sum(scores[docs[d][0] + 1:docs[d][1]])) for b in batches for d in b]
    return result.val_loss, result.val_bpb, per_doc, summary, len(unused)


def row_ttt(pr, h, ref: Path, cfg: ModelConfig, eval_section: dict) -> dict:
    s = ttt_settings(eval_section)
    tilt = from_dict(TiltSettings, eval_section["tilt"], "pr2135 eval.tilt")
    tokens_np = quoting_stream(4000, cfg.vocab_size, seed=4)
    tokens = torch.from_numpy(tokens_np)
    byte_counts = torch.from_numpy(np.random.default_rng(4).integers(1, 7, len(tokens)).astype(np.int32))
    out = {"documents": len(find_documents(tokens_np, BOS)), "settings": {
        "adapt_k": s.adapt_k, "phases": s.phases, "context": s.context, "lr": s.lr, "weight_decay": s.weight_decay}}
    for label, tilted in (("plain", False), ("tilted", True)):
        ours, theirs = pair_of_models(pr, h, cfg, caps=(9.0, 13.0))
        eval_stage.cut_documents_every(ours, EVAL_LEN)
        hints = pr_hints(ref, tokens_np, tilt) if tilted else None
        loss_pr, bpb_pr, docs_pr, adapters = pr_ttt(pr, h, s, theirs.state_dict(), tokens, byte_counts, hints, label)
        scorer = TiltScorer(token_hints(tokens_np, tilt)) if tilted else None
        loss, bpb, docs, summary, unused = pgolf_ttt(ours, s, tokens, byte_counts, adapters, scorer)
        docs_pr, docs = np.array(docs_pr), np.array(docs)
        out[label] = {"bpb_abs": abs(bpb - bpb_pr), "loss_abs": abs(loss - loss_pr), "val_bpb_pr": bpb_pr,
                      "doc_loss_max_rel": float(np.max(np.abs(docs - docs_pr) / np.maximum(np.abs(docs_pr), 1e-12))),
                      "phases": [p["boundary"] for p in summary["phases"]], "batches": len(adapters),
                      "batches_reusing_an_adapter": unused, "k_adapters_pr": any("k_loras" in k for a in adapters for k in a),
                      "audit_passed": summary["passed"]}
        if tilted:
            out[label]["hinted_targets"] = int(hints["gate_mask"].sum())
    out["tilt_moves_bpb"] = out["tilted"]["val_bpb_pr"] - out["plain"]["val_bpb_pr"]
    return out


# --- the tilt on a val-like stream -----------------------------------------------------------------

def caseops_stream(docs_path: Path, ref: Path) -> np.ndarray:
    """[BOS] + tokens of every document: pgolf's CaseOps transform, the PR's tokenizer (cached)."""
    import sentencepiece as spm
    from pgolf.tokenize.caseops import encode
    digest = hashlib.sha256(docs_path.read_bytes()).hexdigest()[:12]
    cache = ROOT / "bench/out" / f"pr2135_stream_{digest}.u16"
    if cache.is_file():
        return np.fromfile(cache, dtype=np.uint16)
    sp = spm.SentencePieceProcessor(model_file=str(ref / TOKENIZER))
    out = []
    with (gzip.open(docs_path, "rt") if docs_path.suffix == ".gz" else open(docs_path)) as f:
        for line in f:
            out.append(sp.bos_id())
            out.extend(sp.encode(encode(json.loads(line)["text"])))
    cache.parent.mkdir(parents=True, exist_ok=True)
    stream = np.array(out, dtype=np.uint16)
    stream.tofile(cache)
    return stream


def one_core() -> contextlib.AbstractContextManager:
    @contextlib.contextmanager
    def pinned():
        saved, threads = os.sched_getaffinity(0), torch.get_num_threads()
        os.sched_setaffinity(0, {min(saved)})
        torch.set_num_threads(1)
        try:
            yield
        finally:
            os.sched_setaffinity(0, saved)
            torch.set_num_threads(threads)
    return pinned()


def row_tilt(ref: Path, stream: np.ndarray, tilt: TiltSettings, repeats: int = 2) -> dict:
    import online_ngram_tilt as theirs
    targets = np.ascontiguousarray(stream[1:].astype(np.uint16))
    out = {"stream_tokens": len(stream), "order": tilt.order, "threshold": tilt.threshold, "boost": tilt.boost}
    started = time.perf_counter()
    pkg = pr_hints(ref, stream, tilt)
    out["pr_build_hints_seconds"] = round(time.perf_counter() - started, 2)  # its whole builder, word channel included
    ours = token_hints(stream, tilt)
    out["hint_ids_equal"] = bool(np.array_equal(pkg["hint_ids"], ours.token[1:]))
    out["gates_equal"] = bool(np.array_equal(pkg["gate_mask"], ours.gated[1:]))
    out["boosts_equal"] = bool(np.array_equal(pkg["boost"], np.where(ours.gated[1:], np.float32(tilt.boost), 0)))
    out["hinted"] = int(ours.gated.sum())
    # the hint precompute, one core each: its C call (both channels it always runs) against token_hints
    lib = theirs.ensure_online_ngram_lib(lambda *a, **k: None)
    _, starts_word, boundary = theirs.build_piece_luts(tokenizer_path=str(ref / TOKENIZER), vocab_size=8192)
    c_seconds, ours_seconds = [], []
    with one_core():
        for _ in range(repeats):
            state = theirs.OnlineNgramState(
                lib=lib, token_ctx_len=tilt.order - 1, token_table_bits=theirs.suggest_table_bits(len(targets), 0.55),
                within_table_bits=theirs.suggest_table_bits(max(len(targets) // 2, 1), 0.60),
                starts_new_word_lut=starts_word, boundary_lut=boundary, seed_prefix_token=int(targets[0]))
            started = time.perf_counter()
            state.process_chunk(targets)
            c_seconds.append(time.perf_counter() - started)
            state.close()
            started = time.perf_counter()
            token_hints(stream, tilt)
            ours_seconds.append(time.perf_counter() - started)
    out["seconds_one_core"] = {"pr_c_process_chunk": round(min(c_seconds), 2), "pgolf_token_hints": round(min(ours_seconds), 2),
                               "ratio": round(min(c_seconds) / min(ours_seconds), 2)}
    # tilted losses from the same logits and hints: its fp32 (the run's) and fp64 forms against pgolf's
    g = torch.Generator().manual_seed(0)
    take = np.flatnonzero(ours.gated)[:4096]
    take = np.concatenate([take, np.arange(1, 1 + 4096)])
    logits = torch.randn(len(take), 8192, generator=g) * 3
    target = torch.from_numpy(stream[take].astype(np.int64))
    hint, gated = torch.from_numpy(ours.token[take]), torch.from_numpy(ours.gated[take])
    log_probs = torch.log_softmax(logits, dim=-1)
    ptl = -log_probs.gather(-1, target[:, None])[:, 0]
    log_q = log_probs.gather(-1, hint[:, None])[:, 0]
    boost = torch.where(gated, torch.tensor(tilt.boost), torch.tensor(0.0))
    theirs_fast = theirs.apply_tilt_to_ptl_torch_fast(ptl, log_q, target, hint, gated, boost)
    theirs_fp64 = theirs.apply_tilt_to_ptl_torch(ptl, log_q, target, hint, gated, boost)
    _, mine = score_tilted(logits, target, hint, gated, tilt.boost)
    out["tilted_loss"] = {"positions": len(take), "hinted": int(gated.sum()), "max_abs_vs_fp32": max_abs(mine, theirs_fast),
                          "max_abs_vs_fp64": max_abs(mine, theirs_fp64)}
    return out


def context_collisions(stream: np.ndarray, order: int) -> dict:
    """How often the PR's context key (an XOR of token x small coefficient: under 2^38) gives distinct
    contexts one key; pgolf keeps its key, so its hints merge the same contexts."""
    from pgolf.evaluate.ngram_tilt import context_keys
    targets = stream[1:]
    keys = context_keys(targets, order - 1)
    rng = np.random.default_rng(0)
    strong = np.zeros(len(keys), dtype=np.uint64)
    coeffs = rng.integers(1, 2 ** 63, order - 1, dtype=np.uint64) | np.uint64(1)
    seeded = np.concatenate([targets[:1], targets]).astype(np.uint64)
    first = order - 2
    for j in range(order - 1):
        strong = strong * np.uint64(0x9E3779B97F4A7C15) + seeded[first + 1 - (order - 1) + j:][:len(keys)] * coeffs[j]
    pairs = np.unique(np.stack([keys, strong], axis=1), axis=0)
    return {"distinct_keys": int(len(np.unique(keys))), "distinct_contexts": int(len(pairs))}


# --- an artifact its serialize() code wrote --------------------------------------------------------

def write_pr_artifact(pr, h, theirs, hessians: dict, form: str, path: Path) -> None:
    """What its serialize() does after collecting Hessians: _unbank_state_dict, gptq_mixed_quantize,
    then _pack_pergroup or torch.save + _compress (byte-shuffled brotli)."""
    result, meta = pr.gptq_mixed_quantize(pr._unbank_state_dict(theirs.state_dict(), h.num_layers), hessians, h)
    if form == "pergroup":
        blob = pr._pack_pergroup(result, meta)
    else:
        buffer = io.BytesIO()
        torch.save({"w": result, "m": meta}, buffer)
        blob = pr._compress(buffer.getvalue(), form)
    path.write_bytes(blob)


def pr_eval(pr, h, path: Path, form: str, tokens: torch.Tensor, byte_counts: torch.Tensor, fp32: bool):
    h.quantized_model_path, h.compressor = str(path), form
    model = pr.deserialize(h, torch.device("cpu"))
    model.looping_active = True
    if fp32:
        model.float()
    for block in model.blocks:
        block.mlp.use_fused = False
    val = types.SimpleNamespace(val_tokens=tokens, val_bytes=byte_counts, caseops_enabled=True)
    with torch.no_grad():
        return pr.eval_val(h, torch.device("cpu"), val, model)


def row_artifact(pr, h, cfg: ModelConfig, hessians: dict, stream: torch.Tensor, folder: Path) -> dict:
    _, theirs = pair_of_models(pr, h, cfg)
    theirs.eval()
    batch_seqs = 4
    h.val_batch_tokens = batch_seqs * EVAL_LEN  # its eval_val: one row of 4 windows, as pgolf's join_windows
    tokens, byte_counts = eval_stream(stream, windows=4 * batch_seqs, seq_len=EVAL_LEN)
    out = {"targets": int(tokens.numel() - 1)}
    with rp.lrzip_on_path(folder) as coder:
        for form in ("pergroup", "brotli"):
            path = folder / f"final_model.{form}.int6.ptz"
            write_pr_artifact(pr, h, theirs, hessians, form, path)
            loss_pr, bpb_pr = pr_eval(pr, h, path, form, tokens, byte_counts, fp32=True)
            loss, bpb, seen, qm = pgolf_eval_of_r1(path, cfg, tokens, byte_counts, batch_seqs, EVAL_LEN)
            caps = qm.dequantize()
            out[form] = {"bytes": path.stat().st_size, "read_as": seen, "val_bpb_pr": bpb_pr, "val_bpb_pgolf": bpb,
                         "bpb_abs": abs(bpb - bpb_pr), "loss_abs": abs(loss - loss_pr),
                         "softcap_pos_neg": [float(caps["softcap.pos"]), float(caps["softcap.neg"])]}
        out["lrzip"] = coder
    return out


def write_fixture(pr, ref: Path, folder: Path) -> dict:
    """tests/golden/pr2135_tiny/: a tiny pr2135 model's artifact as PR #2135's own code writes it (its
    pergroup frame through the lrzip stand-in, and brotli), eval tokens and bytes, and its eval_val
    of it, for the CPU test of `pgolf import-r1` that runs where its script is not."""
    folder.mkdir(parents=True, exist_ok=True)
    overrides = tiny_overrides(SEQ_LEN)
    cfg = from_dict(ModelConfig, presets.render("pr2135", overrides)["train"]["model"], "tiny")
    with tempfile.TemporaryDirectory() as tmp:
        shards = Path(tmp)
        rp.write_shards(shards, cfg.vocab_size, seed=5)
        h = pr_hyperparameters(pr, ref, cfg, shards)
        ours = sparse_pgolf(cfg, seed=5)
        with torch.no_grad():
            ours.tok_emb.weight.mul_(10)  # the tied head's logits reach past both caps
            ours.softcap.pos.fill_(6.5)  # apart, so a reader that drops or swaps the pair scores otherwise
            ours.softcap.neg.fill_(9.0)
        theirs = pr.GPT(h)
        theirs.load_state_dict(rp.to_r1_state(ours, theirs))
        for block in theirs.blocks:
            block.mlp.use_fused = False
        theirs.eval()
        _, pr_h, _ = rp.compare_hessians(pr, h, ours, theirs, rp.calibration_rows(shards, 2))
        stream = torch.from_numpy(np.fromfile(shards / "fineweb_train_000001.bin", dtype="<u2", offset=1024).astype(np.int64))
        batch_seqs = 2
        h.val_batch_tokens = batch_seqs * EVAL_LEN
        tokens, byte_counts = eval_stream(stream, windows=2 * batch_seqs, seq_len=EVAL_LEN)
        expected = {"overrides": overrides, "seq_len": EVAL_LEN, "batch_seqs": batch_seqs, "forms": {}}
        with rp.lrzip_on_path(shards) as coder:
            for form in ("brotli", "pergroup"):
                path = folder / f"final_model.{form}.int6.ptz"
                write_pr_artifact(pr, h, theirs, pr_h, form, path)
                loss, bpb = pr_eval(pr, h, path, form, tokens, byte_counts, fp32=True)
                expected["forms"][form] = {"file": path.name, "pr_val_loss": loss, "pr_val_bpb": bpb,
                                           "lrzip": coder if form == "pergroup" else None}
    tokens.numpy().astype("<u2").tofile(folder / "val_tokens.u16")
    byte_counts.numpy().astype("<u2").tofile(folder / "val_bytes.u16")
    (folder / "pr_eval.json").write_text(json.dumps(expected, indent=1, sort_keys=True) + "\n")
    return expected


TILT_FIXTURE_SETTINGS = ((16, 0.8), (4, 0.5))  # the run's (order, threshold); a short order that hints often


def write_tilt_fixture(ref: Path, folder: Path) -> dict:
    """tests/golden/pr2135_tilt/: a stream of documents quoting each other and the hints PR #2135's own
    build_hints_for_targets (its C state) gives for it, at the run's order and threshold and at a short
    one, for the CPU test that compares pgolf's token_hints with them where the PR's code is not."""
    folder.mkdir(parents=True, exist_ok=True)
    stream = quoting_stream(12_000, 8192, seed=11).astype(np.uint16)
    stream.astype("<u2").tofile(folder / "stream.u16")
    summary = {"stream_tokens": len(stream), "settings": []}
    for order, threshold in TILT_FIXTURE_SETTINGS:
        pkg = pr_hints(ref, stream, TiltSettings(order=order, threshold=threshold, boost=2.625))
        name = f"pr_hints_order{order}"
        np.asarray(pkg["hint_ids"]).astype("<u2").tofile(folder / f"{name}.u16")
        np.packbits(np.asarray(pkg["gate_mask"], dtype=bool)).tofile(folder / f"{name}.gate.bits")
        summary["settings"].append({"order": order, "threshold": threshold, "file": name,
                                    "hinted": int(np.asarray(pkg["gate_mask"]).sum())})
    (folder / "pr_hints.json").write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", type=Path, default=ROOT / "bench/reference/pr2135",
                        help="PR #2135's record folder (train_gpt.py, online_ngram_*, train_seed42.log, tokenizers/)")
    parser.add_argument("--rows", help=f"comma-separated subset of {','.join(ROWS)} (default: all)")
    parser.add_argument("--stream-docs", type=Path, help="jsonl(.gz) documents for the tilt row's stream")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--write-fixture", type=Path, metavar="DIR",
                        help="write tests/golden/pr2135_tiny (the import test's artifact) to DIR and stop")
    parser.add_argument("--write-tilt-fixture", type=Path, metavar="DIR",
                        help="write tests/golden/pr2135_tilt (its C state's hints on one stream) to DIR and stop")
    args = parser.parse_args(argv)
    if not (args.reference / "train_gpt.py").is_file():
        parser.error(f"{args.reference}: PR #2135's files are not there (bench/reference/ is git-ignored): "
                     f"git show refs/pull/2135/head:{FOLDER}/<file> for each file this bench's docstring names")
    t0 = [time.perf_counter()]
    pr = load_pr(args.reference)
    if args.write_fixture:
        print(json.dumps(write_fixture(pr, args.reference, args.write_fixture), indent=1))
        return 0
    if args.write_tilt_fixture:
        print(json.dumps(write_tilt_fixture(args.reference, args.write_tilt_fixture), indent=1))
        return 0
    want = set(args.rows.split(",")) if args.rows else set(ROWS)
    if want - set(ROWS):
        parser.error(f"--rows: unknown {sorted(want - set(ROWS))}; rows are {','.join(ROWS)}")
    cfg, tcfg, qcfg, eval_section = pgolf_configs()
    report = {}

    def done(name: str, value) -> None:
        report[name] = value
        rp.progress(name, t0)
        print(json.dumps({name: value}), file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        shards = Path(tmp)
        rp.write_shards(shards, cfg.vocab_size)
        h = pr_hyperparameters(pr, args.reference, cfg, shards)
        stream = torch.from_numpy(np.fromfile(shards / "fineweb_train_000000.bin", dtype="<u2", offset=1024).astype(np.int64))
        if "settings" in want:
            done("settings", row_settings(args.reference))
        if "params" in want:
            done("params", row_params(pr, args.reference, cfg, h))
        if "logits" in want:
            done("logits", row_logits(pr, h, cfg, stream[37:]))
        if "step" in want:
            done("step", row_step(pr, h, cfg, tcfg, shards))
        hessians = None
        if want & {"gptq", "artifact"}:
            gptq_report, hessians = row_gptq(pr, h, cfg, qcfg, shards)
            if "gptq" in want:
                done("gptq", gptq_report)
        if "ttt" in want:
            done("ttt", row_ttt(pr, h, args.reference, cfg, eval_section))
        if "tilt" in want:
            tilt = from_dict(TiltSettings, eval_section["tilt"], "pr2135 eval.tilt")
            tokens = (caseops_stream(args.stream_docs, args.reference) if args.stream_docs
                      else quoting_stream(2_000_000, 8192, seed=7).astype(np.uint16))
            result = row_tilt(args.reference, tokens, tilt)
            result["stream"] = str(args.stream_docs) if args.stream_docs else "documents quoting each other (generated)"
            result["context_keys"] = context_collisions(tokens.astype(np.int64), tilt.order)
            done("tilt", result)
        if "artifact" in want:
            done("artifact", row_artifact(pr, h, cfg, hessians, stream, shards))
    print(json.dumps(report, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
