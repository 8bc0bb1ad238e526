"""The training stage's settings (params.yaml's `train` section), the trainer's own config, importable
without torch: `pgolf run` checks a whole params file before DVC starts a stage."""
from __future__ import annotations

from dataclasses import dataclass, field

from pgolf.model.config import ModelConfig
from pgolf.typed_params import check_range

# Far past any run (a record trains ~4,500-20,000 steps in 600 s): a typo like 1e30 would run until killed.
MAX_ITERATIONS = 10_000_000
# Muon's Newton-Schulz coefficient sets by name (their values: pgolf.optim.muon.COEFFICIENTS).
MUON_COEFFICIENTS = ("stock", "polar_express")


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    seed: int = 1337
    nproc: int = 1  # ranks per node
    nnodes: int = 1  # > 1: nodes joined by torchrun's c10d rendezvous (docs/stages.md); nproc x nnodes ranks
    device: str = "auto"
    iterations: int = 20000
    train_batch_tokens: int = 524288
    train_seq_len: int = 1024
    grad_accum_steps: int = 0  # 0: 8 // ranks, the baseline's choice for 8 GPUs' worth of micro-batches
    loader: str = "stream"  # "stream" (baseline) or "documents" (R1: spans from each shard's first BOS)
    # Each rank's micro-batch as one row instead of rows of train_seq_len (R1's layout): with
    # doc_attention and doc_attention_max_len = train_seq_len, attention is cut where R1's
    # cu_seqlens cut it and SmearGate runs across those cuts, where fixed rows lose the previous
    # token at every row start. Rows stay an option: they need no segment mask to be affordable.
    flat_batches: bool = False
    max_wallclock_seconds: float = 600.0  # 0: no cap
    gptq_reserve_seconds: float = 0.0  # taken out of the cap so calibration fits in the 600 s (R1 0.5, R0429 8)
    warmup_steps: int = 20  # compile warm-up steps, rolled back before the timed run
    warmdown_iters: int = 1200  # baseline: warmdown length in steps (estimated from step time under a cap)
    warmdown_frac: float = 0.0  # record lineage: warmdown over this fraction of the run (0: use warmdown_iters)
    min_lr: float = 0.0  # floor of the warmdown_frac schedule (R1 0.1)
    matrix_lr: float = 0.04
    scalar_lr: float = 0.04
    tied_embed_lr: float = 0.05
    embed_lr: float = 0.6
    head_lr: float = 0.008
    muon_momentum: float = 0.95
    muon_momentum_warmup_start: float = 0.85
    muon_momentum_warmup_steps: int = 500
    muon_backend_steps: int = 5
    muon_coefficients: str = "stock"  # or "polar_express" (R1)
    muon_row_normalize: bool = False  # MuonEq-R (R0405 on)
    muon_wd: float = 0.0  # decoupled: p *= 1 - lr * wd, with the scheduled lr
    muon_sharded: bool = False  # R1's parallel Muon: reduce-scatter banks, orthogonalize a share, all-gather
    # R1's Muon precision: momentum buffer, row normalization and Newton-Schulz in bf16 on every
    # device (one step's update differs by up to ~10% from fp32 state). Off keeps fp32 state, the
    # baseline's choice, and fp32 Newton-Schulz on CPU, where bf16 matmuls are slow.
    muon_bf16: bool = False
    embed_wd: float = 0.0  # AdamW weight decay of the embedding group
    adam_wd: float = 0.0  # AdamW weight decay of the scalar/control group
    beta1: float = 0.9
    beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip_norm: float = 0.0  # on each rank's local gradients, before averaging (as R1)
    ema_decay: float = 0.0  # 0: off; R1 0.9965, EMA weights replace the live ones at the end
    swa_every: int = 0  # > 0: add the weights to a running mean every this many steps ...
    swa_start_lr_scale: float = 0.2  # ... once the lr scale is below this
    swa_apply: bool = False  # end with the SWA mean (else EMA when on, else the live weights)
    late_qat_threshold: float = 0.0  # > 0: fake-quantize block matrices once lr scale < this (#549 era: 0.15)
    qat_bits: int = 6
    resume_every: int = 0  # steps between resumable checkpoints; 0: off
    resume_dir: str = "artifacts/.checkpoints/train"  # outside the stage output, so a killed run resumes
    import_from: str = ""  # a torch state dict trained elsewhere (baseline final_model.pt): no training
    compile: bool = True
    # tok_emb as a bf16 parameter (GPT.store_embedding_in_bf16), as the baseline and R1 on GPU; on
    # CPU, which trains without autocast, the embedding stays fp32.
    bf16_embedding: bool = True
    # R1's fused Triton kernels (pgolf.kernels), used where the device runs Triton (CUDA); the same
    # math as the eager loss and MLP, which CPU runs, eval, calibration and TTT keep.
    fused_cross_entropy: bool = False
    fused_mlp: bool = False
    log_every: int = 200
    # > 0: val_loss and val_bpb every this many steps (and at the last), scored as the eval stage
    # scores (flat windows of train_seq_len, the same byte counting) on the live weights, into
    # val_log.json, the val bpb plot; the seconds it takes are kept off the wallclock cap, as the
    # baseline keeps its validation off it. 0: off (R1).
    val_every: int = 0
    val_tokens: int = 0  # the first this many val tokens (0: the whole val split)
    # A run whose loss at this step is still within learn_margin nats of ln(vocab_size), the loss of
    # a uniform guess, is not learning (a learning rate far too high or too low, broken data): it
    # stops there with an error instead of writing an untrained model. 0: no check.
    learn_check_step: int = 50
    learn_margin: float = 0.05

    def validate(self) -> None:
        check_range(self, "nproc nnodes iterations train_batch_tokens train_seq_len muon_backend_steps log_every", ge=1)
        check_range(self, "iterations", le=MAX_ITERATIONS)
        check_range(self, "seed grad_accum_steps warmup_steps warmdown_iters muon_momentum_warmup_steps swa_every "
                    "resume_every learn_check_step val_every val_tokens", ge=0)
        check_range(self, "max_wallclock_seconds gptq_reserve_seconds matrix_lr scalar_lr tied_embed_lr embed_lr "
                    "head_lr muon_wd embed_wd adam_wd grad_clip_norm learn_margin", ge=0)
        check_range(self, "muon_momentum muon_momentum_warmup_start beta1 beta2 ema_decay", ge=0, lt=1)
        check_range(self, "swa_start_lr_scale late_qat_threshold", ge=0, le=1)
        check_range(self, "adam_eps", gt=0)
        check_range(self, "qat_bits", ge=2, le=8)
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device {self.device!r} must be auto, cpu or cuda")
        if self.loader not in ("stream", "documents"):
            raise ValueError(f"loader {self.loader!r} must be 'stream' or 'documents'")
        if self.flat_batches and not (self.model.doc_attention and self.model.doc_attention_max_len > 0):
            raise ValueError("flat_batches needs model.doc_attention with doc_attention_max_len > 0: a flat row "
                             "would otherwise attend across all of a rank's tokens")
        if self.muon_coefficients not in MUON_COEFFICIENTS:
            raise ValueError(f"muon_coefficients {self.muon_coefficients!r} must be one of {sorted(MUON_COEFFICIENTS)}")
        check_range(self, "warmdown_frac min_lr", ge=0, le=1)
        if self.max_wallclock_seconds and self.gptq_reserve_seconds >= self.max_wallclock_seconds:
            raise ValueError("gptq_reserve_seconds must be smaller than max_wallclock_seconds")
        accum = self.resolved_grad_accum()
        if self.train_batch_tokens % (self.ranks() * accum * self.train_seq_len):
            raise ValueError(f"train_batch_tokens {self.train_batch_tokens} must be a multiple of ranks (nproc x "
                             f"nnodes) x grad_accum_steps x train_seq_len = {self.ranks()} x {accum} x {self.train_seq_len}")

    def ranks(self) -> int:
        return self.nproc * self.nnodes

    def resolved_grad_accum(self) -> int:
        return self.grad_accum_steps or max(1, 8 // self.ranks())
