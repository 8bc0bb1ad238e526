"""Document-isolated attention: in a packed row, a token attends only to earlier tokens of its
own attention segment (what R1 gets from FlashAttention's varlen cu_seqlens). A segment starts
at every BOS and at the row's first position; with `max_len` > 0 a long document is also cut
every max_len tokens from its start (R1's _build_cu_seqlens with max_doc_len = train_seq_len),
which matters only in rows longer than max_len (train.flat_batches). The segments come from the
input ids alone.

Three ways to compute the same function (ModelConfig.doc_attention_kernel):
- mask: a dense boolean [T, T] mask through SDPA: any device, O(T^2) memory;
- flex: FlexAttention with a block mask: skips whole blocks of other documents, but evaluates
  every query-key pair of the blocks it keeps, and its mask is built from a T x T predicate;
- varlen: the rows flattened into one sequence cut at `cu_seqlens` (segment starts), as R1 runs
  FlashAttention's varlen kernel: work and memory grow with the segments' own lengths, never
  with T^2. On CUDA in fp16/bf16 it is torch's `torch.nn.attention.varlen.varlen_attn` (the
  FlashAttention-2 kernels torch ships: no extra wheel, a custom op with a fake and an autograd
  rule, so torch.compile traces it whole and FakeTensor estimates its memory); elsewhere
  `pgolf::segment_attention`, exact causal SDPA per segment, also one opaque op to the compiler.
`cu_seqlens` are built on the host from host token ids (the loader and eval have them there
before the copy to the device), so the device never waits for them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

# R1 pads cu_seqlens with the total length to a multiple of 64 entries, so a compiled graph
# sees few shapes; empty trailing segments cost the kernel nothing.
CU_SEQLENS_BUCKET = 64


@dataclass(frozen=True)
class Segments:
    """A batch's attention segments for a varlen kernel: the rows flattened into one sequence,
    segment i is [cu_seqlens[i], cu_seqlens[i + 1]); max_seqlen bounds every segment's length."""
    cu_seqlens: Tensor  # int32, on the attention's device
    max_seqlen: int


Mask = Tensor | BlockMask | Segments


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


def max_segment_len(row_len: int, max_len: int) -> int:
    """The longest segment a row of `row_len` can hold: a static bound, so a compiled graph does
    not depend on the batch (R1 passes train_seq_len)."""
    return min(row_len, max_len) if max_len > 0 else row_len


def document_segments(input_ids: Tensor, bos_id: int, max_len: int = 0, device: torch.device | None = None,
                      bucket: int = CU_SEQLENS_BUCKET) -> Segments:
    """The varlen segments of `input_ids` [B, T] (rows are cut from each other too), computed on
    the host: pass host ids (from a CUDA tensor this is a device sync). `device`: where the kernel
    runs (default the ids')."""
    host = input_ids.cpu()
    seg = segment_ids(host, bos_id, max_len)
    starts = torch.ones_like(seg, dtype=torch.bool)
    starts[:, 1:] = seg[:, 1:] != seg[:, :-1]
    positions = starts.flatten().nonzero().squeeze(1)
    total = host.numel()
    cu = torch.full((-(-(len(positions) + 1) // bucket) * bucket,), total, dtype=torch.int32)
    cu[:len(positions)] = positions
    target = input_ids.device if device is None else device
    if target.type == "cuda":  # from pinned memory the copy is queued, not waited for
        cu = cu.pin_memory().to(target, non_blocking=True)
    # Its length changes with the batch's documents (in buckets): one compiled graph for them all.
    torch._dynamo.mark_dynamic(cu, 0)
    return Segments(cu, max_segment_len(host.size(1), max_len))


def flash_varlen_usable(q: Tensor) -> bool:
    """torch's FlashAttention varlen kernel: CUDA, fp16/bf16 (autocast's dtype when it is on)."""
    return q.is_cuda and attention_dtype(q) in (torch.float16, torch.bfloat16)


def attention_dtype(q: Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(q.device.type):
        return torch.get_autocast_dtype(q.device.type)
    return q.dtype


def varlen_attention(q: Tensor, k: Tensor, v: Tensor, segments: Segments, enable_gqa: bool) -> Tensor:
    """Causal attention within segments; q [B, H, T, D], k/v [B, Hkv, T, D] -> [B, H, T, D]."""
    bsz, heads, seqlen, dim = q.shape

    def packed(t: Tensor) -> Tensor:
        return t.transpose(1, 2).reshape(bsz * seqlen, t.size(1), dim)

    cu, longest = segments.cu_seqlens, segments.max_seqlen
    if flash_varlen_usable(q):
        from torch.nn.attention.varlen import varlen_attn

        dtype = attention_dtype(q)
        y = varlen_attn(packed(q).to(dtype), packed(k).to(dtype), packed(v).to(dtype), cu, cu, longest, longest,
                        window_size=(-1, 0), enable_gqa=enable_gqa)
    else:
        y = torch.ops.pgolf.segment_attention(packed(q), packed(k), packed(v), cu, enable_gqa)
    return y.view(bsz, seqlen, heads, dim).transpose(1, 2)


def masked_attention(q: Tensor, k: Tensor, v: Tensor, mask: Mask, enable_gqa: bool) -> Tensor:
    if isinstance(mask, Segments):
        return varlen_attention(q, k, v, mask, enable_gqa)
    if isinstance(mask, BlockMask):
        return flex_attention(q, k, v, block_mask=mask, enable_gqa=enable_gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=enable_gqa)


# --- the exact varlen path: causal SDPA per segment, one op to autograd and the compiler ----------

def _segments_of(cu_seqlens: Tensor) -> list[tuple[int, int]]:
    bounds = cu_seqlens.tolist()
    return [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


def _attend(q: Tensor, k: Tensor, v: Tensor, enable_gqa: bool) -> Tensor:
    """One segment: [L, H, D] in, [L, H, D] out."""
    y = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True,
                                       enable_gqa=enable_gqa)
    return y.transpose(0, 1)


@torch.library.custom_op("pgolf::segment_attention", mutates_args=())
def segment_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, enable_gqa: bool) -> Tensor:
    """q [N, H, D], k/v [N, Hkv, D] packed, cu_seqlens int32 (padded with N) -> [N, H, D]."""
    out = torch.zeros_like(q)
    for a, b in _segments_of(cu_seqlens):
        out[a:b] = _attend(q[a:b], k[a:b], v[a:b], enable_gqa)
    return out


@segment_attention.register_fake
def _(q, k, v, cu_seqlens, enable_gqa):
    return torch.empty_like(q)


def _attend_backward(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, enable_gqa: bool) -> tuple[Tensor, Tensor, Tensor]:
    """The gradients of _attend for one segment, written out (autograd does not record inside a
    custom op): P = softmax(causal(q k^T s)), dV = P^T dO, dS = P (dP - rowsum(dP P)), dP = dO V^T."""
    group = q.size(1) // k.size(1)
    qh, kh, vh, gh = (t.transpose(0, 1).float() for t in (q, k, v, grad))  # [H, L, D]
    if group > 1:
        kh, vh = kh.repeat_interleave(group, 0), vh.repeat_interleave(group, 0)
    scale = q.size(-1) ** -0.5
    length = q.size(0)
    causal = torch.ones(length, length, dtype=torch.bool, device=q.device).tril()
    probs = torch.softmax((qh @ kh.mT * scale).masked_fill(~causal, float("-inf")), dim=-1)
    dv = probs.mT @ gh
    dprobs = gh @ vh.mT
    dscores = probs * (dprobs - (dprobs * probs).sum(-1, keepdim=True))
    dq, dk = dscores @ kh * scale, dscores.mT @ qh * scale
    if group > 1:
        dk = dk.unflatten(0, (-1, group)).sum(1)
        dv = dv.unflatten(0, (-1, group)).sum(1)
    return tuple(t.transpose(0, 1).to(dtype) for t, dtype in ((dq, q.dtype), (dk, k.dtype), (dv, v.dtype)))


@torch.library.custom_op("pgolf::segment_attention_backward", mutates_args=())
def segment_attention_backward(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor,
                               enable_gqa: bool) -> tuple[Tensor, Tensor, Tensor]:
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for a, b in _segments_of(cu_seqlens):
        dq[a:b], dk[a:b], dv[a:b] = _attend_backward(grad[a:b], q[a:b], k[a:b], v[a:b], enable_gqa)
    return dq, dk, dv


@segment_attention_backward.register_fake
def _(grad, q, k, v, cu_seqlens, enable_gqa):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup(ctx, inputs, output) -> None:
    q, k, v, cu_seqlens, enable_gqa = inputs
    ctx.save_for_backward(q, k, v, cu_seqlens)
    ctx.enable_gqa = enable_gqa


def _backward(ctx, grad):
    q, k, v, cu_seqlens = ctx.saved_tensors
    dq, dk, dv = torch.ops.pgolf.segment_attention_backward(grad.contiguous(), q, k, v, cu_seqlens, ctx.enable_gqa)
    return dq, dk, dv, None, None


segment_attention.register_autograd(_backward, setup_context=_setup)
