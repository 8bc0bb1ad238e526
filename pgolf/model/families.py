"""The tensor families: which rule applies to a parameter. Each module that owns parameters declares
their families in `param_families` (its parameter names, or its building blocks' parameters by their
path from it, to Family), and a model parameter's family is the declaration of the nearest module
above it that names it (declared_families). A parameter that no module declares is an error when
the GPT is built, so a new parameter is classified once, where it is defined. The optimizer groups
(pgolf.model.gpt.param_groups) and GPTQ's gates (pgolf.quant.policy) read the declarations.

- embedding: the token embedding and an untied head (their own Adam lr, GPTQ's embed bits/clip);
- matrix: the blocks' attention and MLP weight matrices (Muon; GPTQ's attn/mlp clip);
- gate: attention gates and inhibitors small enough to store int8 per row (R1's
  GATED_ATTN_QUANT_GATE, docs/lineage.md#gptq): declared GATE, a tensor outside GATE_NUMEL or not
  2-D is passthrough;
- scalar: the baseline's control tensors (scales, mixes, gains, skip weights), which its int8
  format keeps in fp32;
- passthrough: everything else: the scalar Adam trains it, and GPTQ and the int8 baseline keep or
  quantize it by its size alone.

Names stay the rule where a consumer has names and no model: the pack's size groups read a
quantized file (EMBEDDING_NAMES, block_part), GPTQ's clip table is keyed by name, and the int8
baseline's format is the challenge baseline's own name patterns (CONTROL_PATTERNS), applied to any
state dict. tests/test_families.py checks every preset's declarations against those names.

The size rules of GPTQ and the baseline (passthrough_max_numel, 65,536) stay with them: they are
settings of a format, not of the tensor.
"""
from __future__ import annotations

from enum import Enum

import torch
from torch import nn


class Family(str, Enum):
    EMBEDDING = "embedding"
    MATRIX = "matrix"
    GATE = "gate"
    SCALAR = "scalar"
    PASSTHROUGH = "passthrough"


EMBEDDING_NAMES = ("tok_emb.weight", "lm_head.weight")
GATE_NUMEL = (32, 8192)
# The baseline's CONTROL_TENSOR_NAME_PATTERNS (docs/lineage.md#model-formats), matched as substrings.
CONTROL_PATTERNS = ("attn_scale", "attn_scales", "mlp_scale", "mlp_scales", "resid_mix", "resid_mixes", "q_gain",
                    "skip_weight", "skip_weights")


class UndeclaredParameter(TypeError):
    pass


def is_embedding(name: str) -> bool:
    return name in EMBEDDING_NAMES


def is_control(name: str) -> bool:
    return any(p in name for p in CONTROL_PATTERNS)


def block_part(name: str) -> str | None:
    """'mlp' or 'attention' for a tensor inside a block's MLP or attention module (by the module
    path, so GPTQ's per-part clip and the pack's size groups follow it), else None."""
    if ".mlp." in name:
        return "mlp"
    if ".attn." in name:
        return "attention"
    return None


def sized(declared: Family, tensor: torch.Tensor) -> Family:
    """A declared gate is a gate only at the sizes int8 per row is for."""
    if declared is Family.GATE and not (tensor.ndim == 2 and GATE_NUMEL[0] <= tensor.numel() <= GATE_NUMEL[1]):
        return Family.PASSTHROUGH
    return declared


def declared_families(model: nn.Module) -> dict[str, Family]:
    """Every parameter's family, from the nearest enclosing module whose param_families names it;
    raises UndeclaredParameter for a parameter that none names."""
    modules = dict(model.named_modules())
    families = {}
    for name, tensor in model.named_parameters():
        path = name.split(".")
        for cut in range(len(path) - 1, -1, -1):
            declared = getattr(modules[".".join(path[:cut])], "param_families", {}).get(".".join(path[cut:]))
            if declared is not None:
                families[name] = sized(declared, tensor)
                break
        else:
            owner = type(modules[".".join(path[:-1])]).__name__
            raise UndeclaredParameter(f"parameter {name} of {owner} has no family: declare it in the param_families "
                                      f"of {owner} or of a module that holds it (pgolf.model.families)")
    return families
