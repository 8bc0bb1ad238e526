"""Progress output: a bar on a terminal, periodic lines elsewhere, only on rank 0, never in outputs."""
from __future__ import annotations

import io
from pgolf.progress import Progress, duration, tracked
from pgolf.train import loop as training_loop
from tasks import train as train_stage
from runner.stage import execute
from tests.test_train import config


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_off_a_terminal_a_line_every_interval_and_one_at_the_end():
    stream, clock = io.StringIO(), Clock()
    progress = Progress("train steps", 10, stream=stream, every_s=10, enabled=True, clock=clock)
    for second in range(1, 26):
        clock.now = second
        progress.update(0 if second % 5 else 1, status="loss 3.2000")
    progress.close()
    assert stream.getvalue().splitlines() == [
        "pgolf: train steps 2/10, loss 3.2000, elapsed 0m10s, eta 0m40s",
        "pgolf: train steps 4/10, loss 3.2000, elapsed 0m20s, eta 0m30s",
        "pgolf: train steps 5/10, loss 3.2000, took 0m25s",
    ]


def test_the_callers_eta_wins_and_a_resumed_count_does_not_speed_it_up():
    stream, clock = io.StringIO(), Clock()
    progress = Progress("train steps", 100, done=50, stream=stream, every_s=0, enabled=True, clock=clock)
    clock.now = 10
    progress.update(10)  # 10 steps in 10 s, 40 to go
    progress.update(0, eta_s=5)  # a wallclock cap 5 s away
    assert [line.rsplit(", ", 1)[1] for line in stream.getvalue().splitlines()] == ["eta 0m40s", "eta 0m05s"]
    assert duration(3725) == "1h02m"


def test_a_terminal_gets_a_bar_and_other_ranks_nothing():
    terminal = Terminal()
    with Progress("eval windows", 3, stream=terminal, enabled=True) as progress:
        for _ in range(3):
            progress.update(status="x")
    assert "eval windows: 100%|" in terminal.getvalue() and "\r" in terminal.getvalue()
    assert "pgolf:" not in terminal.getvalue()
    quiet = io.StringIO()
    with Progress("eval windows", 3, stream=quiet, every_s=0, enabled=False) as progress:
        progress.update()
    assert quiet.getvalue() == ""


def test_train_reports_steps_loss_and_tokens_per_second_on_stderr_only(data_dirs, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PGOLF_PROGRESS_SECONDS", "0")
    execute(train_stage.SPEC, config(nproc=1, grad_accum_steps=2, iterations=2, warmup_steps=0, log_every=1),
            {"shards": data_dirs["shards"]}, tmp_path / "t")
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.startswith("pgolf: train steps")]
    assert [line.split(",")[0] for line in lines] == ["pgolf: train steps 1/2"] + ["pgolf: train steps 2/2"] * 2
    assert " tokens/s, elapsed " in lines[0] and ", eta " in lines[0] and ", loss " in lines[0]
    assert ", took " in lines[-1]
    assert "pgolf:" not in captured.out
    for path in (tmp_path / "t").rglob("*"):
        assert not path.is_file() or b"pgolf: train steps" not in path.read_bytes(), path


def test_tracked_items_are_reported_as_they_are_consumed(monkeypatch, capsys):
    monkeypatch.setenv("PGOLF_PROGRESS_SECONDS", "0")
    assert list(tracked(iter("abc"), "gptq tensors", total=3)) == ["a", "b", "c"]
    assert [line.split(",")[0] for line in capsys.readouterr().err.splitlines()] == [
        "pgolf: gptq tensors 1/3", "pgolf: gptq tensors 2/3", "pgolf: gptq tensors 3/3", "pgolf: gptq tensors 3/3"]


def test_the_eta_is_the_sooner_of_the_iterations_and_the_wallclock_cap():
    assert training_loop.remaining_seconds(10, 1000.0, 100, None) == 9.0
    assert training_loop.remaining_seconds(10, 1000.0, 100, 4000.0) == 3.0
    assert training_loop.remaining_seconds(10, 5000.0, 100, 4000.0) == 0.0
