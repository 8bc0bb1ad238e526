"""A judge's audit of a records folder: pgolf's own export or any challenge submission (docs/lineage.md#audit).

    pgolf audit PATH [--against PREVIOUS] [--json]

Reads the folder's submission.json, its logs (pgolf.record_logs; pgolf's own export: run_records.json)
and, where they are there, the shipped artifact and script, and checks what the judges checked by
hand after the challenge (#2146): enough seeds whose logs say what submission.json says, the
16,000,000-byte cap as logged and as shipped, both 600 s clocks (GPTQ calibration inside the
training one), val being the whole canonical stream, train being the canonical export's shards, and
the record test against the previous record. A check the folder lacks evidence for is `unknown`;
the verdict fails when any check fails.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path

from pgolf import canonical, compliance, significance
from pgolf.errors import FormatError, InputError
from pgolf.record_logs import LogRun, read_logs

CAP_BYTES = 16_000_000
MIN_SEEDS = 3
CHECKS = ("seeds", "artifact_bytes", "train_time", "eval_time", "val_coverage", "val_bytes", "train_data",
          "significance")
ARTIFACT_SUFFIXES = (".ptz", ".int6.ptz", ".int8.ptz")
ARTIFACT_NAMES = ("artifact.bin",)
PGOLF_RUNS = "run_records.json"


@dataclass
class Check:
    check: str
    status: str  # pass | fail | unknown
    evidence: str

    def as_dict(self) -> dict:
        return {"check": self.check, "status": self.status, "evidence": self.evidence}


@dataclass
class Folder:
    path: Path
    submission: dict
    side: significance.Side | None
    runs: list[LogRun] = field(default_factory=list)
    pgolf: dict | None = None  # run_records.json of a pgolf export
    script: Path | None = None
    artifacts: list[Path] = field(default_factory=list)
    tokenizer_files: list[Path] = field(default_factory=list)


def read_folder(path: str | Path) -> Folder:
    path = Path(path)
    if not path.is_dir():
        raise InputError("not a folder: give a records folder (with submission.json)", path)
    sub_path = path / "submission.json"
    if not sub_path.is_file():
        raise InputError("no submission.json: not a records folder", path)
    try:
        submission = json.loads(sub_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise FormatError(f"not JSON: {err}", sub_path) from None
    if not isinstance(submission, dict):
        raise FormatError("expected a JSON object", sub_path)
    try:
        side = significance.read_side(sub_path)
    except FormatError:
        side = None  # no usable per-seed numbers: the seeds check says so
    pgolf_runs = None
    if (path / PGOLF_RUNS).is_file():
        try:
            pgolf_runs = json.loads((path / PGOLF_RUNS).read_text())
        except json.JSONDecodeError as err:
            raise FormatError(f"not JSON: {err}", path / PGOLF_RUNS) from None
    artifacts = sorted(p for p in path.iterdir() if p.is_file() and (p.name in ARTIFACT_NAMES or p.name.endswith(ARTIFACT_SUFFIXES)))
    tokenizers = sorted(path.rglob("*.model"))
    return Folder(path, submission, side, read_logs(path), pgolf_runs,
                  path / "train_gpt.py" if (path / "train_gpt.py").is_file() else None, artifacts, tokenizers)


# ---------------------------------------------------------------- per-seed evidence

@dataclass
class Evidence(LogRun):
    """One seed's run as the folder's logs (or pgolf's run records) state it, and what the checks weigh
    beyond a log's own lines: eval time by phase, the export it used, pgolf's certificate and bpb bytes."""
    eval_outside: dict = field(default_factory=dict)  # phase -> seconds the run's timer left out
    eval_inside: dict = field(default_factory=dict)
    export_used: canonical.Export | None = None  # a log's data paths' or shipped tokenizer's; pgolf's variant's
    certificate: dict | None = None  # pgolf's shards certificate
    scored_bytes: int | None = None  # pgolf's metrics: the bpb denominator itself

    @property
    def val_loss(self) -> float | None:
        return self.final[1] if self.final else None

    @property
    def val_bpb(self) -> float | None:
        return self.final[2] if self.final else None

    @property
    def denominator(self) -> int | None:
        """The bytes val_bpb was divided by: pgolf's metrics say it, a log implies it."""
        if self.scored_bytes is not None:
            return self.scored_bytes
        return canonical.implied_bytes(self.val_tokens, self.val_loss, self.val_bpb)


def evidence_of(folder: Folder) -> list[Evidence]:
    if folder.pgolf is not None:
        return _pgolf_evidence(folder)
    out = []
    shipped = _shipped_export(folder)
    seen = set()
    for run in folder.runs:
        final = run.final
        key = (run.seed, final, run.train_s, run.eval_s)
        if key in seen:
            continue  # one run logged twice (per seed and in a combined log)
        seen.add(key)
        ev = Evidence(**vars(run), export_used=run.export() or shipped)
        for name, value in (("decompress", run.decompress_s), ("compile warm-up", run.warmup_s),
                            ("val precompute", run.precompute_outside_s)):
            if value is not None:
                ev.eval_outside[name] = value
        if run.precompute_inside_s is not None:
            ev.eval_inside["val precompute"] = run.precompute_inside_s
        out.append(ev)
    return out


def _shipped_export(folder: Folder) -> canonical.Export | None:
    """A published tokenizer shipped in the folder identifies the export its run used."""
    for path in folder.tokenizer_files:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        for export in canonical.EXPORTS:
            if export.tokenizer_sha256 == digest:
                return export
    return None


def _pgolf_evidence(folder: Folder) -> list[Evidence]:
    out = []
    for seed, run in (folder.pgolf.get("runs") or {}).items():
        score, clocks = run.get("score") or {}, run.get("clocks") or {}
        training, evaluation = clocks.get("training") or {}, clocks.get("eval") or {}
        parts = training.get("parts") or {}
        phases = evaluation.get("phases") or {}
        counted = evaluation.get("counted") or compliance.EVAL_COUNTED
        data = run.get("data") or {}
        stats = run.get("shards_stats") or {}
        ev = Evidence(source=PGOLF_RUNS, seed=str(seed), scores=[("pgolf eval", score.get("val_loss"), score.get("val_bpb"))],
                      train_s=parts.get("train_loop"), calibration_s=parts.get("gptq_calibration"),
                      eval_s=evaluation.get("seconds") if evaluation else None,
                      eval_outside={k: v for k, v in phases.items() if k not in counted},
                      eval_inside={k: v for k, v in phases.items() if k in counted},
                      total_bytes=score.get("total_bytes"), model_bytes=score.get("model_bytes"),
                      code_bytes=score.get("code_bytes"), val_tokens=score.get("tokens"),
                      eval_seq_len=score.get("seq_len"), train_shards=stats.get("files_train"),
                      export_used=canonical.export_for(run.get("variant") or "", run.get("vocab_size") or 0),
                      certificate=data or None, scored_bytes=score.get("bytes"))
        out.append(ev)
    return out


# ---------------------------------------------------------------- checks

def _close(claimed: float | None, logged: float | None) -> bool:
    """Equal up to the rounding of the claimed figure (submission.json often rounds)."""
    if claimed is None or logged is None:
        return False
    text = repr(float(claimed))
    decimals = len(text.split(".")[1]) if "." in text and "e" not in text else 8
    return abs(claimed - logged) <= max(0.5 * 10 ** -decimals, 1e-8) + 1e-12


def check_seeds(folder: Folder, evidence: list[Evidence]) -> Check:
    side = folder.side
    if side is None:
        return Check("seeds", "fail", "submission.json gives no per-seed val_loss/val_bpb (nor a headline)")
    claimed = [s for s in side.seeds if s.seed is not None]
    if len(side.seeds) < MIN_SEEDS:
        return Check("seeds", "fail", f"{len(side.seeds)} seed(s) in submission.json ({side.form}); the README asks "
                                      f"for enough runs to show p < 0.01, the records give at least {MIN_SEEDS}")
    if not evidence:
        return Check("seeds", "unknown", f"{len(side.seeds)} seeds in submission.json but no training log to check them against")
    problems, agreed = [], []
    for s in claimed:
        runs = [e for e in evidence if e.seed == s.seed]
        if not runs:
            problems.append(f"seed {s.seed}: no log")
            continue
        metric, value = ("val_bpb", s.val_bpb) if s.val_bpb is not None else ("val_loss", s.val_loss)
        index = 2 if metric == "val_bpb" else 1
        if any(_close(value, score[index]) for e in runs for score in e.scores):
            agreed.append(f"{s.seed} ({runs[0].source}: {metric} {value})")
        else:
            logged = ", ".join(f"{e.source}: {e.val_bpb if metric == 'val_bpb' else e.val_loss}" for e in runs)
            problems.append(f"seed {s.seed}: submission.json says {metric} {value}, its log says {logged}")
    unnamed = len(side.seeds) - len(claimed)
    if unnamed:
        problems.append(f"{unnamed} result(s) in submission.json name no seed")
    if problems:
        return Check("seeds", "fail", f"{len(side.seeds)} seeds; " + "; ".join(problems))
    return Check("seeds", "pass", f"{len(side.seeds)} seeds, each in a log with the same score: " + ", ".join(agreed))


def check_artifact_bytes(folder: Folder, evidence: list[Evidence]) -> Check:
    logged = [(e.seed, e.total_bytes) for e in evidence if e.total_bytes is not None]
    claimed = _claimed_bytes(folder.submission)
    parts, over = [], []
    if logged:
        top = max(b for _, b in logged)
        parts.append(f"logged max {top:,} bytes over {len(logged)} run(s)")
        over += [f"seed {s} logs {b:,}" for s, b in logged if b > CAP_BYTES]
    if claimed:
        parts.append(f"submission.json max {max(claimed):,}")
        over += [f"submission.json claims {b:,}" for b in claimed if b > CAP_BYTES]
    measured = _measured(folder, evidence)
    if measured is not None:
        total, how = measured
        parts.append(f"measured as shipped {total:,} ({how})")
        if total > CAP_BYTES:
            over.append(f"as shipped {total:,}")
    if not parts:
        return Check("artifact_bytes", "unknown", "no artifact size in the logs, submission.json or the folder")
    text = "; ".join(parts)
    if over:
        return Check("artifact_bytes", "fail", f"over the {CAP_BYTES:,}-byte cap: {', '.join(over)} ({text})")
    return Check("artifact_bytes", "pass", f"under {CAP_BYTES:,}: {text}")


def _claimed_bytes(submission: dict) -> list[int]:
    out = []
    for key in ("bytes_total", "artifact_bytes", "artifact_bytes_max"):
        if isinstance(submission.get(key), int):
            out.append(submission[key])
    per_seed = submission.get("seed_results")
    if isinstance(per_seed, dict):
        out += [r["artifact_bytes"] for r in per_seed.values() if isinstance(r, dict) and isinstance(r.get("artifact_bytes"), int)]
    return out


def _measured(folder: Folder, evidence: list[Evidence]) -> tuple[int, str] | None:
    """Code as the records count it (train_gpt.py minified, brotli'd, base85'd in a two-line stub, or
    as it is if that is smaller) plus the shipped compressed model, else the largest logged model."""
    if folder.script is None:
        return None
    from pgolf.pack.codesize import wrapped_size

    source = folder.script.read_text(encoding="utf-8", errors="replace")
    raw = len(source.encode("utf-8"))
    try:
        code = min(raw, wrapped_size(source))
    except Exception:  # noqa: BLE001 - a script the minifier cannot parse is counted as it is
        code = raw
    how = f"train_gpt.py {code:,} bytes counted the records' way ({raw:,} as shipped)"
    if folder.artifacts:
        model = max(p.stat().st_size for p in folder.artifacts)
        return model + code, f"{how} + {max(folder.artifacts, key=lambda p: p.stat().st_size).name} {model:,}"
    models = [e.model_bytes for e in evidence if e.model_bytes is not None]
    if not models:
        return None
    return max(models) + code, f"{how} + the largest logged model {max(models):,} (no artifact file shipped)"


def check_train_time(evidence: list[Evidence]) -> Check:
    if not evidence:
        return Check("train_time", "unknown", "no training log")
    rows, over, unknown = [], [], []
    for e in evidence:
        clock = compliance.training_clock(e.train_s, e.calibration_s)
        name = f"seed {e.seed}" if e.seed is not None else e.source
        if clock["seconds"] is None:
            missing = "train time" if e.train_s is None else "GPTQ calibration time"
            unknown.append(f"{name}: the log does not give its {missing}")
            continue
        text = f"{name} {e.train_s:.1f} + {e.calibration_s:.1f} = {clock['seconds']:.1f} s"
        rows.append(text)
        if not clock["within_budget"]:
            over.append(text)
    rule = "train loop + GPTQ calibration (Hessians) <= 600 s (#1950, #1956)"
    if over:
        return Check("train_time", "fail", f"over 600 s: {'; '.join(over)} ({rule})")
    if unknown:
        return Check("train_time", "unknown", "; ".join(unknown + rows))
    return Check("train_time", "pass", f"{'; '.join(rows)} ({rule})")


def check_eval_time(evidence: list[Evidence]) -> Check:
    if not evidence:
        return Check("eval_time", "unknown", "no training log")
    rows, over, unknown = [], [], []
    for e in evidence:
        name = f"seed {e.seed}" if e.seed is not None else e.source
        if e.eval_s is None:
            unknown.append(f"{name}: no eval time in the log")
            continue
        counted = e.eval_s + e.eval_outside.get("val precompute", 0.0)
        notes = []
        if "val precompute" in e.eval_outside:
            notes.append(f"+ val precompute {e.eval_outside['val precompute']:.1f} s the run's timer left out (counted: "
                         "it reads val, #1967)")
        if "val precompute" in e.eval_inside:
            notes.append(f"val precompute {e.eval_inside['val precompute']:.1f} s inside")
        left = [f"{k} {v:.1f} s" for k, v in e.eval_outside.items() if k != "val precompute"]
        if left:
            notes.append("not counted: " + ", ".join(left))
        text = f"{name} {e.eval_s:.1f} s" + (f" ({'; '.join(notes)})" if notes else "") + f" = {counted:.1f} s"
        rows.append(text)
        if counted > compliance.EVAL_LIMIT_S:
            over.append(text)
    if over:
        return Check("eval_time", "fail", f"over 600 s: {'; '.join(over)}")
    if unknown:
        return Check("eval_time", "unknown", "; ".join(unknown + rows))
    return Check("eval_time", "pass", "; ".join(rows) + " (precompute over val, scoring and TTT counted; artifact "
                                                        "load/decompression and compile warm-up not, #1967)")


def check_val_coverage(evidence: list[Evidence]) -> Check:
    return _per_run("val_coverage", evidence, _coverage_of)


def _coverage_of(e: Evidence) -> canonical.Finding:
    if e.certificate is not None and not e.certificate.get("canonical"):
        failed = [c["text"] for c in e.certificate.get("canonical_checks", []) if c.get("ok") is False]
        return canonical.Finding(False, "the shards are not the challenge's val: " + "; ".join(failed))
    tokens = canonical.val_coverage(e.export_used, e.val_tokens, e.eval_seq_len)
    if tokens.ok is not False:
        return tokens
    # Another tokenization of the same documents (a variant of the export's tokenizer) scores another
    # token count; the bytes behind its val_bpb are still the canonical val's.
    bytes_ = canonical.val_bytes(e.denominator, e.eval_seq_len, implied=e.scored_bytes is None)
    if bytes_.ok:
        return canonical.Finding(True, f"{e.val_tokens:,} tokens scored, not the {e.export_used.name} export's count (another "
                                       f"tokenization), but {bytes_.text}: the whole canonical val")
    return tokens


def check_val_bytes(evidence: list[Evidence]) -> Check:
    return _per_run("val_bytes", evidence,
                    lambda e: canonical.val_bytes(e.denominator, e.eval_seq_len, implied=e.scored_bytes is None))


def check_train_data(evidence: list[Evidence]) -> Check:
    return _per_run("train_data", evidence, _train_data_of)


def _train_data_of(e: Evidence) -> canonical.Finding:
    if e.certificate is not None:
        overlap = (e.certificate.get("overlap") or {}).get("train_docs_in_val")
        failed = [c["text"] for c in e.certificate.get("canonical_checks", [])
                  if c.get("ok") is False and c["check"] in ("export", "train_shards", "shard_size", "tokenizer")]
        if overlap:
            return canonical.Finding(False, f"{overlap} train documents are val documents")
        if failed:
            return canonical.Finding(False, "train and val disjoint (certified), but not the canonical export: "
                                            + "; ".join(failed))
        return canonical.Finding(True, "train and val disjoint and the canonical export (certified by the shards stage)")
    return canonical.train_shards(e.export_used, e.train_shards)


def _per_run(name: str, evidence: list[Evidence], judge) -> Check:
    if not evidence:
        return Check(name, "unknown", "no training log")
    findings = []
    for e in evidence:
        finding = judge(e)
        findings.append((f"seed {e.seed}" if e.seed is not None else e.source, finding))
    failed = [f"{who}: {f.text}" for who, f in findings if f.ok is False]
    if failed:
        return Check(name, "fail", "; ".join(_dedupe(failed)))
    unknown = [f"{who}: {f.text}" for who, f in findings if f.ok is None]
    if unknown:
        return Check(name, "unknown", "; ".join(_dedupe(unknown)))
    return Check(name, "pass", "; ".join(_dedupe(f"{who}: {f.text}" for who, f in findings)))


def _dedupe(lines) -> list[str]:
    """'seed 42: X; seed 0: X' -> 'seeds 42, 0: X'."""
    groups: dict[str, list[str]] = {}
    for line in lines:
        who, _, text = line.partition(": ")
        group = groups.setdefault(text, [])
        if who.removeprefix("seed ") not in group:
            group.append(who.removeprefix("seed "))
    return [f"{'seeds' if len(w) > 1 else 'seed'} {', '.join(w)}: {t}" if all(x[:1].isdigit() or x[:1] == "-" for x in w)
            else f"{', '.join(w)}: {t}" for t, w in groups.items()]


def check_significance(folder: Folder, against: Path | None) -> Check:
    if folder.side is None:
        return Check("significance", "unknown", "submission.json gives no per-seed results")
    if against is None:
        return Check("significance", "unknown", "needs the previous record: --against PREVIOUS (a records folder or "
                                                "submission.json) for the README rule (0.005 nats at p < 0.01) and the "
                                                "applied rule (val_bpb lower at p < 0.25)")
    theirs = significance.read_side(against)
    ours = replace(folder.side, path=folder.path.name)
    result = significance.compare(ours, replace(theirs, path=Path(against).name))
    if result["undecided"]:
        result = significance.compare(ours, replace(theirs, path=Path(against).name), via_bpb=True)
    applied = result["applied"]
    text = f"README rule: {result['verdict']}; applied rule (#1902/#2146): {applied['verdict']}"
    if applied["test"] is None:
        return Check("significance", "unknown", text)
    return Check("significance", "pass" if applied["met"] else "fail", text)


def audit(path: str | Path, against: str | Path | None = None) -> dict:
    folder = read_folder(path)
    if against is not None and not Path(against).exists():
        raise InputError("not found: give the previous record's folder or submission.json", against)
    evidence = evidence_of(folder)
    checks = [check_seeds(folder, evidence), check_artifact_bytes(folder, evidence), check_train_time(evidence),
              check_eval_time(evidence), check_val_coverage(evidence), check_val_bytes(evidence), check_train_data(evidence),
              check_significance(folder, Path(against) if against is not None else None)]
    verdict = "fail" if any(c.status == "fail" for c in checks) else "pass"
    return {"verdict": verdict, "checks": [c.as_dict() for c in checks]}


def format_table(result: dict) -> str:
    """The checks as a markdown table (what the export puts in its README)."""
    lines = ["| check | status | evidence |", "|---|---|---|"]
    for c in result["checks"]:
        lines.append(f"| {c['check']} | {c['status']} | {c['evidence'].replace('|', '/')} |")
    lines.append(f"\nverdict: **{result['verdict']}**")
    return "\n".join(lines)


def format_text(result: dict, path: str) -> str:
    width = max(len(c["check"]) for c in result["checks"])
    lines = [f"audit of {path}"]
    for c in result["checks"]:
        lines.append(f"{c['check']:<{width}}  {c['status']:<7}  {c['evidence']}")
    lines.append(f"verdict: {result['verdict']}")
    return "\n".join(lines)

