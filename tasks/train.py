"""Stage train: the baseline GPT with Muon + Adam on train.nproc ranks per node, train.nnodes nodes.

One process trains in the stage's own process; more are launched by tasks.ranks under torchrun
(this module with --worker), and rank 0 writes the weights, the log and the metrics into the output.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from pgolf import checkpoint, dist
from pgolf.data.loader import DistributedTokenLoader, DocumentPackingLoader
from pgolf.data.shards import check_vocab, load_split, verify_shards
from pgolf.errors import FormatError, TrainingError
from pgolf.evaluate.bpb import bytes_per_position, evaluate_bpb, truncate_val
from pgolf.model.config import ModelConfig
from pgolf.model.gpt import GPT, param_groups
from pgolf.model.io import import_state_dict, save_model
from pgolf.optim.ema import EMA
from pgolf.optim.swa import SWA
from pgolf.optim.muon import COEFFICIENTS, Muon, ShardedMuon
from pgolf.optim.schedule import lr_multiplier, muon_momentum, training_fraction, warmdown_multiplier
from pgolf.params import check_range, from_dict
from pgolf.progress import Progress
from pgolf.tokenize.bytes import build_byte_luts, load_tokenizer, load_val_byte_sidecar
from tasks.common import StageSpec, record_timings, stage_main, write_json
from tasks.ranks import run_on_ranks, worker_main


@dataclass
class Config:
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
    checkpoint_every: int = 0  # steps between resumable checkpoints; 0: off
    checkpoint_dir: str = "artifacts/.checkpoints/train"  # outside the stage output, so a killed run resumes
    import_checkpoint: str = ""  # a torch state dict trained elsewhere (baseline final_model.pt): no training
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
        check_range(self, "seed grad_accum_steps warmup_steps warmdown_iters muon_momentum_warmup_steps swa_every "
                    "checkpoint_every learn_check_step val_every val_tokens", ge=0)
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
        if self.muon_coefficients not in COEFFICIENTS:
            raise ValueError(f"muon_coefficients {self.muon_coefficients!r} must be one of {sorted(COEFFICIENTS)}")
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


def run(cfg: Config, inputs: dict[str, Path], out: Path) -> dict:
    check_vocab(inputs["shards"], cfg.model.vocab_size)
    if not cfg.import_checkpoint:
        verify_shards(inputs["shards"], ("train", "val", "val_bytes") if cfg.val_every else ("train",))
    if cfg.import_checkpoint:
        resolved = resolved_config(cfg)
        model, dtypes = import_state_dict(cfg.import_checkpoint, cfg.model)
        save_model(model, cfg.model, out,
                   extra_config={**{k: v for k, v in resolved.items() if k != "model"}, "source_dtypes": dtypes})
        metrics = {"steps": 0, "imported_from": cfg.import_checkpoint}
        write_json(out / "metrics.json", metrics)
        return metrics
    run_on_ranks(SPEC, cfg, inputs, out, train_rank)
    return json.loads((out / "metrics.json").read_text())


def resolved_config(cfg: Config) -> dict:
    """What config.json records beside the weights: only what determines them (the code's commit and
    the host go to the run record)."""
    return {"model": asdict(cfg.model), "train": asdict(cfg)}


def train_rank(cfg: Config, inputs: dict[str, Path], out: Path) -> dict:
    """This rank's share of the training run (all of it on one process)."""
    return train_in_process(cfg, inputs["shards"], out, resolved_config(cfg), tokenizer=inputs.get("tokenizer"))


def build_optimizers(model: GPT, cfg: Config, fused: bool):
    groups = param_groups(model)
    muon_cls = ShardedMuon if cfg.muon_sharded else Muon
    muon = muon_cls([p for _, p in groups["matrix"]], lr=cfg.matrix_lr, momentum=cfg.muon_momentum,
                backend_steps=cfg.muon_backend_steps, coefficients=cfg.muon_coefficients,
                row_normalize=cfg.muon_row_normalize, weight_decay=cfg.muon_wd, compiled=cfg.compile,
                bf16=cfg.muon_bf16)
    adam_groups = [
        {"params": [p for _, p in groups["embed"]],
         "lr": cfg.tied_embed_lr if cfg.model.tie_embeddings else cfg.embed_lr, "weight_decay": cfg.embed_wd},
        {"params": [p for _, p in groups["scalar"]], "lr": cfg.scalar_lr, "weight_decay": cfg.adam_wd},
    ]
    if groups["head"]:
        adam_groups.append({"params": [p for _, p in groups["head"]], "lr": cfg.head_lr, "weight_decay": 0.0})
    # AdamW: decoupled decay, as the record lineage; with zero decay it is the baseline's Adam.
    adam = torch.optim.AdamW(adam_groups, betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps, fused=fused)
    optimizers = [muon, adam]
    for opt in optimizers:
        for group in opt.param_groups:
            group["base_lr"] = group["lr"]
    return optimizers


def learning_rates(cfg: Config) -> str:
    embed_lr = cfg.tied_embed_lr if cfg.model.tie_embeddings else cfg.embed_lr
    return (f"matrix_lr={cfg.matrix_lr:g}, scalar_lr={cfg.scalar_lr:g}, "
            f"{'tied_embed_lr' if cfg.model.tie_embeddings else 'embed_lr'}={embed_lr:g}")


def check_finite(nonfinite: torch.Tensor, step: int, cfg: Config) -> None:
    if bool(nonfinite):
        raise TrainingError(f"train loss became non-finite at or before step {step}: the run diverged. Likely cause: "
                            f"learning rates too high ({learning_rates(cfg)}) or no gradient clipping "
                            f"(grad_clip_norm={cfg.grad_clip_norm:g}); lower them")


def check_learning(loss: float, step: int, cfg: Config) -> None:
    """A model that still guesses uniformly after the warm-up would be trained, quantized and scored
    for nothing; no value is non-finite, so only the loss itself shows it."""
    uniform = math.log(cfg.model.vocab_size)
    if loss > uniform - cfg.learn_margin:
        raise TrainingError(f"train loss {loss:.4f} at step {step} is still within learn_margin={cfg.learn_margin:g} "
                            f"of ln(vocab_size) = {uniform:.4f}, the loss of a uniform guess: the model is not "
                            f"learning. Likely cause: learning rates far too high or zero ({learning_rates(cfg)}), "
                            "or training data without structure; learn_check_step=0 turns this check off")


def remaining_seconds(step: int, elapsed_ms: float, iterations: int, cap_ms: float | None) -> float:
    """Until the run ends at the pace so far: at `iterations`, or sooner at the wallclock cap."""
    seconds = (iterations - step) * elapsed_ms / max(step, 1) / 1000.0
    return seconds if cap_ms is None else min(seconds, max(cap_ms - elapsed_ms, 0.0) / 1000.0)


class HostPace:
    """Keeps the host at most one step ahead of the GPU without waiting for the step it queued.

    A per-step synchronize (or .item()) leaves the GPU idle while the host loads the next batch
    and launches its first kernels; the baseline script avoids it on one GPU. Here the host waits
    only for the previous step, so loading and launching overlap the current one, and reads the
    loss only at log steps. The wallclock cap is voted on by all ranks in the background and the
    vote read one step later: every rank still stops on the same step, one step after the cap.
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        self.previous_step_done: torch.cuda.Event | None = None
        self.pending_vote: torch.Tensor | None = None

    def step_queued(self) -> None:
        if not self.cuda:
            return
        done = torch.cuda.Event()
        done.record()
        if self.previous_step_done is not None:
            self.previous_step_done.synchronize()
        self.previous_step_done = done

    def stop_vote(self, over_cap: bool) -> bool:
        """True on every rank once any rank's clock has passed the cap."""
        if not dist.collective():
            return over_cap
        previous, self.pending_vote = self.pending_vote, dist.queue_max_vote(over_cap, self.device)
        return previous is not None and bool(previous.item())


class Trainer:
    """One training process; all ranks run the same steps and stop together."""

    def __init__(self, cfg: Config, shards: Path, out: Path, tokenizer: Path | None = None):
        self.cfg, self.shards, self.out = cfg, shards, out
        self.device = dist.resolve_device(cfg.device)
        dist.init(self.device)
        self.rank, self.world = dist.rank(), dist.world_size()
        torch.manual_seed(cfg.seed)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.model = GPT(cfg.model).to(self.device)
        if cfg.bf16_embedding and self.device.type == "cuda":
            self.model.store_embedding_in_bf16()
        self.model.set_fused_kernels(cfg.fused_cross_entropy, cfg.fused_mlp)
        self.train_model = torch.compile(self.model, dynamic=False) if cfg.compile and self.device.type == "cuda" else self.model
        self.optimizers = build_optimizers(self.model, cfg, fused=self.device.type == "cuda")
        self.adam_params = [p for group in self.optimizers[1].param_groups for p in group["params"]]
        self.accum = cfg.resolved_grad_accum()
        self.loader = self.new_loader()
        self.ema = EMA(self.model, cfg.ema_decay) if cfg.ema_decay > 0 else None
        self.swa = SWA(self.model) if cfg.swa_every > 0 else None
        self.model.set_looping(cfg.model.num_loops > 0 and cfg.model.enable_looping_at <= 0)
        self.val = self.load_val(tokenizer) if cfg.val_every else None

    def load_val(self, tokenizer: Path | None) -> tuple:
        """The val tokens (capped at val_tokens) and each target's bytes, as the eval stage counts them."""
        cfg = self.cfg
        if tokenizer is None:
            raise FormatError("train.val_every > 0 needs the tokenizer (input 'tokenizer') to count val bytes", self.shards)
        tokens = load_split(self.shards, "val", cfg.model.vocab_size)
        tokens = truncate_val(tokens[:cfg.val_tokens + 1] if cfg.val_tokens else tokens, cfg.train_seq_len)
        sidecar = load_val_byte_sidecar(self.shards)
        luts = None if sidecar is not None else build_byte_luts(load_tokenizer(tokenizer)[0], cfg.model.vocab_size)
        return tokens, bytes_per_position(tokens, luts, sidecar)

    def validate(self, step: int) -> dict:
        """val_loss and val_bpb of the live weights; every rank scores its share of the windows."""
        tokens, byte_counts = self.val
        rows = max(1, self.cfg.train_batch_tokens // (self.world * self.accum * self.cfg.train_seq_len))
        result = evaluate_bpb(self.model, tokens, byte_counts, self.cfg.train_seq_len, 0, rows, self.device)
        self.model.train()
        return {"step": step, "val_loss": round(result.val_loss, 6), "val_bpb": round(result.val_bpb, 6),
                "tokens": result.tokens, "bytes": result.bytes}

    def new_loader(self) -> DistributedTokenLoader | DocumentPackingLoader:
        if self.cfg.loader == "documents":
            return DocumentPackingLoader(self.shards, self.rank, self.world, self.device, self.cfg.model.vocab_size,
                                         self.cfg.model.bos_id, self.cfg.flat_batches)
        return DistributedTokenLoader(self.shards, self.rank, self.world, self.device, self.cfg.model.vocab_size,
                                      self.cfg.flat_batches)

    def step(self, step: int, lr_scale: float) -> torch.Tensor:
        """One optimizer step; returns this rank's mean loss as a device tensor (no host sync)."""
        cfg = self.cfg
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.device)
        for _ in range(self.accum):
            x, y = self.loader.next_batch(cfg.train_batch_tokens, cfg.train_seq_len, self.accum)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
                loss = self.train_model(x, y)
            (loss / self.accum).backward()
            total += loss.detach()
        if cfg.grad_clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip_norm)
        # Sharded Muon averages its own gradients (reduce-scatter); everything else is all-reduced.
        averaged = self.adam_params if cfg.muon_sharded else list(self.model.parameters())
        dist.average_gradients(averaged)
        momentum = muon_momentum(step, cfg.muon_momentum_warmup_start, cfg.muon_momentum, cfg.muon_momentum_warmup_steps)
        self.optimizers[0].param_groups[0]["momentum"] = momentum
        for opt in self.optimizers:
            for group in opt.param_groups:
                group["lr"] = group["base_lr"] * lr_scale
        for opt in self.optimizers:
            opt.step()
        if self.ema is not None:
            self.ema.update(self.model)
        return total / self.accum

    def learning_rates(self) -> dict[str, float]:
        """The scheduled lr of Muon's matrices and Adam's embedding, the groups the schedules move."""
        muon, adam = self.optimizers
        return {"lr_matrix": round(muon.param_groups[0]["lr"], 8), "lr_embed": round(adam.param_groups[0]["lr"], 8)}

    def host_loss(self, rank_loss: torch.Tensor) -> float:
        """The mean over ranks of a step's loss, read on the host (a sync: only at log steps)."""
        mean = rank_loss.clone()
        if self.world > 1:
            torch.distributed.all_reduce(mean, op=torch.distributed.ReduceOp.SUM)  # gloo has no AVG
            mean /= self.world
        return float(mean.item())

    def warmup(self) -> None:
        """Run `warmup_steps` real steps so compilation and allocator warm-up happen outside the
        timer, then roll the weights, optimizer state and data back to the start."""
        if self.cfg.warmup_steps <= 0:
            return
        model_state = copy.deepcopy(self.model.state_dict())
        opt_states = [copy.deepcopy(opt.state_dict()) for opt in self.optimizers]
        looping_at_start = self.model.looping
        # Both graphs of a looped model get compiled here, not inside the timed run.
        for looping in sorted({looping_at_start, bool(self.cfg.model.num_loops)}):
            self.model.set_looping(looping)
            for step in range(self.cfg.warmup_steps):
                self.step(step, 1.0)
        self.model.set_looping(looping_at_start)
        self.model.load_state_dict(model_state)
        for opt, state in zip(self.optimizers, opt_states):
            opt.load_state_dict(state)
        self.loader = self.new_loader()
        self.sync()

    def checkpoint_folder(self) -> Path:
        """One folder per (config, data): a resumed run must be the same run."""
        manifest = (self.shards / "manifest.json").read_bytes() if (self.shards / "manifest.json").is_file() else b""
        key = hashlib.sha256(json.dumps(asdict(self.cfg), sort_keys=True).encode() + manifest).hexdigest()[:16]
        return Path(self.cfg.checkpoint_dir) / key

    def save_checkpoint(self, progress: dict) -> None:
        folder = self.checkpoint_folder()
        state = {
            **progress,
            "model": self.model.state_dict(),
            "optimizers": [opt.state_dict() for opt in self.optimizers],
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "swa": self.swa.state_dict() if self.swa is not None else None,
            "loader": (self.loader.stream.file_index, self.loader.stream.pos),
        }
        checkpoint.save_rank_state(folder, self.rank, state)
        if self.world > 1:
            torch.distributed.barrier()
        if dist.is_main():
            checkpoint.mark_complete(folder, progress["step"], self.world)

    def load_checkpoint(self) -> dict | None:
        folder = self.checkpoint_folder()
        step = checkpoint.latest_step(folder, self.world) if self.cfg.checkpoint_every else None
        if step is None:
            return None
        state = checkpoint.load_rank_state(folder, self.rank, self.device)
        self.model.load_state_dict(state["model"])
        for opt, opt_state in zip(self.optimizers, state["optimizers"]):
            opt.load_state_dict(opt_state)
        if self.ema is not None and state["ema"] is not None:
            self.ema.load_state_dict(state["ema"])
        if self.swa is not None and state["swa"] is not None:
            self.swa.load_state_dict(state["swa"])
        self.loader.stream.seek(*state["loader"])
        self.model.set_looping(state["looping"])
        self.model.set_qat(self.cfg.qat_bits if state["qat"] else 0)
        print(f"resumed from {folder} at step {state['step']}", flush=True)
        return state

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def train(self, stop_after: int | None = None) -> dict | None:
        """Train to `iterations` or the wallclock cap. `stop_after` ends the run early without
        cleaning up, the way a killed process would (tests resume from there)."""
        cfg = self.cfg
        self.warmup()
        cap_ms = (cfg.max_wallclock_seconds - cfg.gptq_reserve_seconds) * 1000.0 if cfg.max_wallclock_seconds > 0 else None
        elapsed_ms, step, loss = 0.0, 0, float("nan")
        looping_step = 0 if self.model.looping else None
        qat_on = False
        records: list[dict] = []
        val_records: list[dict] = []
        resumed = self.load_checkpoint()
        if resumed:
            step, elapsed_ms, looping_step, qat_on, records = (resumed["step"], resumed["elapsed_ms"],
                                                               resumed["looping_step"], resumed["qat"], resumed["log"])
            val_records = resumed.get("val_log", [])
        log = open(self.out / "train_log.jsonl", "w") if dist.is_main() else None
        if log:
            log.writelines(json.dumps(r, allow_nan=False) + "\n" for r in records)
        live = self.open_live()
        tokens_per_step = cfg.train_batch_tokens
        nonfinite = torch.zeros((), dtype=torch.bool, device=self.device)
        rank_loss = None
        pace = HostPace(self.device)
        progress = Progress("train steps", cfg.iterations, done=step)
        self.sync()
        t0 = time.perf_counter() - elapsed_ms / 1000.0
        while step < cfg.iterations:
            if stop_after is not None and step >= stop_after:
                progress.close()
                return None
            frac = training_fraction(step, elapsed_ms, cfg.iterations, cap_ms)
            if cfg.warmdown_frac > 0:
                lr_scale = warmdown_multiplier(frac, cfg.warmdown_frac, cfg.min_lr)
            else:
                lr_scale = lr_multiplier(step, elapsed_ms, cfg.iterations, cfg.warmdown_iters, cap_ms)
            if looping_step is None and cfg.model.num_loops and frac >= cfg.model.enable_looping_at:
                self.model.set_looping(True)
                looping_step = step
            if not qat_on and cfg.late_qat_threshold > 0 and lr_scale < cfg.late_qat_threshold:
                self.model.set_qat(cfg.qat_bits)
                qat_on = True
            rank_loss = self.step(step, lr_scale)
            step += 1
            nonfinite = nonfinite | ~torch.isfinite(rank_loss)
            pace.step_queued()
            elapsed_ms = (time.perf_counter() - t0) * 1000.0
            if self.swa is not None and lr_scale < cfg.swa_start_lr_scale and step % cfg.swa_every == 0:
                self.swa.add(self.model)
            log_step = step % cfg.log_every == 0 or step == 1 or step == cfg.iterations
            learn_check_step = step == cfg.learn_check_step
            if log_step or learn_check_step:
                loss = self.host_loss(rank_loss)
                check_finite(nonfinite, step, cfg)
            if learn_check_step:
                check_learning(loss, step, cfg)
            if log and log_step:
                record = {"step": step, "train_loss": round(loss, 6), "lr_scale": round(lr_scale, 6),
                          **self.learning_rates(), "tokens": step * tokens_per_step}
                records.append(record)
                log.write(json.dumps(record, allow_nan=False) + "\n")
                log.flush()
                print(f"step {step}/{cfg.iterations} loss {loss:.4f} lr_scale {lr_scale:.3f} "
                      f"{elapsed_ms / step:.1f} ms/step", flush=True)
                if live:
                    live.step = step
                    live.log_metric("train_loss", loss)
                    live.log_metric("lr_scale", lr_scale)
                    for name, value in self.learning_rates().items():
                        live.log_metric(f"lr/{name.removeprefix('lr_')}", value)
                    live.next_step()
            if cfg.val_every and (step % cfg.val_every == 0 or step == cfg.iterations):
                self.sync()
                val_started = time.perf_counter()
                val_records.append(self.validate(step))
                if dist.is_main():
                    write_json(self.out / VAL_LOG_NAME, val_records)
                    print(f"step {step}/{cfg.iterations} val_loss {val_records[-1]['val_loss']:.4f} "
                          f"val_bpb {val_records[-1]['val_bpb']:.4f}", flush=True)
                t0 += time.perf_counter() - val_started
            progress.update(1, f"loss {loss:.4f}, {step * tokens_per_step / max(elapsed_ms, 1e-9) * 1000:,.0f} tokens/s",
                            remaining_seconds(step, elapsed_ms, cfg.iterations, cap_ms))
            if pace.stop_vote(cap_ms is not None and elapsed_ms >= cap_ms):
                break
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.iterations:
                self.save_checkpoint({"step": step, "elapsed_ms": elapsed_ms, "looping_step": looping_step,
                                      "looping": self.model.looping, "qat": qat_on, "log": records,
                                      "val_log": val_records})
        progress.close()
        self.sync()
        elapsed_ms = (time.perf_counter() - t0) * 1000.0
        loss = self.host_loss(rank_loss) if rank_loss is not None else loss
        check_finite(nonfinite, step, cfg)
        seconds = elapsed_ms / 1000.0
        if dist.is_main():
            # How the run went, not what it learned: the run record, so metrics.json and the weights
            # are the same bytes for every run of the same config (a resumed one included).
            record_timings(self.out, train_seconds=round(seconds, 3), ms_per_step=round(elapsed_ms / max(step, 1), 3),
                           tokens_per_s=round(step * tokens_per_step / max(seconds, 1e-9), 1),
                           peak_mem_bytes=self.peak_memory(), resumed_from_step=resumed["step"] if resumed else None,
                           torch=torch.__version__)
        metrics = {
            "steps": step,
            "final_train_loss": round(loss, 6),
            "world_size": self.world,
            "device": self.device.type,
            "looping_enabled_at_step": looping_step,
            # What ran, not what was asked: the kernels need a device that runs Triton.
            "fused_cross_entropy": self.model.fused_cross_entropy,
            "fused_mlp": any(getattr(m, "fused", False) for m in self.model.modules()),
            "embedding_dtype": str(self.model.tok_emb.weight.dtype).removeprefix("torch."),
        }
        if cfg.checkpoint_every:
            if self.world > 1:
                torch.distributed.barrier()
            if dist.is_main():
                checkpoint.remove(self.checkpoint_folder())
        metrics["swa_snapshots"] = self.swa.count if self.swa is not None else 0
        if self.swa is not None and cfg.swa_apply:
            self.swa.copy_to(self.model)
        elif self.ema is not None:
            self.ema.copy_to(self.model)
        if log:
            log.close()
        if live:
            live.end()
        return metrics

    def open_live(self):
        if not dist.is_main():
            return None
        try:
            from dvclive import Live
        except ImportError:  # an exported train_gpt.py runs without DVC installed
            return None

        # Inside `dvc repro` DVCLive would otherwise try to register an experiment and rewrite
        # dvc.yaml; here it only writes its metrics and plots into the stage output.
        return Live(str(self.out / "dvclive"), save_dvc_exp=False, dvcyaml=None, report=None, monitor_system=False)

    def peak_memory(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def train_in_process(cfg: Config, shards: Path, out: Path, resolved: dict, keep_group: bool = False,
                     tokenizer: Path | None = None) -> dict:
    """This process's share of a (torchrun) training run; rank 0 writes the weights and metrics.
    `keep_group`: stay in the process group for the stages that follow in the same processes."""
    trainer = Trainer(cfg, shards, out, tokenizer)
    metrics = trainer.train()
    if dist.is_main():
        save_model(trainer.model, cfg.model, out, extra_config={k: v for k, v in resolved.items() if k != "model"})
        write_json(out / "metrics.json", metrics)
    if not keep_group:
        dist.shutdown()
    return metrics


# DVC deps cannot depend on a param, so the val shards and the tokenizer that val_every reads are
# deps always. That reruns nothing extra: both come from the stages that write the train shards
# (val_docs and the tokenizer change them too), so any change to them changes a train dep anyway.
SPEC = StageSpec(name="train", config_cls=Config, run=run, out="artifacts/train",
                 inputs={"shards": "artifacts/shards", "tokenizer": "artifacts/tokenizer"},
                 producers={"shards": "shards", "tokenizer": "tokenizer"}, optional_inputs=("tokenizer",),
                 input_parts={"shards": ("train", "val", "manifest.json")})
VAL_LOG_NAME = "val_log.json"

if __name__ == "__main__":
    if "--worker" in sys.argv[1:]:
        sys.exit(worker_main(SPEC, train_rank, sys.argv[1:]))
    sys.exit(stage_main(SPEC))
