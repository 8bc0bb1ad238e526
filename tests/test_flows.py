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


def test_a_run_that_died_holding_its_slot_is_named_once_and_one_that_ended_never(checkout):
    """kill -9 of a run leaves its slot's lock free but its name in the lock file: the next run to take
    any slot is told (to mark it Crashed in Prefect), once; a run that ended clears its name."""
    with run_workspace(checkout, run_id="ended-run") as slot:
        assert slot.orphaned_runs == ()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\n"
        "from flows.workspace import run_workspace\n"
        f"with run_workspace({str(checkout)!r}, run_id='killed-run'):\n"
        "    print('held', flush=True); time.sleep(600)\n")], cwd=Path(__file__).resolve().parents[1],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with run_workspace(checkout, run_id="alongside") as alongside:  # the holder lives: not an orphan
        assert alongside.orphaned_runs == ()
    holder.kill()
    holder.wait()
    with run_workspace(checkout, run_id="second") as first_after, run_workspace(checkout, run_id="third") as other:
        assert sorted(first_after.orphaned_runs + other.orphaned_runs) == ["killed-run"]
    with run_workspace(checkout, run_id="fourth") as later:
        assert later.orphaned_runs == ()


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


def test_the_default_remote_is_dvcs_own_at_every_level(tmp_path, monkeypatch):
    """`pgolf run` reads the default remote without importing DVC (issue 25); it must be what DVC's
    own Config says with the remote set at the system, global, repo and local levels, each
    shadowing the one before, and none at all."""
    from dvc.config import Config

    work = tmp_path / "work"
    (work / ".dvc").mkdir(parents=True)
    (work / ".dvc" / "config").write_text("")
    for level in ("system", "global"):
        (tmp_path / level).mkdir()
        monkeypatch.setenv(f"DVC_{level.upper()}_CONFIG_DIR", str(tmp_path / level))

    def both():
        return repro.default_remote_name(work), Config(dvc_dir=str(work / ".dvc"))["core"].get("remote") or None

    assert both() == (None, None)
    assert repro.default_remote(work) == (None, False)
    for name, path in (("SiteWide", tmp_path / "system" / "config"), ("mine", tmp_path / "global" / "config"),
                       ("team", work / ".dvc" / "config"), ("override", work / ".dvc" / "config.local")):
        path.write_text(f"[core]\n    remote = {name}\n['remote \"{name.lower()}\"']\n    url = /tmp/nowhere\n")
        ours, dvcs = both()
        assert ours == dvcs == name.lower(), path
    path.write_text(path.read_text() + "    verify = true\n")
    assert repro.default_remote(work) == ("override", True)


def test_exp_show_seconds_only_from_a_record_of_the_rows_own_output():
    """`pgolf exp show` reads the eval record as `dvc exp show --json` gives it: a record of another
    config, or of another output (DVC restored this one from its cache), shows `cached`, never
    its seconds."""
    from flows.experiments import rows_from_json
    from tasks import evaluate
    from runner.records import canonical_sha256, config_sha256
    from runner.params import render

    from pgolf.typed_params import from_dict

    params = render("smoke")
    metrics = {"val_bpb": 1.5, "val_loss": 2.5}
    identity = {"params_sha256": config_sha256(from_dict(evaluate.Config, params["eval"], "eval")),
                "outputs": {"metrics.json": canonical_sha256(metrics)}}

    def entry(eval_params: dict, metric_data: dict, record: dict) -> dict:
        return {"rev": "workspace", "data": {
            "params": {"params.yaml": {"data": {**params, "eval": eval_params}}},
            "metrics": {"artifacts/eval/metrics.json": {"data": metric_data},
                        "artifacts/.runs/eval.json": {"data": record}}}}

    record = {"timings": {"eval_seconds": 12.5}, "of": identity}
    own, = rows_from_json([entry(params["eval"], metrics, record)])
    assert own.metrics["eval_s"] == 12.5
    other_config, = rows_from_json([entry({**params["eval"], "stride": 64}, metrics, record)])
    other_output, = rows_from_json([entry(params["eval"], {**metrics, "val_bpb": 1.4}, record)])
    restored, = rows_from_json([entry(params["eval"], metrics, {"restored": True, "timings": {}, "of": identity})])
    assert other_config.metrics["eval_s"] == other_output.metrics["eval_s"] == restored.metrics["eval_s"] == "cached"
    # the spelling of a value is no difference: DVC's -S writes 64 where a preset wrote 64.0
    same, = rows_from_json([entry({**params["eval"], "budget_s": 0}, metrics, record)])
    assert same.metrics["eval_s"] == 12.5


def test_dvcs_git_and_push_advice_stays_out_of_the_task_log():
    from flows.pipeline import DvcHints

    output = ["Running stage 'eval':", "> bin/stage eval", '{"stage": "eval"}', "Updating lock file 'dvc.lock'", "",
              "To track the changes with git, run:", "", "\tgit add dvc.lock", "", "To enable auto staging, run:", "",
              "\tdvc config core.autostage true", "Use `dvc push` to send your updates to remote storage."]
    hints = DvcHints()
    kept = [line for line in output if line.strip() and not hints.is_hint(line)]
    assert kept == ["Running stage 'eval':", "> bin/stage eval", '{"stage": "eval"}', "Updating lock file 'dvc.lock'"]


def test_a_stage_stopped_by_ctrl_c_is_one_line_not_a_failure(monkeypatch, tmp_path, capsys):
    """The stage said where it stopped; DVC's own error line about its exit 130 is not shown, and it
    is neither retried (a PgolfError) nor called a crash."""
    from pgolf.errors import StageInterrupted

    said = "pgolf train: interrupted at step 3 of 9; a rerun restarts training (train.resume_every is 0: no resume points)"
    script = (f"echo 'Running stage train:'; echo '{said}'; "
              "echo \"ERROR: failed to reproduce 'train': failed to run: bin/stage train, exited with 130\"; exit 255")
    monkeypatch.setattr(repro, "dvc_command", lambda: ["bash", "-c", script, "dvc"])
    with pytest.raises(StageInterrupted) as err:
        repro._dvc(tmp_path, ["repro"], echo=True)
    assert str(err.value) == said.split(": ", 1)[1] and err.value.shown
    out = capsys.readouterr().out
    assert said in out and "ERROR" not in out
    assert not transient_only(None, None, type("S", (), {"data": err.value})())


def test_a_placement_cuts_the_pipeline_into_runs_of_its_deployments():
    from flows.pipeline import check_placement, plan

    gpu = {s: "pgolf-pipeline/gpu" for s in ("train", "gptq", "pack", "eval")}
    stages = ["corpus", "tokenizer", "shards", "train", "gptq", "pack", "eval"]
    assert plan(stages, check_placement(gpu)) == [(None, ["corpus", "tokenizer", "shards"]),
                                                   ("pgolf-pipeline/gpu", ["train", "gptq", "pack", "eval"])]
    assert plan(stages, {"train": "a/b"}) == [(None, stages[:3]), ("a/b", ["train"]), (None, stages[4:])]
    assert plan(stages, {}) == [(None, stages)]
    with pytest.raises(ConfigError, match="placement: unknown stage.*'trian'"):
        check_placement({"trian": "pgolf-pipeline/gpu"})
    with pytest.raises(ConfigError, match="must name a deployment as FLOW/NAME"):
        check_placement({"train": "gpu"})


def test_the_sweeps_stage_table_says_what_ran_once_and_what_per_seed():
    from flows.sweep import stage_runs

    def outcome(seed, ran):
        return {"seed": seed, "stages": [{"stage": s, "status": "ran" if s in ran else "cached", "seconds": 2.0 if s in ran else 0.0}
                                         for s in ("corpus", "shards", "train")]}

    rows = stage_runs([outcome(42, {"corpus", "train"}), outcome(0, {"shards", "train"}), outcome(1234, {"train"})])
    assert rows == [{"stage": "corpus", "ran_in": [42], "seconds": [2.0], "restored_in": 2},
                    {"stage": "shards", "ran_in": [0], "seconds": [2.0], "restored_in": 2},
                    {"stage": "train", "ran_in": [42, 0, 1234], "seconds": [2.0, 2.0, 2.0], "restored_in": 0}]


def test_a_seed_run_that_crashed_before_it_started_is_scheduled_again_and_one_that_ran_fails_the_sweep():
    """A worker that could not start a run (the API busy: a 503 while submitting it) leaves it Crashed
    with run_count 0; the sweep schedules it again instead of failing. A run that ran and failed
    (or crashed) ends the sweep with its message."""
    import json as json_module
    import logging
    import uuid
    from types import SimpleNamespace

    from prefect.states import Completed, Crashed, Failed

    from flows.sweep import SweepError, collect_outcomes

    class Client:
        def __init__(self, states):
            self.states, self.scheduled = states, []

        def read_flow_run(self, run_id):
            state, run_count = self.states[run_id][0]
            return SimpleNamespace(state=state, run_count=run_count)

        def set_flow_run_state(self, run_id, state, force):
            self.scheduled.append((run_id, state.name))
            self.states[run_id].pop(0)

        def read_artifacts(self, artifact_filter):
            return [SimpleNamespace(data=json_module.dumps([{"val_bpb": 1.5, "val_loss": 2.0}])),
                    SimpleNamespace(data=json_module.dumps([{"stage": "train", "status": "ran", "seconds": 1.0}]))]

    a, b = uuid.uuid4(), uuid.uuid4()
    crashed_at_submission = (Crashed(message="Failed to submit flow run to infrastructure"), 0)
    client = Client({a: [crashed_at_submission, (Completed(), 1)], b: [(Completed(), 1)]})
    outcomes = collect_outcomes(client, {42: a, 0: b}, logging.getLogger("test"), poll_s=0)
    assert client.scheduled == [(a, "Scheduled")]
    assert [o["seed"] for o in outcomes] == [42, 0] and outcomes[0]["val_bpb"] == 1.5
    assert outcomes[0]["stages"] == [{"stage": "train", "status": "ran", "seconds": 1.0}]
    for ended in ((Crashed(message="killed"), 1), (Failed(message="gptq refused its input"), 1)):
        with pytest.raises(SweepError, match=f"seed 42's run {a} ended"):
            collect_outcomes(Client({a: [ended]}), {42: a}, logging.getLogger("test"), poll_s=0)
    always = Client({a: [crashed_at_submission] * 3})
    with pytest.raises(SweepError, match="ended CRASHED: Failed to submit"):
        collect_outcomes(always, {42: a}, logging.getLogger("test"), poll_s=0)
    assert len(always.scheduled) == 2
