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

import numpy as np
import torch
import torch.nn.functional as F

from pgolf import dist
from pgolf.progress import tracked
from pgolf.tokenize.token_bytes import ByteLUTs, target_bytes


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


def bytes_per_position(tokens: np.ndarray, luts: ByteLUTs | None, sidecar: np.ndarray | None) -> np.ndarray:
    """Bytes charged to the target at each stream position (position 0 is never a target: 0)."""
    out = np.zeros(len(tokens), dtype=np.int64)
    if sidecar is not None:
        if len(sidecar) < len(tokens):
            raise ValueError(f"the val byte sidecar has {len(sidecar)} entries for {len(tokens)} tokens")
        out[1:] = sidecar[1:len(tokens)]
    else:
        out[1:] = target_bytes(tokens[:-1], tokens[1:], luts)
    return out


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


@torch.no_grad()
def score_windows(model, stream: torch.Tensor, batch: list[tuple[int, int]], seq_len: int,
                  device: torch.device, join: bool = False) -> list[tuple[int, int, torch.Tensor]]:
    """One forward over a batch of windows (start, first scored target): for each window, the span
    of targets it scores [first, end) and their NLLs (float64, CPU). join: the batch's windows
    (contiguous: flat mode) go in as one row, as R1's eval_val feeds them, so the model's document
    attention, not the window edge, decides what each token sees."""
    x = torch.stack([stream[w:w + seq_len] for w, _ in batch]).to(device)
    y = torch.stack([stream[w + 1:w + seq_len + 1] for w, _ in batch]).to(device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        logits = model.forward_logits(x.reshape(1, -1) if join else x)
    nll = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1), reduction="none")
    nll = nll.view(len(batch), seq_len).double().cpu()
    return [(first, w + seq_len + 1, nll[row, first - (w + 1):]) for row, (w, first) in enumerate(batch)]


def evaluate_bpb(model, tokens: np.ndarray, byte_counts: np.ndarray, seq_len: int, stride: int, batch_seqs: int,
                 device: torch.device, join_windows: bool = False) -> BpbResult:
    """Score every target of `tokens` (already truncated) once; `byte_counts[t]` is the bytes of target t.
    join_windows (flat only): each batch's windows are one row (score_windows)."""
    if join_windows and stride:
        raise ValueError("join_windows joins contiguous flat windows: it needs stride 0")
    num_targets = len(tokens) - 1
    stream = torch.from_numpy(np.asarray(tokens, dtype=np.int64))
    plan = windows(num_targets, seq_len, stride)
    batches = [plan[b:b + batch_seqs] for b in range(0, len(plan), batch_seqs)]
    row_losses: list[tuple[int, list[float]]] = []
    scored_tokens, scored_bytes = 0, 0
    model.eval()
    for index in tracked(range(dist.rank(), len(batches), dist.world_size()),
                         f"eval batches of {batch_seqs} windows (this rank's)"):
        losses = []
        for first, end, nll in score_windows(model, stream, batches[index], seq_len, device, join_windows):
            losses.append(float(nll.sum()))
            scored_tokens += end - first
            scored_bytes += int(byte_counts[first:end].sum())
        row_losses.append((index, losses))
    # Summed in window order whatever the rank count, so N ranks give one process's bits exactly.
    ordered = sorted(item for part in dist.all_gather_objects(row_losses) for item in part)
    loss_sum = 0.0
    for _, losses in ordered:
        for value in losses:
            loss_sum += value
    _, tokens, nbytes = dist.all_reduce_sums([0.0, scored_tokens, scored_bytes], device)
    result = BpbResult(loss_sum, int(tokens), int(nbytes))
    if result.tokens != num_targets:
        raise AssertionError(f"scored {result.tokens} targets, expected each of {num_targets} exactly once")
    return result
