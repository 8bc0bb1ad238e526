"""Score a model trained by the challenge's baseline script the way that script scores itself:
its final_model.pt -> train stage import -> gptq `int8_baseline` (int8_clean_per_row_v1) -> pack
(zlib 9) -> flat eval at 1,024 tokens; printed beside the value the script printed for the same
model (its `final_int8_zlib_roundtrip val_bpb` line).

    python bench/reference_int8.py --checkpoint final_model.pt --shards data/datasets/fineweb10B_sp1024 \
        --tokenizer data/tokenizers/fineweb_1024_bpe.model --expect 1.22436570
    python bench/reference_int8.py --tiny          # CPU: a smoke-sized model saved as a final_model.pt
    python bench/reference_int8.py --tiny --reference-code bench/reference/train_gpt.py \
        --set train.model.num_layers=2 --set train.model.model_dim=512 --set train.model.num_heads=8 \
        --set train.model.num_kv_heads=4   # CPU: every matrix int8, also through the script's own round trip

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

from pgolf.typed_params import from_dict  # noqa: E402
from tasks import evaluate as eval_stage, gptq, pack, shards, tokenizer, train  # noqa: E402
from runner import params as P  # noqa: E402
from runner.stage import execute  # noqa: E402


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


def tiny_inputs(work: Path, overrides: list[str]) -> tuple[Path, Path, Path]:
    """The smoke preset's corpus, tokenizer and shards, and a random smoke-sized model saved as the
    baseline saves its own (torch.save of the state dict, bf16 embedding, the baseline's names)."""
    from tasks import corpus

    params = P.render("smoke", overrides)
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


def reference_roundtrip(script: Path, checkpoint: Path, shards_folder: Path, tokenizer_model: Path, model: dict,
                        seq_len: int, device: str) -> dict:
    """The script's own int8+zlib round trip and eval, through its functions, the way its main()
    runs them after training (GPT, .bfloat16(), CastedLinear and low-dim params back to fp32,
    quantize_state_dict_int8, torch.save + zlib 9, dequantize, eval_val): the value it would print as
    `final_int8_zlib_roundtrip_exact` for this final_model.pt, on any device. Its eval_val asks for
    CUDA autocast, which is off on a CPU tensor: there the whole model runs as its dtypes are."""
    import importlib.util
    import io
    import zlib

    import sentencepiece as spm

    spec = importlib.util.spec_from_file_location("baseline_train_gpt", script)
    ref = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ref)  # its main() runs only as __main__
    dev = torch.device("cuda" if device in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
    net = ref.GPT(vocab_size=model["vocab_size"], num_layers=model["num_layers"], model_dim=model["model_dim"],
                  num_heads=model["num_heads"], num_kv_heads=model["num_kv_heads"], mlp_mult=int(model["mlp_mult"]),
                  tie_embeddings=model["tie_embeddings"], tied_embed_init_std=model["tied_embed_init_std"],
                  logit_softcap=model["logit_softcap"], rope_base=model["rope_base"],
                  qk_gain_init=model["qk_gain_init"]).to(dev).bfloat16()
    for module in net.modules():
        if isinstance(module, ref.CastedLinear):
            module.float()
    ref.restore_low_dim_params_to_fp32(net)
    net.load_state_dict(torch.load(checkpoint, map_location=dev), strict=True)
    quant_obj, _ = ref.quantize_state_dict_int8(net.state_dict())
    raw = io.BytesIO()
    torch.save(quant_obj, raw)
    blob = zlib.compress(raw.getvalue(), level=9)
    dequantized = ref.dequantize_state_dict_int8(torch.load(io.BytesIO(zlib.decompress(blob)), map_location="cpu"))
    net.load_state_dict(dequantized, strict=True)
    args = ref.Hyperparameters()
    args.train_seq_len, args.vocab_size = seq_len, model["vocab_size"]
    val_tokens = ref.load_validation_tokens(str(shards_folder / "fineweb_val_*.bin"), seq_len)
    luts = ref.build_sentencepiece_luts(spm.SentencePieceProcessor(model_file=str(tokenizer_model)),
                                        model["vocab_size"], dev)
    val_loss, val_bpb = ref.eval_val(args, net, 0, 1, dev, 8, val_tokens, *luts)
    # The same weights with every activation in fp32, as pgolf's eval runs them: what is left between
    # this and pgolf's number is not arithmetic precision.
    _, val_bpb_fp32 = ref.eval_val(args, net.float(), 0, 1, dev, 8, val_tokens, *luts)
    return {"val_loss": val_loss, "val_bpb": val_bpb, "val_bpb_fp32_activations": val_bpb_fp32,
            "int8_zlib_bytes": len(blob), "device": dev.type, "dequantized": dequantized}


def compare_weights(reference: dict[str, torch.Tensor], ours: dict[str, torch.Tensor]) -> dict:
    """Tensor by tensor: the script's dequantized weights against those pgolf's artifact decodes to."""
    differing = {name: float((reference[name].float() - ours[name].float()).abs().max())
                 for name in reference if name in ours and not torch.equal(reference[name].float(), ours[name].float())}
    return {"tensors": len(reference), "missing": sorted(set(reference) ^ set(ours)), "values_differ": differing,
            "dtypes_differ": sorted(n for n in reference if n in ours and reference[n].dtype != ours[n].dtype)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, help="final_model.pt written by the baseline script")
    parser.add_argument("--shards", type=Path, help="a shards stage output or a published shard folder")
    parser.add_argument("--tokenizer", type=Path, help="the script's SentencePiece .model, or a tokenizer stage output")
    parser.add_argument("--expect", type=float, help="the val_bpb the baseline script printed after its int8+zlib round trip")
    parser.add_argument("--preset", default="baseline", help="the preset whose model config matches the checkpoint")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--reference-code", type=Path, metavar="TRAIN_GPT_PY",
                        help="the baseline script itself: compute --expect with its own round-trip and eval functions")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="preset overrides, e.g. train.model.model_dim=512 so --tiny's matrices are int8 rows "
                             "(the format keeps tensors of <= 65,536 values as floats)")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="pgolf-ref-int8-"))
    try:
        if args.tiny:
            args.checkpoint, args.shards, args.tokenizer = tiny_inputs(work, args.overrides)
            args.preset, args.device = "smoke", "cpu"
        if not (args.checkpoint and args.shards and args.tokenizer):
            parser.error("--checkpoint, --shards and --tokenizer are needed (or --tiny)")
        params = P.render(args.preset, args.overrides)
        seq_len = params["eval"]["seq_len"] if args.tiny else 1024
        if args.reference_code:
            model_file = args.tokenizer if args.tokenizer.is_file() else args.tokenizer / "tokenizer.model"
            reference = reference_roundtrip(args.reference_code, args.checkpoint, args.shards, model_file,
                                            params["train"]["model"], seq_len, args.device)
            reference_weights = reference.pop("dequantized")
            print("reference " + json.dumps(reference), flush=True)
            args.expect = reference["val_bpb"]
        if args.tokenizer.is_file():  # a published .model; adoption reads no corpus
            execute(tokenizer.SPEC, from_dict(tokenizer.Config, {**params["tokenizer"], "adopt": str(args.tokenizer)},
                                              "tokenizer"), {"corpus": args.tokenizer.parent}, work / "tokenizer")
            args.tokenizer = work / "tokenizer"
        if not (args.shards / "manifest.json").is_file():  # a published shard folder
            execute(shards.SPEC, from_dict(shards.Config, {**params["shards"], "adopt": str(args.shards)}, "shards"),
                    {"corpus": args.shards, "tokenizer": args.tokenizer}, work / "shards")
            args.shards = work / "shards"
        train_cfg = from_dict(train.Config, {**params["train"], "import_from": str(args.checkpoint.resolve())}, "train")
        execute(train.SPEC, train_cfg, {"shards": args.shards}, work / "train")
        q = execute(gptq.SPEC, gptq.Config(method="int8_baseline", device=args.device),
                    {"train": work / "train", "shards": args.shards}, work / "gptq")
        size = execute(pack.SPEC, pack.Config(compressor="zlib", level=9, layout="flat"), {"gptq": work / "gptq"},
                       work / "pack")
        metrics = execute(eval_stage.SPEC, eval_stage.Config(seq_len=seq_len, device=args.device),
                          {"pack": work / "pack", "shards": args.shards, "tokenizer": args.tokenizer}, work / "eval")
        report = {"val_loss": metrics["val_loss"], "val_bpb": metrics["val_bpb"], "tokens": metrics["tokens"],
                  "model_bytes": size["model_bytes"], "quantize_seconds": q["quantize_seconds"],
                  "eval_seconds": metrics["eval_seconds"]}
        if args.expect is not None:
            report.update(expected_val_bpb=args.expect, difference=metrics["val_bpb"] - args.expect)
        if args.reference_code:
            report["difference_vs_script_fp32"] = metrics["val_bpb"] - reference["val_bpb_fp32_activations"]
        if args.reference_code:
            from pgolf.pack.serialize import load_artifact

            report["weights_vs_script"] = compare_weights(reference_weights,
                                                          load_artifact(work / "pack" / "artifact.bin").dequantize())
        print(f"val_bpb {metrics['val_bpb']:.8f}" + (f"  (baseline script: {args.expect:.8f}, "
                                                     f"difference {report['difference']:+.2e})" if args.expect else ""))
        print("BENCH_JSON " + json.dumps(report))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
