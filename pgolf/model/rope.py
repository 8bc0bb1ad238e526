"""Rotary position embedding, over the whole head or its first `rope_dims` dims (partial RoPE,
R0405 lineage), with an optional YaRN/NTK base stretch for sequences past the training length."""
from __future__ import annotations

import torch
from torch import Tensor, nn


class Rotary(nn.Module):
    def __init__(self, head_dim: int, base: float, rope_dims: int = 0, yarn: bool = False, train_len: int = 2048,
                 bf16_freqs: bool = False):
        super().__init__()
        self.rope_dims = rope_dims or head_dim
        self.base, self.yarn, self.train_len = base, yarn, train_len
        self.bf16_freqs = bf16_freqs  # ModelConfig.rope_bf16_freqs: the frequencies R1's bf16 buffers hold
        self._cache: dict = {}

    def base_for(self, seq_len: int) -> float:
        """YaRN-style: base' = base * (L / L_train)^(d / (d - 2)) once L exceeds the training length."""
        if not self.yarn or seq_len <= self.train_len:
            return self.base
        d = self.rope_dims
        return self.base * (seq_len / self.train_len) ** (d / (d - 2))

    def forward(self, seq_len: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        key = (seq_len, device, dtype)
        if key in self._cache:
            return self._cache[key]
        d = self.rope_dims
        base = self.base_for(seq_len)
        inv_freq = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.float32, device=device) / d))
        if self.bf16_freqs and base == self.base:  # a YaRN-stretched base is computed afresh there, in fp32
            inv_freq = inv_freq.to(torch.bfloat16).float()
        freqs = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
        value = (freqs.cos()[None, None].to(dtype), freqs.sin()[None, None].to(dtype))
        if not torch.compiler.is_compiling():
            self._cache = {key: value}
        return value


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the first cos.size(-1) * 2 dims of x; the rest pass through unchanged."""
    d = cos.size(-1) * 2
    rot, rest = x[..., :d], x[..., d:]
    half = d // 2
    x1, x2 = rot[..., :half], rot[..., half:]
    rotated = torch.cat((x1 * cos + x2 * sin, x1 * (-sin) + x2 * cos), dim=-1)
    return torch.cat((rotated, rest), dim=-1) if rest.numel() else rotated
