"""Serve the pipeline flow from a local Prefect server through a process work pool.

    make prefect-server   # terminal 1: Prefect API + UI on http://127.0.0.1:4200
    make deploy           # work pool 'pgolf-process' (type process) + deployment 'pgolf-pipeline/smoke'
    make worker           # terminal 2: a process worker that polls the pool, one flow run at a time
    PREFECT_API_URL=http://127.0.0.1:4200/api .venv/bin/prefect deployment run 'pgolf-pipeline/smoke' \
        -p preset=baseline -p workspace=/path/to/checkout

Each flow run takes a slot of its `workspace` checkout (flows/workspace.py: a git worktree at the
run's commit, under .pgolf/runs/), renders params.yaml there and asks DVC for each stage, so runs
started at once never share a params.yaml, the checkout itself is never rewritten, and every slot
shares the checkout's DVC cache (and, with a default remote, every worker's).
"""
from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.exceptions import ObjectNotFound

ROOT = Path(__file__).resolve().parent.parent
POOL = "pgolf-process"


async def ensure_process_pool(name: str = POOL) -> None:
    async with get_client() as client:
        try:
            await client.read_work_pool(name)
        except ObjectNotFound:
            await client.create_work_pool(WorkPoolCreate(name=name, type="process"))


def deploy(name: str = "smoke", preset: str = "smoke", workspace: Path = ROOT, pool: str = POOL):
    from flows.pipeline import pipeline

    asyncio.run(ensure_process_pool(pool))
    source = pipeline.from_source(source=str(ROOT), entrypoint="flows/pipeline.py:pipeline")
    return source.deploy(
        name=name,
        work_pool_name=pool,
        parameters={"preset": preset, "workspace": str(Path(workspace).resolve())},
        job_variables={"working_dir": str(ROOT)},
        build=False,
        push=False,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.deploy", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", default="smoke")
    parser.add_argument("--preset", default="smoke")
    parser.add_argument("--workspace", default=str(ROOT), help="checkout or git worktree the runs work in")
    parser.add_argument("--pool", default=POOL)
    args = parser.parse_args(argv)
    deployment_id = deploy(args.name, args.preset, Path(args.workspace), args.pool)
    print(f"deployment pgolf-pipeline/{args.name} ({deployment_id}) on work pool {args.pool}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
