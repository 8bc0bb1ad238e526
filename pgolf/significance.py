"""The record test: does one set of runs beat another by the challenge's margin?

Two rules, both reported (docs/lineage.md#significance):
- the README's ("Submission process" in the challenge's README): a new record beats the standing one
  by at least 0.005 nats (val_loss, nats per token) and shows it at p < 0.01 over several seeds;
- the one the leaderboard applied (#1902, #2146; asked about in #2148, where <15% of merged records
  met the README's): a chronological frontier, each row's val_bpb below the previous row's at
  p < 0.25, with no margin.
The records argue either with a one-sided t-test: one-sample against the standing mean (minus the
margin) when only that mean is known, Welch's two-sample test when both sides give per-seed results
(#2146's p = 0.014 for #2135 against #2014 is Welch's). Both tests are here, with the Student-t
distribution computed from the regularized incomplete beta function (no SciPy).

A side is a records folder (its submission.json), a submission.json, or a `pgolf sweep` results
file (or the folder holding sweep.json). Published submission.json files vary: `seed_results` is a
dict keyed by seed or a list of {seed, val_loss, val_bpb}, some give per-seed val_bpb only, some a
plain list of scores, some only one headline number; `read_side` reads them all into the same shape.
"""
from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from pgolf.errors import FormatError, InputError

THRESHOLD_NATS = 0.005
ALPHA = 0.01
APPLIED_ALPHA = 0.25  # the leaderboard's frontier rule: val_bpb lower at p < 0.25, no margin
# A t-test needs a variance: our side needs two seeds. Their side may be one number (the standing
# record's mean), which the one-sample test treats as fixed.
MIN_SEEDS = 2
# Bytes per token (val_loss / (ln 2 * val_bpb)) is one number for one tokenizer on one val set; the
# published values are rounded to about 5 significant digits, different tokenizers differ by percents.
SAME_TOKENIZER_REL = 1e-3
METRICS = ("val_loss", "val_bpb")


@dataclass(frozen=True)
class SeedResult:
    seed: str | None
    val_loss: float | None
    val_bpb: float | None


@dataclass(frozen=True)
class Side:
    path: str
    form: str  # where the per-seed numbers were found, for the report
    seeds: tuple[SeedResult, ...]

    def values(self, metric: str) -> list[float] | None:
        """The metric for every seed, or None when any seed lacks it (a subset would be a choice)."""
        out = [getattr(s, metric) for s in self.seeds]
        return None if any(v is None for v in out) else out

    def bytes_per_token(self) -> float | None:
        loss, bpb = self.values("val_loss"), self.values("val_bpb")
        if loss is None or bpb is None:
            return None
        return statistics.fmean(l / (math.log(2) * b) for l, b in zip(loss, bpb))


# ---------------------------------------------------------------- Student t

def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function, evaluated by the modified Lentz method."""
    tiny, eps = 1e-300, 1e-15
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= c * d
        if abs(c * d - 1.0) < eps:
            return h
    raise ArithmeticError(f"incomplete beta did not converge (a={a}, b={b}, x={x})")


def regularized_incomplete_beta(a: float, b: float, x: float) -> float:
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    # The fraction converges fast only below the mean; above it use the symmetry I_x(a,b) = 1 - I_1-x(b,a).
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _beta_continued_fraction(a, b, x) / a
    return 1.0 - front * _beta_continued_fraction(b, a, 1.0 - x) / b


def student_t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with df (real, > 0) degrees of freedom."""
    if not df > 0:
        raise ValueError(f"degrees of freedom must be positive, got {df}")
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    tail = 0.5 * regularized_incomplete_beta(df / 2.0, 0.5, df / (df + t * t))
    return tail if t < 0 else 1.0 - tail


def one_sample_test(ours: list[float], fixed: float, margin: float = THRESHOLD_NATS) -> dict:
    """One-sided: is the mean of `ours` below `fixed - margin`? The standing record as a known number."""
    n, mean, std = len(ours), statistics.fmean(ours), statistics.stdev(ours)
    shift = mean - (fixed - margin)
    se = std / math.sqrt(n)
    return {"name": "one-sided one-sample t-test", "df": n - 1, **_t_and_p(shift, se, n - 1)}


def welch_test(ours: list[float], theirs: list[float], margin: float = THRESHOLD_NATS) -> dict:
    """One-sided Welch: is mean(ours) below mean(theirs) - margin, variances not assumed equal?"""
    va, vb = statistics.variance(ours) / len(ours), statistics.variance(theirs) / len(theirs)
    shift = statistics.fmean(ours) - (statistics.fmean(theirs) - margin)
    if va + vb == 0.0:
        df = float(len(ours) + len(theirs) - 2)
    else:  # Welch-Satterthwaite
        df = (va + vb) ** 2 / (va ** 2 / (len(ours) - 1) + vb ** 2 / (len(theirs) - 1))
    return {"name": "one-sided Welch two-sample t-test", "df": df, **_t_and_p(shift, math.sqrt(va + vb), df)}


def _t_and_p(shift: float, se: float, df: float) -> dict:
    if se == 0.0:
        # Identical runs on both sides: no spread, the difference is certain either way.
        return {"t": None, "p": 0.0 if shift < 0 else 1.0}
    t = shift / se
    return {"t": t, "p": student_t_cdf(t, df)}


# ---------------------------------------------------------------- reading a side

def read_side(path: str | Path) -> Side:
    """One side of the comparison, from a records folder, a submission.json or a sweep's results."""
    path = Path(path)
    if path.is_dir():
        for name in ("sweep.json", "submission.json"):
            if (path / name).is_file():
                return read_side(path / name)
        raise InputError("holds neither submission.json (a records folder) nor sweep.json (a pgolf sweep)", path)
    if not path.is_file():
        raise InputError("not found: give a records folder, a submission.json or a pgolf sweep's results", path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise FormatError(f"not JSON: {err}", path) from None
    if not isinstance(data, dict):
        raise FormatError(f"expected a JSON object, got {type(data).__name__}", path)
    if data.get("kind") == "pgolf-sweep":
        if not isinstance(data.get("seeds"), list) or not data["seeds"]:
            raise FormatError("a pgolf-sweep file without a non-empty 'seeds' list", path)
        return Side(str(path), "pgolf sweep 'seeds'", _entries(data["seeds"], None, data, path, "seeds"))
    nested = data.get("results")
    if isinstance(nested, dict) and isinstance(nested.get("seeds"), dict) and nested["seeds"]:
        # {"results": {"mean_val_bpb": ..., "seeds": {"314": {...}}}} (PR #2130's form)
        seeds = nested["seeds"]
        return Side(str(path), "'results.seeds' keyed by seed", _entries(list(seeds.values()), list(seeds), data, path,
                                                                        "results.seeds"))
    for key in ("seed_results", "seeds"):
        entries = data.get(key)
        if isinstance(entries, dict) and entries:
            return Side(str(path), f"'{key}' keyed by seed", _entries(list(entries.values()), list(entries), data, path, key))
        if isinstance(entries, list) and entries and not all(_is_seed_id(e) for e in entries):
            bare = not any(isinstance(e, dict) for e in entries)
            seeds = data.get("seeds") if bare and key == "seed_results" and isinstance(data.get("seeds"), list) else None
            return Side(str(path), f"'{key}' list", _entries(entries, seeds, data, path, key))
    if isinstance(data.get("seed_scores"), list) and data["seed_scores"]:
        seeds = data.get("seeds") if isinstance(data.get("seeds"), list) else None
        return Side(str(path), "'seed_scores' list", _entries(data["seed_scores"], seeds, data, path, "seed_scores"))
    # No per-seed numbers: the headline is one value (a published mean counts as one, fixed, number).
    one = SeedResult(_seed_id(data.get("seed")), _number(data, "val_loss", path), _number(data, "val_bpb", path))
    if one.val_loss is None and one.val_bpb is None:
        raise FormatError("no per-seed results (seed_results, seeds, seed_scores) and no val_loss or val_bpb", path)
    return Side(str(path), "the headline val_loss/val_bpb (no per-seed results)", (one,))


def _entries(entries: list, seeds: list | None, data: dict, path: Path, key: str) -> tuple[SeedResult, ...]:
    """Per-seed results; `seeds` names them by position (dict keys, or the 'seeds' list beside plain
    numbers), else each object's own 'seed'."""
    bare_metric = _bare_metric(entries, data, path, key) if any(not isinstance(e, dict) for e in entries) else None
    if bare_metric is not None and seeds is not None and len(seeds) != len(entries):
        raise FormatError(f"'{key}' has {len(entries)} entries but 'seeds' lists {len(seeds)}", path)
    out = []
    for i, entry in enumerate(entries):
        where = f"{key}[{seeds[i] if seeds is not None else i}]"
        if isinstance(entry, dict):
            seed = seeds[i] if seeds is not None else entry.get("seed")
            result = SeedResult(_seed_id(seed), _number(entry, "val_loss", path, where), _number(entry, "val_bpb", path, where))
            if result.val_loss is None and result.val_bpb is None:
                raise FormatError(f"{where} has neither val_loss nor val_bpb (keys: {', '.join(sorted(entry))})", path)
        else:
            value = _finite(entry, path, where)
            seed = _seed_id(seeds[i]) if seeds is not None else None
            result = SeedResult(seed, value if bare_metric == "val_loss" else None, value if bare_metric == "val_bpb" else None)
        out.append(result)
    named = [r.seed for r in out if r.seed is not None]
    if len(named) != len(set(named)):
        twice = sorted({s for s in named if named.count(s) > 1})
        raise FormatError(f"'{key}' lists seed {', '.join(twice)} more than once", path)
    return tuple(out)


def _bare_metric(entries: list, data: dict, path: Path, key: str) -> str:
    """Plain numbers name no metric: they are whichever headline value their mean matches."""
    if not all(not isinstance(e, dict) for e in entries):
        raise FormatError(f"'{key}' mixes numbers and objects", path)
    mean = statistics.fmean(_finite(e, path, key) for e in entries)
    for metric in METRICS:
        headline = data.get(metric)
        if isinstance(headline, (int, float)) and not isinstance(headline, bool) and abs(mean - headline) <= 1e-3 * abs(headline):
            return metric
    raise FormatError(f"'{key}' is a list of plain numbers whose mean ({mean:.5f}) matches neither the headline "
                      "val_loss nor val_bpb, so which metric they are cannot be told", path)


def _is_seed_id(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) or isinstance(value, str)


def _seed_id(value) -> str | None:
    return None if value is None else str(value)


def _number(entry: dict, key: str, path: Path, where: str = "") -> float | None:
    return None if entry.get(key) is None else _finite(entry[key], path, f"{where}.{key}" if where else key)


def _finite(value, path: Path, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise FormatError(f"{where} is {value!r}, not a finite number", path)
    return float(value)


# ---------------------------------------------------------------- the comparison

def _summary(side: Side) -> dict:
    out = {"path": side.path, "form": side.form, "n": len(side.seeds), "seeds": [s.seed for s in side.seeds],
           "bytes_per_token": side.bytes_per_token()}
    for metric in METRICS:
        values = side.values(metric)
        out[metric] = None if values is None else {
            "values": values, "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else None}
    return out


def compare(ours: Side, against: Side, via_bpb: bool = False) -> dict:
    """The rule's verdict for `ours` against `against`, with everything that went into it.

    In nats, as the rule is written, on val_loss. `via_bpb` compares val_bpb converted to nats per
    token at our side's bytes per token instead (how records state their margin in nats across
    tokenizers, and the only way when a side publishes val_bpb alone).
    """
    result = {"rule": {"threshold_nats": THRESHOLD_NATS, "alpha": ALPHA},
              "ours": _summary(ours), "against": _summary(against), "via_bpb": via_bpb,
              "metric": None, "improvement_nats": None, "test": None, "met": False, "undecided": []}
    undecided = result["undecided"]
    ours_bpt, against_bpt = ours.bytes_per_token(), against.bytes_per_token()
    if via_bpb:
        result["metric"] = "val_bpb in nats per token at ours' bytes per token"
        if ours_bpt is None:
            undecided.append("ours needs both val_loss and val_bpb for every seed to convert val_bpb to nats")
        for name, side in (("ours", ours), ("against", against)):
            if side.values("val_bpb") is None:
                undecided.append(f"{name} gives no val_bpb for every seed")
        if not undecided:
            scale = math.log(2) * ours_bpt
            ours_v = [v * scale for v in ours.values("val_bpb")]
            against_v = [v * scale for v in against.values("val_bpb")]
    else:
        result["metric"] = "val_loss (nats per token)"
        for name, side in (("ours", ours), ("against", against)):
            if side.values("val_loss") is None:
                undecided.append(f"{name} gives no val_loss for every seed ({side.form}) and the rule is in nats; "
                                 "--via-bpb compares val_bpb at our bytes per token")
        if ours_bpt is not None and against_bpt is not None and abs(ours_bpt / against_bpt - 1) > SAME_TOKENIZER_REL:
            undecided.append(f"the sides tokenize differently ({ours_bpt:.4f} vs {against_bpt:.4f} bytes per token), "
                             "so their nats per token are not comparable; --via-bpb compares val_bpb at our bytes per token")
        if not undecided:
            ours_v, against_v = ours.values("val_loss"), against.values("val_loss")
    if len(ours.seeds) < MIN_SEEDS:
        undecided.append(f"ours has {len(ours.seeds)} seed: the t-test needs at least {MIN_SEEDS} "
                         "(the records give 3 or more)")
    if not undecided:
        result["improvement_nats"] = statistics.fmean(against_v) - statistics.fmean(ours_v)
        test = welch_test(ours_v, against_v) if len(against_v) >= 2 else one_sample_test(ours_v, against_v[0])
        result["test"] = test
        result["met"] = result["improvement_nats"] >= THRESHOLD_NATS and test["p"] < ALPHA
    result["verdict"] = verdict(result)
    result["applied"] = applied_rule(ours, against)
    return result


def applied_rule(ours: Side, against: Side) -> dict:
    """The leaderboard's rule: our seeds' val_bpb below the standing record's at p < 0.25, no margin."""
    out = {"metric": "val_bpb", "margin": 0.0, "alpha": APPLIED_ALPHA, "improvement_bpb": None, "test": None,
           "met": False}
    ours_v, against_v = ours.values("val_bpb"), against.values("val_bpb")
    missing = [name for name, v in (("ours", ours_v), ("against", against_v)) if v is None]
    if missing or len(ours.seeds) < MIN_SEEDS:
        why = (f"{' and '.join(missing)} give no val_bpb for every seed" if missing else
               f"ours has {len(ours.seeds)} seed: the t-test needs at least {MIN_SEEDS}")
        out["verdict"] = f"cannot be decided: {why}"
        return out
    out["improvement_bpb"] = statistics.fmean(against_v) - statistics.fmean(ours_v)
    test = (welch_test(ours_v, against_v, margin=0.0) if len(against_v) >= 2
            else one_sample_test(ours_v, against_v[0], margin=0.0))
    out["test"] = test
    out["met"] = test["p"] < APPLIED_ALPHA
    gain = out["improvement_bpb"]
    out["verdict"] = (f"met: {gain:.5f} bpb better at p = {test['p']:.3g} < {APPLIED_ALPHA}" if out["met"] else
                      f"not met: {gain:.5f} bpb better at p = {test['p']:.3g}, not below {APPLIED_ALPHA}")
    return out


def verdict(result: dict) -> str:
    if result["undecided"]:
        return "cannot be decided: " + "; ".join(result["undecided"])
    gain, p = result["improvement_nats"], result["test"]["p"]
    if result["met"]:
        return f"met: {gain:.5f} nats better (at least {THRESHOLD_NATS}) at p = {p:.3g} < {ALPHA}"
    if gain < THRESHOLD_NATS:
        return f"not met: an improvement of {gain:.5f} nats is short of {THRESHOLD_NATS} (p = {p:.3g})"
    return f"not met: {gain:.5f} nats better but p = {p:.3g} is not below {ALPHA}: more seeds or a larger gain"


def format_report(result: dict) -> str:
    def num(x, digits=5):
        return "-" if x is None else f"{x:.{digits}f}"

    lines = [f"the README rule: at least {THRESHOLD_NATS} nats better at p < {ALPHA}; metric: {result['metric']}",
             f"{'':8} {'seeds':>5} {'val_loss mean':>13} {'std':>8} {'val_bpb mean':>12} {'std':>8} {'bytes/token':>11}  source"]
    for name in ("ours", "against"):
        s = result[name]
        loss, bpb = s["val_loss"] or {}, s["val_bpb"] or {}
        lines.append(f"{name:8} {s['n']:>5} {num(loss.get('mean')):>13} {num(loss.get('std')):>8} "
                     f"{num(bpb.get('mean')):>12} {num(bpb.get('std')):>8} {num(s['bytes_per_token'], 4):>11}  "
                     f"{s['path']} ({s['form']})")
    if result["test"] is not None:
        test = result["test"]
        lines.append(f"improvement: {result['improvement_nats']:.5f} nats (threshold {THRESHOLD_NATS})")
        t = "no spread" if test["t"] is None else f"t = {test['t']:.3f}"
        lines.append(f"test: {test['name']} of ours < against - {THRESHOLD_NATS}: {t}, df = {test['df']:.2f}, "
                     f"p = {test['p']:.3g}")
    lines.append(f"verdict: {result['verdict']}")
    applied = result.get("applied")
    if applied is not None:
        lines.append(f"the applied rule (the leaderboard's, #1902/#2146): val_bpb lower at p < {APPLIED_ALPHA}, no margin")
        if applied["test"] is not None:
            test = applied["test"]
            t = "no spread" if test["t"] is None else f"t = {test['t']:.3f}"
            lines.append(f"improvement: {applied['improvement_bpb']:.5f} bpb; test: {test['name']}: {t}, "
                         f"df = {test['df']:.2f}, p = {test['p']:.3g}")
        lines.append(f"verdict (applied rule): {applied['verdict']}")
    return "\n".join(lines)
