"""Where a deployment's flow run works: a git worktree of its own, never the deployer's checkout.

Two flow runs that rendered params.yaml in one checkout would each read the other's parameters and
report the other's results. So each run takes a *slot*: a git worktree under
`<checkout>/.pgolf/runs/slot-<n>`, held by an exclusive flock on `slot-<n>.lock` for the run's
whole life (the kernel drops it when the process dies, so a crashed run never leaves a slot
locked). The slot is checked out at the run's commit, its params.yaml rendered from the run's
preset, overrides and seed, and DVC reproduces the stages there.

Slots are kept between runs on purpose: a GPU worker's next run finds the shards and weights of
its last one in place, and DVC recomputes or restores only what that run's parameters change. All
slots use the checkout's DVC cache (`cache.dir` in the slot's .dvc/config.local), so a stage
computed in one slot is restored from the run-cache in every other, and what the slot computed is
in the checkout's cache when the run ends (`dvc exp apply`, `dvc checkout` there get it).

Only committed code runs in a slot: a run is reproducible from its commit, which its experiment
and its results artifact name. Uncommitted edits in the checkout are named in a warning and left out.
"""
from __future__ import annotations

import fcntl
import itertools
import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pgolf.errors import PgolfError

RUNS_DIR = Path(".pgolf") / "runs"


class WorkspaceError(PgolfError):
    """The checkout a run should branch off is not a git repository, or its revision is unknown."""


@dataclass(frozen=True)
class RunWorkspace:
    path: Path  # the slot's worktree, where params.yaml is rendered and DVC runs
    checkout: Path  # the repository the slot belongs to (its cache, its experiments)
    commit: str
    slot: int
    uncommitted: tuple[str, ...]  # tracked files edited in the checkout, left out of the run
    # Flow runs whose process died holding a slot (its lock was free, its file still names them):
    # Prefect still shows them Running, since nothing was left to report the crash.
    orphaned_runs: tuple[str, ...] = ()


def _git(cwd: Path, *args: str) -> str:
    proc = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise WorkspaceError(f"`git {' '.join(args)}` failed: {proc.stderr.strip()}", cwd)
    return proc.stdout.strip()


def checkout_root(path: str | Path) -> Path:
    path = Path(path).resolve()
    if not path.is_dir():
        raise WorkspaceError("no such folder: the checkout a flow run works from", path)
    try:
        return Path(_git(path, "rev-parse", "--show-toplevel"))
    except WorkspaceError as err:
        raise WorkspaceError("not inside a git repository: a flow run needs a git checkout of pgolf to "
                             "make its worktree from (git clone, then make deploy there)", path) from err


def _cache_dir(checkout: Path) -> Path:
    """The checkout's DVC cache: `cache.dir` where its config sets one, else its .dvc/cache."""
    from flows.repro import dvc_command, dvc_env

    proc = subprocess.run(dvc_command() + ["cache", "dir"], cwd=checkout, env=dvc_env(), capture_output=True, text=True)
    if proc.returncode == 0 and proc.stdout.strip():
        return Path(proc.stdout.strip())
    return checkout / ".dvc" / "cache"


def _prepare_slot(checkout: Path, path: Path, commit: str) -> None:
    if not (path / ".git").exists():
        if path.exists():  # a worktree git forgot about (pruned), or a half-made one
            shutil.rmtree(path)
        _git(checkout, "worktree", "prune")
        _git(checkout, "worktree", "add", "--detach", "--force", str(path), commit)
        local = checkout / ".dvc" / "config.local"  # remotes' credentials and other per-machine settings
        if local.is_file():
            shutil.copy(local, path / ".dvc" / "config.local")
        from flows.repro import dvc_command, dvc_env

        subprocess.run(dvc_command() + ["config", "--local", "cache.dir", str(_cache_dir(checkout))],
                       cwd=path, env=dvc_env(), check=True, capture_output=True)
    else:
        # Tracked files (params.yaml, dvc.lock, code) become the commit's; outputs stay for DVC to judge.
        _git(path, "checkout", "--detach", "--force", commit)


@contextmanager
def shared_git_state(checkout: Path) -> Iterator[None]:
    """Held while a run writes what every slot shares, the checkout's git refs and worktree list:
    DVC's `exp save` goes through refs of its own (refs/exps/exec/...) that two saves at once
    overwrite under each other (one run's save then fails on the other's experiment ref)."""
    runs = checkout / RUNS_DIR
    runs.mkdir(parents=True, exist_ok=True)
    with open(runs / "git.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _holder(lock) -> tuple[str, str]:
    """(pid, flow run id) a slot's lock file names: its holder's, or its last holder's once free."""
    lock.seek(0)
    pid, _, run_id = lock.read().strip().partition(" ")
    return pid, run_id


def _take(lock, run_id: str | None) -> None:
    lock.seek(0)
    lock.truncate()
    lock.write(f"{os.getpid()} {run_id or ''}\n")
    lock.flush()


def _orphaned_runs(runs: Path, taken: int) -> tuple[str, ...]:
    """The flow runs named by slot locks nobody holds: each died holding its slot (a run that ends
    clears its name). Each is named once: the lock file is cleared as it is read."""
    orphans = []
    for path in sorted(runs.glob("slot-*.lock")):
        if path.name == f"slot-{taken}.lock":
            continue
        with open(path, "a+") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a live run holds it
            _, run_id = _holder(lock)
            if run_id:
                orphans.append(run_id)
                lock.seek(0)
                lock.truncate()
    return tuple(orphans)


@contextmanager
def run_workspace(checkout: str | Path, revision: str = "HEAD", run_id: str | None = None) -> Iterator[RunWorkspace]:
    """Hold a slot of `checkout` at `revision` for the duration of the block, for flow run `run_id`."""
    root = checkout_root(checkout)
    try:
        commit = _git(root, "rev-parse", "--verify", f"{revision}^{{commit}}")
    except WorkspaceError as err:
        raise WorkspaceError(f"revision {revision!r} is not a commit of this repository", root) from err
    uncommitted = tuple(_git(root, "diff", "--name-only", "HEAD").splitlines())
    runs = root / RUNS_DIR
    runs.mkdir(parents=True, exist_ok=True)
    for slot in itertools.count():
        # "a+": opening must not erase the name a live holder wrote.
        lock = open(runs / f"slot-{slot}.lock", "a+")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            continue
        break
    try:
        _, previous = _holder(lock)
        _take(lock, run_id)
        orphans = ((previous,) if previous else ()) + _orphaned_runs(runs, slot)
        path = runs / f"slot-{slot}"
        with shared_git_state(root):
            _prepare_slot(root, path, commit)
        yield RunWorkspace(path=path, checkout=root, commit=commit, slot=slot, uncommitted=uncommitted,
                           orphaned_runs=orphans)
    finally:
        _take(lock, None)  # ended, however: its name leaves the slot
        fcntl.flock(lock, fcntl.LOCK_UN)
        lock.close()
