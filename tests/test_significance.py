"""The record test: Student t against known values, every published seed_results shape, the verdicts,
bad input, and the exit codes of the real `pgolf significance` console script."""
from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from pgolf.errors import FormatError, InputError
from pgolf.significance import (compare, format_report, one_sample_test, read_side, student_t_cdf,
                                welch_test)

ROOT = Path(__file__).resolve().parent.parent
CASEOPS_BPT = 3.1572  # bytes per token of R1's CaseOps val set (docs/lineage.md#r1)
SP8192_BPT = 3.7266


def bpb(loss: float, bpt: float) -> float:
    return loss / (math.log(2) * bpt)


def submission(losses, form="dict", bpt=CASEOPS_BPT, seeds=(42, 0, 1234)) -> dict:
    """A submission.json shaped like one of the challenge's records (their seed_results forms vary)."""
    seeds = list(seeds)[:len(losses)]
    bpbs = [bpb(x, bpt) for x in losses]
    head = {"author": "someone", "name": "a record", "track": "10min_16mb",
            "val_loss": statistics.fmean(losses), "val_bpb": statistics.fmean(bpbs)}
    if form == "dict":  # R1: seed_results keyed by seed, val_loss and val_bpb
        return {**head, "seeds": seeds, "seed_results": {
            str(s): {"val_loss": x, "val_bpb": b, "artifact_bytes": 15_900_000, "steps": 4900}
            for s, x, b in zip(seeds, losses, bpbs)}}
    if form == "dict_bpb_only":  # R0416, R0409: per-seed val_bpb only
        del head["val_loss"]
        return {**head, "seeds": seeds,
                "seed_results": {str(s): {"val_bpb": b, "artifact_bytes": 15_936_229} for s, b in zip(seeds, bpbs)}}
    if form == "list":  # a list of {seed, val_loss, val_bpb}, seeds as strings
        return {**head, "seed_results": [{"seed": str(s), "val_bpb": b, "val_loss": x, "bytes_total": 15_950_405}
                                         for s, x, b in zip(seeds, losses, bpbs)]}
    if form == "seeds_dict":  # 2026-04-06_SP8192_QK5: the per-seed dict under "seeds"
        return {**head, "seeds": {str(s): {"val_bpb": b, "val_loss": x, "ttt_time_ms": 293_430}
                                  for s, x, b in zip(seeds, losses, bpbs)}}
    if form == "seed_scores":  # 2026-04-03_MuonEqR: seeds list + a list of plain val_bpb scores
        del head["val_loss"]
        return {**head, "seeds": seeds, "seed_scores": bpbs}
    if form == "bare_list":  # plain val_bpb numbers in seed_results, seeds beside them
        del head["val_loss"]
        return {**head, "seeds": seeds, "seed_results": bpbs}
    if form == "headline":  # the naive baseline: one run, one number
        return {**head, "seed": seeds[0]}
    raise AssertionError(form)


def sweep(losses, bpt=CASEOPS_BPT) -> dict:
    """`pgolf sweep`'s results file."""
    rows = [{"seed": 42 + i, "val_loss": x, "val_bpb": bpb(x, bpt), "total_bytes": 15_900_000}
            for i, x in enumerate(losses)]
    columns = {m: [r[m] for r in rows] for m in ("val_loss", "val_bpb")}
    return {"kind": "pgolf-sweep", "preset": "record", "overrides": ["train.seed=42"], "seeds": rows,
            "mean": {m: statistics.fmean(v) for m, v in columns.items()},
            "std": {m: statistics.stdev(v) if len(v) > 1 else None for m, v in columns.items()}}


def write(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return path


STANDING = [2.31944, 2.32240, 2.32424]             # R1's three seeds
BETTER = [2.30790, 2.30950, 2.31100]                # ~0.0126 nats better, tight
SLIGHTLY = [2.31850, 2.31900, 2.31950]              # ~0.0035 nats better: short of 0.005
NOISY = [2.2950, 2.3190, 2.3100]                    # ~0.0135 better on average, too spread


# ---------------------------------------------------------------- Student t

@pytest.mark.parametrize("t", [-7.0, -1.0, 0.0, 0.3, 2.5, 40.0])
def test_student_t_matches_closed_forms(t):
    assert student_t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-13)
    assert student_t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-13)


@pytest.mark.parametrize("q, df, upper", [(6.964557, 2, 0.01), (4.540703, 3, 0.01), (3.746947, 4, 0.01),
                                          (3.169273, 10, 0.005), (2.228139, 10, 0.025), (1.644854, 1e8, 0.05)])
def test_student_t_matches_table_critical_values(q, df, upper):
    assert 1 - student_t_cdf(q, df) == pytest.approx(upper, rel=1e-5)
    assert student_t_cdf(-q, df) == pytest.approx(upper, rel=1e-5)


@pytest.mark.parametrize("df", [2.13, 3.3063, 7.5])
def test_student_t_at_welch_degrees_of_freedom_matches_the_integrated_density(df):
    """Welch's df is not an integer: compare with Simpson's rule over the density from 0 to t."""
    def pdf(x):
        return math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi) \
            * (1 + x * x / df) ** (-(df + 1) / 2)
    t, n = 2.7, 2000
    h = t / n
    area = h / 3 * (pdf(0) + pdf(t) + sum((4 if i % 2 else 2) * pdf(i * h) for i in range(1, n)))
    assert student_t_cdf(t, df) == pytest.approx(0.5 + area, abs=1e-10)


def test_the_tests_reproduce_published_record_statistics():
    # 2026-03-18_LongContextSeq2048/README.md: one-sided one-sample t-test of three seeds against
    # the naive baseline 1.2243657 - 0.005: "t=31.42 with df=2, which gives p=0.00051".
    one = one_sample_test([1.20576485, 1.20617460, 1.20715923], 1.2243657, margin=0.005)
    assert (round(-one["t"], 2), one["df"], round(one["p"], 5)) == (31.42, 2, 0.00051)
    # 2026-03-25_ValCalib_GPTQ_XSA_BigramHash3072/submission.json: Welch against PR #549's seeds,
    # "t_statistic": -11.8339, "welch_df": 3.3063.
    welch = welch_test([1.11508120, 1.11437394, 1.11475014], [1.11922988, 1.12002032, 1.11888882], margin=0.0)
    assert (round(welch["t"], 4), round(welch["df"], 4)) == (-11.8339, 3.3063)


# ---------------------------------------------------------------- reading a side

@pytest.mark.parametrize("form", ["dict", "list", "seeds_dict"])
def test_every_per_seed_shape_reads_to_the_same_numbers(tmp_path, form):
    side = read_side(write(tmp_path / "submission.json", submission(STANDING, form)))
    assert side.values("val_loss") == STANDING
    assert side.values("val_bpb") == pytest.approx([bpb(x, CASEOPS_BPT) for x in STANDING])
    assert [s.seed for s in side.seeds] == ["42", "0", "1234"]
    assert side.bytes_per_token() == pytest.approx(CASEOPS_BPT)


@pytest.mark.parametrize("form", ["dict_bpb_only", "seed_scores", "bare_list"])
def test_bpb_only_shapes_have_no_val_loss(tmp_path, form):
    side = read_side(write(tmp_path / "submission.json", submission(STANDING, form)))
    assert side.values("val_loss") is None and side.bytes_per_token() is None
    assert side.values("val_bpb") == pytest.approx([bpb(x, CASEOPS_BPT) for x in STANDING])
    assert [s.seed for s in side.seeds] == ["42", "0", "1234"]


def test_a_metric_some_seeds_lack_is_missing_for_the_side(tmp_path):
    partial = submission(STANDING)
    del partial["seed_results"]["0"]["val_loss"]
    side = read_side(write(tmp_path / "submission.json", partial))
    assert side.values("val_loss") is None and len(side.values("val_bpb")) == 3


def test_a_headline_only_record_is_one_value(tmp_path):
    side = read_side(write(tmp_path / "r" / "submission.json", submission(STANDING[:1], "headline")))
    assert side.values("val_loss") == STANDING[:1] and side.seeds[0].seed == "42"


def test_records_folder_sweep_file_and_sweep_folder(tmp_path):
    write(tmp_path / "records" / "submission.json", submission(STANDING))
    write(tmp_path / "sweep" / "sweep.json", sweep(BETTER))
    write(tmp_path / "elsewhere.json", sweep(BETTER))
    assert read_side(tmp_path / "records").values("val_loss") == STANDING
    assert read_side(tmp_path / "sweep").values("val_loss") == BETTER
    assert read_side(tmp_path / "elsewhere.json").values("val_loss") == BETTER
    assert [s.seed for s in read_side(tmp_path / "sweep").seeds] == ["42", "43", "44"]


@pytest.mark.parametrize("content, error, words", [
    ("{not json", FormatError, "not JSON"),
    ("[1, 2]", FormatError, "expected a JSON object"),
    ({"seed_results": {"42": {"val_loss": float("nan"), "val_bpb": 1.06}}}, FormatError, "seed_results[42].val_loss"),
    ({"seed_results": {"42": {"val_loss": "2.31", "val_bpb": 1.06}}}, FormatError, "not a finite number"),
    ({"seed_results": {"42": {"quantized_bpb": 1.02}}}, FormatError, "neither val_loss nor val_bpb"),
    ({"seed_results": [{"seed": 1, "val_bpb": 1.06}, {"seed": 1, "val_bpb": 1.07}]}, FormatError, "seed 1 more than once"),
    ({"seeds": [1, 2], "seed_scores": [1.06, 1.07, 1.08], "val_bpb": 1.07}, FormatError, "3 entries but 'seeds' lists 2"),
    ({"seeds": [1, 2], "seed_scores": [1.5, 1.6], "val_bpb": 1.07, "val_loss": 2.3}, FormatError, "matches neither"),
    ({"author": "x", "name": "no numbers"}, FormatError, "no per-seed results"),
    ({"kind": "pgolf-sweep", "seeds": []}, FormatError, "non-empty 'seeds'"),
])
def test_bad_input_names_the_file_and_the_problem(tmp_path, content, error, words):
    path = write(tmp_path / "submission.json", content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(error) as err:
        read_side(path)
    assert str(path) in str(err.value) and words in str(err.value)


def test_missing_paths_are_input_errors(tmp_path):
    with pytest.raises(InputError, match="not found"):
        read_side(tmp_path / "nope.json")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="neither submission.json"):
        read_side(tmp_path / "empty")


# ---------------------------------------------------------------- verdicts

def sides(tmp_path, ours, against):
    return (read_side(write(tmp_path / "ours.json", ours)), read_side(write(tmp_path / "against.json", against)))


def test_a_clear_win_meets_the_rule_with_welch(tmp_path):
    result = compare(*sides(tmp_path, sweep(BETTER), submission(STANDING)))
    assert result["met"] and result["test"]["name"] == "one-sided Welch two-sample t-test"
    assert result["improvement_nats"] == pytest.approx(statistics.fmean(STANDING) - statistics.fmean(BETTER))
    assert result["test"]["p"] < 0.01 and result["verdict"].startswith("met")
    report = format_report(result)
    assert "0.005" in report and "p = " in report and "verdict: met" in report


def test_a_gain_short_of_the_threshold_or_too_noisy_is_not_met(tmp_path):
    short = compare(*sides(tmp_path, sweep(SLIGHTLY), submission(STANDING)))
    assert not short["met"] and 0 < short["improvement_nats"] < 0.005 and "short of 0.005" in short["verdict"]
    noisy = compare(*sides(tmp_path, sweep(NOISY), submission(STANDING)))
    assert noisy["improvement_nats"] > 0.005 and noisy["test"]["p"] >= 0.01 and not noisy["met"]
    assert "not below 0.01" in noisy["verdict"]


def test_a_single_standing_number_gets_the_one_sample_test(tmp_path):
    result = compare(*sides(tmp_path, sweep(BETTER), submission(STANDING[:1], "headline")))
    assert result["test"]["name"] == "one-sided one-sample t-test" and result["test"]["df"] == 2
    expected = one_sample_test(BETTER, STANDING[0])
    assert result["test"]["p"] == expected["p"] and result["met"] == (expected["p"] < 0.01)


def test_what_cannot_be_decided_is_said(tmp_path):
    no_loss = compare(*sides(tmp_path, sweep(BETTER), submission(STANDING, "dict_bpb_only")))
    assert not no_loss["met"] and no_loss["test"] is None
    assert "against gives no val_loss" in no_loss["verdict"] and "--via-bpb" in no_loss["verdict"]
    one_seed = compare(*sides(tmp_path, sweep(BETTER[:1]), submission(STANDING)))
    assert not one_seed["met"] and "ours has 1 seed" in one_seed["verdict"]
    other_tokenizer = compare(*sides(tmp_path, sweep(BETTER), submission([2.79, 2.80, 2.81], bpt=SP8192_BPT)))
    assert not other_tokenizer["met"] and "tokenize differently" in other_tokenizer["verdict"]


def test_via_bpb_decides_across_tokenizers_in_nats_at_our_bytes_per_token(tmp_path):
    # Theirs: val_bpb only, on another tokenizer. Their bpb, at our bytes per token, is STANDING.
    theirs = submission([bpb(x, CASEOPS_BPT) * math.log(2) * SP8192_BPT for x in STANDING], "dict_bpb_only", bpt=SP8192_BPT)
    result = compare(*sides(tmp_path, sweep(BETTER), theirs), via_bpb=True)
    assert result["met"]
    assert result["improvement_nats"] == pytest.approx(statistics.fmean(STANDING) - statistics.fmean(BETTER), abs=1e-9)


def test_identical_runs_on_both_sides_are_certain(tmp_path):
    same = compare(*sides(tmp_path, sweep([2.31] * 3), submission([2.32] * 3)))
    assert same["met"] and same["test"]["t"] is None and same["test"]["p"] == 0.0
    tie = compare(*sides(tmp_path, sweep([2.316] * 3), submission([2.32] * 3)))
    assert not tie["met"] and tie["test"]["p"] == 1.0


# ---------------------------------------------------------------- the console script

def pgolf(*args: str) -> subprocess.CompletedProcess:
    script = Path(sys.executable).parent / "pgolf"
    if not script.is_file():
        pytest.skip(f"no pgolf console script beside {sys.executable} (pip install -e .)")
    venv_bin = str(script.parent.resolve())
    path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep)
                           if p and Path(p).resolve() != Path(venv_bin) and ".venv" not in p)
    # PYTHONPATH: this checkout's code, whichever checkout the editable install points at.
    env = {**os.environ, "PATH": path or os.defpath, "PYTHONPATH": str(ROOT)}
    return subprocess.run([str(script), *args], capture_output=True, text=True, env=env, timeout=120)


def test_console_script_exit_codes(tmp_path):
    write(tmp_path / "ours" / "sweep.json", sweep(BETTER))
    write(tmp_path / "slightly" / "sweep.json", sweep(SLIGHTLY))
    write(tmp_path / "records" / "submission.json", submission(STANDING))
    write(tmp_path / "broken" / "submission.json", "{")

    met = pgolf("significance", str(tmp_path / "ours"), str(tmp_path / "records"))
    assert met.returncode == 0, met.stdout + met.stderr
    assert "verdict: met" in met.stdout and "Welch" in met.stdout

    short = pgolf("significance", "--json", str(tmp_path / "slightly"), str(tmp_path / "records"))
    assert short.returncode == 1, short.stdout + short.stderr
    assert json.loads(short.stdout)["met"] is False

    bad = pgolf("significance", str(tmp_path / "ours"), str(tmp_path / "broken"))
    assert bad.returncode == 2 and str(tmp_path / "broken" / "submission.json") in bad.stderr



# PR #2135 and the record it followed, #2014: their submission.json seed_results (val_loss, val_bpb).
PR2135 = {"314": (2.31227656, 1.05662016), "42": (2.311159, 1.05610947), "0": (2.31265572, 1.05679341)}
PR2014 = {"42": (2.31400153, 1.05740567), "314": (2.31377258, 1.05730104), "0": (2.31545717, 1.05807084)}


def record(seed_results: dict) -> dict:
    return {"seeds": [int(s) for s in seed_results],
            "seed_results": {s: {"val_loss": loss, "val_bpb": bpb_} for s, (loss, bpb_) in seed_results.items()}}


def test_pgolf_significance_prints_both_rules_where_they_disagree(tmp_path):
    """#2146 merged #2135 over #2014 under the applied rule (it printed p = 0.014); the README's rule,
    0.005 nats at p < 0.01, is not met. The command prints both, and its exit code is the README's."""
    write(tmp_path / "pr2135" / "submission.json", record(PR2135))
    write(tmp_path / "pr2014" / "submission.json", record(PR2014))
    text = pgolf("significance", str(tmp_path / "pr2135"), str(tmp_path / "pr2014"))
    assert text.returncode == 1, text.stdout + text.stderr
    lines = text.stdout.splitlines()
    readme = next(line for line in lines if line.startswith("verdict: "))
    applied = next(line for line in lines if line.startswith("verdict (applied rule): "))
    assert readme.startswith("verdict: not met: an improvement of 0.00238 nats is short of 0.005")
    assert applied.startswith("verdict (applied rule): met: 0.00108 bpb better at p = 0.0138 < 0.25")

    result = json.loads(pgolf("significance", "--json", str(tmp_path / "pr2135"), str(tmp_path / "pr2014")).stdout)
    assert result["met"] is False and result["applied"]["met"] is True
    assert round(result["applied"]["test"]["p"], 3) == 0.014
    # reversed, neither rule holds: the applied rule is one-sided too
    back = json.loads(pgolf("significance", "--json", str(tmp_path / "pr2014"), str(tmp_path / "pr2135")).stdout)
    assert back["met"] is False and back["applied"]["met"] is False and back["applied"]["test"]["p"] > 0.9

# ---------------------------------------------------------------- the export hook

@pytest.fixture
def run_artifacts(tmp_path, monkeypatch):
    """What flows.export reads from a finished run (seed 42, BETTER's first seed); the bundled
    script is not under test here, so it is a stub."""
    from flows import export

    from pgolf.pack.codesize import wrapped_size

    stub = "print('stub')\n"
    monkeypatch.setattr(export, "submission_script", lambda params: stub)
    code = wrapped_size(stub)  # what pack counted of the script it bundled, as a run's size.json says
    art = tmp_path / "artifacts"
    write(art / "eval" / "metrics.json", {"val_loss": BETTER[0], "val_bpb": bpb(BETTER[0], CASEOPS_BPT), "mode": "flat",
                                          "seq_len": 64, "tokens": 1000, "bytes": 3157})
    write(art / "pack" / "size.json", {"total_bytes": 15_000_000 + code, "model_bytes": 15_000_000, "code_bytes": code,
                                       "cap_bytes": 16_000_000, "margin_bytes": 1_000_000 - code})
    write(art / "train" / "metrics.json", {"steps": 10, "ms_per_step": 1.0})
    write(tmp_path / "sweep" / "sweep.json", sweep(BETTER))
    write(tmp_path / "standing" / "submission.json", submission(STANDING))
    return art


def test_export_writes_the_record_test_into_readme_and_submission(tmp_path, run_artifacts):
    from flows import export
    from runner import params as P

    params = P.render("smoke", ["train.seed=42"])
    out = tmp_path / "records" / "ours"
    sub = export.export(out, params, "ours", "a", "a", run_artifacts, sweep=tmp_path / "sweep",
                        against=tmp_path / "standing")
    written = json.loads((out / "submission.json").read_text())
    assert written["significance"] == sub["significance"]
    sig = written["significance"]
    assert sig["met"] is True and sig["p_value"] < 0.01 and sig["against"] == "standing"
    assert sig["test"] == "one-sided Welch two-sample t-test" and sig["threshold_nats"] == 0.005
    assert sig["improvement_nats"] == pytest.approx(statistics.fmean(STANDING) - statistics.fmean(BETTER))
    assert written["seeds"] == [42, 43, 44] and list(written["seed_results"]) == ["42", "43", "44"]
    assert written["val_loss"] == pytest.approx(statistics.fmean(BETTER))
    assert written["seed_results"]["42"]["artifact_bytes"] == 15_000_000 + written["bytes_code"]
    readme = (out / "README.md").read_text()
    assert "## Significance" in readme and "verdict: met" in readme and "standing" in readme
    assert "| 42 (this folder) |" in readme and str(tmp_path) not in readme

    alone = export.export(tmp_path / "records" / "alone", params, "alone", "a", "a", run_artifacts,
                          against=tmp_path / "standing")
    assert alone["significance"]["met"] is False and "ours has 1 seed" in alone["significance"]["verdict"]
    assert alone["seeds"] == [42] and "## Seeds" not in (tmp_path / "records" / "alone" / "README.md").read_text()


def test_export_refuses_a_sweep_that_is_not_of_this_run(tmp_path, run_artifacts):
    from flows import export
    from runner import params as P

    write(tmp_path / "other" / "sweep.json", sweep(SLIGHTLY))
    out = tmp_path / "records" / "ours"
    with pytest.raises(InputError, match="seed 42 has val_bpb"):
        export.export(out, P.render("smoke", ["train.seed=42"]), "ours", "a", "a", run_artifacts,
                      sweep=tmp_path / "other")
    with pytest.raises(InputError, match="seed 7.*not one of the sweep's seeds"):
        export.export(out, P.render("smoke", ["train.seed=7"]), "ours", "a", "a", run_artifacts, sweep=tmp_path / "sweep")
    assert not (tmp_path / "records").exists()
