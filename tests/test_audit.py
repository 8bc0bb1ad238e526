"""`pgolf audit`: a judge's check of a records folder. Each folder here plants one fault the judges found
after the challenge (#2146, #2127, #2109, #1271/#1632/#2138, #1950/#1956, #1967, #1835/#1855) into an otherwise clean
R1-style folder, and the audit must name it; the command is run as a user runs it."""
from __future__ import annotations

import contextlib
import io
import json
import statistics
import subprocess
from pathlib import Path

import pytest

from pgolf import audit
from pgolf.record_logs import parse_log

ROOT = Path(__file__).resolve().parents[1]
PGOLF = ROOT / ".venv" / "bin" / "pgolf"
SEEDS = {"42": (2.31944212, 1.05989454), "0": (2.32239991, 1.06124613), "1234": (2.32423994, 1.06208695)}
CASEOPS_DIR = "./data/datasets/fineweb10B_sp8192_lossless_caps_caseops_v1_reserved"
CASEOPS_TOKENIZER = "./data/tokenizers/fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model"


def log_text(seed: str, loss: float, bpb: float, train_ms: int = 595_000, hessians_s: float = 3.5,
             eval_s: float = 480.0, total_bytes: int = 15_900_000, val_tokens: int = 47_851_520,
             train_shards: int = 80, precompute_outside: float | None = None) -> str:
    """A log in R1's lineage's format, with the lines a judge reads; some of the script's own source
    is echoed in it, as some records' logs do, and must not be read as values."""
    outside = (f"v5:precomputing ngram hints OUTSIDE eval timer\nngram_tilt:precompute_outside_timer_done "
               f"elapsed={precompute_outside:.2f}s total_targets={val_tokens}\n") if precompute_outside else ""
    return f"""Hyperparameters:
  datasets_dir: {CASEOPS_DIR}
  eval_seq_len: 2048
  gptq_reserve_seconds: 4.0
  seed: {seed}
  tokenizer_path: {CASEOPS_TOKENIZER}
  world_size: 8
    seed = int(os.environ.get("SEED", 1337))
    log(f"val_tokens: {{val_data.val_tokens.numel() - 1}}")
train_shards: {train_shards}
val_tokens: {val_tokens}
1/20000 train_loss: 9.0087 train_time: 0.0m tok/s: 17921784
4900/20000 val_loss: 2.3539 val_bpb: 1.0756
stopping_early: wallclock_cap train_time: {train_ms}ms step: 4900/20000
diagnostic pre-quantization post-ema val_loss:2.32848665 val_bpb:1.06395844 eval_time:6718ms
Serialized model: 135417533 bytes
Code size (compressed): 32000 bytes
GPTQ:collecting Hessians from calibration data...
GPTQ:collected 67 Hessians in {hessians_s}s
Serialized model quantized+pergroup: {total_bytes - 32000} bytes
Total submission size quantized+pergroup: {total_bytes} bytes
Deserialize: decompression done in 20.4s
diagnostic quantized val_loss:2.34727563 val_bpb:1.07254371 eval_time:49995ms
{outside}ttt_lora:compile warmup done (137.6s)
quantized_ttt_phased val_loss:{loss:.8f} val_bpb:{bpb:.8f} eval_time:{int(eval_s * 1000)}ms
total_eval_time:{eval_s:.1f}s
"""


def write_folder(path: Path, seeds: dict = SEEDS, submission: dict | None = None, skip_log: str | None = None,
                 **log_args) -> Path:
    path.mkdir(parents=True)
    losses = [v[0] for v in seeds.values()]
    bpbs = [v[1] for v in seeds.values()]
    sub = {"author": "t", "github_id": "t", "name": "planted", "track": "10min_16mb",
           "val_loss": statistics.fmean(losses), "val_bpb": statistics.fmean(bpbs), "seeds": [int(s) for s in seeds],
           "seed_results": {s: {"val_loss": l, "val_bpb": b, "artifact_bytes": 15_900_000} for s, (l, b) in seeds.items()}}
    (path / "submission.json").write_text(json.dumps(submission or sub))
    for seed, (loss, bpb) in seeds.items():
        if seed != skip_log:
            (path / f"train_seed{seed}.log").write_text(log_text(seed, loss, bpb, **log_args))
    (path / "README.md").write_text("# planted\n")
    return path


def statuses(result: dict) -> dict:
    return {c["check"]: c["status"] for c in result["checks"]}


def evidence(result: dict, check: str) -> str:
    return next(c["evidence"] for c in result["checks"] if c["check"] == check)


def run_cli(*args) -> subprocess.CompletedProcess:
    """The console script, as a user runs it."""
    return subprocess.run([str(PGOLF), *map(str, args)], capture_output=True, text=True, cwd=ROOT)


def cli(*args) -> subprocess.CompletedProcess:
    """The same command line in this process (each console-script start costs seconds of imports)."""
    from flows.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def test_the_log_parser_reads_values_not_the_echoed_script():
    (run,) = parse_log(log_text("42", *SEEDS["42"]), "train_seed42.log")
    assert run.seed == "42" and run.final == ("quantized_ttt_phased", *SEEDS["42"])
    assert (run.train_s, run.calibration_s, run.eval_s) == (595.0, 3.5, 480.0)
    assert (run.total_bytes, run.val_tokens, run.train_shards, run.eval_seq_len) == (15_900_000, 47_851_520, 80, 2048)
    assert run.export().name == "sp8192_caseops"


def test_a_clean_folder_passes_and_the_json_has_the_judges_form(tmp_path):
    folder = write_folder(tmp_path / "clean")
    done = run_cli("audit", folder, "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert set(result) == {"verdict", "checks"} and result["verdict"] == "pass"
    assert [c["check"] for c in result["checks"]] == list(audit.CHECKS)
    assert all(set(c) == {"check", "status", "evidence"} for c in result["checks"])
    assert statuses(result) == {**{c: "pass" for c in audit.CHECKS}, "significance": "unknown"}
    assert "--against" in evidence(result, "significance")
    text = run_cli("audit", folder)
    assert text.returncode == 0 and "verdict: pass" in text.stdout


@pytest.mark.parametrize("plant, check, words", [
    (dict(seeds=dict(list(SEEDS.items())[:2])), "seeds", "2 seed(s) in submission.json"),
    (dict(skip_log="1234"), "seeds", "seed 1234: no log"),
    (dict(total_bytes=16_000_001), "artifact_bytes", "seed 42 logs 16,000,001"),
    # #1950: 599.6 s of training + 4.7 s of Hessians is over, however the loop alone looks
    (dict(train_ms=599_592, hessians_s=4.7), "train_time", "seed 42 599.6 + 4.7 = 604.3 s"),
    # #1956: a fixed-step stop that ran to 601 s
    (dict(train_ms=601_153, hessians_s=0.0), "train_time", "601.2"),
    (dict(eval_s=612.0), "eval_time", "seed 42 612.0 s"),
    # #1967: a val precompute the run's timer left out
    (dict(eval_s=553.3, precompute_outside=164.5), "eval_time", "+ val precompute 164.5 s the run's timer left out"),
    # #2109: val built per chunk; not the first 50,000 documents
    (dict(val_tokens=36_562_944), "val_coverage", "36,562,944 tokens scored"),
    # #2127: a local re-export whose train began inside val
    (dict(train_shards=1499), "train_data", "issue #2127's fingerprint"),
    # #2138: the CaseOps operators' own bytes in the denominator, +8.95%, a lower val_bpb
    (dict(seeds={s: (l, round(b / 1.0895, 8)) for s, (l, b) in SEEDS.items()}), "val_bytes", "(+8.95%)"),
    # #1271: byte-fallback tokens at 3 bytes (#1184's metadata: 157,319,833 bytes for 151,073,604)
    (dict(seeds={s: (l, round(b / 1.0413, 8)) for s, (l, b) in SEEDS.items()}), "val_bytes", "(+4.13%)"),
    # #1632 (#1698's lineage): a leading space counted twice, +16.71% (#1804's audit)
    (dict(seeds={s: (l, round(b / 1.1671, 8)) for s, (l, b) in SEEDS.items()}), "val_bytes", "(+16.71%)"),
])
def test_each_planted_fault_fails_its_check(tmp_path, plant, check, words):
    seeds = plant.pop("seeds", SEEDS)
    skip = plant.pop("skip_log", None)
    folder = write_folder(tmp_path / "planted", seeds=seeds, skip_log=skip, **plant)
    done = cli("audit", folder, "--json")
    assert done.returncode == 1, done.stderr
    result = json.loads(done.stdout)
    assert result["verdict"] == "fail" and statuses(result)[check] == "fail"
    assert words in evidence(result, check)
    # the planted fault fails its own check alone (a val of other documents has other bytes too)
    also = {"val_coverage": {"val_bytes"}}.get(check, set())
    others = {c: s for c, s in statuses(result).items() if c != check and c not in also}
    assert "fail" not in others.values(), others


def test_a_log_that_disagrees_with_submission_json_fails_seeds(tmp_path):
    folder = write_folder(tmp_path / "disagree")
    log = folder / "train_seed0.log"
    log.write_text(log.read_text().replace("val_bpb:1.06124613", "val_bpb:1.07000000"))
    result = audit.audit(folder)
    assert statuses(result)["seeds"] == "fail"
    assert "seed 0: submission.json says val_bpb 1.06124613, its log says train_seed0.log: 1.07" in evidence(result, "seeds")


def test_the_artifact_as_shipped_is_measured(tmp_path):
    """#1835/#1855: what the logs say is not what ships; a shipped artifact file is weighed."""
    folder = write_folder(tmp_path / "shipped")
    (folder / "train_gpt.py").write_text("print('hello')\n")
    (folder / "final_model.int6.ptz").write_bytes(b"\0" * 16_000_000)
    result = audit.audit(folder)
    assert statuses(result)["artifact_bytes"] == "fail"
    assert "as shipped 16,000,0" in evidence(result, "artifact_bytes")
    (folder / "final_model.int6.ptz").write_bytes(b"\0" * 15_000_000)
    result = audit.audit(folder)
    assert statuses(result)["artifact_bytes"] == "pass" and "final_model.int6.ptz 15,000,000" in evidence(result, "artifact_bytes")


def test_significance_prints_both_rules_against_the_previous_record(tmp_path):
    folder = write_folder(tmp_path / "ours")
    worse = {s: (l + 0.00175, b + 0.0008) for s, (l, b) in SEEDS.items()}
    much_worse = {s: (l + 0.02, b + 0.009) for s, (l, b) in SEEDS.items()}
    better = {s: (l - 0.01, b - 0.004) for s, (l, b) in SEEDS.items()}
    for name, seeds in (("worse", worse), ("much_worse", much_worse), ("better", better)):
        write_folder(tmp_path / name, seeds=seeds)
    result = audit.audit(folder, tmp_path / "worse")
    text = evidence(result, "significance")
    assert statuses(result)["significance"] == "pass" and "README rule: not met" in text and "applied rule" in text
    assert "met: 0.00080 bpb better" in text
    result = audit.audit(folder, tmp_path / "much_worse")
    assert statuses(result)["significance"] == "pass" and "README rule: met" in evidence(result, "significance")
    result = audit.audit(folder, tmp_path / "better")
    assert statuses(result)["significance"] == "fail" and result["verdict"] == "fail"


def test_what_the_folder_lacks_is_unknown(tmp_path):
    folder = write_folder(tmp_path / "bare", skip_log="none")
    for log in folder.glob("*.log"):
        log.unlink()
    result = audit.audit(folder)
    assert statuses(result)["seeds"] == "unknown" and statuses(result)["train_time"] == "unknown"
    assert statuses(result)["artifact_bytes"] == "pass"  # submission.json's own figures
    log = log_text("42", *SEEDS["42"]).replace("GPTQ:collected 67 Hessians in 3.5s\n", "")
    for seed in SEEDS:
        (folder / f"train_seed{seed}.log").write_text(log.replace("seed: 42", f"seed: {seed}"))
    result = audit.audit(folder)
    assert statuses(result)["train_time"] == "unknown" and "GPTQ calibration time" in evidence(result, "train_time")


@pytest.mark.parametrize("make, words", [
    (lambda p: p, "not a folder"),
    (lambda p: (p.mkdir(), p)[1], "no submission.json"),
    (lambda p: (p.mkdir(), (p / "submission.json").write_text("{oops"), p)[2], "not JSON"),
])
def test_bad_input_exits_2_naming_the_path(tmp_path, make, words):
    folder = make(tmp_path / "folder")
    done = (run_cli if words == "not JSON" else cli)("audit", folder)
    assert done.returncode == 2 and words in done.stderr and str(folder) in done.stderr
