"""`pgolf audit` on the challenge's own records folders: the README's audit table (CPU, a few minutes).

    .venv/bin/python bench/audit_records.py --repo CLONE [--json]

CLONE is a clone of openai/parameter-golf with its pull requests' heads fetched
(`git fetch origin '+refs/pull/*/head:refs/pull/*/head'`). Each folder below is copied out of it with
`git archive` into the git-ignored bench/reference/records/<name>/ (read, never committed) and
audited, some against the record before it (the applied p < 0.25 rule and the README's). Without
--repo the folders already there are audited.
"""
from __future__ import annotations

import argparse
import io
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pgolf import audit  # noqa: E402

OUT = ROOT / "bench" / "reference" / "records"
# name -> (git ref, folder in the repository, what it is)
FOLDERS = {
    "r1_pr1855": ("main", "records/track_10min_16mb/2026-04-27_SP8192_LQER_SparseGate_BOSSmearFix_9HpStack_1.0611",
                  "R1, the #1 record (PR #1855), merged"),
    "r0429_pr1868": ("main", "records/track_10min_16mb/2026-04-29_SmearGateBOSFix_3Seed_1.06141",
                     "R0429 (PR #1868), the row R1 was tested against"),
    "pr2014": ("refs/pull/2014/head", "records/track_10min_16mb/2026-04-30_SP8192_CaseOps_Progressive3k_ShortDocTTT",
               "PR #2014, a frontier row of #2146"),
    "pr2135": ("refs/pull/2135/head", "records/track_10min_16mb/2026-05-01_SP8192_PR2130Base_Calib32",
               "PR #2135, the last frontier row of #2146"),
    "pr2130": ("refs/pull/2130/head", "SUBMISSION_FINAL", "PR #2130, removed for the #2127 leak"),
    "pr2109_first": ("ecce6fd86", "records/track_10min_16mb/2026-04-30_PR1855_MP3_AliasSmearBoundary",
                     "PR #2109 as first submitted: val built in 4 parallel chunks"),
    "pr2109": ("refs/pull/2109/head", "records/track_non_record_16mb/2026-04-30_PR1855_MP3_AliasSmearBoundary",
               "PR #2109 at its head: the same runs on the canonical val"),
    "pr1967": ("refs/pull/1967/head", "records/track_10min_16mb/2026-04-30_NgramTilt_V21_LeakyReLU_1.05851",
               "PR #1967, the eval clock question"),
    "pr1950": ("refs/pull/1950/head", "records/track_10min_16mb/2026-04-29_PerGroupLRZIP_ComplianceFix_1.06003",
               "PR #1950, #1934 rerun with GPTQ inside 600 s"),
    "pr1956": ("refs/pull/1956/head", "records/track_10min_16mb/2026-04-29_PR1908Repro_Compliant600s_VAL_BPB_1.06044",
               "PR #1956, #1908 rerun without the fixed-step stop"),
}
AGAINST = {"r1_pr1855": "r0429_pr1868", "pr2135": "pr2014"}


def extract(repo: Path, name: str) -> None:
    ref, folder, _ = FOLDERS[name]
    data = subprocess.run(["git", "-C", str(repo), "archive", ref, folder], capture_output=True, check=True).stdout
    target = OUT / name
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for member in tar.getmembers():
            if member.isfile():
                dest = target / Path(member.name).relative_to(folder)
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(tar.extractfile(member).read())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", type=Path, default=None, help="a clone of openai/parameter-golf with PR heads")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.repo is not None:
        for name in FOLDERS:
            extract(args.repo, name)
    results = {}
    for name, (_, _, what) in FOLDERS.items():
        if not (OUT / name).is_dir():
            print(f"{name}: not in {OUT}; pass --repo", file=sys.stderr)
            continue
        against = OUT / AGAINST[name] if name in AGAINST else None
        results[name] = {"what": what, "against": AGAINST.get(name), **audit.audit(OUT / name, against)}
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    checks = list(audit.CHECKS)
    print("| folder | " + " | ".join(checks) + " | verdict |")
    print("|---|" + "---|" * (len(checks) + 1))
    for name, result in results.items():
        status = {c["check"]: c["status"] for c in result["checks"]}
        label = f"{name}" + (f" vs {result['against']}" if result["against"] else "")
        print(f"| {label} | " + " | ".join(status[c] for c in checks) + f" | **{result['verdict']}** |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
