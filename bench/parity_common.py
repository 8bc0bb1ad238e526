"""What the parity benches share (bench/record_parity.py, bench/pr2135_parity.py,
bench/seed_systems_parity.py): the CPU FlashAttention their reference scripts run on, the hyperparameter
dump a run's log starts with, and for the R1 lineage's artifacts (R1's and PR #2135's) the eval tokens
with their byte counts, pgolf's side of the eval and the tiny model of the tests' fixtures.
"""
from __future__ import annotations

import dataclasses
import re
import sys
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pgolf.model.config import ModelConfig  # noqa: E402
from pgolf.model.gpt import GPT  # noqa: E402


# --- the reference scripts' FlashAttention on CPU ----------------------------------------------------

def _causal(q, k, v):
    """q [B, T, H, D], k/v [B, T, Hkv, D] (FA3's layout) -> [B, T, H, D]."""
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                       enable_gqa=k.size(2) != q.size(2))
    return y.transpose(1, 2)


def flash_attn_func(q, k, v, causal=True, **_):
    assert causal
    return _causal(q, k, v)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=True, **_):
    assert causal and torch.equal(cu_seqlens_q, cu_seqlens_k)
    bounds = sorted(set(cu_seqlens_q.tolist()))  # R1 pads the list by repeating the total length
    parts = [_causal(q[None, a:b], k[None, a:b], v[None, a:b])[0] for a, b in zip(bounds, bounds[1:])]
    return torch.cat(parts)


def install_flash_attention(*modules: str) -> None:
    """The CPU stand-in under each module name a script imports FlashAttention from."""
    for name in modules:
        standin = types.ModuleType(name)
        standin.flash_attn_func, standin.flash_attn_varlen_func = flash_attn_func, flash_attn_varlen_func
        sys.modules[name] = standin


# --- a run's log and the preset beside it ------------------------------------------------------------

def logged_hyperparameters(log: Path) -> dict[str, str]:
    """The '  name: value' dump each run's log starts with (the values the scored run used)."""
    found = {}
    for line in log.read_text(errors="replace").splitlines():
        m = re.fullmatch(r"  ([a-z_0-9]+): (.*)", line)
        if m and m.group(1) not in found:
            found[m.group(1)] = m.group(2).strip()
    return found


def dig(tree: dict, dotted: str):
    for key in dotted.split("."):
        tree = tree[key]
    return tree


# --- the R1 lineage's artifacts: pgolf's side --------------------------------------------------------

def random_pgolf(cfg: ModelConfig, seed: int = 0) -> GPT:
    """Every parameter moved off its init (zero-init gates, lambdas and projections act)."""
    torch.manual_seed(seed)
    model = GPT(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * (0.02 if p.ndim == 2 and p.numel() > 4096 else 0.1))
    return model


def eval_stream(stream: torch.Tensor, windows: int, seq_len: int, seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """`windows` flat windows of targets (+1 token) from a token stream with documents, and a byte
    count per position (R1's sidecar shape: the bytes of the token at that position)."""
    tokens = stream[: windows * seq_len + 1].clone()
    rng = np.random.default_rng(seed)
    byte_counts = torch.from_numpy(rng.integers(1, 7, tokens.numel()).astype(np.int32))
    return tokens, byte_counts


def pgolf_eval_of_r1(path: Path, cfg: ModelConfig, tokens: torch.Tensor, byte_counts: torch.Tensor, batch_seqs: int,
                     seq_len: int):
    """pgolf's side with nothing of the lineage's code: its reader, its model (documents cut every
    eval window, as the lineage's eval cuts them), its flat eval with joined windows."""
    from pgolf.evaluate.bpb import evaluate_bpb
    from pgolf.model.io import load_state_dict_into
    from pgolf.pack.r1_artifact import load_r1_artifact
    from tasks.evaluate import cut_documents_every
    qm, form = load_r1_artifact(path, dataclasses.asdict(cfg))
    model = GPT(cfg)
    load_state_dict_into(model, qm.dequantize(), path)
    cut_documents_every(model, seq_len)
    result = evaluate_bpb(model, tokens.numpy(), byte_counts.numpy(), seq_len, 0, batch_seqs, torch.device("cpu"),
                          join_windows=True)
    return result.val_loss, result.val_bpb, form, qm


# The tests' fixtures (tests/golden/r1_tiny, pr2135_tiny): 1,088 x 64 MLP matrices, past the passthrough limit
TINY = dict(vocab_size=320, num_layers=1, model_dim=64, num_heads=4, num_kv_heads=2, mlp_mult=17.0, num_loops=0, loop_start=0,
            loop_end=0, parallel_start_layer=-1, xsa_last_n=1)


def tiny_overrides(doc_attention_max_len: int) -> list[str]:
    """The preset overrides of the tiny model (what its fixture's json records)."""
    return ([f"train.model.{k}={v}" for k, v in TINY.items()]
            + [f"train.model.doc_attention_max_len={doc_attention_max_len}", f"tokenizer.vocab_size={TINY['vocab_size']}"])


def sparse_pgolf(cfg: ModelConfig, seed: int = 5) -> GPT:
    """random_pgolf with its matrices sparse: a fixture of a few kB that still shapes every logit."""
    model = random_pgolf(cfg, seed=seed)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(seed)
        for p in model.parameters():
            if p.ndim == 2 and p.numel() >= 2048:
                p.mul_((torch.rand(p.shape, generator=generator) < 0.05).float() * 3)
    return model
