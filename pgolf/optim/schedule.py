"""Learning-rate and momentum schedules of the challenge's baseline, as pure functions."""
from __future__ import annotations


def lr_multiplier(step: int, elapsed_ms: float, iterations: int, warmdown_iters: int,
                  max_wallclock_ms: float | None) -> float:
    """1 until the warmdown, then linear to 0 over the last `warmdown_iters` steps.

    With a wallclock cap the baseline does not know how many steps it will get, so it turns
    `warmdown_iters` into time using the average step time so far (reference.md 4.8).
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


def muon_momentum(step: int, start: float, end: float, warmup_steps: int) -> float:
    """Linear warm-up of Muon's momentum from `start` to `end` over `warmup_steps` steps."""
    if warmup_steps <= 0:
        return end
    frac = min(step / warmup_steps, 1.0)
    return (1.0 - frac) * start + frac * end
