"""Export a run as the challenge's records folder.

    pgolf export --out records/track_10min_16mb/2026-11-24_MyRun --name "My run" \
        --author "Ada" --github-id ada [--params params.yaml] [--sweep SWEEP] [--against RECORD]

Writes README.md (configuration, results, lineage of techniques, how to reproduce), submission.json
(the records' fields, docs/lineage.md#submission), the train and eval logs, requirements.txt, and one
self-contained train_gpt.py generated from the pipeline's own modules that trains, quantizes,
packs and evaluates under torchrun inside that folder.

--sweep (a `pgolf sweep` results file or folder) makes submission.json list every seed of the sweep,
its headline the seeds' mean, as the records do; --against (the standing record: a records folder or
submission.json) adds the record test's result (pgolf.significance) to README.md and submission.json.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

from pgolf import audit as judge, compliance, significance
from pgolf.data import certify
from pgolf.errors import InputError, PgolfError
from pgolf.pack.codesize import wrapped_size
from pgolf.typed_params import read_yaml
from pgolf.json_files import write_json
from tasks.common import read_run_record
from tasks.pack import counted_bytes, submission_script
from tasks.run_records import EXPORTED_NAME, exported_runs

ROOT = Path(__file__).resolve().parent.parent
REQUIREMENTS = ("torch", "numpy", "sentencepiece", "protobuf", "safetensors", "pyyaml", "brotli", "zstandard",
                "python-minifier")
# Where each switch comes from (docs/lineage.md#codes and #architecture), for the README's lineage.
LINEAGE = [
    ("num_loops", "depth recurrence (R0409 lineage; R1 loops 3-5 twice from 35% of training)"),
    ("block_map", "explicit block map (PR #1383)"),
    ("film", "FiLM scale/shift on shared depths (PR #1383)"),
    ("parallel_start_layer", "two-lane parallel residuals (R1)", -1),
    ("xsa_last_n", "exclusive self-attention (R0325 lineage)"),
    ("smear_gate", "SmearGate (R0416, BOS-masked in R1)", "off"),
    ("attn_gate", "attention output gate (R0416 / PR #1790 / R1 sparse)", "off"),
    ("skip_gates", "gated U-Net skips (R1)"),
    ("ln_scale", "LN scale 1/sqrt(layer+1) (R1)"),
    ("rope_dims", "partial RoPE (R0405)"),
    ("bigram_vocab", "BigramHash embedding (PR #1383 lineage)"),
    ("ve_layers", "value embeddings (PR #1383)"),
    ("inhibitor_blocks", "inhibitory gates (PR #2116)"),
    ("doc_attention", "document-isolated attention (R1 varlen)"),
    ("asym_softcap", "AsymLogit Rescale: learned caps for positive and negative logits (PR #1923, PR #2135)"),
]


def load_json(path: Path) -> dict:
    if not path.is_file():
        raise InputError("not found: run the pipeline first (dvc repro)", path)
    return json.loads(path.read_text())


def techniques(model: dict, evaluation: dict | None = None) -> list[str]:
    out = []
    for key, text, *off in LINEAGE:
        value = model.get(key)
        if value not in ((off[0],) if off else (0, False, [], "", None)):
            out.append(text)
    evaluation = evaluation or {}
    if evaluation.get("ttt") == "lora" and evaluation.get("lora", {}).get("adapt_k") is False:
        out.append("LoRA TTT without K (PR #2135)")
    if evaluation.get("tilt", {}).get("order", 0) > 0:
        out.append("token n-gram tilt, its hints inside the eval clock (PR #2135)")
    return out


def data_folders(params: dict) -> tuple[str, str]:
    """What --shards and --tokenizer of the Reproduce line are: this run's folders, named."""
    corpus, tok, shards = params.get("corpus") or {}, params.get("tokenizer") or {}, params.get("shards") or {}
    tokenizer = (f"the run's tokenizer folder, the pipeline's `artifacts/tokenizer` (`tokenizer.model`: "
                 f"SentencePiece BPE, variant `{tok.get('variant')}`, vocab {tok.get('vocab_size')}"
                 + (f", adopted from `{tok['adopt']}`" if tok.get("adopt") else "") + ")")
    if shards.get("adopt"):
        data = f"the published shard folder the run adopted, `{shards['adopt']}`"
    else:
        data = (f"the run's shard folder, the pipeline's `artifacts/shards` (`fineweb_train_*.bin`, `fineweb_val_*.bin`, "
                f"`manifest.json`), built from corpus `{corpus.get('source')}` with that tokenizer, its first "
                f"{shards.get('val_docs')} documents the val split")
    return data, tokenizer


def readme(name: str, params: dict, metrics: dict, size: dict, train: dict, used: list[str]) -> str:
    model, t = params["train"]["model"], params["train"]
    rows = "\n".join(f"- {x}" for x in used) or (
        f"- none switched on: the baseline GPT of the challenge's train_gpt.py, at this run's size "
        f"({model['num_layers']} layers x {model['model_dim']}, vocab {model['vocab_size']})")
    shards, tokenizer = data_folders(params)
    return f"""# {name}

Generated by pgolf (`pgolf export`) from the run's own artifacts.

## Results

| val_bpb | val_loss | artifact bytes | model bytes | code bytes | steps | ms/step |
|---|---|---|---|---|---|---|
| {metrics['val_bpb']:.5f} | {metrics['val_loss']:.5f} | {size['total_bytes']:,} | {size['model_bytes']:,} | {size['code_bytes']:,} | {train.get('steps')} | {train.get('ms_per_step')} |

Eval: {metrics['mode']} windows of {metrics['seq_len']} tokens, {metrics['tokens']:,} tokens, {metrics['bytes']:,} bytes.

## Configuration

{model['num_layers']} layers x {model['model_dim']}, {model['num_heads']}/{model['num_kv_heads']} heads, vocab {model['vocab_size']},
MLP x{model['mlp_mult']} ({model['mlp_activation']}), {t['train_batch_tokens']:,} tokens/step at seq {t['train_seq_len']},
{t['nproc']} processes, wallclock cap {t['max_wallclock_seconds']} s; GPTQ int{params['gptq']['bits']}, pack
{params['pack']['compressor']} ({params['pack']['layout']}). Every value: `PARAMS` at the end of `train_gpt.py`.

## Techniques

{rows}

## Reproduce

```bash
pip install -r requirements.txt
torchrun --standalone --nproc_per_node={t['nproc']} train_gpt.py --shards SHARDS --tokenizer TOKENIZER
```

SHARDS: {shards}. TOKENIZER: {tokenizer}. A pgolf checkout at the run's commit rebuilds both with
`make run` on this folder's params (`PARAMS` in `train_gpt.py`).

`train_gpt.py` is the pipeline's own code (pgolf), bundled: it trains, quantizes, packs (counting
itself as code, minified + brotli + base85 as the records do) and evaluates, and prints a
`pgolf_final` line with the numbers above. The code bytes above, submission.json's and size.json's
are that one count of this `train_gpt.py`, the count the pipeline's pack stage made during the run;
the modules it bundles are {size.get('pipeline_code_bytes', 0):,} bytes as files (`pipeline_code_bytes`
in size.json, a detail no total includes). Each stage runs
with the CPU threads the pipeline gives it (the machine's cores over the stage's processes, whatever
OMP_NUM_THREADS torchrun sets): on CPU the thread count changes how float sums round. A pipeline run
under another OMP_NUM_THREADS, or on another machine or GPU, can give other last digits.
"""


def exported_size(size: dict, script_bytes: int, path: Path) -> dict:
    """The pipeline's size.json (`path`) for the folder: its code count must be the script's, as pack
    counts the script the export writes; else the code or params changed since the run."""
    if size.get("code_bytes") != script_bytes:
        raise InputError(f"pack counted {size.get('code_bytes')} bytes of code but the train_gpt.py this export "
                         f"would write counts {script_bytes:,}: the code or params.yaml changed since the run "
                         "(`.venv/bin/dvc status` says which); rerun the pipeline (`make run`), then export", path)
    return {**size, **counted_bytes(size["model_bytes"], script_bytes, size["cap_bytes"]),
            "code_files": ["train_gpt.py"]}


def run_timings(out: Path) -> dict:
    record = read_run_record(out)
    return record.get("timings", {}) if record else {}


def side_name(path: Path) -> str:
    """A side as the README names it: its records folder, not this machine's path."""
    path = Path(path)
    return path.parent.name if path.name in ("submission.json", "sweep.json") else path.name


def seeds_section(seed_results: dict, run_seed: str) -> str:
    rows = "\n".join(f"| {s}{' (this folder)' if s == run_seed else ''} | {r['val_loss']:.5f} | {r['val_bpb']:.5f} |"
                     for s, r in seed_results.items())
    return f"""
## Seeds

submission.json's headline is the mean over these seeds (`pgolf sweep`).

| seed | val_loss | val_bpb |
|---|---|---|
{rows}
"""


def significance_section(result: dict) -> str:
    return f"""
## Significance

The challenge's README rule: a record beats the standing one by at least {significance.THRESHOLD_NATS}
nats at p < {significance.ALPHA}; the rule the leaderboard applied: val_bpb lower at
p < {significance.APPLIED_ALPHA} (`pgolf significance`, both).

```
{significance.format_report(result)}
```
"""


def trust_section(run: dict) -> str:
    clocks = run["clocks"]
    return f"""
## Data and clocks

- Data: {certify.summary(run["data"])}.
- {compliance.describe("training", clocks["training"])}.
- {compliance.describe("eval", clocks["eval"])}.

The clocks come from the run records (pgolf.compliance); they are the challenge's 600 s budgets only
on 8xH100. `environment` in submission.json and `run_records.json` say what the run ran on.
"""


def audit_section(result: dict, against: Path | None) -> str:
    command = "pgolf audit FOLDER" + (f" --against {side_name(against)}" if against is not None else "")
    return f"""
## Audit

The judge's checks of this folder as exported (`{command}`, pgolf.audit): each passes, fails, or is
unknown where the folder lacks what it needs.

{judge.format_table(result)}
"""


def significance_fields(result: dict, against: str) -> dict:
    test = result["test"] or {}
    applied = result["applied"]
    applied_test = applied["test"] or {}
    return {"against": against, "metric": result["metric"], "threshold_nats": significance.THRESHOLD_NATS,
            "alpha": significance.ALPHA, "improvement_nats": result["improvement_nats"], "test": test.get("name"),
            "t_statistic": test.get("t"), "df": test.get("df"), "p_value": test.get("p"), "met": result["met"],
            "verdict": result["verdict"],
            "applied_rule": {"metric": applied["metric"], "alpha": applied["alpha"],
                             "improvement_bpb": applied["improvement_bpb"], "test": applied_test.get("name"),
                             "p_value": applied_test.get("p"), "met": applied["met"], "verdict": applied["verdict"]}}


def seed_entries(sweep: significance.Side, run_seed: str, metrics: dict, path: Path) -> dict:
    """The sweep's seeds as seed_results. The exported run must be one of them, with the same numbers:
    the folder's script and logs are what the seeds claim."""
    out = {}
    for s in sweep.seeds:
        if s.seed is None or not s.seed.lstrip("-").isdigit() or s.val_loss is None or s.val_bpb is None:
            raise InputError("every seed of the sweep needs an integer seed, val_loss and val_bpb", path)
        out[s.seed] = {"val_loss": s.val_loss, "val_bpb": s.val_bpb}
    if run_seed not in out:
        raise InputError(f"the exported run (seed {run_seed}) is not one of the sweep's seeds ({', '.join(out)})", path)
    if (out[run_seed]["val_loss"], out[run_seed]["val_bpb"]) != (metrics["val_loss"], metrics["val_bpb"]):
        raise InputError(f"seed {run_seed} has val_bpb {out[run_seed]['val_bpb']} in the sweep but {metrics['val_bpb']} "
                         "in the run being exported: the sweep is of another configuration", path)
    return out


def export(out: Path, params: dict, name: str, author: str, github_id: str, artifacts: Path = ROOT / "artifacts",
           sweep: Path | None = None, against: Path | None = None, via_bpb: bool = False) -> dict:
    check_out_folder(out)  # before anything is read: a folder that is not ours is refused whatever the run
    # Seconds are in the run records beside the outputs (tasks.common.run_record_path), not in them.
    metrics = {**load_json(artifacts / "eval" / "metrics.json"), **run_timings(artifacts / "eval")}
    size = load_json(artifacts / "pack" / "size.json")
    train = {**load_json(artifacts / "train" / "metrics.json"), **run_timings(artifacts / "train")}
    seed = str(params["train"]["seed"])
    seed_results = None
    sweep_rows = None
    if sweep is not None:
        sweep_data = json.loads((Path(sweep) / "sweep.json" if Path(sweep).is_dir() else Path(sweep)).read_text())
        sweep_rows = sweep_data.get("seeds") if isinstance(sweep_data, dict) else None
        ours = replace(significance.read_side(sweep), path=f"{side_name(sweep)} (pgolf sweep)")
        seed_results = seed_entries(ours, seed, metrics, Path(sweep))
    else:
        ours = significance.Side("this run", "the exported run alone",
                                 (significance.SeedResult(seed, metrics["val_loss"], metrics["val_bpb"]),))
    record_test = None
    if against is not None:
        record_test = significance.compare(ours, replace(significance.read_side(against), path=side_name(against)),
                                           via_bpb=via_bpb)
    # The folder's code is the script the run's pack stage counted (tasks.pack.submission_script):
    # README, submission.json and the folder's size.json give that one count, which the script's own
    # pack stage makes of itself too.
    script = submission_script(params)
    size = exported_size(size, wrapped_size(script), artifacts / "pack" / "size.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.export-", dir=out.parent))
    try:
        return _write_folder(tmp, out, params, name, metrics, size, train, seed, seed_results, record_test,
                             against, artifacts, script, author, github_id, sweep_rows)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_folder(tmp: Path, out: Path, params: dict, name: str, metrics: dict, size: dict, train: dict, seed: str,
                  seed_results: dict | None, record_test: dict | None, against: Path | None, artifacts: Path,
                  script: str, author: str, github_id: str, sweep_rows: list[dict] | None = None) -> dict:
    (tmp / "train_gpt.py").write_text(script, encoding="utf-8")
    used = techniques(params["train"]["model"], params.get("eval"))
    runs = exported_runs(artifacts.parent, seed, sweep_rows)
    ours_run = runs["runs"][seed]
    text = readme(name, params, metrics, size, train, used) + trust_section(ours_run)
    if seed_results is not None:
        text += seeds_section(seed_results, seed)
    if record_test is not None:
        text += significance_section(record_test)
    (tmp / "README.md").write_text(text, encoding="utf-8")
    import torch

    submission = {
        "author": author, "github_id": github_id, "name": name, "blurb": "; ".join(used) or "baseline",
        "date": datetime.date.today().isoformat(), "track": "10min_16mb",
        "val_loss": metrics["val_loss"], "val_bpb": metrics["val_bpb"],
        "bytes_total": size["total_bytes"], "bytes_code": size["code_bytes"],
        "meets_challenge_cap": size["meets_challenge_cap"],
        "non_record": bool(params["pack"].get("non_record", False)),
        "seeds": [int(seed)],
        "seed_results": {seed: {"val_loss": metrics["val_loss"], "val_bpb": metrics["val_bpb"],
                                     "artifact_bytes": size["total_bytes"],
                                     "steps": train.get("steps"), "step_avg_ms": train.get("ms_per_step"),
                                     "eval_time_s": metrics.get("eval_seconds")}},
        "pytorch_version": torch.__version__,
        "technique_summary": used,
        # whether the data is the challenge's, and the two clocks (pgolf.data.certify, pgolf.compliance)
        "canonical": ours_run["score"].get("canonical"),
        "compliance": {"training_clock": ours_run["clocks"]["training"], "eval_clock": ours_run["clocks"]["eval"]},
        "environment": (ours_run["records"].get("train") or {}).get("environment"),
    }
    if seed_results is not None:
        # The records' convention: the headline is the seeds' mean; the exported run keeps its details.
        seed_results[seed] = submission["seed_results"][seed]
        losses, bpbs = [r["val_loss"] for r in seed_results.values()], [r["val_bpb"] for r in seed_results.values()]
        submission.update({"val_loss": statistics.fmean(losses), "val_bpb": statistics.fmean(bpbs),
                           "val_loss_std": statistics.stdev(losses) if len(losses) > 1 else None,
                           "val_bpb_std": statistics.stdev(bpbs) if len(bpbs) > 1 else None,
                           "seeds": [int(s) for s in seed_results], "seed_results": seed_results})
    if record_test is not None:
        submission["significance"] = significance_fields(record_test, side_name(against))
    write_json(tmp / "submission.json", submission)
    write_json(tmp / "size.json", size)
    for src, dst in ((artifacts / "train" / "train_log.jsonl", "train_log.jsonl"),
                     (artifacts / "eval" / "metrics.json", "eval_metrics.json")):
        if src.is_file():
            shutil.copyfile(src, tmp / dst)
    (tmp / "requirements.txt").write_text("".join(f"{r}\n" for r in pinned(REQUIREMENTS)))
    write_json(tmp / EXPORTED_NAME, runs)
    # The judge's audit of the folder as written, in its README (pgolf.audit).
    result = judge.audit(tmp, against)
    (tmp / "README.md").write_text(text + audit_section(result, against), encoding="utf-8")
    submission["audit"] = {"verdict": result["verdict"], "checks": result["checks"]}
    write_json(tmp / "submission.json", submission)
    if out.exists():
        # Only a folder check_out_folder found empty or holding an earlier export is moved aside.
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.replaced-", dir=out.parent))
        os.replace(out, old / out.name)
        os.replace(tmp, out)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out)
    return submission


# Every file an export writes; a folder holding anything else was not (only) written by it.
EXPORT_FILES = frozenset({"README.md", "submission.json", "size.json", "train_gpt.py", "requirements.txt",
                          "train_log.jsonl", "eval_metrics.json", EXPORTED_NAME})
EXPORT_MARK = "Generated by pgolf"


def check_out_folder(out: Path) -> None:
    """Export replaces a folder only when it is empty or an earlier export (the export's files and
    nothing else, its README written by pgolf): never a user's folder, a home or the root."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise InputError("--out must be a folder (or a new path), not a file or a link", out)
    if not out.exists():
        return
    names = sorted(p.name for p in out.iterdir())
    foreign = [n for n in names if n not in EXPORT_FILES]
    readme = out / "README.md"
    ours = readme.is_file() and EXPORT_MARK in readme.read_text(encoding="utf-8", errors="replace")[:2000]
    if foreign or (names and not ours):
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        what = f"holds files export did not write ({shown})" if foreign else "holds a README.md that export did not write"
        raise InputError(f"refusing to replace this folder: it {what}; export writes into a new or empty folder, "
                         "or over its own earlier export", out)


def pinned(names) -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for name in names:
        try:
            out.append(f"{name}=={version(name).split('+')[0]}")
        except PackageNotFoundError:
            out.append(name)
    return out


def main(argv: list[str] | None = None, prog: str = "python -m tasks.export") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--params", default="params.yaml")
    # the checkout it is run in, as --params: the installed package may live in another checkout
    parser.add_argument("--artifacts", default="artifacts", type=Path)
    parser.add_argument("--name", default="pgolf run")
    parser.add_argument("--author", default="")
    parser.add_argument("--github-id", default="")
    parser.add_argument("--sweep", type=Path, default=None, help="a pgolf sweep's results: every seed into submission.json")
    parser.add_argument("--against", type=Path, default=None,
                        help="the standing record (records folder or submission.json): the record test into README and submission.json")
    parser.add_argument("--via-bpb", action="store_true", help="the record test on val_bpb in nats at our bytes per token")
    args = parser.parse_args(argv)
    try:
        submission = export(args.out, read_yaml(args.params), args.name, args.author, args.github_id, args.artifacts,
                            sweep=args.sweep, against=args.against, via_bpb=args.via_bpb)
    except PgolfError as err:
        print(f"pgolf export: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps({k: submission[k] for k in ("val_bpb", "bytes_total", "bytes_code")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
