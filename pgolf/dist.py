"""torchrun helpers: who am I, set up the process group, launch N workers and report failures."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from pgolf.errors import ConfigError, PgolfError, StageInterrupted

# A multi-node run is told where it is by each node's environment, not by params.yaml: the
# endpoint and this node's number change nothing in the result, so they stay out of DVC's hash.
NODE_RANK_ENV = "PGOLF_NODE_RANK"
RDZV_ENDPOINT_ENV = "PGOLF_RDZV_ENDPOINT"
# The verbose switch of every stage (runner.stage.stage_main): tracebacks after the error line.
TRACEBACK_ENV = "PGOLF_TRACEBACK"
# Where a rank that fails writes its error for the launching process (set by launch()).
RANK_ERRORS_ENV = "PGOLF_RANK_ERRORS"


class LaunchError(PgolfError):
    """A torchrun worker failed. The message is the failing rank's own; its traceback is the
    exception's note, which a traceback print (PGOLF_TRACEBACK) shows after it."""


_solo = False  # inside solo(): this process acts alone, whatever group it is in


def rank() -> int:
    """This process's rank: the process group's once one is joined, the launcher's before."""
    if _solo:
        return 0
    return dist.get_rank() if dist.is_initialized() else launched_rank()


def launched_rank() -> int:
    """torchrun's RANK, except across nodes: there the ranks follow PGOLF_NODE_RANK. c10d numbers
    the nodes in the order of their (host, pid), so the node that runs the stage and writes its
    output could otherwise hold ranks other than 0, and its rank 0 is the one that writes."""
    node = os.environ.get(NODE_RANK_ENV)
    if node is None or "LOCAL_WORLD_SIZE" not in os.environ:
        return int(os.environ.get("RANK", "0"))
    return int(node) * int(os.environ["LOCAL_WORLD_SIZE"]) + local_rank()


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
        dist.init_process_group(backend=backend, rank=launched_rank(), world_size=world_size(),
                                timeout=timedelta(minutes=30), **kwargs)


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


@dataclass(frozen=True)
class Nodes:
    """Where this machine stands in a run over `count` nodes: its number and node 0's c10d
    rendezvous endpoint (host:port), both from the environment (PGOLF_NODE_RANK, PGOLF_RDZV_ENDPOINT)."""
    count: int = 1
    rank: int = 0
    endpoint: str = ""

    @classmethod
    def from_environment(cls, count: int) -> "Nodes":
        if count == 1:
            return cls()
        node, endpoint = os.environ.get(NODE_RANK_ENV, ""), os.environ.get(RDZV_ENDPOINT_ENV, "")
        if not node.isdigit() or int(node) >= count or not endpoint.rpartition(":")[2].isdigit():
            raise ConfigError(f"nnodes {count}: every node needs {NODE_RANK_ENV} (0..{count - 1}, this node's "
                              f"number; 0 runs the stage) and {RDZV_ENDPOINT_ENV} (host:port of node 0's rendezvous) "
                              f"in its environment; got {NODE_RANK_ENV}={node!r} {RDZV_ENDPOINT_ENV}={endpoint!r}")
        return cls(count, int(node), endpoint)

    def torchrun_args(self, run_id: str) -> list[str]:
        if self.count == 1:
            return ["--standalone"]
        # Node 0 hosts the rendezvous store; the others only connect, so nodes that share a host
        # (127.0.0.1 in the tests) never race to bind the port.
        return [f"--nnodes={self.count}", f"--node-rank={self.rank}", "--rdzv-backend=c10d",
                f"--rdzv-endpoint={self.endpoint}", f"--rdzv-id={run_id}",
                f"--rdzv-conf=is_host={'true' if self.rank == 0 else 'false'}"]


def die_with_launcher() -> None:
    """Have the kernel kill this rank when the process that launched it dies. torchrun starts each
    rank in a session of its own, so a kill -9 of the stage's process group (a crashed worker, a
    killed flow run) would leave the ranks training on, holding the GPUs and the CPU that the rerun
    needs. Linux only (prctl); elsewhere a rank outlives its launcher as before."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    PR_SET_PDEATHSIG = 1
    launcher = os.getppid()
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return
    # The launcher may have died before prctl took effect; then this process was reparented.
    if launcher == 1 or os.getppid() != launcher:
        os._exit(128 + signal.SIGKILL)


def leave_now(code: int) -> None:
    """Exit at once, past the interpreter's shutdown, once a Ctrl-C has stopped this process of a
    torchrun job (its agent, or a rank that has reported where it stopped). Such a process can still
    hold torch.distributed's C++ threads (the agent's rendezvous store, a process group's workers),
    and destroying them at shutdown can abort with "terminate called without an active exception",
    a second line under the stage's one. Nothing is left to do: the stage process writes no output
    of an interrupted run."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def pin_threads() -> int:
    """Fix this process's CPU thread count at the one torch chose (OMP_NUM_THREADS, else its
    default), and with it turn MKL's dynamic threading off. torch.set_num_threads does both; a
    process that never calls it keeps MKL_DYNAMIC on, and MKL may then run a matmul or a Cholesky
    on fewer threads than asked while the machine is busy, which changes how its sums round: GPTQ
    wrote other codes in 1 run of 6 on identical inputs (docs/stages.md#determinism). Every stage
    process calls this before it computes anything."""
    threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    return threads


@contextmanager
def one_thread():
    """Run the block's CPU kernels on one thread. BLAS and LAPACK split a sum over threads when its
    output is small (x^T x over many tokens, a Cholesky), so the result depends on the thread
    count; inside this block it cannot. For the numerical solves whose output is stored (GPTQ's
    codes), so the same inputs give the same bytes whatever threads the stage runs with."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def threads_per_process(nproc: int) -> int:
    """CPU threads each of a stage's `nproc` processes gets unless OMP_NUM_THREADS says otherwise:
    the machine's cores shared among them (for nproc 1 all of them, torch's own default)."""
    return max(1, (os.cpu_count() or 1) // nproc)


def launch(module: str, args: list[str], nproc: int, nodes: Nodes = Nodes(), run_name: str | None = None) -> None:
    """Run `python -m module args` on `nproc` torchrun processes on this node (of `nodes`), whose
    rendezvous every node names `pgolf-<run_name>` (default: the module); raise
    LaunchError with the first failing rank's own message. The workers write to this process's
    stdout and stderr (a progress bar stays a bar in a terminal)."""
    # torchrun and its workers get a TMPDIR of their own, removed with everything in it afterwards:
    # torchelastic's log folders (and whatever else they leave) never pile up in the user's TMPDIR.
    with tempfile.TemporaryDirectory(prefix="pgolf-ranks-") as scratch:
        errors = Path(scratch) / "rank-errors"
        errors.mkdir()
        cmd = [sys.executable, "-m", "pgolf.agent", *nodes.torchrun_args(f"pgolf-{run_name or module}"),
               f"--nproc-per-node={nproc}", "-m", module, *args]
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", str(threads_per_process(nproc)))
        env.setdefault("PYTHONUNBUFFERED", "1")
        # The compile cache stays where the launching process has it (a stage process: the user's cache
        # folder, runner.stage.compile_cache_outside_tmpdir), never in the scratch folder removed below.
        env.setdefault("TORCHINDUCTOR_CACHE_DIR", _inductor_default_cache_dir())
        env["TMPDIR"] = scratch
        env[RANK_ERRORS_ENV] = str(errors)
        env.pop(NODE_RANK_ENV, None)
        if nodes.count > 1:
            env[NODE_RANK_ENV] = str(nodes.rank)
        proc = subprocess.Popen(cmd, env=env)
        try:
            code = proc.wait()
        except KeyboardInterrupt:
            # Ctrl-C reached this process and torchrun (one process group); torchrun passes it to its
            # ranks (each in a session of its own) and exits once they have: wait for that, quietly.
            code = _wait_out(proc)
        except BaseException:
            # Stopped by SIGTERM, which reached only this process: torchrun passes it on to its
            # workers and waits for them, where a kill would leave them running.
            proc.send_signal(signal.SIGTERM)
            _wait_out(proc)
            raise
        if code != 0:
            raise first_rank_error(errors, run_name or module, nproc, nodes, code)


def _inductor_default_cache_dir() -> str:
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    return default_cache_dir()



def _wait_out(proc: subprocess.Popen, grace_s: float = 60.0) -> int:
    """The exit code of an interrupted torchrun, given `grace_s` to stop its ranks (its own shutdown
    gives them 30 s); one still running then is killed."""
    deadline = time.monotonic() + grace_s
    while True:
        try:
            return proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except KeyboardInterrupt:
            continue  # a second Ctrl-C: still let the ranks stop
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()


def report_rank_error(err: BaseException) -> bool:
    """In a launched worker: record `err` for the launching process (which raises it as its
    own error) and print its traceback only when PGOLF_TRACEBACK asks. False outside launch()."""
    folder = os.environ.get(RANK_ERRORS_ENV)
    if not folder:
        return False
    interrupted = isinstance(err, (KeyboardInterrupt, StageInterrupted))
    message = str(err) if isinstance(err, PgolfError) else "interrupted" if interrupted else f"{type(err).__name__}: {err}"
    record = {"rank": launched_rank(), "time": time.time(), "message": message, "interrupted": interrupted,
              "traceback": "".join(traceback.format_exception(err))}
    tmp = Path(folder) / f".rank{record['rank']}.json.tmp"
    tmp.write_text(json.dumps(record))
    os.replace(tmp, Path(folder) / f"rank{record['rank']}.json")
    if os.environ.get(TRACEBACK_ENV):
        traceback.print_exception(err)
    return True


def first_rank_error(folder: Path, module: str, nproc: int, nodes: Nodes, code: int) -> PgolfError:
    """The error of the rank that failed first: the others usually fail because it did (a peer
    gone from a collective, or the SIGTERM torchrun sends them)."""
    records = sorted((json.loads(p.read_text()) for p in folder.glob("rank*.json")), key=lambda r: r["time"])
    world = nproc * nodes.count
    stopped = [r for r in records if r.get("interrupted")]
    if stopped or code in (130, -signal.SIGINT):
        # Ctrl-C, not a failure: the ranks that stopped at it say where (rank 0 first); the ranks cut
        # off mid-collective by them failed only because of it.
        first = min(stopped, key=lambda r: (r["message"] == "interrupted", r["rank"])) if stopped else None
        return StageInterrupted(first["message"] if first else "interrupted")
    if not records:
        return LaunchError(f"{module} on {world} rank(s) failed (exit {code}) before a rank reported an error; "
                           "the workers' output above says why (a rank killed by a signal or out of memory leaves none)")
    first = records[0]
    error = LaunchError(f"{first['message']}\n  (rank {first['rank']} of {world}; {TRACEBACK_ENV}=1 prints its traceback)")
    error.add_note(f"rank {first['rank']}'s traceback:\n{first['traceback'].rstrip()}")
    return error
