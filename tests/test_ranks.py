"""The rank launcher (tasks.ranks, pgolf.dist.launch): one process in-process, ranks under torchrun
with the failing rank's own message first, several nodes on 127.0.0.1 giving the one-node result."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pgolf import dist
from pgolf.errors import ConfigError, FormatError
from tasks import ranks
from tasks import train as train_stage
from tasks.common import execute
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
        "config.json", "dvclive", "metrics.json", "model.safetensors", "train_log.jsonl"]


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
    with pytest.raises(ConfigError, match="python -m tasks.ranks train"):
        ranks.run_on_ranks(train_stage.SPEC, config(nproc=1, nnodes=2), {}, Path("unused"), lambda *a: None)


def test_ranks_with_another_config_than_rank_0_stop(monkeypatch):
    monkeypatch.setattr(dist, "all_gather_objects", lambda digest: [digest, "another", digest])
    with pytest.raises(ConfigError, match=r"ranks \[1\] run with another config"):
        ranks.check_same_config("{}")
