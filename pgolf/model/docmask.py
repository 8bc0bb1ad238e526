"""Document-isolated attention: in a packed row, a token attends only to earlier tokens of its
own attention segment (what R1 gets from FlashAttention's varlen cu_seqlens). A segment starts
at every BOS and at the row's first position; with `max_len` > 0 a long document is also cut
every max_len tokens from its start (R1's _build_cu_seqlens with max_doc_len = train_seq_len),
which matters only in rows longer than max_len (train.flat_batches). The segments come from the
input ids alone."""
from __future__ import annotations

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

Mask = Tensor | BlockMask


def segment_ids(input_ids: Tensor, bos_id: int, max_len: int = 0) -> Tensor:
    """int64 [B, T]: equal where two positions share an attention segment."""
    t = input_ids.size(1)
    pos = torch.arange(t, device=input_ids.device).expand_as(input_ids)
    # the last BOS at or before each position (0 before the row's first BOS: R1 starts a segment there)
    start = torch.cummax(torch.where(input_ids == bos_id, pos, torch.zeros_like(pos)), dim=1).values
    if max_len <= 0:
        return start
    return start * (t + 1) + (pos - start) // max_len


def document_causal_mask(input_ids: Tensor, bos_id: int, max_len: int = 0) -> Tensor:
    """Boolean [B, 1, T, T]: True where query t may attend key s (s <= t, same segment)."""
    seg = segment_ids(input_ids, bos_id, max_len)
    same_doc = seg.unsqueeze(2) == seg.unsqueeze(1)
    t = input_ids.size(1)
    causal = torch.ones(t, t, dtype=torch.bool, device=input_ids.device).tril()
    return (same_doc & causal).unsqueeze(1)


def document_block_mask(input_ids: Tensor, bos_id: int, max_len: int = 0) -> BlockMask:
    """The same mask as a FlexAttention BlockMask: blocks entirely in other segments are skipped."""
    seg = segment_ids(input_ids, bos_id, max_len)

    def same_document_causal(b, h, q, kv):
        return (q >= kv) & (seg[b, q] == seg[b, kv])

    t = input_ids.size(1)
    return create_block_mask(same_document_causal, input_ids.size(0), None, t, t, device=input_ids.device)


def masked_attention(q: Tensor, k: Tensor, v: Tensor, mask: Mask, enable_gqa: bool) -> Tensor:
    if isinstance(mask, BlockMask):
        return flex_attention(q, k, v, block_mask=mask, enable_gqa=enable_gqa)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=enable_gqa)
