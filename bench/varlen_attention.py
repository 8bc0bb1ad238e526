"""Document attention on CUDA: the varlen kernel (torch's varlen_attn) against FlexAttention and
the exact per-segment path, in logits and gradients, then in time and memory at R1's row.

    python bench/varlen_attention.py                 # CUDA (bench/gpu_checks.sh varlen)
    python bench/varlen_attention.py --device cpu    # the same script at CPU size: exact vs mask

1. equality: a small record-like GPT (GQA, doc_attention_max_len cuts) on rows of documents of
   uneven length, bf16 autocast as training runs: logits and every parameter's gradient of
   doc_attention_kernel varlen and flex (compiled, as the train step runs it) against the exact
   per-segment path (pgolf::segment_attention) in fp32; the CPU tests cover what CPU can run
   (tests/test_techniques.py: varlen = mask = flex in logits, varlen = mask in gradients).
2. speed and memory: one attention call forward + backward at R1's per-GPU shapes (one row of
   98,304 tokens, 8 heads of 64, 4 KV heads, segments cut at BOS and every 2,048 tokens, documents
   of 300 to 3,000 tokens): varlen vs compiled FlexAttention with its block mask built per step,
   ms and peak memory each.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pgolf.model import docmask  # noqa: E402
from pgolf.model.config import ModelConfig  # noqa: E402
from pgolf.model.gpt import GPT  # noqa: E402

SMALL = dict(vocab_size=512, num_layers=4, model_dim=256, num_heads=4, num_kv_heads=2, mlp_mult=4.0,
             mlp_activation="leaky_relu2", rope_dims=16, xsa_last_n=4, num_loops=1, loop_start=1, loop_end=2,
             parallel_start_layer=2, smear_gate="r1", attn_gate="sparse", doc_attention=True,
             doc_attention_max_len=256)


def uneven_rows(rows: int, length: int, vocab: int, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    ids = rng.integers(2, vocab, (rows, length))
    for r in range(rows):
        pos = int(rng.integers(0, 40))
        while pos < length:
            ids[r, pos] = 1
            pos += int(rng.choice([1, 2, 17, 100, 255, 256, 257, 600]))
    return torch.from_numpy(ids)


def run_kernel(model: GPT, kernel: str, ids: torch.Tensor, targets: torch.Tensor, device: torch.device,
               compiled: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.cfg.doc_attention_kernel = kernel
    model.zero_grad(set_to_none=True)
    fn = torch.compile(model, dynamic=False, fullgraph=True) if compiled else model
    cu = model.document_cu_seqlens(ids.cpu(), device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        loss = fn(ids, targets, cu)
        with torch.no_grad():
            logits = model.forward_logits(ids, cu_seqlens=cu).float()
    loss.backward()
    return logits, {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}


def equality(device: torch.device) -> dict:
    torch.manual_seed(0)
    model = GPT(ModelConfig(**SMALL)).to(device)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.05)
    model.set_looping(True)
    ids = uneven_rows(2, 1024, SMALL["vocab_size"]).to(device)
    targets = torch.randint(0, SMALL["vocab_size"], ids.shape, device=device)
    exact_model = GPT(ModelConfig(**SMALL)).to(device)
    exact_model.load_state_dict(model.state_dict())
    exact_model.set_looping(True)
    saved = docmask.flash_varlen_usable
    docmask.flash_varlen_usable = lambda q: False  # the exact path, fp32
    try:
        with torch.autocast(device.type, enabled=False):
            ref_logits, ref_grads = run_kernel(exact_model, "varlen", ids, targets, device, compiled=False)
    finally:
        docmask.flash_varlen_usable = saved
    kernels = ["varlen", "flex"] if device.type == "cuda" else ["mask"]
    out = {}
    for kernel in kernels:
        logits, grads = run_kernel(model, kernel, ids, targets, device, compiled=device.type == "cuda")
        out[kernel] = {
            "logits_max_abs": float((logits - ref_logits).abs().max()),
            "logits_scale": float(ref_logits.abs().max()),
            "grads_max_rel": max(float((grads[n] - g).abs().max() / g.abs().max().clamp_min(1e-30))
                                 for n, g in ref_grads.items()),
        }
    return {"against": "exact per-segment path, fp32", "dtype": "bf16 autocast" if device.type == "cuda" else "fp32",
            **out}


def timing(device: torch.device, tokens: int = 98_304, repeat: int = 5) -> dict:
    torch.manual_seed(0)
    heads, kv, dim = 8, 4, 64
    ids = uneven_rows(1, tokens, 8192)
    out = {}
    for kernel in ("varlen", "flex"):
        q = torch.randn(1, heads, tokens, dim, device=device, dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(1, kv, tokens, dim, device=device, dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(1, kv, tokens, dim, device=device, dtype=torch.bfloat16, requires_grad=True)

        def step():
            if kernel == "varlen":
                mask = docmask.document_segments(ids, 1, 2048, device)
            else:
                mask = docmask.document_block_mask(ids.to(device), 1, 2048)
            y = docmask.masked_attention(q, k, v, mask, True)
            y.float().square().mean().backward()

        fn = torch.compile(step) if kernel == "flex" else step
        fn()
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        started = time.perf_counter()
        for _ in range(repeat):
            fn()
        torch.cuda.synchronize(device)
        out[kernel] = {"ms": round((time.perf_counter() - started) * 1000 / repeat, 2),
                       "peak_mib": round(torch.cuda.max_memory_allocated(device) / 2**20, 1)}
    return {"tokens": tokens, "heads": heads, "kv_heads": kv, "head_dim": dim, **out}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    report = {"torch": torch.__version__, "equality": equality(device)}
    print(json.dumps(report), flush=True)
    if device.type == "cuda":
        report["timing"] = timing(device)
    print(json.dumps(report, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
