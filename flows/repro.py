"""Drive DVC from Python: reproduce stages, tell which ran and which came from the cache.

DVC is the only cache. A stage that runs writes a run record beside its output
(artifacts/.runs/<stage>.json, runner.records.run_record_path); a stage DVC skips, or restores from its
run-cache, writes nothing. So "ran" means: a fresh record appeared during this call. A stage that
did not run then has its record made the one of its output as it now is (refresh_records): DVC
may have restored another run's output, and its seconds must not stand beside that one's numbers.
Each pipeline run (`pgolf run`, the Prefect flow) also writes artifacts/.runs/pipeline.json, what
`pgolf summary` shows afterwards.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from pgolf.data import certify
from pgolf.errors import PgolfError, StageInterrupted
from runner.cache_check import repro_checked
from pgolf.typed_params import from_dict, read_yaml
from runner.records import RUNS_DIR_NAME, refresh_run_record, run_record_path
from runner.params import check_params_file, render_file, write_params
from runner.runs import clock_lines, workspace_run
from tasks.stages import STAGES, config_of, out_of


class ReproError(PgolfError):
    """`dvc repro` failed; the message carries the tail of its output."""


@dataclass
class StageResult:
    stage: str
    status: str  # "ran" or "cached"
    seconds: float


PIPELINE_RECORD = Path("artifacts") / RUNS_DIR_NAME / "pipeline.json"


def dvc_env() -> dict:
    env = dict(os.environ)
    # bin/stage, which dvc.yaml's commands call, runs the stage with this interpreter (the project's).
    env.setdefault("PGOLF_PYTHON", sys.executable)
    env.setdefault("DVC_NO_ANALYTICS", "1")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def dvc_command() -> list[str]:
    """The dvc installed beside this interpreter, as a user runs it (`.venv/bin/dvc`)."""
    exe = Path(sys.executable).with_name("dvc")
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "dvc"]


def read_run_record(workspace: Path, stage: str) -> dict | None:
    try:
        return json.loads(run_record_path(Path(workspace) / out_of(stage)).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def results_since(workspace: Path, since: float, stages: tuple[str, ...] | list[str] = STAGES) -> list[StageResult]:
    results = []
    for stage in stages:
        record = read_run_record(workspace, stage)
        if record and record.get("started", 0) >= since:
            results.append(StageResult(stage, "ran", float(record["seconds"])))
        else:
            results.append(StageResult(stage, "cached", 0.0))
    return results


def record_pipeline_run(workspace: str | Path, started: float, results: list[StageResult], via: str,
                        preset: str | None, overrides: list[str] | tuple[str, ...] = ()) -> None:
    path = Path(workspace) / PIPELINE_RECORD
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"started": started, "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
              "seconds": round(time.time() - started, 3), "via": via, "preset": preset, "overrides": list(overrides),
              "stages": [asdict(r) for r in results]}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, path)


def last_pipeline_run(workspace: str | Path = ".") -> tuple[dict | None, list[StageResult]]:
    """The last pipeline run's record and its stages; without one (stages run by `dvc repro` or by
    hand), each stage's last run as its record says."""
    workspace = Path(workspace)
    runs = {stage: read_run_record(workspace, stage) for stage in STAGES}
    try:
        record = json.loads((workspace / PIPELINE_RECORD).read_text())
        ended = record["started"] + record["seconds"]
        # A stage run after it (by `dvc repro`, or by hand) makes it not the last run any more.
        if not any(run and run.get("started", 0) > ended for run in runs.values()):
            return record, [StageResult(**r) for r in record["stages"]]
    except (FileNotFoundError, json.JSONDecodeError, KeyError, TypeError):
        pass
    results = []
    for stage, run in runs.items():
        if run and run.get("restored") and "started_at" not in run:
            status = f"restored {run['restored_at']} (its run not recorded here)"
        elif run and "started_at" in run:
            status = f"ran {run['started_at']}" + (f", restored {run['restored_at']}" if run.get("restored") else "")
        else:
            status = "never"
        results.append(StageResult(stage, status, float(run.get("seconds") or 0.0) if run else 0.0))
    return None, results


_CWD_LOCK = threading.Lock()


@contextmanager
def dvc_repo(workspace: str | Path) -> Iterator:
    """DVC's Repo for in-process questions (a dvc launch costs a second, most of an all-cached run's
    time). DVC resolves stage paths against the current directory, as its CLI runs from the repo
    root, so the block runs there; the lock keeps two threads from moving the process's cwd at once."""
    from dvc.repo import Repo

    with _CWD_LOCK:
        before = os.getcwd()
        os.chdir(workspace)
        try:
            with Repo(str(workspace)) as repo:
                yield repo
        finally:
            os.chdir(before)


def default_remote_name(workspace: Path) -> str | None:
    """The name `dvc remote add -d NAME URL` set, or None, read as DVC reads it (dvc/config.py,
    dvc/dirs.py: the system, global, repo and local config files, each shadowing the one before,
    configobj's format, the name lower-cased) without importing DVC, which costs an all-cached run
    a second and a half; tests/test_flows.py holds it to DVC's own Config at every level."""
    import platformdirs
    from configobj import ConfigObj

    files = [Path(os.getenv("DVC_SYSTEM_CONFIG_DIR") or platformdirs.site_config_dir("dvc", "iterative")) / "config",
             Path(os.getenv("DVC_GLOBAL_CONFIG_DIR") or platformdirs.user_config_dir("dvc", "iterative")) / "config",
             Path(workspace) / ".dvc" / "config", Path(workspace) / ".dvc" / "config.local"]
    remote = None
    for path in files:
        if path.is_file():
            remote = ConfigObj(str(path)).get("core", {}).get("remote", remote)
    return remote.lower() if remote else None


def default_remote(workspace: Path) -> tuple[str | None, bool]:
    """The DVC remote every worker shares (`dvc remote add -d NAME URL`), or None; and whether DVC
    checks each object it downloads from it (`remote.NAME.verify`): without that DVC trusts an
    object's name, and `dvc pull` puts a corrupt file in the workspace and exits 0. A checkout
    without a remote never imports DVC here; one with a remote reads DVC's own config (its
    schema's defaults for verify differ by the remote's kind)."""
    if default_remote_name(workspace) is None:
        return None, False
    from dvc.config import Config

    config = Config(dvc_dir=str(Path(workspace) / ".dvc"))
    name = config["core"].get("remote") or None
    verify = config["remote"].get(name, {}).get("verify", False) if name else False
    return name, verify is True or str(verify).lower() == "true"


def stages_up_to_date(workspace: Path, stages: list[str] | tuple[str, ...] = STAGES) -> set[str]:
    """The stages whose outputs in the workspace match dvc.lock, deps and params included: what
    `dvc status` reports clean, asked in-process (a tenth of a second a stage, no dvc launch)."""
    with dvc_repo(workspace) as repo:
        changed = {name.rsplit(":", 1)[-1] for name in repo.status(targets=list(stages))}
    return {stage for stage in stages if stage not in changed}


class StageCrash(RuntimeError):
    """A stage's process died for no reason of its inputs (killed, out of memory, a lost rank): worth
    a retry. Not a PgolfError: a stage exits 2 on bad input (runner.stage.stage_main), which a retry
    cannot mend, and that is a ReproError."""


def dvc_repro(workspace: Path, stage: str | None = None, force: bool = False, echo: bool = True,
              on_line=None) -> None:
    """`dvc repro`; with a default remote, one cache for every worker: what a stage's run-cache entry
    on the remote holds is pulled instead of recomputed (`--pull`), and what ran is pushed after."""
    cmd = ["repro"]
    if force:
        cmd.append("--force")
    if stage:
        cmd += ["--single-item", stage]
    remote, verifies = default_remote(workspace)
    say = on_line or (lambda line: print(line, flush=True))
    if remote and not verifies:
        say(f"pgolf: warning: the DVC remote '{remote}' does not verify what it downloads, so a corrupt object "
            f"there would be checked out as it is; turn it on: .venv/bin/dvc remote modify {remote} verify true")
    if not remote:
        _dvc(workspace, cmd, echo, on_line)
        return
    try:
        _dvc(workspace, cmd + ["--pull"], echo, on_line)
    except ReproError as err:
        missing = PULL_FAILED.search(str(err))
        if not missing:
            raise
        # The remote lacks an output (never pushed, deleted) or holds a corrupt one (verify refused
        # it): what cannot be restored is computed here and pushed. A missing object is mended so; a
        # corrupt one stays until removed there, as push skips an object whose name it finds.
        say(f"pgolf: the remote '{remote}' could not supply every output ({missing.group(0).strip()}): computing "
            "what is missing here, then pushing it; a corrupt object must be removed from the remote by hand")
        _dvc(workspace, cmd, echo, on_line)
    _dvc(workspace, ["push", "--run-cache"] + ([stage] if stage else []), echo, on_line)


# What `dvc repro --pull` prints when an object is missing from the remote or fails its verification.
PULL_FAILED = re.compile(r"\d+ files? failed to download|Checkout failed for following targets|failed to transfer '[0-9a-f]+'")


def _dvc(workspace: Path, args: list[str], echo: bool, on_line=None) -> None:
    cmd = dvc_command() + args
    proc = subprocess.Popen(cmd, cwd=workspace, env=dvc_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    tail: list[str] = []
    held: list[str] = []  # DVC's own error lines: shown at the end, unless a Ctrl-C explains them

    def show(line: str) -> None:
        if on_line is not None:
            on_line(line.rstrip("\n"))
        elif echo:
            sys.stdout.write(line)
            sys.stdout.flush()

    assert proc.stdout is not None
    interrupted = False
    while True:
        try:
            for line in proc.stdout:
                tail = (tail + [line])[-40:]
                if line.startswith("ERROR: "):
                    held.append(line)
                else:
                    show(line)
            code = proc.wait()
            break
        except KeyboardInterrupt:
            # Ctrl-C reached DVC and its stage as well (one process group): DVC waits for the stage,
            # which stops with its own line; read on until both have ended.
            interrupted = True
    if code == 0:
        return
    text = "".join(tail)
    exited = re.findall(r"exited with (-?\d+)", text)
    if interrupted or (exited and int(exited[-1]) == StageInterrupted.EXIT_CODE):
        said = [line.strip() for line in tail if re.match(r"pgolf \w+: interrupted", line.strip())]
        error = StageInterrupted(said[-1].split(": ", 1)[1] if said else "interrupted")
        error.shown = bool(said) and (echo or on_line is not None)  # the stage's line is already out
        raise error
    for line in held:
        show(line)
    message = f"`dvc {' '.join(args)}` failed in {workspace} (exit {code}):\n{text}"
    if exited and int(exited[-1]) != 2:
        raise StageCrash(message)
    raise ReproError(message)


def reproduce(workspace: str | Path = ".", stage: str | None = None, force: bool = False, echo: bool = True,
              on_line=None) -> list[StageResult]:
    """Reproduce the whole pipeline (stage=None) or exactly one stage; report what ran."""
    workspace = Path(workspace).resolve()
    check_params_file(workspace / "params.yaml")
    started = time.time()
    repro_checked(workspace, stage, force, echo,
                  lambda ws, st, f, e: dvc_repro(ws, st, f, e, on_line))
    results = results_since(workspace, started, [stage] if stage else STAGES)
    refresh_records(workspace, [r.stage for r in results if r.status != "ran"])
    return results


def refresh_records(workspace: str | Path, stages: list[str] | tuple[str, ...]) -> dict[str, str]:
    """Each stage's run record made the one of its output in place (runner.records.refresh_run_record):
    stage -> "current", "restored" (from this machine's history of runs) or "unknown"."""
    workspace = Path(workspace)
    statuses: dict[str, str] = {}
    present = [stage for stage in stages if (workspace / out_of(stage)).exists()]
    if not present:
        return statuses
    try:
        params = read_yaml(workspace / "params.yaml")
    except PgolfError:
        return statuses
    for stage in present:
        try:
            cfg = from_dict(config_of(stage), params.get(stage, {}), f"params.yaml: {stage}")
        except PgolfError:
            continue  # a section the stage would refuse: it did not make this output either
        statuses[stage] = refresh_run_record(stage, cfg, workspace / out_of(stage))
    return statuses


def reproduce_stage(workspace: str | Path, stage: str, known_up_to_date: bool = False, on_line=None) -> StageResult:
    """One stage, launching dvc only when it has something to do: a stage that `stages_up_to_date`
    found clean (and nothing upstream has run since) is reported cached at no cost."""
    if known_up_to_date:
        return StageResult(stage, "cached", 0.0)
    (result,) = reproduce(workspace, stage=stage, on_line=on_line)
    return result


def set_params(workspace: str | Path, preset: str | None, overrides: list[str] | tuple[str, ...] = ()) -> Path:
    """Write the workspace's params.yaml for a preset and overrides, or (no preset) the overrides on
    the params.yaml there; content decides what reruns."""
    path = Path(workspace) / "params.yaml"
    params, header = render_file(path, preset, overrides)
    write_params(params, path, header)
    return path


def score_of(workspace: str | Path = ".") -> dict:
    """What a run scored and weighs, from the eval and pack outputs there (keys absent where a stage
    has not run)."""
    workspace = Path(workspace)
    metrics = _read_json(workspace / "artifacts/eval/metrics.json") or {}
    size = _read_json(workspace / "artifacts/pack/size.json") or {}
    score = {k: metrics[k] for k in ("val_bpb", "val_loss", "tokens", "bytes", "mode", "canonical") if k in metrics}
    score.update({k: size[k] for k in ("total_bytes", "model_bytes", "code_bytes", "margin_bytes", "cap_bytes",
                                       "pipeline_code_bytes") if k in size})
    clocks = workspace_run(workspace)["clocks"]
    for name, clock in clocks.items():
        if clock:
            score[f"{name}_clock_s"] = clock["seconds"]
            score[f"{name}_within_budget"] = clock["within_budget"]
    return score


def format_summary(results: list[StageResult], workspace: str | Path = ".", with_score: bool = True) -> str:
    """The stages' table and, with_score, the score of what the workspace holds (without: its eval
    is another run's, and what the workspace holds may be an older run's)."""
    width = max([7] + [len(r.status) for r in results])
    lines = [f"{'stage':<10} {'status':<{width}} {'seconds':>8}", f"{'-' * 10} {'-' * width} {'-' * 8}"]
    for r in results:
        lines.append(f"{r.stage:<10} {r.status:<{width}} {r.seconds:>8.1f}")
    if not with_score:
        return "\n".join(lines)
    score = score_of(workspace)
    lines.append("")
    if "val_bpb" in score:
        lines.append(f"val_bpb         {score['val_bpb']:.4f}  (val_loss {score['val_loss']:.4f}, {score['tokens']:,} tokens, "
                     f"{score['bytes']:,} bytes, mode {score.get('mode')})")
    if "total_bytes" in score:
        # The count the submission carries (tasks/pack.py): its code is the exported train_gpt.py.
        lines.append(f"artifact bytes  {score['total_bytes']:,}  (model {score['model_bytes']:,} + code {score['code_bytes']:,}: "
                     "train_gpt.py as `pgolf export` writes it, counted the records' way)")
        lines.append(f"cap margin      {score['margin_bytes']:,} bytes under {score['cap_bytes']:,}")
        if "pipeline_code_bytes" in score:
            lines.append(f"code as files   {score['pipeline_code_bytes']:,} bytes (the modules train_gpt.py bundles; a detail, "
                         "not counted)")
    run = workspace_run(workspace)
    if run["data"] is not None or "canonical" in score:
        lines.append(f"data            {certify.summary(run['data'])}")
    if any(run["clocks"].values()):
        lines += [f"{'clocks':<15} {line}" if i == 0 else f"{'':<15} {line}" for i, line in enumerate(clock_lines(run))]
    return "\n".join(lines)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
