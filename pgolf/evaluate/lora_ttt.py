"""Score-first test-time training with per-document LoRA (R0416 -> R1, docs/lineage.md#lora-ttt), with the
challenge's four conditions (7.5) checked as it runs.

Each document is [BOS_i .. BOS_{i+1}] (its last target is the next BOS: the end of the document);
documents are batched by length, each with its own adapters. A document is read in chunks of
`chunk` predictions, each seen with up to `context` tokens of its own past: the chunk is scored
first (its loss and bytes added to the totals), then, unless it is the document's last chunk, one
AdamW step trains the adapters on it. So no token is trained on before it is scored, every target
is scored exactly once, rows never see another document, and every score is a full-vocabulary
softmax.

Across ranks (torchrun), batches are dealt round-robin in processing order: round r is batches
r*W .. r*W+W-1, one per rank. Batches in processing order have nearly equal lengths (they are
sorted), so a round is balanced without R1's work-stealing counter file, and which document is
scored with which weights does not depend on timing: a run is reproducible for a given W. With
W = 1 a round is one batch.
"""
from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.nn.functional as F

from pgolf import dist
from pgolf.evaluate.audit import GLOBAL, Audit
from pgolf.evaluate.bpb import BpbResult, Scorer
from pgolf.evaluate.config import TTTSettings
from pgolf.evaluate.chunk_sgd import set_cosine_lr, sgd_step, sgd_training
from pgolf.evaluate.budget import Budget, unlimited
from pgolf.model.lora import DocumentAdapters
from pgolf.progress import tracked


def find_documents(tokens: np.ndarray, bos_id: int) -> list[tuple[int, int]]:
    """(start, end) with end exclusive; a document includes the next document's BOS as its last
    target. Together the documents' targets are every position 1..N-1 exactly once."""
    starts = [int(i) for i in np.flatnonzero(tokens == bos_id)]
    if not starts or starts[0] != 0:
        starts = [0] + starts
    docs = []
    for i, start in enumerate(starts):
        end = starts[i + 1] + 1 if i + 1 < len(starts) else len(tokens)
        if end - start >= 2:
            docs.append((start, end))
    return docs


def phase_boundaries(prefix_docs: int, phases: int) -> list[int]:
    """R1: 2,500 docs in 3 phases -> [833, 1666, 2500]."""
    return [prefix_docs * (k + 1) // phases for k in range(phases)]


def sequence_batch(piece: torch.Tensor, first: int, end: int, seq_len: int,
                   flat: bool) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Inputs and targets of sequences first..end-1 of `piece`: as one flat row, or a row each."""
    shape = (1, -1) if flat else (end - first, seq_len)
    x, y = piece[first * seq_len:end * seq_len], piece[first * seq_len + 1:end * seq_len + 1]
    return x.view(shape), y.view(shape), end - first


def global_sgd(model, tokens: np.ndarray, settings: TTTSettings, device: torch.device) -> int:
    """One epoch of SGD over every base weight on `tokens`, in chunks with a cosine lr over chunks;
    the last chunk is skipped. A chunk's sequences are split into one contiguous share per rank (as
    R1 deals them), the gradients summed over ranks with each sequence's weight, one step per
    chunk. With the model's document attention (R1's global_ttt_respect_doc_boundaries) a batch
    of sequences is one flat row, documents segmented at BOS and every doc_attention_max_len tokens
    as R1's cu_seqlens cut them, so a document runs on across sequence edges (and a share's edge
    cuts it: W ranks train as R1's W ranks); without it, rows of global_seq_len. Returns the number
    of chunks trained on."""
    params = list(model.parameters())
    chunk, seq_len = settings.global_chunk_tokens, settings.global_seq_len
    flat = bool(model.cfg.doc_attention)
    n_chunks = max(1, math.ceil((len(tokens) - 1) / chunk))
    trained = 0
    with sgd_training(model, params, settings.global_lr, settings.global_momentum) as optimizer:
        model.train()
        for c in range(n_chunks - 1):
            set_cosine_lr(optimizer, settings.global_lr, c, n_chunks)
            piece = torch.from_numpy(np.asarray(tokens[c * chunk:(c + 1) * chunk + 1], dtype=np.int64))
            rows = (len(piece) - 1) // seq_len
            if rows == 0:
                continue
            first, last = rows * dist.rank() // dist.world_size(), rows * (dist.rank() + 1) // dist.world_size()
            share = (sequence_batch(piece, b, min(b + settings.global_batch_seqs, last), seq_len, flat)
                     for b in range(first, last, settings.global_batch_seqs))
            sgd_step(model, optimizer, params, share, rows, settings.global_clip, device)
            trained += 1
    return trained


def evaluate_ttt(model, tokens: np.ndarray, byte_counts: np.ndarray, settings: TTTSettings, device: torch.device,
                 bos_id: int, budget: Budget | None = None, scorer: Scorer | None = None
                 ) -> tuple[BpbResult, dict, np.ndarray]:
    """Returns (totals over all ranks, the audit and phase summary, the score of every target position
    this rank scored, NaN elsewhere). `scorer` (pgolf.evaluate.bpb.Scorer): what is scored instead of
    the NLL, e.g. the n-gram tilt's; the adapters still train on the NLL it returns, as PR #2135's
    train on the untilted loss."""
    budget = budget or unlimited()
    num_targets = len(tokens) - 1
    stream = torch.from_numpy(np.asarray(tokens, dtype=np.int64))
    docs = find_documents(tokens, bos_id)
    order = sorted(range(len(docs)), key=lambda i: (docs[i][1] - docs[i][0], i))
    batches = [order[i:i + settings.batch_docs] for i in range(0, len(order), settings.batch_docs)][::-1]
    # Longest first, as R1: the slowest batches start early.
    world, rank = dist.world_size(), dist.rank()
    batch_targets = [sum(docs[d][1] - docs[d][0] - 1 for d in batch) for batch in batches]
    audit = Audit(num_targets)
    nll_at = np.full(len(tokens), np.nan)
    loss_sum, scored_bytes, scored_tokens = 0.0, 0, 0
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    adapters = None
    boundaries = phase_boundaries(settings.prefix_docs, settings.phases) if settings.phases else []
    phases: list[dict] = []
    skipped: list[int] = []
    scoring_started = time.perf_counter()
    shortest_first = {d: i for i, d in enumerate(order)}
    for round_index in tracked(range(math.ceil(len(batches) / world)), f"eval TTT rounds of {world} document batches"):
        done = batches[:round_index * world]
        docs_done = sum(len(b) for b in done)
        # At most one phase per finished round, as R1 takes at most one per finished batch: a round
        # that passes two boundaries runs the second after the next round.
        if boundaries and docs_done >= boundaries[0]:
            # Global SGD on `boundary` of the documents scored so far, the shortest first (R1 keeps
            # the first of its scored documents in ascending-length batch order), each with the next
            # one's BOS as R1 slices them (BOS BOS at every join).
            boundary = boundaries.pop(0)
            prefix = sorted((d for b in done for d in b), key=shortest_first.__getitem__)[:boundary]
            text = np.concatenate([tokens[docs[d][0]:docs[d][1]] for d in prefix])
            targets_done = sum(batch_targets[:round_index * world])
            phase_time = sum(p["seconds"] for p in phases)
            per_target = (time.perf_counter() - scoring_started - phase_time) / max(targets_done, 1)
            # Before the first phase there is no SGD timing yet: one scored target (a LoRA forward and
            # backward) stands in for one SGD token.
            sgd_per_token = phases[-1]["seconds"] / phases[-1]["tokens"] if phases else per_target
            if not budget.fits(sgd_per_token * len(text), per_target * (num_targets - targets_done), device):
                skipped.extend([boundary] + boundaries)
                boundaries.clear()
            else:
                audit.tick += 1
                started = time.perf_counter()
                chunks = global_sgd(model, text, settings, device)
                phases.append({"boundary": boundary, "docs": len(prefix), "tokens": len(text), "chunks": chunks,
                               "seconds": round(time.perf_counter() - started, 3)})
                if rank == 0:
                    for d in prefix:
                        audit.trained(d, docs[d][0] + 1, docs[d][1], kind=GLOBAL)
                adapters = None  # rebuilt after every phase
        audit.tick += 1
        index = round_index * world + rank
        if index >= len(batches):
            continue
        batch = batches[index]
        if adapters is None or len(batch) != adapters.head.A.size(0) or not settings.warm_start_a:
            # Seeded by the batch's place in processing order: the same adapters whichever rank runs it.
            adapters = DocumentAdapters(model.cfg, model.virtual_depth(), len(batch), settings.rank, settings.alpha,
                                        settings.seed * 1_000_003 + index, k=settings.adapt_k).to(device)
        else:
            adapters.reset(keep_a=True)
        optimizer = torch.optim.AdamW(adapters.parameters(), lr=settings.lr, betas=(settings.beta1, settings.beta2),
                                      eps=settings.eps, weight_decay=settings.weight_decay)
        lengths = [docs[d][1] - docs[d][0] - 1 for d in batch]  # predictions per document
        chunks = [math.ceil(n / settings.chunk) for n in lengths]
        for c in range(max(chunks)):
            rows = []
            for j, d in enumerate(batch):
                if c >= chunks[j]:
                    rows.append(None)
                    continue
                lo, hi = c * settings.chunk, min((c + 1) * settings.chunk, lengths[j])
                w0 = max(0, hi - settings.context)
                rows.append((lo, hi, w0))
            width = max(row[1] - row[2] for row in rows if row is not None)
            x = torch.zeros(len(batch), width, dtype=torch.long)
            y = torch.zeros(len(batch), width, dtype=torch.long)
            mask = torch.zeros(len(batch), width, dtype=torch.bool)
            for j, row in enumerate(rows):
                if row is None:
                    continue
                lo, hi, w0 = row
                start = docs[batch[j]][0]
                x[j, :hi - w0] = stream[start + w0:start + hi]
                y[j, :hi - w0] = stream[start + w0 + 1:start + hi + 1]
                mask[j, lo - w0:hi - w0] = True
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                logits = model.forward_logits(x.to(device), adapters)
            if scorer is None:
                nll = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.to(device).reshape(-1),
                                      reduction="none").view(len(batch), width)
                scores = nll.detach()
            else:
                positions = torch.zeros(len(batch), width, dtype=torch.long)
                for j, row in enumerate(rows):
                    if row is not None:
                        first = docs[batch[j]][0] + row[2] + 1
                        positions[j, :row[1] - row[2]] = torch.arange(first, first + row[1] - row[2])
                nll, scores = scorer(logits.flatten(0, 1), y.to(device).flatten(), positions.to(device).flatten(),
                                     mask.to(device).flatten())
                nll, scores = nll.view(len(batch), width), scores.view(len(batch), width)
            # Score first: the chunk's losses and bytes are final before any update that uses them.
            scored = scores.double().cpu()
            for j, row in enumerate(rows):
                if row is None:
                    continue
                lo, hi, w0 = row
                start = docs[batch[j]][0]
                loss_sum += float(scored[j, lo - w0:hi - w0].sum())
                nll_at[start + lo + 1:start + hi + 1] = scored[j, lo - w0:hi - w0].numpy()
                scored_bytes += int(byte_counts[start + lo + 1:start + hi + 1].sum())
                scored_tokens += hi - lo
                audit.scored(batch[j], start + lo + 1, start + hi + 1)
            # Then train on the chunk, for the documents that have chunks left to score.
            train_rows = [j for j, row in enumerate(rows) if row is not None and c + 1 < chunks[j]]
            if not train_rows:
                continue
            m = mask.to(device).float()
            per_doc = (nll * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)
            loss = per_doc[train_rows].sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            for j in train_rows:
                lo, hi, _ = rows[j]
                start = docs[batch[j]][0]
                audit.trained(batch[j], start + lo + 1, start + hi + 1)
    totals = BpbResult(loss_sum, scored_tokens, scored_bytes).summed_over_ranks(device)
    summary = audit.merged().check({i: end for i, (_, end) in enumerate(docs)})
    summary.update(phases=phases, phases_skipped_at=skipped, global_sgd_chunks=[p["chunks"] for p in phases],
                   global_sgd_seconds=round(sum(p["seconds"] for p in phases), 3), ranks=world)
    return totals, summary, nll_at
