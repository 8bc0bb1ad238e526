"""torchrun helpers: who am I, set up the process group, launch N workers and report failures."""
from __future__ import annotations

import os
import subprocess
import sys
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist

from pgolf.errors import PgolfError


class LaunchError(PgolfError):
    """A torchrun worker failed; the message carries the tail of the workers' output."""


_solo = False  # inside solo(): this process acts alone, whatever group it is in


def rank() -> int:
    """This process's rank: the process group's once one is joined, torchrun's before."""
    if _solo:
        return 0
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))


def world_size() -> int:
    if _solo:
        return 1
    return dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))


@contextmanager
def solo():
    """Run the block as a single process although this one is in a torchrun group (the stages an
    exported script runs on rank 0 alone): no sharding, no collectives."""
    global _solo
    previous, _solo = _solo, True
    try:
        yield
    finally:
        _solo = previous


def collective() -> bool:
    """Inside a process group of more than one rank (and not in solo())."""
    return dist.is_initialized() and world_size() > 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def resolve_device(requested: str) -> torch.device:
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda":
        if not torch.cuda.is_available():
            raise PgolfError("device 'cuda' was asked for but CUDA is not available; set device: cpu or auto")
        return torch.device("cuda", local_rank())
    if requested != "cpu":
        raise PgolfError(f"unknown device {requested!r}; use auto, cpu or cuda")
    return torch.device("cpu")


def init(device: torch.device) -> None:
    """Join the torchrun process group (NCCL on CUDA, gloo on CPU); a no-op for one process."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size() > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend=backend, timeout=timedelta(minutes=30), **kwargs)


@contextmanager
def process_group(device: torch.device):
    """In torchrun's process group for the block: joined here and left at the end, or, when the
    caller is already in one (stages run one after another in the same processes), left as it is."""
    owned = not dist.is_initialized()
    init(device)
    try:
        yield
    except BaseException:
        if owned and dist.is_initialized():
            dist.destroy_process_group()  # no barrier: the other ranks may never reach it
        raise
    if owned:
        shutdown()


def barrier() -> None:
    if collective():
        dist.barrier()


def shutdown() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def queue_max_vote(flag: bool, device: torch.device) -> torch.Tensor:
    """The MAX over ranks of `flag` as a device tensor, all-reduced without reading it (no host sync)."""
    t = torch.tensor(1 if flag else 0, device=device, dtype=torch.int32)
    if collective():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def all_reduce_max_flag(flag: bool, device: torch.device) -> bool:
    """True on every rank if it is True on any: all ranks stop on the same step."""
    if not collective():
        return flag
    return bool(queue_max_vote(flag, device).item())


def all_gather_objects(obj) -> list:
    """Every rank's `obj`, in rank order (pickled; for logs and small results, not tensors)."""
    if not collective():
        return [obj]
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def all_reduce_sums(values: list[float], device: torch.device) -> list[float]:
    """Elementwise sums over ranks in float64 (loss, token and byte totals stay exact integers)."""
    if not collective():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def average_gradients(params, mean: bool = True) -> None:
    """Mean (or sum) of every gradient across ranks, one flat buffer per dtype (no DDP wrapper
    needed). Parameters without a gradient are skipped, so every rank must have the same ones."""
    if not collective():
        return
    grads = [p.grad for p in params if p.grad is not None]
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    for group in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in group])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        if mean:
            flat /= dist.get_world_size()
        offset = 0
        for g in group:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


def launch(module: str, args: list[str], nproc: int, log_tail_lines: int = 60) -> None:
    """Run `python -m module args` under torchrun with `nproc` local processes; raise on failure."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", module, *args]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    env.setdefault("PYTHONUNBUFFERED", "1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    tail: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        sys.stdout.write(line)
        sys.stdout.flush()
        tail = (tail + [line])[-log_tail_lines:]
    if proc.wait() != 0:
        raise LaunchError(f"torchrun {module} with {nproc} process(es) failed (exit {proc.returncode}):\n{''.join(tail)}")
