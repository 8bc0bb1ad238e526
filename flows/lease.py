"""Leases: a stage computed once however many runs want it at the same time.

Three seeds' runs started together need the same corpus, tokenizer and shards (the seed reaches
train only). Without coordination each computes them, racing into the same cache. With a lease,
the first run to want a stage takes the lease named by the stage's inputs; the others wait
("shards: waiting for run smoke seed=42, which holds it"), and when it is released each in turn
takes it and asks DVC for the stage, which then restores the holder's output from the run-cache
(or pulls it from the remote) instead of computing it.

The key is the one DVC's run-cache files the stage's result under (dvc/stage/cache.py
`_get_stage_hash`: the command, each dependency's hash, the stage's params, its outputs' paths),
so "the same stage with the same inputs" means what DVC means by it: a run-cache hit.

Where a lease lives: beside what it protects, in the place every party that shares the cache
reaches. With a default DVC remote, on the remote (`<remote>/pgolf-leases/`): the runs sharing it
may be on other machines, and it is the one place all of them read and write. Without one, in the
DVC cache folder (`<cache>/pgolf-leases/`), which the slots of a checkout and the checkouts
configured to share a cache have in common. Not Prefect's lock managers or concurrency limits: an
in-process run (`pgolf sweep` without --deployment, `pgolf run --via prefect`) talks to a temporary
server of its own, so two of them sharing a cache would never see each other's locks; Prefect's
cache-policy locks also expire after a fixed hold_timeout, which a stage of unknown length (an
hour of shards) either outlives or leaves a dead holder's waiters idle for; and the remote is
already what every worker must reach.

A lease is a file per generation, `<stage>-<key>/<gen>.json`: {run, host, pid, token, beat,
heartbeat_s, state}. The current lease is the highest generation. Taking a free lease (none yet,
or the current one released) or an expired one means creating the next generation exclusively
(link(2) of a complete file: one creator wins, on NFS too), then checking that no higher
generation appeared; so two runs never both hold it. The holder rewrites its file every
`heartbeat_s` (a thread), bumping `beat`; a waiter that sees neither the beat nor the generation
change for EXPIRES_AFTER_BEATS heartbeats, by its own clock (machines' clocks need not agree),
takes over. A holder that finds a higher generation lost its lease (it was taken for dead): it
says so and finishes; its output is the same bytes, so the cost is the duplicate work only.

An object-store remote (s3://, gs://, ...) has no exclusive create through DVC's filesystem: the
creator writes, waits a moment and reads back (the last writer wins), so in a narrow race two runs
may both compute the stage. Never a wrong result: DVC's cache holds the same bytes either way.

The heartbeat is PGOLF_LEASE_HEARTBEAT_S seconds (default 15: a dead holder's lease expires after
a minute); the worker's environment reaches the flow runs it starts.
"""
from __future__ import annotations

import json
import math
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pgolf.errors import ConfigError, PgolfError

HEARTBEAT_ENV = "PGOLF_LEASE_HEARTBEAT_S"
DEFAULT_HEARTBEAT_S = 15.0
EXPIRES_AFTER_BEATS = 4
LEASES_DIR = "pgolf-leases"


def heartbeat_seconds() -> float:
    text = os.environ.get(HEARTBEAT_ENV, "").strip()
    if not text:
        return DEFAULT_HEARTBEAT_S
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and 0 < value <= 3600):
        raise ConfigError(f"{HEARTBEAT_ENV} must be a number of seconds in (0, 3600], got {text!r}")
    return value


class FolderStore:
    """Lease files in a folder of a POSIX filesystem (the DVC cache, a shared-folder remote)."""

    exclusive = True

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def __str__(self) -> str:
        return str(self.root)

    def generations(self, key: str) -> list[int]:
        try:
            names = os.listdir(self.root / key)
        except FileNotFoundError:
            return []
        return sorted(int(n[:-5]) for n in names if n.endswith(".json") and n[:-5].isdigit())

    def read(self, key: str, gen: int) -> dict | None:
        try:
            return json.loads((self.root / key / f"{gen}.json").read_text())
        except (FileNotFoundError, ValueError):
            return None

    def _tmp(self, key: str, gen: int) -> Path:
        folder = self.root / key
        folder.mkdir(parents=True, exist_ok=True)
        return folder / f".{gen}.json.tmp-{uuid.uuid4().hex}"

    def create(self, key: str, gen: int, data: dict) -> bool:
        tmp = self._tmp(key, gen)
        tmp.write_text(json.dumps(data))
        try:
            os.link(tmp, self.root / key / f"{gen}.json")  # fails if it exists: one creator wins
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def write(self, key: str, gen: int, data: dict) -> None:
        tmp = self._tmp(key, gen)
        tmp.write_text(json.dumps(data))
        os.replace(tmp, self.root / key / f"{gen}.json")

    def remove(self, key: str, gen: int) -> None:
        (self.root / key / f"{gen}.json").unlink(missing_ok=True)


class RemoteStore:
    """Lease files on a DVC remote's filesystem (an object store): no exclusive create, so a
    creator writes, waits `settle_s` and reads its token back."""

    exclusive = False

    def __init__(self, fs, root: str, settle_s: float = 2.0):
        self.fs, self.root, self.settle_s = fs, root, settle_s

    def __str__(self) -> str:
        return self.fs.unstrip_protocol(self.root)

    def _path(self, key: str, gen: int | None = None) -> str:
        return self.fs.join(self.root, key, *([f"{gen}.json"] if gen is not None else []))

    def generations(self, key: str) -> list[int]:
        try:
            names = [self.fs.name(p) for p in self.fs.ls(self._path(key))]
        except FileNotFoundError:
            return []
        return sorted(int(n[:-5]) for n in names if n.endswith(".json") and n[:-5].isdigit())

    def read(self, key: str, gen: int) -> dict | None:
        try:
            return json.loads(self.fs.cat_file(self._path(key, gen)))
        except (FileNotFoundError, ValueError):
            return None

    def create(self, key: str, gen: int, data: dict) -> bool:
        if self.fs.exists(self._path(key, gen)):
            return False
        self.write(key, gen, data)
        time.sleep(self.settle_s)
        return (self.read(key, gen) or {}).get("token") == data["token"]

    def write(self, key: str, gen: int, data: dict) -> None:
        self.fs.makedirs(self._path(key), exist_ok=True)
        self.fs.pipe_file(self._path(key, gen), json.dumps(data).encode())

    def remove(self, key: str, gen: int) -> None:
        try:
            self.fs.rm_file(self._path(key, gen))
        except FileNotFoundError:
            pass


class Lease:
    """The lease on one stage's inputs, for one run. `acquire` returns when this run holds it."""

    def __init__(self, store, stage: str, key: str, run: str, say: Callable[[str], object] = print,
                 heartbeat_s: float | None = None):
        self.store, self.stage, self.run, self.say = store, stage, run, say
        self.key = f"{stage}-{key}"
        self.heartbeat_s = heartbeat_seconds() if heartbeat_s is None else heartbeat_s
        self.token = uuid.uuid4().hex
        self.gen: int | None = None
        self.beat = 0
        self.lost = False
        self.waited_for: list[str] = []  # the runs this one waited for, in order
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def _record(self, state: str, **extra) -> dict:
        return {"run": self.run, "host": socket.gethostname(), "pid": os.getpid(), "token": self.token,
                "beat": self.beat, "heartbeat_s": self.heartbeat_s, "state": state, "stage": self.stage, **extra}

    def acquire(self) -> None:
        seen: tuple | None = None  # (gen, token, beat) of the holder last seen, and since when
        seen_since = time.monotonic()
        announced: set[str] = set()
        while True:
            gens = self.store.generations(self.key)
            top = gens[-1] if gens else -1
            holder = self.store.read(self.key, top) if top >= 0 else None
            if top >= 0 and holder is None:
                time.sleep(0.2)  # an object store's file being written: read it again
                continue
            if holder is None or holder.get("state") == "released":
                if self._take(top + 1, gens):
                    return
                continue
            now = time.monotonic()
            state = (top, holder.get("token"), holder.get("beat"))
            if state != seen:
                seen, seen_since = state, now
            if holder.get("token") not in announced:
                announced.add(holder.get("token"))
                self.waited_for.append(holder.get("run", "?"))
                self.say(f"{self.stage}: waiting for run {holder.get('run', '?')}, which holds it "
                         f"(host {holder.get('host', '?')}, pid {holder.get('pid', '?')}; lease {self.store}/{self.key})")
            holder_heartbeat = float(holder.get("heartbeat_s") or self.heartbeat_s)
            silent = now - seen_since
            if silent >= EXPIRES_AFTER_BEATS * holder_heartbeat:
                self.say(f"{self.stage}: the lease of run {holder.get('run', '?')} expired (no heartbeat for "
                         f"{silent:.0f} s, {EXPIRES_AFTER_BEATS} of its {holder_heartbeat:g} s beats): taking over")
                if self._take(top + 1, gens):
                    return
                continue
            time.sleep(max(0.1, min(2.0, holder_heartbeat / 4)))

    def _take(self, gen: int, older: list[int]) -> bool:
        if not self.store.create(self.key, gen, self._record("held")):
            return False
        if max(self.store.generations(self.key), default=gen) > gen:
            # Another run took a later generation meanwhile (it saw an older list): it holds.
            self.store.write(self.key, gen, self._record("released", outcome="superseded"))
            return False
        self.gen = gen
        for old in older:  # superseded: nobody reads them again
            self.store.remove(self.key, old)
        self._thread = threading.Thread(target=self._heartbeat, name=f"lease-{self.key[:24]}", daemon=True)
        self._thread.start()
        return True

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            with self._lock:
                if self._stop.is_set():
                    return
                try:
                    if max(self.store.generations(self.key), default=-1) > self.gen:
                        self.lost = True
                        self.say(f"{self.stage}: another run took over this run's lease (its heartbeat was "
                                 f"taken for dead); finishing the stage anyway: its output is the same bytes")
                        return
                    self.beat += 1
                    self.store.write(self.key, self.gen, self._record("held"))
                except OSError as err:  # a flaky shared folder: the next beat tries again
                    self.say(f"{self.stage}: lease heartbeat failed ({err}); retrying")

    def release(self, outcome: str = "done") -> None:
        self._stop.set()
        with self._lock:
            if self.gen is not None and not self.lost:
                self.store.write(self.key, self.gen, self._record("released", outcome=outcome))
            self.gen = None


class RestoreError(PgolfError):
    """A stage this run was to restore (another pool's run computes it) is in neither the cache nor
    the remote for these inputs."""


@dataclass(frozen=True)
class StageInputs:
    """A stage as DVC would run it in a workspace: the run-cache key of its inputs, and where its
    lease and its run-cache entry can be."""

    stage: str
    key: str
    store: FolderStore | RemoteStore
    runs_dir: Path  # the local cache's run-cache folder
    remote: tuple | None  # (fs, path) of the default remote, or None

    def restorable(self) -> bool:
        """Whether DVC's run-cache, here or on the remote, has an entry for these inputs."""
        if (self.runs_dir / self.key[:2] / self.key).is_dir():
            return True
        if self.remote is None:
            return False
        fs, path = self.remote
        return bool(fs.exists(fs.join(path, "runs", self.key[:2], self.key)))


def stage_inputs(workspace: str | Path, stage: str) -> StageInputs | None:
    """The stage's run-cache key (DVC hashes its dependencies first, as `dvc repro` would), or None
    where DVC could not hash it (a dependency missing: DVC says so when it runs the stage)."""
    from dvc.fs import LocalFileSystem
    from dvc.stage.cache import _can_hash, _get_stage_hash

    from flows.repro import dvc_repo

    with dvc_repo(workspace) as repo:
        try:
            (target,) = repo.stage.collect(stage)
            target.save_deps()
            if not _can_hash(target):
                return None
            key = _get_stage_hash(target)
        except Exception:  # noqa: BLE001 - DVC's own errors for a missing or unhashable dependency
            return None
        runs_dir = Path(repo.cache.legacy.path) / "runs"
        name = repo.config["core"].get("remote")
        remote = None
        if name:
            cloud = repo.cloud.get_remote(name)
            remote = (cloud.fs, cloud.path)
            if isinstance(cloud.fs, LocalFileSystem):
                store = FolderStore(Path(cloud.path) / LEASES_DIR)
            else:
                store = RemoteStore(cloud.fs, cloud.fs.join(cloud.path, LEASES_DIR))
        else:
            store = FolderStore(Path(repo.cache.legacy.path) / LEASES_DIR)
    return StageInputs(stage, key, store, runs_dir, remote)


@contextmanager
def stage_lease(workspace: str | Path, stage: str, run: str, say: Callable[[str], object] = print
                ) -> Iterator[StageInputs | None]:
    """Hold the lease on `stage`'s inputs in `workspace` for the block (yields them), or, where DVC
    cannot key the stage or the lease folder cannot be written, say why and yield None."""
    inputs = stage_inputs(workspace, stage)
    if inputs is None:
        yield None
        return
    lease = Lease(inputs.store, stage, inputs.key, run, say)
    try:
        lease.acquire()
    except OSError as err:
        say(f"{stage}: no lease on its inputs ({err}); computing without one, so another run may compute it too")
        yield inputs
        return
    outcome = "failed"
    try:
        yield inputs
        outcome = "done"
    finally:
        lease.release(outcome)
