"""Eval-stage bench on one GPU: the TTT gain (post-quant bpb minus final bpb) on a model the pipeline
trains, the eval seconds of each mode, and a projection of the eval time to 8 GPUs against R1's
455-509 s and PR #2135's 540-567 s (docs/lineage.md#eval-budget).

    python bench/eval_ttt.py --preset record --corpus ../shared/corpus/mixed_large.jsonl.gz \
        --set train.max_wallclock_seconds=300 --set train.nproc=1 --set shards.val_docs=500
    python bench/eval_ttt.py --artifacts artifacts          # evaluate an existing run's pack output
    python bench/eval_ttt.py --device cpu --tiny            # smoke preset, toy sizes: checks the bench works

Modes: `flat` (the post-quant figure), `sliding` (stride 64, as RSW), and the preset's own TTT
(eval.ttt of the preset, e.g. R1's LoRA + 3 global SGD phases). The projection scales the measured
TTT scoring seconds by 50,000 / the val documents evaluated and divides by 8 ranks (batches and SGD
sequences are dealt evenly over ranks); with the n-gram tilt (eval.tilt, the pr2135 preset) it adds
the hint precompute, inside the clock, scaled by 47,851,520 / the val tokens here and not divided:
every rank computes all the hints, as PR #2135's does. It leaves out communication, so it is a
lower bound.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pgolf.data.shards import load_split  # noqa: E402
from pgolf.evaluate.lora_ttt import find_documents  # noqa: E402
from pgolf.typed_params import from_dict  # noqa: E402
from tasks import evaluate as eval_stage  # noqa: E402
from runner import params as P  # noqa: E402
from tasks import stages  # noqa: E402
from runner.stage import execute  # noqa: E402

CHALLENGE_VAL_DOCS = 50_000
CHALLENGE_VAL_TARGETS = 47_851_520  # the CaseOps val stream R1 and PR #2135 score
R1_EVAL_SECONDS = (455.1, 508.8)
PR2135_EVAL_SECONDS = (540.1, 567.1)  # its three logs; its seed-42 hint precompute alone 200.9 s
# --tiny: the smoke preset with R1-style phased LoRA TTT at toy sizes.
TINY = ["corpus.max_docs=300", "shards.val_docs=40", "train.iterations=30", "train.nproc=1", "eval.ttt=lora",
        "eval.seq_len=128", "eval.lora.context=128", "eval.lora.chunk=32", "eval.lora.batch_docs=8",
        "eval.lora.phases=2", "eval.lora.prefix_docs=16", "eval.lora.global_chunk_tokens=1024",
        "eval.lora.global_seq_len=128"]


def run_pipeline(params: dict, root: Path) -> Path:
    """corpus -> ... -> pack in this process, each stage's output in root/<stage>."""
    for module in stages.STAGE_MODULES:
        spec = module.SPEC
        if spec.name == "eval":
            break
        cfg = from_dict(spec.config_cls, params[spec.name], spec.name)
        inputs = {name: root / spec.producers[name] for name in spec.inputs}
        print(f"[bench] stage {spec.name}", flush=True)
        execute(spec, cfg, inputs, root / spec.name)
    return root


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="record")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--corpus", help="jsonl(.gz) documents for corpus.source (default: the preset's)")
    parser.add_argument("--artifacts", help="an existing run's folder with pack/, shards/, tokenizer/ (skips training)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes: checks the bench, not the numbers")
    parser.add_argument("--out", help="keep the run here (default: a temporary folder)")
    args = parser.parse_args(argv)
    overrides = list(args.overrides)
    if args.corpus:
        overrides.append(f"corpus.source={Path(args.corpus).resolve()}")
    if args.tiny:
        args.preset, overrides = "smoke", TINY + overrides
    for stage in ("train", "gptq", "eval"):
        overrides.append(f"{stage}.device={args.device}")
    params = P.render(args.preset, overrides)
    work = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="pgolf-eval-bench-"))
    if args.artifacts:
        art = Path(args.artifacts)
        inputs = {"pack": art / "pack", "shards": art / "shards", "tokenizer": art / "tokenizer"}
    else:
        run_pipeline(params, work)
        inputs = {"pack": work / "pack", "shards": work / "shards", "tokenizer": work / "tokenizer"}
    base = from_dict(eval_stage.Config, params["eval"], "eval")
    docs = len(find_documents(load_split(inputs["shards"], "val"), 1))
    modes = {"flat": replace(base, ttt="off", stride=0), "sliding": replace(base, ttt="off", stride=64)}
    if base.ttt != "off":
        modes[f"ttt_{base.ttt}"] = base
    results = {}
    for name, cfg in modes.items():
        print(f"[bench] eval {name}", flush=True)
        results[name] = execute(eval_stage.SPEC, cfg, inputs, work / f"eval_{name}")
    print(f"\n{'mode':<10} {'val_bpb':>10} {'tokens':>10} {'load s':>8} {'scoring s':>10} {'ranks':>6}")
    for name, m in results.items():
        print(f"{name:<10} {m['val_bpb']:>10.5f} {m['tokens']:>10,} {m['load_seconds']:>8.1f} "
              f"{m['scoring_seconds']:>10.1f} {m['ranks']:>6}")
    report = {"preset": args.preset, "val_docs": docs, "post_quant_bpb": results["flat"]["val_bpb"],
              "sliding_bpb": results["sliding"]["val_bpb"]}
    ttt = next((m for n, m in results.items() if n.startswith("ttt_")), None)
    if ttt is not None:
        scoring = ttt["scoring_seconds"] * ttt["ranks"] * CHALLENGE_VAL_DOCS / max(docs, 1) / 8
        hints = ttt.get("hint_seconds", 0.0) * CHALLENGE_VAL_TARGETS / max(ttt["tokens"], 1)
        projected = scoring + hints
        report.update(ttt_bpb=ttt["val_bpb"], ttt_gain=ttt["val_bpb"] - results["flat"]["val_bpb"],
                      ttt_scoring_seconds=ttt["scoring_seconds"], hint_seconds=ttt.get("hint_seconds"),
                      projected_8gpu_seconds=round(projected, 1), projected_8gpu_hint_seconds=round(hints, 1),
                      r1_eval_seconds=R1_EVAL_SECONDS, pr2135_eval_seconds=PR2135_EVAL_SECONDS,
                      audit_passed=ttt["audit"]["passed"], phases=ttt["audit"].get("phases"),
                      tilt=ttt.get("tilt"))
        print(f"\nTTT gain {report['ttt_gain']:+.5f} bpb (R1: -0.0127); TTT scoring {ttt['scoring_seconds']:.1f} s on "
              f"{ttt['ranks']} rank(s) for {docs:,} docs -> about {scoring:.0f} s for 50,000 docs on 8 GPUs"
              + (f", plus {hints:.0f} s of n-gram hints for {CHALLENGE_VAL_TARGETS:,} targets" if hints else "")
              + f": {projected:.0f} s (R1: {R1_EVAL_SECONDS[0]}-{R1_EVAL_SECONDS[1]} s, "
              f"PR #2135: {PR2135_EVAL_SECONDS[0]}-{PR2135_EVAL_SECONDS[1]} s)")
    print("BENCH_JSON " + json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
