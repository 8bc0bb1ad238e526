"""The orchestration's parts that need no pipeline run: run slots, retry rules, names, sweep tables."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from prefect.states import Failed

from flows import repro
from flows.pipeline import describe, experiment_name, run_tags, transient_only
from flows.repro import ReproError, StageCrash
from flows.sweep import parse_seeds, sweep_table
from flows.workspace import WorkspaceError, run_workspace
from pgolf.errors import ConfigError, InputError, PgolfError


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True,
                          env={"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
                               "GIT_COMMITTER_EMAIL": "t@t", "PATH": "/usr/bin:/bin"}).stdout.strip()


@pytest.fixture
def checkout(tmp_path):
    repo = tmp_path / "checkout"
    repo.mkdir()
    git(repo, "init", "-q")
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=repo, check=True)
    (repo / "params.yaml").write_text("x: 1\n")
    (repo / ".gitignore").write_text("/.pgolf/\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "one")
    return repo


def test_concurrent_runs_get_slots_of_their_own_and_the_checkout_is_never_written(checkout):
    (checkout / "params.yaml").write_text("x: 2\n")  # an edit the deployer has not committed
    head = git(checkout, "rev-parse", "HEAD")
    with run_workspace(checkout) as first, run_workspace(checkout) as second:
        assert first.slot != second.slot and first.path != second.path
        for slot in (first, second):
            assert slot.commit == head and slot.checkout == checkout.resolve()
            assert (slot.path / "params.yaml").read_text() == "x: 1\n"  # the commit's, not the edit
            assert slot.uncommitted == ("params.yaml",)
            assert git(slot.path, "rev-parse", "HEAD") == head
            # every slot uses the checkout's DVC cache
            assert str(checkout / ".dvc" / "cache") in (slot.path / ".dvc" / "config.local").read_text()
        (first.path / "params.yaml").write_text("x: 3\n")
        assert (second.path / "params.yaml").read_text() == "x: 1\n"
    assert (checkout / "params.yaml").read_text() == "x: 2\n"
    assert git(checkout, "status", "--porcelain") == "M params.yaml"
    with run_workspace(checkout) as again:  # a freed slot is taken again, reset to the run's commit
        assert again.slot == first.slot
        assert (again.path / "params.yaml").read_text() == "x: 1\n"


def test_a_slot_follows_the_revision_it_is_asked_for(checkout):
    first = git(checkout, "rev-parse", "HEAD")
    (checkout / "params.yaml").write_text("x: 5\n")
    git(checkout, "commit", "-qam", "two")
    with run_workspace(checkout, revision=first) as slot:
        assert slot.commit == first and (slot.path / "params.yaml").read_text() == "x: 1\n"
    with run_workspace(checkout) as slot:
        assert (slot.path / "params.yaml").read_text() == "x: 5\n"


def test_workspace_errors_name_the_folder(tmp_path, checkout):
    with pytest.raises(WorkspaceError, match="not inside a git repository"):
        with run_workspace(tmp_path):
            pass
    with pytest.raises(WorkspaceError, match="'nosuch' is not a commit"):
        with run_workspace(checkout, revision="nosuch"):
            pass


@pytest.mark.parametrize("error, retried", [
    (StageCrash("killed"), True),
    (RuntimeError("connection reset"), True),
    (ReproError("stage exited 2"), False),
    (InputError("bad shard", "x.bin"), False),
])
def test_only_crashes_are_retried(error, retried):
    assert transient_only(None, None, Failed(data=error)) is retried


@pytest.mark.parametrize("exit_line, error", [
    ("ERROR: failed to reproduce 'eval': failed to run: bin/stage eval, exited with 2", ReproError),
    ("ERROR: failed to reproduce 'train': failed to run: bin/stage train, exited with 137", StageCrash),
    ("ERROR: failed to reproduce 'train': failed to run: bin/stage train, exited with -9", StageCrash),
    ("ERROR: unexpected error - dvc.yaml is broken", ReproError),
])
def test_a_failed_dvc_call_says_whether_the_stage_refused_or_crashed(monkeypatch, tmp_path, exit_line, error):
    monkeypatch.setattr(repro, "dvc_command", lambda: ["bash", "-c", f"echo \"{exit_line}\"; exit 1", "dvc"])
    with pytest.raises(error, match="failed"):
        repro._dvc(tmp_path, ["repro"], echo=False)
    assert not issubclass(StageCrash, PgolfError)  # so transient_only retries it


def test_run_names_tags_and_experiment_names():
    assert describe("record", ["eval.stride=64"], 42) == "record eval.stride=64 seed=42"
    assert describe(None) == "params.yaml"
    assert run_tags("record", 42) == ["pgolf", "preset:record", "seed:42"]
    name = experiment_name(describe("smoke", ["eval.stride=64", "train.lr=0.02 x"], 7))
    assert name == "smoke-eval.stride=64-train.lr=0.02-x-seed=7"
    ok = subprocess.run(["git", "check-ref-format", f"refs/exps/ab/cd/{name}"]).returncode == 0
    assert ok
    long = experiment_name("smoke " + " ".join(f"train.k{i}={i}" for i in range(40)))
    assert len(long) == 80 and long != experiment_name("smoke " + " ".join(f"train.k{i}={i}" for i in range(41)))


def test_seeds_and_the_sweep_table():
    assert parse_seeds("42,0,1234") == [42, 0, 1234]
    for bad in ("", "4,4", "1,x"):
        with pytest.raises(ConfigError, match="--seeds"):
            parse_seeds(bad)
    outcomes = [{"seed": s, "val_loss": loss, "val_bpb": loss / 2, "total_bytes": 10, "experiment": f"e{s}"}
                for s, loss in ((42, 2.0), (0, 2.2), (1234, 2.4))]
    table = sweep_table("record", ["eval.stride=64"], outcomes)
    assert table["kind"] == "pgolf-sweep" and [r["seed"] for r in table["seeds"]] == [42, 0, 1234]
    assert table["mean"]["val_loss"] == pytest.approx(2.2) and table["std"]["val_loss"] == pytest.approx(0.2)
    assert table["mean"]["val_bpb"] == pytest.approx(1.1)
    assert sweep_table("smoke", [], outcomes[:1])["std"]["val_bpb"] is None


def test_the_sweep_file_is_what_the_record_test_reads(tmp_path):
    import json

    from pgolf.significance import read_side

    outcomes = [{"seed": s, "val_loss": 2.0 + s / 1000, "val_bpb": 1.0, "total_bytes": 10} for s in (1, 2, 3)]
    (tmp_path / "sweep.json").write_text(json.dumps(sweep_table("record", [], outcomes)))
    side = read_side(tmp_path)
    assert [s.seed for s in side.seeds] == ["1", "2", "3"] and side.values("val_loss") == [2.001, 2.002, 2.003]
