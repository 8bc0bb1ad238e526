"""The Prefect flow: one task per stage, each asking DVC to reproduce exactly that stage.

Prefect's own input caching is off (cache_policy=NO_CACHE): the tasks' arguments are paths, and a
path stays the same while its contents change. DVC decides what recomputes; Prefect adds names,
tags, logs, retries, results artifacts, placement and seed sweeps.

A deployment's run works in a slot of its own (flows/workspace.py), a git worktree of the
checkout at the run's commit, so concurrent runs never read each other's params.yaml; the slots
share the checkout's DVC cache, and each run is saved as a DVC experiment named after the run
(`pgolf exp show`, `dvc exp apply NAME` in the checkout). `pgolf run --via prefect` runs the flow
in the checkout itself (isolate=False), as `dvc repro` would.
"""
from __future__ import annotations

import hashlib
import re
import subprocess
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from flows.repro import (StageResult, dvc_repo, format_summary, record_pipeline_run, reproduce_stage, score_of, set_params,
                         stages_up_to_date)
from flows.workspace import run_workspace, shared_git_state
from pgolf.errors import PgolfError
from tasks.stages import STAGES

# A lost rank, an OOM kill or a preempted node usually passes; the delays let a node come back.
RETRY_DELAYS_S = [30, 120]


def describe(preset: str | None, overrides: list[str] | None = None, seed: int | None = None) -> str:
    """A run's name, from what sets it apart: `record eval.stride=64 seed=42`."""
    return " ".join([preset or "params.yaml", *(overrides or []), *([f"seed={seed}"] if seed is not None else [])])


def run_tags(preset: str | None, seed: int | None = None) -> list[str]:
    return ["pgolf", f"preset:{preset or 'params.yaml'}", *([f"seed:{seed}"] if seed is not None else [])]


def experiment_name(name: str) -> str:
    """A git-ref-safe DVC experiment name for a run's description. One configuration at one commit
    gives the same results (same seed, same bytes), so its reruns share one experiment."""
    slug = re.sub(r"\.{2,}", ".", re.sub(r"[^A-Za-z0-9_.=-]+", "-", name)).strip("-.") or "run"
    if len(slug) > 80:
        slug = f"{slug[:71]}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"
    return slug


def _flow_run_name() -> str:
    from prefect.runtime import flow_run

    p = flow_run.parameters
    return describe(p.get("preset"), p.get("overrides"), p.get("seed"))


def transient_only(task, task_run, state) -> bool:
    """Retry a stage that crashed; never one that refused its input (a PgolfError is final)."""
    error = state.data if isinstance(state.data, BaseException) else None
    if error is None:
        try:
            state.result()
        except BaseException as raised:  # noqa: BLE001 - the state's own exception, to classify
            error = raised
    return not isinstance(error, PgolfError)


@task(name="reproduce-stage", cache_policy=NO_CACHE, task_run_name="{stage}", retries=len(RETRY_DELAYS_S),
      retry_delay_seconds=RETRY_DELAYS_S, retry_condition_fn=transient_only)
def stage_task(stage: str, workspace: str, known_up_to_date: bool = False) -> dict:
    logger = get_run_logger()
    # The stage's own lines (training progress, the eval result) belong in this task's log.
    result = reproduce_stage(workspace, stage, known_up_to_date, on_line=lambda line: line.strip() and logger.info(line))
    logger.info("stage %s: %s (%.1f s)", result.stage, result.status, result.seconds)
    return asdict(result)


@flow(name="pgolf-pipeline", flow_run_name=_flow_run_name)
def pipeline(preset: str | None = "smoke", overrides: list[str] | None = None, seed: int | None = None,
             workspace: str = ".", stages: list[str] | None = None, isolate: bool = True,
             revision: str = "HEAD") -> dict:
    """Render params.yaml from `preset` (None: the params.yaml there), `overrides` and `seed`
    (train.seed), then reproduce each stage in order. isolate: work in a slot of the `workspace`
    checkout at `revision` (flows/workspace.py); else in `workspace` itself."""
    logger = get_run_logger()
    overrides = list(overrides or [])
    settings = overrides + ([f"train.seed={seed}"] if seed is not None else [])
    name = describe(preset, overrides, seed)
    _add_tags(run_tags(preset, seed))
    with run_workspace(workspace, revision) if isolate else nullcontext() as slot:
        ws = slot.path if slot else Path(workspace).resolve()
        if slot is not None:
            logger.info("workspace %s (slot %d of %s) at %s", ws, slot.slot, slot.checkout, slot.commit[:12])
            if slot.uncommitted:
                logger.warning("uncommitted edits in %s are not part of this run (only commit %s is): %s",
                               slot.checkout, slot.commit[:12], ", ".join(slot.uncommitted))
        set_params(ws, preset, settings)
        started = time.time()
        todo = list(stages or STAGES)
        clean = stages_up_to_date(ws, todo)
        results = []
        for i, stage in enumerate(todo):
            # Clean at the start and nothing above it touched since: no dvc launch needed.
            untouched = all(s in clean for s in todo[: i + 1])
            results.append(StageResult(**stage_task(stage, str(ws), untouched)))
        record_pipeline_run(ws, started, results, "prefect", preset, settings)
        score = score_of(ws)
        experiment = None
        if slot is not None:
            experiment = experiment_name(name)
            with shared_git_state(slot.checkout):
                if any(r.status == "ran" for r in results) or not _has_experiment(ws, slot.commit, experiment):
                    _save_experiment(ws, experiment)
        logger.info("\n%s", format_summary(results, ws))
    outcome = {"name": name, "preset": preset, "overrides": overrides, "seed": seed, "workspace": str(ws),
               "commit": slot.commit if slot else None, "experiment": experiment,
               "stages": [asdict(r) for r in results], **score}
    _results_artifacts(outcome)
    return outcome


def _add_tags(tags: list[str]) -> None:
    """Tags from the run's own parameters, so a deployment run started with `-p seed=42` is found by
    `seed:42` in the UI and `prefect flow-run ls`, as an in-process one is."""
    from prefect import get_client
    from prefect.runtime import flow_run

    if not flow_run.id:
        return
    with get_client(sync_client=True) as client:
        current = client.read_flow_run(flow_run.id).tags
        client.update_flow_run(flow_run.id, tags=sorted(set(current) | set(tags)))


def _has_experiment(ws: Path, commit: str, name: str) -> bool:
    ref = f"refs/exps/{commit[:2]}/{commit[2:]}/{name}"  # where DVC keeps an experiment of `commit`
    return subprocess.run(["git", "show-ref", "--verify", "--quiet", ref], cwd=ws).returncode == 0


def _save_experiment(ws: Path, name: str) -> None:
    """The run as a DVC experiment of the checkout (params.yaml, dvc.lock, metrics, run records):
    `dvc exp show` lists it, `dvc exp apply NAME` + `dvc checkout` bring its outputs back."""
    with dvc_repo(ws) as repo:
        repo.experiments.save(name=name, force=True,
                              include_untracked=["artifacts/.runs/eval.json", "artifacts/.runs/train.json"])


def _results_artifacts(outcome: dict) -> None:
    rows = [{"stage": s["stage"], "status": s["status"], "seconds": round(s["seconds"], 1)} for s in outcome["stages"]]
    score = {k: outcome.get(k) for k in ("val_bpb", "val_loss", "total_bytes", "margin_bytes")}
    key = "pgolf-" + (re.sub(r"[^a-z0-9-]+", "-", outcome["name"].lower()).strip("-")[:90] or "run")
    lines = [f"# {outcome['name']}", "", "| stage | status | seconds |", "|---|---|---:|"]
    lines += [f"| {r['stage']} | {r['status']} | {r['seconds']:.1f} |" for r in rows]
    lines += ["", "| val_bpb | val_loss | artifact bytes | cap margin |", "|---:|---:|---:|---:|",
              "| " + " | ".join("-" if v is None else f"{v:.6f}" if isinstance(v, float) else f"{v:,}" for v in score.values()) + " |",
              "", f"overrides: {' '.join(outcome['overrides']) or '(none)'}; seed: {outcome['seed']}; preset: {outcome['preset']}",
              f"commit: {outcome['commit'] or '(the workspace as it is)'}; experiment: {outcome['experiment'] or '-'}"]
    create_markdown_artifact("\n".join(lines), key=key, description=f"pgolf results: {outcome['name']}")
    # The same numbers as one row a program reads back (`pgolf sweep` over deployment runs).
    create_table_artifact([{"name": outcome["name"], "seed": outcome["seed"], **score,
                            "experiment": outcome["experiment"], "commit": outcome["commit"]}],
                          key=f"{key}-score", description="pgolf score (one row)")


if __name__ == "__main__":
    pipeline()
