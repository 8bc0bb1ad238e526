"""Exact val_loss and val_bpb (docs/lineage.md#bpb).

val_loss = sum of CE (nats, full-vocabulary softmax, fp32) / targets; val_bpb = val_loss / ln 2 x
targets / bytes. The val stream is truncated to a multiple of seq_len (+1) as the challenge does;
every target of it is scored exactly once, in flat or sliding-window mode. Under torchrun each
rank scores every world-th batch of windows; the losses are summed in window order, so the
result does not depend on the number of ranks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from pgolf import dist
from pgolf.progress import tracked
from pgolf.tokenize.token_bytes import bytes_per_position  # noqa: F401 - where callers find it with the rest of val_bpb


# (logits [N, V], targets [N], their stream positions [N], which of them are scored [N]) -> (the NLL
# to train on, with its graph; the score of each target, detached): a replacement for the plain NLL.
Scorer = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class BpbResult:
    loss_sum: float  # nats
    tokens: int
    bytes: int

    @property
    def val_loss(self) -> float:
        return self.loss_sum / max(self.tokens, 1)

    @property
    def val_bpb(self) -> float:
        return self.val_loss / math.log(2) * self.tokens / max(self.bytes, 1)

    def summed_over_ranks(self, device: torch.device) -> "BpbResult":
        loss_sum, tokens, nbytes = dist.all_reduce_sums([self.loss_sum, self.tokens, self.bytes], device)
        return BpbResult(loss_sum, int(tokens), int(nbytes))


def truncate_val(tokens: np.ndarray, seq_len: int) -> np.ndarray:
    usable = ((len(tokens) - 1) // seq_len) * seq_len
    if usable <= 0:
        raise ValueError(f"the val split has {len(tokens)} tokens, fewer than one window of {seq_len} + 1")
    return tokens[:usable + 1]


def windows(num_targets: int, seq_len: int, stride: int) -> list[tuple[int, int]]:
    """(window start, first scored target position) pairs. Window w covers inputs [w, w+L) and
    targets w+1 .. w+L. Flat (stride 0): disjoint windows. Sliding: the first window scores all of
    its targets, each later one only those past what was already scored (its last `stride`), so
    every target is scored once and all but the first L see at least L - stride tokens of context."""
    if stride <= 0 or stride >= seq_len:
        return [(w, w + 1) for w in range(0, num_targets, seq_len)]
    result, scored = [], 0
    start = 0
    while scored < num_targets:
        start = min(start, num_targets - seq_len)
        result.append((start, scored + 1))
        scored = start + seq_len
        start += stride
    return result


def window_inputs(model, stream: torch.Tensor, batch: list[tuple[int, int]], seq_len: int, device: torch.device,
                  join: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(inputs, targets) of a batch of windows on the device, and the model's varlen segments built
    from the host's copy of the inputs (GPT.document_cu_seqlens; None where it needs none), so
    the device never waits for them. join: the batch's windows as one row (score_windows)."""
    x = torch.stack([stream[w:w + seq_len] for w, _ in batch])
    y = torch.stack([stream[w + 1:w + seq_len + 1] for w, _ in batch])
    x = x.reshape(1, -1) if join else x
    segmenter = getattr(model, "document_cu_seqlens", None)
    cu_seqlens = segmenter(x, device) if segmenter is not None else None
    return x.to(device), y.to(device), cu_seqlens


@torch.no_grad()
def window_nll(model, stream: torch.Tensor, batch: list[tuple[int, int]], seq_len: int, device: torch.device,
               join: bool = False, scorer: Scorer | None = None) -> torch.Tensor:
    """The NLL (fp32, on the device) of every target of a batch of windows, [windows, seq_len]; with
    a scorer, what it scores instead (the n-gram tilt's loss)."""
    x, y, cu_seqlens = window_inputs(model, stream, batch, seq_len, device, join)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        logits = (model.forward_logits(x, cu_seqlens=cu_seqlens) if cu_seqlens is not None
                  else model.forward_logits(x))
    logits, y = logits.reshape(-1, logits.size(-1)), y.reshape(-1)
    if scorer is None:
        nll = F.cross_entropy(logits.float(), y, reduction="none")
    else:
        positions = torch.cat([torch.arange(w + 1, w + seq_len + 1) for w, _ in batch])
        scored = torch.cat([torch.arange(w + 1, w + seq_len + 1) >= first for w, first in batch])
        _, nll = scorer(logits, y, positions.to(device), scored.to(device))
    return nll.view(len(batch), seq_len)


def score_windows(model, stream: torch.Tensor, batch: list[tuple[int, int]], seq_len: int,
                  device: torch.device, join: bool = False, scorer: Scorer | None = None
                  ) -> list[tuple[int, int, torch.Tensor]]:
    """One forward over a batch of windows (start, first scored target): for each window, the span
    of targets it scores [first, end) and their NLLs (float64, CPU: a device sync; for callers
    that need every target's loss on the host). join: the batch's windows (contiguous: flat mode)
    go in as one row, as R1's eval_val feeds them, so the model's document attention, not the
    window edge, decides what each token sees. scorer: what is scored instead of the NLL (the
    n-gram tilt's, pgolf.evaluate.ngram_tilt)."""
    nll = window_nll(model, stream, batch, seq_len, device, join, scorer).double().cpu()
    return [(first, w + seq_len + 1, nll[row, first - (w + 1):]) for row, (w, first) in enumerate(batch)]


def window_sums(nll: torch.Tensor, batch: list[tuple[int, int]]) -> torch.Tensor:
    """Each window's NLL sum over the targets it scores, float64, on nll's device: the windows that
    score from the same offset (all of a flat batch; a sliding batch's later windows) summed in one
    op. The same reduction as summing each window's slice on its own (a test checks the bits)."""
    offsets = [first - (w + 1) for w, first in batch]
    wide = nll.double()
    if len(set(offsets)) == 1:
        return wide[:, offsets[0]:].sum(dim=1)
    sums = wide.new_empty(len(batch))
    for offset in sorted(set(offsets)):
        rows = [i for i, o in enumerate(offsets) if o == offset]
        sums[rows] = wide[rows, offset:].sum(dim=1)
    return sums


def evaluate_bpb(model, tokens: np.ndarray, byte_counts: np.ndarray, seq_len: int, stride: int, batch_seqs: int,
                 device: torch.device, join_windows: bool = False, scorer: Scorer | None = None) -> BpbResult:
    """Score every target of `tokens` (already truncated) once; `byte_counts[t]` is the bytes of target t.
    join_windows (flat only): each batch's windows are one row (score_windows); scorer: see there.

    The losses stay on the device: each batch's window sums are queued there and read once at the
    end (one sync per eval); token and byte counts come from the window plan on the host."""
    if join_windows and stride:
        raise ValueError("join_windows joins contiguous flat windows: it needs stride 0")
    num_targets = len(tokens) - 1
    stream = torch.from_numpy(np.asarray(tokens, dtype=np.int64))
    plan = windows(num_targets, seq_len, stride)
    batches = [plan[b:b + batch_seqs] for b in range(0, len(plan), batch_seqs)]
    mine = list(range(dist.rank(), len(batches), dist.world_size()))
    sums: list[torch.Tensor] = []
    scored_tokens, scored_bytes = 0, 0
    model.eval()
    for index in tracked(mine, f"eval batches of {batch_seqs} windows (this rank's)"):
        batch = batches[index]
        sums.append(window_sums(window_nll(model, stream, batch, seq_len, device, join_windows, scorer), batch))
        for w, first in batch:
            scored_tokens += w + seq_len + 1 - first
            scored_bytes += int(byte_counts[first:w + seq_len + 1].sum())
    losses = torch.cat(sums).tolist() if sums else []  # the one sync
    row_losses, start = [], 0
    for index in mine:
        row_losses.append((index, losses[start:start + len(batches[index])]))
        start += len(batches[index])
    # Summed in window order whatever the rank count, so N ranks give one process's bits exactly.
    ordered = sorted(item for part in dist.all_gather_objects(row_losses) for item in part)
    loss_sum = 0.0
    for _, window_losses in ordered:
        for value in window_losses:
            loss_sum += value
    _, tokens, nbytes = dist.all_reduce_sums([0.0, scored_tokens, scored_bytes], device)
    result = BpbResult(loss_sum, int(tokens), int(nbytes))
    if result.tokens != num_targets:
        raise AssertionError(f"scored {result.tokens} targets, expected each of {num_targets} exactly once")
    return result
