"""eval.compile: torch.compile the one forward path and pay its compilation before the clock starts.

R1 compiles its TTT forward and warms it up on random tokens (not val data) at the shapes the eval
will use, backward and optimizer step included, and leaves those seconds out of its eval time
(docs/lineage.md#ttt-warmup, #eval-budget); the eval stage reports them separately as warmup_seconds. Shapes are
dynamic: LoRA chunks and the last windows vary in width, and one graph serves them all.
"""
from __future__ import annotations

import time

import torch

from pgolf.model.lora import DocumentAdapters


def compile_forward(model) -> None:
    """Route every forward (scoring, TTT, the SGD loss through model.forward) through a compiled graph."""
    # fullgraph: a graph break is an error, not a silent fall back to eager for part of the forward
    model.forward_logits = torch.compile(model.forward_logits, dynamic=True, fullgraph=True)


def warm_up(model, device: torch.device, shapes: list[tuple[int, int]], lora: tuple[int, int, float] | None = None,
            train: bool = False, seed: int = 0, lora_k: bool = True) -> float:
    """Run the compiled model on random tokens at each (rows, width) of `shapes`; with `lora`
    = (docs, rank, alpha) through throwaway adapters (on K too unless not `lora_k`) with a backward and an AdamW step, with `train`
    a backward through the base weights. No base weight changes. Returns the seconds spent."""
    started = time.perf_counter()
    g = torch.Generator().manual_seed(seed)
    vocab = model.cfg.vocab_size
    for rows, width in shapes:
        x = torch.randint(0, vocab, (rows, width), generator=g).to(device)
        y = torch.randint(0, vocab, (rows, width), generator=g).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            if lora is not None:
                # Base weights frozen, as TTT runs them: the graph is compiled for what will run.
                requires = [p.requires_grad for p in model.parameters()]
                for p in model.parameters():
                    p.requires_grad_(False)
                docs, rank, alpha = lora
                adapters = DocumentAdapters(model.cfg, model.virtual_depth(), docs, rank, alpha, seed, k=lora_k).to(device)
                optimizer = torch.optim.AdamW(adapters.parameters(), lr=1e-4)
                logits = model.forward_logits(x[:docs], adapters)
                torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y[:docs].flatten()).backward()
                optimizer.step()
                for p, flag in zip(model.parameters(), requires):
                    p.requires_grad_(flag)
            elif train:
                requires = [p.requires_grad for p in model.parameters()]
                for p in model.parameters():
                    p.requires_grad_(True)
                model.train()
                model(x, y).backward()
                model.eval()
                for p, flag in zip(model.parameters(), requires):
                    p.requires_grad_(flag)
                    p.grad = None
            else:
                with torch.no_grad():
                    model.forward_logits(x)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started
