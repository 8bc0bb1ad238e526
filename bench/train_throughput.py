"""Train-stage throughput and loss of any preset on one GPU, optionally beside the challenge's own
baseline script on the same shards, in one run.

    python bench/train_throughput.py                                 # baseline preset: ms/step, tokens/s, MFU, peak memory
    python bench/train_throughput.py --preset record --per-gpu       # R1 at one GPU's share of its 8-GPU batch
    python bench/train_throughput.py --preset all --steps 100        # every preset, 100 steps each
    python bench/train_throughput.py --reference bench/reference/train_gpt.py --corpus ../shared/corpus/mixed_large.jsonl.gz --steps 200
                                                                     # parity + speed against the challenge's script
    python bench/train_throughput.py --preset record --per-gpu --set train.model.doc_attention_kernel=flex
                                                                     # R1's document attention through FlexAttention
    python bench/train_throughput.py --device cpu --tiny             # a seconds-long check that the bench itself works

Reference figure: the challenge's baseline script ran 358.7 ms/step, 1.46 M tokens/s, 10.3 GiB peak
on one H100 with torch 2.11. Put that script in bench/reference/ (git-ignored): fetched code is never
committed. Without --corpus the shards are uniform random tokens (fine for speed, meaningless for
loss); with --corpus they are built by the pipeline's own corpus, tokenizer and shards stages.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pgolf.data.shards import write_shard  # noqa: E402
from pgolf.model.gpt import count_parameters  # noqa: E402
from pgolf.typed_params import from_dict  # noqa: E402
from pgolf.train import loop as training_loop  # noqa: E402
from runner import params as P  # noqa: E402
from tasks import shards as shards_stage, tokenizer as tok_stage, train as train_stage  # noqa: E402
from tasks import corpus as corpus_stage  # noqa: E402
from runner.stage import execute  # noqa: E402

REFERENCE_MS_PER_STEP_H100 = 358.7
H100_BF16_DENSE_FLOPS = 989e12


def synthetic_shards(folder: Path, vocab: int, train_tokens: int, val_tokens: int, seed: int = 0) -> Path:
    """Uniform random tokens with a BOS every ~1,500 tokens (so the document loader has documents)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for name, n in (("fineweb_train_000000.bin", train_tokens), ("fineweb_val_000000.bin", val_tokens)):
        tokens = rng.integers(2, vocab, n)
        tokens[rng.random(n) < 1 / 1500] = 1
        tokens[0] = 1
        write_shard(folder / name, tokens)
    (folder / "manifest.json").write_text(json.dumps({"vocab_size": vocab, "bos_id": 1}))
    return folder


def corpus_shards(corpus: Path, vocab: int, folder: Path) -> tuple[Path, Path]:
    """Real text through the pipeline's own stages; returns (shards folder, tokenizer model)."""
    execute(corpus_stage.SPEC, corpus_stage.Config(source=str(corpus)), {}, folder / "corpus")
    execute(tok_stage.SPEC, tok_stage.Config(vocab_size=vocab, num_threads=os.cpu_count() or 1, max_sentence_length=1 << 20),
            {"corpus": folder / "corpus"}, folder / "tokenizer")
    execute(shards_stage.SPEC, shards_stage.Config(val_docs=200),
            {"corpus": folder / "corpus", "tokenizer": folder / "tokenizer"}, folder / "shards")
    return folder / "shards", folder / "tokenizer" / "tokenizer.model"


def preset_config(preset: str, args) -> train_stage.Config:
    section = P.render(preset, args.overrides)["train"]
    nproc = section["nproc"]
    if args.per_gpu and nproc > 1:
        section["train_batch_tokens"] //= nproc  # one GPU's share of the multi-GPU step
    section.update(nproc=1, device=args.device, iterations=args.steps, max_wallclock_seconds=0,
                   gptq_reserve_seconds=0, warmup_steps=args.warmup_steps, compile=not args.no_compile,
                   log_every=max(args.steps // 10, 1), resume_every=0)
    accum = section["train_batch_tokens"] // section["train_seq_len"]
    section["grad_accum_steps"] = section["grad_accum_steps"] or min(8, accum)
    if args.tiny:
        section["model"].update(model_dim=64, num_heads=4,
                                num_kv_heads=2, vocab_size=1024, rope_dims=0, attn_gate_width=12)
        section.update(train_batch_tokens=4096, train_seq_len=256, grad_accum_steps=1)
    return from_dict(train_stage.Config, section, f"preset {preset}")


def run_pgolf(cfg: train_stage.Config, shards: Path, out: Path) -> dict:
    """The train stage's own worker loop, in this process (one rank, no torchrun)."""
    out.mkdir(parents=True, exist_ok=True)
    trainer = training_loop.Trainer(cfg, shards, out)
    metrics = trainer.train()
    curve = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    metrics["loss_curve"] = [(r["step"], r["train_loss"]) for r in curve]
    params = count_parameters(cfg.model)
    metrics["params"] = params
    # 6 N flops per token for the matmuls (attention's T^2 term left out): a lower bound on MFU.
    metrics["mfu_vs_h100_bf16"] = round(6 * params * metrics["tokens_per_s"] / H100_BF16_DENSE_FLOPS, 4)
    return metrics


def run_reference(script: Path, shards: Path, tokenizer: Path, steps: int, timeout: int) -> dict:
    env = dict(os.environ, DATA_PATH=str(shards), TOKENIZER_PATH=str(tokenizer), VOCAB_SIZE="1024",
               ITERATIONS=str(steps), VAL_LOSS_EVERY="0", TRAIN_LOG_EVERY="10", MAX_WALLCLOCK_SECONDS="0",
               RUN_ID="bench_reference")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", str(script)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=script.parent)
    log = proc.stdout + proc.stderr
    avgs = re.findall(r"step_avg:([\d.]+)ms", log)
    losses = [(int(s), float(v)) for s, v in re.findall(r"step:(\d+)/\d+ train_loss:([\d.]+)", log)]
    mem = re.findall(r"peak memory allocated: (\d+) MiB", log)
    # The script's own score of its final_model.pt after its int8+zlib round trip: what
    # bench/reference_int8.py must reproduce from that file.
    int8 = re.findall(r"final_int8_zlib_roundtrip_exact val_loss:([\d.]+) val_bpb:([\d.]+)", log)
    if not avgs:
        raise RuntimeError(f"reference script printed no step_avg (exit {proc.returncode}):\n{log[-3000:]}")
    return {"ms_per_step": float(avgs[-1]), "loss_curve": losses,
            "peak_mem_bytes": int(mem[-1]) * 2**20 if mem else None,
            "int8_zlib_val_loss": float(int8[-1][0]) if int8 else None,
            "int8_zlib_val_bpb": float(int8[-1][1]) if int8 else None,
            "final_model": str(script.parent / "final_model.pt")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="baseline", help="a preset name, names joined by commas, or 'all'")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--warmup-steps", type=int, default=20)
    parser.add_argument("--per-gpu", action="store_true", help="multi-GPU presets: one GPU's share of the batch")
    parser.add_argument("--tiny", action="store_true", help="tiny widths and batch (checks the bench on CPU)")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--corpus", type=Path, help="jsonl(.gz) text to build real shards from (baseline vocab)")
    parser.add_argument("--reference", type=Path, help="the challenge's train_gpt.py, timed on the same shards")
    parser.add_argument("--reference-timeout", type=int, default=1200)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="train.KEY=VALUE",
                        help="override the preset, e.g. train.model.doc_attention_kernel=flex")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--work", type=Path, help="build the shards (and tokenizer) here and keep them, e.g. for "
                        "bench/reference_int8.py on the reference's final_model.pt; default: a temporary folder")
    args = parser.parse_args()

    presets = [p for p in P.list_presets() if p != "smoke"] if args.preset == "all" else args.preset.split(",")
    results: dict = {"device": args.device, "steps": args.steps, "presets": {}}
    if args.device == "cuda":
        import torch

        results["gpu"], results["torch"] = torch.cuda.get_device_name(), torch.__version__
    with tempfile.TemporaryDirectory() as scratch:
        tmp = args.work.resolve() if args.work else Path(scratch)
        built: dict[int, tuple[Path, Path | None]] = {}
        for preset in presets:
            cfg = preset_config(preset, args)
            vocab = cfg.model.vocab_size
            if vocab not in built:
                if args.corpus:
                    built[vocab] = corpus_shards(args.corpus, vocab, tmp / f"data{vocab}")
                else:
                    needed = cfg.train_batch_tokens * (args.steps + 2 * args.warmup_steps + 2)
                    built[vocab] = (synthetic_shards(tmp / f"shards{vocab}", vocab, min(needed, 2**31 - 2), 4096), None)
            shards, tokenizer = built[vocab]
            results["presets"][preset] = run_pgolf(cfg, shards, tmp / f"out_{preset}")
            print(json.dumps({preset: {k: v for k, v in results["presets"][preset].items() if k != "loss_curve"}}),
                  flush=True)
        if args.reference:
            shards, tokenizer = built.get(1024) or (synthetic_shards(tmp / "shards1024", 1024, 2**27, 4096), None)
            if tokenizer is None:
                from pgolf.data.corpus import builtin_documents
                from pgolf.tokenize.trainer import train_bpe, training_sentences

                tokenizer = tmp / "sp1024.model"
                tokenizer.write_bytes(train_bpe(training_sentences(builtin_documents()), 1024, os.cpu_count() or 1, 1337))
            ref = run_reference(args.reference.resolve(), shards, tokenizer, args.steps, args.reference_timeout)
            ref["shards"], ref["tokenizer"] = str(shards), str(tokenizer)
            ref["tokens_per_s"] = 524_288 / (ref["ms_per_step"] / 1000.0)
            results["reference"] = ref
            if "baseline" in results["presets"]:
                ours = results["presets"]["baseline"]
                results["speedup_vs_reference"] = ref["ms_per_step"] / ours["ms_per_step"]
                if ours["loss_curve"] and ref["loss_curve"]:
                    results["final_loss_delta_vs_reference"] = ours["loss_curve"][-1][1] - ref["loss_curve"][-1][1]
        elif "baseline" in results["presets"] and args.device == "cuda" and not args.tiny:
            results["speedup_vs_published_h100"] = REFERENCE_MS_PER_STEP_H100 / results["presets"]["baseline"]["ms_per_step"]
    print(json.dumps({k: v for k, v in results.items() if k != "presets"}, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
