"""Prefect as a team drives it: the README's server, deployment and two workers, runs started at once.

A git copy of this checkout (smoke preset shrunk further, committed: runs take their commit), a
local Prefect server on 127.0.0.1 with its own PREFECT_HOME, `make deploy`, and two `make worker`s
(two GPU nodes, one job each). The README's commands run as written; only the server's port is
another than the README's 4200, so that a server a developer has running is never touched. The
tests run in file order and build on each other.
"""
from __future__ import annotations

import json
import os
import re
import signal
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.userenv import VENV, PrefectApi, copy_checkout, fake_python_bin, prefect_team, shell, started_run_id

pytestmark = pytest.mark.e2e

PORT = "4211"
API = f"http://127.0.0.1:{PORT}/api"
README_RUN = "PREFECT_API_URL=http://127.0.0.1:4211/api .venv/bin/prefect deployment run pgolf-pipeline/smoke -p preset=smoke"
SHRUNK = {"corpus": {"max_docs": 400}, "shards": {"val_docs": 12}, "train": {"iterations": 4},
          "gptq": {"calib_batches": 1}, "eval": {"seq_len": 128}}


PREFECT = PrefectApi(PORT)
api, logs_of = PREFECT, PREFECT.logs_of


def wait_for(run_id: str, timeout: float = 900) -> dict:
    return PREFECT.wait_for(run_id, timeout)


def score_of(run_id: str) -> dict:
    artifacts = api("/artifacts/filter", {"flow_runs": {"id": {"any_": [run_id]}}})
    # the run's score table, not its stages table (key ...-stages)
    tables = [json.loads(a["data"]) for a in artifacts if a["type"] == "table" and not (a["key"] or "").endswith("-stages")]
    assert tables, artifacts
    return tables[0][0]


@pytest.fixture(scope="module")
def team(tmp_path_factory):
    if not (VENV / "bin" / "prefect").is_file():
        pytest.skip("needs the project's .venv (make install)")
    base = tmp_path_factory.mktemp("team")
    fake_bin = fake_python_bin(base)
    repo = copy_checkout(base / "repo")
    preset = repo / "presets" / "smoke.yaml"
    data = yaml.safe_load(preset.read_text())
    for section, values in SHRUNK.items():
        data.setdefault(section, {}).update(values)
    preset.write_text(yaml.safe_dump(data, sort_keys=False))
    env = {"PREFECT_HOME": str(base / "prefect-home"), "PREFECT_PORT": PORT}
    run = lambda cmd, **kw: shell(cmd, repo, fake_bin, **env, **kw)  # noqa: E731
    run("git init -q && git add -A && git commit -qm pgolf")
    with prefect_team(repo, base, fake_bin, PREFECT, env) as (start, _):
        # Prefect's workers poll every 10 s by default: long enough for a fast run on one worker to end before
        # the other worker has looked, so that two runs started at once would never share the checkout.
        start("PREFECT_WORKER_QUERY_SECONDS=1 make worker", "worker1.log")
        start("PREFECT_WORKER_QUERY_SECONDS=1 make worker", "worker2.log")
        yield {"repo": repo, "run": run, "base": base, "fake_bin": fake_bin, "start": start}


def test_the_ui_on_another_port_asks_its_own_api(team):
    """`make prefect-server PREFECT_PORT=N` serves a UI that talks to the API on N (Prefect's UI
    otherwise asks 127.0.0.1:4200, and shows "Unable to connect" on any other port)."""
    base = API.removesuffix("/api")
    with urllib.request.urlopen(base + "/ui-settings", timeout=30) as response:
        settings = json.loads(response.read())
    assert settings["api_url"] == API
    with urllib.request.urlopen(settings["api_url"] + "/health", timeout=30) as response:
        assert json.loads(response.read()) is True
    with urllib.request.urlopen(base + "/", timeout=30) as response:
        assert "<html" in response.read().decode().lower()


def test_the_readme_deployment_run(team):
    repo, run = team["repo"], team["run"]
    params_before = (repo / "params.yaml").read_bytes()
    run_id = started_run_id(run(README_RUN).stdout)
    flow_run = wait_for(run_id)
    assert flow_run["state_type"] == "COMPLETED", logs_of(run_id)[-3000:]
    assert flow_run["name"] == "smoke"
    assert {"pgolf", "preset:smoke"} <= set(flow_run["tags"])
    score = score_of(run_id)
    assert 0 < score["val_bpb"] < 20 and score["total_bytes"] > 0 and score["margin_bytes"] > 0
    logs = logs_of(run_id)
    assert "Running stage 'train'" in logs and '"stage": "eval"' in logs  # each stage's own lines
    # DVC's advice to commit dvc.lock and push is for a checkout, not a slot's task log
    assert "git add dvc.lock" not in logs and "dvc push" not in logs and "autostage" not in logs
    # the deployer's checkout is never rewritten: the run worked in a slot of it
    assert (repo / "params.yaml").read_bytes() == params_before
    assert run("git status --porcelain").stdout.strip() == ""
    assert (repo / ".pgolf/runs/slot-0/artifacts/eval/metrics.json").is_file()
    assert not (repo / "artifacts/eval").exists()
    # saved as an experiment of the checkout, its outputs in the checkout's cache
    assert score["experiment"] in run(".venv/bin/dvc exp list --name-only").stdout


def test_runs_started_at_once_each_report_their_own_parameters(team):
    repo, run = team["repo"], team["run"]
    variants = {"stride": '["eval.stride=64"]', "seq": '["eval.seq_len=64"]'}
    ids = {}
    for key, overrides in variants.items():
        ids[key] = started_run_id(run(README_RUN.replace(" -p preset=smoke", f" -p preset=smoke -p overrides='{overrides}'")).stdout)
    runs = {key: wait_for(run_id) for key, run_id in ids.items()}
    for key, flow_run in runs.items():
        assert flow_run["state_type"] == "COMPLETED", logs_of(ids[key])[-3000:]
    assert runs["stride"]["name"] == "smoke eval.stride=64" and runs["seq"]["name"] == "smoke eval.seq_len=64"
    # side by side on the two workers, in two slots
    slots = {key: re.search(r"\(slot (\d+) of", logs_of(ids[key])).group(1) for key in ids}
    assert slots["stride"] != slots["seq"]
    # the stages these overrides leave alone come from DVC's cache, in a slot used before or a new one
    for key in ids:
        assert "stage corpus: cached" in logs_of(ids[key]) and "stage train: cached" in logs_of(ids[key]), key
    (a_start, a_end), (b_start, b_end) = ((api(f"/flow_runs/{ids[k]}")["start_time"], api(f"/flow_runs/{ids[k]}")["end_time"])
                                          for k in ("stride", "seq"))
    assert a_start < b_end and b_start < a_end, "the two runs did not overlap"
    # each equals a lone run of its overrides, recomputed (-f) in the checkout itself
    for key, override in (("stride", "eval.stride=64"), ("seq", "eval.seq_len=64")):
        run(f".venv/bin/python -m runner.params --preset smoke --set {override}")
        run(".venv/bin/dvc repro eval")
        run(".venv/bin/dvc repro -f -s eval")
        lone = json.loads((repo / "artifacts/eval/metrics.json").read_text())
        assert score_of(ids[key])["val_bpb"] == lone["val_bpb"], key
    assert score_of(ids["stride"])["val_bpb"] != score_of(ids["seq"])["val_bpb"]
    run("git checkout -- params.yaml dvc.lock 2>/dev/null || git checkout -- params.yaml")


# Two seeds' runs at once once failed here with DVC's SCMError or a TypeError from its git state:
# experiment saves and worktree setup raced in the shared .git. flows/workspace.py serializes them.
def test_a_seed_sweep_across_the_workers_and_in_process(team):
    repo, run = team["repo"], team["run"]
    out = run(".venv/bin/pgolf sweep --preset smoke --seeds 42,0 --deployment pgolf-pipeline/smoke "
              "--out sweeps/deployed/sweep.json", PREFECT_API_URL=API).stdout
    deployed = json.loads((repo / "sweeps/deployed/sweep.json").read_text())
    assert [s["seed"] for s in deployed["seeds"]] == [42, 0] and "mean" in out
    runs = api("/flow_runs/filter", {"flow_runs": {"tags": {"all_": ["seed:42"]}}})
    assert [r["name"] for r in runs] == ["smoke seed=42"]
    parents = api("/flow_runs/filter", {"flow_runs": {"tags": {"all_": ["sweep"]}}})
    assert parents and all({"pgolf", "preset:smoke", "seeds:42,0"} <= set(r["tags"]) for r in parents), parents
    # the README's sweep, in this process: the same numbers for the seeds both ran
    run(".venv/bin/pgolf sweep --preset smoke --seeds 42,0,1234", PREFECT_API_URL=API, timeout=1800)
    local = json.loads((repo / "artifacts/sweeps/smoke/sweep.json").read_text())
    assert local["kind"] == "pgolf-sweep" and [s["seed"] for s in local["seeds"]] == [42, 0, 1234]
    assert [s["val_bpb"] for s in local["seeds"][:2]] == [s["val_bpb"] for s in deployed["seeds"]]
    assert local["seeds"][2]["val_bpb"] != local["seeds"][0]["val_bpb"]  # the seed reached training
    verdict = run(".venv/bin/pgolf significance artifacts/sweeps/smoke sweeps/deployed", check=False)
    assert verdict.returncode in (0, 1), verdict.stderr


def test_one_byte_count_everywhere_a_user_sees_one(team):
    """One run (the sweep's seed 1234, in this process): its Prefect score, the sweep's row, `pgolf
    exp show`, and in the checkout with the experiment applied: size.json, `dvc metrics show`,
    `pgolf summary` and the exported records folder (size.json, submission.json, README) all give
    the one count the submission carries; the raw code size shows only as a labelled detail."""
    repo, run = team["repo"], team["run"]
    local = json.loads((repo / "artifacts/sweeps/smoke/sweep.json").read_text())
    row = next(s for s in local["seeds"] if s["seed"] == 1234)
    total = row["total_bytes"]
    (flow_run,) = api("/flow_runs/filter", {"flow_runs": {"tags": {"all_": ["seed:1234"]}}})
    assert score_of(flow_run["id"])["total_bytes"] == total
    view = run(".venv/bin/pgolf exp show").stdout
    header = view.splitlines()[0].split()
    exp_row = next(line.split() for line in view.splitlines() if line.strip().startswith(row["experiment"]))
    assert exp_row[header.index("bytes")] == f"{total:,}", view
    run(f".venv/bin/dvc exp apply {row['experiment']} && .venv/bin/dvc checkout -q")
    try:
        size = json.loads((repo / "artifacts/pack/size.json").read_text())
        assert size["total_bytes"] == total and size["model_bytes"] + size["code_bytes"] == total
        assert "train_gpt.py" in size["code_counted"] and size["pipeline_code_bytes"] > size["code_bytes"]
        metrics = json.loads(run(".venv/bin/dvc metrics show --json").stdout)
        shown = next(iter(metrics.values()))["data"]["artifacts/pack/size.json"]["data"]
        assert shown["total_bytes"] == total
        summary = run(".venv/bin/pgolf summary").stdout
        assert f"artifact bytes  {total:,}  (model {size['model_bytes']:,} + code {size['code_bytes']:,}" in summary
        assert f"{size['pipeline_code_bytes']:,}" in summary and "not counted" in summary
        run(".venv/bin/pgolf export --out records/count --name count")
        records = repo / "records/count"
        submission = json.loads((records / "submission.json").read_text())
        assert submission["bytes_total"] == json.loads((records / "size.json").read_text())["total_bytes"] == total
        assert submission["bytes_code"] == size["code_bytes"]
        assert f"| {total:,} | {size['model_bytes']:,} | {size['code_bytes']:,} |" in (records / "README.md").read_text()
    finally:
        run("git checkout -- params.yaml dvc.lock artifacts/.runs 2>/dev/null; .venv/bin/dvc checkout -q", check=False)


def ancestor_groups(pid: int) -> set[int]:
    """The process groups of `pid` and its ancestors, up to (not including) this test's own."""
    groups, own = set(), os.getpgid(0)
    while pid > 1:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except FileNotFoundError:
            break
        fields = stat.rsplit(")", 1)[1].split()
        ppid, pgid = int(fields[1]), int(fields[2])
        if pgid == own:
            break
        groups.add(pgid)
        pid = ppid
    return groups


def test_a_run_killed_with_its_worker_is_marked_crashed_and_its_rerun_continues(team):
    """kill -9 of a worker and its flow run during training: nothing is left to tell Prefect, which
    shows the run Running until the next run takes a slot and marks it Crashed. That rerun restores
    what the killed one finished (the data stages) from DVC's cache and completes."""
    run = team["run"]
    slow = README_RUN.replace(" -p preset=smoke", " -p preset=smoke -p overrides='[\"train.iterations=400\"]'")
    killed = started_run_id(run(slow).stdout)
    deadline = time.time() + 600
    while "Running stage 'train'" not in logs_of(killed):
        assert time.time() < deadline, api(f"/flow_runs/{killed}")["state_type"]
        time.sleep(1)
    pid = int(str(api(f"/flow_runs/{killed}")["infrastructure_pid"]).rsplit(":", 1)[-1])
    for group in ancestor_groups(pid):  # the flow run, its stage and the worker that started it
        os.killpg(group, signal.SIGKILL)
    time.sleep(5)
    assert api(f"/flow_runs/{killed}")["state_type"] == "RUNNING"  # what Prefect alone shows
    team["start"]("PREFECT_WORKER_QUERY_SECONDS=1 make worker", "worker3.log")
    # Another train setting (400 steps take over 15 minutes on 2 shared cores): the data stages'
    # inputs are the same, so they still come from the cache.
    short = README_RUN.replace(" -p preset=smoke", " -p preset=smoke -p overrides='[\"train.iterations=30\"]'")
    rerun = started_run_id(run(short).stdout)
    finished = wait_for(rerun)
    assert finished["state_type"] == "COMPLETED", logs_of(rerun)[-3000:]
    assert api(f"/flow_runs/{killed}")["state_type"] == "CRASHED"
    logs = logs_of(rerun)
    assert "died holding its slot without ending: marked Crashed" in logs
    for stage in ("corpus", "tokenizer", "shards"):  # restored from the cache, not recomputed
        assert f"stage {stage}: cached" in logs, logs[-3000:]
    assert "stage train: ran" in logs and 0 < score_of(rerun)["val_bpb"] < 20
