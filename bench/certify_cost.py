"""What certifying a shard folder costs at the challenge's scale, against hashing its files (CPU).

    .venv/bin/python bench/certify_cost.py [--tokens 20000000] [--json]

The shards stage's certificate (pgolf.data.certify) hashes every document of train and val (one
sha256 per document over a view of its shard) and encodes val's documents again from the source to
prove val is its first 50,000 in order, counting each one's bytes from its text. The manifest
already hashes every file (sha256 per shard), so that is the yardstick.

Measured here on synthetic shards whose documents have the canonical CaseOps export's mean length
(47,853,343 val tokens over 50,000 documents: 957 tokens; lognormal lengths), and on the builtin
corpus's text for encoding; then extrapolated linearly to the canonical export: 80 train shards of
10^8 tokens (8B tokens, 16 GB of uint16) and val's 50,000 documents (~151 MB of text, the val byte
total the records' logs imply). Per-document hashing is linear in documents and bytes, encoding in
text bytes, so the rates measured on a slice carry over; the wall time on W workers is the per-core
time over W (hashing runs one process per shard).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pgolf.data import certify  # noqa: E402
from pgolf.data.shards import write_shard  # noqa: E402

CANONICAL_TRAIN_TOKENS = 80 * 100_000_000
CANONICAL_VAL_DOCS = 50_000
CANONICAL_VAL_TEXT_BYTES = 151_074_000  # the CaseOps sidecar total the records' logs imply (docs/lineage.md#bpb)
MEAN_DOC_TOKENS = 47_853_343 / 50_000


def synthetic_shard(path: Path, tokens: int, seed: int = 0) -> int:
    """A shard of [BOS] + tokens documents with lognormal lengths of the canonical mean; returns docs."""
    rng = np.random.default_rng(seed)
    sigma = 1.0
    lengths = rng.lognormal(np.log(MEAN_DOC_TOKENS) - sigma ** 2 / 2, sigma, size=int(2 * tokens / MEAN_DOC_TOKENS))
    lengths = np.maximum(lengths.astype(np.int64), 1)
    lengths = lengths[np.cumsum(lengths + 1) <= tokens]
    stream = rng.integers(2, 8192, size=int((lengths + 1).sum()), dtype=np.uint16)
    stream[np.concatenate([[0], np.cumsum(lengths + 1)[:-1]])] = 1
    write_shard(path, stream)
    return len(lengths)


def best_of(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def measure(tokens: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fineweb_train_000000.bin"
        docs = synthetic_shard(path, tokens)
        data = path.read_bytes()
        sha_s = best_of(lambda: hashlib.sha256(data).hexdigest())
        docs_s = best_of(lambda: certify._shard_docs(path, 1))
    enc = measure_encoding()
    per_token_docs = docs_s / tokens
    per_token_sha = sha_s / tokens
    train_docs_core_s = per_token_docs * CANONICAL_TRAIN_TOKENS
    train_sha_core_s = per_token_sha * CANONICAL_TRAIN_TOKENS
    val_s = CANONICAL_VAL_TEXT_BYTES / enc["encode_bytes_per_s"] + CANONICAL_VAL_TEXT_BYTES / enc["count_bytes_per_s"]
    return {
        "machine": f"{os.cpu_count()} cores ({os.uname().machine})",
        "slice_tokens": tokens, "slice_docs": docs,
        "sha256_gb_per_s": len(data) / sha_s / 1e9,
        "doc_hash_gb_per_s": len(data) / docs_s / 1e9,
        "doc_hash_docs_per_s": docs / docs_s,
        "ratio_doc_hash_to_sha256": docs_s / sha_s,
        "canonical_train_doc_hash_core_s": train_docs_core_s,
        "canonical_train_sha256_core_s": train_sha_core_s,
        "canonical_val_reencode_and_count_core_s": val_s,
        **enc,
    }


def measure_encoding() -> dict:
    """SentencePiece encoding (CaseOps, the heaviest variant) and the text byte count, per core."""
    import sentencepiece as spm

    from pgolf.data.certify import _encoded_digests, _init_encoder, text_byte_counter
    from pgolf.data.corpus import read_documents
    from pgolf.tokenize.trainer import train_bpe, training_sentences
    from pgolf.tokenize.variants import VARIANTS

    docs = list(read_documents("builtin", "text"))[:400]
    text_bytes = sum(len(d.encode()) for d in docs)
    spec = VARIANTS["caseops"]
    model = train_bpe(training_sentences(spec.transform(d) for d in docs), vocab_size=1024, num_threads=1, seed=1,
                      user_defined_symbols=spec.user_defined_symbols)
    _init_encoder(model)
    encode_s = best_of(lambda: _encoded_digests(docs, "caseops"), 2)
    count = text_byte_counter(spm.SentencePieceProcessor(model_proto=model), "caseops")
    count_s = best_of(lambda: [count(d) for d in docs], 2)
    return {"encode_bytes_per_s": text_bytes / encode_s, "count_bytes_per_s": text_bytes / count_s}


def table(r: dict) -> str:
    return "\n".join([
        f"machine: {r['machine']}; slice: {r['slice_tokens']:,} tokens, {r['slice_docs']:,} documents",
        "| what | measured per core | at the challenge's scale, one core |",
        "|---|---|---|",
        f"| sha256 of the shard files (the manifest's) | {r['sha256_gb_per_s']:.2f} GB/s | "
        f"{r['canonical_train_sha256_core_s']:.1f} s for 8B train tokens |",
        f"| sha256 per document (the certificate) | {r['doc_hash_gb_per_s']:.2f} GB/s, "
        f"{r['doc_hash_docs_per_s'] / 1e6:.2f} M docs/s | {r['canonical_train_doc_hash_core_s']:.1f} s for 8B train "
        f"tokens ({r['ratio_doc_hash_to_sha256']:.2f}x the file hashing) |",
        f"| val encoded again (CaseOps) + its bytes counted from text | {r['encode_bytes_per_s'] / 1e6:.2f} MB/s, "
        f"{r['count_bytes_per_s'] / 1e6:.1f} MB/s | {r['canonical_val_reencode_and_count_core_s']:.1f} s for 50,000 "
        "documents (151 MB) |",
    ])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=20_000_000, help="tokens in the measured slice")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = measure(args.tokens)
    print(json.dumps(result, indent=2) if args.json else table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
