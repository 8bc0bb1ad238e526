"""What a records folder's training logs say, read the way a judge reads them (docs/lineage.md#audit).

Logs differ by lineage (the baseline's `step:N/M ... train_time:Xms`, R1's hyperparameter dump and
`stopping_early: wallclock_cap train_time: Xms`, `GPTQ:collected 67 Hessians in 4.7s`, `Total
submission size quantized+pergroup: N bytes`, `quantized_ttt_phased val_loss:... val_bpb:...`,
`total_eval_time:508.8s`), and some logs carry the whole script they ran. Every pattern here is
anchored to a line's start and wants digits where the script's own source would have an expression,
so code lines never match; what no line states is None, never a guess.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from pgolf import canonical

# The line a run reports a score on: a name (not a step counter), then val_loss and val_bpb.
SCORE = re.compile(r"^(?P<name>[A-Za-z][\w+.\-]*(?: [A-Za-z][\w+.\-]*)*)\s+(?:stride:\d+\s+)?val_loss:?\s*(?P<loss>\d+\.\d+)"
                   r"\s+val_bpb:?\s*(?P<bpb>\d+\.\d+)(?P<rest>.*)$", re.M)
STOP = re.compile(r"^stopping_early:.*?train_time:\s*(\d+)ms", re.M)
STEP_MS = re.compile(r"^(?:step:)?\d+/\d+\b.*?train_time:\s*(\d+(?:\.\d+)?)ms", re.M)
CALIBRATION = re.compile(r"^(?:GPTQ:collected \d+ Hessians|gptq:calibrated \d+ layers|gptq:generated \d+ sequences)"
                         r" in (\d+(?:\.\d+)?)s", re.M | re.I)
GPTQ_MENTION = re.compile(r"^\s*(?:GPTQ|gptq)[:_ ]", re.M)
TOTAL_EVAL = re.compile(r"^total_eval_time:\s*(\d+(?:\.\d+)?)s", re.M)
EVAL_MS = re.compile(r"eval_time:\s*(\d+)ms")
TOTAL_BYTES = re.compile(r"^Total submission size[^:\n]*:\s*(\d+) bytes", re.M)
MODEL_BYTES = re.compile(r"^Serialized model [^:\n]+:\s*(\d+) bytes", re.M)
CODE_BYTES = re.compile(r"^Code size(?: \(compressed\))?:\s*(\d+) bytes", re.M)
VAL_TOKENS = re.compile(r"^(?:val_tokens:\s*(\d+)|val_loader:shards .*?tokens:(\d+))", re.M)
TRAIN_SHARDS = re.compile(r"^(?:train_shards:\s*(\d+)|train_loader:dataset:\S+ train_shards:(\d+))", re.M)
# name: value in a hyperparameter dump (`  seed: 42`) or key=value / key:value in one line of them
SETTING = r"(?:^|[\s,])(?:{key})\s*[:=]\s*({value})(?=[\s,]|$)"
PRECOMPUTE_OUTSIDE = re.compile(r"precompute_outside_timer_done elapsed=(\d+(?:\.\d+)?)s")
PRECOMPUTE_INSIDE = re.compile(r"^ngram_tilt:precompute_done elapsed=(\d+(?:\.\d+)?)s", re.M)
WARMUP = re.compile(r"compile warmup done \((\d+(?:\.\d+)?)s\)")
DECOMPRESS = re.compile(r"^Deserialize: decompression done in (\d+(?:\.\d+)?)s", re.M)
RUN_START = re.compile(r"^Hyperparameters:\s*$", re.M)
LOG_SUFFIXES = (".log", ".txt")
NOT_LOGS = ("requirements.txt", "readme.txt", "license.txt")


def _setting(text: str, key: str, value: str) -> str | None:
    found = re.findall(SETTING.format(key=key, value=value), text, re.M)
    return found[0] if found else None


@dataclass
class LogRun:
    """One training run as its log states it; None where the log does not say."""
    source: str
    seed: str | None = None
    scores: list[tuple[str, float, float]] = field(default_factory=list)  # (line name, val_loss, val_bpb)
    train_s: float | None = None
    calibration_s: float | None = None
    gptq: bool = False  # the log mentions GPTQ at all
    eval_s: float | None = None  # the run's own eval timer
    precompute_outside_s: float | None = None  # a val precompute the run's timer left out
    precompute_inside_s: float | None = None
    warmup_s: float | None = None
    decompress_s: float | None = None
    total_bytes: int | None = None
    model_bytes: int | None = None
    code_bytes: int | None = None
    val_tokens: int | None = None
    eval_seq_len: int | None = None
    train_shards: int | None = None
    data_paths: list[str] = field(default_factory=list)

    @property
    def final(self) -> tuple[str, float, float] | None:
        """The last score the run reports that is not a diagnostic."""
        for score in reversed(self.scores):
            if not score[0].startswith("diagnostic"):
                return score
        return None

    def export(self) -> canonical.Export | None:
        return canonical.export_in_text("\n".join(self.data_paths))


def parse_log(text: str, source: str) -> list[LogRun]:
    """The runs in one log (several when runs were appended to one file, each opening with its
    hyperparameter dump)."""
    starts = [m.start() for m in RUN_START.finditer(text)]
    parts = [text[a:b] for a, b in zip(starts, starts[1:] + [len(text)])] if len(starts) > 1 else [text]
    seed_in_name = re.search(r"seed[_-]?(\d+)", Path(source).name, re.I)
    runs = []
    for part in parts:
        run = _parse_run(part, source)
        if run.seed is None and seed_in_name and len(parts) == 1:
            run.seed = seed_in_name.group(1)
        runs.append(run)
    return runs


def _last_int(pattern: re.Pattern, text: str) -> int | None:
    found = [next(g for g in (m if isinstance(m, tuple) else (m,)) if g) for m in pattern.findall(text)]
    return int(found[-1]) if found else None


def _parse_run(text: str, source: str) -> LogRun:
    run = LogRun(source)
    run.seed = _setting(text, "seed|SEED", r"-?\d+")
    for m in SCORE.finditer(text):
        if not m.group("name").startswith("step"):
            run.scores.append((m.group("name"), float(m.group("loss")), float(m.group("bpb"))))
    stop = STOP.findall(text)
    steps = STEP_MS.findall(text)
    run.train_s = int(stop[-1]) / 1000 if stop else (float(steps[-1]) / 1000 if steps else None)
    calibration = CALIBRATION.findall(text)
    run.gptq = bool(GPTQ_MENTION.search(text))
    run.calibration_s = sum(float(c) for c in calibration) if calibration else (0.0 if not run.gptq else None)
    total_eval = TOTAL_EVAL.findall(text)
    if total_eval:
        run.eval_s = float(total_eval[-1])
    else:
        final = next((m for m in reversed(list(SCORE.finditer(text))) if not m.group("name").startswith(("diagnostic", "step"))), None)
        eval_ms = EVAL_MS.search(final.group("rest")) if final else None
        run.eval_s = int(eval_ms.group(1)) / 1000 if eval_ms else None
    for attr, pattern in (("precompute_outside_s", PRECOMPUTE_OUTSIDE), ("precompute_inside_s", PRECOMPUTE_INSIDE),
                          ("warmup_s", WARMUP), ("decompress_s", DECOMPRESS)):
        found = pattern.findall(text)
        setattr(run, attr, float(found[-1]) if found else None)
    run.total_bytes = _last_int(TOTAL_BYTES, text)
    run.model_bytes = _last_int(MODEL_BYTES, text)
    run.code_bytes = _last_int(CODE_BYTES, text)
    run.val_tokens = _last_int(VAL_TOKENS, text)
    run.train_shards = _last_int(TRAIN_SHARDS, text)
    seq = _setting(text, "eval_seq_len|EVAL_SEQ_LEN", r"\d+") or _setting(text, "train_seq_len|TRAIN_SEQ_LEN", r"\d+")
    run.eval_seq_len = int(seq) if seq else None
    run.data_paths = [line.strip() for line in text.splitlines()
                      if re.match(r"^\s*(tokenizer_path|datasets_dir|data_path|train_files|val_files|val_loader:shards|"
                                  r"train_loader:dataset|TOKENIZER_PATH|DATA_PATH)\b\s*[:=]?", line)
                      and "(" not in line]
    return run


def read_logs(folder: Path) -> list[LogRun]:
    """Every run in the folder's logs (*.log, *.txt but requirements and READMEs), by file name."""
    runs = []
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix.lower() in LOG_SUFFIXES and path.name.lower() not in NOT_LOGS:
            runs.extend(r for r in parse_log(path.read_text(encoding="utf-8", errors="replace"), path.name)
                        if r.scores or r.train_s is not None)
    return runs
