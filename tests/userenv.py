"""A user's shell and a git copy of this checkout, for tests that run the README's commands.

The shell has no activated venv, and the `python`/`python3` on its PATH cannot import anything
(they exit 97), so nothing passes by finding the project's interpreter on PATH; commands name
`.venv/bin/...` as a user does.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"


def user_env(fake_bin: Path, **extra: str) -> dict:
    return {"HOME": os.environ.get("HOME", "/root"), "PATH": f"{fake_bin}:/usr/bin:/bin", "LANG": "C.UTF-8",
            "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
            "GIT_COMMITTER_EMAIL": "t@t", "TMPDIR": os.environ.get("TMPDIR", "/tmp"), **extra}


def shell(cmd: str, cwd: Path, fake_bin: Path, check: bool = True, timeout: int = 900, **extra_env: str
          ) -> subprocess.CompletedProcess:
    # Output goes to files, not pipes: a command that leaves daemons behind (`dvc queue start`'s workers inherit
    # its stdout) returns when it exits, as it does in a user's terminal, not when the last daemon closes a pipe.
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        returncode = subprocess.run(["bash", "-c", cmd], cwd=cwd, env=user_env(fake_bin, **extra_env), stdout=out,
                                    stderr=err, stdin=subprocess.DEVNULL, timeout=timeout).returncode
        out.seek(0), err.seek(0)
        proc = subprocess.CompletedProcess(cmd, returncode, out.read().decode(errors="replace"),
                                           err.read().decode(errors="replace"))
    if check and proc.returncode != 0:
        raise AssertionError(f"`{cmd}` failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def fake_python_bin(base: Path) -> Path:
    fake_bin = base / "bin"
    fake_bin.mkdir(parents=True, exist_ok=True)
    for name in ("python", "python3"):  # the interpreter a user's PATH finds first: not the project's
        (fake_bin / name).write_text("#!/bin/sh\necho 'not the project interpreter' >&2\nexit 97\n")
        (fake_bin / name).chmod(0o755)
    return fake_bin


def copy_checkout(repo: Path) -> Path:
    """This checkout's tracked and unignored files (no dvc.lock: a fresh start) in `repo`, the venv
    linked in, not yet a git repository. params.yaml is the smoke preset rendered, whatever the
    working one holds: a user's experiments there are not the tests' input."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
    for rel in files:
        src = ROOT / rel
        if rel == "dvc.lock" or not src.is_file():
            continue
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        (repo / rel).write_bytes(src.read_bytes())
        (repo / rel).chmod(src.stat().st_mode)
    from runner.params import header_for, render, write_params

    write_params(render("smoke"), repo / "params.yaml", header_for("smoke", []))
    (repo / ".venv").symlink_to(VENV)
    os.utime(repo / "pyproject.toml", (0, 0))  # older than the venv's install stamp: make installs nothing
    return repo


class PrefectApi:
    """The REST API of a test's own Prefect server (127.0.0.1:port), read as a user's UI reads it."""

    FINISHED = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")

    def __init__(self, port: str):
        self.base = f"http://127.0.0.1:{port}/api"

    def __call__(self, path: str, body: dict | None = None):
        request = urllib.request.Request(self.base + path, data=None if body is None else json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"},
                                         method="GET" if body is None else "POST")
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())

    def wait_for(self, run_id: str, timeout: float) -> dict:
        """The run once it has finished and its logs have all arrived: a flow run's process reports
        its final state before its last log batch (it ships logs every few seconds and at exit), so
        a test that reads the logs at once can miss the last stage's lines."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            run = self(f"/flow_runs/{run_id}")
            if run["state_type"] in self.FINISHED:
                self.settle_logs(run_id)
                return run
            time.sleep(2)
        raise AssertionError(f"flow run {run_id} did not finish in {timeout} s: {run['state_type']}")

    def settle_logs(self, run_id: str, quiet_s: float = 8, timeout: float = 120) -> None:
        seen, since, deadline = -1, time.time(), time.time() + timeout
        while time.time() < deadline:
            count = len(self.log_entries(run_id))
            if count != seen:
                seen, since = count, time.time()
            elif time.time() - since >= quiet_s:
                return
            time.sleep(1)

    def log_entries(self, run_id: str) -> list[dict]:
        entries, offset = [], 0
        while True:  # the API hands out at most 200 a call
            page = self("/logs/filter", {"logs": {"flow_run_id": {"any_": [run_id]}}, "limit": 200, "offset": offset,
                                         "sort": "TIMESTAMP_ASC"})
            entries += page
            if len(page) < 200:
                return entries
            offset += len(page)

    def logs_of(self, run_id: str) -> str:
        return "\n".join(entry["message"] for entry in self.log_entries(run_id))


@contextmanager
def prefect_team(repo: Path, base: Path, fake_bin: Path, api: PrefectApi, env: dict):
    """The README's team in `repo` as a user starts it: `make prefect-server` (its port and home in
    `env`), `make deploy`, then the workers the caller starts with the yielded `start(cmd, log,
    **env)`; everything started is stopped (its process group) at the end, server last."""
    background: list[subprocess.Popen] = []

    def start(cmd: str, log: str, **extra: str) -> subprocess.Popen:
        proc = subprocess.Popen(["bash", "-c", cmd], cwd=repo, env=user_env(fake_bin, **env, **extra),
                                start_new_session=True, stdout=open(base / log, "w"), stderr=subprocess.STDOUT)
        background.append(proc)
        return proc

    try:
        server = start("make prefect-server", "server.log")
        deadline = time.time() + 300
        while True:
            try:
                api("/health")
                break
            except OSError:
                if server.poll() is not None or time.time() > deadline:
                    raise AssertionError(f"the Prefect server did not come up:\n{(base / 'server.log').read_text()[-3000:]}")
                time.sleep(2)
        shell("make deploy", repo, fake_bin, **env)
        yield start, background
    finally:
        for proc in reversed(background):
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=30)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


def started_run_id(output: str) -> str:
    """The flow run a `prefect deployment run` started, from what it prints."""
    match = re.search(r"UUID:\s*([0-9a-f-]{36})", output)
    assert match, output
    return match.group(1)
