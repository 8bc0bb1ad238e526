"""Score-first chunked SGD test-time training over sliding windows (PR #461's recipe): R0409's
full-weight TTT and PR #1383's FiLM-only TTT (docs/lineage.md#eval-lineage, #film-ttt).

The val stream's targets are cut into chunks of `chunk_tokens`; each sliding window belongs to the
chunk of its first scored target. Chunk by chunk: every window of the chunk is scored (no grad),
then, unless it is the last chunk, the chunk's own tokens, as sequences of `seq_len` whose targets
all lie inside the chunk, train the selected parameters for `epochs` epochs of SGD with momentum,
at a cosine lr over chunks, with gradient clipping. A target is scored by a window whose first
scored target is at or before it, so it is scored before its chunk is trained on; scores after
chunk c use weights trained on chunks 0..c only, that is on scored targets.

Across ranks: each chunk's windows are dealt round-robin by batch, each step's sequences are dealt
round-robin and the gradients summed, so the weights stay identical on every rank.
"""
from __future__ import annotations

import math
import time

import numpy as np
import torch

from pgolf import dist
from pgolf.errors import PgolfError
from pgolf.evaluate.audit import GLOBAL, Audit
from pgolf.evaluate.bpb import BpbResult, score_windows, windows
from pgolf.evaluate.config import SGDTTTSettings
from pgolf.evaluate.budget import Budget, unlimited
from pgolf.evaluate.chunk_sgd import set_cosine_lr, sgd_step, sgd_training
from pgolf.progress import tracked


def trainable_parameters(model, which: str) -> list[torch.nn.Parameter]:
    named = list(model.named_parameters())
    if which == "all":
        return [p for _, p in named]
    chosen = [p for name, p in named if name.split(".")[-1] in ("film_gamma", "film_beta")]
    if not chosen:
        raise PgolfError("eval.sgd.trainable is 'film' but the model has no FiLM parameters "
                         "(train it with train.model.film: true and a block_map that reuses blocks)")
    return chosen


def sequence_batch(stream: torch.Tensor, starts: list[int], seq_len: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Inputs and targets of the sequences of `seq_len` starting at `starts`, a row each."""
    x = torch.stack([stream[s:s + seq_len] for s in starts])
    y = torch.stack([stream[s + 1:s + seq_len + 1] for s in starts])
    return x, y, len(starts)


def evaluate_sgd_ttt(model, tokens: np.ndarray, byte_counts: np.ndarray, seq_len: int, stride: int, batch_seqs: int,
                     settings: SGDTTTSettings, device: torch.device,
                     budget: Budget | None = None) -> tuple[BpbResult, dict, np.ndarray]:
    """Returns (totals over all ranks, the audit and training summary, the NLL of every target this
    rank scored, NaN elsewhere)."""
    budget = budget or unlimited()
    num_targets = len(tokens) - 1
    stream = torch.from_numpy(np.asarray(tokens, dtype=np.int64))
    size = settings.chunk_tokens
    n_chunks = math.ceil(num_targets / size)
    by_chunk: list[list[tuple[int, int]]] = [[] for _ in range(n_chunks)]
    for w, first in windows(num_targets, seq_len, stride):
        by_chunk[(first - 1) // size].append((w, first))
    params = trainable_parameters(model, settings.trainable)
    world, rank = dist.world_size(), dist.rank()
    audit = Audit(num_targets)
    nll_at = np.full(len(tokens), np.nan)
    loss_sum, scored_tokens, scored_bytes = 0.0, 0, 0
    scoring_seconds, training_seconds, trained_targets = 0.0, 0.0, 0
    chunks_trained, steps = 0, 0
    skipped_from = -1
    with sgd_training(model, params, settings.lr, settings.momentum) as optimizer:
        for c in tracked(range(n_chunks), "eval SGD TTT chunks"):
            audit.tick += 1
            started = time.perf_counter()
            model.eval()
            batches = [by_chunk[c][b:b + batch_seqs] for b in range(0, len(by_chunk[c]), batch_seqs)]
            for batch in batches[rank::world]:
                for first, end, nll in score_windows(model, stream, batch, seq_len, device):
                    loss_sum += float(nll.sum())
                    nll_at[first:end] = nll.numpy()
                    scored_tokens += end - first
                    scored_bytes += int(byte_counts[first:end].sum())
                    audit.scored(c, first, end)
            scoring_seconds += time.perf_counter() - started
            if c == n_chunks - 1 or skipped_from >= 0:
                continue  # the last chunk: nothing is left to score with what it would teach
            # Training sequences: inputs from the chunk's start, every target inside the chunk.
            lo = c * size
            n_seqs = (min(lo + size, num_targets) - lo) // seq_len
            if n_seqs == 0:
                continue
            targets_left = num_targets - (c + 1) * size
            per_target = scoring_seconds / ((c + 1) * size)
            per_train_token = training_seconds / trained_targets if trained_targets else 3 * per_target
            if not budget.fits(per_train_token * n_seqs * seq_len * settings.epochs, per_target * targets_left,
                               device):
                skipped_from = c
                continue
            audit.tick += 1
            started = time.perf_counter()
            model.train()
            set_cosine_lr(optimizer, settings.lr, c, n_chunks)
            for _ in range(settings.epochs):
                for b in range(0, n_seqs, settings.batch_seqs):
                    step_seqs = torch.arange(b, min(b + settings.batch_seqs, n_seqs))
                    mine = (lo + step_seqs[rank::world] * seq_len).tolist()
                    share = [sequence_batch(stream, mine, seq_len)] if mine else []
                    sgd_step(model, optimizer, params, share, len(step_seqs), settings.clip, device)
                    steps += 1
            if rank == 0:
                audit.trained(c, lo + 1, lo + n_seqs * seq_len + 1, kind=GLOBAL)
            chunks_trained += 1
            trained_targets += n_seqs * seq_len * settings.epochs
            training_seconds += time.perf_counter() - started
    totals = BpbResult(loss_sum, scored_tokens, scored_bytes).summed_over_ranks(device)
    summary = audit.merged().check({})
    summary.update(chunks=n_chunks, chunks_trained=chunks_trained, sgd_steps=steps,
                   training_skipped_from_chunk=skipped_from, trainable=settings.trainable,
                   trainable_params=sum(p.numel() for p in params), training_seconds=round(training_seconds, 3),
                   ranks=world)
    return totals, summary, nll_at
