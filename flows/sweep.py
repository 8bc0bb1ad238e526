"""`pgolf sweep`: one pipeline run per seed, and the per-seed table a record claim needs.

    pgolf sweep --preset record --seeds 42,0,1234 [--set k=v ...] [--deployment pgolf-pipeline/gpu]

Without --deployment the seeds run one after another in this process, each a subflow in a slot of
this checkout (flows/workspace.py). With it, each seed is a run of that deployment, all started at
once, so as many GPU workers as the pool has take them side by side; each run's score comes back
through its results artifact. Either way the sweep writes its table (sweep.json, the form
`pgolf significance` and `flows.export --sweep` read) and makes it a Prefect table artifact.
"""
from __future__ import annotations

import json
import os
import re
import statistics
import time
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact

from flows.pipeline import add_tags, describe, pipeline, read_run_tables
from pgolf.errors import ConfigError, PgolfError
from tasks.stages import STAGES

METRICS = ("val_loss", "val_bpb")
FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
# How often a seed's run that crashed before it started (never ran) is scheduled again.
RESUBMITS = 2


class SweepError(PgolfError):
    """A seed's run did not finish with a score."""


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds takes integers separated by commas, got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds needs at least one seed and no seed twice, got {text!r}")
    return seeds


def sweep_table(preset: str | None, overrides: list[str], outcomes: list[dict]) -> dict:
    rows = [{"seed": o["seed"], **{m: o[m] for m in METRICS}, "total_bytes": o.get("total_bytes"),
             "experiment": o.get("experiment"), "workspace": o.get("workspace")} for o in outcomes]
    columns = {m: [r[m] for r in rows] for m in METRICS}
    return {"kind": "pgolf-sweep", "preset": preset, "overrides": overrides, "seeds": rows,
            "mean": {m: statistics.fmean(v) for m, v in columns.items()},
            "std": {m: statistics.stdev(v) if len(v) > 1 else None for m, v in columns.items()},
            "stages": stage_runs(outcomes)}


def stage_runs(outcomes: list[dict]) -> list[dict]:
    """Per stage: which seeds' runs computed it (with its seconds in each) and how many restored it
    instead: a stage the seed does not reach runs once for the sweep (flows/lease.py)."""
    table = []
    for stage in STAGES:
        rows = [(o["seed"], row) for o in outcomes for row in o.get("stages") or [] if row["stage"] == stage]
        if not rows:
            continue
        ran = [(seed, row) for seed, row in rows if row["status"] == "ran"]
        table.append({"stage": stage, "ran_in": [seed for seed, _ in ran],
                      "seconds": [round(row["seconds"], 1) for _, row in ran], "restored_in": len(rows) - len(ran)})
    return table


def check_sweep_out(path: Path) -> None:
    """A sweep writes a new file or over an earlier sweep's, never over a file of the user's."""
    if path.is_dir() or path.is_symlink():
        raise SweepError("--out must name a file (sweep.json), not a folder or a link", path)
    if not path.exists():
        return
    try:
        kind = json.loads(path.read_text(encoding="utf-8")).get("kind")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        kind = None
    if kind != "pgolf-sweep":
        raise SweepError("refusing to overwrite this file: it is not a pgolf sweep's results; choose a new --out", path)


def default_out(checkout: str | Path, preset: str | None, overrides: list[str]) -> Path:
    slug = re.sub(r"[^A-Za-z0-9_.=-]+", "-", describe(preset, overrides)).strip("-")[:100]
    return Path(checkout) / "artifacts" / "sweeps" / slug / "sweep.json"


@flow(name="pgolf-sweep", flow_run_name="sweep {preset} seeds {seeds}")
def sweep(preset: str | None, seeds: list[int], overrides: list[str] | None = None, workspace: str = ".",
          deployment: str | None = None, revision: str = "HEAD", out: str | None = None) -> dict:
    overrides = list(overrides or [])
    path = Path(out) if out else default_out(workspace, preset, overrides)
    check_sweep_out(path)  # before the runs: an hour of training must not end in a refused write
    # The parent is found as its seeds' runs are (`preset:P`); `seed:S` stays the tag of S's own run.
    add_tags(["pgolf", "sweep", f"preset:{preset or 'params.yaml'}", "seeds:" + ",".join(map(str, seeds))])
    if deployment:
        outcomes = _through_deployment(deployment, preset, seeds, overrides, revision)
    else:
        outcomes = [pipeline(preset=preset, overrides=overrides, seed=seed, workspace=workspace, revision=revision)
                    for seed in seeds]
    for outcome in outcomes:
        if any(outcome.get(m) is None for m in METRICS):
            raise SweepError(f"seed {outcome['seed']}'s run ended without val_loss/val_bpb: {outcome}")
    table = sweep_table(preset, overrides, outcomes)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(table, indent=2) + "\n")
    os.replace(tmp, path)
    rows = table["seeds"] + [{"seed": stat, **{m: table[stat][m] for m in METRICS}} for stat in ("mean", "std")]
    create_table_artifact(rows, key="pgolf-sweep-" + re.sub(r"[^a-z0-9-]+", "-", describe(preset, overrides).lower()).strip("-")[:80],
                          description=f"pgolf sweep: {describe(preset, overrides)}, seeds {seeds}")
    get_run_logger().info("sweep written to %s: val_bpb mean %.6f std %s", path, table["mean"]["val_bpb"], table["std"]["val_bpb"])
    table["path"] = str(path)
    return table


def _through_deployment(deployment: str, preset: str | None, seeds: list[int], overrides: list[str],
                        revision: str, poll_s: float = 2.0) -> list[dict]:
    from prefect import get_client
    from prefect.deployments import run_deployment

    logger = get_run_logger()
    runs = {}
    for seed in seeds:  # started together: the pool's workers take them as they come free
        params = {"preset": preset, "overrides": overrides, "seed": seed, "revision": revision}
        run = run_deployment(deployment, parameters=params, timeout=0, as_subflow=False)
        runs[seed] = run.id
        logger.info("seed %d: flow run %s on %s", seed, run.id, deployment)
    with get_client(sync_client=True) as client:
        return collect_outcomes(client, runs, logger, poll_s)


def collect_outcomes(client, runs: dict, logger, poll_s: float = 2.0) -> list[dict]:
    """Each seed's score and stages once its run completed (seed -> flow run id, in seed order)."""
    from prefect.states import Scheduled

    outcomes = {}
    resubmitted = dict.fromkeys(runs, 0)
    while len(outcomes) < len(runs):
        for seed, run_id in runs.items():
            if seed in outcomes:
                continue
            flow_run = client.read_flow_run(run_id)
            state = flow_run.state
            if state is None or state.type.value not in FINAL:
                continue
            if state.type.value == "CRASHED" and flow_run.run_count == 0 and resubmitted[seed] < RESUBMITS:
                # Its worker could not start it (the API busy, the node gone): it never ran, so it is
                # scheduled again, for whichever worker comes free, rather than failing the sweep.
                resubmitted[seed] += 1
                client.set_flow_run_state(run_id, Scheduled(message="resubmitted by pgolf sweep"), force=True)
                logger.warning("seed %d: flow run %s crashed before it started (%s); scheduled again",
                               seed, run_id, state.message)
                continue
            if state.type.value != "COMPLETED":
                raise SweepError(f"seed {seed}'s run {run_id} ended {state.type.value}: {state.message}")
            score, stages = read_run_tables(client, run_id)
            if score is None:
                raise SweepError(f"flow run {run_id} completed without a pgolf score artifact")
            outcomes[seed] = {"seed": seed, **score, "stages": stages}
        if len(outcomes) < len(runs):
            time.sleep(poll_s)
    return [outcomes[s] for s in runs]
