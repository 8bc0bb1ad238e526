"""Building blocks every technique shares."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class CastedLinear(nn.Linear):
    """Bias-free linear whose fp32 master weight is cast to the activation dtype at each matmul,
    so bf16 autocast training keeps fp32 weights for the optimizer (baseline's CastedLinear).
    GPTQ finds the matrices it quantizes, and their inputs, by this type."""

    def __init__(self, in_features: int, out_features: int, zero_init: bool = False, orthogonal: bool = False):
        super().__init__(in_features, out_features, bias=False)
        self.zero_init = zero_init
        self.orthogonal = orthogonal

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight.to(x.dtype))


def rms_norm(x: Tensor) -> Tensor:
    return F.rms_norm(x, (x.size(-1),))
