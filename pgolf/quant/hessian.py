"""Calibration: H = sum of x x^T over the inputs of every quantized matrix (docs/lineage.md#hessians).

Under torchrun the calibration batches are dealt round-robin over ranks (batch i on rank i mod W)
and the sums and token counts are all-reduced, so every rank ends with the Hessians of all batches,
the same as one process's (see collect_hessians)."""
from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from pgolf import dist
from pgolf.progress import tracked
from pgolf.data.shards import list_shards, read_shard
from pgolf.errors import InputError
from pgolf.model.gpt import GPT, CastedLinear


def calibration_batches(shards: str | Path, batches: int, batch_seqs: int, seq_len: int, seed: int,
                        vocab_size: int | None = None):
    """Random training windows, deterministic in `seed`: a shard chosen in proportion to its
    length, then a random offset in it."""
    files = list_shards(shards, "train")
    if not files:
        raise InputError("no fineweb_train_*.bin shards for calibration", shards)
    tokens = [read_shard(f, vocab_size) for f in files]
    usable = np.array([max(len(t) - seq_len - 1, 0) for t in tokens], dtype=np.float64)
    if usable.sum() == 0:
        raise InputError(f"training shards are shorter than one calibration window of {seq_len + 1} tokens", shards)
    rng = np.random.default_rng(seed)
    for _ in range(batches):
        rows = []
        for _ in range(batch_seqs):
            shard = rng.choice(len(tokens), p=usable / usable.sum())
            start = int(rng.integers(0, int(usable[shard]) + 1))
            rows.append(np.asarray(tokens[shard][start:start + seq_len], dtype=np.int64))
        yield torch.from_numpy(np.stack(rows))


def this_ranks_share(batches):
    """Batch i of a calibration stream goes to rank i mod world size."""
    rank, world = dist.rank(), dist.world_size()
    for i, batch in enumerate(batches):
        if i % world == rank:
            yield batch


@torch.no_grad()
def collect_hessians(model: GPT, batches, device: torch.device) -> tuple[dict[str, torch.Tensor], int]:
    """Hessians keyed by weight name (`blocks.0.attn.c_q.weight`, ...; the tied embedding's from the
    final-norm output that feeds the LM head), over this rank's share of `batches`, summed over
    ranks. Returns (hessians / token count, token count). Each product is summed on one CPU thread,
    so the Hessians are the same whatever threads the stage has (the forward's matmuls split their
    output rows over threads, never a sum).

    Each batch's sum is taken in float32 (the same on whichever rank runs it) and added into float64
    totals: how ranks group the batches changes at most the last float64 bits, which the float32
    result drops (barring a float32 rounding tie), so N ranks give one process's Hessians bit for bit."""
    totals: dict[str, torch.Tensor] = {}
    batch_sums: dict[str, torch.Tensor] = {}
    hooks = []

    def add(name: str, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.size(-1)).float()
        # A [cols, cols] product summed over every token: BLAS splits that sum over CPU threads.
        with dist.one_thread() if x.device.type == "cpu" else nullcontext():
            product = x.T @ x
        h = batch_sums.get(name)
        batch_sums[name] = product if h is None else h.add_(product)

    def hook_for(name: str):
        return lambda module, inputs, output: add(name, inputs[0])

    for name, module in model.named_modules():
        if isinstance(module, CastedLinear) and name != "lm_head":
            hooks.append(module.register_forward_hook(hook_for(f"{name}.weight")))
    head_name = "tok_emb.weight" if model.lm_head is None else "lm_head.weight"
    model.eval()
    tokens = 0
    try:
        for batch in tracked(this_ranks_share(batches), "gptq calibration batches (this rank's)"):
            add(head_name, model.hidden(batch.to(device)))
            for name, h in batch_sums.items():
                totals[name] = h.double() if name not in totals else totals[name].add_(h)
            batch_sums.clear()
            tokens += batch.numel()
    finally:
        for handle in hooks:
            handle.remove()
    if dist.world_size() > 1:
        # A rank with no batch still takes part: its hooks never ran, so its sums are zeros of the same shapes.
        shapes = dist.all_gather_objects({k: tuple(v.shape) for k, v in totals.items()})
        for name, shape in sorted({k: v for part in shapes for k, v in part.items()}.items()):
            totals.setdefault(name, torch.zeros(shape, dtype=torch.float64, device=device))
        for name in sorted(totals):
            torch.distributed.all_reduce(totals[name])
        tokens = int(dist.all_reduce_sums([tokens], device)[0])
    return {k: (v / max(tokens, 1)).float().cpu() for k, v in sorted(totals.items())}, tokens


@torch.no_grad()
def self_generated_batches(model: GPT, batches: int, batch_seqs: int, seq_len: int, temperature: float, seed: int,
                           bos_id: int, device: torch.device):
    """Calibration text the model writes itself, starting from BOS (R0325, PR #1019): no training
    data is touched after the training wallclock, which the challenge rules out."""
    model.eval()
    for index in range(batches):
        # One generator per batch: a rank writes only its own share, and each batch is the same
        # whichever rank writes it.
        generator = torch.Generator(device=device).manual_seed(seed * 1_000_003 + index)
        if index % dist.world_size() != dist.rank():
            yield None
            continue
        seqs = torch.full((batch_seqs, 1), bos_id, dtype=torch.long, device=device)
        while seqs.size(1) < seq_len:
            logits = model.forward_logits(seqs)[:, -1].float()
            probs = torch.softmax(logits / max(temperature, 1e-6), dim=-1)
            seqs = torch.cat([seqs, torch.multinomial(probs, 1, generator=generator)], dim=1)
        yield seqs.cpu()
