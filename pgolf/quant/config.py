"""The GPTQ stage's settings (params.yaml's `gptq` section), the quantization policy's config,
importable without torch."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pgolf.typed_params import check_range


@dataclass
class GPTQConfig:
    # gptq: Hessian calibration + GPTQ with the settings below; int8_baseline: the challenge
    # baseline's int8 per-row format (no calibration; every setting below but nproc unused).
    method: Literal["gptq", "int8_baseline"] = "gptq"
    calib_batches: int = 16
    calib_seq_len: int = 1024
    calib_batch_seqs: int = 8
    calib_source: str = "train"  # "train": training windows; "self": sequences the model generates (R0325)
    calib_temperature: float = 0.8  # sampling temperature of self-generated calibration
    # Calibrate with the model's document mask (model.doc_attention). R1 calibrates with plain
    # causal attention across documents inside each window (its collect_hessians passes no
    # cu_seqlens), so the record preset turns this off; on, the Hessians see the activations the
    # model is trained and scored with.
    calib_doc_attention: bool = True
    bits: int = 6  # attention and MLP matrices (and anything else GPTQ'd)
    embed_bits: int = 0  # the tied embedding; 0: same as bits (R1: 7)
    clip_sigmas: float = 12.85  # SDClip k for matrices of no family below
    attn_clip_sigmas: float = 0.0  # names containing .attn.; 0: clip_sigmas (R1 13.0)
    mlp_clip_sigmas: float = 0.0  # names containing .mlp.; 0: clip_sigmas (R1 11.5)
    embed_clip_sigmas: float = 0.0  # tok_emb / lm_head; 0: clip_sigmas (R1 14.0)
    gate_int8: bool = False  # attention gates / inhibitors of 32..8,192 values: int8 per row (R1 on)
    lqer_rank: int = 0  # > 0: low-rank error correction on the lqer_top_k worst tensors (R1: 4)
    lqer_top_k: int = 3
    lqer_group: int = 64
    damp: float = 0.01
    block_size: int = 128
    act_order: bool = True
    passthrough_max_numel: int = 65536
    device: str = "auto"
    seed: int = 1337
    nproc: int = 1  # > 1: torchrun processes per node, each calibrating on its share of the batches
    nnodes: int = 1  # > 1: nodes joined by torchrun's c10d rendezvous (docs/stages.md)

    def validate(self) -> None:
        for name in ("bits", "embed_bits"):
            value = getattr(self, name)
            if value not in ((0, 6, 7, 8) if name == "embed_bits" else (6, 7, 8)):
                raise ValueError(f"{name} {value}: supported are 6, 7 and 8")
        check_range(self, "calib_batches calib_batch_seqs calib_seq_len block_size nproc lqer_group", ge=1)
        check_range(self, "lqer_rank lqer_top_k passthrough_max_numel seed calib_temperature", ge=0)
        check_range(self, "clip_sigmas", gt=0)
        check_range(self, "attn_clip_sigmas mlp_clip_sigmas embed_clip_sigmas", ge=0)  # 0: clip_sigmas
        check_range(self, "damp", gt=0, lt=1)
        if self.calib_source not in ("train", "self"):
            raise ValueError(f"calib_source {self.calib_source!r} must be 'train' or 'self'")
        check_range(self, "nproc nnodes", ge=1)

    def family(self, name: str) -> tuple[int, float]:
        from pgolf.quant.policy import matrix_bits_and_clip  # torch: only when a stage quantizes

        return matrix_bits_and_clip(self, name)
