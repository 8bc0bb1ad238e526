"""The eval stage's settings (params.yaml's `eval` section) with its TTT and tilt parts, importable
without torch."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pgolf.typed_params import check_range

# The longest n-gram the tilt's context key covers: one term per context token (pgolf.evaluate.ngram_tilt.COEFFS).
TILT_MAX_ORDER = 33


@dataclass
class TTTSettings:
    rank: int = 96
    alpha: float = 96.0
    lr: float = 1e-4
    beta1: float = 0.0
    beta2: float = 0.999
    eps: float = 1e-10
    weight_decay: float = 0.5
    chunk: int = 48
    context: int = 2048
    batch_docs: int = 64
    warm_start_a: bool = False  # R1: keep A across batches (B is always reset)
    adapt_k: bool = True  # adapters on K too (R1); PR #2135: off (its TTT_K_LORA=0)
    seed: int = 0
    # Multi-phase global SGD (PR #1626 -> R1, docs/lineage.md#phased-ttt): once prefix_docs * k / phases
    # documents are scored, all base weights take one SGD epoch on that many of them, the shortest first.
    phases: int = 0
    prefix_docs: int = 2000
    global_lr: float = 1e-3
    global_momentum: float = 0.9
    global_chunk_tokens: int = 32768
    global_seq_len: int = 2048
    # One SGD step per chunk over all of its sequences; R1 steps once per batch of global_batch_seqs of
    # a rank's share, the same whenever a share fits one batch (R1's run: 16 a chunk over 8 ranks).
    global_batch_seqs: int = 32
    global_clip: float = 1.0

    def validate(self) -> None:
        check_range(self, "rank chunk context batch_docs global_chunk_tokens global_seq_len global_batch_seqs", ge=1)
        check_range(self, "lr alpha weight_decay global_lr global_clip seed phases prefix_docs", ge=0)
        check_range(self, "beta1 beta2 global_momentum", ge=0, lt=1)
        check_range(self, "eps", gt=0)
        if self.chunk > self.context:
            raise ValueError(f"lora chunk {self.chunk} must fit in its context {self.context}")
        if self.phases and self.prefix_docs < self.phases:
            raise ValueError(f"phases {self.phases} needs prefix_docs >= phases (got {self.prefix_docs})")


@dataclass
class SGDTTTSettings:
    # "all": every weight (R0409); "film": only the FiLM scales and shifts of the shared depths, as
    # PR #1383 intends (its own code left the shared matrices trainable, docs/lineage.md#film-ttt).
    trainable: Literal["all", "film"] = "all"
    lr: float = 0.005  # R0409; PR #1383: 0.002
    momentum: float = 0.9
    epochs: int = 3
    chunk_tokens: int = 32768
    batch_seqs: int = 32
    clip: float = 1.0

    def validate(self) -> None:
        if self.trainable not in ("all", "film"):
            raise ValueError(f"sgd trainable {self.trainable!r} must be 'all' or 'film'")
        check_range(self, "epochs chunk_tokens batch_seqs", ge=1)
        check_range(self, "lr clip", ge=0)
        check_range(self, "momentum", ge=0, lt=1)


@dataclass
class TiltSettings:
    order: int = 0  # 0: off; > 0: the n of the n-gram (the hint reads the previous order - 1 tokens); PR #2135: 16
    threshold: float = 0.8  # hint only where its frequency p is at least this
    boost: float = 2.625  # beta

    def validate(self) -> None:
        check_range(self, "order", ge=0, le=TILT_MAX_ORDER)
        check_range(self, "threshold", ge=0, le=1)
        check_range(self, "boost", ge=0)

    @property
    def on(self) -> bool:
        return self.order > 0


@dataclass
class EvalConfig:
    seq_len: int = 1024
    stride: int = 0  # 0: flat non-overlapping windows; > 0: sliding windows scoring `stride` new tokens each
    batch_seqs: int = 32
    # Flat mode as R1's eval_val: a batch's windows form one row, and documents (BOS to BOS, cut every
    # doc_attention_max_len tokens) run on across window edges. Needs the model's doc_attention.
    join_windows: bool = False
    device: str = "auto"
    nproc: int = 1  # > 1: torchrun processes (GPUs) per node, each scoring its share
    nnodes: int = 1  # > 1: nodes joined by torchrun's c10d rendezvous (docs/stages.md)
    # lora: score-first per-document LoRA TTT, with optional global SGD phases (R0416 -> R1);
    # sgd: score-first chunked SGD over the sliding windows (R0409 full-weight, PR #1383 FiLM-only).
    ttt: Literal["off", "lora", "sgd"] = "off"
    lora: TTTSettings = field(default_factory=TTTSettings)
    sgd: SGDTTTSettings = field(default_factory=SGDTTTSettings)
    # The token n-gram tilt (PR #2135, docs/lineage.md#ngram-tilt) on flat, sliding or LoRA-TTT scores;
    # its hints are computed inside the eval clock, after the compile warm-up, as PR #2135 runs it.
    tilt: TiltSettings = field(default_factory=TiltSettings)
    # > 0: TTT training (global SGD phases, SGD chunks) is skipped where the projection says the eval
    # would not finish within this many seconds; scoring always completes (docs/lineage.md#eval-budget).
    budget_s: float = 0.0
    # torch.compile the forward path; compilation runs on random tokens before the clock starts and is
    # reported as warmup_seconds, outside eval_seconds and the budget, as R1 reports it.
    compile: bool = False

    def validate(self) -> None:
        check_range(self, "seq_len batch_seqs nproc nnodes", ge=1)
        check_range(self, "stride budget_s", ge=0)
        if self.join_windows and (self.stride or self.ttt != "off"):
            raise ValueError("join_windows is a flat-mode layout: it needs stride 0 and ttt off")
        if self.stride >= self.seq_len:
            raise ValueError(f"stride {self.stride} must be smaller than seq_len {self.seq_len} (0 for flat)")
        if self.tilt.on and self.ttt == "sgd":
            raise ValueError("tilt: the n-gram tilt scores flat, sliding or LoRA-TTT evals, not ttt: sgd")
