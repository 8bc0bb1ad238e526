"""Learning-rate and momentum schedules of the challenge's baseline and of the record lineage,
as pure functions."""
from __future__ import annotations


def lr_multiplier(step: int, elapsed_ms: float, iterations: int, warmdown_iters: int,
                  max_wallclock_ms: float | None) -> float:
    """Baseline: 1 until the warmdown, then linear to 0 over the last `warmdown_iters` steps.

    With a wallclock cap the baseline does not know how many steps it will get, so it turns
    `warmdown_iters` into time using the average step time so far (docs/lineage.md#baseline-config).
    """
    if warmdown_iters <= 0:
        return 1.0
    if not max_wallclock_ms:
        warmdown_start = max(iterations - warmdown_iters, 0)
        if warmdown_start <= step < iterations:
            return max((iterations - step) / max(warmdown_iters, 1), 0.0)
        return 1.0
    step_ms = elapsed_ms / max(step, 1)
    warmdown_ms = warmdown_iters * step_ms
    remaining_ms = max(max_wallclock_ms - elapsed_ms, 0.0)
    return remaining_ms / max(warmdown_ms, 1e-9) if remaining_ms <= warmdown_ms else 1.0


def training_fraction(step: int, elapsed_ms: float, iterations: int, max_wallclock_ms: float | None) -> float:
    """How far training is: by wallclock when capped (the record lineage's clock), else by steps."""
    if max_wallclock_ms:
        return min(elapsed_ms / max_wallclock_ms, 1.0)
    return min(step / max(iterations, 1), 1.0)


def warmdown_multiplier(frac: float, warmdown_frac: float, min_lr: float) -> float:
    """R1: constant for the first 1 - warmdown_frac of training, then linear down to a `min_lr` floor
    (warmdown_frac 0.85, min_lr 0.1 there; docs/lineage.md#schedule)."""
    if warmdown_frac <= 0 or frac < 1.0 - warmdown_frac:
        return 1.0
    return max((1.0 - frac) / warmdown_frac, min_lr)


def muon_momentum(step: int, start: float, end: float, warmup_steps: int) -> float:
    """Linear warm-up of Muon's momentum from `start` to `end` over `warmup_steps` steps."""
    if warmup_steps <= 0:
        return end
    frac = min(step / warmup_steps, 1.0)
    return (1.0 - frac) * start + frac * end
