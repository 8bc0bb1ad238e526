"""A team's runs sharing one DVC remote (issue 27): what the seed never reaches computed once for a
sweep, a dead holder's stage taken over, the data stages on a CPU pool and the model stages on a
GPU pool, and a failed run retried from the stage that failed.

The harness is tests/test_prefect_team.py's (a git copy of this checkout, a local Prefect server
with its own PREFECT_HOME, `make deploy`, workers started as a user starts them) on a port of its
own, so both modules can run at once. The checkout has a default DVC remote, committed as the
README says, which every run shares. The tests run in file order and build on each other.
"""
from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from tests.userenv import VENV, PrefectApi, copy_checkout, fake_python_bin, prefect_team, shell, started_run_id

pytestmark = pytest.mark.e2e

# A port of its own, random and high: never a developer's server (4200) or another test module's.
PORT = str(random.randint(20000, 60000))
API = f"http://127.0.0.1:{PORT}/api"
DATA_STAGES = ("corpus", "tokenizer", "shards")
MODEL_STAGES = ("train", "gptq", "pack", "eval")
# The smoke preset shrunk to what the chain needs: one training process, a two-layer model.
SHRUNK = {"corpus": {"max_docs": 400}, "shards": {"val_docs": 4},
          "train": {"nproc": 1, "iterations": 2, "warmup_steps": 1, "train_batch_tokens": 4096, "val_every": 0,
                    "model": {"num_layers": 2, "model_dim": 64}},
          "gptq": {"calib_batches": 1}, "eval": {"seq_len": 128}}


PREFECT = PrefectApi(PORT)
api, logs_of = PREFECT, PREFECT.logs_of


def wait_for(run_id: str, timeout: float = 1500) -> dict:
    return PREFECT.wait_for(run_id, timeout)


def stage_rows(run_id: str) -> list[dict]:
    """A pipeline run's own stages table (its results artifact): stage, status, seconds, run."""
    artifacts = api("/artifacts/filter", {"flow_runs": {"id": {"any_": [run_id]}}, "sort": "CREATED_DESC"})
    tables = [json.loads(a["data"]) for a in artifacts if a["type"] == "table"]
    return next(rows for rows in tables if rows and "stage" in rows[0])  # the latest attempt's


def ran_in_logs(run_id: str) -> list[str]:
    return re.findall(r"^stage (\w+): ran ", logs_of(run_id), re.M)


def runs_tagged(*tags: str) -> list[dict]:
    return api("/flow_runs/filter", {"flow_runs": {"tags": {"all_": list(tags)}}})


@pytest.fixture(scope="module")
def team(tmp_path_factory):
    if not (VENV / "bin" / "prefect").is_file():
        pytest.skip("needs the project's .venv (make install)")
    base = tmp_path_factory.mktemp("leases")
    fake_bin = fake_python_bin(base)

    def checkout(path: Path) -> Path:
        repo = copy_checkout(path)
        preset = repo / "presets" / "smoke.yaml"
        data = yaml.safe_load(preset.read_text())
        for section, values in SHRUNK.items():
            for key, value in values.items():
                data.setdefault(section, {})[key] = ({**data[section].get(key, {}), **value} if isinstance(value, dict)
                                                     else value)
        preset.write_text(yaml.safe_dump(data, sort_keys=False))
        return repo

    repo = checkout(base / "repo")
    # On this shared 2-core machine the server's SQLite is often locked for long stretches ("database is
    # locked", 503): clients retry more than Prefect's 5 times before they give up on a call.
    env = {"PREFECT_HOME": str(base / "prefect-home"), "PREFECT_PORT": PORT, "PREFECT_CLIENT_MAX_RETRIES": "12"}
    run = lambda cmd, cwd=repo, **kw: shell(cmd, cwd, fake_bin, **{**env, **kw})  # noqa: E731
    # The README's shared remote, committed: every run, on every worker, pulls and pushes there.
    run(f".venv/bin/dvc remote add -d team {base / 'remote'} && .venv/bin/dvc remote modify team verify true")
    run("git init -q && git add -A && git commit -qm pgolf")
    with prefect_team(repo, base, fake_bin, PREFECT, env) as (start, background):
        # A short heartbeat, so that a killed holder's lease expires within the test (8 s: 4 beats).
        for i in range(3):
            start("PREFECT_WORKER_QUERY_SECONDS=2 make worker", f"worker{i}.log", PGOLF_LEASE_HEARTBEAT_S="2")
        yield {"repo": repo, "run": run, "base": base, "start": start, "checkout": checkout, "background": background}


def test_a_deployed_seed_sweep_computes_what_the_seed_never_reaches_once(team):
    """Three seeds' runs started at once on three workers: corpus, tokenizer and shards run in one of
    them (the others wait for it, then restore), train..eval in each; the scores are those of the
    seeds run one after another in a checkout of its own."""
    repo, run = team["repo"], team["run"]
    out = run(f"PREFECT_API_URL={API} .venv/bin/pgolf sweep --deployment pgolf-pipeline/smoke --preset smoke --seeds 42,0,1234",
              timeout=2400).stdout
    (team["base"] / "sweep-deployed.out").write_text(out)  # the README's table of a 3-seed sweep comes from it
    swept = json.loads((repo / "artifacts/sweeps/smoke/sweep.json").read_text())
    runs = {seed: runs_tagged("pgolf", f"seed:{seed}") for seed in (42, 0, 1234)}
    assert all(len(r) == 1 and r[0]["state_type"] == "COMPLETED" for r in runs.values()), runs
    ids = {seed: r[0]["id"] for seed, r in runs.items()}
    starts = sorted(api(f"/flow_runs/{i}")["start_time"] for i in ids.values())
    ends = sorted(api(f"/flow_runs/{i}")["end_time"] for i in ids.values())
    assert starts[-1] < ends[0], "the three runs did not run side by side"
    # Counted from each run's own record (its stages table) and, apart, from its task logs.
    for stage in DATA_STAGES:
        assert sum(row["stage"] == stage and row["status"] == "ran" for i in ids.values() for row in stage_rows(i)) == 1, stage
        assert sum(ran_in_logs(i).count(stage) for i in ids.values()) == 1, stage
    for stage in MODEL_STAGES:
        assert all(stage in ran_in_logs(i) for i in ids.values()), stage
    waits = [line for i in ids.values() for line in logs_of(i).splitlines()
             if re.match(r"(corpus|tokenizer|shards): waiting for run smoke seed=\d+, which holds it", line)]
    assert waits, "no run waited for another's lease"
    # The sweep's table says the same, and `pgolf sweep` prints it.
    table = {row["stage"]: row for row in swept["stages"]}
    assert all(len(table[s]["ran_in"]) == 1 and table[s]["restored_in"] == 2 for s in DATA_STAGES), table
    assert all(sorted(table[s]["ran_in"]) == [0, 42, 1234] for s in MODEL_STAGES), table
    assert re.search(r"^shards +seed \d+ +[\d.]+ +2 run\(s\)$", out, re.M) and re.search(r"^train +every seed ", out, re.M), out
    # A seed whose run restored the data stages, run alone in a checkout with a cache of its own: the same
    # score. (One seed: each seed alone costs minutes on a 2-core machine, and the seeds differ only in train.)
    restoring = next(seed for seed, i in ids.items() if "corpus" not in ran_in_logs(i))
    alone = team["checkout"](team["base"] / "alone")
    run("git init -q && git add -A && git commit -qm pgolf", cwd=alone)
    run(f".venv/bin/pgolf sweep --preset smoke --seeds {restoring}", cwd=alone, PREFECT_API_URL=API, timeout=2400)
    (by_itself,) = json.loads((alone / "artifacts/sweeps/smoke/sweep.json").read_text())["seeds"]
    assert by_itself["val_bpb"] == next(s["val_bpb"] for s in swept["seeds"] if s["seed"] == restoring)
    assert len({s["val_bpb"] for s in swept["seeds"]}) == 3  # the seed reached training


def kill_flow_run(run_id: str, background: list[subprocess.Popen]) -> None:
    """SIGKILL a flow run's process and what it started (dvc, the stage), not the worker it runs under."""
    pid = int(str(api(f"/flow_runs/{run_id}")["infrastructure_pid"]).rsplit(":", 1)[-1])
    group = os.getpgid(pid)
    if group in {proc.pid for proc in background}:  # shares a worker's group: kill its own tree only
        tree = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout.split()
        for child in [pid, *map(int, tree)]:
            os.kill(child, signal.SIGKILL)
    else:
        os.killpg(group, signal.SIGKILL)


def test_a_holder_killed_mid_stage_is_taken_over(team):
    """Two runs of one configuration want the same train stage: one holds the lease and is killed
    while training; its heartbeat stops, the lease expires and the other run computes train."""
    run = team["run"]
    cmd = (f"PREFECT_API_URL={API} .venv/bin/prefect deployment run pgolf-pipeline/smoke "
           "-p preset=smoke -p overrides='[\"train.iterations=300\"]' -p stages='[\"corpus\",\"tokenizer\",\"shards\",\"train\"]'")
    ids = [started_run_id(run(cmd).stdout) for _ in range(2)]
    deadline = time.time() + 900
    while True:
        waiting = [i for i in ids if "train: waiting for run smoke train.iterations=300, which holds it" in logs_of(i)]
        if waiting:
            break
        assert time.time() < deadline and all(api(f"/flow_runs/{i}")["state_type"] in ("SCHEDULED", "PENDING", "RUNNING")
                                              for i in ids), [logs_of(i)[-2000:] for i in ids]
        time.sleep(1)
    (waiter,) = waiting
    (holder,) = [i for i in ids if i != waiter]
    while "Running stage 'train'" not in logs_of(holder):  # Prefect ships a run's logs every few seconds
        assert time.time() < deadline, logs_of(holder)[-2000:]
        time.sleep(1)
    # 300 steps of the shrunk model: still training when killed
    assert "stage train:" not in logs_of(holder)  # mid-stage
    kill_flow_run(holder, team["background"])
    finished = wait_for(waiter)
    assert finished["state_type"] == "COMPLETED", logs_of(waiter)[-3000:]
    logs = logs_of(waiter)
    assert re.search(r"train: the lease of run smoke train\.iterations=300 expired \(no heartbeat for \d+ s, "
                     r"4 of its 2 s beats\): taking over", logs), logs[-3000:]
    assert "stage train: ran" in logs and "stage shards: cached" in logs
    assert wait_for(holder, 120)["state_type"] in ("CRASHED", "FAILED")


def test_data_stages_on_the_cpu_pool_model_stages_on_the_gpu_pool_and_a_retry_resumes(team):
    """The split deployment, with a worker per pool: the parent run (CPU pool) computes corpus,
    tokenizer and shards; its subflow on the GPU pool, in another node's checkout with a cache of its
    own, gets the shards through the remote and computes train..eval. gptq fails there once; the
    README's retry of the failed run restores what finished and reruns from gptq. Every stage runs
    once, on its pool's worker."""
    repo, run, base, start = team["repo"], team["run"], team["base"], team["start"]
    node = base / "gpu-node"  # the GPU node's own clone: nothing shared with the CPU side but the remote
    run(f"git clone -q {repo} {node} && ln -s {VENV} {node / '.venv'}")
    run(f"PREFECT_API_URL={API} .venv/bin/python -m flows.deploy --name gpu --pool pgolf-gpu --workspace {node} --no-split")
    # The GPU node's stages run through a python that refuses gptq while the file `broken` exists.
    wrapper = base / "python-with-broken-gptq"
    wrapper.write_text(f"#!/bin/sh\nif [ \"$1 $2\" = \"-m tasks.gptq\" ] && [ -e {base / 'broken'} ]; then\n"
                       "  echo 'pgolf gptq: error: a broken node (the test made it so)' >&2; exit 2\nfi\n"
                       f"exec {VENV / 'bin' / 'python'} \"$@\"\n")
    wrapper.chmod(0o755)
    (base / "broken").touch()
    start("PREFECT_WORKER_QUERY_SECONDS=2 make worker POOL=pgolf-cpu WORKER_LIMIT=4", "worker-cpu.log")
    # PY=: the interpreter make hands the stages (PGOLF_PYTHON, bin/stage); the worker's own is the venv's.
    start(f"PREFECT_WORKER_QUERY_SECONDS=2 make worker POOL=pgolf-gpu PY={wrapper}", "worker-gpu.log")
    fresh = "-p overrides='[\"corpus.max_docs=300\"]'"  # inputs no earlier run had: every stage computes
    parent = started_run_id(run(f"PREFECT_API_URL={API} .venv/bin/prefect deployment run pgolf-pipeline/split -p preset=smoke"
                                + " " + fresh).stdout)
    failed = wait_for(parent)
    assert failed["state_type"] == "FAILED", logs_of(parent)[-3000:]
    (first,) = api("/flow_runs/filter", {"flow_runs": {"parent_flow_run_id": {"any_": [parent]}}}) or [None]
    assert first is not None and "a broken node" in logs_of(first["id"])
    assert ran_in_logs(parent) == list(DATA_STAGES) and ran_in_logs(first["id"]) == ["train"]
    (base / "broken").unlink()
    retried = run(f"PREFECT_API_URL={API} .venv/bin/prefect flow-run retry {parent}").stdout
    assert "scheduled for retry" in retried
    finished = wait_for(parent)
    assert finished["state_type"] == "COMPLETED", logs_of(parent)[-3000:]
    children = api("/flow_runs/filter", {"flow_runs": {"parent_flow_run_id": {"any_": [parent]}},
                                         "sort": "EXPECTED_START_TIME_ASC"})
    assert len(children) == 2 and children[0]["id"] == first["id"]
    second = children[1]
    # The retry restored corpus..shards (parent) and train (GPU node), and ran from gptq on.
    assert ran_in_logs(parent) == list(DATA_STAGES)  # still only the first attempt's
    assert ran_in_logs(second["id"]) == ["gptq", "pack", "eval"]
    assert {r["stage"]: r["status"] for r in stage_rows(second["id"])} == {
        "corpus": "cached", "tokenizer": "cached", "shards": "cached", "train": "cached", "gptq": "ran", "pack": "ran",
        "eval": "ran"}
    # Where each ran: the parent on the CPU pool's worker, its subflows on the GPU pool's, linked to it.
    assert finished["work_pool_name"] == "pgolf-cpu" and {c["work_pool_name"] for c in children} == {"pgolf-gpu"}
    for child in children:
        assert api(f"/task_runs/{child['parent_task_run_id']}")["flow_run_id"] == parent
    cpu_log, gpu_log = (base / "worker-cpu.log").read_text(), (base / "worker-gpu.log").read_text()
    took = lambda run_id, log: f"submitting flow run '{run_id}'" in log  # noqa: E731 - a parent's log names its children
    assert took(parent, cpu_log) and not took(parent, gpu_log)
    assert all(took(c["id"], gpu_log) and not took(c["id"], cpu_log) for c in children)
    assert f"workspace {node}/.pgolf/runs/slot-" in logs_of(second["id"])  # the GPU node's own checkout
    # The parent's results: every stage once, its score the GPU part's.
    rows = {r["stage"]: r for r in stage_rows(parent)}
    assert [r["status"] for r in rows.values()] == ["cached"] * 3 + ["cached", "ran", "ran", "ran"]
    assert rows["eval"]["run"] == second["name"] and second["name"].endswith(": train..eval")
    score = next(json.loads(a["data"])[0] for a in api("/artifacts/filter", {"flow_runs": {"id": {"any_": [parent]}}})
                 if a["type"] == "table" and "val_bpb" in json.loads(a["data"])[0])
    assert 0 < score["val_bpb"] < 20
