"""Fused Triton kernels for the training forward and backward (R1's fused softcapped CE and fused
MLP up-projection). Each computes exactly the math of the eager code it replaces (the softcap in
GPT.logits_from_hidden, the activation in MLP.activation) and is chosen per model by config; eval,
calibration and TTT always run the eager path, as R1 does.

The kernels run where Triton does: CUDA tensors, or any tensor under Triton's interpreter
(TRITON_INTERPRET=1, how the CPU tests run them). Elsewhere the callers keep the eager path.
"""
from __future__ import annotations

import importlib.util

import torch

# The fused loss sums exp(z - cap) with z = cap*tanh(x/cap) in (-cap, cap) and no running maximum:
# exp(-2*cap) must stay a normal fp32 number.
MAX_FUSED_SOFTCAP = 40.0


def check_fusable_softcap(cap: float) -> None:
    if not 0 < cap <= MAX_FUSED_SOFTCAP:
        raise ValueError(f"the fused cross-entropy needs 0 < logit_softcap <= {MAX_FUSED_SOFTCAP}, got {cap}")


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """Triton runs kernels in its numpy interpreter, on CPU tensors too."""
    if not triton_installed():
        return False
    try:
        from triton import knobs
    except ImportError:  # triton < 3.4 reads the variable itself
        import os

        return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    return bool(knobs.runtime.interpret)


def usable(device: torch.device) -> bool:
    return triton_installed() and (device.type == "cuda" or interpreting())
