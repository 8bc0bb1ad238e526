"""Train-stage throughput at the challenge's baseline configuration, optionally beside the
challenge's own baseline script on the same shards, in one run.

    python bench/train_throughput.py                         # GPU: sp1024, 524,288 tokens/step, seq 1024, 1 process
    python bench/train_throughput.py --reference bench/reference/train_gpt.py
    python bench/train_throughput.py --device cpu --tiny     # a seconds-long check that the bench itself works

Reference figure (the issue's): the baseline script ran 358.7 ms/step, 1.46 M tokens/s, 10.3 GiB
peak on one H100 with torch 2.11. Put the reference script in bench/reference/ (git-ignored):
fetched code is never committed. Shards are synthetic (uniform random tokens): throughput does
not depend on the text, and the reference and pgolf read the same files.
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
from pgolf.model.config import ModelConfig  # noqa: E402
from tasks import train as train_stage  # noqa: E402

REFERENCE_MS_PER_STEP_H100 = 358.7


def synthetic_shards(folder: Path, vocab: int, train_tokens: int, val_tokens: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    write_shard(folder / "fineweb_train_000000.bin", rng.integers(0, vocab, train_tokens))
    write_shard(folder / "fineweb_val_000000.bin", rng.integers(0, vocab, val_tokens))
    (folder / "manifest.json").write_text(json.dumps({"vocab_size": vocab, "bos_id": 1}))
    return folder


def tokenizer_model(folder: Path, vocab: int) -> Path:
    """A real SentencePiece model of the right size, for the reference script's byte tables."""
    from pgolf.data.corpus import builtin_documents
    from pgolf.tokenize.trainer import train_bpe, training_sentences

    path = folder / f"sp{vocab}.model"
    path.write_bytes(train_bpe(training_sentences(builtin_documents()), vocab, os.cpu_count() or 1, 1337))
    return path


def run_pgolf(cfg: train_stage.Config, shards: Path, out: Path) -> dict:
    """The train stage's own worker loop, in this process (one rank, no torchrun)."""
    out.mkdir(parents=True, exist_ok=True)
    trainer = train_stage.Trainer(cfg, shards, out)
    return trainer.train()


def run_reference(script: Path, shards: Path, tokenizer: Path, steps: int, timeout: int) -> dict:
    env = dict(os.environ, DATA_PATH=str(shards), TOKENIZER_PATH=str(tokenizer), VOCAB_SIZE="1024",
               ITERATIONS=str(steps), VAL_LOSS_EVERY="0", TRAIN_LOG_EVERY="10", MAX_WALLCLOCK_SECONDS="0",
               RUN_ID="bench_reference")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", str(script)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=script.parent)
    log = proc.stdout + proc.stderr
    avgs = re.findall(r"step_avg:([\d.]+)ms", log)
    mem = re.findall(r"peak memory allocated: (\d+) MiB", log)
    if not avgs:
        raise RuntimeError(f"reference script printed no step_avg (exit {proc.returncode}):\n{log[-3000:]}")
    return {"ms_per_step": float(avgs[-1]), "peak_mem_bytes": int(mem[-1]) * 2**20 if mem else None}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--warmup-steps", type=int, default=20)
    parser.add_argument("--tiny", action="store_true", help="a tiny model and batch (checks the bench on CPU)")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--reference", type=Path, help="the challenge's train_gpt.py, timed on the same shards")
    parser.add_argument("--reference-timeout", type=int, default=1200)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    if args.tiny:
        model = ModelConfig(vocab_size=1024, num_layers=2, model_dim=64, num_heads=4, num_kv_heads=2)
        batch, seq = 4096, 256
    else:
        model, batch, seq = ModelConfig(), 524_288, 1024
    cfg = train_stage.Config(model=model, device=args.device, iterations=args.steps, train_batch_tokens=batch,
                             train_seq_len=seq, max_wallclock_seconds=0, warmup_steps=args.warmup_steps,
                             compile=not args.no_compile, log_every=max(args.steps // 5, 1))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        needed = batch * (args.steps + args.warmup_steps) + batch
        shards = synthetic_shards(tmp / "shards", model.vocab_size, min(needed, 2**31 - 2), 2 * seq * 64 + 1)
        ours = run_pgolf(cfg, shards, tmp / "out")
        result = {"device": args.device, "config": {"tokens_per_step": batch, "seq_len": seq, "steps": args.steps},
                  "pgolf": ours}
        if args.device == "cuda":
            import torch

            result["gpu"] = torch.cuda.get_device_name()
            result["torch"] = torch.__version__
        if args.reference:
            ref = run_reference(args.reference.resolve(), shards, tokenizer_model(tmp, model.vocab_size), args.steps,
                                args.reference_timeout)
            ref["tokens_per_s"] = batch / (ref["ms_per_step"] / 1000.0)
            result["reference"] = ref
            result["speedup_vs_reference"] = ref["ms_per_step"] / ours["ms_per_step"]
        elif not args.tiny:
            result["speedup_vs_published_h100"] = REFERENCE_MS_PER_STEP_H100 / ours["ms_per_step"]
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
