"""Score a model trained by the challenge's baseline script the way that script scores itself:
its final_model.pt -> train stage import -> gptq `int8_baseline` (int8_clean_per_row_v1) -> pack
(zlib 9) -> flat eval at 1,024 tokens; printed beside the value the script printed for the same
model (its `final_int8_zlib_roundtrip val_bpb` line).

    python bench/reference_int8.py --checkpoint final_model.pt --shards data/datasets/fineweb10B_sp1024 \
        --tokenizer data/tokenizers/fineweb_1024_bpe.model --expect 1.22436570
    python bench/reference_int8.py --tiny          # CPU: a smoke-sized model saved as a final_model.pt

The shards must be the ones the script evaluated: the published sp1024 folder (adopted through the
shards stage, linked, not copied) or a shards stage output; the tokenizer the one it used: its
.model (adopted through the tokenizer stage) or a tokenizer stage output.

What can still differ from the script's number is arithmetic, not the format: the script runs its
embedding and the residual stream in bf16 under autocast, pgolf's model keeps them in fp32 (the
weights themselves are the script's, its bf16 embedding included).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pgolf.params import from_dict  # noqa: E402
from tasks import eval as eval_stage, gptq, pack, shards, tokenizer, train  # noqa: E402
from tasks import params as P  # noqa: E402
from tasks.common import execute  # noqa: E402


def baseline_state_dict(vocab_size: int, num_layers: int, model_dim: int, num_heads: int, num_kv_heads: int,
                        mlp_mult: int = 2, tie_embeddings: bool = True, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random state dict named, shaped and typed as the baseline script's `torch.save(base_model.state_dict())`
    writes it, from that script's modules (GPT, Block, CausalSelfAttention, MLP), not from pgolf's:
    the model runs `.bfloat16()` and then puts CastedLinear weights and low-dim/control parameters back in
    fp32, so only the embedding stays bf16; Rotary's inv_freq is not persistent."""
    g = torch.Generator().manual_seed(seed)
    head_dim = model_dim // num_heads
    kv_dim, hidden = num_kv_heads * head_dim, int(mlp_mult * model_dim)
    skips = min(num_layers // 2, num_layers - num_layers // 2)

    def randn(*shape, std=0.02):
        return torch.randn(*shape, generator=g) * std

    state = {"tok_emb.weight": randn(vocab_size, model_dim, std=0.05).bfloat16(),
             "skip_weights": 1.0 + randn(skips, model_dim, std=0.1)}
    for i in range(num_layers):
        p = f"blocks.{i}."
        state.update({
            p + "attn.c_q.weight": randn(model_dim, model_dim), p + "attn.c_k.weight": randn(kv_dim, model_dim),
            p + "attn.c_v.weight": randn(kv_dim, model_dim), p + "attn.proj.weight": randn(model_dim, model_dim),
            p + "attn.q_gain": 1.5 + randn(num_heads, std=0.1),
            p + "mlp.fc.weight": randn(hidden, model_dim), p + "mlp.proj.weight": randn(model_dim, hidden),
            p + "attn_scale": 1.0 + randn(model_dim, std=0.1), p + "mlp_scale": 1.0 + randn(model_dim, std=0.1),
            p + "resid_mix": torch.stack((torch.ones(model_dim), torch.zeros(model_dim))) + randn(2, model_dim, std=0.1),
        })
    if not tie_embeddings:
        state["lm_head.weight"] = randn(vocab_size, model_dim)
    return state


def tiny_inputs(work: Path) -> tuple[Path, Path, Path]:
    """The smoke preset's corpus, tokenizer and shards, and a random smoke-sized model saved as the
    baseline saves its own (torch.save of the state dict, bf16 embedding, the baseline's names)."""
    from tasks import corpus

    params = P.render("smoke")
    execute(corpus.SPEC, from_dict(corpus.Config, params["corpus"], "corpus"), {}, work / "corpus")
    execute(tokenizer.SPEC, from_dict(tokenizer.Config, params["tokenizer"], "tokenizer"),
            {"corpus": work / "corpus"}, work / "tokenizer")
    execute(shards.SPEC, from_dict(shards.Config, params["shards"], "shards"),
            {"corpus": work / "corpus", "tokenizer": work / "tokenizer"}, work / "shards")
    m = params["train"]["model"]
    torch.save(baseline_state_dict(m["vocab_size"], m["num_layers"], m["model_dim"], m["num_heads"], m["num_kv_heads"],
                                   m["mlp_mult"], m["tie_embeddings"]), work / "final_model.pt")
    # Handed over as the script's inputs are: a bare folder of shards and a bare .model, both adopted.
    published = work / "published"
    published.mkdir()
    for shard in sorted((work / "shards").glob("fineweb_*.bin")):
        shutil.copyfile(shard, published / shard.name)
    shutil.copyfile(work / "tokenizer/tokenizer.model", published / "tokenizer.model")
    return work / "final_model.pt", published, published / "tokenizer.model"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, help="final_model.pt written by the baseline script")
    parser.add_argument("--shards", type=Path, help="a shards stage output or a published shard folder")
    parser.add_argument("--tokenizer", type=Path, help="the script's SentencePiece .model, or a tokenizer stage output")
    parser.add_argument("--expect", type=float, help="the val_bpb the baseline script printed after its int8+zlib round trip")
    parser.add_argument("--preset", default="baseline", help="the preset whose model config matches the checkpoint")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="pgolf-ref-int8-"))
    try:
        if args.tiny:
            args.checkpoint, args.shards, args.tokenizer = tiny_inputs(work)
            args.preset, args.device = "smoke", "cpu"
        if not (args.checkpoint and args.shards and args.tokenizer):
            parser.error("--checkpoint, --shards and --tokenizer are needed (or --tiny)")
        params = P.render(args.preset)
        if args.tokenizer.is_file():  # a published .model; adoption reads no corpus
            execute(tokenizer.SPEC, from_dict(tokenizer.Config, {**params["tokenizer"], "adopt": str(args.tokenizer)},
                                              "tokenizer"), {"corpus": args.tokenizer.parent}, work / "tokenizer")
            args.tokenizer = work / "tokenizer"
        if not (args.shards / "manifest.json").is_file():  # a published shard folder
            execute(shards.SPEC, from_dict(shards.Config, {**params["shards"], "adopt": str(args.shards)}, "shards"),
                    {"corpus": args.shards, "tokenizer": args.tokenizer}, work / "shards")
            args.shards = work / "shards"
        train_cfg = from_dict(train.Config, {**params["train"], "import_checkpoint": str(args.checkpoint.resolve())}, "train")
        execute(train.SPEC, train_cfg, {"shards": args.shards}, work / "train")
        q = execute(gptq.SPEC, gptq.Config(method="int8_baseline", device=args.device),
                    {"train": work / "train", "shards": args.shards}, work / "gptq")
        size = execute(pack.SPEC, pack.Config(compressor="zlib", level=9, layout="flat"), {"gptq": work / "gptq"},
                       work / "pack")
        metrics = execute(eval_stage.SPEC, eval_stage.Config(seq_len=params["eval"]["seq_len"] if args.tiny else 1024,
                                                             device=args.device),
                          {"pack": work / "pack", "shards": args.shards, "tokenizer": args.tokenizer}, work / "eval")
        report = {"val_loss": metrics["val_loss"], "val_bpb": metrics["val_bpb"], "tokens": metrics["tokens"],
                  "model_bytes": size["model_bytes"], "quantize_seconds": q["quantize_seconds"],
                  "eval_seconds": metrics["eval_seconds"]}
        if args.expect is not None:
            report.update(expected_val_bpb=args.expect, difference=metrics["val_bpb"] - args.expect)
        print(f"val_bpb {metrics['val_bpb']:.8f}" + (f"  (baseline script: {args.expect:.8f}, "
                                                     f"difference {report['difference']:+.2e})" if args.expect else ""))
        print("BENCH_JSON " + json.dumps(report))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
