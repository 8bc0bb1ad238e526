"""The tensor families: which rule applies to a parameter, by its name (parameter names are an API:
artifacts, checkpoints and these rules all key on them). The optimizer groups
(pgolf.model.gpt.param_groups), GPTQ's gates and clip ranges (pgolf/quant/policy.py), the pack's size
groups (pgolf/pack/groups.py) and the baseline's int8 format (pgolf.quant.baseline_int8) all read them
here, so a new parameter is classified once.

- embedding: the token embedding and an untied head (their own Adam lr, GPTQ's embed bits/clip);
- matrix: the blocks' attention and MLP weight matrices (Muon; GPTQ's attn/mlp clip);
- gate: attention gates and inhibitors small enough to store int8 per row (R1's
  GATED_ATTN_QUANT_GATE, docs/lineage.md#gptq);
- scalar: the baseline's control tensors (scales, mixes, gains, skip weights), which its int8
  format keeps in fp32;
- passthrough: everything else, which no family rule names: the scalar Adam trains it, and GPTQ
  and the int8 baseline keep or quantize it by its size alone.

The size rules of GPTQ and the baseline (passthrough_max_numel, 65,536) stay with them: they are
settings of a format, not of the tensor.
"""
from __future__ import annotations

from enum import Enum

import torch


class Family(str, Enum):
    EMBEDDING = "embedding"
    MATRIX = "matrix"
    GATE = "gate"
    SCALAR = "scalar"
    PASSTHROUGH = "passthrough"


EMBEDDING_NAMES = ("tok_emb.weight", "lm_head.weight")
GATE_NAMES = ("attn_gate_w", "_inhibitor.")
GATE_NUMEL = (32, 8192)
# The baseline's CONTROL_TENSOR_NAME_PATTERNS (docs/lineage.md#model-formats), matched as substrings.
CONTROL_PATTERNS = ("attn_scale", "attn_scales", "mlp_scale", "mlp_scales", "resid_mix", "resid_mixes", "q_gain",
                    "skip_weight", "skip_weights")


def is_embedding(name: str) -> bool:
    return name in EMBEDDING_NAMES


def is_matrix(name: str) -> bool:
    return name.startswith("blocks.") and (".attn.c_" in name or ".attn.proj." in name or ".mlp." in name)


def is_gate(name: str, tensor: torch.Tensor) -> bool:
    return (any(g in name for g in GATE_NAMES) and tensor.ndim == 2
            and GATE_NUMEL[0] <= tensor.numel() <= GATE_NUMEL[1])


def is_control(name: str) -> bool:
    return any(p in name for p in CONTROL_PATTERNS)


def family_rules(name: str, tensor: torch.Tensor) -> list[Family]:
    """Every family whose rule names this tensor (a test checks there is never more than one)."""
    rules = ((Family.EMBEDDING, is_embedding(name)), (Family.MATRIX, is_matrix(name)),
             (Family.GATE, is_gate(name, tensor)), (Family.SCALAR, is_control(name)))
    return [family for family, hit in rules if hit]


def family_of(name: str, tensor: torch.Tensor) -> Family:
    rules = family_rules(name, tensor)
    return rules[0] if rules else Family.PASSTHROUGH


def block_part(name: str) -> str | None:
    """'mlp' or 'attention' for a tensor inside a block's MLP or attention module (by the module
    path, so GPTQ's per-part clip and the pack's size groups follow it), else None."""
    if ".mlp." in name:
        return "mlp"
    if ".attn." in name:
        return "attention"
    return None
