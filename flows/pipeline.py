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
import json
import re
import subprocess
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from flows.repro import (StageResult, dvc_repo, format_summary, record_pipeline_run, refresh_records, reproduce_stage,
                         score_of, set_params, stages_up_to_date)
from flows.workspace import run_workspace, shared_git_state
from pgolf.errors import ConfigError, PgolfError
from runner.params import check_params_file
from tasks.stages import STAGES

# What a run's one-row score artifact holds (`pgolf sweep` and a placed run's parent read it back).
SCORE_ROW = ("val_bpb", "val_loss", "total_bytes", "margin_bytes")
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
    name = describe(p.get("preset"), p.get("overrides"), p.get("seed"))
    # A placed run (another run's subflow on another pool): which part of the pipeline it is.
    return f"{name}: {p['stages'][0]}..{p['stages'][-1]}" if p.get("restore") and p.get("stages") else name


def _flow_run_name_now() -> str | None:
    from prefect.runtime import flow_run

    return flow_run.name if flow_run.id else None


def transient_only(task, task_run, state) -> bool:
    """Retry a stage that crashed; never one that refused its input (a PgolfError is final)."""
    error = state.data if isinstance(state.data, BaseException) else None
    if error is None:
        try:
            state.result()
        except BaseException as raised:  # noqa: BLE001 - the state's own exception, to classify
            error = raised
    return not isinstance(error, PgolfError)


class DvcHints:
    """The advice `dvc repro` prints when it has updated dvc.lock: `git add dvc.lock`, autostage,
    `dvc push`. Each is a line of its own, the commands indented under their intro line."""

    INTROS = ("To track the changes with git, run:", "To enable auto staging, run:")
    LINES = ("Use `dvc push` to send your updates to remote storage.",)

    def __init__(self):
        self.after_intro = False

    def is_hint(self, line: str) -> bool:
        text = line.strip()
        if text in self.INTROS:
            self.after_intro = True
            return True
        if self.after_intro and line[:1].isspace() and text.startswith(("git add ", "dvc config core.autostage")):
            return True
        self.after_intro = False
        return text in self.LINES


@task(name="reproduce-stage", cache_policy=NO_CACHE, task_run_name="{stage}", retries=len(RETRY_DELAYS_S),
      retry_delay_seconds=RETRY_DELAYS_S, retry_condition_fn=transient_only)
def stage_task(stage: str, workspace: str, known_up_to_date: bool = False, restore_only: bool = False) -> dict:
    """One stage. Where it must be computed or restored, under the lease on its inputs
    (flows/lease.py): a run that wants a stage another run is computing waits, then restores it.
    restore_only: another run (another pool's) computes this stage; restore it, never compute it."""
    from prefect.runtime import flow_run

    from flows.lease import RestoreError, stage_lease

    logger = get_run_logger()
    # The stage's own lines (training progress, the eval result) belong in this task's log; DVC's
    # advice to git-add dvc.lock and push does not (the flow saves the run as an experiment).
    hints = DvcHints()
    show = lambda line: line.strip() and not hints.is_hint(line) and logger.info(line)  # noqa: E731
    if known_up_to_date:
        result = reproduce_stage(workspace, stage, True, on_line=show)
    else:
        with stage_lease(workspace, stage, flow_run.name or "(unnamed)", say=logger.info) as inputs:
            if restore_only and inputs is not None and not inputs.restorable():
                raise RestoreError(f"{stage} is another run's to compute (this run only restores it), but neither "
                                   f"DVC's run-cache nor the remote has its output for these inputs (key "
                                   f"{inputs.key[:16]}); run the pipeline where {stage} is placed first", workspace)
            result = reproduce_stage(workspace, stage, False, on_line=show)
        if restore_only and result.status == "ran":
            logger.warning("%s was to be restored, but DVC could not fetch its outputs and computed it here", stage)
    logger.info("stage %s: %s (%.1f s)", result.stage, result.status, result.seconds)
    return asdict(result)


@flow(name="pgolf-pipeline", flow_run_name=_flow_run_name)
def pipeline(preset: str | None = "smoke", overrides: list[str] | None = None, seed: int | None = None,
             workspace: str = ".", stages: list[str] | None = None, isolate: bool = True,
             revision: str = "HEAD", placement: dict[str, str] | None = None,
             restore: list[str] | None = None) -> dict:
    """Render params.yaml from `preset` (None: the params.yaml there), `overrides` and `seed`
    (train.seed), then reproduce each stage in order. isolate: work in a slot of the `workspace`
    checkout at `revision` (flows/workspace.py); else in `workspace` itself.

    placement: stage -> the deployment (FLOW/NAME) whose run computes it, e.g. the model stages on
    a GPU pool's; consecutive stages placed on one deployment are one run of it, started as a
    subflow of this run, and their outputs reach this run (and it theirs) through the DVC remote.
    The stages not placed run here. restore: stages restored before `stages`, from the cache or
    the remote, never computed here (a placed run's upstream, which its parent computed)."""
    logger = get_run_logger()
    overrides = list(overrides or [])
    placement = check_placement(placement)
    restore = _stage_names(restore or [], "restore")
    todo = [*restore, *_stage_names(stages or list(STAGES), "stages")]
    settings = overrides + ([f"train.seed={seed}"] if seed is not None else [])
    name = describe(preset, overrides, seed)
    add_tags(run_tags(preset, seed) + ([f"stages:{todo[len(restore)]}..{todo[-1]}"] if restore else []))
    this_run = _flow_run_name_now() or name
    with run_workspace(workspace, revision, _flow_run_id()) if isolate else nullcontext() as slot:
        ws = slot.path if slot else Path(workspace).resolve()
        if slot is not None:
            logger.info("workspace %s (slot %d of %s) at %s", ws, slot.slot, slot.checkout, slot.commit[:12])
            for orphan in slot.orphaned_runs:
                _mark_crashed(orphan, logger)
            if slot.uncommitted:
                logger.warning("uncommitted edits in %s are not part of this run (only commit %s is): %s",
                               slot.checkout, slot.commit[:12], ", ".join(slot.uncommitted))
        set_params(ws, preset, settings)
        check_params_file(ws / "params.yaml")
        started = time.time()
        clean = stages_up_to_date(ws, todo)
        results: list[StageResult] = []
        rows: dict[str, dict] = {}  # every stage's row, this run's or a placed run's
        placed_score: dict | None = None
        placed_any = False
        elsewhere: list[str] = []  # computed by placed runs, not yet in this slot
        for deployment, group in plan(todo, placement):
            if deployment is None:
                for stage in [*elsewhere, *group]:
                    # Clean at the start and nothing above it touched since: no dvc launch needed.
                    untouched = not placed_any and all(s in clean for s in todo[: todo.index(stage) + 1])
                    result = StageResult(**stage_task(stage, str(ws), untouched,
                                                      restore_only=stage in elsewhere or stage in restore))
                    if stage not in elsewhere:
                        results.append(result)
                        rows[stage] = {**asdict(result), "run": this_run}
                elsewhere = []
            else:
                placed_score, placed_rows = run_placed(deployment, group, preset, overrides, seed,
                                                       slot.commit if slot else revision)
                rows.update({row["stage"]: row for row in placed_rows if row["stage"] in group})
                placed_any = True
                elsewhere += group
        # A slot's outputs restored from the cache are another run's: their records must say so
        # before the experiment saves them.
        refresh_records(ws, [r.stage for r in results if r.status != "ran"])
        record_pipeline_run(ws, started, results, "prefect", preset, settings)
        experiment = None
        if todo[-1] in placement:  # the last stage's run has the whole pipeline: its score, its experiment
            score = {k: placed_score[k] for k in SCORE_ROW if placed_score and k in placed_score}
            experiment = (placed_score or {}).get("experiment")
        else:
            score = score_of(ws)
            # An experiment holds every stage's outputs (DVC commits them all): a run that stops
            # before eval (the `stages` parameter) has none downstream to save, nor a score.
            if slot is not None and todo[-1] == STAGES[-1]:
                experiment = experiment_name(name)
                with shared_git_state(slot.checkout):
                    if any(r.status == "ran" for r in results) or not _has_experiment(ws, slot.commit, experiment):
                        _save_experiment(ws, experiment)
        if todo[-1] in placement:  # the slot's eval output, if any, is an older run's: not this one's score
            logger.info("\n%s\n\nval_bpb %s (from run %s)", format_summary(results, ws, with_score=False),
                        score.get("val_bpb"), rows.get(todo[-1], {}).get("run"))
        else:
            logger.info("\n%s", format_summary(results, ws))
    outcome = {"name": name, "preset": preset, "overrides": overrides, "seed": seed, "workspace": str(ws),
               "commit": slot.commit if slot else None, "experiment": experiment,
               "stages": [rows[stage] for stage in todo if stage in rows], **score}
    _results_artifacts(outcome)
    return outcome


class PlacementError(PgolfError):
    """A placement names an unknown stage, or a placed run did not complete."""


def _stage_names(names: list[str], what: str) -> list[str]:
    unknown = [s for s in names if s not in STAGES]
    if unknown:
        raise ConfigError(f"{what}: unknown stage(s) {', '.join(map(repr, unknown))}; stages are {', '.join(STAGES)}")
    return list(names)


def check_placement(placement: dict[str, str] | None) -> dict[str, str]:
    placement = dict(placement or {})
    _stage_names(list(placement), "placement")
    for stage, deployment in placement.items():
        if not isinstance(deployment, str) or deployment.count("/") != 1 or not all(deployment.split("/")):
            raise ConfigError(f"placement: stage {stage!r} must name a deployment as FLOW/NAME "
                              f"(pgolf-pipeline/gpu), got {deployment!r}")
    return placement


def plan(todo: list[str], placement: dict[str, str]) -> list[tuple[str | None, list[str]]]:
    """The stages in order, cut where their placement changes: (deployment or None for here, stages)."""
    parts: list[tuple[str | None, list[str]]] = []
    for stage in todo:
        where = placement.get(stage)
        if parts and parts[-1][0] == where:
            parts[-1][1].append(stage)
        else:
            parts.append((where, [stage]))
    return parts


def run_placed(deployment: str, group: list[str], preset: str | None, overrides: list[str], seed: int | None,
               revision: str) -> tuple[dict | None, list[dict]]:
    """Run `group` as a run of `deployment`, a subflow of this run (the UI links it), at this run's
    commit; it restores every stage above the group from the cache or the remote. Returns its score
    row (None without eval) and its stages' rows."""
    from prefect import get_client
    from prefect.deployments import run_deployment

    logger = get_run_logger()
    upstream = list(STAGES[: STAGES.index(group[0])])
    params = {"preset": preset, "overrides": overrides, "seed": seed, "revision": revision, "stages": group,
              "restore": upstream}
    logger.info("%s: on deployment %s", ", ".join(group), deployment)
    child = run_deployment(deployment, parameters=params, as_subflow=True, timeout=None, poll_interval=2)
    state = child.state
    if state is None or state.type.value != "COMPLETED":
        raise PlacementError(f"{group[0]}..{group[-1]} ran as flow run {child.name!r} ({child.id}) of {deployment}, "
                             f"which ended {state.type.value if state else 'without a state'}: "
                             f"{state.message if state else ''}")
    with get_client(sync_client=True) as client:
        score, stage_rows = read_run_tables(client, child.id)
    logger.info("%s: %s", child.name, ", ".join(f"{r['stage']} {r['status']}" for r in stage_rows))
    return score, stage_rows


def read_run_tables(client, run_id) -> tuple[dict | None, list[dict]]:
    """A pipeline run's score row (None if it has none) and its stage rows, from its table artifacts."""
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterType

    artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
        flow_run_id=ArtifactFilterFlowRunId(any_=[run_id]), type=ArtifactFilterType(any_=["table"])))
    score, stages = None, []
    for artifact in artifacts:
        rows = json.loads(artifact.data) if isinstance(artifact.data, str) else artifact.data
        if rows and isinstance(rows, list) and "val_bpb" in rows[0]:
            score = rows[0]
        elif rows and isinstance(rows, list) and "stage" in rows[0]:
            stages = rows
    return score, stages


def _flow_run_id() -> str | None:
    from prefect.runtime import flow_run

    return str(flow_run.id) if flow_run.id else None


def _mark_crashed(run_id: str, logger) -> None:
    """A flow run whose process died holding its slot (kill -9 of the worker and its run) stays
    Running in Prefect: nothing was left to report it. The next run to take a slot says it crashed;
    its stages that finished are in DVC's cache, so a rerun continues from there."""
    from prefect import get_client
    from prefect.states import Crashed

    with get_client(sync_client=True) as client:
        try:
            run = client.read_flow_run(run_id)
        except Exception:  # noqa: BLE001 - gone, or another server's: nothing to mark here
            return
        if run.state is not None and not run.state.is_final():
            client.set_flow_run_state(run_id, Crashed(message="its process died while it held a pgolf slot; "
                                                              "a rerun restores what it finished from DVC's cache"),
                                      force=True)
            logger.warning("flow run %s (%s) died holding its slot without ending: marked Crashed", run.name, run_id)


def add_tags(tags: list[str]) -> None:
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
                              include_untracked=["artifacts/.runs/eval.json", "artifacts/.runs/train.json",
                                                 "artifacts/.runs/gptq.json"])


def _results_artifacts(outcome: dict) -> None:
    rows = [{"stage": s["stage"], "status": s["status"], "seconds": round(s["seconds"], 1), "run": s.get("run")}
            for s in outcome["stages"]]
    score = {k: outcome.get(k) for k in SCORE_ROW}
    key = "pgolf-" + (re.sub(r"[^a-z0-9-]+", "-", outcome["name"].lower()).strip("-")[:90] or "run")
    lines = [f"# {outcome['name']}", "", "| stage | status | seconds | run |", "|---|---|---:|---|"]
    lines += [f"| {r['stage']} | {r['status']} | {r['seconds']:.1f} | {r['run'] or '-'} |" for r in rows]
    lines += ["", "| val_bpb | val_loss | artifact bytes | cap margin |", "|---:|---:|---:|---:|",
              "| " + " | ".join("-" if v is None else f"{v:.6f}" if isinstance(v, float) else f"{v:,}" for v in score.values()) + " |",
              "", "| data | training clock | eval clock |", "|---|---|---|",
              f"| {_canonical_text(outcome.get('canonical'))} | {_clock_text(outcome, 'training')} | {_clock_text(outcome, 'eval')} |",
              "", f"overrides: {' '.join(outcome['overrides']) or '(none)'}; seed: {outcome['seed']}; preset: {outcome['preset']}",
              f"commit: {outcome['commit'] or '(the workspace as it is)'}; experiment: {outcome['experiment'] or '-'}"]
    create_markdown_artifact("\n".join(lines), key=key, description=f"pgolf results: {outcome['name']}")
    # The same numbers as one row a program reads back (`pgolf sweep` over deployment runs).
    trust = {k: outcome.get(k) for k in ("canonical", "training_clock_s", "training_within_budget", "eval_clock_s",
                                         "eval_within_budget")}
    create_table_artifact([{"name": outcome["name"], "seed": outcome["seed"], **score, **trust,
                            "experiment": outcome["experiment"], "commit": outcome["commit"]}],
                          key=f"{key}-score", description="pgolf score (one row)")
    # Each stage: ran or cached, its seconds, the flow run that did it (a parent reads its placed runs').
    create_table_artifact(rows, key=f"{key}-stages", description="pgolf stages (one row each)")


def _canonical_text(canonical: bool | None) -> str:
    return {True: "canonical", False: "not canonical (pgolf summary says why)", None: "canonical: unknown"}[canonical]


def _clock_text(outcome: dict, name: str) -> str:
    seconds, within = outcome.get(f"{name}_clock_s"), outcome.get(f"{name}_within_budget")
    if seconds is None:
        return "unknown"
    return f"{seconds:.1f} s of 600: {'within budget' if within else 'OVER budget'}"


if __name__ == "__main__":
    pipeline()
