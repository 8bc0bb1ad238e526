"""The stage runner: atomic outputs, input checks, run records, CLI errors."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from pgolf.errors import FormatError, InputError
from runner import records
from runner.stage import StageSpec, execute, stage_main


@dataclass
class ToyConfig:
    value: int = 1
    fail: bool = False


def toy_run(cfg: ToyConfig, inputs: dict[str, Path], out: Path) -> dict:
    (out / "value.txt").write_text(str(cfg.value))
    (out / "partial.bin").write_bytes(b"x" * 100)
    if cfg.fail:
        raise FormatError("bad content", inputs.get("src", out))
    return {"value": cfg.value}


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def spec(inputs=None) -> StageSpec:
    return StageSpec(name="toy", config_cls=ToyConfig, run=toy_run, out="artifacts/toy",
                     inputs=inputs or {}, producers={"src": "upstream"})


def test_success_renames_into_place_and_records_run(in_tmp):
    metrics = execute(spec(), ToyConfig(value=7))
    assert metrics == {"value": 7}
    assert (in_tmp / "artifacts/toy/value.txt").read_text() == "7"
    record = json.loads((in_tmp / "artifacts/.runs/toy.json").read_text())
    assert record["stage"] == "toy" and record["out"] == "artifacts/toy" and record["seconds"] >= 0
    assert [p.name for p in (in_tmp / "artifacts").iterdir() if p.name.startswith(".toy")] == []


def test_failure_leaves_no_partial_output_and_keeps_previous(in_tmp):
    execute(spec(), ToyConfig(value=1))
    with pytest.raises(FormatError):
        execute(spec(), ToyConfig(value=2, fail=True))
    assert (in_tmp / "artifacts/toy/value.txt").read_text() == "1"
    leftovers = [p.name for p in (in_tmp / "artifacts").iterdir() if p.name not in ("toy", ".runs")]
    assert leftovers == []


def test_failure_on_first_run_leaves_no_output_folder(in_tmp):
    with pytest.raises(FormatError):
        execute(spec(), ToyConfig(fail=True))
    assert not (in_tmp / "artifacts/toy").exists()


def test_missing_input_names_path_and_producer(in_tmp):
    with pytest.raises(InputError) as err:
        execute(spec({"src": "artifacts/nothing"}), ToyConfig())
    assert "artifacts/nothing" in str(err.value) and "upstream" in str(err.value)
    assert not (in_tmp / "artifacts/toy").exists()


def test_cli_reports_config_errors_with_file(in_tmp, capsys):
    (in_tmp / "params.yaml").write_text("toy:\n  valeu: 3\n")
    assert stage_main(spec(), ["--params", "params.yaml"]) == 2
    err = capsys.readouterr().err
    assert "params.yaml" in err and "valeu" in err


def test_cli_runs_with_section(in_tmp, capsys):
    (in_tmp / "params.yaml").write_text("toy:\n  value: 3\n")
    assert stage_main(spec(), ["--params", "params.yaml"]) == 0
    assert (in_tmp / "artifacts/toy/value.txt").read_text() == "3"


def timed_run(cfg: ToyConfig, inputs: dict[str, Path], out: Path) -> dict:
    (out / "value.txt").write_text(str(cfg.value))
    records.record_timings(out, toy_seconds=1.5)
    return {"value": cfg.value}


def test_timings_go_to_the_record_beside_the_output_not_into_it(tmp_path):
    """Run records belong to their output folder (an --out elsewhere never overwrites the
    workspace's), and what a run took never enters the output, whose hash DVC compares."""
    timed = StageSpec(name="toy", config_cls=ToyConfig, run=timed_run, out="artifacts/toy")
    out = tmp_path / "elsewhere" / "toy"
    assert execute(timed, ToyConfig(value=3), {}, out) == {"value": 3, "toy_seconds": 1.5}
    assert sorted(p.name for p in out.iterdir()) == ["value.txt"]
    record = records.read_run_record(out)
    assert record == json.loads((tmp_path / "elsewhere/.runs/toy.json").read_text())
    assert record["timings"] == {"toy_seconds": 1.5} and record["started_at"].endswith("Z")


def test_a_killed_runs_temporary_folders_are_removed(tmp_path):
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    out = tmp_path / "artifacts/toy"
    for name in (f".toy.tmp-{dead_pid}", f".toy.old-{dead_pid}", f".toy.tmp-{os.getpid() + 0}x"):
        (tmp_path / "artifacts" / name).mkdir(parents=True)
    live = tmp_path / "artifacts" / f".toy.tmp-{os.getppid()}"  # a live process's: left alone
    live.mkdir()
    execute(spec(), ToyConfig(value=1), {}, out)
    left = sorted(p.name for p in (tmp_path / "artifacts").iterdir())
    assert left == sorted([".runs", "toy", live.name, f".toy.tmp-{os.getpid()}x"])


def metric_run(cfg: ToyConfig, inputs: dict[str, Path], out: Path) -> dict:
    (out / "metrics.json").write_text(json.dumps({"score": cfg.value * 10}))
    records.record_timings(out, toy_seconds=float(cfg.value))
    return {}


def test_a_record_names_its_output_and_is_put_back_when_dvc_restores_that_output(tmp_path):
    """DVC restores an output from its cache without running the stage: the record beside it is
    then the last run's, of another config. refresh_run_record puts back the record of the run that
    made the output in place (this machine's history), or says none is known: never the other's."""
    import shutil

    toy = StageSpec(name="toy", config_cls=ToyConfig, run=metric_run, out="artifacts/toy")
    out = tmp_path / "artifacts/toy"
    execute(toy, ToyConfig(value=1), {}, out)
    first = records.read_run_record(out)
    assert first["of"]["params_sha256"] == records.config_sha256(ToyConfig(value=1))
    assert set(first["of"]["outputs"]) == {"metrics.json"}
    shutil.copytree(out, tmp_path / "kept")  # what the cache holds of run 1
    execute(toy, ToyConfig(value=2), {}, out)
    assert records.refresh_run_record(toy.name, ToyConfig(value=2), out) == "current"
    assert records.read_run_record(out)["timings"] == {"toy_seconds": 2.0}
    shutil.rmtree(out)
    shutil.copytree(tmp_path / "kept", out)  # `dvc repro` restores run 1's output; the record is run 2's
    assert records.refresh_run_record(toy.name, ToyConfig(value=1), out) == "restored"
    restored = records.read_run_record(out)
    assert restored["timings"] == {"toy_seconds": 1.0} and restored["started"] == first["started"]
    assert restored["restored"] is True and restored["restored_at"].endswith("Z")
    # an output no run here made (another machine's, from a shared cache): no seconds at all
    (out / "metrics.json").write_text(json.dumps({"score": 99}))
    assert records.refresh_run_record(toy.name, ToyConfig(value=1), out) == "unknown"
    unknown = records.read_run_record(out)
    assert unknown["seconds"] is None and unknown["timings"] == {} and "no record" in unknown["note"]
