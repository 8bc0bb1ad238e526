"""Every command the README shows is run by a test or by .ci/run, exactly as written.

A command with a placeholder (NAME, REPO) is run with the placeholder filled in; a command that
needs a GPU or the challenge's own script is run up to that point (`--help`). A new README command fails this test until it is one of
these.
"""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# README command -> the string a test runs in its place
FILLED_IN = {
    ".venv/bin/dvc exp apply NAME": ".venv/bin/dvc exp apply bs3",
    "git clone REPO judge && cd judge && make install": "make install",
    # tests/test_prefect_team.py's server listens on another port than a developer's own
    "PREFECT_API_URL=http://127.0.0.1:4200/api .venv/bin/prefect deployment run pgolf-pipeline/smoke -p preset=smoke":
        "PREFECT_API_URL=http://127.0.0.1:4211/api .venv/bin/prefect deployment run pgolf-pipeline/smoke -p preset=smoke",
    # tests/test_prefect_leases.py's server is on a random port (API), the run's id its own
    "PREFECT_API_URL=http://127.0.0.1:4200/api .venv/bin/pgolf sweep --deployment pgolf-pipeline/smoke --preset smoke --seeds 42,0,1234":
        'PREFECT_API_URL={API} .venv/bin/pgolf sweep --deployment pgolf-pipeline/smoke --preset smoke --seeds 42,0,1234',
    "PREFECT_API_URL=http://127.0.0.1:4200/api .venv/bin/prefect deployment run pgolf-pipeline/split -p preset=smoke":
        'PREFECT_API_URL={API} .venv/bin/prefect deployment run pgolf-pipeline/split -p preset=smoke',
    "PREFECT_API_URL=http://127.0.0.1:4200/api .venv/bin/prefect flow-run retry RUN_ID":
        'PREFECT_API_URL={API} .venv/bin/prefect flow-run retry {parent}',
}
# Benchmarks for the device machine (bench/gpu_checks.sh runs them there): here, their arguments.
UP_TO_THE_DEVICE = {
    ".venv/bin/python bench/train_throughput.py",
    ".venv/bin/python bench/train_throughput.py --reference bench/reference/train_gpt.py",
    ".venv/bin/python bench/eval_ttt.py --preset record --corpus DOCS.jsonl.gz",
    ".venv/bin/python bench/reference_int8.py --checkpoint final_model.pt --shards DIR --tokenizer DIR --expect 1.22437",
    ".venv/bin/python bench/reference_int8.py --tiny --reference-code bench/reference/train_gpt.py",
    ".venv/bin/python bench/reference_parity.py",
    ".venv/bin/python bench/record_parity.py",
    ".venv/bin/python bench/seed_systems_parity.py",
    ".venv/bin/python bench/pr2135_parity.py",
    ".venv/bin/python bench/flow_overhead.py",
    ".venv/bin/python bench/step_proxies.py",
    ".venv/bin/python bench/pack_ratio.py --gptq artifacts/gptq",
    ".venv/bin/python bench/shard_throughput.py",
    ".venv/bin/python bench/certify_cost.py",
    ".venv/bin/python bench/audit_records.py --repo CLONE",
}
def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.splitlines():
            command = re.split(r"\s{2,}#", line)[0].strip()
            if command and command not in commands:
                commands.append(command)
    return commands


def test_every_readme_command_is_run_somewhere():
    sources = "\n".join(p.read_text(encoding="utf-8") for p in sorted((ROOT / "tests").glob("test_*.py"))
                        if p.name != Path(__file__).name)
    sources += (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    unrun = [c for c in readme_commands()
             if c not in UP_TO_THE_DEVICE and FILLED_IN.get(c, c) not in sources]
    assert unrun == [], f"README commands no test or .ci/run runs as written: {unrun}"
    stale = (set(FILLED_IN) | UP_TO_THE_DEVICE) - set(readme_commands())
    assert stale == set(), f"commands listed here that the README no longer shows: {stale}"


# A subprocess each (torch imports included): the e2e target.
@pytest.mark.e2e
@pytest.mark.parametrize("command", sorted(UP_TO_THE_DEVICE))
def test_device_benchmarks_take_their_readme_arguments(command):
    """Each benchmark's parser accepts what the README passes (up to running it on the device)."""
    script = command.split()[1]
    args = command.split()[2:]
    proc = subprocess.run([str(ROOT / ".venv/bin/python"), str(ROOT / script), "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for flag in (a for a in args if a.startswith("--")):
        assert flag in proc.stdout, f"{script} --help does not offer {flag}"
