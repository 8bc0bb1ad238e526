"""Documents -> the challenge's shards (docs/lineage.md#shards), tokenized in parallel processes.

Each document becomes [BOS] + tokens (no EOS); the first `val_docs` documents are val, the rest
train; shards of `shard_tokens` tokens, a document may straddle two, val and train never share
one. Workers tokenize chunks of documents; results come back in order, so the bytes out do not
depend on the number of workers, nor on where they run: local processes, or the workers of a Dask
cluster (`dask_address`), which may span machines.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from array import array
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import sentencepiece as spm

from pgolf.data.shards import (SPLIT_FOLDERS, list_shards, read_header, read_shard, sha256_file, shard_entry_name,
                               shard_path, write_shard)
from pgolf.errors import FormatError, InputError
from pgolf.progress import Progress
from pgolf.tokenize.token_bytes import original_byte_counts
from pgolf.tokenize.variants import VARIANTS

DOCS_PER_CHUNK = 256
DASK_CONNECT_TIMEOUT_S = 30
_worker_sp: spm.SentencePieceProcessor | None = None


@dataclass
class EncodedChunk:
    tokens: np.ndarray  # uint16, [BOS] + ids per document, concatenated
    byte_counts: np.ndarray | None  # uint16 per token when the variant ships a sidecar


def _init_worker(model_bytes: bytes) -> None:
    global _worker_sp
    _worker_sp = spm.SentencePieceProcessor(model_proto=model_bytes)


def encode_chunk(docs: list[str], variant: str, bos_id: int, with_bytes: bool) -> EncodedChunk:
    sp = _worker_sp
    assert sp is not None, "worker not initialized"
    # array.fromlist converts a list of ids in one C loop: a third less per-token overhead than
    # numpy.fromiter over a chain of lists (bench/shard_throughput.py).
    tokens, counts = array("H"), array("q")
    spec = VARIANTS[variant]
    if spec.with_provenance is not None and with_bytes:
        for text in docs:
            ids, byte_counts = original_byte_counts(sp, text, spec.with_provenance)
            tokens.append(bos_id)
            tokens.fromlist(ids)
            counts.append(0)
            counts.fromlist(byte_counts)
    else:
        texts = [spec.transform(t) for t in docs] if spec.transform else docs
        # One thread per worker: parallelism comes from the workers (processes, Dask), one core each.
        for ids in sp.encode(texts, num_threads=1):
            tokens.append(bos_id)
            tokens.fromlist(ids)
    sidecar = None
    if with_bytes:
        if counts and max(counts) >= 2**16:
            raise FormatError(f"a token stands for {max(counts)} bytes, more than the uint16 sidecar holds")
        sidecar = np.frombuffer(counts, dtype=np.int64).astype(np.uint16)
    return EncodedChunk(np.frombuffer(tokens, dtype=np.uint16), sidecar)


def _ordered_map(fn: Callable, items: Iterable, workers: int, init_args: tuple, dask_address: str = "") -> Iterator:
    """Like Executor.map, but keeps at most 2 x workers chunks in flight (constant memory)."""
    if dask_address:
        yield from _ordered_map_dask(fn, items, workers, init_args[0], dask_address)
        return
    if workers <= 1:
        _init_worker(*init_args)
        for item in items:
            yield fn(*item)
        return
    with ProcessPoolExecutor(max_workers=workers, initializer=_init_worker, initargs=init_args) as pool:
        pending: deque[Future] = deque()
        for item in items:
            pending.append(pool.submit(fn, *item))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


_dask_models: dict[str, spm.SentencePieceProcessor] = {}
_code_digest: str | None = None


def encoding_code_digest() -> str:
    """What decides the bytes a worker encodes besides the model: SentencePiece's version and
    pgolf's encoding code (this module, the variants' transforms and byte provenance)."""
    global _code_digest
    if _code_digest is None:
        digest = hashlib.sha256(spm.__version__.encode())
        here = Path(__file__).resolve()
        for path in [here, *sorted((here.parent.parent / "tokenize").glob("*.py"))]:
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
        _code_digest = digest.hexdigest()
    return _code_digest


def _on_dask_worker(fn: Callable, model_bytes: bytes, code_digest: str, *args):
    """A Dask task: the worker keeps one SentencePiece processor per model (Dask has no initializer).
    A worker on another machine with another pgolf or SentencePiece would encode other bytes without
    a sound: it refuses instead, on every task, so workers that join late are checked too."""
    global _worker_sp
    if encoding_code_digest() != code_digest:
        raise InputError(f"this Dask worker's pgolf encoding code or SentencePiece ({spm.__version__}) differs "
                         "from the machine that started the shards stage, so its shards would differ; install "
                         "the same pgolf checkout and sentencepiece version on every worker")
    key = hashlib.sha256(model_bytes).hexdigest()
    if key not in _dask_models:
        _dask_models[key] = spm.SentencePieceProcessor(model_proto=model_bytes)
    _worker_sp = _dask_models[key]
    return fn(*args)


def _ordered_map_dask(fn: Callable, items: Iterable, workers: int, model_bytes: bytes, address: str) -> Iterator:
    """The same bounded, in-order map over a Dask cluster: `address` of a running scheduler
    (tcp://host:8786; its workers need this pgolf installed), or "local" for a LocalCluster of
    `workers` processes here. The model is sent to every worker once.

    dask.distributed directly, not Prefect's DaskTaskRunner: a task runner places Prefect tasks, and
    the shards stage is one Prefect task that runs `dvc repro -s shards` so DVC stays the one cache.
    Making each chunk a Prefect task would move shard building out of the DVC stage (a plain
    `dvc repro` could not use the cluster, and Prefect would track ~60,000 task runs for the
    challenge's 15.4M documents). Here the stage itself is the Dask client, so `dvc repro`, the
    Prefect flow and `python -m tasks.shards` all use the cluster the same way and write the same bytes.
    """
    from distributed import Client, LocalCluster

    cluster = None
    # A LocalCluster's workers spill into `local_directory`, by default dask-scratch-space in TMPDIR,
    # which outlives the run; this one is removed with the cluster.
    scratch = tempfile.TemporaryDirectory(prefix="pgolf-dask-") if address == "local" else None
    if scratch is not None:
        cluster = LocalCluster(n_workers=max(workers, 1), threads_per_worker=1, processes=True,
                               dashboard_address=None, local_directory=scratch.name)
    try:
        try:
            client = Client(cluster or address, timeout=DASK_CONNECT_TIMEOUT_S)
        except (OSError, ValueError) as err:
            raise InputError(f"cannot reach the Dask scheduler at shards.dask_address={address!r} ({err}); "
                             "start it (dask scheduler) or set dask_address to '' (local processes) or "
                             "'local' (a LocalCluster here)") from err
        with client:
            model = client.scatter(model_bytes, broadcast=True)
            window = 2 * max(1, sum(client.nthreads().values()))
            code_digest = encoding_code_digest()
            pending: deque = deque()
            for item in items:
                pending.append(client.submit(_on_dask_worker, fn, model, code_digest, *item, pure=False))
                if len(pending) >= window:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
    finally:
        if cluster is not None:
            cluster.close()
        if scratch is not None:
            scratch.cleanup()


def _chunks(docs: Iterable[str], val_docs: int) -> Iterator[tuple[str, list[str]]]:
    """(split, documents) chunks; a chunk never mixes val and train."""
    split, chunk = "val", []
    for i, text in enumerate(docs):
        doc_split = "val" if i < val_docs else "train"
        if doc_split != split or len(chunk) >= DOCS_PER_CHUNK:
            if chunk:
                yield split, chunk
            split, chunk = doc_split, []
        chunk.append(text)
    if chunk:
        yield split, chunk


@dataclass
class _ShardWriter:
    out: Path
    split: str
    shard_tokens: int
    with_bytes: bool
    buffer: list[np.ndarray] = field(default_factory=list)
    bytes_buffer: list[np.ndarray] = field(default_factory=list)
    buffered: int = 0
    index: int = 0
    tokens_written: int = 0
    files: list[str] = field(default_factory=list)

    def add(self, tokens: np.ndarray, byte_counts: np.ndarray | None) -> None:
        while len(tokens):
            room = self.shard_tokens - self.buffered
            self.buffer.append(tokens[:room])
            if self.with_bytes:
                self.bytes_buffer.append(byte_counts[:room])
                byte_counts = byte_counts[room:]
            self.buffered += len(tokens[:room])
            tokens = tokens[room:]
            if self.buffered == self.shard_tokens:
                self.flush()

    def flush(self) -> None:
        if not self.buffered:
            return
        path = shard_path(self.out, self.split, self.index)
        path.parent.mkdir(exist_ok=True)
        write_shard(path, np.concatenate(self.buffer))
        self.files.append(path.name)
        if self.with_bytes:
            side = shard_path(self.out, "val_bytes", self.index)
            write_shard(side, np.concatenate(self.bytes_buffer))
            self.files.append(side.name)
        self.tokens_written += self.buffered
        self.buffer, self.bytes_buffer, self.buffered = [], [], 0
        self.index += 1


def build_shards(docs: Iterable[str], model_bytes: bytes, variant: str, bos_id: int, val_docs: int,
                 shard_tokens: int, workers: int, out: Path, dask_address: str = "") -> dict:
    """Tokenize and write every shard into `out`; return stats (docs, files, tokens per split)."""
    with_bytes = variant != "plain"  # transformed text: bytes come from the original, not the LUT
    writers = {
        "val": _ShardWriter(out, "val", shard_tokens, with_bytes),
        "train": _ShardWriter(out, "train", shard_tokens, False),
    }
    doc_counts = {"val": 0, "train": 0}
    items = ((chunk, variant, bos_id, with_bytes and split == "val", split) for split, chunk in _chunks(docs, val_docs))

    with Progress("shards documents", len(docs) if hasattr(docs, "__len__") else None) as progress:
        for split, n_docs, encoded in _ordered_map(_encode_with_split, items, workers, (model_bytes,), dask_address):
            doc_counts[split] += n_docs
            writers[split].add(encoded.tokens, encoded.byte_counts)
            progress.update(n_docs)
    for writer in writers.values():
        writer.flush()
    if doc_counts["train"] == 0:
        raise InputError(f"the corpus has {doc_counts['val']} documents, all of them val (val_docs={val_docs}); "
                         "lower shards.val_docs or use a larger corpus so there are training documents")
    return {
        "docs_total": doc_counts["val"] + doc_counts["train"],
        "docs_val": doc_counts["val"],
        "docs_train": doc_counts["train"],
        "files_val": writers["val"].index,
        "files_train": writers["train"].index,
        "tokens_val": writers["val"].tokens_written,
        "tokens_train": writers["train"].tokens_written,
    }


def _encode_with_split(chunk, variant, bos_id, with_bytes, split):
    return split, len(chunk), encode_chunk(chunk, variant, bos_id, with_bytes)


def resolve_workers(workers: int) -> int:
    return workers if workers > 0 else (os.cpu_count() or 1)


def file_entries(folder: Path) -> list[dict]:
    entries = []
    for split in ("train", "val", "val_bytes"):
        for path in list_shards(folder, split):
            entries.append({"name": shard_entry_name(folder, path), "split": split, "tokens": read_header(path),
                            "sha256": sha256_file(path)})
    return sorted(entries, key=lambda e: e["name"])


def adopt_shards(source: Path, out: Path, vocab_size: int, bos_id: int) -> dict:
    """Validate a published shard folder and link its files into `out` (no copy): hard links when
    `out` is on the same filesystem, symlinks otherwise."""
    if not source.is_dir():
        raise InputError("shards.adopt folder not found", source)
    train, val = list_shards(source, "train"), list_shards(source, "val")
    if not train or not val:
        raise InputError(f"need fineweb_train_*.bin and fineweb_val_*.bin shards; found {len(train)} train, "
                         f"{len(val)} val", source)
    sidecars = list_shards(source, "val_bytes")
    for path in train + val:
        tokens = read_shard(path)
        if len(tokens) and int(tokens.max()) >= vocab_size:
            raise FormatError(f"token id {int(tokens.max())} is out of range for the tokenizer's vocab size "
                              f"{vocab_size}: these shards were built with another tokenizer", path)
    for path in sidecars:
        read_header(path)
    for split, paths in (("train", train), ("val", val), ("val_bytes", sidecars)):
        for path in paths:
            _link(path, out / SPLIT_FOLDERS[split] / path.name)
    return {
        "docs_val": int(sum(np.count_nonzero(read_shard(p) == bos_id) for p in val)),
        "files_val": len(val),
        "files_train": len(train),
        "tokens_val": sum(read_header(p) for p in val),
        "tokens_train": sum(read_header(p) for p in train),
    }


def _link(path: Path, target: Path) -> None:
    target.parent.mkdir(exist_ok=True)
    try:
        os.link(path, target)
    except OSError:
        os.symlink(path.resolve(), target)
