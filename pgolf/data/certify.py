"""What a shard folder's manifest certifies about its data (docs/lineage.md#canonical-data).

Four things a judge cannot see from a score, each proved from the written shards themselves, not
from how they were written (so a folder built here, on N workers or a Dask cluster, and a published
folder adopted as it is, get the same proof):

- disjoint: no val document's content is a train document's. Each document (the tokens after its
  BOS, up to the next) gets a content hash; a train document whose hash is a val document's is an
  overlap, an error naming the folder, the count and the first few (val, train) document indices
  (#2127: a re-export whose train began at document 10,000 trained on 80% of val).
- the source's prefix: where the documents are at hand, val is their first N, in order: each is
  encoded again and must equal the val document at its index (#2109 built val per chunk, each chunk
  giving its own first documents).
- the bytes: where the documents are at hand, the bytes behind val_bpb (the LUT or the sidecar, as
  the eval counts them) are counted again from each document's text alone and must agree document by
  document (#897 a space spelled in byte-fallback tokens 3 bytes, #1271 byte-fallback tokens 3 bytes,
  #1632 a leading space twice, #2138 CaseOps operators their UTF-8 bytes).
- canonical: how the folder compares with the challenge's published export of its tokenizer
  (pgolf.canonical); a run on other data is allowed, and labelled `canonical: false` with the reasons.
"""
from __future__ import annotations

import hashlib
import itertools
from collections.abc import Callable, Iterable, Iterator
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import sentencepiece as spm

from pgolf import canonical
from pgolf.data.shards import list_shards, load_split, read_shard
from pgolf.errors import FormatError
from pgolf.tokenize.token_bytes import LEADING_SPACE, val_byte_counts
from pgolf.tokenize.variants import VARIANTS

DIGEST_BYTES = 16  # of sha256: 2^-64 odds that two of 15M documents collide by chance
EXAMPLES = 5
DOCS_PER_TASK = 256
HASH_RULE = "sha256 of each document's tokens after its BOS (uint16 little-endian), first 16 bytes"


def digest(tokens: np.ndarray) -> bytes:
    return hashlib.sha256(np.ascontiguousarray(tokens, dtype="<u2").tobytes()).digest()[:DIGEST_BYTES]


EMPTY = digest(np.zeros(0, dtype=np.uint16))  # a lone BOS: no content to leak


def text_byte_counter(sp: spm.SentencePieceProcessor, variant: str) -> Callable[[str], int]:
    """How many bytes a document's text stands for under the rule of `variant`, from the text alone
    (no token, piece table, LUT or sidecar): what the bytes behind val_bpb must sum to per document.
    It lives here, not beside the LUT in pgolf.tokenize.token_bytes, because it is the certificate's
    second opinion, and the eval (whose code is counted) never needs it.

    plain: the UTF-8 bytes of the text as the tokenizer's normalizer leaves it (NFKC, whitespace runs
    as one space, the ends trimmed), which is what the LUT rule measures (docs/lineage.md#bpb).
    casefold, caseops: the original text's bytes between the first and last characters the
    normalizer keeps, the leading and trailing whitespace it drops standing for no token, which is
    what their sidecar charges (docs/lineage.md#caseops)."""
    if variant == "plain":
        from sentencepiece import sentencepiece_model_pb2

        model = sentencepiece_model_pb2.ModelProto()
        model.ParseFromString(sp.serialized_model_proto())
        dummy_prefix = model.normalizer_spec.add_dummy_prefix

        def normalized(text: str) -> int:
            out = sp.normalize(text).replace(LEADING_SPACE, " ")
            return len((out[1:] if dummy_prefix and out.startswith(" ") else out).encode("utf-8"))

        return normalized

    def original(text: str) -> int:
        start, end = 0, len(text)
        while start < end and not sp.normalize(text[start]):
            start += 1
        while end > start and not sp.normalize(text[end - 1]):
            end -= 1
        return len(text[start:end].encode("utf-8"))

    return original


def doc_bounds(tokens: np.ndarray, bos_id: int) -> list[tuple[int, int]]:
    """[begin, end) of each document's tokens in a stream of [BOS] + tokens documents; tokens before
    the first BOS (a stream that does not start with one) are a document of their own."""
    starts = np.flatnonzero(np.asarray(tokens) == bos_id)
    bounds = [(0, int(starts[0]) if len(starts) else len(tokens))] if len(tokens) and tokens[0] != bos_id else []
    ends = list(starts[1:]) + [len(tokens)]
    bounds += [(int(s) + 1, int(e)) for s, e in zip(starts, ends)]
    return bounds


@dataclass
class _ShardDocs:
    head: np.ndarray  # tokens before the shard's first BOS: the end of a document begun in an earlier shard
    digests: list[bytes]  # the documents that begin and end in this shard
    tail: np.ndarray | None  # tokens after the last BOS (None: no BOS): may go on in the next shard


def _shard_docs(path: Path, bos_id: int) -> _ShardDocs:
    tokens = np.asarray(read_shard(path, mmap=False))
    starts = np.flatnonzero(tokens == bos_id)
    if not len(starts):
        return _ShardDocs(tokens, [], None)
    raw = memoryview(tokens.astype("<u2", copy=False)).cast("B")
    # One sha256 per document over a view of the shard: no copy per document.
    digests = [hashlib.sha256(raw[2 * (s + 1):2 * e]).digest()[:DIGEST_BYTES]
               for s, e in zip(starts[:-1].tolist(), starts[1:].tolist())]
    return _ShardDocs(tokens[:starts[0]].copy(), digests, tokens[starts[-1] + 1:].copy())


def stream_digests(paths: list[Path], bos_id: int, workers: int) -> Iterator[bytes]:
    """Every document's digest over shards read in order, a document that runs across shards joined;
    shards are hashed on `workers` processes."""
    pool = ProcessPoolExecutor(max_workers=workers) if workers > 1 and len(paths) > 1 else None
    try:
        parts = pool.map(_shard_docs, paths, itertools.repeat(bos_id)) if pool else (_shard_docs(p, bos_id) for p in paths)
        pending: list[np.ndarray] | None = None
        for part in parts:
            if pending is None:
                if len(part.head):
                    pending = [part.head]  # the split does not start with BOS
            else:
                pending.append(part.head)
            if part.tail is None:
                continue
            if pending is not None:
                yield digest(np.concatenate(pending))
            yield from part.digests
            pending = [part.tail]
        if pending is not None:
            yield digest(np.concatenate(pending))
    finally:
        if pool is not None:
            pool.shutdown()


def overlap(val_digests: list[bytes], train_digests: Iterable[bytes]) -> dict:
    """Train documents whose content is a val document's (empty documents have none)."""
    index: dict[bytes, int] = {}
    for i, d in enumerate(val_digests):
        if d != EMPTY:
            index.setdefault(d, i)
    count, train_docs, seen, examples = 0, 0, set(), []
    for j, d in enumerate(train_digests):
        train_docs += 1
        i = index.get(d)
        if i is None:
            continue
        count += 1
        seen.add(i)
        if len(examples) < EXAMPLES:
            examples.append({"val_doc": i, "train_doc": j})
    return {"train_docs": train_docs, "train_docs_in_val": count, "val_docs_in_train": len(seen), "examples": examples}


@dataclass
class Source:
    """The documents the folder is said to come from, in order; `built`: the shards stage wrote the
    folder from them (a mismatch is an error), else a published folder adopted beside them (a first
    document that differs means they are not its source: not at hand)."""
    docs: Iterable[str]
    built: bool
    workers: int = 1


_encoder: spm.SentencePieceProcessor | None = None


def _init_encoder(model_bytes: bytes) -> None:
    global _encoder
    _encoder = spm.SentencePieceProcessor(model_proto=model_bytes)


def _encoded_digests(texts: list[str], variant: str) -> list[bytes]:
    """Each document encoded as the tokenizer and its variant's transform encode it, by themselves:
    none of the shard writer's code (its chunking, its ordered map over workers or Dask) is used, so
    a fault there cannot hide in the proof."""
    transform = VARIANTS[variant].transform
    ids = _encoder.encode([transform(t) for t in texts] if transform else texts, num_threads=1)
    return [digest(np.asarray(doc, dtype=np.uint16)) for doc in ids]


def _in_order(tasks: Iterator[list[str]], variant: str, model_bytes: bytes, workers: int) -> Iterator[list[bytes]]:
    """Digests of each task's documents, in task order; at most 2 x workers tasks in flight."""
    if workers <= 1:
        _init_encoder(model_bytes)
        for texts in tasks:
            yield _encoded_digests(texts, variant)
        return
    with ProcessPoolExecutor(max_workers=workers, initializer=_init_encoder, initargs=(model_bytes,)) as pool:
        pending: deque[Future] = deque()
        for texts in tasks:
            pending.append(pool.submit(_encoded_digests, texts, variant))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _val_prefix_and_bytes(folder: Path, name: str | Path, val: np.ndarray, bounds: list[tuple[int, int]],
                          val_digests: list[bytes], source: Source, model_bytes: bytes, variant: str, bos_id: int,
                          vocab_size: int) -> tuple[dict, dict]:
    """(the val-is-the-source's-prefix finding, the byte cross-check): encode the source's first
    len(val) documents again and compare each with val's; count each one's bytes from its text."""
    sp = spm.SentencePieceProcessor(model_proto=model_bytes)
    count_text = text_byte_counter(sp, variant)
    n = len(bounds)
    docs = iter(source.docs)
    first = list(itertools.islice(docs, 1))
    if not first:
        return {"proven": None, "text": "the source has no documents"}, _unchecked("the source has no documents")
    text_bytes: list[int] = []

    def tasks() -> Iterator[list[str]]:
        for texts in _batched(itertools.chain(first, itertools.islice(docs, n - 1)), DOCS_PER_TASK):
            text_bytes.extend(count_text(t) for t in texts)
            yield texts

    encoded = _in_order(tasks(), variant, model_bytes, source.workers)
    i = 0
    for digests in encoded:
        for d in digests:
            if i < n and d == val_digests[i]:
                i += 1
                continue
            encoded.close()  # stops the workers
            if i == 0 and not source.built:
                why = "the corpus's first document is not val's first: the corpus is not the adopted shards' source"
                return {"proven": None, "text": why}, _unchecked(why)
            raise FormatError(f"val document {i} is not the source's document {i} (val holds {n} documents): val is not "
                              "the source's first documents in order, so its score is not of the challenge's val; "
                              "rebuild the shards", name)
    if i < n:
        if source.built:
            raise FormatError(f"val holds {n} documents but the source ends after {i}", name)
        why = f"the corpus holds {i} documents, fewer than val's {n}"
        return {"proven": None, "text": why}, _unchecked(why)
    prefix = {"proven": True, "text": f"val's {n:,} documents are the source's first {n:,}, in order (each encoded "
                                      "again and compared)"}
    return prefix, _cross_check_bytes(folder, name, val, bounds, text_bytes, sp, variant, vocab_size)


def _batched(items: Iterable, size: int) -> Iterator[list]:
    it = iter(items)
    while batch := list(itertools.islice(it, size)):
        yield batch


def _unchecked(why: str) -> dict:
    return {"checked": False, "text": f"not checked: {why}"}


def _cross_check_bytes(folder: Path, name: str | Path, val: np.ndarray, bounds: list[tuple[int, int]], text_bytes: list[int],
                       sp: spm.SentencePieceProcessor, variant: str, vocab_size: int) -> dict:
    """Each val document's bytes as the eval counts them (sidecar or LUT) against its text's; a
    document's closing BOS target must be charged nothing (it stands for no text)."""
    per_position = val_byte_counts(val, sp, vocab_size, folder)
    rule = "sidecar" if list_shards(folder, "val_bytes") else "lut"
    counted = np.add.reduceat(np.append(per_position, 0), [b for b, _ in bounds]) if bounds else np.zeros(0)
    # reduceat sums from one document's first token to the next one's; remove the BOS between them.
    bos_positions = [e for _, e in bounds[:-1]]
    bos_charge = per_position[bos_positions] if bos_positions else np.zeros(0, dtype=np.int64)
    counted = counted.astype(np.int64)
    counted[:len(bos_charge)] -= bos_charge
    bad = [i for i, (a, b) in enumerate(zip(counted.tolist(), text_bytes)) if a != b]
    if bad:
        i = bad[0]
        raise FormatError(f"val document {i}: the eval counts {int(counted[i]):,} bytes ({rule}), its text has "
                          f"{text_bytes[i]:,} ({'normalized' if variant == 'plain' else 'original'} UTF-8); "
                          f"{len(bad)} of {len(bounds)} documents disagree, so val_bpb's denominator is wrong "
                          f"(documents {bad[:EXAMPLES]})", name)
    charged = np.flatnonzero(bos_charge)
    if len(charged):
        i = int(charged[0])
        raise FormatError(f"val document {i}: the BOS that ends it is charged {int(bos_charge[i])} bytes ({rule}); a "
                          "document boundary stands for no text", name)
    total = int(sum(text_bytes))
    return {"checked": True, "rule": rule, "docs": len(bounds), "bytes": total,
            "text": f"{len(bounds):,} documents, {total:,} bytes: the {rule} agrees with each document's "
                    f"{'normalized' if variant == 'plain' else 'original'} text"}


def canonical_checks(variant: str, vocab_size: int, tokenizer_sha256: str | None, docs_val: int, tokens_val: int,
                     train_tokens: list[int], prefix_proven: bool | None) -> tuple[bool, list[dict]]:
    """The folder against the published export of its tokenizer; canonical when none fails and val
    is the canonical one (its document count and token count)."""
    export = canonical.export_for(variant, vocab_size)
    checks = []

    def add(name: str, ok: bool | None, text: str) -> None:
        checks.append({"check": name, "ok": ok, "text": text})

    add("export", export is not None, f"a published export has a {variant} tokenizer of {vocab_size} pieces: "
        f"{export.name} ({export.dataset})" if export else f"no published export of a {variant} tokenizer of "
        f"{vocab_size} pieces")
    add("docs_val", docs_val == canonical.DOCS_VAL, f"{docs_val:,} val documents (the challenge's val is the first "
        f"{canonical.DOCS_VAL:,})")
    if export is not None:
        if export.tokenizer_sha256:
            add("tokenizer", tokenizer_sha256 == export.tokenizer_sha256, "the published tokenizer"
                if tokenizer_sha256 == export.tokenizer_sha256 else "another tokenizer than the published one")
        finding = canonical.val_coverage(export, tokens_val, None, explain=False)
        add("val_tokens", finding.ok, finding.text)
        finding = canonical.train_shards(export, len(train_tokens))
        add("train_shards", finding.ok, finding.text)
    short = [i for i, t in enumerate(train_tokens[:-1]) if t != canonical.SHARD_TOKENS]
    add("shard_size", not short, f"every train shard but the last holds {canonical.SHARD_TOKENS:,} tokens" if not short
        else f"train shard {short[0]} holds {train_tokens[short[0]]:,} tokens, not the exports' {canonical.SHARD_TOKENS:,}")
    if prefix_proven is not None:
        add("val_prefix", prefix_proven, "val is the source's first documents in order")
    decisive = {c["check"]: c["ok"] for c in checks}
    ok = all(c["ok"] is not False for c in checks) and decisive.get("val_tokens") is True and decisive["docs_val"]
    return bool(ok), checks


def certify(folder: Path, model_bytes: bytes, variant: str, bos_id: int, vocab_size: int, tokenizer_sha256: str | None,
            source: Source | None, workers: int = 1, name: str | Path | None = None) -> dict:
    """The certificate manifest.json records for a written shard folder (train, val and sidecar in
    place); raises FormatError, naming the folder as `name` (the folder a user knows), when train
    and val overlap, val is not the source's prefix, or the bytes disagree."""
    folder = Path(folder)
    name = name or folder
    val = load_split(folder, "val")
    bounds = doc_bounds(val, bos_id)
    val_digests = [digest(val[b:e]) for b, e in bounds]
    train_paths = list_shards(folder, "train")
    found = overlap(val_digests, stream_digests(train_paths, bos_id, max(1, workers)))
    if found["train_docs_in_val"]:
        pairs = ", ".join(f"val {e['val_doc']} = train {e['train_doc']}" for e in found["examples"])
        raise FormatError(f"train and val overlap: {found['train_docs_in_val']:,} train documents are val documents "
                          f"({found['val_docs_in_train']:,} of val's {len(bounds):,}), e.g. {pairs}; the score would "
                          "be measured on text the model trained on", name)
    if source is not None:
        prefix, checked = _val_prefix_and_bytes(folder, name, val, bounds, val_digests, source, model_bytes, variant,
                                                bos_id, vocab_size)
    else:
        prefix = {"proven": None, "text": "the source documents are not at hand"}
        checked = _unchecked("the source documents are not at hand")
    train_tokens = [int(read_shard(p).shape[0]) for p in train_paths]
    ok, checks = canonical_checks(variant, vocab_size, tokenizer_sha256, len(bounds), len(val), train_tokens,
                                  prefix["proven"])
    return {
        "canonical": ok,
        "canonical_checks": checks,
        "doc_hash": HASH_RULE,
        "docs_val": len(bounds),
        "docs_train": found["train_docs"],
        "val_docs_sha256": hashlib.sha256(b"".join(val_digests)).hexdigest(),
        "overlap": {k: found[k] for k in ("train_docs_in_val", "val_docs_in_train", "examples")},
        "val_prefix": prefix,
        "bytes": checked,
    }


def summary(certificate: dict | None) -> str:
    """One line for a summary or README: canonical or not, and why not."""
    if not certificate:
        return "canonical: unknown (the shards manifest has no certificate: rebuild the shards)"
    if certificate["canonical"]:
        return "canonical: true (" + "; ".join(c["text"] for c in certificate["canonical_checks"]
                                               if c["check"] in ("export", "val_tokens")) + ")"
    failed = [c["text"] for c in certificate["canonical_checks"] if c["ok"] is not True]
    return "canonical: false (" + "; ".join(failed) + ")"

