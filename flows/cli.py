"""`pgolf` command line: run the pipeline through DVC or Prefect and print what happened.

    pgolf run [--preset smoke] [--set train.iterations=100] [--via dvc|prefect] [--stage eval] [--force]
    pgolf params --preset baseline [--set k=v]   (render params.yaml from a preset)
    pgolf summary                            (the last run: each stage ran or cached, its seconds; the score)
    pgolf exp show [--all] [DVC ARGS]        (DVC's experiments: changed params, val_bpb, bytes, seconds)
    pgolf sweep --preset record --seeds 42,0,1234 [--set k=v] [--deployment pgolf-pipeline/NAME] [--out F]
    pgolf significance OURS AGAINST [--json] [--via-bpb]   (the record test, both rules; exit 0 met, 1 not, 2 bad input)
    pgolf audit PATH [--against PREVIOUS] [--json]    (a judge's check of a records folder; exit 0 pass, 1 fail, 2 bad input)
    pgolf diff A B                           (what differs between two runs' fingerprints, clocks and scores)
    pgolf import-r1 final_model.int6.ptz [--preset record] [--set train.model.k=v] [--out DIR]   (rescore R1's artifact)
    pgolf export --out records/track_10min_16mb/NAME --name N [--sweep S] [--against R]   (the records folder)
    pgolf stage STAGE [--params F] [--out DIR] [--INPUT DIR]   (one stage alone, without DVC: e.g. a judge's eval)
    pgolf ranks STAGE                        (this node's ranks of a multi-node stage that node 0 runs)
"""
from __future__ import annotations

import argparse
import sys
import time

from flows.repro import format_summary, last_pipeline_run, record_pipeline_run, reproduce, results_since, set_params
from pgolf.errors import InputError, PgolfError, StageInterrupted
from runner import params as params_cli
from runner.params import add_params_arguments
from tasks.stages import STAGES


def cmd_run(args) -> int:
    if args.preset or args.overrides:
        path = set_params(".", args.preset, args.overrides)
        print(f"params: {path} <- {'preset ' + args.preset if args.preset else 'itself'} {' '.join(args.overrides)}".rstrip())
    started = time.time()
    if args.via == "prefect":
        from flows.pipeline import pipeline

        # This checkout is the workspace, as with dvc: the user's own run, not a deployment's.
        pipeline(preset=args.preset, overrides=args.overrides, workspace=".", isolate=False,
                 stages=[args.stage] if args.stage else None)
        results = results_since(".", started, [args.stage] if args.stage else STAGES)
    else:
        results = reproduce(".", stage=args.stage, force=args.force)
    record_pipeline_run(".", started, results, args.via, args.preset, args.overrides)
    print()
    print(format_summary(results, "."))
    return 0


def cmd_summary(args) -> int:
    record, results = last_pipeline_run(".")
    if record:
        what = f"preset {record['preset']}" if record.get("preset") else "params.yaml as it was"
        print(f"last run: {record['started_at']} via {record['via']}, {what}"
              + "".join(f" --set {o}" for o in record.get("overrides", [])) + f", {record['seconds']:.1f} s")
    else:
        print("no pipeline run recorded here (pgolf run writes one); each stage's last run:")
    print(format_summary(results, "."))
    return 0


def cmd_sweep(args) -> int:
    from flows.sweep import parse_seeds, sweep

    seeds = parse_seeds(args.seeds)
    table = sweep(preset=args.preset, seeds=seeds, overrides=args.overrides, workspace=".",
                  deployment=args.deployment, revision=args.revision, out=args.out)
    print(f"\n{'seed':>8} {'val_loss':>10} {'val_bpb':>10} {'bytes':>12}")
    for row in table["seeds"]:
        print(f"{row['seed']:>8} {row['val_loss']:>10.6f} {row['val_bpb']:>10.6f} {row['total_bytes'] or 0:>12,}")
    for stat in ("mean", "std"):
        values = [table[stat][m] for m in ("val_loss", "val_bpb")]
        print(f"{stat:>8} " + " ".join("         -" if v is None else f"{v:>10.6f}" for v in values))
    if table.get("stages"):
        print(f"\n{'stage':<10} {'computed by':<22} {'seconds':<24} restored by")
        for row in table["stages"]:
            ran = ", ".join(f"seed {s}" for s in row["ran_in"]) if len(row["ran_in"]) < len(table["seeds"]) else "every seed"
            print(f"{row['stage']:<10} {ran or '-':<22} {', '.join(f'{x:.1f}' for x in row['seconds']) or '-':<24} "
                  f"{row['restored_in']} run(s)")
    print(f"\nwritten to {table['path']}")
    return 0


def add_sweep(sub) -> None:
    sw = sub.add_parser("sweep", help="one pipeline run per seed; the per-seed table with mean and std (sweep.json)",
                        description="Runs the pipeline once per seed (train.seed), each in a slot of this checkout, or as "
                                    "runs of a Prefect deployment started at once (--deployment), and writes sweep.json.")
    add_params_arguments(sw, "preset to render for every seed")
    sw.add_argument("--seeds", required=True, help="comma-separated integers, e.g. 42,0,1234")
    sw.add_argument("--deployment", default=None, help="run each seed as a run of this deployment (FLOW/NAME)")
    sw.add_argument("--revision", default="HEAD", help="the commit every seed runs (default HEAD)")
    sw.add_argument("--out", default=None, help="where sweep.json goes (default artifacts/sweeps/<preset+overrides>/)")
    sw.set_defaults(func=cmd_sweep)


# ---- significance: the record test (pgolf.significance) ----
def cmd_significance(args) -> int:
    import json

    from pgolf import significance

    result = significance.compare(significance.read_side(args.ours), significance.read_side(args.against),
                                  via_bpb=args.via_bpb)
    print(json.dumps(result, indent=2, sort_keys=True) if args.json else significance.format_report(result))
    return 0 if result["met"] else 1


def add_significance(sub) -> None:
    sig = sub.add_parser("significance", help="does OURS beat AGAINST by 0.005 nats at p < 0.01? (exit 0 yes, 1 no, 2 bad input)",
                         description="The challenge's record rules as one-sided t-tests: the README's (0.005 nats at p < 0.01, the exit "
                                     "code) and the leaderboard's applied one (val_bpb lower at p < 0.25). Each side: a records folder, "
                                     "a submission.json (its seed_results) or a pgolf sweep's results (sweep.json or its folder).")
    sig.add_argument("ours")
    sig.add_argument("against")
    sig.add_argument("--json", action="store_true", help="print the whole result as JSON")
    sig.add_argument("--via-bpb", action="store_true",
                     help="compare val_bpb in nats at our bytes per token (other tokenizer, or a side without val_loss)")
    sig.set_defaults(func=cmd_significance)
# ---- end significance ----


# ---- audit: a judge's check of a records folder (pgolf.audit) ----
def cmd_audit(args) -> int:
    import json

    from pgolf import audit

    result = audit.audit(args.path, args.against)
    print(json.dumps(result, indent=2) if args.json else audit.format_text(result, args.path))
    return 0 if result["verdict"] == "pass" else 1


def add_audit(sub) -> None:
    aud = sub.add_parser("audit", help="a judge's check of a records folder (exit 0 pass, 1 fail, 2 bad input)",
                         description="Checks a records folder (pgolf's export or any challenge submission) from its "
                                     "submission.json, logs and, when there, artifact and train_gpt.py: seeds, "
                                     "artifact_bytes, train_time, eval_time, val_coverage, train_data, significance. "
                                     "Each check passes, fails or is unknown (the folder lacks what it needs); the "
                                     "verdict fails when any check fails.")
    aud.add_argument("path", help="the records folder")
    aud.add_argument("--against", default=None, help="the previous record (folder or submission.json): the record tests")
    aud.add_argument("--json", action="store_true", help='print {"verdict": ..., "checks": [{"check", "status", "evidence"}]}')
    aud.set_defaults(func=cmd_audit)


def cmd_diff(args) -> int:
    from runner import runs

    a, b = runs.load_run(args.a), runs.load_run(args.b)
    print(runs.format_diff(runs.diff(a, b), args.a, args.b))
    return 0


def add_diff(sub) -> None:
    dif = sub.add_parser("diff", help="what differs between two runs: environment fingerprint, clocks, score",
                         description="Each run: a workspace (its artifacts/ and run records) or a records folder pgolf "
                                     "exported (run_records.json). Prints both scores and clocks, and every field of the "
                                     "stages' environment fingerprints (torch, CUDA, GPUs, triton, flash-attention, "
                                     "compressors, shards, commit) that differs.")
    dif.add_argument("a")
    dif.add_argument("b")
    dif.set_defaults(func=cmd_diff)
# ---- end audit ----


# ---- import-r1: rescore a foreign artifact (pgolf.pack.r1_artifact) ----
# What an import folder holds: the import's two files and the eval the README runs into it.
IMPORT_FILES = frozenset({"artifact.bin", "import.json", "eval", ".runs"})


def cmd_import_r1(args) -> int:
    import hashlib
    import json
    from pathlib import Path

    from pgolf.pack.r1_artifact import load_r1_artifact
    from pgolf.pack.serialize import pack
    from pgolf.json_files import write_json

    model_config = params_cli.render(args.preset, args.overrides, params_cli.presets_dir_of("."))["train"]["model"]
    qm, form = load_r1_artifact(args.artifact, model_config)
    source = Path(args.artifact)
    out = Path(args.out or Path("artifacts/imported") / source.name.split(".")[0])
    foreign = sorted(p.name for p in out.iterdir() if p.name not in IMPORT_FILES) if out.is_dir() else []
    if foreign or (out.exists() and not out.is_dir()):
        raise InputError(f"refusing to write into this folder: it holds files import-r1 did not write "
                         f"({', '.join(foreign[:5]) or 'it is a file'}); choose a new --out", out)
    out.mkdir(parents=True, exist_ok=True)
    blob, _ = pack(qm, "zlib")  # for rescoring, not for size: the submission's bytes are the source's
    tmp = out / "artifact.bin.tmp"
    tmp.write_bytes(blob)
    tmp.replace(out / "artifact.bin")
    kinds = {}
    for entry in qm.entries.values():
        kinds[entry["kind"]] = kinds.get(entry["kind"], 0) + 1
    record = {"source": str(source), "source_sha256": hashlib.sha256(source.read_bytes()).hexdigest(),
              "source_bytes": source.stat().st_size, "source_format": f"r1-{form}", "preset": args.preset,
              "overrides": args.overrides, "tensors": dict(sorted(kinds.items())), "model": model_config}
    write_json(out / "import.json", record)
    print(json.dumps({k: record[k] for k in ("source", "source_format", "source_bytes", "tensors")}))
    print(f"written {out / 'artifact.bin'}; score it: .venv/bin/pgolf stage eval --pack {out} --out {out / 'eval'}")
    return 0


def add_import_r1(sub) -> None:
    imp = sub.add_parser("import-r1", help="read an R1-lineage artifact (final_model.int6.ptz) for pgolf's eval",
                         description="Reads what R1's serialize() wrote (pergroup/lrzip, brotli or lzma) and writes the "
                                     "same quantized weights as a pgolf artifact.bin (with import.json), which "
                                     "`pgolf stage eval --pack DIR` scores. The model's hyperparameters come from a preset "
                                     "(record: R1's) and --set train.model.KEY=VALUE.")
    imp.add_argument("artifact")
    add_params_arguments(imp, "preset whose train.model is the artifact's", default="record")
    imp.add_argument("--out", default=None, help="folder for artifact.bin (default artifacts/imported/<name>/)")
    imp.set_defaults(func=cmd_import_r1)
# ---- end import-r1 ----


def passthrough(parser: argparse.ArgumentParser, command: str, rest: list[str]) -> int:
    """`pgolf export|stage|ranks ...`: the command line of flows.export, of a stage module
    (`python -m tasks.<stage>`, what bin/stage runs) or of runner.ranks, as they are."""
    from runner.stage import stage_main
    from tasks.stages import spec_of

    if command == "export":
        from flows import export

        return export.main(rest, prog="pgolf export")
    if command == "ranks":
        from runner import ranks

        return ranks.join_main(rest, prog="pgolf ranks")
    if not rest or rest[0] not in STAGES:
        parser.error(f"usage: pgolf stage STAGE [ARGS]; STAGE is one of {', '.join(STAGES)}")
    return stage_main(spec_of(rest[0]), rest[1:], prog=f"pgolf stage {rest[0]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pgolf", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="reproduce the pipeline (only changed stages recompute)")
    add_params_arguments(run, "render params.yaml from a preset first")
    run.add_argument("--via", choices=["dvc", "prefect"], default="dvc")
    run.add_argument("--stage", choices=list(STAGES), default=None, help="reproduce only this stage (dvc repro -s)")
    run.add_argument("--force", action="store_true", help="recompute even if DVC says nothing changed")
    run.set_defaults(func=cmd_run)
    summ = sub.add_parser("summary", help="print the outputs of the last run")
    summ.set_defaults(func=cmd_summary)
    add_sweep(sub)
    add_significance(sub)
    add_audit(sub)
    add_diff(sub)
    add_import_r1(sub)
    prm = sub.add_parser("params", help="render params.yaml from a preset and overrides (pgolf params -h)", add_help=False)
    prm.set_defaults(func=None)
    exp = sub.add_parser("exp", help="`exp show`: DVC's experiments, the columns a competitor compares (--all: DVC's table)",
                         add_help=False)
    exp.set_defaults(func=None)
    # The stages' own command lines, whole (each parses its arguments and prints its help).
    sub.add_parser("export", help="write the challenge's records folder from the run (pgolf export -h)", add_help=False)
    sub.add_parser("stage", help=f"run one stage alone, without DVC: {', '.join(STAGES)} (pgolf stage STAGE -h)",
                   add_help=False)
    sub.add_parser("ranks", help="join a multi-node stage from another node (pgolf ranks STAGE)", add_help=False)
    args, rest = parser.parse_known_args(argv)
    if args.command == "params":
        return params_cli.main(rest, prog="pgolf params")
    if args.command in ("export", "stage", "ranks"):
        return passthrough(parser, args.command, rest)
    if args.command == "exp":
        if not rest or rest[0] != "show":
            parser.error("usage: pgolf exp show [--all] [dvc exp show arguments]")
        from flows import experiments

        return experiments.main(rest[1:])
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        return args.func(args)
    except StageInterrupted as err:
        if not getattr(err, "shown", False):  # else the stage has said where it stopped
            print(f"pgolf: {err}", file=sys.stderr)
        return StageInterrupted.EXIT_CODE
    except KeyboardInterrupt:
        print("\npgolf: interrupted", file=sys.stderr)
        return StageInterrupted.EXIT_CODE
    except PgolfError as err:
        print(f"pgolf: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
