"""A judge rescores an artifact of the R1 lineage, as the lineage's own code wrote it, with pgolf's code
and gets the lineage's number: R1's (the record preset) and PR #2135's (the pr2135 preset).

tests/golden/ holds, per lineage, a tiny model's final_model.int6.ptz as its own serialize() code wrote
it (its script is not in this repository) in both of its containers, eval tokens with their byte counts,
and its own eval_val of it:
- r1_tiny/ (bench/record_parity.py --write-fixture): R1's pergroup container and brotli.
- pr2135_tiny/ (bench/pr2135_parity.py --write-fixture): PR #2135's pergroup frame (PGRP version 2) and
  its byte-shuffled brotli. The model's AsymLogit caps are set apart (6.5 and 9.0) before quantizing, so
  a reader that drops or swaps the pair scores another number.
Both pergroup files were written through a zlib stand-in for the lrzip program (not installed where the
fixtures were made); the tests put the same stand-in on PATH.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pgolf.errors import FormatError
from pgolf.evaluate.bpb import evaluate_bpb
from pgolf.pack.r1_artifact import load_r1_artifact, read_r1_artifact
from runner import params as presets
from tasks.evaluate import cut_documents_every, model_from_artifact
from tests.userenv import VENV, copy_checkout, fake_python_bin, shell

GOLDEN = Path(__file__).parent / "golden"
LRZIP_STANDIN = f"""#!{sys.executable}
import sys, zlib
args = sys.argv[1:]
out = args[args.index("-o") + 1]
data = open(args[-1], "rb").read()
open(out, "wb").write(zlib.compress(data, 9) if "-z" in args else zlib.decompress(data))
"""


@dataclass(frozen=True)
class Lineage:
    """One lineage's fixture, the README's commands that import and score it, and where pgolf's reading
    of it differs from the other's."""
    name: str
    preset: str
    fixture: Path
    numbers: str  # the fixture's json of the lineage's own eval
    key: str  # that json's prefix of val_bpb / val_loss
    readme_import: tuple[str, ...]
    pergroup_form: str  # read_r1_artifact's name for the pergroup container
    frame_error: str  # how a damaged pergroup container is named in the error
    tensors: dict  # import.json's tensor counts by kind; None: any count
    bpb_tolerance: float
    loss_tolerance: float

    @property
    def expected(self) -> dict:
        return json.loads((self.fixture / self.numbers).read_text())

    def model_config(self, *overrides: str) -> dict:
        return presets.render(self.preset, self.expected["overrides"] + list(overrides))["train"]["model"]


R1 = Lineage(
    name="r1", preset="record", fixture=GOLDEN / "r1_tiny", numbers="r1_eval.json", key="r1",
    readme_import=(
        ".venv/bin/pgolf import-r1 final_model.int6.ptz --preset record",
        ".venv/bin/pgolf params --preset record --set eval.ttt=off --set eval.join_windows=true",
        ".venv/bin/pgolf stage eval --pack artifacts/imported/final_model --out artifacts/imported/final_model/eval"),
    pergroup_form="pergroup", frame_error="R1 pergroup container",
    tensors={"gptq": 2, "int8_row": 1, "passthrough": None},
    bpb_tolerance=1e-5, loss_tolerance=3e-5)
PR2135 = Lineage(
    name="pr2135", preset="pr2135", fixture=GOLDEN / "pr2135_tiny", numbers="pr_eval.json", key="pr",
    readme_import=(
        ".venv/bin/pgolf import-r1 final_model.int6.ptz --preset pr2135",
        ".venv/bin/pgolf params --preset pr2135 --set eval.ttt=off --set eval.tilt.order=0 --set eval.join_windows=true",
        ".venv/bin/python -m tasks.evaluate --pack artifacts/imported/final_model --out artifacts/imported/final_model/eval"),
    pergroup_form="pergroup2", frame_error="PR #2135 pergroup frame",
    tensors={"gptq": None, "passthrough": None},  # its sparse gates stay fp16 (no int8 rows)
    # measured 2e-9 (its bf16 RoPE frequencies alone move the loss 2.7e-5: test_its_bf16_rope_frequencies_...)
    bpb_tolerance=1e-6, loss_tolerance=2e-6)
LINEAGES = pytest.mark.parametrize("lineage", [R1, PR2135], ids=lambda lineage: lineage.name)


@pytest.fixture
def user_bin(tmp_path):
    fake_bin = fake_python_bin(tmp_path)
    (fake_bin / "lrzip").write_text(LRZIP_STANDIN)
    (fake_bin / "lrzip").chmod(0o755)
    return fake_bin


def score(lineage: Lineage, artifact: Path) -> tuple[float, float]:
    expected = lineage.expected
    tokens = np.fromfile(lineage.fixture / "val_tokens.u16", dtype="<u2").astype(np.int64)
    byte_counts = np.fromfile(lineage.fixture / "val_bytes.u16", dtype="<u2").astype(np.int64)
    model = model_from_artifact(artifact, torch.device("cpu"))
    cut_documents_every(model, expected["seq_len"])
    result = evaluate_bpb(model, tokens, byte_counts, expected["seq_len"], 0, expected["batch_seqs"],
                          torch.device("cpu"), join_windows=True)
    return result.val_loss, result.val_bpb


def judges_checkout(lineage: Lineage, tmp_path: Path, docs) -> Path:
    """A copy of this checkout whose preset is the fixture's model and eval settings, with the fixture's
    tokens as the challenge's published val shard adopted by the shards stage and a tokenizer of the
    model's vocab size."""
    from pgolf.data.shards import write_shard
    from tasks import shards as shards_stage, tokenizer as tok_stage
    from runner.stage import execute
    from tests.conftest import write_corpus

    expected = lineage.expected
    repo = copy_checkout(tmp_path / "judge")
    preset = presets.render(lineage.preset, expected["overrides"] + [
        f"eval.seq_len={expected['seq_len']}", f"eval.batch_seqs={expected['batch_seqs']}", "eval.device=cpu",
        "eval.compile=false"])
    (repo / "presets" / f"{lineage.preset}.yaml").write_text(yaml.safe_dump(preset, sort_keys=False))
    published = tmp_path / "published"
    published.mkdir()
    tokens = np.fromfile(lineage.fixture / "val_tokens.u16", dtype="<u2")
    write_shard(published / "fineweb_val_000000.bin", tokens)
    write_shard(published / "fineweb_val_bytes_000000.bin", np.fromfile(lineage.fixture / "val_bytes.u16", dtype="<u2"))
    # The eval reads no training shard; a folder's train may not repeat its val (the shards
    # certificate refuses that leak), so one short document of its own stands in.
    write_shard(published / "fineweb_train_000000.bin", np.array([1, 5, 6, 7], dtype="<u2"))
    # ASCII text: a 264-piece vocabulary has no room for the fixture corpus's other characters
    corpus = write_corpus(tmp_path / "corpus", [d.encode("ascii", "ignore").decode() for d in docs])
    execute(tok_stage.SPEC, tok_stage.Config(vocab_size=preset["train"]["model"]["vocab_size"], num_threads=1),
            {"corpus": corpus}, repo / "artifacts" / "tokenizer")
    execute(shards_stage.SPEC, shards_stage.Config(adopt=str(published)),
            {"corpus": corpus, "tokenizer": repo / "artifacts" / "tokenizer"}, repo / "artifacts" / "shards")
    return repo


@pytest.mark.parametrize("form", ["brotli", "pergroup"])
@LINEAGES
def test_the_readme_import_scores_the_lineages_own_eval(lineage, form, tmp_path, user_bin, docs):
    if not (VENV / "bin" / "pgolf").is_file():
        pytest.skip("needs the project's .venv (make install)")
    expected = lineage.expected["forms"][form]
    repo = judges_checkout(lineage, tmp_path, docs)
    shutil.copy(lineage.fixture / expected["file"], repo / "final_model.int6.ptz")
    for command in lineage.readme_import:
        shell(command, repo, user_bin)
    record = json.loads((repo / "artifacts/imported/final_model/import.json").read_text())
    source_form = lineage.pergroup_form if form == "pergroup" else form
    assert record["source_format"] == f"r1-{source_form}"
    assert set(record["tensors"]) == set(lineage.tensors)
    assert all(record["tensors"][kind] == count for kind, count in lineage.tensors.items() if count is not None)
    metrics = json.loads((repo / "artifacts/imported/final_model/eval/metrics.json").read_text())
    assert metrics["byte_source"] == "sidecar"
    assert metrics["tokens"] == len(np.fromfile(lineage.fixture / "val_tokens.u16", "<u2")) - 1
    assert abs(metrics["val_bpb"] - expected[f"{lineage.key}_val_bpb"]) < lineage.bpb_tolerance
    assert abs(metrics["val_loss"] - expected[f"{lineage.key}_val_loss"]) < lineage.loss_tolerance
    # the same number from the library, without the stage around it
    assert score(lineage, repo / "artifacts/imported/final_model/artifact.bin") == (metrics["val_loss"], metrics["val_bpb"])


@LINEAGES
def test_both_containers_hold_the_same_tensors(lineage, user_bin, monkeypatch):
    monkeypatch.setenv("PATH", f"{user_bin}:{os.environ['PATH']}")
    forms = lineage.expected["forms"]
    flat, flat_kinds, flat_form = read_r1_artifact(lineage.fixture / forms["brotli"]["file"], num_layers=1)
    grouped, grouped_kinds, form = read_r1_artifact(lineage.fixture / forms["pergroup"]["file"], num_layers=1)
    assert (form, flat_form) == (lineage.pergroup_form, "brotli")
    assert flat_kinds == grouped_kinds and sorted(flat) == sorted(grouped)
    assert all(torch.equal(flat[name], grouped[name]) for name in flat)  # permutations, transposes, row orders undone


@LINEAGES
def test_another_models_config_is_a_clear_error(lineage):
    wrong = {**lineage.model_config(), "mlp_mult": 4.0}
    with pytest.raises(FormatError, match="final_model.brotli.int6.ptz.*shape|shape.*final_model"):
        load_r1_artifact(lineage.fixture / lineage.expected["forms"]["brotli"]["file"], wrong)


@LINEAGES
def test_a_damaged_artifact_names_the_file_and_its_container(lineage, tmp_path):
    bad = tmp_path / "final_model.int6.ptz"
    forms = lineage.expected["forms"]
    bad.write_bytes((lineage.fixture / forms["brotli"]["file"]).read_bytes()[:5000])
    with pytest.raises(FormatError, match="final_model.int6.ptz"):
        load_r1_artifact(bad, lineage.model_config())
    grouped = (lineage.fixture / forms["pergroup"]["file"]).read_bytes()
    for damaged, words in ((grouped[:-100], lineage.frame_error), (grouped + b"x", lineage.frame_error),
                           (grouped[:40], "truncated")):
        bad.write_bytes(damaged)
        with pytest.raises(FormatError, match=f"final_model.int6.ptz: {re.escape(words)}"):
            load_r1_artifact(bad, lineage.model_config())


# ---- PR #2135 alone: its AsymLogit pair and its bf16 RoPE frequencies

def test_pr2135s_asymlogit_pair_is_read_as_written():
    brotli = PR2135.fixture / PR2135.expected["forms"]["brotli"]["file"]
    _, kinds, _ = read_r1_artifact(brotli, num_layers=1)  # the same as the pergroup file's (the test above)
    assert kinds["softcap_pos"] == kinds["softcap_neg"] == "passthrough (float16)"
    qm, _ = load_r1_artifact(brotli, PR2135.model_config())
    weights = qm.dequantize()
    assert (float(weights["softcap.pos"]), float(weights["softcap.neg"])) == (6.5, 9.0)


def test_a_swapped_pair_scores_another_number(tmp_path):
    """The fixture's number depends on the pair: read with the caps swapped, the eval disagrees."""
    from pgolf.pack.serialize import pack
    brotli = PR2135.expected["forms"]["brotli"]
    qm, _ = load_r1_artifact(PR2135.fixture / brotli["file"], PR2135.model_config())
    qm.tensors["softcap.pos"], qm.tensors["softcap.neg"] = qm.tensors["softcap.neg"], qm.tensors["softcap.pos"]
    (tmp_path / "artifact.bin").write_bytes(pack(qm, "zlib")[0])
    _, bpb = score(PR2135, tmp_path / "artifact.bin")
    assert abs(bpb - brotli["pr_val_bpb"]) > 1e-3


def test_its_bf16_rope_frequencies_matter_on_its_artifact(tmp_path):
    """PR #2135 builds its models as GPT(h).bfloat16() with only the parameters back in fp32, so RoPE's
    inverse frequencies are bf16-rounded (train.model.rope_bf16_freqs): read with fp32 frequencies,
    its own artifact scores another number."""
    from pgolf.pack.serialize import pack
    brotli = PR2135.expected["forms"]["brotli"]
    qm, _ = load_r1_artifact(PR2135.fixture / brotli["file"], PR2135.model_config("train.model.rope_bf16_freqs=false"))
    (tmp_path / "artifact.bin").write_bytes(pack(qm, "zlib")[0])
    loss, bpb = score(PR2135, tmp_path / "artifact.bin")
    assert abs(loss - brotli["pr_val_loss"]) > 1e-5  # measured 2.7e-5 over 320 targets


def test_rope_bf16_frequencies_are_its_buffers_values():
    from pgolf.model.rope import Rotary
    plain, rounded = Rotary(64, 10000.0, 16), Rotary(64, 10000.0, 16, bf16_freqs=True)
    cos, _ = plain(3000, torch.device("cpu"), torch.float32)
    cos_r, _ = rounded(3000, torch.device("cpu"), torch.float32)
    inv = 1.0 / (10000.0 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16))
    expected = torch.outer(torch.arange(3000, dtype=torch.float32), inv.bfloat16().float()).cos()
    torch.testing.assert_close(cos_r[0, 0], expected, rtol=0, atol=1e-6)
    assert float((cos - cos_r).abs().max()) > 0.1  # half a radian off by position 2,560
    stretched = Rotary(64, 10000.0, 16, yarn=True, train_len=1024, bf16_freqs=True)
    assert torch.equal(stretched(3000, torch.device("cpu"), torch.float32)[0],
                       Rotary(64, 10000.0, 16, yarn=True, train_len=1024)(3000, torch.device("cpu"), torch.float32)[0])
