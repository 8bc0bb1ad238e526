"""Run records: what a stage's run took and ran on, kept beside its output, never in it.

Written by runner.stage's execute() after a stage's output is in place; read by the cache refresh
after DVC restores an output (flows/repro.py), the runs a workspace holds (runner/runs.py), the
compliance clock (the gptq stage reads the train record of the weights it quantizes) and the export.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


# What a run took (seconds, host, code revision) never goes into a stage's output: an output holds
# only what its inputs determine, so a rerun on the same inputs writes the same bytes and DVC reruns
# nothing downstream. It goes into a run record beside the output, <parent>/.runs/<name>.json
# (artifacts/eval -> artifacts/.runs/eval.json), which DVC does not track; dvc.yaml lists the eval
# and pack records as metrics, so `dvc metrics show` has the seconds too.
RUNS_DIR_NAME = ".runs"
# A stage's run() hands its own timings (load vs scoring seconds, tokens/s) to its record through
# this file in the temporary output; execute() moves it into the record before the rename.
TIMINGS_NAME = ".timings.json"


# Every record is also kept under its output's identity here, so that when DVC restores an output
# from its cache (run-cache, `dvc checkout`), the record of the run that made it can be put back.
HISTORY_DIR_NAME = "history"


def run_record_path(out: str | Path) -> Path:
    out = Path(out)
    return out.parent / RUNS_DIR_NAME / f"{out.name}.json"


def read_timings(out: str | Path) -> dict:
    """The timings a stage's run() has recorded so far into the temporary output `out`."""
    path = Path(out) / TIMINGS_NAME
    return json.loads(path.read_text()) if path.exists() else {}


def canonical_sha256(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def output_identity(cfg: Any, out: str | Path) -> dict:
    """What a run record is of: the stage's config (resolved, so any spelling of the same values
    matches) and the JSON files of its output (as data, so the parsed metrics `dvc exp show --json`
    gives compare too). A record whose identity is not the output's in place is another run's."""
    return {"params_sha256": config_sha256(cfg), "outputs": output_files_sha256(out)}


def output_files_sha256(out: str | Path) -> dict[str, str]:
    outputs = {}
    for path in sorted(Path(out).glob("*.json")):
        if not path.name.startswith("."):
            try:
                outputs[path.name] = canonical_sha256(json.loads(path.read_text()))
            except (OSError, ValueError):
                continue
    return outputs


def config_sha256(cfg: Any) -> str:
    return canonical_sha256(dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else cfg)


def identity_matches(identity: dict | None, params_sha256: str, outputs: dict[str, str]) -> bool:
    """True when a record's identity is of this config and of these output files (those of its own
    that `outputs` has: a view with only the metrics files checks those)."""
    if not identity:
        return False
    shared = set(identity.get("outputs", {})) & set(outputs)
    return identity.get("params_sha256") == params_sha256 and all(identity["outputs"][n] == outputs[n] for n in shared)


def history_path(out: str | Path, identity: dict) -> Path:
    out = Path(out)
    return out.parent / RUNS_DIR_NAME / HISTORY_DIR_NAME / f"{out.name}-{canonical_sha256(identity)[:20]}.json"


def refresh_run_record(stage: str, cfg: Any, out: str | Path) -> str:
    """After DVC restored `out` from its cache: make its run record the one of the run that made
    it. "current" (it was), "restored" (this machine's history had it), or "unknown" (no run of it
    here: the record then says so, with no seconds, rather than showing another run's)."""
    out = Path(out)
    identity = output_identity(cfg, out)
    record = read_run_record(out)
    if record and record.get("of") == identity:
        return "current"
    if record and "of" not in record and not record.get("restored"):
        return "current"  # written before records named their output: nothing to tell it by, so kept
    now = time.time()
    restored = {"restored": True, "restored_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))}
    try:
        record = {**json.loads(history_path(out, identity).read_text()), **restored}
        status = "restored"
    except (FileNotFoundError, json.JSONDecodeError):
        record = {"stage": stage, "out": str(out), **restored, "seconds": None, "timings": {}, "of": identity,
                  "note": "outputs restored from DVC's cache; this machine has no record of the run that made them"}
        status = "unknown"
    _write_record(run_record_path(out), record)
    return status


def record_timings(out: str | Path, **timings: Any) -> None:
    """Add timings to the record of the run writing `out` (rank 0 only, in multi-process stages)."""
    path = Path(out) / TIMINGS_NAME
    merged = {**(json.loads(path.read_text()) if path.exists() else {}), **timings}
    path.write_text(json.dumps(merged, indent=2, sort_keys=True, default=str) + "\n")



def record_matches(record: dict | None, out: str | Path) -> bool:
    """Whether `record` was written by the run that wrote the output now in `out`: its identity's
    output files are those in `out` (a record read beside another stage's output, as the gptq clock
    reads the train record of the weights it quantized, has no config to compare)."""
    outputs = ((record or {}).get("of") or {}).get("outputs")
    return bool(outputs) and outputs == output_files_sha256(out)


def record_run(stage: str, out: Path, started: float, seconds: float, timings: dict,
               inputs: list[Path] | tuple[Path, ...] = (), identity: dict | None = None) -> Path:
    """The run's record beside `out` (and under its identity in the history, when it has one), with
    the environment that produced it (the inputs' shard folders among it)."""
    path = run_record_path(out)
    env = environment([*inputs, out])
    record = {
        "stage": stage,
        "out": str(out),
        "out_inode": out.stat().st_ino,
        "started": started,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "seconds": round(seconds, 3),
        "host": socket.gethostname(),
        "code_version": env["commit"],  # the environment's, asked once per process: the two never disagree
        "environment": env,
        "timings": timings,
        **({"of": identity} if identity is not None else {}),
    }
    _write_record(path, record)
    if identity is not None:
        _write_record(history_path(out, identity), record)
    return path


def _write_record(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def read_run_record(out: str | Path) -> dict | None:
    """The record of the last run that wrote `out`, or None when none did (or it is unreadable)."""
    try:
        return json.loads(run_record_path(out).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def code_version() -> str:
    """The git commit the code ran from (with `+dirty` for uncommitted edits): for run records only,
    never for an output, whose bytes must not depend on which commit wrote them."""
    root = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, cwd=root).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, check=True, cwd=root).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return rev + ("+dirty" if dirty else "")


_environment: dict | None = None


def environment(folders: list[Path] | tuple[Path, ...] = ()) -> dict:
    """What a run ran on, for its record (never an output): the software and hardware that can change
    its numbers (#86, #1334: reruns on another FlashAttention wheel, another shard count), the
    compressors, the commit, and the shard folders it read or wrote (counts, manifest hash)."""
    global _environment
    if _environment is None:
        _environment = {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "commit": code_version(),
            "packages": _package_versions(),
            **_accelerator(),
            "compressors": _compressors(),
        }
    shards = [_shards_fingerprint(Path(f)) for f in folders]
    return {**_environment, "shards": [s for s in shards if s]}


PACKAGES = ("torch", "triton", "flash-attn", "flash_attn_3", "numpy", "sentencepiece", "safetensors", "brotli",
            "zstandard", "python-minifier", "dvc", "prefect")


def _package_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def _accelerator() -> dict:
    """CUDA and GPUs from torch when the stage loaded it (importing it costs seconds), else from nvidia-smi."""
    torch = sys.modules.get("torch")
    if torch is not None:
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return {"cuda": torch.version.cuda, "gpus": {"count": count,
                                                    "names": [torch.cuda.get_device_name(i) for i in range(count)]}}
    names: list[str] = []
    if shutil.which("nvidia-smi"):
        try:
            names = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                                   text=True, timeout=10, check=True).stdout.strip().splitlines()
        except (OSError, subprocess.SubprocessError):
            names = []
    local = (_package_versions().get("torch") or "").partition("+")[2]
    cuda = f"{local[2:-1]}.{local[-1]}" if local.startswith("cu") and len(local) > 3 else None
    return {"cuda": cuda, "gpus": {"count": len(names), "names": names}}


def _compressors() -> dict:
    import zlib

    out = {"zlib": zlib.ZLIB_RUNTIME_VERSION, "lzma": f"python {platform.python_version()}"}
    try:
        import zstandard

        out["zstd"] = zstandard.ZSTD_VERSION and ".".join(map(str, zstandard.ZSTD_VERSION))
    except ImportError:
        out["zstd"] = None
    try:
        import brotli

        out["brotli"] = getattr(brotli, "version", None) or getattr(brotli, "__version__", None)
    except ImportError:
        out["brotli"] = None
    out["lrzip"] = None
    if shutil.which("lrzip"):
        try:
            done = subprocess.run(["lrzip", "-V"], capture_output=True, text=True, timeout=10)
            out["lrzip"] = (done.stdout or done.stderr).strip().splitlines()[0] if (done.stdout or done.stderr).strip() else "installed"
        except (OSError, subprocess.SubprocessError):
            out["lrzip"] = "installed"
    return out


def _shards_fingerprint(folder: Path) -> dict | None:
    manifest_path = folder / "manifest.json"
    if not manifest_path.is_file():
        return None
    raw = manifest_path.read_bytes()
    try:
        manifest = json.loads(raw)
    except json.JSONDecodeError:
        return None
    if not isinstance(manifest, dict) or "files" not in manifest:
        return None
    files = manifest.get("files") or []
    return {"folder": str(folder), "manifest_sha256": hashlib.sha256(raw).hexdigest(),
            "files_train": sum(f.get("split") == "train" for f in files),
            "files_val": sum(f.get("split") == "val" for f in files),
            "tokens_train": (manifest.get("stats") or {}).get("tokens_train"),
            "tokens_val": (manifest.get("stats") or {}).get("tokens_val"),
            "canonical": manifest.get("canonical"),
            "val_docs_sha256": (manifest.get("certificate") or {}).get("val_docs_sha256")}
