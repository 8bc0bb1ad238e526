"""Golden values: a tiny seeded run (train -> gptq -> pack, in-process on CPU) gives the per-step
losses and the artifact bytes stored in tests/golden/run.json, exactly.

A change that moves either is a change in behaviour: if it is meant, regenerate with

    PGOLF_REGENERATE_GOLDEN=1 .venv/bin/python -m pytest tests/test_golden.py -q

and commit tests/golden/run.json with the change that moved it (tests/golden/README.md).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

from pgolf.model.config import ModelConfig
from tasks import gptq as gptq_stage, pack as pack_stage, train as train_stage
from runner.stage import execute
from tests.conftest import TINY_MODEL

GOLDEN = Path(__file__).parent / "golden" / "run.json"
REGENERATE = os.environ.get("PGOLF_REGENERATE_GOLDEN") == "1"

TRAIN = dict(model=ModelConfig(**TINY_MODEL), nproc=1, device="cpu", iterations=8, train_batch_tokens=256,
             train_seq_len=64, grad_accum_steps=1, max_wallclock_seconds=0, warmup_steps=1, warmdown_iters=3,
             compile=False, log_every=1, matrix_lr=0.02, scalar_lr=0.02, tied_embed_lr=0.03, seed=1337)
GPTQ = dict(calib_batches=2, calib_seq_len=32, calib_batch_seqs=4, device="cpu", passthrough_max_numel=512,
            seed=1337)
PACK = dict(compressor="zlib", level=9)


def golden_run(data_dirs, root: Path) -> dict:
    execute(train_stage.SPEC, train_stage.Config(**TRAIN), {"shards": data_dirs["shards"]}, root / "train")
    execute(gptq_stage.SPEC, gptq_stage.Config(**GPTQ), {"train": root / "train", "shards": data_dirs["shards"]},
            root / "gptq")
    execute(pack_stage.SPEC, pack_stage.Config(**PACK), {"gptq": root / "gptq"}, root / "pack")
    log = [json.loads(line) for line in (root / "train/train_log.jsonl").read_text().splitlines()]
    return {
        "train_losses": [entry["train_loss"] for entry in log],
        "weights_sha256": hashlib.sha256((root / "train/model.safetensors").read_bytes()).hexdigest(),
        "artifact_sha256": hashlib.sha256((root / "pack/artifact.bin").read_bytes()).hexdigest(),
    }


def machine() -> str:
    """What the bits of a float computation depend on besides the code: the torch build and the CPU
    kernels it picks (AVX2, AVX-512, AMX ... round differently)."""
    flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "") \
        if Path("/proc/cpuinfo").is_file() else ""
    return (f"torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}, "
            f"cpu flags {hashlib.sha256(flags.encode()).hexdigest()[:12]}")


def test_a_tiny_seeded_run_reproduces_its_golden_losses_and_artifact(data_dirs, tmp_path):
    """Regenerate: PGOLF_REGENERATE_GOLDEN=1 .venv/bin/python -m pytest tests/test_golden.py -q

    The losses are compared on every machine (to 1e-5: rounding moves them by 1e-6, a change in
    behaviour by far more); the weights' and the artifact's sha256 exactly, on a machine whose bits
    are stored; elsewhere the run must give the same bits twice, and regenerating adds this
    machine's."""
    got = golden_run(data_dirs, tmp_path / "a")
    bits = {k: got.pop(k) for k in ("weights_sha256", "artifact_sha256")}
    want = json.loads(GOLDEN.read_text())
    if REGENERATE:
        stored = want.get("bits", {}) if want.get("train_losses") == got["train_losses"] else {}
        GOLDEN.write_text(json.dumps({**got, "bits": {**stored, machine(): bits}}, indent=1, sort_keys=True) + "\n")
        pytest.skip(f"wrote {GOLDEN} for {machine()}")
    assert len(got["train_losses"]) == TRAIN["iterations"]
    assert got["train_losses"] == pytest.approx(want["train_losses"], rel=1e-5, abs=0), \
        "per-step losses moved (see this module's docstring)"
    if machine() in want["bits"]:
        assert bits == want["bits"][machine()]
    else:
        again = golden_run(data_dirs, tmp_path / "b")
        assert {k: again[k] for k in bits} == bits, "the same seeded run gave other bits the second time"
