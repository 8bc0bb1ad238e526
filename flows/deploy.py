"""Serve the pipeline flow from a local Prefect server through process work pools.

    make prefect-server   # terminal 1: Prefect API + UI on http://127.0.0.1:4200
    make deploy           # work pool 'pgolf-process' + deployment 'pgolf-pipeline/smoke'; and the split
                          # pipeline: 'pgolf-pipeline/split' on pool 'pgolf-cpu', whose model stages are
                          # runs of 'pgolf-pipeline/gpu' on pool 'pgolf-gpu'
    make worker           # terminal 2: a process worker that polls the pool, one flow run at a time
    make worker POOL=pgolf-cpu WORKER_LIMIT=4   # a CPU node's worker for the split pipeline's data stages
    make worker POOL=pgolf-gpu                  # a GPU node's, for its model stages
    PREFECT_API_URL=http://127.0.0.1:4200/api .venv/bin/prefect deployment run 'pgolf-pipeline/smoke' \
        -p preset=baseline -p workspace=/path/to/checkout

Each flow run takes a slot of its `workspace` checkout (flows/workspace.py: a git worktree at the
run's commit, under .pgolf/runs/), renders params.yaml there and asks DVC for each stage, so runs
started at once never share a params.yaml, the checkout itself is never rewritten, and every slot
shares the checkout's DVC cache (and, with a default remote, every worker's).

The split pipeline puts each stage where it belongs: a run of 'pgolf-pipeline/split' (on a CPU
node) computes corpus, tokenizer and shards and starts train..eval as a run of 'pgolf-pipeline/gpu'
(on a GPU node), its subflow; the shards reach the GPU node through the default DVC remote, which
every worker must share. A split run waits for its GPU part on its CPU worker, so give that worker
a limit as large as the runs it should take at once (WORKER_LIMIT).
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
CPU_POOL, GPU_POOL = "pgolf-cpu", "pgolf-gpu"
# What the seed never reaches and needs no GPU, and what trains and scores the model.
MODEL_STAGES = ("train", "gptq", "pack", "eval")


async def ensure_process_pool(name: str = POOL) -> None:
    async with get_client() as client:
        try:
            await client.read_work_pool(name)
        except ObjectNotFound:
            await client.create_work_pool(WorkPoolCreate(name=name, type="process"))


def deploy(name: str = "smoke", preset: str = "smoke", workspace: Path = ROOT, pool: str = POOL,
           placement: dict[str, str] | None = None):
    from flows.pipeline import pipeline

    asyncio.run(ensure_process_pool(pool))
    source = pipeline.from_source(source=str(ROOT), entrypoint="flows/pipeline.py:pipeline")
    return source.deploy(
        name=name,
        work_pool_name=pool,
        parameters={"preset": preset, "workspace": str(Path(workspace).resolve()),
                    **({"placement": placement} if placement else {})},
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
    parser.add_argument("--no-split", action="store_true", help="skip the split pipeline's two deployments")
    args = parser.parse_args(argv)
    deployment_id = deploy(args.name, args.preset, Path(args.workspace), args.pool)
    print(f"deployment pgolf-pipeline/{args.name} ({deployment_id}) on work pool {args.pool}")
    if not args.no_split:
        deploy("gpu", args.preset, Path(args.workspace), GPU_POOL)
        deploy("split", args.preset, Path(args.workspace), CPU_POOL,
               placement={stage: "pgolf-pipeline/gpu" for stage in MODEL_STAGES})
        print(f"deployment pgolf-pipeline/split on work pool {CPU_POOL}: corpus, tokenizer, shards there; "
              f"{', '.join(MODEL_STAGES)} as runs of pgolf-pipeline/gpu on work pool {GPU_POOL}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
