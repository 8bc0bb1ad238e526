"""A judge rescores an artifact PR #2135's own code wrote with pgolf's code and gets its number.

tests/golden/pr2135_tiny/ holds a tiny pr2135 model's final_model.int6.ptz as PR #2135's serialize()
code wrote it (bench/pr2135_parity.py --write-fixture; its script is not in this repository): its
pergroup frame (PGRP version 2, through the same zlib stand-in for lrzip as tests/test_r1_artifact.py)
and its byte-shuffled brotli, eval tokens with their byte counts, and its eval_val of it. The
model's AsymLogit caps are set apart (6.5 and 9.0) before quantizing, so a reader that drops or swaps
the pair scores another number.
"""
from __future__ import annotations

import json
import shutil
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
from tests.test_r1_artifact import user_bin  # noqa: F401 (a fake python bin with the lrzip stand-in)
from tests.userenv import VENV, copy_checkout, shell

FIXTURE = Path(__file__).parent / "golden" / "pr2135_tiny"
EXPECTED = json.loads((FIXTURE / "pr_eval.json").read_text())
README_IMPORT = [
    ".venv/bin/pgolf import-r1 final_model.int6.ptz --preset pr2135",
    ".venv/bin/pgolf params --preset pr2135 --set eval.ttt=off --set eval.tilt.order=0 --set eval.join_windows=true",
    ".venv/bin/python -m tasks.evaluate --pack artifacts/imported/final_model --out artifacts/imported/final_model/eval",
]


def tiny_config() -> dict:
    return presets.render("pr2135", EXPECTED["overrides"])["train"]["model"]


def score(artifact: Path) -> tuple[float, float]:
    tokens = np.fromfile(FIXTURE / "val_tokens.u16", dtype="<u2").astype(np.int64)
    byte_counts = np.fromfile(FIXTURE / "val_bytes.u16", dtype="<u2").astype(np.int64)
    model = model_from_artifact(artifact, torch.device("cpu"))
    cut_documents_every(model, EXPECTED["seq_len"])
    result = evaluate_bpb(model, tokens, byte_counts, EXPECTED["seq_len"], 0, EXPECTED["batch_seqs"],
                          torch.device("cpu"), join_windows=True)
    return result.val_loss, result.val_bpb


def judges_checkout(tmp_path: Path, docs) -> Path:
    """A copy of this checkout whose pr2135 preset is the fixture's model and eval settings, with the
    fixture's tokens as the published val shard, adopted."""
    from pgolf.data.shards import write_shard
    from tasks import shards as shards_stage, tokenizer as tok_stage
    from runner.stage import execute
    from tests.conftest import write_corpus

    repo = copy_checkout(tmp_path / "judge")
    preset = presets.render("pr2135", EXPECTED["overrides"] + [
        f"eval.seq_len={EXPECTED['seq_len']}", f"eval.batch_seqs={EXPECTED['batch_seqs']}", "eval.device=cpu",
        "eval.compile=false"])
    (repo / "presets" / "pr2135.yaml").write_text(yaml.safe_dump(preset, sort_keys=False))
    published = tmp_path / "published"
    published.mkdir()
    tokens = np.fromfile(FIXTURE / "val_tokens.u16", dtype="<u2")
    write_shard(published / "fineweb_val_000000.bin", tokens)
    write_shard(published / "fineweb_val_bytes_000000.bin", np.fromfile(FIXTURE / "val_bytes.u16", dtype="<u2"))
    # The eval reads no training shard; a folder's train may not repeat its val (the shards
    # certificate refuses that leak), so one short document of its own stands in.
    write_shard(published / "fineweb_train_000000.bin", np.array([1, 5, 6, 7], dtype="<u2"))
    corpus = write_corpus(tmp_path / "corpus", [d.encode("ascii", "ignore").decode() for d in docs])
    execute(tok_stage.SPEC, tok_stage.Config(vocab_size=preset["train"]["model"]["vocab_size"], num_threads=1),
            {"corpus": corpus}, repo / "artifacts" / "tokenizer")
    execute(shards_stage.SPEC, shards_stage.Config(adopt=str(published)),
            {"corpus": corpus, "tokenizer": repo / "artifacts" / "tokenizer"}, repo / "artifacts" / "shards")
    return repo


@pytest.mark.parametrize("form", ["brotli", "pergroup"])
def test_the_readme_import_scores_pr2135s_own_eval(form, tmp_path, user_bin, docs):  # noqa: F811
    if not (VENV / "bin" / "pgolf").is_file():
        pytest.skip("needs the project's .venv (make install)")
    expected = EXPECTED["forms"][form]
    repo = judges_checkout(tmp_path, docs)
    shutil.copy(FIXTURE / expected["file"], repo / "final_model.int6.ptz")
    for command in README_IMPORT:
        shell(command, repo, user_bin)
    record = json.loads((repo / "artifacts/imported/final_model/import.json").read_text())
    assert record["source_format"] == ("r1-pergroup2" if form == "pergroup" else "r1-brotli")
    assert set(record["tensors"]) == {"gptq", "passthrough"}  # its sparse gates stay fp16 (no int8 rows)
    metrics = json.loads((repo / "artifacts/imported/final_model/eval/metrics.json").read_text())
    assert metrics["byte_source"] == "sidecar" and metrics["tokens"] == len(np.fromfile(FIXTURE / "val_tokens.u16", "<u2")) - 1
    # measured 2e-9 (its bf16 RoPE frequencies alone move the loss 2.7e-5: the next test)
    assert abs(metrics["val_bpb"] - expected["pr_val_bpb"]) < 1e-6
    assert abs(metrics["val_loss"] - expected["pr_val_loss"]) < 2e-6
    assert score(repo / "artifacts/imported/final_model/artifact.bin") == (metrics["val_loss"], metrics["val_bpb"])


def test_both_containers_hold_the_same_tensors_asymlogit_pair_included(user_bin, monkeypatch):  # noqa: F811
    monkeypatch.setenv("PATH", f"{user_bin}:{shutil.os.environ['PATH']}")
    flat, flat_kinds, flat_form = read_r1_artifact(FIXTURE / EXPECTED["forms"]["brotli"]["file"], num_layers=1)
    grouped, grouped_kinds, form = read_r1_artifact(FIXTURE / EXPECTED["forms"]["pergroup"]["file"], num_layers=1)
    assert (form, flat_form) == ("pergroup2", "brotli") and flat_kinds == grouped_kinds and sorted(flat) == sorted(grouped)
    assert all(torch.equal(flat[name], grouped[name]) for name in flat)  # permutations and transposes undone
    assert flat_kinds["softcap_pos"] == flat_kinds["softcap_neg"] == "passthrough (float16)"
    qm, _ = load_r1_artifact(FIXTURE / EXPECTED["forms"]["brotli"]["file"], tiny_config())
    weights = qm.dequantize()
    assert (float(weights["softcap.pos"]), float(weights["softcap.neg"])) == (6.5, 9.0)


def test_a_swapped_pair_scores_another_number(tmp_path):
    """The fixture's number depends on the pair: read with the caps swapped, the eval disagrees."""
    from pgolf.pack.serialize import pack
    qm, _ = load_r1_artifact(FIXTURE / EXPECTED["forms"]["brotli"]["file"], tiny_config())
    qm.tensors["softcap.pos"], qm.tensors["softcap.neg"] = qm.tensors["softcap.neg"], qm.tensors["softcap.pos"]
    (tmp_path / "artifact.bin").write_bytes(pack(qm, "zlib")[0])
    _, bpb = score(tmp_path / "artifact.bin")
    assert abs(bpb - EXPECTED["forms"]["brotli"]["pr_val_bpb"]) > 1e-3


def test_a_damaged_frame_names_the_file(tmp_path):
    bad = tmp_path / "final_model.int6.ptz"
    grouped = (FIXTURE / EXPECTED["forms"]["pergroup"]["file"]).read_bytes()
    for damaged in (grouped[:-100], grouped[:40], grouped + b"x"):
        bad.write_bytes(damaged)
        with pytest.raises(FormatError, match="final_model.int6.ptz"):
            load_r1_artifact(bad, tiny_config())


def test_its_bf16_rope_frequencies_matter_on_its_artifact(tmp_path):
    """PR #2135 builds its models as GPT(h).bfloat16() with only the parameters back in fp32, so RoPE's
    inverse frequencies are bf16-rounded (train.model.rope_bf16_freqs): read with fp32 frequencies,
    its own artifact scores another number."""
    from pgolf.pack.serialize import pack
    config = presets.render("pr2135", EXPECTED["overrides"] + ["train.model.rope_bf16_freqs=false"])["train"]["model"]
    qm, _ = load_r1_artifact(FIXTURE / EXPECTED["forms"]["brotli"]["file"], config)
    (tmp_path / "artifact.bin").write_bytes(pack(qm, "zlib")[0])
    loss, bpb = score(tmp_path / "artifact.bin")
    assert abs(loss - EXPECTED["forms"]["brotli"]["pr_val_loss"]) > 1e-5  # measured 2.7e-5 over 320 targets


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
