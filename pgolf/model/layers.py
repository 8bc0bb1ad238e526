"""Building blocks every technique shares."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from pgolf.model.qat import fake_quantize_rows


class CastedLinear(nn.Linear):
    """Bias-free linear whose fp32 master weight is cast to the activation dtype at each matmul,
    so bf16 autocast training keeps fp32 weights for the optimizer (baseline's CastedLinear).
    GPTQ finds the matrices it quantizes, and their inputs, by this type."""

    def __init__(self, in_features: int, out_features: int, zero_init: bool = False, orthogonal: bool = False):
        super().__init__(in_features, out_features, bias=False)
        self.zero_init = zero_init
        self.orthogonal = orthogonal
        self.qat_bits = 0  # > 0: train through a fake int-k quantizer (late QAT)

    def effective_weight(self) -> Tensor:
        """The weight the matmul uses: fake-quantized while late QAT is on."""
        return fake_quantize_rows(self.weight, self.qat_bits) if self.qat_bits else self.weight

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.effective_weight().to(x.dtype))


def rms_norm(x: Tensor) -> Tensor:
    return F.rms_norm(x, (x.size(-1),))
