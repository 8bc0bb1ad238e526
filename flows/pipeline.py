"""The Prefect flow: one task per stage, each asking DVC to reproduce exactly that stage.

Prefect's own input caching is off (cache_policy=NO_CACHE): the tasks' arguments are paths, and a
path stays the same while its contents change. DVC decides what recomputes; Prefect adds
retries, logs, placement and parameter sweeps. A flow run after `dvc repro` recomputes nothing,
and the other way round.
"""
from __future__ import annotations

import time
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.repro import StageResult, format_summary, record_pipeline_run, reproduce, set_params
from tasks.params import STAGES


@task(name="reproduce-stage", cache_policy=NO_CACHE, task_run_name="{stage}")
def reproduce_stage(stage: str, workspace: str) -> dict:
    (result,) = reproduce(workspace, stage=stage, echo=True)
    get_run_logger().info("stage %s: %s (%.1f s)", result.stage, result.status, result.seconds)
    return {"stage": result.stage, "status": result.status, "seconds": result.seconds}


@flow(name="pgolf-pipeline")
def pipeline(preset: str | None = "smoke", overrides: list[str] | None = None, workspace: str = ".",
             stages: list[str] | None = None) -> list[dict]:
    """Render params.yaml from `preset` (None: the params.yaml there) + `overrides` in `workspace`, then
    reproduce each stage in order."""
    workspace = str(Path(workspace).resolve())
    set_params(workspace, preset, overrides or [])
    started = time.time()
    results = []
    for stage in stages or STAGES:
        results.append(reproduce_stage(stage, workspace))
    record_pipeline_run(workspace, started, [StageResult(**r) for r in results], "prefect", preset, overrides or [])
    get_run_logger().info("\n%s", format_summary([StageResult(**r) for r in results], workspace))
    return results


if __name__ == "__main__":
    pipeline()
