"""The rank launcher (runner.ranks, pgolf.dist.launch): one process in-process, ranks under torchrun
with the failing rank's own message first, several nodes on 127.0.0.1 giving the one-node result."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pgolf import dist
from pgolf.errors import ConfigError, FormatError
from runner import ranks
from tasks import train as train_stage
from runner.stage import execute
from tests.conftest import stage_env, write_params
from tests.test_train import config

def test_one_process_on_one_node_runs_in_the_stage_process(data_dirs, tmp_path, monkeypatch):
    def no_torchrun(*args, **kwargs):
        raise AssertionError("one process must not launch torchrun")

    monkeypatch.setattr(dist, "launch", no_torchrun)
    metrics = execute(train_stage.SPEC, config(nproc=1, grad_accum_steps=2, iterations=2, warmup_steps=0),
                      {"shards": data_dirs["shards"]}, tmp_path / "t")
    assert metrics["steps"] == 2 and metrics["world_size"] == 1
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == [
        "config.json", "dvclive", "metrics.json", "model.safetensors", "plots", "train_log.jsonl"]
    assert sorted(p.name for p in (tmp_path / "t" / "plots").iterdir()) == ["learning_rate.svg", "train_loss.svg"]


def test_a_bad_input_under_two_ranks_is_the_first_error_line(data_dirs, tmp_path):
    """The ranks find a corrupt train shard; the stage's stderr starts with that rank's message."""
    shards = tmp_path / "shards"
    shutil.copytree(data_dirs["shards"], shards)
    bad = sorted(shards.rglob("fineweb_train_*.bin"))[0]
    data = bytearray(bad.read_bytes())
    data[-2:] = b"\xff\xff"  # token 65535: a valid header, only a reader of the tokens sees it
    bad.write_bytes(bytes(data))
    params = write_params(tmp_path / "params.yaml", train=config(iterations=2))
    proc = subprocess.run([sys.executable, "-m", "tasks.train", "--params", str(params), "--shards", str(shards),
                           "--out", str(tmp_path / "train")], cwd=tmp_path,
                          # past the stage process's own sha256 check, into the ranks
                          env=stage_env(PGOLF_VERIFY_SHARDS="header"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "PGOLF_VERIFY_SHARDS=header" not in line]
    assert lines[0] == (f"pgolf train: error: {bad}: token id 65535 is out of range for vocab size 400: the shard "
                        "was built with a different tokenizer")
    assert lines[1].startswith("  (rank ") and lines[1].endswith("of 2; PGOLF_TRACEBACK=1 prints its traceback)")
    assert "Traceback" not in proc.stderr and "ChildFailedError" not in proc.stderr
    assert not (tmp_path / "train").exists()


def interrupt_training(data_dirs, tmp_path, cfg) -> subprocess.CompletedProcess:
    """`python -m tasks.train` as a terminal runs it, Ctrl-C'd (SIGINT to its whole process group, as
    a terminal sends it) once the ranks are past step 3."""
    import os
    import signal
    import time

    params = write_params(tmp_path / "params.yaml", train=cfg)
    proc = subprocess.Popen([sys.executable, "-m", "tasks.train", "--params", str(params), "--shards",
                             str(data_dirs["shards"]), "--out", str(tmp_path / "train")], cwd=tmp_path, env=stage_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("step 4/"):
            break
    os.killpg(proc.pid, signal.SIGINT)
    started = time.monotonic()
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, "".join(seen) + out, err), time.monotonic() - started


def test_ctrl_c_under_two_ranks_is_one_line_and_exit_130(data_dirs, tmp_path):
    """Both ranks and torchrun stop quietly; the stage says where it stopped and what a rerun does,
    and leaves no half-written output."""
    proc, seconds = interrupt_training(data_dirs, tmp_path, config(iterations=100000, resume_every=0))
    assert proc.returncode == 130, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert re.fullmatch(r"pgolf train: interrupted at step \d+ of 100000; a rerun restarts training "
                        r"\(train.resume_every is 0: no resume points\)", lines[0]), lines[0]
    assert seconds < 60
    assert not (tmp_path / "train").exists() and not list(tmp_path.glob(".train.*"))


def test_ctrl_c_with_resume_points_says_where_a_rerun_resumes(data_dirs, tmp_path):
    proc, _ = interrupt_training(data_dirs, tmp_path, config(iterations=100000, resume_every=2,
                                                             resume_dir=str(tmp_path / "resume")))
    assert proc.returncode == 130, proc.stderr
    (line,) = [line for line in proc.stderr.splitlines() if line.strip()]
    step, resumes = map(int, re.fullmatch(r"pgolf train: interrupted at step (\d+) of 100000; a rerun resumes from "
                                          r"step (\d+) \(the last resume point, .*\)", line).groups())
    assert 2 <= resumes <= step and resumes % 2 == 0


def record(folder: Path, rank: int, at: float, message: str) -> None:
    (folder / f"rank{rank}.json").write_text(json.dumps(
        {"rank": rank, "time": at, "message": message, "traceback": f"Traceback of rank {rank}\n"}))


def test_the_rank_that_failed_first_is_the_error_and_its_traceback_the_note(tmp_path):
    record(tmp_path, 0, 2.0, "RuntimeError: Connection closed by peer")
    record(tmp_path, 1, 1.0, "shards/x.bin: truncated shard")
    err = dist.first_rank_error(tmp_path, "tasks.evaluate", 2, dist.Nodes(), 1)
    assert str(err).splitlines()[0] == "shards/x.bin: truncated shard"
    assert "rank 1 of 2" in str(err) and err.__notes__ == ["rank 1's traceback:\nTraceback of rank 1"]
    silent = dist.first_rank_error(tmp_path / "none", "tasks.evaluate", 2, dist.Nodes(), -9)
    assert "before a rank reported an error" in str(silent) and "exit -9" in str(silent)


def test_a_worker_reports_its_error_only_under_the_launcher(tmp_path, monkeypatch):
    monkeypatch.delenv(dist.RANK_ERRORS_ENV, raising=False)
    assert not dist.report_rank_error(FormatError("bad", "a.bin"))
    monkeypatch.setenv(dist.RANK_ERRORS_ENV, str(tmp_path))
    monkeypatch.setenv("RANK", "3")
    try:
        raise FloatingPointError("loss is nan")
    except FloatingPointError as err:
        assert dist.report_rank_error(err)
    saved = json.loads((tmp_path / "rank3.json").read_text())
    assert saved["message"] == "FloatingPointError: loss is nan" and "raise FloatingPointError" in saved["traceback"]


def test_nodes_come_from_the_environment_and_must_be_complete(monkeypatch):
    monkeypatch.delenv(dist.NODE_RANK_ENV, raising=False)
    monkeypatch.delenv(dist.RDZV_ENDPOINT_ENV, raising=False)
    assert dist.Nodes.from_environment(1) == dist.Nodes()
    with pytest.raises(ConfigError, match="PGOLF_NODE_RANK"):
        dist.Nodes.from_environment(2)
    monkeypatch.setenv(dist.RDZV_ENDPOINT_ENV, "127.0.0.1:29400")
    for bad in ("2", "x", "-1"):
        monkeypatch.setenv(dist.NODE_RANK_ENV, bad)
        with pytest.raises(ConfigError, match="0..1"):
            dist.Nodes.from_environment(2)
    monkeypatch.setenv(dist.NODE_RANK_ENV, "1")
    assert dist.Nodes.from_environment(2) == dist.Nodes(2, 1, "127.0.0.1:29400")
    with pytest.raises(ConfigError, match="python -m runner.ranks train"):
        ranks.run_on_ranks(train_stage.SPEC, config(nproc=1, nnodes=2), {}, Path("unused"))


def test_ranks_with_another_config_than_rank_0_stop(monkeypatch):
    monkeypatch.setattr(dist, "all_gather_objects", lambda digest: [digest, "another", digest])
    with pytest.raises(ConfigError, match=r"ranks \[1\] run with another config"):
        ranks.check_same_config("{}")
