"""The training loop every rank runs: Muon + AdamW steps over the loader's batches, the lr, momentum,
looping and QAT schedules, EMA/SWA, resume points, the learning checks and the logs.

The train stage (tasks/train.py) owns the config, the launch on ranks and the files it writes
beside the weights; this module reads the config by attribute and imports nothing from tasks/.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import torch

from pgolf import dist
from pgolf.data.loader import DistributedTokenLoader, DocumentPackingLoader
from pgolf.data.shards import load_split
from pgolf.errors import FormatError, StageInterrupted, TrainingError
from pgolf.evaluate.bpb import evaluate_bpb, truncate_val
from pgolf.json_files import write_json
from pgolf.model.gpt import GPT
from pgolf.optim.ema import EMA
from pgolf.optim.schedule import lr_multiplier, muon_momentum, training_fraction, warmdown_multiplier
from pgolf.optim.swa import SWA
from pgolf.progress import Progress
from pgolf.tokenize.token_bytes import load_tokenizer, val_byte_counts
from pgolf.train import resume
from pgolf.train.config import TrainConfig
from pgolf.train.optimizers import build_optimizers, learning_rates
from pgolf.typed_params import recorded_dict

VAL_LOG_NAME = "val_log.json"


def check_finite(nonfinite: torch.Tensor, step: int, cfg: TrainConfig) -> None:
    if bool(nonfinite):
        raise TrainingError(f"train loss became non-finite at or before step {step}: the run diverged. Likely cause: "
                            f"learning rates too high ({learning_rates(cfg)}) or no gradient clipping "
                            f"(grad_clip_norm={cfg.grad_clip_norm:g}); lower them")


def check_learning(loss: float, step: int, cfg: TrainConfig) -> None:
    """A model that still guesses uniformly after the warm-up would be trained, quantized and scored
    for nothing; no value is non-finite, so only the loss itself shows it."""
    uniform = math.log(cfg.model.vocab_size)
    if loss > uniform - cfg.learn_margin:
        raise TrainingError(f"train loss {loss:.4f} at step {step} is still within learn_margin={cfg.learn_margin:g} "
                            f"of ln(vocab_size) = {uniform:.4f}, the loss of a uniform guess: the model is not "
                            f"learning. Likely cause: learning rates far too high or zero ({learning_rates(cfg)}), "
                            "or training data without structure; learn_check_step=0 turns this check off")


def interrupted_message(step: int, cfg: TrainConfig, saved_step: int | None) -> str:
    """Ctrl-C's one line: where training stopped and what a rerun of the stage does."""
    where = f"interrupted at step {step} of {cfg.iterations}"
    if not cfg.resume_every:
        return f"{where}; a rerun restarts training (train.resume_every is 0: no resume points)"
    if saved_step is None:
        return f"{where}; a rerun restarts training (no resume point yet: one every {cfg.resume_every} steps)"
    return f"{where}; a rerun resumes from step {saved_step} (the last resume point, {cfg.resume_dir})"


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
        # On a process group the cap vote, read one step later (stop_vote), waits for the same
        # previous step: one wait per step there, not two.
        if not self.cuda or dist.collective():
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


def compile_for_training(model: torch.nn.Module, backend: str = "inductor") -> torch.nn.Module:
    """The train step's model under torch.compile, as R1 compiles it: static shapes, and fullgraph,
    so that a graph break is an error here instead of a silent fall back to eager for part of the
    forward. The varlen segments' length is marked dynamic (docmask.document_segments): one graph
    per looping state, whatever the batch's documents. `backend`: tests trace with aot_eager on CPU."""
    return torch.compile(model, dynamic=False, fullgraph=True, backend=backend)


@dataclass
class Run:
    """Where one call of Trainer.train stands: what a resume point saves and restores, the clock,
    the last loss read on the host, and rank 0's logs."""
    cap_ms: float | None  # the wallclock cap, less the reserve for GPTQ; None: steps alone end the run
    looping_step: int | None  # the step looping turned on at (0: on from the start)
    step: int = 0
    elapsed_ms: float = 0.0
    qat_on: bool = False
    records: list[dict] = field(default_factory=list)
    val_records: list[dict] = field(default_factory=list)
    resumed_from: int | None = None  # the step of the resume point this run started from
    saved_step: int | None = None  # the last resume point on disk, for the Ctrl-C message
    t0: float = 0.0  # perf_counter at step 0, moved forward past validation
    loss: float = float("nan")
    rank_loss: torch.Tensor | None = None
    nonfinite: torch.Tensor | None = None
    log: TextIO | None = None
    live: Any = None  # dvclive.Live on rank 0 when DVCLive is installed


class Trainer:
    """One training process; all ranks run the same steps and stop together. Under torchrun it runs
    inside the process group its caller owns (pgolf.dist.process_group; runner/ranks.py for the stage)."""

    def __init__(self, cfg: TrainConfig, shards: Path, out: Path, tokenizer: Path | None = None):
        """`cfg`: the train stage's Config (tasks/train.py); `out`: where rank 0 writes the logs."""
        self.cfg, self.shards, self.out = cfg, shards, out
        self.timings: dict = {}
        self.device = dist.resolve_device(cfg.device)
        self.rank, self.world = dist.rank(), dist.world_size()
        torch.manual_seed(cfg.seed)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.model = GPT(cfg.model).to(self.device)
        if cfg.bf16_embedding and self.device.type == "cuda":
            self.model.store_embedding_in_bf16()
        self.model.set_fused_kernels(cfg.fused_cross_entropy, cfg.fused_mlp)
        self.train_model = compile_for_training(self.model) if cfg.compile and self.device.type == "cuda" else self.model
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
        return tokens, val_byte_counts(tokens, load_tokenizer(tokenizer)[0], cfg.model.vocab_size, self.shards)

    def validate(self, step: int) -> dict:
        """val_loss and val_bpb of the live weights; every rank scores its share of the windows."""
        tokens, byte_counts = self.val
        rows = max(1, self.cfg.train_batch_tokens // (self.world * self.accum * self.cfg.train_seq_len))
        result = evaluate_bpb(self.model, tokens, byte_counts, self.cfg.train_seq_len, 0, rows, self.device)
        self.model.train()
        return {"step": step, "val_loss": round(result.val_loss, 6), "val_bpb": round(result.val_bpb, 6),
                "tokens": result.tokens, "bytes": result.bytes}

    def new_loader(self) -> DistributedTokenLoader | DocumentPackingLoader:
        # Batches come with the model's varlen segments (or None), built from the host's tokens.
        segmenter = self.model.document_cu_seqlens
        if self.cfg.loader == "documents":
            return DocumentPackingLoader(self.shards, self.rank, self.world, self.device, self.cfg.model.vocab_size,
                                         self.cfg.model.bos_id, self.cfg.flat_batches, segmenter)
        return DistributedTokenLoader(self.shards, self.rank, self.world, self.device, self.cfg.model.vocab_size,
                                      self.cfg.flat_batches, segmenter)

    def step(self, step: int, lr_scale: float) -> torch.Tensor:
        """One optimizer step; returns this rank's mean loss as a device tensor (no host sync)."""
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.device)
        for _ in range(self.accum):
            total += self.forward_backward(self.loader.next_batch(self.cfg.train_batch_tokens, self.cfg.train_seq_len,
                                                                  self.accum))
        self.optimizer_step(step, lr_scale)
        return total / self.accum

    def forward_backward(self, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """One micro-batch (inputs, targets, cu_seqlens or None): its loss, detached, its gradients
        accumulated."""
        x, y, cu_seqlens = batch
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            loss = self.train_model(x, y, cu_seqlens)
        (loss / self.accum).backward()
        return loss.detach()

    def optimizer_step(self, step: int, lr_scale: float) -> None:
        """Everything after the backward: clip, average, the schedules, both optimizers, EMA."""
        cfg = self.cfg
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

    def resume_folder(self) -> Path:
        """One folder per (config, data): a resumed run must be the same run."""
        manifest = (self.shards / "manifest.json").read_bytes() if (self.shards / "manifest.json").is_file() else b""
        key = hashlib.sha256(json.dumps(recorded_dict(self.cfg), sort_keys=True).encode() + manifest).hexdigest()[:16]
        return Path(self.cfg.resume_dir) / key

    def save_resume_point(self, progress: dict) -> None:
        folder = self.resume_folder()
        state = {
            **progress,
            "model": self.model.state_dict(),
            "optimizers": [opt.state_dict() for opt in self.optimizers],
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "swa": self.swa.state_dict() if self.swa is not None else None,
            "loader": (self.loader.stream.file_index, self.loader.stream.pos),
        }
        resume.save_rank_state(folder, self.rank, state)
        if self.world > 1:
            torch.distributed.barrier()
        if dist.is_main():
            resume.mark_complete(folder, progress["step"], self.world)

    def load_resume_point(self) -> dict | None:
        folder = self.resume_folder()
        step = resume.latest_step(folder, self.world) if self.cfg.resume_every else None
        if step is None:
            return None
        state = resume.load_rank_state(folder, self.rank, self.device)
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
        self.warmup()
        run = self.start_run()
        pace = HostPace(self.device)
        progress = Progress("train steps", self.cfg.iterations, done=run.step)
        self.sync()
        run.t0 = time.perf_counter() - run.elapsed_ms / 1000.0
        try:
            while run.step < self.cfg.iterations:
                if stop_after is not None and run.step >= stop_after:
                    progress.close()
                    return None
                lr_scale = self.schedule(run)
                self.take_step(run, lr_scale, pace)
                self.log_step(run, lr_scale)
                self.validate_if_due(run)
                progress.update(1, self.progress_note(run),
                                remaining_seconds(run.step, run.elapsed_ms, self.cfg.iterations, run.cap_ms))
                # Stop: every rank must leave on the same step, so the cap is a vote (HostPace).
                if pace.stop_vote(run.cap_ms is not None and run.elapsed_ms >= run.cap_ms):
                    break
                self.save_resume_point_if_due(run)
        except KeyboardInterrupt:
            raise StageInterrupted(interrupted_message(run.step, self.cfg, run.saved_step)) from None
        progress.close()
        return self.finish(run)

    def start_run(self) -> Run:
        """Resume: a rerun after a kill continues from the last resume point with its step, clock,
        schedule switches and logs, so it ends with the bytes an unbroken run would have."""
        cfg = self.cfg
        run = Run(cap_ms=(cfg.max_wallclock_seconds - cfg.gptq_reserve_seconds) * 1000.0
                  if cfg.max_wallclock_seconds > 0 else None,
                  looping_step=0 if self.model.looping else None)
        resumed = self.load_resume_point()
        if resumed:
            run.step, run.elapsed_ms, run.looping_step, run.qat_on, run.records = (
                resumed["step"], resumed["elapsed_ms"], resumed["looping_step"], resumed["qat"], resumed["log"])
            run.val_records = resumed.get("val_log", [])
            run.resumed_from = run.saved_step = resumed["step"]
        run.log = open(self.out / "train_log.jsonl", "w") if dist.is_main() else None
        if run.log:
            run.log.writelines(json.dumps(r, allow_nan=False) + "\n" for r in run.records)
        run.live = self.open_live()
        run.nonfinite = torch.zeros((), dtype=torch.bool, device=self.device)
        return run

    def schedule(self, run: Run) -> float:
        """Schedule: the lr scale of this step, and the one-way switches (looping, late QAT) that
        the same fraction of training, by steps or by the wallclock cap, turns on."""
        cfg = self.cfg
        frac = training_fraction(run.step, run.elapsed_ms, cfg.iterations, run.cap_ms)
        if cfg.warmdown_frac > 0:
            lr_scale = warmdown_multiplier(frac, cfg.warmdown_frac, cfg.min_lr)
        else:
            lr_scale = lr_multiplier(run.step, run.elapsed_ms, cfg.iterations, cfg.warmdown_iters, run.cap_ms)
        if run.looping_step is None and cfg.model.num_loops and frac >= cfg.model.enable_looping_at:
            self.model.set_looping(True)
            run.looping_step = run.step
        if not run.qat_on and cfg.late_qat_threshold > 0 and lr_scale < cfg.late_qat_threshold:
            self.model.set_qat(cfg.qat_bits)
            run.qat_on = True
        return lr_scale

    def take_step(self, run: Run, lr_scale: float, pace: HostPace) -> None:
        """Step: the loss stays on the device (a non-finite one is remembered there and checked at
        the next log step) so the host never waits for the step it just queued."""
        run.rank_loss = self.step(run.step, lr_scale)
        run.step += 1
        run.nonfinite = run.nonfinite | ~torch.isfinite(run.rank_loss)
        pace.step_queued()
        run.elapsed_ms = (time.perf_counter() - run.t0) * 1000.0
        if self.swa is not None and lr_scale < self.cfg.swa_start_lr_scale and run.step % self.cfg.swa_every == 0:
            self.swa.add(self.model)

    def log_step(self, run: Run, lr_scale: float) -> None:
        """Log: the loss is read on the host (a sync) only at log steps and the learning check."""
        cfg, step = self.cfg, run.step
        log_step = step % cfg.log_every == 0 or step == 1 or step == cfg.iterations
        learn_check_step = step == cfg.learn_check_step
        if log_step or learn_check_step:
            run.loss = self.host_loss(run.rank_loss)
            check_finite(run.nonfinite, step, cfg)
        if learn_check_step:
            check_learning(run.loss, step, cfg)
        if not (run.log and log_step):
            return
        record = {"step": step, "train_loss": round(run.loss, 6), "lr_scale": round(lr_scale, 6),
                  **self.learning_rates(), "tokens": step * cfg.train_batch_tokens}
        run.records.append(record)
        run.log.write(json.dumps(record, allow_nan=False) + "\n")
        run.log.flush()
        print(f"step {step}/{cfg.iterations} loss {run.loss:.4f} lr_scale {lr_scale:.3f} "
              f"{run.elapsed_ms / step:.1f} ms/step", flush=True)
        if run.live:
            run.live.step = step
            run.live.log_metric("train_loss", run.loss)
            run.live.log_metric("lr_scale", lr_scale)
            for name, value in self.learning_rates().items():
                run.live.log_metric(f"lr/{name.removeprefix('lr_')}", value)
            run.live.next_step()

    def progress_note(self, run: Run) -> str:
        tokens_per_s = run.step * self.cfg.train_batch_tokens / max(run.elapsed_ms, 1e-9) * 1000
        return f"loss {run.loss:.4f}, {tokens_per_s:,.0f} tokens/s"

    def validate_if_due(self, run: Run) -> None:
        """Validation, when due, is off the clock: t0 moves forward by its time, so val_every
        changes neither the wallclock cap's step nor the schedules."""
        cfg, step = self.cfg, run.step
        if not (cfg.val_every and (step % cfg.val_every == 0 or step == cfg.iterations)):
            return
        self.sync()
        val_started = time.perf_counter()
        run.val_records.append(self.validate(step))
        if dist.is_main():
            write_json(self.out / VAL_LOG_NAME, run.val_records)
            print(f"step {step}/{cfg.iterations} val_loss {run.val_records[-1]['val_loss']:.4f} "
                  f"val_bpb {run.val_records[-1]['val_bpb']:.4f}", flush=True)
        run.t0 += time.perf_counter() - val_started

    def save_resume_point_if_due(self, run: Run) -> None:
        """Checkpoint: every resume_every steps, all a rerun needs to continue this run exactly
        (start_run reads it back); none after the last step, which finish writes as the weights."""
        cfg, step = self.cfg, run.step
        if cfg.resume_every and step % cfg.resume_every == 0 and step < cfg.iterations:
            self.save_resume_point({"step": step, "elapsed_ms": run.elapsed_ms, "looping_step": run.looping_step,
                                    "looping": self.model.looping, "qat": run.qat_on, "log": run.records,
                                    "val_log": run.val_records})
            run.saved_step = step

    def finish(self, run: Run) -> dict:
        """After the last step: the final loss and check, the timings, the resume points removed (a
        finished run is not resumed), and the averaged weights (SWA or EMA) put in the model."""
        cfg = self.cfg
        self.sync()
        run.elapsed_ms = (time.perf_counter() - run.t0) * 1000.0
        run.loss = self.host_loss(run.rank_loss) if run.rank_loss is not None else run.loss
        check_finite(run.nonfinite, run.step, cfg)
        self.timings = self.run_timings(run)
        metrics = self.run_metrics(run)
        if cfg.resume_every:
            if self.world > 1:
                torch.distributed.barrier()
            if dist.is_main():
                resume.remove(self.resume_folder())
        metrics["swa_snapshots"] = self.swa.count if self.swa is not None else 0
        if self.swa is not None and cfg.swa_apply:
            self.swa.copy_to(self.model)
        elif self.ema is not None:
            self.ema.copy_to(self.model)
        if run.log:
            run.log.close()
        if run.live:
            run.live.end()
        return metrics

    def run_timings(self, run: Run) -> dict:
        # How the run went, not what it learned: for the run record, so metrics.json and the weights
        # are the same bytes for every run of the same config (a resumed one included).
        seconds = run.elapsed_ms / 1000.0
        return {"train_seconds": round(seconds, 3), "ms_per_step": round(run.elapsed_ms / max(run.step, 1), 3),
                "tokens_per_s": round(run.step * self.cfg.train_batch_tokens / max(seconds, 1e-9), 1),
                "peak_mem_bytes": self.peak_memory(), "resumed_from_step": run.resumed_from,
                "torch": torch.__version__}

    def run_metrics(self, run: Run) -> dict:
        return {
            "steps": run.step,
            "final_train_loss": round(run.loss, 6),
            "world_size": self.world,
            "device": self.device.type,
            "looping_enabled_at_step": run.looping_step,
            # What ran, not what was asked: the kernels need a device that runs Triton.
            "fused_cross_entropy": self.model.fused_cross_entropy,
            "fused_mlp": any(getattr(m, "fused", False) for m in self.model.modules()),
            "embedding_dtype": str(self.model.tok_emb.weight.dtype).removeprefix("torch."),
        }

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
