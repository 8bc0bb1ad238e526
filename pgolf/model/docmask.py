"""Document-isolated attention: in a packed row, a token attends only to earlier tokens of its
own document (what R1 gets from FlashAttention's varlen cu_seqlens at every BOS). Documents are
numbered by counting BOS tokens, so the mask comes from the input ids alone."""
from __future__ import annotations

import torch
from torch import Tensor


def document_causal_mask(input_ids: Tensor, bos_id: int) -> Tensor:
    """Boolean [B, 1, T, T]: True where query t may attend key s (s <= t, same document)."""
    doc = torch.cumsum((input_ids == bos_id).to(torch.int32), dim=1)
    same_doc = doc.unsqueeze(2) == doc.unsqueeze(1)
    t = input_ids.size(1)
    causal = torch.ones(t, t, dtype=torch.bool, device=input_ids.device).tril()
    return (same_doc & causal).unsqueeze(1)
