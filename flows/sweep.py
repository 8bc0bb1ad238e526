"""`pgolf sweep`: one pipeline run per seed, and the per-seed table a record claim needs.

    pgolf sweep --preset record --seeds 42,0,1234 [--set k=v ...] [--deployment pgolf-pipeline/gpu]

Without --deployment the seeds run one after another in this process, each a subflow in a slot of
this checkout (flows/workspace.py). With it, each seed is a run of that deployment, all started at
once, so as many GPU workers as the pool has take them side by side; each run's score comes back
through its results artifact. Either way the sweep writes its table (sweep.json, the form
`pgolf significance` and `tasks.export --sweep` read) and makes it a Prefect table artifact.
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

from flows.pipeline import describe, pipeline
from pgolf.errors import ConfigError, PgolfError

METRICS = ("val_loss", "val_bpb")
FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


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
             "experiment": o.get("experiment")} for o in outcomes]
    columns = {m: [r[m] for r in rows] for m in METRICS}
    return {"kind": "pgolf-sweep", "preset": preset, "overrides": overrides, "seeds": rows,
            "mean": {m: statistics.fmean(v) for m, v in columns.items()},
            "std": {m: statistics.stdev(v) if len(v) > 1 else None for m, v in columns.items()}}


def default_out(checkout: str | Path, preset: str | None, overrides: list[str]) -> Path:
    slug = re.sub(r"[^A-Za-z0-9_.=-]+", "-", describe(preset, overrides)).strip("-")[:100]
    return Path(checkout) / "artifacts" / "sweeps" / slug / "sweep.json"


@flow(name="pgolf-sweep", flow_run_name="sweep {preset} seeds {seeds}")
def sweep(preset: str | None, seeds: list[int], overrides: list[str] | None = None, workspace: str = ".",
          deployment: str | None = None, revision: str = "HEAD", out: str | None = None) -> dict:
    overrides = list(overrides or [])
    if deployment:
        outcomes = _through_deployment(deployment, preset, seeds, overrides, revision)
    else:
        outcomes = [pipeline(preset=preset, overrides=overrides, seed=seed, workspace=workspace, revision=revision)
                    for seed in seeds]
    for outcome in outcomes:
        if any(outcome.get(m) is None for m in METRICS):
            raise SweepError(f"seed {outcome['seed']}'s run ended without val_loss/val_bpb: {outcome}")
    table = sweep_table(preset, overrides, outcomes)
    path = Path(out) if out else default_out(workspace, preset, overrides)
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
    outcomes = {}
    with get_client(sync_client=True) as client:
        while len(outcomes) < len(runs):
            for seed, run_id in runs.items():
                if seed in outcomes:
                    continue
                state = client.read_flow_run(run_id).state
                if state is None or state.type.value not in FINAL:
                    continue
                if state.type.value != "COMPLETED":
                    raise SweepError(f"seed {seed}'s run {run_id} ended {state.type.value}: {state.message}")
                outcomes[seed] = {"seed": seed, **_score_artifact(client, run_id)}
            if len(outcomes) < len(runs):
                time.sleep(poll_s)
    return [outcomes[s] for s in seeds]


def _score_artifact(client, run_id) -> dict:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterType

    artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
        flow_run_id=ArtifactFilterFlowRunId(any_=[run_id]), type=ArtifactFilterType(any_=["table"])))
    for artifact in artifacts:
        rows = json.loads(artifact.data) if isinstance(artifact.data, str) else artifact.data
        if rows and isinstance(rows, list) and "val_bpb" in rows[0]:
            return rows[0]
    raise SweepError(f"flow run {run_id} completed without a pgolf score artifact")
