"""Training batches from the train shards, the way the challenge's baseline reads them.

One sequential token stream over the sorted shards (wrapping to the first at the end); every
step takes one contiguous global span and rank r trains on the r-th slice of it, so N processes
see exactly the tokens one process would.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch

from pgolf.data.shards import list_shards, read_shard
from pgolf.errors import InputError


def span_per_rank(global_tokens: int, seq_len: int, world_size: int, grad_accum_steps: int) -> int:
    """Tokens one rank reads per micro-step: its inputs plus the one extra target."""
    local_tokens = global_tokens // (world_size * grad_accum_steps)
    if local_tokens % seq_len or local_tokens == 0:
        raise ValueError(f"{global_tokens} tokens per step over {world_size} ranks x {grad_accum_steps} "
                         f"micro-steps is not a multiple of seq_len {seq_len}")
    return local_tokens + 1


# inputs on the host -> the model's cu_seqlens on the device (GPT.document_cu_seqlens), or None
Segmenter = Callable[[torch.Tensor, torch.device], "torch.Tensor | None"]


def rank_batch(chunk: np.ndarray, rank: int, span: int, seq_len: int, device: torch.device,
               flat: bool = False, segmenter: Segmenter | None = None) -> tuple[torch.Tensor, ...]:
    """Rank r's slice of one global span, as (inputs, targets) rows of seq_len, or (`flat`) as one
    row of all of it, R1's layout: its attention segments come from the model's document mask.
    With a `segmenter`, (inputs, targets, cu_seqlens): the varlen segments, built from the host's
    copy of the inputs, as R1's loader builds them, so the device never waits for them."""
    local = torch.from_numpy(chunk[rank * span:(rank + 1) * span].astype(np.int64))
    row = span - 1 if flat else seq_len
    x, y = local[:-1].reshape(-1, row), local[1:].reshape(-1, row)
    non_blocking = device.type == "cuda"
    batch = (x.to(device, non_blocking=non_blocking), y.to(device, non_blocking=non_blocking))
    return batch if segmenter is None else (*batch, segmenter(x, device))


class TokenStream:
    def __init__(self, folder: str | Path, split: str = "train", vocab_size: int | None = None):
        self.files = list_shards(folder, split)
        if not self.files:
            raise InputError(f"no fineweb_{split}_*.bin shards found", folder)
        self.vocab_size = vocab_size
        self.file_index = 0
        self.tokens = read_shard(self.files[0], vocab_size, mmap=False)
        self.pos = 0

    def seek(self, file_index: int, pos: int) -> None:
        """Continue from a saved position (resume after a killed run)."""
        self.file_index = file_index
        self.tokens = read_shard(self.files[file_index], self.vocab_size, mmap=False)
        self.pos = pos

    def _advance(self) -> None:
        self.file_index = (self.file_index + 1) % len(self.files)
        self.tokens = read_shard(self.files[self.file_index], self.vocab_size, mmap=False)
        self.pos = 0

    def take(self, n: int) -> np.ndarray:
        chunks = []
        remaining = n
        while remaining > 0:
            available = len(self.tokens) - self.pos
            if available <= 0:
                self._advance()
                continue
            k = min(remaining, available)
            chunks.append(self.tokens[self.pos:self.pos + k])
            self.pos += k
            remaining -= k
        return np.concatenate(chunks) if len(chunks) > 1 else chunks[0]


class DistributedTokenLoader:
    """Yields (inputs, targets) of shape [micro_tokens // seq_len, seq_len] for this rank."""

    def __init__(self, folder: str | Path, rank: int, world_size: int, device: torch.device,
                 vocab_size: int | None = None, flat: bool = False, segmenter: Segmenter | None = None):
        self.stream = TokenStream(folder, "train", vocab_size)
        self.rank, self.world_size, self.device, self.flat = rank, world_size, device, flat
        self.segmenter = segmenter

    def next_batch(self, global_tokens: int, seq_len: int, grad_accum_steps: int) -> tuple[torch.Tensor, ...]:
        span = span_per_rank(global_tokens, seq_len, self.world_size, grad_accum_steps)
        return rank_batch(self.stream.take(span * self.world_size), self.rank, span, seq_len, self.device, self.flat,
                          self.segmenter)


class DocumentPackingLoader:
    """R1's loader (PR #1530 lineage, docs/lineage.md#loader): shards in sorted order, each read from its
    first BOS (the fragment continued from the previous shard is skipped), every step one
    contiguous global span of world_size x (local tokens + 1), rank r taking the r-th slice; a span
    that does not fit in what is left of a shard skips to the next shard. Pair it with
    doc_attention so each token sees only its own document; R1's own rows are `flat` (one row per
    rank, segments cut at BOS and every train_seq_len from a document's start: doc_attention_max_len)."""

    def __init__(self, folder: str | Path, rank: int, world_size: int, device: torch.device,
                 vocab_size: int | None = None, bos_id: int = 1, flat: bool = False, segmenter: Segmenter | None = None):
        self.files = list_shards(folder, "train")
        if not self.files:
            raise InputError("no fineweb_train_*.bin shards found", folder)
        self.rank, self.world_size, self.device = rank, world_size, device
        self.vocab_size, self.bos_id, self.flat = vocab_size, bos_id, flat
        self.segmenter = segmenter
        self.seek(0, None)

    @property
    def stream(self) -> "DocumentPackingLoader":
        return self  # the same resume interface as TokenStream: file_index, pos, seek

    def _first_bos(self) -> int:
        hits = np.flatnonzero(self.tokens == self.bos_id)
        return int(hits[0]) if len(hits) else len(self.tokens)

    def seek(self, file_index: int, pos: int | None) -> None:
        self.file_index = file_index
        self.tokens = read_shard(self.files[file_index], self.vocab_size, mmap=False)
        self.pos = self._first_bos() if pos is None else pos

    def next_batch(self, global_tokens: int, seq_len: int, grad_accum_steps: int) -> tuple[torch.Tensor, ...]:
        span = span_per_rank(global_tokens, seq_len, self.world_size, grad_accum_steps)
        need = span * self.world_size
        for _ in range(2 * len(self.files) + 1):
            if self.pos + need <= len(self.tokens):
                break
            self.seek((self.file_index + 1) % len(self.files), None)
        else:
            raise InputError(f"no train shard holds one global span of {need} tokens after its first BOS; "
                             "use fewer tokens per step or larger shards", self.files[0].parent)
        chunk = self.tokens[self.pos:self.pos + need]
        self.pos += need
        return rank_batch(chunk, self.rank, span, seq_len, self.device, self.flat, self.segmenter)
