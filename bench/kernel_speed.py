"""The fused Triton kernels (pgolf.kernels) against the eager math they replace, at R1's per-GPU
training shapes, in one run: forward + backward time and peak memory of each way.

    python bench/kernel_speed.py                     # R1: 98,304 tokens per GPU, vocab 8,192, MLP 512 -> 2,048
    python bench/kernel_speed.py --tokens 65536 --vocab 1024 --hidden 1024 --slope 0   # the baseline's shapes
    python bench/kernel_speed.py --device cpu --tiny # interpreter (TRITON_INTERPRET=1): checks the bench itself

Each is timed three ways: eager PyTorch, the same eager function under torch.compile (what the
train stage runs when train.compile is on and the fused flags are off), and the fused kernel.
Ratios are compiled / fused: > 1 means the kernel pays. The reference for "does it pay" is the
compiled path, since that is what it replaces in a compiled training step.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--tokens", type=int, default=98_304)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--slope", type=float, default=0.5)
    parser.add_argument("--cap", type=float, default=30.0)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--json", type=Path)
    return parser.parse_args()


def main() -> int:
    args = parse()
    if args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are defined
    if args.tiny:
        args.tokens, args.vocab, args.dim, args.hidden, args.repeats = 256, 500, 32, 96, 2
    import torch
    import torch.nn.functional as F

    from pgolf.kernels.fused_mlp import fused_mlp
    from pgolf.kernels.softcap_ce import softcap_cross_entropy

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)

    def eager_ce(logits, targets):
        return F.cross_entropy(args.cap * torch.tanh(logits.float() / args.cap), targets)

    def eager_mlp(x, w_fc, w_proj):
        return F.linear(F.leaky_relu(F.linear(x, w_fc), args.slope).square(), w_proj)

    def fused_ce(logits, targets):
        return softcap_cross_entropy(logits, targets, args.cap)

    def fused_mlp_fn(x, w_fc, w_proj):
        return fused_mlp(x, w_fc, w_proj, args.slope)

    def ce_inputs():
        logits = (torch.randn(args.tokens, args.vocab, device=device) * 8).to(dtype).requires_grad_()
        return (logits, torch.randint(0, args.vocab, (args.tokens,), device=device))

    def mlp_inputs():
        return (torch.randn(args.tokens, args.dim, device=device, dtype=dtype, requires_grad=True),
                (torch.randn(args.hidden, args.dim, device=device) / args.dim ** 0.5).to(dtype).requires_grad_(),
                (torch.randn(args.dim, args.hidden, device=device) / args.hidden ** 0.5).to(dtype).requires_grad_())

    def step(fn, inputs):
        out = fn(*inputs)
        grads = torch.autograd.grad(out.float().sum() if out.dim() else out,
                                    [t for t in inputs if t.requires_grad])
        return out, grads

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def measure(fn, inputs) -> dict:
        for _ in range(3):
            step(fn, inputs)
        sync()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        for _ in range(args.repeats):
            out = step(fn, inputs)
        sync()
        ms = (time.perf_counter() - t0) * 1000 / args.repeats
        peak = torch.cuda.max_memory_allocated() - base if device.type == "cuda" else None
        return {"ms": round(ms, 3), "peak_extra_bytes": peak, "result": out}

    results: dict = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                     "torch": torch.__version__, "shapes": {k: getattr(args, k) for k in
                                                            ("tokens", "vocab", "dim", "hidden", "slope", "cap")}}
    compiled = device.type == "cuda"
    for name, eager, fused, make in (("softcap_ce", eager_ce, fused_ce, ce_inputs),
                                     ("mlp", eager_mlp, fused_mlp_fn, mlp_inputs)):
        inputs = make()
        ways = {"eager": eager, "fused": fused}
        if compiled:
            ways["compiled"] = torch.compile(eager, dynamic=False)
        row = {way: measure(fn, inputs) for way, fn in ways.items()}
        reference = row["eager"].pop("result")
        for way in ways:
            if way == "eager":
                continue
            out, grads = row[way].pop("result")
            row[way]["max_abs_diff_out"] = float((out.detach().float() - reference[0].detach().float()).abs().max())
            row[way]["max_rel_diff_grad"] = max(float((g.float() - r.float()).norm() / r.float().norm().clamp_min(1e-30))
                                                for g, r in zip(grads, reference[1]))
        base = row["compiled"] if compiled else row["eager"]
        row["speedup_fused_vs_" + ("compiled" if compiled else "eager")] = round(base["ms"] / row["fused"]["ms"], 3)
        results[name] = row
        print(json.dumps({name: row}), flush=True)
        del inputs
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
