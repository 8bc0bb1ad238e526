"""Stage train: the baseline GPT with Muon + Adam under torchrun (train.nproc processes).

The stage process writes the resolved config, then launches torchrun; the workers (this module
with --worker) train and rank 0 writes the weights, the log and the metrics into the output.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from pgolf import checkpoint, dist
from pgolf.data.loader import DistributedTokenLoader, DocumentPackingLoader
from pgolf.data.shards import check_vocab
from pgolf.model.config import ModelConfig
from pgolf.model.gpt import GPT, param_groups
from pgolf.model.io import import_state_dict, save_model
from pgolf.optim.ema import EMA
from pgolf.optim.swa import SWA
from pgolf.optim.muon import COEFFICIENTS, Muon, ShardedMuon
from pgolf.optim.schedule import lr_multiplier, muon_momentum, training_fraction, warmdown_multiplier
from pgolf.params import from_dict
from tasks.common import StageSpec, stage_main, write_json


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    seed: int = 1337
    nproc: int = 1
    device: str = "auto"
    iterations: int = 20000
    train_batch_tokens: int = 524288
    train_seq_len: int = 1024
    grad_accum_steps: int = 0  # 0: 8 // nproc, the baseline's choice for 8 GPUs' worth of micro-batches
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

    def validate(self) -> None:
        if self.nproc < 1:
            raise ValueError("nproc must be >= 1")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device {self.device!r} must be auto, cpu or cuda")
        if self.loader not in ("stream", "documents"):
            raise ValueError(f"loader {self.loader!r} must be 'stream' or 'documents'")
        if self.flat_batches and not (self.model.doc_attention and self.model.doc_attention_max_len > 0):
            raise ValueError("flat_batches needs model.doc_attention with doc_attention_max_len > 0: a flat row "
                             "would otherwise attend across all of a rank's tokens")
        if self.muon_coefficients not in COEFFICIENTS:
            raise ValueError(f"muon_coefficients {self.muon_coefficients!r} must be one of {sorted(COEFFICIENTS)}")
        if not 0 <= self.warmdown_frac <= 1 or not 0 <= self.min_lr <= 1:
            raise ValueError("warmdown_frac and min_lr must be in [0, 1]")
        if self.max_wallclock_seconds and self.gptq_reserve_seconds >= self.max_wallclock_seconds:
            raise ValueError("gptq_reserve_seconds must be smaller than max_wallclock_seconds")
        accum = self.resolved_grad_accum()
        if self.train_batch_tokens % (self.nproc * accum * self.train_seq_len):
            raise ValueError(f"train_batch_tokens {self.train_batch_tokens} must be a multiple of nproc x "
                             f"grad_accum_steps x train_seq_len = {self.nproc} x {accum} x {self.train_seq_len}")

    def resolved_grad_accum(self) -> int:
        return self.grad_accum_steps or max(1, 8 // self.nproc)


def run(cfg: Config, inputs: dict[str, Path], out: Path) -> dict:
    check_vocab(inputs["shards"], cfg.model.vocab_size)
    resolved = {"model": asdict(cfg.model), "train": asdict(cfg), "code_version": code_version(), "torch": torch.__version__}
    if cfg.import_checkpoint:
        model, dtypes = import_state_dict(cfg.import_checkpoint, cfg.model)
        save_model(model, cfg.model, out,
                   extra_config={**{k: v for k, v in resolved.items() if k != "model"}, "source_dtypes": dtypes})
        metrics = {"steps": 0, "imported_from": str(Path(cfg.import_checkpoint).resolve())}
        write_json(out / "metrics.json", metrics)
        return metrics
    write_json(out / "config.json", resolved)
    dist.launch("tasks.train", ["--worker", "--out", str(out), "--shards", str(inputs["shards"])], cfg.nproc)
    return json.loads((out / "metrics.json").read_text())


def code_version() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


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


def check_finite(nonfinite: torch.Tensor, step: int) -> None:
    if bool(nonfinite):
        raise FloatingPointError(f"train loss became non-finite at or before step {step}")


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

    def __init__(self, cfg: Config, shards: Path, out: Path):
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
        resumed = self.load_checkpoint()
        if resumed:
            step, elapsed_ms, looping_step, qat_on, records = (resumed["step"], resumed["elapsed_ms"],
                                                               resumed["looping_step"], resumed["qat"], resumed["log"])
        log = open(self.out / "train_log.jsonl", "w") if dist.is_main() else None
        if log:
            log.writelines(json.dumps(r) + "\n" for r in records)
        live = self.open_live()
        tokens_per_step = cfg.train_batch_tokens
        nonfinite = torch.zeros((), dtype=torch.bool, device=self.device)
        rank_loss = None
        pace = HostPace(self.device)
        self.sync()
        t0 = time.perf_counter() - elapsed_ms / 1000.0
        while step < cfg.iterations:
            if stop_after is not None and step >= stop_after:
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
            if log_step:
                loss = self.host_loss(rank_loss)
                check_finite(nonfinite, step)
            if log and log_step:
                record = {"step": step, "train_loss": round(loss, 6), "lr_scale": round(lr_scale, 6),
                          "elapsed_ms": round(elapsed_ms, 1), "tokens": step * tokens_per_step}
                records.append(record)
                log.write(json.dumps(record) + "\n")
                log.flush()
                print(f"step {step}/{cfg.iterations} loss {loss:.4f} lr_scale {lr_scale:.3f} "
                      f"{elapsed_ms / step:.1f} ms/step", flush=True)
                if live:
                    live.step = step
                    live.log_metric("train_loss", loss)
                    live.log_metric("lr_scale", lr_scale)
                    live.next_step()
            if pace.stop_vote(cap_ms is not None and elapsed_ms >= cap_ms):
                break
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.iterations:
                self.save_checkpoint({"step": step, "elapsed_ms": elapsed_ms, "looping_step": looping_step,
                                      "looping": self.model.looping, "qat": qat_on, "log": records})
        self.sync()
        elapsed_ms = (time.perf_counter() - t0) * 1000.0
        loss = self.host_loss(rank_loss) if rank_loss is not None else loss
        check_finite(nonfinite, step)
        seconds = elapsed_ms / 1000.0
        metrics = {
            "steps": step,
            "final_train_loss": round(loss, 6),
            "train_seconds": round(seconds, 3),
            "ms_per_step": round(elapsed_ms / max(step, 1), 3),
            "tokens_per_s": round(step * tokens_per_step / max(seconds, 1e-9), 1),
            "peak_mem_bytes": self.peak_memory(),
            "world_size": self.world,
            "device": self.device.type,
            "looping_enabled_at_step": looping_step,
            "resumed_from_step": resumed["step"] if resumed else None,
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


def worker_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m tasks.train --worker")
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--out", required=True)
    parser.add_argument("--shards", required=True)
    args = parser.parse_args(argv)
    out = Path(args.out)
    resolved = json.loads((out / "config.json").read_text())
    cfg = from_dict(Config, resolved["train"], f"{out / 'config.json'}: train")
    train_in_process(cfg, Path(args.shards), out, resolved)
    return 0


def train_in_process(cfg: Config, shards: Path, out: Path, resolved: dict, keep_group: bool = False) -> dict:
    """This process's share of a (torchrun) training run; rank 0 writes the weights and metrics.
    `keep_group`: stay in the process group for the stages that follow in the same processes."""
    trainer = Trainer(cfg, shards, out)
    metrics = trainer.train()
    if dist.is_main():
        save_model(trainer.model, cfg.model, out, extra_config={k: v for k, v in resolved.items() if k != "model"})
        write_json(out / "metrics.json", metrics)
    if not keep_group:
        dist.shutdown()
    return metrics


SPEC = StageSpec(name="train", config_cls=Config, run=run, out="artifacts/train",
                 inputs={"shards": "artifacts/shards"}, producers={"shards": "shards"})

if __name__ == "__main__":
    if "--worker" in sys.argv[1:]:
        sys.exit(worker_main(sys.argv[1:]))
    sys.exit(stage_main(SPEC))
