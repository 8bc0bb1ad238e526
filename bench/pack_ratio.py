"""Artifact size of one quantized model in R1's format (per-group streams + lrzip, docs/lineage.md#model-formats)
and in pgolf's `best` (each stream with its smallest compressor, payload byte-shuffled when that
helps), with pack and unpack seconds; the ratio is best / R1.

    python bench/pack_ratio.py --gptq artifacts/gptq                    # a run's quantized model
    python bench/pack_ratio.py --corpus ../shared/corpus/brown_small.jsonl.gz --steps 30
                                                                        # train one first (baseline shape, CPU ok)
    python bench/pack_ratio.py --corpus ../shared/corpus/brown_small.jsonl.gz --steps 40 \
        --set train.model.num_layers=6 --set train.model.model_dim=384 --set train.model.num_heads=6 \
        --set train.model.num_kv_heads=3 --work /tmp/pack-bench    # a mid-size model, kept for --gptq
Without the lrzip program R1's format cannot be written; the bench then says so and compares with
per-group lzma instead.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pgolf.pack.compress import available  # noqa: E402
from pgolf.pack.serialize import pack, stream_choices, unpack  # noqa: E402
from pgolf.typed_params import from_dict  # noqa: E402
from pgolf.quant.quantized_model import load_quantized  # noqa: E402
from runner import params as P  # noqa: E402
from tasks import stages  # noqa: E402
from runner.stage import execute  # noqa: E402

R1_GPTQ = ["gptq.bits=6", "gptq.embed_bits=7", "gptq.attn_clip_sigmas=13.0", "gptq.mlp_clip_sigmas=11.5",
           "gptq.embed_clip_sigmas=14.0"]


def train_and_quantize(corpus: Path, steps: int, work: Path, device: str, extra: list[str]) -> Path:
    """The baseline's model shape (or what `extra` overrides make of it), trained briefly on real text
    (the last quarter of the steps a linear warmdown), then GPTQ'd with R1's bits and clips."""
    overrides = [f"corpus.source={corpus.resolve()}", "tokenizer.max_sentence_length=1048576", "shards.val_docs=50",
                 "train.nproc=1", f"train.iterations={steps}", f"train.warmdown_iters={max(1, steps // 4)}",
                 "train.max_wallclock_seconds=0", "train.train_batch_tokens=8192",
                 "train.train_seq_len=512", "train.grad_accum_steps=1", "train.warmup_steps=0",
                 "train.resume_every=0", f"train.device={device}", f"gptq.device={device}",
                 "gptq.calib_batches=4", "gptq.calib_seq_len=512", "gptq.calib_batch_seqs=8", *R1_GPTQ, *extra]
    params = P.render("baseline", overrides)
    for module in stages.STAGE_MODULES[:5]:  # corpus .. gptq
        spec = module.SPEC
        print(f"[bench] stage {spec.name}", flush=True)
        execute(spec, from_dict(spec.config_cls, params[spec.name], spec.name),
                {name: work / spec.producers[name] for name in spec.inputs}, work / spec.name)
    return work / "gptq"


def measure(qm, compressor: str, layout: str) -> dict:
    started = time.perf_counter()
    blob, _ = pack(qm, compressor, layout=layout, sort_rows=layout == "pergroup")
    packed = time.perf_counter()
    restored = unpack(blob)
    unpacked = time.perf_counter()
    assert all(restored.tensors[n].equal(t) for n, t in qm.tensors.items())
    return {"bytes": len(blob), "pack_seconds": round(packed - started, 2), "unpack_seconds": round(unpacked - packed, 2),
            "streams": [f"{s['compressor']}{'+shuffle' if s['transform'] != 'none' else ''}"
                        for s in stream_choices(blob) if s["stored_bytes"]]}


def order0_bytes(qm) -> float:
    """What the codes would take at each tensor's own symbol entropy (an ideal coder that sees each
    code alone): a coder below it is using context, one above it leaves bytes behind."""
    bits = 0.0
    for name, t in qm.tensors.items():
        if name.endswith(".q"):
            counts = np.unique(t.numpy(), return_counts=True)[1]
            p = counts / counts.sum()
            bits -= float((counts * np.log2(p)).sum())
    return bits / 8


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gptq", type=Path, help="a gptq stage output (quantized.safetensors)")
    parser.add_argument("--corpus", type=Path, help="train a baseline-shaped model on this jsonl(.gz) first")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="with --corpus: a params override, e.g. train.model.num_layers=6 (repeatable)")
    parser.add_argument("--work", type=Path, help="with --corpus: keep the stage outputs here (its gptq/ can be "
                                                  "passed as --gptq later) instead of a temporary folder")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        if args.gptq is None:
            if args.corpus is None:
                parser.error("give --gptq (a quantized model) or --corpus (to train one)")
            args.gptq = train_and_quantize(args.corpus, args.steps, args.work or Path(tmp), args.device, args.set)
        qm = load_quantized(args.gptq / "quantized.safetensors")
        r1_compressor = "lrzip" if available("lrzip") else "lzma"
        results = {f"r1_pergroup_{r1_compressor}": measure(qm, r1_compressor, "pergroup"),
                   "best_pergroup": measure(qm, "best", "pergroup"),
                   "best_flat": measure(qm, "best", "flat"),
                   "brotli_flat": measure(qm, "brotli", "flat")}
    reference = results[f"r1_pergroup_{r1_compressor}"]["bytes"]
    print(f"\n{'format':<22} {'bytes':>12} {'vs R1':>8} {'pack s':>8} {'unpack s':>9}  streams")
    for name, r in results.items():
        r["ratio_vs_r1"] = round(r["bytes"] / reference, 5)
        print(f"{name:<22} {r['bytes']:>12,} {r['ratio_vs_r1']:>8.4f} {r['pack_seconds']:>8.2f} {r['unpack_seconds']:>9.2f}"
              f"  {' '.join(r['streams'])}")
    if r1_compressor != "lrzip":
        print("lrzip is not installed: R1's own format (per-group lrzip) was not measured; per-group lzma stands in")
    weights = sum(t.numel() for n, t in qm.tensors.items() if n.endswith(".q"))
    bound = order0_bytes(qm)
    print(f"codes at their order-0 entropy: {bound:,.0f} bytes ({8 * bound / weights:.3f} bits per code; "
          f"the other tensors are {sum(t.numel() * t.element_size() for n, t in qm.tensors.items() if not n.endswith('.q')):,} raw bytes)")
    print("BENCH_JSON " + json.dumps({"quantized_weights": weights, "lrzip": r1_compressor == "lrzip",
                                      "codes_order0_bytes": round(bound), **results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
