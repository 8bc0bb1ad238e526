"""Document-isolated attention: in a packed row, a token attends only to earlier tokens of its
own document (what R1 gets from FlashAttention's varlen cu_seqlens at every BOS). Documents are
numbered by counting BOS tokens, so the mask comes from the input ids alone."""
from __future__ import annotations

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

Mask = Tensor | BlockMask


def document_causal_mask(input_ids: Tensor, bos_id: int) -> Tensor:
    """Boolean [B, 1, T, T]: True where query t may attend key s (s <= t, same document)."""
    doc = torch.cumsum((input_ids == bos_id).to(torch.int32), dim=1)
    same_doc = doc.unsqueeze(2) == doc.unsqueeze(1)
    t = input_ids.size(1)
    causal = torch.ones(t, t, dtype=torch.bool, device=input_ids.device).tril()
    return (same_doc & causal).unsqueeze(1)


def document_block_mask(input_ids: Tensor, bos_id: int) -> BlockMask:
    """The same mask as a FlexAttention BlockMask: blocks entirely in other documents are skipped."""
    doc = torch.cumsum((input_ids == bos_id).to(torch.int32), dim=1)

    def same_document_causal(b, h, q, kv):
        return (q >= kv) & (doc[b, q] == doc[b, kv])

    t = input_ids.size(1)
    return create_block_mask(same_document_causal, input_ids.size(0), None, t, t, device=input_ids.device)


def masked_attention(q: Tensor, k: Tensor, v: Tensor, mask: Mask, enable_gqa: bool) -> Tensor:
    if isinstance(mask, BlockMask):
        return flex_attention(q, k, v, block_mask=mask, enable_gqa=enable_gqa)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=enable_gqa)
