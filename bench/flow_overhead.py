"""What orchestration costs when nothing recomputes: `pgolf run` (what `make run` runs, the command
a user waits for) beside `dvc repro` on the same checkout, and where pgolf run's own time goes.

    .venv/bin/python bench/flow_overhead.py [--checkout .] [--repeat 3] [--skip-flows]

Run it in a checkout where the pipeline has run (`make run`), so every stage is cached. It times,
in one process and one run: `dvc repro` (DVC alone: the floor) and `pgolf run`, each as a user
starts it (a fresh process, wall clock), and their ratio (issue 25's target: pgolf run within 1.5x);
then one `pgolf run` under cProfile, its time by phase (interpreter and imports, DVC's config,
the `dvc repro` it launches, the output check against dvc.lock, the summary). Then, unless
--skip-flows, the Prefect flow as Prefect itself records it (flow run start to end, the ephemeral
API's own startup excluded): in the checkout (isolate=False, what `make run VIA=prefect` does)
and in a slot (isolate=True, a deployment's run; its first run in a fresh slot restores the
outputs from the run-cache, so only the later ones are all-cached). Issue #12's target: an
all-cached flow run ends within 5 s of its start.
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


def profile_pgolf_run(checkout: Path, venv_bin: Path) -> dict[str, float]:
    """One `pgolf run` under cProfile: seconds by phase (the cumulative time of the function that is
    the phase); outside main(): the interpreter's start, flows.cli's imports and the exit."""
    import pstats
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run.prof"
        code = "import cProfile\nfrom flows.cli import main\n" + f"cProfile.run(\"main(['run'])\", {str(out)!r})\n"
        started = time.perf_counter()
        subprocess.run([str(venv_bin / "python"), "-c", code], cwd=checkout, capture_output=True, check=True)
        total = time.perf_counter() - started
        stats = pstats.Stats(str(out))
    inside = max(v[3] for k, v in stats.stats.items() if k[2] == "main")
    phases = {"dvc repro (the subprocess)": "_dvc", "DVC's config (default remote)": "default_remote",
              "outputs checked against dvc.lock": "mismatches", "summary": "format_summary"}
    result = {"pgolf run (wall)": total, "outside main(): start, imports, exit": total - inside}
    for label, function in phases.items():
        result[label] = sum(v[3] for k, v in stats.stats.items() if k[2] == function)
    result["the rest of main()"] = inside - sum(result[label] for label in phases)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkout", type=Path, default=Path("."))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--skip-flows", action="store_true", help="only pgolf run and dvc repro (no Prefect API)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    checkout = args.checkout.resolve()
    os.environ.setdefault("PGOLF_PYTHON", sys.executable)
    venv_bin = Path(sys.executable).parent
    rows = {}
    # interleaved, so that a change in the machine's load falls on both alike
    for _ in range(args.repeat):
        rows.setdefault("dvc repro", []).append(timed_command([str(venv_bin / "dvc"), "repro"], checkout))
        rows.setdefault("pgolf run", []).append(timed_command([str(venv_bin / "pgolf"), "run"], checkout))
    dvc_s, pgolf_s = statistics.median(rows["dvc repro"]), statistics.median(rows["pgolf run"])
    print(f"all cached: pgolf run {pgolf_s:.2f} s, dvc repro {dvc_s:.2f} s: {pgolf_s / dvc_s:.2f}x (target: within 1.5x)")
    phases = profile_pgolf_run(checkout, venv_bin)
    print("\none pgolf run, by phase:")
    for what, seconds in phases.items():
        print(f"  {what:<34} {seconds:>7.2f} s")
    statuses = {}
    if not args.skip_flows:
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
    print(f"\n{'what':<36} {'median s':>9} {'runs':>5}")
    for what, times in rows.items():
        print(f"{what:<36} {statistics.median(times):>9.2f} {len(times):>5}")
    not_cached = {k: s for k, s in statuses.items() if any(x != "cached" for x in s)}
    if not_cached:
        print(f"warning: not every stage was cached: {not_cached}")
    if not args.skip_flows:
        worst = max(statistics.median(rows[k]) for k in ("flow run, in the checkout", "flow run, in a slot"))
        print(f"all-cached flow run: {worst:.2f} s (target: within 5 s)")
    if args.json:
        args.json.write_text(json.dumps({"seconds": rows, "ratio": pgolf_s / dvc_s, "phases": phases,
                                         "statuses": statuses}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
