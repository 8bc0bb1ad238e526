"""Progress of long work, on stderr and only from rank 0: a bar when stderr is a terminal, else a
line every PGOLF_PROGRESS_SECONDS (default 30) and one at the end, which is what Prefect's and CI's
logs (and `dvc repro` through a pipe) keep. It never goes into a stage's files, and it reads only
what the host already has (no device sync to show a loss)."""
from __future__ import annotations

import os
import sys
import time
from typing import Iterable, Iterator, TextIO, TypeVar

from pgolf import dist

PROGRESS_SECONDS_ENV = "PGOLF_PROGRESS_SECONDS"
DEFAULT_SECONDS = 30.0
T = TypeVar("T")


def duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def line_interval() -> float:
    text = os.environ.get(PROGRESS_SECONDS_ENV, "")
    try:
        return float(text) if text else DEFAULT_SECONDS
    except ValueError:
        return DEFAULT_SECONDS


class Progress:
    """`done` of `total` units of one piece of work (`what`: "train steps", "eval windows", ...)."""

    def __init__(self, what: str, total: int | None, done: int = 0, stream: TextIO | None = None,
                 every_s: float | None = None, enabled: bool | None = None, clock=time.monotonic):
        self.what, self.total, self.done, self.status = what, total, done, ""
        self.done_at_start = done
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = dist.is_main() if enabled is None else enabled
        self.every_s = line_interval() if every_s is None else every_s
        self.clock = clock
        self.started = self.last_line = clock()
        self.bar = self.open_bar() if self.enabled and self.stream.isatty() else None

    def open_bar(self):
        try:
            from tqdm import tqdm
        except ImportError:  # an exported train_gpt.py may run without tqdm: lines then
            return None
        return tqdm(total=self.total, initial=self.done, desc=self.what, file=self.stream, leave=True, dynamic_ncols=True,
                    bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]")

    def update(self, n: int = 1, status: str = "", eta_s: float | None = None) -> None:
        """`n` more units done; `status` (e.g. the loss) and `eta_s` (the caller's own estimate,
        such as a wallclock cap's) are shown with it."""
        self.done += n
        if not self.enabled:
            return
        self.status = status
        eta = self.eta(eta_s)
        if self.bar is not None:
            self.bar.set_postfix_str(", ".join(p for p in (status, eta and f"eta {eta}") if p), refresh=False)
            self.bar.update(n)
            return
        now = self.clock()
        if now - self.last_line >= self.every_s:
            self.last_line = now
            self.write_line(eta)

    def eta(self, eta_s: float | None) -> str:
        if eta_s is None and self.total and self.done > self.done_at_start:
            eta_s = (self.clock() - self.started) * (self.total - self.done) / (self.done - self.done_at_start)
        return duration(eta_s) if eta_s is not None else ""

    def write_line(self, eta: str, final: bool = False) -> None:
        count = f"{self.done}/{self.total}" if self.total else str(self.done)
        parts = [f"{self.what} {count}", self.status,
                 f"{'took' if final else 'elapsed'} {duration(self.clock() - self.started)}",
                 "" if final else eta and f"eta {eta}"]
        print("pgolf: " + ", ".join(p for p in parts if p), file=self.stream, flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        else:
            self.write_line("", final=True)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def tracked(items: Iterable[T], what: str, total: int | None = None) -> Iterator[T]:
    """`items`, reporting one unit of progress per item (total: len(items) when it has one)."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with Progress(what, total) as progress:
        for item in items:
            yield item
            progress.update()
