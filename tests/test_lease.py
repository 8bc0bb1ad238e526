"""Leases on a stage's inputs (flows/lease.py): one holder at a time across processes, waiters that
say whom they wait for, a dead holder's lease taken over, the key DVC's run-cache keys on."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from flows.lease import (EXPIRES_AFTER_BEATS, HEARTBEAT_ENV, FolderStore, Lease, RemoteStore, heartbeat_seconds,
                         stage_inputs)
from pgolf.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
KEY = "ab" * 32


def holder_process(root: Path, run: str, heartbeat_s: float, hold_s: float = 600) -> subprocess.Popen:
    """A run in another process that takes the lease and holds it (heartbeating) for `hold_s`."""
    script = (f"import time\nfrom flows.lease import FolderStore, Lease\n"
              f"lease = Lease(FolderStore({str(root)!r}), 'shards', {KEY!r}, {run!r}, heartbeat_s={heartbeat_s})\n"
              f"lease.acquire()\nprint('held', flush=True)\ntime.sleep({hold_s})\nlease.release()\nprint('released', flush=True)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_waiter_names_the_holder_and_takes_the_lease_when_it_is_released(tmp_path):
    holder = holder_process(tmp_path, "smoke seed=42", heartbeat_s=0.1, hold_s=1.5)
    said = []
    waiter = Lease(FolderStore(tmp_path), "shards", KEY, "smoke seed=0", said.append, heartbeat_s=0.1)
    started = time.monotonic()
    waiter.acquire()
    waited = time.monotonic() - started
    assert holder.stdout.readline().strip() == "released"  # it held on for its whole block
    holder.wait()
    assert waited > 0.5 and waiter.waited_for == ["smoke seed=42"]
    assert said[0].startswith("shards: waiting for run smoke seed=42, which holds it (host ")
    assert not any("expired" in line for line in said)  # it was alive: heartbeats kept the lease
    waiter.release()
    record = json.loads((tmp_path / f"shards-{KEY}" / "1.json").read_text())
    assert record["state"] == "released" and record["run"] == "smoke seed=0"
    assert [p.name for p in (tmp_path / f"shards-{KEY}").iterdir()] == ["1.json"]  # generation 0 removed


def test_a_killed_holders_lease_expires_and_a_waiter_takes_over(tmp_path):
    holder = holder_process(tmp_path, "smoke seed=42", heartbeat_s=0.2)
    said = []
    waiter = Lease(FolderStore(tmp_path), "shards", KEY, "smoke seed=0", said.append, heartbeat_s=0.2)
    threading.Timer(0.5, holder.kill).start()
    started = time.monotonic()
    waiter.acquire()
    waited = time.monotonic() - started
    holder.wait()
    assert waited >= 0.5 + EXPIRES_AFTER_BEATS * 0.2 - 0.1, waited  # not before it went silent for 4 beats
    assert said[0].startswith("shards: waiting for run smoke seed=42, which holds it")
    assert any(line.startswith("shards: the lease of run smoke seed=42 expired (no heartbeat for ")
               and line.endswith("taking over") for line in said), said
    waiter.release()


def test_a_holder_taken_for_dead_finds_out_and_never_overwrites_the_new_holder(tmp_path):
    store = FolderStore(tmp_path)
    said = []
    stalled = Lease(store, "train", KEY, "slow run", said.append, heartbeat_s=0.1)
    stalled.acquire()
    # Another run took the lease over (it waited out what it took for silence): generation 1.
    assert store.create(f"train-{KEY}", 1, {"run": "taker", "token": "t", "beat": 0, "state": "held"})
    time.sleep(0.5)
    assert stalled.lost and any("another run took over this run's lease" in line for line in said)
    stalled.release()
    assert store.read(f"train-{KEY}", 1)["run"] == "taker"


def contend(store_expr: str, root: Path, runs: int, log: Path) -> list[subprocess.Popen]:
    script = (f"import os, time\nfrom flows.lease import FolderStore, Lease, RemoteStore\n"
              f"from dvc.fs import LocalFileSystem\nstore = {store_expr}\n"
              "for i in range(3):\n"
              "    lease = Lease(store, 'corpus', 'k' * 64, f'run {os.getpid()}', lambda line: None, heartbeat_s=0.5)\n"
              "    lease.acquire()\n"
              f"    with open({str(log)!r}, 'a') as f: f.write(f'{{os.getpid()}} in {{time.time()}}\\n')\n"
              "    time.sleep(0.05)\n"
              f"    with open({str(log)!r}, 'a') as f: f.write(f'{{os.getpid()}} out {{time.time()}}\\n')\n"
              "    lease.release()\n")
    return [subprocess.Popen([sys.executable, "-c", script], cwd=ROOT) for _ in range(runs)]


@pytest.mark.parametrize("store_expr", [
    "FolderStore({root!r})",
    # DVC's filesystem API as an object-store remote is driven (no exclusive create): write, settle, read back
    "RemoteStore(LocalFileSystem(), {root!r}, settle_s=0.05)",
])
def test_one_holder_at_a_time_across_processes(tmp_path, store_expr):
    log = tmp_path / "log"
    procs = contend(store_expr.format(root=str(tmp_path / "leases")), tmp_path, 4, log)
    for proc in procs:
        assert proc.wait(timeout=120) == 0
    events = [line.split() for line in log.read_text().splitlines()]
    assert len(events) == 4 * 3 * 2
    inside = None
    for pid, what, _ in events:  # in, out, in, out: never two inside at once
        if what == "in":
            assert inside is None, events
            inside = pid
        else:
            assert inside == pid, events
            inside = None


def test_the_heartbeat_setting(monkeypatch):
    monkeypatch.delenv(HEARTBEAT_ENV, raising=False)
    assert heartbeat_seconds() == 15.0
    monkeypatch.setenv(HEARTBEAT_ENV, "0.5")
    assert heartbeat_seconds() == 0.5
    for bad in ("0", "-1", "soon", "nan", "1e9"):
        monkeypatch.setenv(HEARTBEAT_ENV, bad)
        with pytest.raises(ConfigError, match=HEARTBEAT_ENV):
            heartbeat_seconds()


def dvc(cwd: Path, *args: str) -> None:
    subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, check=True, capture_output=True,
                   env={**os.environ, "DVC_NO_ANALYTICS": "1"})


def test_the_key_is_dvcs_run_cache_key_and_the_lease_lives_with_the_shared_cache(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    dvc(project, "init", "--no-scm", "-q")
    (project / "params.yaml").write_text("copy:\n  n: 1\n")
    (project / "input.txt").write_text("one\n")
    (project / "dvc.yaml").write_text("stages:\n  copy:\n    cmd: cp input.txt output.txt\n    deps: [input.txt]\n"
                                      "    params: [copy]\n    outs: [output.txt]\n")
    before = stage_inputs(project, "copy")
    assert isinstance(before.store, FolderStore) and before.store.root == project / ".dvc" / "cache" / "pgolf-leases"
    assert not before.restorable()
    dvc(project, "repro", "-q")
    after = stage_inputs(project, "copy")
    assert after.key == before.key and after.restorable()
    assert [p.name for p in (project / ".dvc" / "cache" / "runs").glob("*/*")] == [after.key]  # DVC's own entry
    (project / "params.yaml").write_text("copy:\n  n: 2\n")  # another input: another key, not in the run-cache
    changed = stage_inputs(project, "copy")
    assert changed.key != after.key and not changed.restorable()
    # With a default remote the lease lives there, where every worker sharing it looks; its run-cache
    # counts as restorable once pushed.
    remote = tmp_path / "remote"
    dvc(project, "remote", "add", "-d", "team", str(remote))
    (project / "params.yaml").write_text("copy:\n  n: 1\n")
    dvc(project, "push", "--run-cache", "-q")
    shutil_rm(project / ".dvc" / "cache")
    on_remote = stage_inputs(project, "copy")
    assert on_remote.store.root == remote / "pgolf-leases" and on_remote.key == after.key and on_remote.restorable()
    (project / "input.txt").unlink()
    assert stage_inputs(project, "copy") is None  # a dependency missing: DVC says so when it runs the stage


def shutil_rm(path: Path) -> None:
    import shutil

    shutil.rmtree(path)
