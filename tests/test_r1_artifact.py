"""A judge rescores an artifact of the R1 lineage with pgolf's own code and gets R1's number.

tests/golden/r1_tiny/ holds a tiny R1 model's final_model.int6.ptz as R1's own serialize() code
wrote it (bench/record_parity.py --write-fixture; R1's script is not in this repository), in
both of its containers, eval tokens with their byte counts, and R1's eval_val of it. The R1
pergroup file was written through a zlib stand-in for the lrzip program (not installed where the
fixture was made); the test puts the same stand-in on PATH.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pgolf.errors import FormatError
from pgolf.evaluate.bpb import evaluate_bpb
from pgolf.pack.r1_artifact import load_r1_artifact, read_r1_artifact
from runner import params as presets
from tasks.evaluate import model_from_artifact
from tests.userenv import VENV, copy_checkout, fake_python_bin, shell

FIXTURE = Path(__file__).parent / "golden" / "r1_tiny"
EXPECTED = json.loads((FIXTURE / "r1_eval.json").read_text())
LRZIP_STANDIN = f"""#!{sys.executable}
import sys, zlib
args = sys.argv[1:]
out = args[args.index("-o") + 1]
data = open(args[-1], "rb").read()
open(out, "wb").write(zlib.compress(data, 9) if "-z" in args else zlib.decompress(data))
"""


@pytest.fixture
def user_bin(tmp_path):
    fake_bin = fake_python_bin(tmp_path)
    (fake_bin / "lrzip").write_text(LRZIP_STANDIN)
    (fake_bin / "lrzip").chmod(0o755)
    return fake_bin


def score(artifact: Path) -> tuple[float, float]:
    tokens = np.fromfile(FIXTURE / "val_tokens.u16", dtype="<u2").astype(np.int64)
    byte_counts = np.fromfile(FIXTURE / "val_bytes.u16", dtype="<u2").astype(np.int64)
    model = model_from_artifact(artifact, torch.device("cpu"))
    result = evaluate_bpb(model, tokens, byte_counts, EXPECTED["seq_len"], 0, EXPECTED["batch_seqs"],
                          torch.device("cpu"), join_windows=True)
    return result.val_loss, result.val_bpb


README_IMPORT = [
    ".venv/bin/pgolf import-r1 final_model.int6.ptz --preset record",
    ".venv/bin/pgolf params --preset record --set eval.ttt=off --set eval.join_windows=true",
    ".venv/bin/pgolf stage eval --pack artifacts/imported/final_model --out artifacts/imported/final_model/eval",
]


def judges_checkout(tmp_path: Path, docs) -> Path:
    """A copy of this checkout whose record preset is the fixture's model and eval settings, with
    the fixture's tokens as the challenge's published val shard adopted by the shards stage and a
    tokenizer of the model's vocab size."""
    from pgolf.data.shards import write_shard
    from tasks import shards as shards_stage, tokenizer as tok_stage
    from runner.stage import execute
    from tests.conftest import write_corpus

    repo = copy_checkout(tmp_path / "judge")
    record = presets.render("record", EXPECTED["overrides"] + [
        f"eval.seq_len={EXPECTED['seq_len']}", f"eval.batch_seqs={EXPECTED['batch_seqs']}", "eval.device=cpu", "eval.compile=false"])
    (repo / "presets" / "record.yaml").write_text(yaml.safe_dump(record, sort_keys=False))
    published = tmp_path / "published"
    published.mkdir()
    tokens = np.fromfile(FIXTURE / "val_tokens.u16", dtype="<u2")
    write_shard(published / "fineweb_val_000000.bin", tokens)
    write_shard(published / "fineweb_val_bytes_000000.bin", np.fromfile(FIXTURE / "val_bytes.u16", dtype="<u2"))
    # The eval reads no training shard; a folder's train may not repeat its val (the shards
    # certificate refuses that leak), so one short document of its own stands in.
    write_shard(published / "fineweb_train_000000.bin", np.array([1, 5, 6, 7], dtype="<u2"))
    vocab = record["train"]["model"]["vocab_size"]
    # ASCII text: a 264-piece vocabulary has no room for the fixture corpus's other characters
    corpus = write_corpus(tmp_path / "corpus", [d.encode("ascii", "ignore").decode() for d in docs])
    execute(tok_stage.SPEC, tok_stage.Config(vocab_size=vocab, num_threads=1), {"corpus": corpus},
            repo / "artifacts" / "tokenizer")
    execute(shards_stage.SPEC, shards_stage.Config(adopt=str(published)),
            {"corpus": corpus, "tokenizer": repo / "artifacts" / "tokenizer"}, repo / "artifacts" / "shards")
    return repo


@pytest.mark.parametrize("form", ["brotli", "pergroup"])
def test_the_readme_import_scores_r1s_own_eval(form, tmp_path, user_bin, docs):
    if not (VENV / "bin" / "pgolf").is_file():
        pytest.skip("needs the project's .venv (make install)")
    expected = EXPECTED["forms"][form]
    repo = judges_checkout(tmp_path, docs)
    shutil.copy(FIXTURE / expected["file"], repo / "final_model.int6.ptz")
    for command in README_IMPORT:
        shell(command, repo, user_bin)
    record = json.loads((repo / "artifacts/imported/final_model/import.json").read_text())
    assert record["source_format"] == f"r1-{form}"
    assert record["tensors"] == {"gptq": 2, "int8_row": 1, "passthrough": record["tensors"]["passthrough"]}
    metrics = json.loads((repo / "artifacts/imported/final_model/eval/metrics.json").read_text())
    assert metrics["byte_source"] == "sidecar" and metrics["tokens"] == len(np.fromfile(FIXTURE / "val_tokens.u16", "<u2")) - 1
    assert abs(metrics["val_bpb"] - expected["r1_val_bpb"]) < 1e-5
    assert abs(metrics["val_loss"] - expected["r1_val_loss"]) < 3e-5
    # the same number from the library, without the stage around it
    assert score(repo / "artifacts/imported/final_model/artifact.bin") == (metrics["val_loss"], metrics["val_bpb"])


def tiny_config() -> dict:
    return presets.render("record", EXPECTED["overrides"])["train"]["model"]


def test_both_containers_hold_the_same_tensors(user_bin, monkeypatch):
    monkeypatch.setenv("PATH", f"{user_bin}:{shutil.os.environ['PATH']}")
    flat, flat_kinds, _ = read_r1_artifact(FIXTURE / EXPECTED["forms"]["brotli"]["file"], num_layers=1)
    grouped, grouped_kinds, form = read_r1_artifact(FIXTURE / EXPECTED["forms"]["pergroup"]["file"], num_layers=1)
    assert form == "pergroup" and flat_kinds == grouped_kinds and sorted(flat) == sorted(grouped)
    assert all(torch.equal(flat[name], grouped[name]) for name in flat)  # transposes and row orders undone


def test_another_models_config_is_a_clear_error(tmp_path):
    wrong = {**tiny_config(), "mlp_mult": 4.0}
    with pytest.raises(FormatError, match="final_model.brotli.int6.ptz.*shape|shape.*final_model"):
        load_r1_artifact(FIXTURE / EXPECTED["forms"]["brotli"]["file"], wrong)


def test_a_damaged_artifact_names_the_file(tmp_path):
    bad = tmp_path / "final_model.int6.ptz"
    bad.write_bytes((FIXTURE / EXPECTED["forms"]["brotli"]["file"]).read_bytes()[:5000])
    with pytest.raises(FormatError, match="final_model.int6.ptz"):
        load_r1_artifact(bad, tiny_config())
    grouped = (FIXTURE / EXPECTED["forms"]["pergroup"]["file"]).read_bytes()
    bad.write_bytes(grouped[:-100])
    with pytest.raises(FormatError, match="pergroup container"):
        load_r1_artifact(bad, tiny_config())
