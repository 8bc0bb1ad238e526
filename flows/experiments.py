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
    params = {}
    for file, entry in (data.get("params") or {}).items():
        params.update(_flatten((entry or {}).get("data") or {}))
    metrics = {}
    for column, (file, keys) in COLUMNS.items():
        value = ((data.get("metrics") or {}).get(file) or {}).get("data") or {}
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        metrics[column] = value
    return Row(name, params, metrics)


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
