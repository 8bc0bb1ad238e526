"""eval.budget_s: the eval stage's time budget (the challenge allows 600 s on 8xH100, docs/lineage.md#eval-budget).

Scoring every target is not optional; the training a TTT mode does between scoring steps (a global
SGD phase, a chunk's SGD epochs) is. Before each such piece of training, the projection "elapsed +
this training + the scoring still ahead" is compared with the budget, and the training (with all
training after it) is skipped when it would not fit. All ranks take the same decision. "Elapsed"
counts everything since the eval began but the compile warm-up: the artifact load, and the n-gram
tilt's hint precompute, which PR #2135 counts inside its clock too (docs/lineage.md#eval-budget)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from pgolf import dist


@dataclass
class Budget:
    seconds: float  # 0: no budget
    started: float = field(default_factory=time.perf_counter)  # when the eval began (artifact load included)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def fits(self, training_seconds: float, scoring_left_seconds: float, device: torch.device) -> bool:
        over = self.seconds > 0 and self.elapsed() + training_seconds + scoring_left_seconds > self.seconds
        return not dist.all_reduce_max_flag(over, device)


def unlimited() -> Budget:
    return Budget(0.0)
