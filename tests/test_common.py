"""The stage runner: atomic outputs, input checks, run records, CLI errors."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from pgolf.errors import FormatError, InputError
from tasks import common
from tasks.common import StageSpec, execute, stage_main


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
    record = json.loads((in_tmp / common.RUNS_DIR / "toy.json").read_text())
    assert record["stage"] == "toy" and record["metrics"] == {"value": 7} and record["seconds"] >= 0
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
