"""The challenge's conditions on evaluation (docs/lineage.md#compliance), checked from a log of what a run did.

Every TTT mode records each span of targets it scores and each span it trains on (global target
positions, end exclusive), stamped with a logical time `tick`: events of one tick on different
ranks touch disjoint targets, and every event of tick t happened before any of tick t+1 on every
rank (the ranks synchronize between them). Merging the ranks' logs in (tick, rank, order) is then a
valid serialization of the whole run, and the checks below are checks of the run:
  score before update: no span is trained on before every target in it was scored;
  single pass: every target is scored exactly once;
  per-document LoRA TTT never trains on a document's last chunk (nothing after it would profit).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pgolf import dist

SCORE, TRAIN, GLOBAL = "score", "train", "global"  # GLOBAL: training that is not per document (SGD phases)


@dataclass
class Audit:
    num_targets: int
    tick: int = 0
    events: list[tuple[int, int, str, int, int, int]] = field(default_factory=list)  # (tick, rank, kind, unit, lo, hi)

    def scored(self, unit: int, lo: int, hi: int) -> None:
        self.events.append((self.tick, dist.rank(), SCORE, unit, lo, hi))

    def trained(self, unit: int, lo: int, hi: int, kind: str = TRAIN) -> None:
        self.events.append((self.tick, dist.rank(), kind, unit, lo, hi))

    def merged(self) -> "Audit":
        """Every rank's events in one serial order (a collective: every rank must call it)."""
        logs = dist.all_gather_objects(self.events)
        events = sorted((e for log in logs for e in log), key=lambda e: (e[0], e[1]))  # stable: keeps each rank's order
        return Audit(self.num_targets, self.tick, events)

    def check(self, unit_ends: dict[int, int]) -> dict:
        """`unit_ends[u]`: one past the last target of document u (its last chunk may not be trained on)."""
        counts = np.zeros(self.num_targets + 1, dtype=np.int64)
        violations = []
        trains = 0
        for _, rank, kind, unit, lo, hi in self.events:
            if kind == SCORE:
                counts[lo:hi] += 1
                continue
            trains += 1
            if (counts[lo:hi] == 0).any():
                violations.append(f"rank {rank}, unit {unit}: trained on targets {lo}..{hi} before scoring them")
            if kind == TRAIN and hi >= unit_ends[unit]:
                violations.append(f"rank {rank}, document {unit}: trained on its last chunk ({lo}..{hi})")
        bad = np.flatnonzero(counts[1:] != 1)
        if counts[0] != 0 or len(bad):
            target = int(bad[0]) + 1 if len(bad) else 0
            violations.append(f"target {target} scored {int(counts[target])} times (every target must be scored once)")
        return {"passed": not violations, "scored_targets": int(counts.sum()), "train_steps": trains,
                "violations": violations[:10]}
