"""Stage shards: documents -> the challenge's binary shards, manifest and val byte sidecar;
or a published shard folder, validated and adopted."""
from __future__ import annotations

import sys
from pathlib import Path

from pgolf.data.certify import Source, certify
from pgolf.data.config import ShardsConfig as Config
from pgolf.data.docs import iter_docs
from pgolf.data.shard_writer import adopt_shards, build_shards, file_entries, resolve_workers
from pgolf.data.shards import MANIFEST_NAME, sha256_file
from pgolf.tokenize.token_bytes import load_tokenizer
from pgolf.json_files import write_json
from runner.stage import StageSpec, stage_main


def run(cfg: Config, inputs: dict[str, Path], out: Path) -> dict:
    sp, tok = load_tokenizer(inputs["tokenizer"])
    model_bytes = (Path(inputs["tokenizer"]) / "tokenizer.model").read_bytes()
    workers = resolve_workers(cfg.workers)
    if cfg.adopt:
        stats = adopt_shards(Path(cfg.adopt), out, sp.vocab_size(), tok["bos_id"])
        source = {"adopted_from": cfg.adopt}  # as configured: an absolute path would differ per clone
    else:
        stats = build_shards(iter_docs(inputs["corpus"]), model_bytes, tok["variant"], tok["bos_id"], cfg.val_docs,
                             cfg.shard_tokens, workers, out, cfg.dask_address)
        source = {"corpus_sha256": sha256_file(Path(inputs["corpus"]) / "docs.jsonl")}
    # Proved from the written folder, built or adopted alike: train and val disjoint, val the corpus's
    # first documents in order and its bytes those of their text (where the corpus is the folder's
    # source), and how it compares with the published export (pgolf.data.certify).
    certificate = certify(out, model_bytes, tok["variant"], tok["bos_id"], sp.vocab_size(), tok["sha256"],
                          Source(iter_docs(inputs["corpus"]), built=not cfg.adopt, workers=workers), workers,
                          name=cfg.adopt or f"the shards built from {inputs['corpus']}")
    files = file_entries(out)
    manifest = {
        "version": 1,
        "append_eos": False,
        "num_val_docs": cfg.val_docs,
        "shard_size": cfg.shard_tokens,
        "variant": tok["variant"],
        "vocab_size": sp.vocab_size(),
        "bos_id": tok["bos_id"],
        "tokenizer_sha256": tok["sha256"],
        "val_bytes_sidecar": any(f["split"] == "val_bytes" for f in files),
        "canonical": certificate["canonical"],
        "stats": stats,
        "certificate": certificate,
        "files": files,
        **source,
    }
    write_json(out / MANIFEST_NAME, manifest)
    return {**stats, "canonical": certificate["canonical"]}


SPEC = StageSpec(name="shards", config_cls=Config, run=run, out="artifacts/shards",
                 inputs={"corpus": "data/corpus", "tokenizer": "artifacts/tokenizer"},
                 producers={"corpus": "corpus", "tokenizer": "tokenizer"},
                 dvc_outs=("train", "val", MANIFEST_NAME))

if __name__ == "__main__":
    sys.exit(stage_main(SPEC))
