"""A run as its records tell it: score, data, the challenge's two clocks, and the environment; and
what differs between two runs (`pgolf diff`).

A run is a workspace (its artifacts/ and the run records beside them, runner.records.run_record_path)
or a records folder pgolf exported (its run_records.json holds the same). Only records that belong
to the outputs at hand count (runner.records.record_matches): a stage DVC restored from its cache
leaves another run's record beside its output.
"""
from __future__ import annotations

import json
from pathlib import Path

from pgolf import compliance
from pgolf.errors import FormatError, InputError
from runner.records import read_run_record, record_matches
from tasks.stages import STAGES, out_of

EXPORTED_NAME = "run_records.json"
# The environment fields that can change a run's numbers or bytes; host and paths only say where.
FINGERPRINT_KEYS = ("commit", "python", "platform", "packages", "cuda", "gpus", "compressors", "shards")


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def workspace_run(workspace: str | Path) -> dict:
    """The run in a workspace: each stage's record (those of the outputs there), score, data, clocks."""
    workspace = Path(workspace)
    records = {}
    for stage in STAGES:
        out = workspace / out_of(stage)
        record = read_run_record(out)
        if record is not None:
            records[stage] = {**record, "current": record_matches(record, out)}
    metrics = _read_json(workspace / "artifacts/eval/metrics.json") or {}
    size = _read_json(workspace / "artifacts/pack/size.json") or {}
    manifest = _read_json(workspace / "artifacts/shards/manifest.json") or {}
    return assemble(records, metrics, size, manifest.get("certificate"))


def assemble(records: dict, metrics: dict, size: dict, certificate: dict | None) -> dict:
    score = {k: metrics.get(k) for k in ("val_bpb", "val_loss", "tokens", "bytes", "mode", "seq_len")}
    score.update({k: size.get(k) for k in ("total_bytes", "model_bytes", "code_bytes", "cap_bytes")})
    score["canonical"] = metrics.get("canonical", certificate.get("canonical") if certificate else None)
    return {"score": score, "data": certificate, "clocks": clocks(records), "records": records}


def clocks(records: dict) -> dict:
    """The training clock (the gptq record computed it from the train record) and the eval clock."""
    def timings(stage: str) -> dict:
        record = records.get(stage)
        return record.get("timings", {}) if record and record.get("current", True) else {}

    return {"training": timings("gptq").get("training_clock"), "eval": timings("eval").get("eval_clock")}


def clock_lines(run: dict) -> list[str]:
    return [compliance.describe("training", run["clocks"]["training"]), compliance.describe("eval", run["clocks"]["eval"])]


def load_run(path: str | Path) -> dict:
    """A workspace, or a records folder pgolf exported (its run_records.json)."""
    path = Path(path)
    exported = path / EXPORTED_NAME if path.is_dir() else path
    if exported.is_file():
        data = _read_json(exported)
        runs = data.get("runs") if isinstance(data, dict) else None
        if not isinstance(runs, dict) or str(data.get("exported_seed")) not in runs:
            raise FormatError(f"not a pgolf {EXPORTED_NAME} (no 'runs' holding its 'exported_seed')", exported)
        return runs[str(data["exported_seed"])]
    if (path / "artifacts").is_dir():
        return workspace_run(path)
    raise InputError(f"neither a workspace (artifacts/ with run records) nor a records folder pgolf exported "
                     f"({EXPORTED_NAME})", path)


def exported_runs(workspace: Path, seed: str, sweep_rows: list[dict] | None = None) -> dict:
    """What an exported records folder keeps of its runs (run_records.json): the exported run and
    every seed of its sweep whose workspace still holds that seed's outputs (a slot reused since
    holds another run, and is left out rather than credited)."""
    runs = {seed: _exported_run(workspace)}
    for row in sweep_rows or []:
        other, where = str(row.get("seed")), row.get("workspace")
        if other == seed or not where or not Path(where, "artifacts").is_dir():
            continue
        run = _exported_run(Path(where))
        if run["score"].get("val_bpb") == row.get("val_bpb"):
            runs[other] = run
    return {"kind": "pgolf-runs", "exported_seed": seed, "runs": runs}


def _exported_run(workspace: Path) -> dict:
    manifest = _read_json(workspace / "artifacts/shards/manifest.json") or {}
    return {**workspace_run(workspace), "variant": manifest.get("variant"), "vocab_size": manifest.get("vocab_size"),
            "shards_stats": manifest.get("stats")}


def fingerprint(run: dict) -> dict:
    """Per stage, the environment fields that can change its numbers."""
    out = {}
    for stage, record in sorted(run["records"].items()):
        env = record.get("environment") or {}
        fields = {k: env.get(k) for k in FINGERPRINT_KEYS if k in env}
        if "shards" in fields:
            fields["shards"] = [{k: v for k, v in s.items() if k != "folder"} for s in fields["shards"]]
        out[stage] = fields
    return out


def _flatten(value, prefix: str = "") -> dict:
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        out = {}
        for i, item in enumerate(value):
            out.update(_flatten(item, f"{prefix}[{i}]"))
        return out
    return {prefix: value}


def diff(a: dict, b: dict) -> dict:
    """What differs between two runs: score and clocks side by side, fingerprint fields that differ."""
    fa, fb = _flatten(fingerprint(a)), _flatten(fingerprint(b))
    changed = {k: (fa.get(k), fb.get(k)) for k in sorted(fa.keys() | fb.keys()) if fa.get(k) != fb.get(k)}
    scores = {k: (a["score"].get(k), b["score"].get(k)) for k in a["score"].keys() | b["score"].keys()}
    clock = {name: (compliance.describe(name, a["clocks"].get(name)), compliance.describe(name, b["clocks"].get(name)))
             for name in ("training", "eval")}
    return {"score": dict(sorted(scores.items())), "clocks": clock, "fingerprint": changed}


def format_diff(result: dict, name_a: str, name_b: str) -> str:
    def show(v) -> str:
        return "-" if v is None else f"{v:.6f}" if isinstance(v, float) else f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else str(v)

    lines = [f"A: {name_a}", f"B: {name_b}", "", "score:"]
    for key, (x, y) in result["score"].items():
        mark = "" if x == y else "   <- differs"
        lines.append(f"  {key:<12} {show(x):>16} {show(y):>16}{mark}")
    lines += ["", "clocks:"]
    for name, (x, y) in result["clocks"].items():
        lines += [f"  A {x}", f"  B {y}"]
    lines += ["", "fingerprint:" if result["fingerprint"] else "fingerprint: the same"]
    for key, (x, y) in result["fingerprint"].items():
        lines.append(f"  {key}: {show(x)} -> {show(y)}")
    return "\n".join(lines)
