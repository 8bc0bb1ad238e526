"""What orchestration costs when nothing recomputes: an all-cached flow run beside `dvc repro`.

    .venv/bin/python bench/flow_overhead.py [--checkout .] [--repeat 3]

Run it in a checkout where the pipeline has run (`make run`), so every stage is cached. It times,
in one process and one run: `dvc repro` (DVC alone: the floor), `pgolf run` (the CLI), and the
Prefect flow as Prefect itself records it (flow run start to end, the ephemeral API's own startup
excluded): in the checkout (isolate=False, what `make run VIA=prefect` does) and in a slot
(isolate=True, a deployment's run; its first run in a fresh slot restores the outputs from the
run-cache, so only the later ones are all-cached). Issue #12's target: an all-cached flow run
ends within 5 s of its start.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def timed_command(cmd: list[str], cwd: Path) -> float:
    started = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, check=True, capture_output=True)
    return time.perf_counter() - started


def flow_seconds(checkout: Path, isolate: bool) -> tuple[float, list[str]]:
    """(start to end of the flow run as Prefect recorded it, each stage's status)."""
    from prefect import get_client

    from flows.pipeline import pipeline

    state = pipeline(preset=None, workspace=str(checkout), isolate=isolate, return_state=True)
    outcome = state.result()
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(state.state_details.flow_run_id)
    return (run.end_time - run.start_time).total_seconds(), [s["status"] for s in outcome["stages"]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkout", type=Path, default=Path("."))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    checkout = args.checkout.resolve()
    os.environ.setdefault("PGOLF_PYTHON", sys.executable)
    venv_bin = Path(sys.executable).parent
    rows = {}
    rows["dvc repro"] = [timed_command([str(venv_bin / "dvc"), "repro"], checkout) for _ in range(args.repeat)]
    rows["pgolf run"] = [timed_command([str(venv_bin / "pgolf"), "run"], checkout) for _ in range(args.repeat)]
    statuses = {}
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        for isolate, label in ((False, "flow run, in the checkout"), (True, "flow run, in a slot")):
            times = []
            for i in range(args.repeat + (1 if isolate else 0)):
                seconds, status = flow_seconds(checkout, isolate)
                if isolate and i == 0:
                    rows["flow run, slot's first (restores)"] = [seconds]
                    continue
                times.append(seconds)
                statuses[label] = status
            rows[label] = times
    print(f"{'what':<36} {'median s':>9} {'runs':>5}")
    for what, times in rows.items():
        print(f"{what:<36} {statistics.median(times):>9.2f} {len(times):>5}")
    not_cached = {k: s for k, s in statuses.items() if any(x != "cached" for x in s)}
    if not_cached:
        print(f"warning: not every stage was cached: {not_cached}")
    worst = max(statistics.median(rows[k]) for k in ("flow run, in the checkout", "flow run, in a slot"))
    print(f"\nall-cached flow run: {worst:.2f} s (target: within 5 s); dvc repro alone {statistics.median(rows['dvc repro']):.2f} s")
    if args.json:
        args.json.write_text(json.dumps({"seconds": rows, "statuses": statuses}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
