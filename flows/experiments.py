"""`pgolf exp show`: DVC's experiments as a competitor compares them.

`dvc exp show` prints every param (about 200), every metric and every dependency's hash, and DVC has
no setting for its default columns. This view reads the same data (`dvc exp show --json`, same
arguments) and shows, per row (workspace, commits, experiments): the params that differ between the
rows shown, val_bpb, val_loss, the artifact's bytes and cap margin, and the eval and train seconds.
`pgolf exp show --all` is DVC's own table.
"""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from flows.repro import dvc_command, dvc_env
from pgolf.errors import PgolfError

# column -> (metrics file as dvc.yaml lists it, key path inside it)
COLUMNS = {
    "val_bpb": ("artifacts/eval/metrics.json", ("val_bpb",)),
    "val_loss": ("artifacts/eval/metrics.json", ("val_loss",)),
    "bytes": ("artifacts/pack/size.json", ("total_bytes",)),
    "margin": ("artifacts/pack/size.json", ("margin_bytes",)),
    "eval_s": ("artifacts/.runs/eval.json", ("timings", "eval_seconds")),
    "train_s": ("artifacts/.runs/train.json", ("timings", "train_seconds")),
}
# The seconds columns come from run records, which DVC does not restore with an output: shown only
# when the record is of the row's own config and output (runner.records.output_identity), else
# CACHED (the output came from DVC's cache; the run that made it is not recorded there).
RECORD_STAGES = {"eval_s": "eval", "train_s": "train"}
CACHED = "cached"


@dataclass
class Row:
    name: str
    params: dict
    metrics: dict


def _flatten(data: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def _row(name: str, data: dict | None) -> Row:
    data = data or {}
    params, raw = {}, {}
    for file, entry in (data.get("params") or {}).items():
        params.update(_flatten((entry or {}).get("data") or {}))
        raw.update((entry or {}).get("data") or {})
    files = {file: (entry or {}).get("data") for file, entry in (data.get("metrics") or {}).items()}
    metrics = {}
    for column, (file, keys) in COLUMNS.items():
        value = files.get(file) or {}
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        if column in RECORD_STAGES and not record_is_of_row(RECORD_STAGES[column], files.get(file), raw, files):
            value = CACHED
        metrics[column] = value
    return Row(name, params, metrics)


def record_is_of_row(stage: str, record: dict | None, params: dict, files: dict) -> bool:
    """Whether a stage's run record is of the output this row shows: the same config and the same
    output files, those of them the row has as metrics."""
    from pgolf.typed_params import from_dict
    from runner.records import canonical_sha256, config_sha256, identity_matches
    from tasks.stages import config_of, out_of

    if not isinstance(record, dict) or (record.get("restored") and not record.get("timings")):
        return False
    if "of" not in record:
        return True  # a record from before records named their output: nothing to tell it by
    try:
        params_sha = config_sha256(from_dict(config_of(stage), params.get(stage), stage))
    except PgolfError:
        return False
    outputs = {name.rsplit("/", 1)[1]: canonical_sha256(data) for name, data in files.items()
               if name.rsplit("/", 1)[0] == out_of(stage) and isinstance(data, dict)}
    return identity_matches(record["of"], params_sha, outputs)


def rows_from_json(entries: list[dict]) -> list[Row]:
    rows = []
    for entry in entries:
        rev = entry.get("rev", "")
        name = "workspace" if rev == "workspace" else (entry.get("name") or rev[:7])
        rows.append(_row(name, entry.get("data")))
        for exp in entry.get("experiments") or []:
            for rev_entry in exp.get("revs") or []:
                label = rev_entry.get("name") or exp.get("name") or rev_entry.get("rev", "")[:7]
                rows.append(_row(f"  {label}", rev_entry.get("data")))
    return rows


def changed_params(rows: list[Row]) -> list[str]:
    keys = sorted({k for r in rows for k in r.params})
    return [k for k in keys if len({json.dumps(r.params.get(k), sort_keys=True) for r in rows if r.params}) > 1]


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.5f}" if abs(value) < 100 else f"{value:,.1f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def format_table(rows: list[Row]) -> str:
    params = changed_params(rows)
    header = ["experiment", *params, *COLUMNS]
    table = [header] + [[r.name, *(_cell(r.params.get(p)) for p in params), *(_cell(r.metrics[c]) for c in COLUMNS)]
                        for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths)))
             for line in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if not params:
        lines.append("(no params differ between these rows)")
    return "\n".join(lines)


def exp_show(dvc_args: list[str], workspace: str | Path = ".") -> str:
    proc = subprocess.run(dvc_command() + ["exp", "show", "--json", *dvc_args], cwd=workspace, env=dvc_env(),
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise PgolfError(f"`dvc exp show --json {' '.join(dvc_args)}` failed (exit {proc.returncode}): "
                         f"{proc.stderr.strip() or proc.stdout.strip()}")
    try:
        entries = json.loads(proc.stdout)
    except json.JSONDecodeError as err:
        raise PgolfError(f"`dvc exp show --json` printed something that is not JSON: {err}") from err
    return format_table(rows_from_json(entries))


def main(argv: list[str]) -> int:
    if "--all" in argv:
        rest = [a for a in argv if a != "--all"]
        return subprocess.run(dvc_command() + ["exp", "show", *rest], env=dvc_env()).returncode
    try:
        print(exp_show(argv))
    except PgolfError as err:
        print(f"pgolf exp show: error: {err}", file=sys.stderr)
        return 2
    return 0
