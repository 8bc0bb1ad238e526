"""Every bad input, one row each: what goes in, the error it must raise and the message it must show.

A row is (id, case, error, message regex). `case(ctx)` builds the bad input in its own temporary
folder and runs the code that must refuse it; shared, expensive inputs (a corpus, a tokenizer, shard
folders) come from the session's `data_dirs`. A new stage or source adds its rows here.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from pgolf.data.shards import HEADER_BYTES, verify_shards, write_shard
from pgolf.errors import ConfigError, FormatError, InputError, TrainingError
from pgolf.model.config import ModelConfig
from pgolf.typed_params import from_dict
from pgolf.train import loop as training_loop
from tasks import corpus as corpus_stage, evaluate as eval_stage, tokenizer as tok_stage, train as train_stage
from tasks import params as P, stages
from pgolf.json_files import write_json
from tasks.common import execute, load_config
from tests.conftest import TINY_MODEL, make_docs, write_corpus


@dataclass
class Ctx:
    tmp: Path
    data: dict


def render(*overrides):
    return lambda ctx: P.render("smoke", list(overrides))


def stage_reads(section: str, yaml_text: str):
    """A stage reading its section checks the same ranges as rendering does."""
    def case(ctx):
        (ctx.tmp / "params.yaml").write_text(yaml_text, encoding="utf-8")
        return load_config(stages.spec_of(section), ctx.tmp / "params.yaml")
    return case


def copied_shards(ctx) -> Path:
    folder = ctx.tmp / "shards"
    shutil.copytree(ctx.data["shards"], folder)
    return folder


def edited_shard(split: str):
    """One token changed in place: same size, same header, another sha256."""
    def case(ctx):
        folder = copied_shards(ctx)
        path = folder / split / f"fineweb_{split}_000000.bin"
        with open(path, "r+b") as f:
            f.seek(HEADER_BYTES + 2 * 5)
            token = f.read(2)
            f.seek(HEADER_BYTES + 2 * 5)
            f.write(bytes([token[0] ^ 1, token[1]]))
        if split == "val":  # through the eval stage: the shards are checked before anything is scored
            (ctx.tmp / "pack").mkdir()
            return execute(eval_stage.SPEC, eval_stage.Config(device="cpu"),
                           {"pack": ctx.tmp / "pack", "shards": folder, "tokenizer": ctx.data["tokenizer"]},
                           ctx.tmp / "eval")
        return execute(train_stage.SPEC, tiny_train(), {"shards": folder}, ctx.tmp / "train")
    return case


def replaced_shard(ctx):
    folder = copied_shards(ctx)
    write_shard(folder / "train/fineweb_train_000001.bin", np.ones(7, dtype=np.uint16))
    return verify_shards(folder, ("train",))


def truncated_shard(ctx):
    folder = copied_shards(ctx)
    path = folder / "val/fineweb_val_000000.bin"
    os.truncate(path, path.stat().st_size - 2)
    return verify_shards(folder, ("val",))


def unlisted_shard(ctx):
    folder = copied_shards(ctx)
    shutil.copy(folder / "train/fineweb_train_000000.bin", folder / "train/fineweb_train_000099.bin")
    return verify_shards(folder, ("train",))


def manifest_without_files(ctx):
    folder = copied_shards(ctx)
    write_json(folder / "manifest.json", {"vocab_size": 400, "bos_id": 1})
    return verify_shards(folder, ("val",))


def tiny_train(**kw) -> train_stage.Config:
    return train_stage.Config(**{**dict(model=ModelConfig(**TINY_MODEL), nproc=1, device="cpu", iterations=6,
                                        train_batch_tokens=512, train_seq_len=64, grad_accum_steps=1,
                                        max_wallclock_seconds=0, warmup_steps=0, compile=False, log_every=1), **kw})


def frozen_training(ctx):
    """Every learning rate zero: the loss sits at ln(vocab) and no value is non-finite. In process
    (the stage runs the same Trainer under torchrun), so the error itself is what the row sees."""
    cfg = tiny_train(learn_check_step=3, matrix_lr=0.0, scalar_lr=0.0, tied_embed_lr=0.0, embed_lr=0.0, head_lr=0.0)
    (ctx.tmp / "trainer").mkdir()
    return training_loop.Trainer(cfg, ctx.data["shards"], ctx.tmp / "trainer").train()


def tokenizer_vocab_beyond_corpus(ctx):
    corpus = write_corpus(ctx.tmp / "corpus", make_docs(10, seed=5, max_words=30))
    return execute(tok_stage.SPEC, tok_stage.Config(vocab_size=5000, num_threads=1), {"corpus": corpus},
                   ctx.tmp / "tok")


def adopted_as(variant: str, trained_as: str):
    def case(ctx):
        corpus = write_corpus(ctx.tmp / "corpus", make_docs(150, seed=3))
        trained = execute(tok_stage.SPEC, tok_stage.Config(variant=trained_as, vocab_size=360, num_threads=1),
                          {"corpus": corpus}, ctx.tmp / "trained")
        cfg = tok_stage.Config(variant=variant, vocab_size=trained["vocab_size"], num_threads=1,
                               adopt=str(ctx.tmp / "trained" / "tokenizer.model"))
        return execute(tok_stage.SPEC, cfg, {"corpus": corpus}, ctx.tmp / "adopted")
    return case


def txt_source(content: bytes):
    def case(ctx):
        (ctx.tmp / "doc.txt").write_bytes(content)
        return execute(corpus_stage.SPEC, corpus_stage.Config(source=str(ctx.tmp / "doc.txt")), {},
                       ctx.tmp / "corpus_out")
    return case


def non_finite_metric(ctx):
    return write_json(ctx.tmp / "metrics.json", {"val_loss": 2.5, "val_bpb": float("nan")})


CASES = [
    # params: every numeric field in range, at render time and when a stage reads its section
    ("iterations-negative", render("train.iterations=-5"), ConfigError, r"train: iterations -5 must be >= 1"),
    ("lr-negative", render("train.matrix_lr=-0.01"), ConfigError, r"train: matrix_lr -0.01 must be >= 0"),
    ("beta-above-one", render("train.beta2=1.5"), ConfigError, r"beta2 1.5 must be >= 0 and < 1"),
    ("eps-zero", render("train.adam_eps=0"), ConfigError, r"adam_eps 0.0 must be > 0"),
    ("lr-nan", render("train.embed_lr=.nan"), ConfigError, r"embed_lr nan must be a finite number"),
    ("fraction-above-one", render("train.late_qat_threshold=1.5"), ConfigError,
     r"late_qat_threshold 1.5 must be >= 0 and <= 1"),
    ("learn-margin-negative", render("train.learn_margin=-1"), ConfigError, r"learn_margin -1.0 must be >= 0"),
    ("model-heads-zero", render("train.model.num_heads=0"), ConfigError, r"train.model: num_heads 0 must be >= 1"),
    ("model-bos-outside-vocab", render("train.model.bos_id=5000"), ConfigError,
     r"bos_id 5000 must be >= 0 and < 1024"),
    ("ttt-lr-negative", render("eval.lora.lr=-1"), ConfigError, r"eval.lora: lr -1.0 must be >= 0"),
    ("sgd-momentum-one", render("eval.sgd.momentum=1"), ConfigError, r"eval.sgd: momentum 1.0 must be >= 0 and < 1"),
    ("eval-budget-negative", render("eval.budget_s=-1"), ConfigError, r"eval: budget_s -1.0 must be >= 0"),
    ("gptq-damp-zero", render("gptq.damp=0"), ConfigError, r"gptq: damp 0.0 must be > 0 and < 1"),
    ("gptq-clip-zero", render("gptq.clip_sigmas=0"), ConfigError, r"clip_sigmas 0.0 must be > 0"),
    ("shards-workers-negative", render("shards.workers=-1"), ConfigError, r"shards: workers -1 must be >= 0"),
    ("tokenizer-vocab-too-small", render("tokenizer.vocab_size=100", "train.model.vocab_size=100"), ConfigError,
     r"tokenizer: vocab_size 100 must be > 260 and <= 65536"),
    ("corpus-max-docs-negative", render("corpus.max_docs=-1"), ConfigError, r"corpus: max_docs -1 must be >= 0"),
    ("pack-level-out-of-range", render("pack.level=12"), ConfigError, r"pack: level 12 must be >= -1 and <= 11"),
    ("pack-cap-above-challenge", render("pack.cap_bytes=99000000"), ConfigError,
     r"cap_bytes 99,000,000 is above the challenge's 16,000,000-byte cap; set pack.non_record: true"),
    ("stage-reads-bad-params", stage_reads("train", "train: {iterations: 0}\n"), ConfigError,
     r"params.yaml: train: iterations 0 must be >= 1"),
    # strict JSON outputs
    ("metric-nan", non_finite_metric, FormatError,
     r"metrics.json: refusing to write val_bpb = NaN or Infinity, which strict JSON cannot hold"),
    # shards: checked against manifest.json where they are read
    ("val-shard-edited", edited_shard("val"), FormatError,
     r"fineweb_val_000000.bin: sha256 [0-9a-f]{16}\.\.\. differs from manifest.json's"),
    ("train-shard-edited", edited_shard("train"), FormatError,
     r"fineweb_train_000000.bin: sha256 [0-9a-f]{16}\.\.\. differs from manifest.json's"),
    ("shard-replaced", replaced_shard, FormatError,
     r"fineweb_train_000001.bin: holds 7 tokens but manifest.json lists \d+"),
    ("shard-truncated", truncated_shard, FormatError, r"fineweb_val_000000.bin: size \d+ bytes does not match"),
    ("shard-not-in-manifest", unlisted_shard, FormatError,
     r"fineweb_train_000099.bin: train/fineweb_train_000099.bin is not listed in manifest.json"),
    ("manifest-without-files", manifest_without_files, FormatError, r"manifest.json: lists no shard files"),
    # training that does not learn
    ("training-frozen", frozen_training, TrainingError,
     r"train loss \d\.\d{4} at step 3 is still within learn_margin=0.05 of ln\(vocab_size\) = 5.9915"),
    # tokenizer
    ("tokenizer-vocab-beyond-corpus", tokenizer_vocab_beyond_corpus, InputError,
     r"corpus/docs.jsonl: SentencePiece reached only \d+ pieces on this corpus, not tokenizer.vocab_size 5,000"),
    ("adopt-plain-as-casefold", adopted_as("casefold", "plain"), FormatError,
     r"trained/tokenizer.model: not a casefold tokenizer: \d+ pieces hold uppercase letters"),
    ("adopt-casefold-as-plain", adopted_as("plain", "casefold"), FormatError,
     r"not a plain tokenizer: no piece holds an uppercase letter"),
    # corpus sources
    ("txt-with-nul", txt_source(b"first line\r\nsecond\x00line\n"), FormatError,
     r"doc.txt: line 2: control character U\+0000"),
    ("txt-with-escape", txt_source(b"one\ntwo\nthree \x1b[31m red\n"), FormatError,
     r"doc.txt: line 3: control character U\+001B"),
]


@pytest.mark.parametrize("case,error,message", [pytest.param(*row[1:], id=row[0]) for row in CASES])
def test_bad_input_is_refused_with_a_clear_message(case, error, message, data_dirs, tmp_path):
    with pytest.raises(error, match=message):
        case(Ctx(tmp_path, data_dirs))
    # a refused stage leaves no output behind
    assert not any((tmp_path / name).exists() for name in ("eval", "train", "tok", "adopted", "corpus_out"))


def test_every_row_has_its_own_id():
    ids = [row[0] for row in CASES]
    assert len(ids) == len(set(ids))


def numeric_fields(cls, prefix=""):
    """(dotted name, type) of every int and float field of a config, nested settings included."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            yield from numeric_fields(hint, f"{prefix}{f.name}.")
        elif hint in (int, float):
            yield f"{prefix}{f.name}", hint


def nested(dotted: str, value) -> dict:
    *parents, leaf = dotted.split(".")
    data = {leaf: value}
    for parent in reversed(parents):
        data = {parent: data}
    return data


@pytest.mark.parametrize("stage", stages.STAGES)
def test_every_numeric_field_has_its_range_checked(stage):
    """A new numeric field joins the checks: far out of range (a huge negative int, a NaN float) it
    must be refused with a message that names it."""
    cls = stages.spec_of(stage).config_cls
    for dotted, hint in numeric_fields(cls):
        value = float("nan") if hint is float else -10**9
        with pytest.raises(ConfigError, match=dotted.rsplit(".", 1)[-1]):
            from_dict(cls, nested(dotted, value), stage)
