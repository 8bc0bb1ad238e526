"""DVC as its users drive it: the README's commands in a plain shell that names only `.venv/bin/dvc`.

The shell has no activated venv, and the `python`/`python3` on its PATH cannot import anything, so
nothing passes by finding the project's interpreter on PATH. One git repository for the module (a
copy of this checkout's tracked files, the venv linked in); the tests run in file order and each
builds on the last: a run, identical reruns, experiments (one in the workspace, two queued), the
views, then a judge's rerun from a fresh clone through a folder remote.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from tests.userenv import VENV, copy_checkout, fake_python_bin, shell

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent
TINY = ("--preset smoke --set corpus.max_docs=400 --set shards.val_docs=12 --set train.iterations=4 "
        "--set gptq.calib_batches=1 --set eval.seq_len=128")
UP_TO_DATE = "Data and pipelines are up to date."


@pytest.fixture(scope="module")
def user(tmp_path_factory):
    if not (VENV / "bin" / "dvc").is_file():
        pytest.skip("needs the project's .venv (make install)")
    base = tmp_path_factory.mktemp("dvcuser")
    fake_bin = fake_python_bin(base)
    repo = copy_checkout(base / "repo")
    run = lambda cmd, **kw: shell(cmd, repo, fake_bin, **kw)  # noqa: E731
    run("git init -q && git add -A && git commit -qm pgolf")
    return {"repo": repo, "run": run, "fake_bin": fake_bin, "base": base}


def eval_metrics(repo: Path) -> dict:
    return json.loads((repo / "artifacts/eval/metrics.json").read_text())


def test_dvc_repro_from_a_plain_shell(user):
    repo, run = user["repo"], user["run"]
    assert run("python3 -c 'import torch'", check=False).returncode == 97
    run(f".venv/bin/python -m runner.params {TINY}")
    out = run(".venv/bin/dvc repro").stdout
    for stage in ("corpus", "tokenizer", "shards", "train", "gptq", "pack", "eval"):
        assert f"Running stage '{stage}'" in out
    assert sorted(p.name for p in (repo / "artifacts/shards").iterdir()) == ["manifest.json", "train", "val"]
    record = json.loads((repo / "artifacts/.runs/eval.json").read_text())
    assert record["timings"]["eval_seconds"] > 0 and "eval_seconds" not in eval_metrics(repo)
    run("git add dvc.lock params.yaml artifacts/.runs/eval.json artifacts/.runs/train.json && git commit -qm run")
    assert run(".venv/bin/dvc status").stdout.strip() == UP_TO_DATE


def test_forced_and_direct_reruns_change_no_hash(user):
    """Seconds live in run records, not in outputs: the same inputs give the same bytes, DVC sees
    nothing changed and nothing downstream reruns."""
    repo, run = user["repo"], user["run"]
    run(".venv/bin/dvc repro -f -s pack")
    run(".venv/bin/dvc repro -f -s gptq")
    assert run("git status --porcelain dvc.lock").stdout == ""
    assert run(".venv/bin/dvc status").stdout.strip() == UP_TO_DATE
    before = eval_metrics(repo)
    run(".venv/bin/pgolf stage eval")  # the judge's rerun without DVC
    assert eval_metrics(repo) == before
    assert run(".venv/bin/dvc status").stdout.strip() == UP_TO_DATE
    assert "eval" not in run(".venv/bin/dvc repro").stdout.replace("Stage 'eval' didn't change", "")


def test_exp_run_set_keeps_params_meaning(user):
    repo, run = user["repo"], user["run"]
    out = run(".venv/bin/dvc exp run -S eval.stride=64").stdout
    assert "Running stage 'eval'" in out and "Running stage 'train'" not in out
    text = (repo / "params.yaml").read_text()
    assert "ttt: off" in text or "ttt: 'off'" in text  # ruamel drops the quotes; pgolf still reads a string
    assert eval_metrics(repo)["stride"] == 64 and eval_metrics(repo)["mode"] == "sliding"


def test_queued_experiments_run_two_at_a_time(user):
    repo, run = user["repo"], user["run"]
    run(".venv/bin/dvc exp run --queue -S eval.batch_seqs=2 -n bs2")
    run(".venv/bin/dvc exp run --queue -S eval.batch_seqs=3 -n bs3")
    # DVC's queue starts its workers, and they their experiments, as `dvc` found on PATH
    # (dvc/repo/experiments/queue/celery.py and tasks.py): the README's line puts it there.
    run('PATH="$PWD/.venv/bin:$PATH" .venv/bin/dvc queue start -j 2')
    deadline = time.time() + 900
    while time.time() < deadline:
        status = run(".venv/bin/dvc queue status").stdout
        if "Queued" not in status and "Running" not in status:
            break
        time.sleep(5)
    assert "Failed" not in status, status + run(".venv/bin/dvc queue logs bs2", check=False).stdout
    rows = json.loads(run(".venv/bin/dvc exp show --json").stdout)
    names = {r.get("name") for e in rows for exp in e.get("experiments") or [] for r in exp["revs"]}
    assert {"bs2", "bs3"} <= names
    view = run(".venv/bin/pgolf exp show").stdout
    header = view.splitlines()[0].split()
    assert header[:1] == ["experiment"] and "eval.batch_seqs" in header and "val_bpb" in header
    assert len(header) < 15, view  # the changed params and the score, not 235 columns
    bs3 = next(line for line in view.splitlines() if line.strip().startswith("bs3")).split()
    assert bs3[header.index("eval.batch_seqs")] == "3" and bs3[header.index("eval_s")] != "-"
    run(".venv/bin/dvc exp apply bs3")
    assert "batch_seqs: 3" in (repo / "params.yaml").read_text()
    assert run(".venv/bin/dvc status").stdout.strip() == UP_TO_DATE  # its outputs came with it


def test_metrics_and_plots_views(user):
    repo, run = user["repo"], user["run"]
    shown = run(".venv/bin/dvc metrics show").stdout
    for column in ("val_bpb", "val_loss", "timings.eval_seconds", "total_bytes", "margin_bytes"):
        assert column in shown
    diff = run(".venv/bin/dvc metrics diff HEAD")
    assert "failed to load" not in diff.stdout + diff.stderr
    assert "stride" in diff.stdout or "val_bpb" in diff.stdout  # the applied experiment against the commit
    run(".venv/bin/dvc plots show -o plots")
    page = (repo / "plots/index.html").read_text()
    # Every plot an image the page carries: it opens with no network (DVC's own charts load vega
    # from a CDN, and GPU clusters are often offline).
    assert "<script" not in page and "cdn." not in page
    for plot in ("train/plots/train_loss.svg", "train/plots/learning_rate.svg", "train/plots/val_bpb.svg",
                 "pack/bytes_by_group.svg"):
        image = "static/workspace_artifacts_" + plot.replace("/", "_")
        assert image in page and (repo / "plots" / image).read_text().startswith("<svg"), plot
    assert "code (train_gpt.py)" in (repo / "plots/static/workspace_artifacts_pack_bytes_by_group.svg").read_text()


def test_a_fresh_clones_first_run_reproduces_the_committed_lock(user):
    """The committed dvc.lock is what `make run` makes in a fresh clone (the builtin corpus is fixed
    bytes, not text from the running Python), so the clone's cache holds the commit's outputs and
    `dvc metrics diff` against it loads them."""
    repo, run = user["repo"], user["run"]
    clone = user["base"] / "fresh"
    run(f"git clone -q {repo} {clone}")
    (clone / ".venv").symlink_to(VENV)
    os.utime(clone / "pyproject.toml", (0, 0))
    crun = lambda cmd, **kw: shell(cmd, clone, user["fake_bin"], **kw)  # noqa: E731
    crun("make run")
    # the run records hold this run's seconds: they are the one thing a rerun changes
    assert crun("git status --porcelain -- . ':(exclude)artifacts/.runs'").stdout == ""
    diff = crun(".venv/bin/dvc metrics diff --all")
    assert "failed to load" not in diff.stdout + diff.stderr
    row = next(line.split() for line in diff.stdout.splitlines() if " val_bpb " in f" {line} ")
    assert row[2] == row[3] and row[4] in ("0", "-", "0.0"), diff.stdout


def test_judge_reruns_eval_from_a_fresh_clone_and_a_remote(user):
    """The README's judge section: pull only what eval reads, rerun it, get the pinned bytes."""
    repo, run = user["repo"], user["run"]
    run("git checkout -q -- params.yaml dvc.lock && .venv/bin/dvc checkout -q")
    pinned = eval_metrics(repo)
    remote = user["base"] / "remote"
    run(f".venv/bin/dvc remote add -d store {remote} && git add .dvc/config && git commit -qm remote && "
        ".venv/bin/dvc push -q")
    judge = user["base"] / "judge"
    run(f"git clone -q {repo} {judge}")
    (judge / ".venv").symlink_to(VENV)
    os.utime(judge / "pyproject.toml", (0, 0))
    jrun = lambda cmd, **kw: shell(cmd, judge, user["fake_bin"], **kw)  # noqa: E731
    jrun("make install")  # the venv is there already: nothing to do
    jrun('.venv/bin/dvc remote modify --local "$(.venv/bin/dvc remote default)" verify true')
    jrun(".venv/bin/dvc pull artifacts/pack artifacts/shards/val artifacts/shards/manifest.json artifacts/tokenizer")
    assert "verify = true" in (judge / ".dvc/config.local").read_text()
    assert not (judge / "artifacts/shards/train").exists() and not (judge / "artifacts/train").exists()
    assert not (judge / "artifacts/gptq").exists()
    jrun(".venv/bin/dvc repro -s eval --force")
    assert eval_metrics(judge) == pinned
    assert jrun("git status --porcelain dvc.lock").stdout == ""
    assert jrun(".venv/bin/dvc status eval").stdout.strip() == UP_TO_DATE


def test_a_second_worker_restores_every_stage_from_the_shared_remote(user):
    """One cache for every worker: with a default remote, `pgolf run` pushes what it computed (and
    the run-cache), and another clone pulls each stage instead of recomputing it."""
    repo, run = user["repo"], user["run"]
    run(".venv/bin/pgolf run")  # nothing to compute here; pushes outputs and run-cache
    second = user["base"] / "worker2"
    run(f"git clone -q {repo} {second}")
    (second / ".venv").symlink_to(VENV)
    os.utime(second / "pyproject.toml", (0, 0))
    out = shell(".venv/bin/pgolf run", second, user["fake_bin"]).stdout
    assert "Running stage" not in out, out
    table = out[out.index("stage      status"):].split("\n\n")[0]  # the stages' table, not the clocks below it
    summary = [line.split() for line in table.splitlines() if line.split()[:1] and line.split()[0] in
               ("corpus", "tokenizer", "shards", "train", "gptq", "pack", "eval")]
    assert len(summary) == 7 and all(row[1] == "cached" for row in summary), out
    assert eval_metrics(second) == eval_metrics(repo)
    assert shell(".venv/bin/dvc status", second, user["fake_bin"]).stdout.strip() == UP_TO_DATE


def test_a_remote_missing_one_object_and_holding_a_corrupt_one(user):
    """The remote lost train's weights and holds a corrupt artifact. The judge's verified pull fails
    naming artifacts/pack instead of checking out wrong bytes; `pgolf run` in a fresh clone computes
    what the remote cannot supply and ends with the same score; without `verify` pgolf warns."""
    import hashlib

    repo, run = user["repo"], user["run"]
    remote = user["base"] / "remote"
    run(".venv/bin/dvc remote modify store verify true && git add .dvc/config && git commit -qm verify")

    def remote_object(path: Path) -> Path:
        digest = hashlib.md5(path.read_bytes()).hexdigest()
        return remote / "files" / "md5" / digest[:2] / digest[2:]

    remote_object(repo / "artifacts/train/model.safetensors").unlink()
    corrupt = remote_object(repo / "artifacts/pack/artifact.bin")
    corrupt.chmod(0o644)
    data = bytearray(corrupt.read_bytes())
    data[100] ^= 0xFF
    corrupt.write_bytes(bytes(data))
    third = user["base"] / "worker3"
    run(f"git clone -q {repo} {third}")
    (third / ".venv").symlink_to(VENV)
    os.utime(third / "pyproject.toml", (0, 0))
    wrun = lambda cmd, **kw: shell(cmd, third, user["fake_bin"], **kw)  # noqa: E731
    pulled = wrun(".venv/bin/dvc pull artifacts/pack", check=False)
    assert pulled.returncode == 1 and "artifacts/pack" in pulled.stderr + pulled.stdout
    assert not (third / "artifacts/pack/artifact.bin").exists()
    out = wrun(".venv/bin/pgolf run").stdout
    assert "pgolf: the remote 'store' could not supply every output" in out, out
    assert "Running stage 'train'" in out and "does not verify" not in out
    assert eval_metrics(third) == eval_metrics(repo)
    wrun(".venv/bin/dvc remote modify --local store verify false")
    assert "the DVC remote 'store' does not verify what it downloads" in wrun(".venv/bin/pgolf run").stdout


def test_make_variables_reach_pgolf_as_values_never_as_shell(user):
    """`make params SET=...` (and PRESET, PREFECT_PORT) with shell and make syntax in it: a value pgolf
    or make refuses, nothing run."""
    repo, run = user["repo"], user["run"]
    before = (repo / "params.yaml").read_bytes()
    for variables in ("SET='train.iterations=3;touch INJECTED'", "SET='$(shell touch INJECTED)'",
                      "SET='train.seed=1 `touch INJECTED`'", "PRESET='smoke;touch INJECTED'"):
        made = run(f"make params {variables}", check=False)
        assert made.returncode != 0 and "pgolf params: error:" in made.stderr, (variables, made.stderr)
        assert not (repo / "INJECTED").exists(), variables
    assert (repo / "params.yaml").read_bytes() == before
    made = run("make prefect-server PREFECT_PORT='4200;touch INJECTED'", check=False)
    assert made.returncode != 0 and "PREFECT_PORT must be a port number" in made.stderr
    assert not (repo / "INJECTED").exists()


def test_the_readme_one_liners(user):
    """The export, the Prefect run and a GPU preset's one-line run (up to the data it needs)."""
    repo, run = user["repo"], user["run"]
    run('.venv/bin/pgolf export --out records/track_10min_16mb/2026-11-24_MyRun --name "My run" --author Me --github-id me')
    submission = json.loads((repo / "records/track_10min_16mb/2026-11-24_MyRun/submission.json").read_text())
    assert submission["val_bpb"] == eval_metrics(repo)["val_bpb"]
    assert submission["bytes_total"] == json.loads((repo / "artifacts/pack/size.json").read_text())["total_bytes"]
    audited = run(".venv/bin/pgolf audit records/track_10min_16mb/2026-11-24_MyRun", check=False)
    assert audited.returncode == 1 and "verdict: fail" in audited.stdout  # one seed, the builtin corpus
    lines = {line.split()[0]: line.split()[1] for line in audited.stdout.splitlines()[1:-1]}
    assert lines["seeds"] == "fail" and lines["artifact_bytes"] == "pass"  # the clocks depend on this machine
    compared = run(".venv/bin/pgolf diff . records/track_10min_16mb/2026-11-24_MyRun")
    assert "fingerprint: the same" in compared.stdout and "val_bpb" in compared.stdout
    out = run("make run VIA=prefect").stdout
    assert "Running stage" not in out and "cached" in out
    run(".venv/bin/pgolf params --preset baseline --set train.nproc=8 --set train.device=cuda")
    assert "nproc: 8" in (repo / "params.yaml").read_text()
    gpu = run('make run PRESET=baseline SET="train.nproc=8 train.device=cuda"', check=False)
    assert gpu.returncode != 0 and "docs_selected.jsonl" in gpu.stdout + gpu.stderr  # the data is not here
    params = (repo / "params.yaml").read_text()
    assert "nproc: 8" in params and "device: cuda" in params and "--set train.nproc=8" in params.splitlines()[0]
