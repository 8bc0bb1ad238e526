"""The model's shape and technique switches; defaults reproduce the challenge's baseline GPT.

Every technique of the leading entries is off by default and switched and sized here; which
layer does what comes from one pure function of this config (pgolf.model.plan). A technique's
switch carries its lineage, the line an exported README gives it (flows/export.py).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from pgolf.typed_params import LATER, check_range

OFF = (0, False, [], "", None)


def lineage(order: int, text: str, off: Any = None) -> dict:
    """Field metadata of a technique's switch: where it comes from (docs/lineage.md#codes and
    #architecture), the `order`-th line of an exported README's lineage; `off`: the value that
    switches it off where that is not one of OFF."""
    return {"lineage": (order, text, OFF if off is None else (off,))}


def lineage_switches() -> list[tuple[str, str, tuple]]:
    """(field, lineage text, its off values) of every technique switch, in README order."""
    marked = [(f.metadata["lineage"], f.name) for f in dataclasses.fields(ModelConfig) if "lineage" in f.metadata]
    return [(name, text, off) for (_, text, off), name in sorted(marked)]


@dataclass
class ModelConfig:
    vocab_size: int = 1024
    num_layers: int = 9
    model_dim: int = 512
    num_heads: int = 8
    num_kv_heads: int = 4
    mlp_mult: float = 2.0
    mlp_activation: Literal["relu2", "leaky_relu2"] = "relu2"
    leaky_slope: float = 0.5
    tie_embeddings: bool = True
    tied_embed_init_std: float = 0.005
    orthogonal_init: bool = False  # R1: Q, K, V and MLP-up orthogonal (gain 1)
    logit_softcap: float = 30.0
    # PR #2135's AsymLogit Rescale (pgolf/model/asym_softcap.py): learned caps for positive and negative logits
    asym_softcap: bool = field(default=False, metadata={**LATER, **lineage(
        15, "AsymLogit Rescale: learned caps for positive and negative logits (PR #1923, PR #2135)")})
    rope_base: float = 10000.0
    # 0: RoPE over the whole head; R1 rotates the first 16 of 64 dims
    rope_dims: int = field(default=0, metadata=lineage(10, "partial RoPE (R0405)"))
    rope_yarn: bool = False
    rope_train_len: int = 2048  # YaRN stretches the base only past this length
    # R1's and PR #2135's scripts build their model as GPT(h).bfloat16() and return parameters, not buffers,
    # to fp32, so their RoPE inverse frequencies are bf16-rounded in training and eval alike (where YaRN
    # does not stretch them): 0.3164 for 10000^-1/8, half a radian off at position 2,560 (docs/lineage.md#pr2135)
    rope_bf16_freqs: bool = field(default=False, metadata=LATER)
    qk_gain_init: float = 1.5
    # block input norms x 1/sqrt(physical layer + 1)
    ln_scale: bool = field(default=False, metadata=lineage(9, "LN scale 1/sqrt(layer+1) (R1)"))
    # exclusive self-attention on the last n physical layers
    xsa_last_n: int = field(default=0, metadata=lineage(5, "exclusive self-attention (R0325 lineage)"))
    # U-Net skips as lerp(w * skip, x, sigmoid(g))
    skip_gates: bool = field(default=False, metadata=lineage(8, "gated U-Net skips (R1)"))
    # two residual lanes from this physical layer on; -1: off
    parallel_start_layer: int = field(default=-1, metadata=lineage(4, "two-lane parallel residuals (R1)", off=-1))
    parallel_resid_init: float = 1.1
    # depth recurrence: physical layers loop_start..loop_end (inclusive) run 1 + num_loops times
    num_loops: int = field(default=0, metadata=lineage(
        1, "depth recurrence (R0409 lineage; R1 loops 3-5 twice from 35% of training)"))
    loop_start: int = 0
    loop_end: int = 0
    enable_looping_at: float = 0.0  # training fraction at which the loop switches on (then stays on)
    # explicit virtual -> physical order (PR #1383)
    block_map: list[int] = field(default_factory=list, metadata=lineage(2, "explicit block map (PR #1383)"))
    # per-virtual-layer scale and shift after shared blocks (PR #1383)
    film: bool = field(default=False, metadata=lineage(3, "FiLM scale/shift on shared depths (PR #1383)"))
    smear_gate: Literal["off", "r1", "pr1693", "classic"] = field(
        default="off", metadata=lineage(6, "SmearGate (R0416, BOS-masked in R1)", off="off"))
    smear_bos_mask: bool = True
    gate_window: int = 12
    attn_gate: Literal["off", "attn_out", "sparse"] = field(
        default="off", metadata=lineage(7, "attention output gate (R0416 / PR #1790 / R1 sparse)", off="off"))
    attn_gate_width: int = 12
    attn_gate_src: Literal["norm", "prenorm", "q"] = "norm"
    sparse_attn_gate_scale: float = 0.5
    bos_id: int = 1
    # attend only within the document (R1's varlen attention at BOS)
    doc_attention: bool = field(default=False, metadata=lineage(14, "document-isolated attention (R1 varlen)"))
    # How: "mask": a dense [T, T] boolean mask through SDPA (any device, no compile); "flex":
    # FlexAttention with a block mask, which skips whole blocks of other documents and is fused into
    # one kernel when the model is compiled; "varlen": the rows cut into segments at cu_seqlens, as
    # R1's FlashAttention varlen call (torch's varlen_attn on CUDA, exact per-segment SDPA
    # elsewhere), no T x T anything. Same function, same parameters (pgolf/model/docmask.py).
    doc_attention_kernel: Literal["mask", "flex", "varlen"] = "mask"
    # > 0: a document's attention segments are also cut every this many tokens from its start, as
    # R1's cu_seqlens cut them (max_doc_len = train_seq_len); it matters only in rows longer than
    # this (train.flat_batches), so 2048-token rows see the same mask with or without it.
    doc_attention_max_len: int = 0
    # BigramHash table rows; 0: off
    bigram_vocab: int = field(default=0, metadata=lineage(11, "BigramHash embedding (PR #1383 lineage)"))
    bigram_dim: int = 128
    # physical layers whose V gets value embeddings
    ve_layers: list[int] = field(default_factory=list, metadata=lineage(12, "value embeddings (PR #1383)"))
    ve_dim: int = 128
    # PR #2116 gates on these physical blocks
    inhibitor_blocks: list[int] = field(default_factory=list,
                                        metadata=lineage(13, "inhibitory gates (PR #2116)"))
    inhibitor_rank: int = 22
    inhibitor_bias: float = 3.0

    def validate(self) -> None:
        check_range(self, "vocab_size", ge=2, le=65536)  # uint16 shards
        check_range(self, "num_layers model_dim num_heads num_kv_heads rope_train_len gate_window attn_gate_width "
                    "bigram_dim ve_dim inhibitor_rank", ge=1)
        check_range(self, "loop_start loop_end", ge=0, lt=self.num_layers)
        check_range(self, "num_loops bigram_vocab tied_embed_init_std logit_softcap sparse_attn_gate_scale", ge=0)
        check_range(self, "mlp_mult rope_base", gt=0)
        check_range(self, "leaky_slope enable_looping_at", ge=0, le=1)
        check_range(self, "xsa_last_n", ge=0, le=self.num_layers)
        check_range(self, "parallel_start_layer", ge=-1, lt=self.num_layers)
        check_range(self, "bos_id", ge=0, lt=self.vocab_size)
        check_range(self, "qk_gain_init parallel_resid_init inhibitor_bias")
        if self.model_dim % self.num_heads:
            raise ValueError(f"model_dim {self.model_dim} is not divisible by num_heads {self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not divisible by num_kv_heads {self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError("head_dim must be even for RoPE")
        if self.rope_dims % 2 or not 0 <= self.rope_dims <= self.head_dim:
            raise ValueError(f"rope_dims {self.rope_dims} must be even and at most head_dim {self.head_dim}")
        if self.num_loops and not 0 <= self.loop_start <= self.loop_end < self.num_layers:
            raise ValueError(f"loop range {self.loop_start}..{self.loop_end} is not inside {self.num_layers} layers")
        if self.block_map and (self.num_loops or any(not 0 <= b < self.num_layers for b in self.block_map)):
            raise ValueError("block_map must name physical layers 0..num_layers-1 and excludes num_loops")
        if self.film and not (self.block_map or self.num_loops):
            raise ValueError("film needs shared blocks: set block_map or num_loops")
        for name in ("ve_layers", "inhibitor_blocks"):
            if any(not 0 <= i < self.num_layers for i in getattr(self, name)):
                raise ValueError(f"{name} must name physical layers 0..{self.num_layers - 1}")
        if self.doc_attention_max_len < 0:
            raise ValueError(f"doc_attention_max_len {self.doc_attention_max_len} must be >= 0 (0: no cut)")
        if self.attn_gate != "off" and self.attn_gate_width > self.model_dim:
            raise ValueError("attn_gate_width is larger than model_dim")

    @property
    def head_dim(self) -> int:
        return self.model_dim // self.num_heads
