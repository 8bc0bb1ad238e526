"""A user's shell and a git copy of this checkout, for tests that run the README's commands.

The shell has no activated venv, and the `python`/`python3` on its PATH cannot import anything
(they exit 97), so nothing passes by finding the project's interpreter on PATH; commands name
`.venv/bin/...` as a user does.
"""
from __future__ import annotations

import os
import subprocess
import tempfile
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
    from tasks.params import header_for, render, write_params

    write_params(render("smoke"), repo / "params.yaml", header_for("smoke", []))
    (repo / ".venv").symlink_to(VENV)
    os.utime(repo / "pyproject.toml", (0, 0))  # older than the venv's install stamp: make installs nothing
    return repo
