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
from dataclasses import dataclass, field

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


@dataclass
class Documents:
    """The val stream cut into documents (find_documents), and the order they are processed in."""
    tokens: np.ndarray
    stream: torch.Tensor  # the tokens as int64, to cut rows from
    spans: list[tuple[int, int]]
    batches: list[list[int]]  # processing order
    shortest_first: dict[int, int]  # each document's place in ascending-length order

    def targets(self, d: int) -> int:
        return self.spans[d][1] - self.spans[d][0] - 1


@dataclass
class TTTRun:
    """Where one evaluate_ttt stands on this rank: its totals and scores, its audit log, the phases
    run, still due and skipped, and the last batch's adapters (warm_start_a keeps their A)."""
    audit: Audit
    nll_at: np.ndarray
    boundaries: list[int]  # the phases still due, in documents scored
    loss_sum: float = 0.0
    scored_bytes: int = 0
    scored_tokens: int = 0
    phases: list[dict] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    adapters: DocumentAdapters | None = None
    scoring_started: float = field(default_factory=time.perf_counter)  # start_run builds it once the weights are frozen


def evaluate_ttt(model, tokens: np.ndarray, byte_counts: np.ndarray, settings: TTTSettings, device: torch.device,
                 bos_id: int, budget: Budget | None = None, scorer: Scorer | None = None
                 ) -> tuple[BpbResult, dict, np.ndarray]:
    """Returns (totals over all ranks, the audit and phase summary, the score of every target position
    this rank scored, NaN elsewhere). `scorer` (pgolf.evaluate.bpb.Scorer): what is scored instead of
    the NLL, e.g. the n-gram tilt's; the adapters still train on the NLL it returns, as PR #2135's
    train on the untilted loss."""
    budget = budget or unlimited()
    docs = order_documents(tokens, bos_id, settings.batch_docs)
    run = start_run(model, tokens, settings)
    world, rank = dist.world_size(), dist.rank()
    for round_index in tracked(range(math.ceil(len(docs.batches) / world)),
                               f"eval TTT rounds of {world} document batches"):
        done = docs.batches[:round_index * world]
        # At most one phase per finished round, as R1 takes at most one per finished batch: a round
        # that passes two boundaries runs the second after the next round.
        if run.boundaries and sum(len(b) for b in done) >= run.boundaries[0]:
            global_sgd_phase(model, docs, done, run, settings, device, budget)
        run.audit.tick += 1
        index = round_index * world + rank
        if index < len(docs.batches):
            score_then_adapt(model, docs, index, byte_counts, run, settings, device, scorer)
    totals, summary = gather_over_ranks(run, docs, device)
    return totals, summary, run.nll_at


def order_documents(tokens: np.ndarray, bos_id: int, batch_docs: int) -> Documents:
    """Batches of `batch_docs` documents of similar length, the longest batch first, as R1: the
    slowest batches start early."""
    spans = find_documents(tokens, bos_id)
    order = sorted(range(len(spans)), key=lambda i: (spans[i][1] - spans[i][0], i))
    batches = [order[i:i + batch_docs] for i in range(0, len(order), batch_docs)][::-1]
    return Documents(tokens, torch.from_numpy(np.asarray(tokens, dtype=np.int64)), spans, batches,
                     {d: i for i, d in enumerate(order)})


def start_run(model, tokens: np.ndarray, settings: TTTSettings) -> TTTRun:
    """The base weights frozen: only the adapters train (a global SGD phase unfreezes them for its
    epoch alone). The scoring clock starts here."""
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    return TTTRun(Audit(len(tokens) - 1), np.full(len(tokens), np.nan),
                  phase_boundaries(settings.prefix_docs, settings.phases) if settings.phases else [])


def global_sgd_phase(model, docs: Documents, done: list[list[int]], run: TTTRun, settings: TTTSettings,
                     device: torch.device, budget: Budget) -> None:
    """Global SGD on `boundary` of the documents scored so far, the shortest first (R1 keeps the
    first of its scored documents in ascending-length batch order), each with the next one's BOS
    as R1 slices them (BOS BOS at every join). Where the budget has no room for it, it and every
    later phase are skipped."""
    boundary = run.boundaries.pop(0)
    prefix = sorted((d for b in done for d in b), key=docs.shortest_first.__getitem__)[:boundary]
    text = np.concatenate([docs.tokens[docs.spans[d][0]:docs.spans[d][1]] for d in prefix])
    if not phase_fits(docs, done, len(text), run, device, budget):
        run.skipped.extend([boundary] + run.boundaries)
        run.boundaries.clear()
        return
    run.audit.tick += 1
    started = time.perf_counter()
    chunks = global_sgd(model, text, settings, device)
    run.phases.append({"boundary": boundary, "docs": len(prefix), "tokens": len(text), "chunks": chunks,
                       "seconds": round(time.perf_counter() - started, 3)})
    if dist.rank() == 0:
        for d in prefix:
            run.audit.trained(d, docs.spans[d][0] + 1, docs.spans[d][1], kind=GLOBAL)
    run.adapters = None  # rebuilt after every phase


def phase_fits(docs: Documents, done: list[list[int]], text_tokens: int, run: TTTRun, device: torch.device,
               budget: Budget) -> bool:
    """The budget's projection: the phase at the last phase's SGD speed, then every target still
    unscored at the speed the targets so far were scored."""
    targets_done = sum(docs.targets(d) for b in done for d in b)
    phase_time = sum(p["seconds"] for p in run.phases)
    per_target = (time.perf_counter() - run.scoring_started - phase_time) / max(targets_done, 1)
    # Before the first phase there is no SGD timing yet: one scored target (a LoRA forward and
    # backward) stands in for one SGD token.
    sgd_per_token = run.phases[-1]["seconds"] / run.phases[-1]["tokens"] if run.phases else per_target
    return budget.fits(sgd_per_token * text_tokens, per_target * (run.audit.num_targets - targets_done), device)


def score_then_adapt(model, docs: Documents, index: int, byte_counts: np.ndarray, run: TTTRun,
                     settings: TTTSettings, device: torch.device, scorer: Scorer | None) -> None:
    """Batch `index` (in processing order) chunk by chunk: each chunk scored, then one AdamW step
    of the adapters on it for the documents that have chunks left."""
    batch = docs.batches[index]
    adapters = batch_adapters(model, len(batch), index, run, settings, device)
    optimizer = torch.optim.AdamW(adapters.parameters(), lr=settings.lr, betas=(settings.beta1, settings.beta2),
                                  eps=settings.eps, weight_decay=settings.weight_decay)
    starts = [docs.spans[d][0] for d in batch]
    lengths = [docs.targets(d) for d in batch]  # predictions per document
    chunks = [math.ceil(n / settings.chunk) for n in lengths]
    for c in range(max(chunks)):
        rows = chunk_rows(c, lengths, chunks, settings)
        x, y, mask, positions = chunk_inputs(docs.stream, starts, rows, with_positions=scorer is not None)
        nll, scores = chunk_scores(model, adapters, x, y, mask, positions, device, scorer)
        # Score first: the chunk's losses and bytes are final before any update that uses them.
        add_scores(scores, batch, starts, rows, byte_counts, run)
        train_rows = [j for j, row in enumerate(rows) if row is not None and c + 1 < chunks[j]]
        if not train_rows:
            continue
        adapter_step(optimizer, nll, mask, train_rows, device)
        for j in train_rows:
            lo, hi, _ = rows[j]
            run.audit.trained(batch[j], starts[j] + lo + 1, starts[j] + hi + 1)


def batch_adapters(model, docs_in_batch: int, index: int, run: TTTRun, settings: TTTSettings,
                   device: torch.device) -> DocumentAdapters:
    """Fresh adapters, or with warm_start_a the last batch's with B reset, where it had as many rows."""
    if run.adapters is None or docs_in_batch != run.adapters.head.A.size(0) or not settings.warm_start_a:
        # Seeded by the batch's place in processing order: the same adapters whichever rank runs it.
        run.adapters = DocumentAdapters(model.cfg, model.virtual_depth(), docs_in_batch, settings.rank,
                                        settings.alpha, settings.seed * 1_000_003 + index,
                                        k=settings.adapt_k).to(device)
    else:
        run.adapters.reset(keep_a=True)
    return run.adapters


def chunk_rows(c: int, lengths: list[int], chunks: list[int],
               settings: TTTSettings) -> list[tuple[int, int, int] | None]:
    """Each document's (lo, hi, w0) in chunk c: predictions lo..hi-1 are scored, with inputs from w0,
    so with up to `context` tokens of the document's own past; None past its last chunk."""
    rows: list[tuple[int, int, int] | None] = []
    for j, n in enumerate(lengths):
        if c >= chunks[j]:
            rows.append(None)
            continue
        lo, hi = c * settings.chunk, min((c + 1) * settings.chunk, n)
        rows.append((lo, hi, max(0, hi - settings.context)))
    return rows


def chunk_inputs(stream: torch.Tensor, starts: list[int], rows: list[tuple[int, int, int] | None],
                 with_positions: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Each document's row, zero-padded to the widest (all padding once it is finished): inputs,
    targets, which targets it scores, and for a scorer the targets' places in the stream."""
    width = max(row[1] - row[2] for row in rows if row is not None)
    x = torch.zeros(len(rows), width, dtype=torch.long)
    y = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    positions = torch.zeros(len(rows), width, dtype=torch.long) if with_positions else None
    for j, row in enumerate(rows):
        if row is None:
            continue
        lo, hi, w0 = row
        start = starts[j]
        x[j, :hi - w0] = stream[start + w0:start + hi]
        y[j, :hi - w0] = stream[start + w0 + 1:start + hi + 1]
        mask[j, lo - w0:hi - w0] = True
        if positions is not None:
            positions[j, :hi - w0] = torch.arange(start + w0 + 1, start + hi + 1)
    return x, y, mask, positions


def chunk_scores(model, adapters: DocumentAdapters, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor,
                 positions: torch.Tensor | None, device: torch.device,
                 scorer: Scorer | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(the NLL the adapters train on, with its graph; the score of every row position, detached),
    each [docs, width]: the plain NLL, or the scorer's pair."""
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        logits = model.forward_logits(x.to(device), adapters)
    if scorer is None:
        nll = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.to(device).reshape(-1),
                              reduction="none").view(x.shape)
        return nll, nll.detach()
    nll, scores = scorer(logits.flatten(0, 1), y.to(device).flatten(), positions.to(device).flatten(),
                         mask.to(device).flatten())
    return nll.view(x.shape), scores.view(x.shape)


def add_scores(scores: torch.Tensor, batch: list[int], starts: list[int], rows: list[tuple[int, int, int] | None],
               byte_counts: np.ndarray, run: TTTRun) -> None:
    """The chunk's scored targets into this rank's totals, its scores and its audit log."""
    scored = scores.double().cpu()
    for j, row in enumerate(rows):
        if row is None:
            continue
        lo, hi, w0 = row
        start = starts[j]
        run.loss_sum += float(scored[j, lo - w0:hi - w0].sum())
        run.nll_at[start + lo + 1:start + hi + 1] = scored[j, lo - w0:hi - w0].numpy()
        run.scored_bytes += int(byte_counts[start + lo + 1:start + hi + 1].sum())
        run.scored_tokens += hi - lo
        run.audit.scored(batch[j], start + lo + 1, start + hi + 1)


def adapter_step(optimizer: torch.optim.Optimizer, nll: torch.Tensor, mask: torch.Tensor, train_rows: list[int],
                 device: torch.device) -> None:
    """One AdamW step on the sum over `train_rows` of each document's mean NLL over its scored
    targets: every document weighs the same, however many targets its chunk has."""
    m = mask.to(device).float()
    per_doc = (nll * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)
    loss = per_doc[train_rows].sum()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def gather_over_ranks(run: TTTRun, docs: Documents, device: torch.device) -> tuple[BpbResult, dict]:
    """The totals summed and the audit logs checked as one run (collectives: every rank calls this)."""
    totals = BpbResult(run.loss_sum, run.scored_tokens, run.scored_bytes).summed_over_ranks(device)
    summary = run.audit.merged().check({i: end for i, (_, end) in enumerate(docs.spans)})
    summary.update(phases=run.phases, phases_skipped_at=run.skipped,
                   global_sgd_chunks=[p["chunks"] for p in run.phases],
                   global_sgd_seconds=round(sum(p["seconds"] for p in run.phases), 3), ranks=dist.world_size())
    return totals, summary
