"""What every stage shares: reading its params section, checking inputs, atomic output, run records.

A stage module defines `Config` (a dataclass), `SPEC` (a StageSpec) and `run(cfg, inputs, out)`,
and ends with `if __name__ == "__main__": stage_main(SPEC)`. `run` writes into `out`, a fresh
temporary folder; only when it returns does the folder replace the stage's real output, so a
failed stage never leaves a half-written output behind.
"""
from __future__ import annotations

import argparse
import dataclasses
import errno
import hashlib
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from pgolf.errors import ConfigError, InputError, PgolfError, StageInterrupted
from pgolf.typed_params import from_dict, read_yaml, shown

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
    outputs = {}
    for path in sorted(Path(out).glob("*.json")):
        if not path.name.startswith("."):
            try:
                outputs[path.name] = canonical_sha256(json.loads(path.read_text()))
            except (OSError, ValueError):
                continue
    return {"params_sha256": config_sha256(cfg), "outputs": outputs}


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


# The stages in pipeline order (their registry, with their modules, is tasks/stages.py; this module
# cannot import it, since every stage imports this one). Each has the params section of its name.
PIPELINE = ("corpus", "tokenizer", "shards", "train", "gptq", "pack", "eval")

# A stage's module is tasks/<stage>.py, but for eval: a module named `eval` shadows the builtin
# wherever it is imported by name. bin/stage has the same one exception.
MODULE_OF_STAGE = {"eval": "evaluate"}


def stage_module(stage: str) -> str:
    return f"tasks.{MODULE_OF_STAGE.get(stage, stage)}"


@dataclass(frozen=True)
class StageSpec:
    name: str
    config_cls: type
    run: Callable[[Any, dict[str, Path], Path], dict]
    out: str
    # input name -> default path; the upstream stage that produces it, for error messages
    inputs: dict[str, str] = field(default_factory=dict)
    producers: dict[str, str] = field(default_factory=dict)
    # What DVC tracks (dvc.yaml, checked by tests/test_contract.py): the output's parts, when DVC
    # tracks them apart (the shard splits), and the parts of an input the stage reads, so that a
    # judge can pull exactly those (eval reads the val shards, never the training ones).
    dvc_outs: tuple[str, ...] = ()
    input_parts: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # Inputs DVC tracks always but the stage reads only when its config asks (train's tokenizer,
    # for val_every): missing, they are left out and the stage says when it needs one.
    optional_inputs: tuple[str, ...] = ()
    # params.yaml sections run() reads as they are written, its own among them or not (pack counts
    # the exported script, which carries train, gptq, pack and eval): run() gets them as `params=`
    # (stage_main reads them from the params file), and dvc.yaml lists the others' after its own.
    reads_params: tuple[str, ...] = ()

    @property
    def module(self) -> str:
        return stage_module(self.name)

    def outs_for_dvc(self) -> list[str]:
        return [f"{self.out}/{part}" for part in self.dvc_outs] or [self.out]

    def deps_for_dvc(self) -> list[str]:
        return [f"{path}/{part}" if name in self.input_parts else path
                for name, path in self.inputs.items() for part in self.input_parts.get(name, ("",))]


def load_config(spec: StageSpec, params_path: str | Path = "params.yaml"):
    params = read_yaml(params_path)
    check_sections(params, params_path, (spec.name,))
    return from_dict(spec.config_cls, params.get(spec.name, {}), f"{params_path}: {spec.name}")


def check_sections(params: dict, where: str | Path, also: tuple[str, ...] = ()) -> None:
    """Every top-level key of a params file is a stage: a misspelt section (`tokenzier:`) would
    otherwise leave its stage on the defaults without a word."""
    known = PIPELINE + also
    unknown = sorted((k for k in params if k not in known), key=str)
    if unknown:
        raise ConfigError(f"{where}: unknown section(s) {', '.join(shown(k) for k in unknown[:5])}; "
                          f"sections are {', '.join(known)}")


def check_inputs(spec: StageSpec, inputs: dict[str, Path]) -> dict[str, Path]:
    """The inputs the stage gets: every required one exists, a missing optional one is left out."""
    present = {}
    for name, path in inputs.items():
        if Path(path).exists():
            present[name] = path
        elif name not in spec.optional_inputs:
            producer = spec.producers.get(name)
            hint = f"; run the '{producer}' stage first (dvc repro {producer})" if producer else ""
            raise InputError(f"input '{name}' of stage '{spec.name}' does not exist{hint}", path)
    return present


def _replace_dir(tmp: Path, out: Path) -> None:
    if out.exists() or out.is_symlink():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_leftovers(out: Path) -> list[Path]:
    """Remove the temporary folders a killed run of this output left (`.<name>.tmp-<pid>`,
    `.<name>.old-<pid>` whose process is gone); a live run's are left alone."""
    removed = []
    if not out.parent.is_dir():
        return removed
    for path in out.parent.glob(f".{out.name}.*-*"):
        kind, _, pid = path.name.removeprefix(f".{out.name}.").partition("-")
        if kind in ("tmp", "old") and pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def check_replaceable(spec: StageSpec, out: Path) -> None:
    """A stage replaces an existing output folder only when it is empty, the stage's own folder
    (`spec.out`, which DVC manages), or a folder this stage's run record says it wrote: `--out ~`
    or `--out /` must never remove what the stage did not write."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise InputError(f"the '{spec.name}' stage's output must be a folder (or a new path), not a file or a link", out)
    if not out.exists() or not any(out.iterdir()):
        return
    resolved = out.resolve()
    if resolved == Path(spec.out).resolve():
        return
    # The record beside the folder names the folder this stage last wrote there by its inode, so a
    # folder deleted and made again by hand under the same name is not taken for the stage's.
    record = read_run_record(out)
    if record and record.get("stage") == spec.name and record.get("out_inode") == out.stat().st_ino:
        return
    raise InputError(f"refusing to replace this folder: it is not empty and the '{spec.name}' stage did not write "
                     f"it (no run record at {run_record_path(out)}); remove it yourself or choose a new --out", out)


def execute(spec: StageSpec, cfg: Any, inputs: dict[str, Path] | None = None, out: str | Path | None = None,
            params: dict | None = None) -> dict:
    """Run one stage into a temporary folder and rename it into place on success. `params`: the
    sections of spec.reads_params, for run()."""
    inputs = {k: Path(v) for k, v in (inputs or {k: v for k, v in spec.inputs.items()}).items()}
    out = Path(out or spec.out)
    check_replaceable(spec, out)
    inputs = check_inputs(spec, inputs)
    out.parent.mkdir(parents=True, exist_ok=True)
    for path in remove_leftovers(out):
        print(f"pgolf {spec.name}: removed {path}, left by a run that was killed", file=sys.stderr)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    started = time.time()
    try:
        metrics = spec.run(cfg, inputs, tmp, **({"params": params} if params is not None else {})) or {}
        timings_file = tmp / TIMINGS_NAME
        timings = json.loads(timings_file.read_text()) if timings_file.exists() else {}
        timings_file.unlink(missing_ok=True)
        identity = output_identity(cfg, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _replace_dir(tmp, out)
    seconds = time.time() - started
    record_run(spec.name, out, started, seconds, timings, list(inputs.values()), identity)
    return {**metrics, **timings}


# The file whose bytes identify a stage's output (its summary): a record names it with its sha256, so
# a record read beside another stage's output (the gptq clock reads the train record of the weights
# it quantized) can tell whether it is that output's; output_identity above also holds the config.
IDENTITY_FILES = ("metrics.json", "report.json", "size.json", "manifest.json", "tokenizer.json", "meta.json")


def output_file_identity(out: str | Path) -> dict | None:
    for name in IDENTITY_FILES:
        path = Path(out) / name
        if path.is_file():
            return {"file": name, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    return None


def record_matches(record: dict | None, out: str | Path) -> bool:
    """Whether `record` was written by the run that wrote the output now in `out`."""
    return bool(record) and record.get("identity") is not None and record["identity"] == output_file_identity(out)


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
        "identity": output_file_identity(out),
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


def compile_cache_outside_tmpdir() -> None:
    """torch.compile's cache in the user's cache folder (kept between runs: a stage compiles once),
    not TMPDIR, inductor's default. Set in the stage process before anything compiles; torchrun's
    workers inherit it."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(base, "pgolf", "torchinductor"))


class Terminated(BaseException):
    """The stage process got SIGTERM. A BaseException, as KeyboardInterrupt is: no `except Exception`
    on the way out may swallow it."""


def _terminated(signum, frame) -> None:
    raise Terminated()


# A write that fails names no file (the file is already open): these errors are the output's disk.
DISK_FULL = frozenset({errno.ENOSPC, errno.EFBIG, errno.EDQUOT})


def os_error_message(err: OSError, out: str | Path) -> str:
    """One line for an OSError: the file and the system's reason; a failed write without a file name
    names the output being written (whose disk filled)."""
    reason = err.strerror or type(err).__name__
    if err.filename is not None:
        return f"{err.filename}: {reason}" + (f" ({err.filename2})" if err.filename2 else "")
    if err.errno in DISK_FULL:
        return f"{out}: {reason} while writing this output (its earlier version is kept)"
    return f"{reason} ({TRACEBACK_HINT})"


TRACEBACK_HINT = "PGOLF_TRACEBACK=1 shows where"


def stage_main(spec: StageSpec, argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog or f"python -m {spec.module}", description=f"pgolf stage '{spec.name}'")
    parser.add_argument("--params", default="params.yaml", help="params file whose '%s' section configures the stage" % spec.name)
    parser.add_argument("--out", default=spec.out, help=f"output folder (default {spec.out})")
    for name, default in spec.inputs.items():
        parser.add_argument(f"--{name.replace('_', '-')}", dest=f"input_{name}", default=default,
                            help=f"input folder '{name}' (default {default})")
    args = parser.parse_args(argv)
    # SIGTERM (DVC, Prefect, a scheduler stopping the run) unwinds like an exception, so execute()
    # removes the temporary output instead of leaving `.<out>.tmp-<pid>` behind.
    before = signal.signal(signal.SIGTERM, _terminated)
    compile_cache_outside_tmpdir()
    try:
        return _stage_main(spec, args)
    finally:
        signal.signal(signal.SIGTERM, before)


def _stage_main(spec: StageSpec, args: argparse.Namespace) -> int:
    try:
        cfg = load_config(spec, args.params)
        inputs = {name: Path(getattr(args, f"input_{name}")) for name in spec.inputs}
        params = {s: read_yaml(args.params).get(s) for s in spec.reads_params} if spec.reads_params else None
        metrics = execute(spec, cfg, inputs, args.out, params=params)
    except (KeyboardInterrupt, StageInterrupted) as err:
        # Ctrl-C: one line, no traceback; execute() has removed the half-written output.
        where = str(err) if isinstance(err, StageInterrupted) else "interrupted; a rerun restarts the stage"
        print(("\n" if sys.stderr.isatty() else "") + f"pgolf {spec.name}: {where}", file=sys.stderr)
        return StageInterrupted.EXIT_CODE
    except (PgolfError, OSError) as err:
        # An OSError is the machine refusing a file (unreadable, disk full): its file and reason, one line.
        message = str(err) if isinstance(err, PgolfError) else os_error_message(err, args.out)
        print(f"pgolf {spec.name}: error: {message}", file=sys.stderr)
        if os.environ.get("PGOLF_TRACEBACK"):
            traceback.print_exc()
        return 2
    except Terminated:
        print(f"pgolf {spec.name}: stopped by SIGTERM; its output is unchanged", file=sys.stderr)
        return 128 + signal.SIGTERM
    print(json.dumps({"stage": spec.name, **{k: v for k, v in metrics.items() if not isinstance(v, (dict, list))}}, default=str))
    return 0
