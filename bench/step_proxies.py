"""The training step's cost proxies on CPU, each system beside its reference's own code on the
same dims and batches (issue 25): what a GPU step will cost, proven before a GPU sees it.

    .venv/bin/python bench/step_proxies.py                    # both systems, every row
    .venv/bin/python bench/step_proxies.py --systems record --rows ops,syncs --json out.json

Systems: `record` is pgolf's record preset beside R1 (PR #1855's train_gpt.py in the git-ignored
bench/reference/r1/, driven as bench/record_parity.py drives it: its functions as written, a CPU
stand-in for FlashAttention, its CUDA streams made no-ops); `baseline` is the baseline preset
beside the challenge's train_gpt.py (bench/reference/train_gpt.py). pgolf's side is its Trainer
itself (forward_backward, optimizer_step, the train() loop); R1's step is its own step_fn and
EMA statement taken out of its train_model (record_parity.r1_inner); the baseline script's step
is its main() loop's statements as bench/reference_parity.py drives them.

Rows (model width 128, each system's own depth and vocab; rows of 256 tokens, 1,024 per step):
  ops        top-level ops (torch profiler: the outermost dispatcher calls, autograd's included) of
             one steady optimizer phase (everything after the backward: clip, schedules, every
             optimizer, EMA) and of one forward + backward, eager. Both sides with fused AdamW,
             as on CUDA; Newton-Schulz eager on both (both compile it on CUDA).
  syncs      host reads of device values per steady step (item, bool, float, tolist, cpu, numpy,
             nonzero, equal, ...: what a GPU makes the host wait for), counted at the dispatcher
             over the real loop (pgolf: Trainer.train; the loader's host-side work excluded), and
             the waits for the previous step that keep the host one step ahead (HostPace, run in
             its CUDA branch with a counting stand-in event; on a process group, its cap vote).
  compile    graph breaks and graphs over 6 steps under torch.compile (aot_eager, CPU; fullgraph
             off so that breaks are counted, not raised), the looping switched on at step 3 and
             batches whose documents need cu_seqlens of 64 and 128 entries.
  memory     peak bytes of one GPU's steady step at the preset's real shapes (record: one 98,304-
             token row, vocab 8,192; baseline: 65,536 tokens as 32 rows of 2,048... per rank at
             8 GPUs), under FakeTensor (no memory allocated): eager (torch's MemTracker over
             forward, backward, optimizer step, EMA) and compiled (the graphs AOTAutograd's
             min-cut partitioner, inductor's, makes for the forward and backward, by liveness of
             every value, plus parameters, gradients, optimizer state and EMA). On CUDA paths:
             torch's varlen_attn (its own fake) for document attention, bf16 autocast; pgolf with
             the fused kernels on and off.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import inspect
import json
import math
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import record_parity as rp  # noqa: E402
from pgolf.data.shards import write_shard  # noqa: E402
from pgolf.model import docmask  # noqa: E402
from pgolf.model.config import ModelConfig  # noqa: E402
from pgolf.optim.ema import EMA  # noqa: E402
from pgolf.train import loop as training_loop  # noqa: E402
from pgolf.train.optimizers import build_optimizers  # noqa: E402
from pgolf.typed_params import from_dict  # noqa: E402
from runner import params as presets  # noqa: E402
from tasks import train as train_stage  # noqa: E402

WIDTH = 128
SEQ = 256  # train_seq_len and doc_attention_max_len at the bench's dims
ROW = 1024  # tokens per step (one rank)
BOS = 1
ROWS = ("ops", "syncs", "compile", "memory")
GiB = 1024 ** 3


# --- counting ops ------------------------------------------------------------------------------

def is_op(name: str) -> bool:
    return "::" in name and not name.startswith(("autograd::", "torch::autograd", "Optimizer.", "cudaStream"))


def count_ops(fn) -> int:
    """Top-level ops of fn(): dispatcher calls (aten::, pgolf::, torch_attn::) with no op above them
    (annotations such as autograd's evaluate_function nodes are looked through)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    count = 0
    for event in prof.events():
        if not is_op(event.name):
            continue
        parent = event.cpu_parent
        while parent is not None and not is_op(parent.name):
            parent = parent.cpu_parent
        count += parent is None
    return count


# --- counting host syncs -----------------------------------------------------------------------

# Ops whose result the host needs (a GPU makes it wait): values read back, data-dependent shapes.
SYNC_OPS = ("_local_scalar_dense", "nonzero", "equal", "is_nonzero", "masked_select", "_unique2", "unique_consecutive",
            "unique_dim", "repeat_interleave.Tensor", "_assert_async")


class SyncCounter(TorchDispatchMode):
    """Counts SYNC_OPS and host copies (Tensor.cpu/.numpy/.tolist, Python-level) while not paused."""

    def __init__(self):
        super().__init__()
        self.count, self.paused, self.names = 0, 0, []

    def __enter__(self):
        HostWork.counters.append(self)
        return super().__enter__()

    def __exit__(self, *exc):
        HostWork.counters.remove(self)
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket.__name__) + ("" if func._overloadname == "default" else "." + func._overloadname)
        if not self.paused and (func.overloadpacket.__name__ in SYNC_OPS or name in SYNC_OPS):
            self.count += 1
            self.names.append(name)
        return func(*args, **(kwargs or {}))

    @contextlib.contextmanager
    def pause(self):
        self.paused += 1
        try:
            yield
        finally:
            self.paused -= 1


@contextlib.contextmanager
def standin_reads_paused(counter: SyncCounter):
    """pgolf::segment_attention, the CPU stand-in for a CUDA varlen kernel (both systems use it
    here), reads cu_seqlens on the host; the kernel it stands in for does not."""
    saved = docmask._segments_of
    docmask._segments_of = paused_during(counter, saved)
    try:
        yield
    finally:
        docmask._segments_of = saved


@contextlib.contextmanager
def counting_host_copies(counter: SyncCounter):
    """tolist/numpy/cpu never reach the dispatcher on a CPU tensor: count them at the Python level."""
    saved = {name: getattr(torch.Tensor, name) for name in ("tolist", "numpy", "cpu")}

    def counted(name):
        def method(self, *a, **k):
            if not counter.paused:
                counter.count += 1
                counter.names.append(name)
            return saved[name](self, *a, **k)
        return method

    for name in saved:
        setattr(torch.Tensor, name, counted(name))
    try:
        yield
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


def paused_during(counter: SyncCounter, fn):
    def wrapped(*a, **k):
        with counter.pause():
            return fn(*a, **k)
    return wrapped


class HostWork:
    """Pauses whichever SyncCounter is counting: the loaders' host-side work is not a device read."""
    counters: list = []

    @contextlib.contextmanager
    def pause(self):
        with contextlib.ExitStack() as stack:
            for counter in HostWork.counters:
                stack.enter_context(counter.pause())
            yield


HOST_WORK = HostWork()


class CountingEvent:
    """torch.cuda.Event on CPU: counts synchronize() (HostPace's wait for the previous step)."""
    waits = 0

    def record(self, *a):
        pass

    def synchronize(self):
        CountingEvent.waits += 1


# --- data ----------------------------------------------------------------------------------------

def write_shards(folder: Path, vocab: int, seed: int = 0) -> None:
    """Two train shards of [BOS] + tokens documents: stretches of short documents (a row of them
    needs a cu_seqlens of 128 entries) between stretches of long ones (64)."""
    rng = np.random.default_rng(seed)
    for index in range(2):
        tokens = list(rng.integers(2, vocab, 11))
        while len(tokens) < 40_000:
            short = (len(tokens) // ROW) % 3 == 1
            length = int(rng.integers(3, 12)) if short else int(rng.choice([40, 90, SEQ - 1, 300, 700]))
            tokens += [BOS] + list(rng.integers(2, vocab, length))
        write_shard(folder / f"fineweb_train_{index:06d}.bin", np.array(tokens, dtype=np.int64))


# --- the two systems --------------------------------------------------------------------------------

@dataclasses.dataclass
class Side:
    """One system's training step at the bench's dims, as its own code runs it."""
    name: str
    model: torch.nn.Module
    fwd_bwd: callable  # (batch) -> None: one forward + backward, eager
    optimizer_phase: callable  # (step) -> None: everything after the backward
    compile_call: callable  # (compiled model, batch) -> loss
    set_looping: callable  # (bool) -> None


def pgolf_config(preset: str, real: bool = False) -> train_stage.Config:
    section = presets.render(preset)["train"]
    nproc = section["nproc"]
    section.update(nproc=1, device="cpu", iterations=10, max_wallclock_seconds=0, gptq_reserve_seconds=0,
                   warmup_steps=0, compile=False, log_every=1000, learn_check_step=0, resume_every=0)
    if real:  # one GPU's share of the preset's step
        section["train_batch_tokens"] //= nproc
        section["grad_accum_steps"] = 1
    else:
        heads = max(1, WIDTH // 64)
        section["model"].update(model_dim=WIDTH, num_heads=heads, num_kv_heads=max(1, heads // 2))
        if section["model"].get("doc_attention_max_len"):
            section["model"]["doc_attention_max_len"] = SEQ
        section.update(train_batch_tokens=ROW, train_seq_len=SEQ, grad_accum_steps=1)
    return from_dict(train_stage.Config, section, f"preset {preset}")


def pgolf_trainer(cfg: train_stage.Config, shards: Path, out: Path) -> training_loop.Trainer:
    """The train stage's Trainer on CPU, its optimizers fused as on CUDA."""
    trainer = training_loop.Trainer(cfg, shards, out)
    trainer.optimizers = build_optimizers(trainer.model, cfg, fused=True)
    trainer.adam_params = [p for group in trainer.optimizers[1].param_groups for p in group["params"]]
    return trainer


def pgolf_side(cfg: train_stage.Config, shards: Path, out: Path) -> tuple[Side, training_loop.Trainer]:
    trainer = pgolf_trainer(cfg, shards, out)

    def fwd_bwd(batch):
        for opt in trainer.optimizers:
            opt.zero_grad(set_to_none=True)
        trainer.forward_backward(batch)

    return Side("pgolf", trainer.model, fwd_bwd, lambda step: trainer.optimizer_step(step, 1.0),
                lambda compiled, batch: compiled(*batch), trainer.model.set_looping), trainer


def r1_step_parts(ref) -> dict:
    """R1's step_fn split where its backward ends, and its EMA statement, from its source unedited."""
    code = rp.r1_inner(ref, ("step_fn",))
    fn = next(n for n in ast.walk(ast.parse(inspect.getsource(ref))) if isinstance(n, ast.FunctionDef) and n.name == "step_fn")
    body = fn.body
    split = next(i for i, node in enumerate(body) if isinstance(node, ast.AugAssign))  # train_loss /= accum
    parts = {}
    returned = ast.Return(ast.Name("train_loss", ast.Load()))
    for name, stmts, names in (("forward_backward", body[:split + 1] + [returned], ("step", "lr_scale")),
                               ("optimizer", body[split + 1:], ("step", "lr_scale", "train_loss"))):
        args = ast.arguments(posonlyargs=[], args=[ast.arg(n) for n in names], kwonlyargs=[], kw_defaults=[], defaults=[])
        func = ast.FunctionDef(name=name, args=args, body=stmts, decorator_list=[], returns=None, type_params=[])
        parts[name] = compile(ast.fix_missing_locations(ast.Module([func], [])), f"r1:step_fn:{name}", "exec")
    parts["ema"] = code["ema"]
    return parts


class OneBatch:
    """R1's loader interface over the batches the bench hands it."""

    def __init__(self):
        self.batch = None

    def next_batch(self, *_):
        return self.batch


def r1_cu(ref, x: torch.Tensor, max_len: int = SEQ) -> torch.Tensor:
    """R1's loader's cu_seqlens for a flat row (its _build_cu_seqlens, buckets of 64)."""
    bos = (x[0] == BOS).nonzero(as_tuple=True)[0].tolist()
    return ref._build_cu_seqlens(bos, x.size(1), x.device, max_len, 64)[0]


def r1_side(ref, cfg: train_stage.Config, shards: Path, real: bool = False, prepare=None) -> tuple[Side, dict]:
    """R1's model as its train_model builds it (bf16, then fp32 where it restores), its Optimizers,
    its step_fn and EMA statements in a namespace of their own."""
    m = cfg.model
    h = rp.r1_hyperparameters(ref, m, cfg, rp.gptq_stage.Config(), shards)
    h.train_seq_len = SEQ if not real else cfg.train_seq_len
    h.train_batch_tokens, h.grad_accum_steps = cfg.train_batch_tokens, 1
    h.grad_clip_norm, h.ema_decay, h.fused_ce_enabled = cfg.grad_clip_norm, cfg.ema_decay, real
    h.muon_momentum_warmup_steps, h.muon_momentum_warmup_start = cfg.muon_momentum_warmup_steps, cfg.muon_momentum_warmup_start
    h.distributed = False
    model = ref.GPT(h).bfloat16()
    ref.restore_fp32_params(model)
    for block in model.blocks:
        block.mlp.use_fused = real  # its Triton MLP: on CUDA only (FakeTensor: a stand-in, see fake_r1_mlp)
    if prepare is not None:
        model = prepare(model)
    with rp.cpu_for_r1():
        optimizers = ref.Optimizers(h, model)
    loader = OneBatch()
    live = model.state_dict(keep_vars=True)
    ema_state = {name: t.detach().float().clone() for name, t in live.items()}
    space = {"torch": torch, "h": h, "model": model, "base_model": model, "optimizers": optimizers,
             "train_loader": loader, "device": torch.device("cpu"),
             "_clip_params": [p for p in model.parameters() if p.requires_grad],
             "_ema_pairs": [(ema_state[n], t) for n, t in live.items()], "ema_decay": cfg.ema_decay}
    parts = r1_step_parts(ref)
    for name in ("forward_backward", "optimizer"):
        exec(parts[name], space)

    def batch_for(batch):
        x, y, _ = batch
        return x, y, r1_cu(ref, x, h.train_seq_len), h.train_seq_len

    def fwd_bwd(batch):
        optimizers.zero_grad_all()
        with HOST_WORK.pause():  # R1's loader builds cu_seqlens on the host, in its own thread
            loader.batch = batch_for(batch)
        with rp.cpu_for_r1():
            space["forward_backward"](0, 1.0)

    def optimizer_phase(step):
        with rp.cpu_for_r1():
            space["optimizer"](step, 1.0, None)
            exec(parts["ema"], space)

    def compile_call(compiled, batch):
        x, y, cu, max_len = batch_for(batch)
        return compiled(x, y, cu_seqlens=cu, max_seqlen=max_len)

    def set_looping(on):
        model.looping_active = bool(on)

    return Side("R1", model, fwd_bwd, optimizer_phase, compile_call, set_looping), space


def baseline_side(ref, cfg: train_stage.Config, prepare=None) -> Side:
    """The challenge's GPT, Muon and Adams built and cast as its main() builds them; its step's
    statements after the backward as its loop runs them (bench/reference_parity.py)."""
    m = cfg.model
    net = ref.GPT(vocab_size=m.vocab_size, num_layers=m.num_layers, model_dim=m.model_dim, num_heads=m.num_heads,
                  num_kv_heads=m.num_kv_heads, mlp_mult=int(m.mlp_mult), tie_embeddings=m.tie_embeddings,
                  tied_embed_init_std=m.tied_embed_init_std, logit_softcap=m.logit_softcap, rope_base=m.rope_base,
                  qk_gain_init=m.qk_gain_init).bfloat16()
    for module in net.modules():
        if isinstance(module, ref.CastedLinear):
            module.float()
    ref.restore_low_dim_params_to_fp32(net)
    if prepare is None:
        net.float()  # on CPU pgolf trains without autocast in fp32; so does the script here
    else:  # its CUDA layout, as FakeTensor (memory)
        net = prepare(net)
    blocks = list(net.blocks.named_parameters())
    matrix = [p for n, p in blocks if p.ndim == 2 and not any(c in n for c in ref.CONTROL_TENSOR_NAME_PATTERNS)]
    scalars = [p for n, p in blocks if p.ndim < 2 or any(c in n for c in ref.CONTROL_TENSOR_NAME_PATTERNS)]
    scalars.append(net.skip_weights)
    adam = dict(betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps, fused=True)
    opt_tok = torch.optim.Adam([{"params": [net.tok_emb.weight], "lr": cfg.tied_embed_lr, "base_lr": cfg.tied_embed_lr}],
                               **adam)
    opt_muon = ref.Muon(matrix, lr=cfg.matrix_lr, momentum=cfg.muon_momentum, backend_steps=cfg.muon_backend_steps)
    for group in opt_muon.param_groups:
        group["base_lr"] = cfg.matrix_lr
    opt_scalar = torch.optim.Adam([{"params": scalars, "lr": cfg.scalar_lr, "base_lr": cfg.scalar_lr}], **adam)
    optimizers = [opt_tok, opt_muon, opt_scalar]

    def fwd_bwd(batch):
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        x, y, _ = batch
        (net(x, y) * 1.0).backward()

    def optimizer_phase(step):
        frac = min(step / cfg.muon_momentum_warmup_steps, 1.0) if cfg.muon_momentum_warmup_steps > 0 else 1.0
        for group in opt_muon.param_groups:
            group["momentum"] = (1 - frac) * cfg.muon_momentum_warmup_start + frac * cfg.muon_momentum
        for opt in optimizers:
            for group in opt.param_groups:
                group["lr"] = group["base_lr"] * 1.0
        if cfg.grad_clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip_norm)
        for opt in optimizers:
            opt.step()
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)

    side = Side("script", net, fwd_bwd, optimizer_phase, lambda compiled, batch: compiled(batch[0], batch[1]),
                lambda on: None)
    side.optimizers = optimizers
    return side


# --- rows --------------------------------------------------------------------------------------------

def ops_row(sides: list[Side], batches: list) -> dict:
    out = {}
    for side in sides:
        side.set_looping(True)
        side.fwd_bwd(batches[0])
        side.optimizer_phase(1)  # states exist from here on: the next phase is a steady one
        side.fwd_bwd(batches[1])
        out[side.name] = {"optimizer_phase": count_ops(lambda: side.optimizer_phase(2)),
                          "forward_backward": count_ops(lambda: side.fwd_bwd(batches[2]))}
    return out


def pgolf_loop_syncs(trainer: training_loop.Trainer, steps: int = 8) -> dict:
    """Host reads per steady step over Trainer.train() (steps 2..steps-1: no log step among them)."""
    counter, marks = SyncCounter(), []
    real_step = trainer.step
    trainer.step = lambda *a: marks.append(counter.count) or real_step(*a)
    trainer.loader.next_batch = paused_during(counter, trainer.loader.next_batch)  # host work
    trainer.cfg.iterations, trainer.cfg.log_every, trainer.cfg.learn_check_step = steps, 10 * steps, 0
    try:
        with counter, counting_host_copies(counter), standin_reads_paused(counter):
            trainer.train()
    finally:
        trainer.step = real_step
    marks.append(counter.count)
    per_step = [b - a for a, b in zip(marks, marks[1:])]
    return {"reads_per_steady_step": max(per_step[1:-1]), "reads_first_and_last_step": [per_step[0], per_step[-1]]}


def host_pace_waits(steps: int = 6) -> dict:
    """HostPace as the loop drives it each step, in its CUDA branch (a counting event) on one GPU
    and on a process group (its cap vote read one step late): waits and reads per steady step."""
    out = {}
    saved = torch.cuda.Event, training_loop.dist.collective, training_loop.dist.queue_max_vote
    for label, group in (("one_gpu", False), ("process_group", True)):
        counter = SyncCounter()
        CountingEvent.waits = 0
        torch.cuda.Event = CountingEvent
        training_loop.dist.collective = lambda group=group: group
        training_loop.dist.queue_max_vote = lambda over, device: torch.tensor(float(over))
        try:
            pace = training_loop.HostPace(torch.device("cpu"))
            pace.cuda = True
            waits, reads = [], []
            with counter:
                for _ in range(steps):
                    w, r = CountingEvent.waits, counter.count
                    pace.step_queued()
                    pace.stop_vote(False)
                    waits.append(CountingEvent.waits - w)
                    reads.append(counter.count - r)
        finally:
            torch.cuda.Event, training_loop.dist.collective, training_loop.dist.queue_max_vote = saved
        out[label] = {"waits_for_previous_step": max(waits[1:]), "reads": max(reads[1:])}
    return out


def reference_vote_reads(ref, function: str) -> int:
    """Host reads of the wallclock-cap vote a reference's loop runs after every step on a process
    group: its own `if ... distributed and max_wallclock_ms ...` statement, executed under the
    counter (the all-reduce a no-op)."""
    tree = ast.parse(inspect.getsource(ref))
    body = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == function)
    vote = next(n for n in ast.walk(body)
                if isinstance(n, ast.If) and "distributed and max_wallclock_ms" in ast.unparse(n.test))
    counter = SyncCounter()
    ns = {"torch": torch, "h": types.SimpleNamespace(distributed=True), "distributed": True, "max_wallclock_ms": 1e6,
          "reached_cap": False, "device": torch.device("cpu"),
          "dist": types.SimpleNamespace(all_reduce=lambda *a, **k: None, ReduceOp=types.SimpleNamespace(MAX=None))}
    with counter:
        exec(compile(ast.Module([vote], []), f"{function}:vote", "exec"), ns)
    return counter.count


def reference_step_syncs(side: Side, batches: list) -> float:
    """Host reads over three steady steps of a reference's step (its forward and backward, then
    everything after: R1's step_fn halves and EMA, the script's loop statements)."""
    counter = SyncCounter()
    side.set_looping(True)
    side.fwd_bwd(batches[0])
    side.optimizer_phase(1)
    with counter, counting_host_copies(counter), standin_reads_paused(counter):
        for step, batch in enumerate(batches[1:4], 2):
            side.fwd_bwd(batch)
            side.optimizer_phase(step)
    return counter.count / 3


def compile_row(sides: list[Side], batches: list, steps: int = 6) -> dict:
    import torch._dynamo
    from torch._dynamo.utils import counters

    out = {}
    for side in sides:
        torch._dynamo.reset()
        counters.clear()
        compiled = torch.compile(side.model, dynamic=False, fullgraph=False, backend="aot_eager")
        side.set_looping(False)
        for step in range(steps):
            if step == steps // 2:
                side.set_looping(True)
            loss = side.compile_call(compiled, batches[step])
            loss.backward()
        side.model.zero_grad(set_to_none=True)
        out[side.name] = {"graph_breaks": int(sum(counters["graph_break"].values())),
                          "graphs": int(counters["stats"]["unique_graphs"]), "steps": steps}
    return out


# --- memory under FakeTensor -------------------------------------------------------------------------

def tensors_in(obj, depth: int = 0, seen=None) -> list[torch.Tensor]:
    """Every tensor held by obj (dicts, lists, attributes), each storage once."""
    seen = set() if seen is None else seen
    found = []
    if isinstance(obj, torch.Tensor):
        key = obj.untyped_storage()._cdata
        if key not in seen:
            seen.add(key)
            found.append(obj)
    elif depth < 6:
        if isinstance(obj, dict):
            items = list(obj.values())
        elif isinstance(obj, (list, tuple)):
            items = list(obj)
        elif hasattr(obj, "__dict__") and not isinstance(obj, (type, types.ModuleType)):
            items = list(vars(obj).values())
        else:
            items = []
        for item in items:
            found += tensors_in(item, depth + 1, seen)
    return found


def nbytes(values) -> int:
    total = 0
    for v in values if isinstance(values, (list, tuple)) else [values]:
        if isinstance(v, torch.Tensor):
            total += v.numel() * v.element_size()
    return total


class LiveBytes(TorchDispatchMode):
    """Bytes of every storage an op creates while on, freed when the storage dies; what existed
    before (`resident`: parameters, optimizer state, EMA) is counted once, not again when an op
    writes into it. MemTracker would do, but refuses a module called twice in one forward (the
    loop's blocks)."""

    def __init__(self, resident: list[torch.Tensor]):
        super().__init__()
        self.seen = {t.untyped_storage()._cdata for t in resident}
        self.current = self.peak = nbytes(resident)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        import weakref
        from torch.utils._pytree import tree_flatten

        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                if storage._cdata not in self.seen:
                    self.seen.add(storage._cdata)
                    size = storage.nbytes()
                    self.current += size
                    self.peak = max(self.peak, self.current)
                    weakref.finalize(storage, self._free, storage._cdata, size)
        return out

    def _free(self, key: int, size: int) -> None:
        self.seen.discard(key)
        self.current -= size


def graph_activation_peak(fw, bw) -> tuple[int, int]:
    """(peak bytes live during the forward graph, during the backward graph) by liveness of each
    node's value; graph inputs (parameters, batch) are not counted, the forward's outputs (the saved
    activations) stay live into the backward."""
    def peak(graph, carried: int, skip_inputs: bool) -> tuple[int, int]:
        nodes = list(graph.nodes)
        last_use = {}
        for i, node in enumerate(nodes):
            for inp in node.all_input_nodes:
                last_use[inp] = i
        live, top, current = {}, carried, carried
        for i, node in enumerate(nodes):
            if node.op == "placeholder" and skip_inputs:
                continue
            if node.op not in ("output", "placeholder"):
                size = nbytes(node.meta.get("val"))
                live[node] = size
                current += size
                top = max(top, current)
            for inp in node.all_input_nodes:
                if last_use.get(inp) == i and inp in live and node.op != "output":
                    current -= live.pop(inp)
        return top, current

    fw_peak, saved = peak(fw, 0, True)
    bw_peak, _ = peak(bw, saved, True)
    return fw_peak, bw_peak


class Captured(Exception):
    pass


def compiled_activation_peak(fn) -> int:
    """Trace fn() through dynamo and AOTAutograd with inductor's partitioner; stop before anything
    runs (the graphs are only measured)."""
    import torch._dynamo
    from functorch.compile import min_cut_rematerialization_partition
    from torch._dynamo.backends.common import aot_autograd

    graphs = {}

    def partition(joint, joint_inputs, **kw):
        fw, bw = min_cut_rematerialization_partition(joint, joint_inputs, **kw)
        graphs["peak"] = graph_activation_peak(fw.graph, bw.graph)
        raise Captured()

    backend = aot_autograd(fw_compiler=lambda g, _: g, bw_compiler=lambda g, _: g, partition_fn=partition)
    torch._dynamo.reset()
    try:
        fn(backend)
    except Exception as err:  # noqa: BLE001 - dynamo wraps what the backend raised
        if "peak" not in graphs:
            raise
    return max(graphs["peak"])


@contextlib.contextmanager
def cuda_paths():
    """What the CUDA step runs, on CPU: bf16 autocast, torch's varlen kernel (its fake)."""
    saved = docmask.flash_varlen_usable
    docmask.flash_varlen_usable = lambda q: True
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            yield
    finally:
        docmask.flash_varlen_usable = saved


def fake_r1_mlp(ref):
    """R1's Triton up-projection as FakeTensor sees it: its outputs (pre, post) or dpre, allocated."""
    def linear_leaky_relu_square(a, b, aux=None):  # a [M, K] times b [N, K]^T
        out = a.new_empty(a.shape[0], b.shape[0])
        return out if aux is not None else (out, torch.empty_like(out))
    ref.linear_leaky_relu_square = linear_leaky_relu_square


def varlen_standin(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=True, **_):
    """R1's flash_attn_varlen_func: pgolf's exact segment op on CPU (one op to dynamo), torch's
    varlen kernel where the CUDA path is estimated."""
    gqa = k.size(1) != q.size(1)
    if docmask.flash_varlen_usable(q):
        from torch.nn.attention.varlen import varlen_attn
        return varlen_attn(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, window_size=(-1, 0),
                           enable_gqa=gqa)
    return torch.ops.pgolf.segment_attention(q, k, v, cu_seqlens_q, gqa)


def fake_real_batch(cfg: train_stage.Config, vocab: int) -> tuple[torch.Tensor, ...]:
    """One rank's batch at the preset's shapes: documents of 300 to 3,000 tokens (R1's median is
    about 700), real token ids so the host can cut the segments."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(2, vocab, cfg.train_batch_tokens + 1)
    pos = 0
    while pos < len(tokens):
        tokens[pos] = BOS
        pos += int(rng.integers(300, 3000))
    local = torch.from_numpy(tokens)
    rows = 1 if cfg.flat_batches else cfg.train_batch_tokens // cfg.train_seq_len
    return local[:-1].reshape(rows, -1), local[1:].reshape(rows, -1)


def fakeified(model: torch.nn.Module, mode) -> torch.nn.Module:
    """The model, built and cast by its own code on CPU, with every parameter and buffer swapped
    for a FakeTensor of the same shape and dtype (FakeTensor cannot go through Module.to itself)."""
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None:
                module._parameters[name] = torch.nn.Parameter(mode.from_tensor(p.detach()), requires_grad=p.requires_grad)
        for name, b in list(module._buffers.items()):
            if b is not None:
                module._buffers[name] = mode.from_tensor(b)
    return model


def set_fused(model, fused: bool) -> None:
    """train.fused_cross_entropy / fused_mlp as set_fused_kernels sets them where Triton runs."""
    model.fused_cross_entropy = fused
    for module in model.modules():
        if hasattr(module, "fused"):
            module.fused = fused


def pgolf_memory(cfg: train_stage.Config, fused: bool) -> dict:
    """One GPU's steady step of the preset: the Trainer's own forward_backward and optimizer_step
    (its model built and cast as on CUDA: bf16 embedding), two steps under MemTracker."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    x_host, y_host = fake_real_batch(cfg, cfg.model.vocab_size)
    m = cfg.model
    cu = (docmask.document_segments(x_host, m.bos_id, m.doc_attention_max_len).cu_seqlens
          if m.doc_attention and m.doc_attention_kernel == "varlen" else None)

    def built_model():
        torch.manual_seed(0)
        model = training_loop.GPT(cfg.model)
        model.store_embedding_in_bf16()
        set_fused(model, fused)
        model.set_looping(True)
        return model

    out = {}
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    trainer = training_loop.Trainer.__new__(training_loop.Trainer)
    trainer.cfg, trainer.device, trainer.accum = cfg, torch.device("cpu"), 1
    trainer.model = trainer.train_model = fakeified(built_model(), mode)
    with mode, cuda_paths():
        trainer.optimizers = build_optimizers(trainer.model, cfg, fused=True)
        trainer.adam_params = [p for g in trainer.optimizers[1].param_groups for p in g["params"]]
        trainer.ema = EMA(trainer.model, cfg.ema_decay) if cfg.ema_decay > 0 else None
        batch = (mode.from_tensor(x_host), mode.from_tensor(y_host), mode.from_tensor(cu) if cu is not None else None)
        tracker = None
        for step in range(2):  # the second one is steady: optimizer state exists
            for opt in trainer.optimizers:
                opt.zero_grad(set_to_none=True)
            resident = tensors_in([list(trainer.model.parameters()), [o.state for o in trainer.optimizers],
                                   vars(trainer.optimizers[0]).get("_bank_cache", {}),
                                   trainer.ema.shadow if trainer.ema else []])
            with (tracker := LiveBytes(resident)):
                trainer.forward_backward(batch)
                trainer.optimizer_step(step, 1.0)
        out["eager"] = tracker.peak
        static = nbytes(resident)
    with cuda_paths():  # the compiled graphs: real parameters (small), the batch at full size, nothing run
        model = built_model()
        out["compiled"] = static + compiled_activation_peak(
            lambda backend: torch.compile(model, dynamic=False, fullgraph=True, backend=backend)(x_host, y_host, cu).backward())
    return out


def r1_memory(ref, cfg: train_stage.Config) -> dict:
    """R1's steady step at its run's shapes: its model as train_model builds it (bf16, then fp32 where
    it restores), its fused loss (its own custom op) and fused MLP (fake_r1_mlp), its Optimizers,
    step_fn and EMA."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    x_host, y_host = fake_real_batch(cfg, cfg.model.vocab_size)
    cu = r1_cu(ref, x_host, cfg.train_seq_len)
    fake_r1_mlp(ref)
    out = {}
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with tempfile.TemporaryDirectory() as tmp:
        with cuda_paths():
            side, space = r1_side(ref, cfg, Path(tmp), real=True, prepare=lambda model: fakeified(model, mode))
        with mode, cuda_paths():
            side.set_looping(True)
            tracker = None
            for step in range(2):  # the second one is steady: optimizer state exists
                space["optimizers"].zero_grad_all()
                space["train_loader"].batch = (mode.from_tensor(x_host), mode.from_tensor(y_host), mode.from_tensor(cu),
                                               space["h"].train_seq_len)
                resident = tensors_in([list(side.model.parameters()), vars(space["optimizers"].optimizer_muon).get("_bank_meta", []),
                                       [o.state for o in space["optimizers"]], [e for e, _ in space["_ema_pairs"]]])
                with (tracker := LiveBytes(resident)), rp.cpu_for_r1():
                    space["forward_backward"](step, 1.0)
                    side.optimizer_phase(step)
            out["eager"] = tracker.peak
            static = nbytes(resident)
        with cuda_paths():
            side, space = r1_side(ref, cfg, Path(tmp), real=True)
            side.set_looping(True)
            model = side.model
            out["compiled"] = static + compiled_activation_peak(lambda backend: torch.compile(
                model, dynamic=False, fullgraph=True, backend=backend)(x_host, y_host, cu_seqlens=cu,
                                                                      max_seqlen=space["h"].train_seq_len).backward())
    return out


def baseline_memory(ref, cfg: train_stage.Config) -> dict:
    """The script's steady step at its run's shapes: its GPT as main() builds it (bf16, CastedLinear
    and low-dim parameters back to fp32), its Adams and Muon, its step's statements."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    x_host, y_host = fake_real_batch(cfg, cfg.model.vocab_size)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    side = baseline_side(ref, cfg, prepare=lambda net: fakeified(net, mode))
    out = {}
    with mode, cuda_paths():
        batch = (mode.from_tensor(x_host), mode.from_tensor(y_host), None)
        tracker = None
        for step in range(2):
            resident = tensors_in([list(side.model.parameters()), [o.state for o in side.optimizers]])
            with (tracker := LiveBytes(resident)):
                side.fwd_bwd(batch)
                side.optimizer_phase(step)
        out["eager"] = tracker.peak
        static = nbytes(resident)
    with cuda_paths():
        net = baseline_side(ref, cfg, prepare=lambda net: net).model
        out["compiled"] = static + compiled_activation_peak(
            lambda backend: torch.compile(net, dynamic=False, fullgraph=True, backend=backend)(x_host, y_host).backward())
    return out


# --- main ------------------------------------------------------------------------------------------

def progress(message: str, t0: float) -> None:
    print(f"[{time.perf_counter() - t0:6.1f} s] {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--r1", type=Path, default=ROOT / "bench/reference/r1/train_gpt.py")
    parser.add_argument("--baseline", type=Path, default=ROOT / "bench/reference/train_gpt.py")
    parser.add_argument("--systems", default="record,baseline")
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    rows = set(args.rows.split(","))
    if rows - set(ROWS):
        parser.error(f"--rows: unknown {sorted(rows - set(ROWS))}; rows are {','.join(ROWS)}")
    t0 = time.perf_counter()
    report: dict = {"machine": f"torch {torch.__version__}, {torch.get_num_threads()} threads", "dims":
                    {"width": WIDTH, "seq_len": SEQ, "tokens_per_step": ROW}}
    for system in args.systems.split(","):
        script = args.r1 if system == "record" else args.baseline
        if not script.is_file():
            parser.error(f"{script}: the reference script is not there (bench/reference/ is git-ignored; "
                         "bench/record_parity.py and bench/reference_parity.py say where each comes from)")
        if system == "record":
            ref = rp.load_r1(script)
            sys.modules["flash_attn_interface"].flash_attn_varlen_func = varlen_standin
            ref.flash_attn_varlen_func = varlen_standin
        else:
            ref = rp.importlib.util.module_from_spec(rp.importlib.util.spec_from_file_location("baseline_gpt", script))
            ref.__spec__.loader.exec_module(ref)
        cfg = pgolf_config(system)
        result = report.setdefault(system, {})
        with tempfile.TemporaryDirectory() as tmp:
            shards = Path(tmp) / "shards"
            shards.mkdir()
            write_shards(shards, cfg.model.vocab_size)
            ours, trainer = pgolf_side(cfg, shards, Path(tmp))
            if system == "record":
                theirs, space = r1_side(ref, cfg, shards)
                theirs.model.load_state_dict(rp.to_r1_state(ours.model, theirs.model))
            else:
                theirs, space = baseline_side(ref, cfg), None
            batches = [trainer.loader.next_batch(cfg.train_batch_tokens, cfg.train_seq_len, 1) for _ in range(8)]
            if "ops" in rows:
                progress(f"{system}: ops", t0)
                result["ops"] = ops_row([ours, theirs], batches)
                print(json.dumps({system: {"ops": result["ops"]}}), file=sys.stderr, flush=True)
            if "syncs" in rows:
                progress(f"{system}: syncs", t0)
                result["syncs"] = {"pgolf": {**pgolf_loop_syncs(pgolf_trainer(cfg, shards, Path(tmp))),
                                             "host_pace": host_pace_waits()},
                                   theirs.name: {"reads_per_steady_step": reference_step_syncs(theirs, batches),
                                                 "process_group_vote_reads": reference_vote_reads(
                                                     ref, "train_model" if system == "record" else "main"),
                                                 "vote_waits_for": "the step just queued"}}
                print(json.dumps({system: {"syncs": result["syncs"]}}), file=sys.stderr, flush=True)
            if "compile" in rows:
                progress(f"{system}: compile", t0)
                result["compile"] = compile_row([ours, theirs], batches)
                print(json.dumps({system: {"compile": result["compile"]}}), file=sys.stderr, flush=True)
        if "memory" in rows:
            progress(f"{system}: memory", t0)
            real = pgolf_config(system, real=True)
            result["memory"] = {}
            measures = ((("R1", lambda: r1_memory(ref, real)),) if system == "record"
                        else (("script", lambda: baseline_memory(ref, real)),))
            measures += (("pgolf", lambda: pgolf_memory(real, fused=False)),
                         ("pgolf_fused", lambda: pgolf_memory(real, fused=True)))
            for name, measure in measures:
                result["memory"][name] = measure()
                print(json.dumps({name: result["memory"][name]}), file=sys.stderr, flush=True)
            print(json.dumps({system: {"memory": result["memory"]}}), file=sys.stderr, flush=True)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(report, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
