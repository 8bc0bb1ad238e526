"""How one stage runs, whoever calls it (bin/stage under `dvc repro`, a Prefect task, the exported
script): its spec, its params section, its inputs checked, its output written atomically, its CLI.

A stage module (tasks/<stage>.py) imports its `Config` from the library, defines `run(cfg, inputs,
out)` and `SPEC` (a StageSpec), and ends with `if __name__ == "__main__": sys.exit(stage_main(SPEC))`.
`run` writes into `out`, a fresh temporary folder; only when it returns does the folder replace the
stage's real output, so a failed stage never leaves a half-written output behind. A stage that runs
on ranks names its per-rank body once, as SPEC.per_rank (runner/ranks.py runs it).
"""
from __future__ import annotations

import argparse
import errno
import json
import os
import shutil
import signal
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from pgolf.errors import ConfigError, InputError, PgolfError, StageInterrupted
from pgolf.typed_params import from_dict, read_yaml, shown
from runner.records import TIMINGS_NAME, output_identity, read_run_record, record_run, run_record_path
from tasks.stages import STAGES, stage_module


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
    # This rank's share of the stage, for the stages that run on `nproc` ranks per node (train, gptq,
    # eval): run() calls runner.ranks.run_on_ranks, which runs it here or on each launched rank.
    per_rank: Callable[[Any, dict[str, Path], Path], Any] | None = None

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
    known = STAGES + also
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
