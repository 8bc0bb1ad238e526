"""Every bad input, one row each: what goes in, the error it must raise and the message it must show.

A row is (id, case, error, message regex). `case(ctx)` builds the bad input in its own temporary
folder and runs the code that must refuse it; shared, expensive inputs (a corpus, a tokenizer, shard
folders) come from the session's `data_dirs`. A new stage or source adds its rows here.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
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
from runner import params as P
from tasks import stages
from pgolf.json_files import write_json
from runner.stage import execute, load_config
from tests.conftest import ROOT, TINY_MODEL, make_docs, stage_env, write_corpus, write_params


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


def corpus_from(make_source):
    """The corpus stage on a source `make_source(tmp)` builds."""
    def case(ctx):
        source = make_source(ctx.tmp)
        return execute(corpus_stage.SPEC, corpus_stage.Config(source=str(source)), {}, ctx.tmp / "corpus_out")
    return case


def parquet_with_null(tmp):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["first document", None, "third document"]}), tmp / "docs.parquet")
    return tmp / "docs.parquet"


def jsonl_with_lone_surrogate(tmp):
    (tmp / "docs.jsonl").write_text('{"text": "fine"}\n{"text": "half a pair \\ud800 here"}\n', encoding="utf-8")
    return tmp / "docs.jsonl"


def folder_with_looping_link(tmp):
    folder = tmp / "src"
    folder.mkdir()
    (folder / "a.jsonl").write_text('{"text": "a document"}\n')
    (folder / "loop.jsonl").symlink_to("loop.jsonl")
    return folder


def folder_with_folder_link(tmp):
    folder = tmp / "src"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.jsonl").write_text('{"text": "a document"}\n')
    (folder / "sub" / "up").symlink_to("..")
    return folder


def over_a_users_folder(ctx):
    """A stage's --out naming a folder of the user's: refused, the folder as it was."""
    mine = ctx.tmp / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes")
    (ctx.tmp / "doc.txt").write_text("one document\n")
    try:
        return execute(corpus_stage.SPEC, corpus_stage.Config(source=str(ctx.tmp / "doc.txt")), {}, mine)
    finally:
        assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]


def export_over(make_folder):
    """flows.export into a folder it did not write: refused, the folder as it was."""
    def case(ctx):
        from pgolf.pack.codesize import wrapped_size
        from flows import export
        from tasks.pack import submission_script

        art = ctx.tmp / "art"
        for stage in ("eval", "pack", "train"):
            (art / stage).mkdir(parents=True)
        write_json(art / "eval" / "metrics.json", {"val_bpb": 1.5, "val_loss": 2.5, "mode": "flat", "seq_len": 64,
                                                   "tokens": 10, "bytes": 20})
        # the count the run's pack stage made of the script this export writes (tasks.pack.submission_script)
        code = wrapped_size(submission_script(P.render("smoke", [])))
        write_json(art / "pack" / "size.json", {"total_bytes": 1000 + code, "model_bytes": 1000, "code_bytes": code,
                                                "cap_bytes": 16_000_000, "margin_bytes": 15_999_000 - code})
        write_json(art / "train" / "metrics.json", {"steps": 5, "ms_per_step": 1.0})
        out = make_folder(ctx.tmp)
        before = sorted(p.name for p in out.iterdir())
        try:
            return export.export(out, P.render("smoke", []), "run", "a", "a", art)
        finally:
            assert sorted(p.name for p in out.iterdir()) == before
    return case


def users_folder(tmp):
    (tmp / "home" / ".ssh").mkdir(parents=True)
    (tmp / "home" / "thesis.tex").write_text("years of work")
    return tmp / "home"


def hand_written_records(tmp):
    """Only the export's file names, but a README pgolf did not write."""
    (tmp / "rec").mkdir()
    (tmp / "rec" / "README.md").write_text("# my own write-up\n")
    (tmp / "rec" / "submission.json").write_text("{}")
    return tmp / "rec"


class PlantedCode:
    """A pickle that runs a command when loaded (what a file planted in the resume folder would do)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def planted_resume_point(ctx):
    import pickle

    cfg = tiny_train(resume_every=3, resume_dir=str(ctx.tmp / "resume"))
    (ctx.tmp / "trainer").mkdir()
    trainer = training_loop.Trainer(cfg, ctx.data["shards"], ctx.tmp / "trainer")
    folder = trainer.resume_folder()
    folder.mkdir(parents=True)
    (folder / "latest.json").write_text('{"step": 3, "world_size": 1}')
    marker = ctx.tmp / "code-ran"
    (folder / "rank000.pt").write_bytes(pickle.dumps({"model": PlantedCode(marker)}))
    try:
        return trainer.train()
    finally:
        assert not marker.exists(), "the planted pickle ran"


def artifact_with_junk(ctx):
    import torch

    from pgolf.pack.serialize import load_artifact, pack
    from pgolf.quant.quantized_model import QuantizedModel

    qm = QuantizedModel({"vocab_size": 8}, {"w.q": torch.ones(4, 4, dtype=torch.int8)},
                        {"w": {"shape": [4, 4], "dtype": "float32", "kind": "passthrough"}})
    blob, _ = pack(qm, "zlib")
    (ctx.tmp / "artifact.bin").write_bytes(blob + b"appended after the last stream")
    return load_artifact(ctx.tmp / "artifact.bin")


LAUGHS = "train:\n  model:\n    ve_layers: &a [1, 1, 1, 1, 1, 1, 1, 1, 1]\n" + "".join(
    f"    xsa_{i}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
    f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n" for i in range(9))


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
    # params files that YAML accepts but mean something else, or nothing
    ("params-key-twice", stage_reads("tokenizer", "tokenizer:\n  vocab_size: 512\n  vocab_size: 400\n"), ConfigError,
     r"params.yaml: not valid YAML: .*the key 'vocab_size' appears twice in one mapping"),
    ("params-section-misspelt", stage_reads("tokenizer", "tokenzier:\n  vocab_size: 512\n"), ConfigError,
     r"params.yaml: unknown section\(s\) 'tokenzier'; sections are corpus, tokenizer"),
    ("params-billion-laughs", stage_reads("train", LAUGHS), ConfigError,
     r"params.yaml: not valid YAML: an alias \(\*'a'\) is not allowed in a params file"),
    ("iterations-1e30", render("train.iterations=1e30"), ConfigError,
     r"train.iterations: 1000000000000000019884624838656 is out of range: integers must be within"),
    ("iterations-10-to-the-30", stage_reads("train", f"train: {{iterations: {10**30}}}\n"), ConfigError,
     r"train.iterations: 1000000000000000000000000000000 is out of range"),
    ("iterations-past-any-run", render("train.iterations=1000000000000"), ConfigError,
     r"iterations 1000000000000 must be <= 10,000,000"),
    ("integer-of-a-million-digits", stage_reads("train", f"train: {{seed: 1{'0' * 100_000}}}\n"), ConfigError,
     r"^\S*params.yaml: train.seed: an integer of about 100,001 digits is out of range.{0,80}$"),
    ("preset-outside-presets", lambda ctx: P.render("../../tmp/evil"), ConfigError,
     r"preset '../../tmp/evil': a preset is a name of presets/"),
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
    ("parquet-null-text", corpus_from(parquet_with_null), FormatError,
     r"docs.parquet: row 1: column 'text' is null; drop or fill such rows first"),
    ("jsonl-lone-surrogate", corpus_from(jsonl_with_lone_surrogate), FormatError,
     r"docs.jsonl: line 2: character 12 is a lone surrogate U\+D800"),
    ("corpus-looping-link", corpus_from(folder_with_looping_link), InputError,
     r"loop.jsonl: a link that (loops back on itself|leads nowhere or loops)"),
    ("corpus-folder-link", corpus_from(folder_with_folder_link), InputError,
     r"sub/up: a link to a folder inside the corpus folder, which is not followed"),
    # outputs: nothing is removed that pgolf did not write
    ("stage-out-a-users-folder", over_a_users_folder, InputError,
     r"mine: refusing to replace this folder: it is not empty and the 'corpus' stage did not write it"),
    ("export-over-a-users-folder", export_over(users_folder), InputError,
     r"home: refusing to replace this folder: it holds files export did not write \(\.ssh, thesis.tex\)"),
    ("export-over-hand-written-records", export_over(hand_written_records), InputError,
     r"rec: refusing to replace this folder: it holds a README.md that export did not write"),
    # loaders: state, never code; every byte accounted for
    ("resume-point-planted-pickle", planted_resume_point, FormatError,
     r"rank000.pt: not a pgolf resume point \(UnpicklingError"),
    ("artifact-junk-appended", artifact_with_junk, FormatError,
     r"artifact.bin: 30 bytes follow the last stream"),
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


# ---- the same promises where a stage runs as DVC runs it: a process, its exit code and stderr ----

@dataclass
class Run:
    """A stage as a subprocess: its argv, extra environment, and what to do while it runs."""
    argv: list[str]
    env: dict
    preexec: object = None
    stop_when: object = None  # poll(ctx) -> True: send SIGTERM then


def cli(stage: str, params: Path, out: Path, **inputs: Path) -> list[str]:
    import sys

    return [sys.executable, "-m", stages.spec_of(stage).module, "--params", str(params), "--out", str(out),
            *[arg for name, path in inputs.items() for arg in (f"--{name}", str(path))]]


def without_file_access_override() -> list[str]:
    """Root reads any file whatever its mode; without these capabilities it obeys chmod as users do."""
    if os.geteuid() != 0:
        return []
    if not shutil.which("setpriv"):
        pytest.skip("running as root without setpriv: cannot make a file unreadable")
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]


def unreadable_corpus(ctx) -> Run:
    source = ctx.tmp / "docs.jsonl"
    source.write_text('{"text": "a document"}\n')
    source.chmod(0)
    params = write_params(ctx.tmp / "params.yaml", corpus=corpus_stage.Config(source=str(source)))
    return Run(without_file_access_override() + cli("corpus", params, ctx.tmp / "corpus_out"), {})


def tiny_gptq_output(ctx) -> Path:
    import torch

    from pgolf.model.gpt import GPT
    from pgolf.model.io import save_model
    from tasks import gptq as gptq_stage

    torch.manual_seed(0)
    model = GPT(ModelConfig(**TINY_MODEL))
    (ctx.tmp / "train").mkdir()
    save_model(model, model.cfg, ctx.tmp / "train")
    execute(gptq_stage.SPEC, gptq_stage.Config(calib_batches=1, calib_seq_len=32, calib_batch_seqs=2, device="cpu"),
            {"train": ctx.tmp / "train", "shards": ctx.data["shards"]}, ctx.tmp / "gptq")
    return ctx.tmp / "gptq"


def disk_full_while_pack_writes(ctx) -> Run:
    """The pack stage writes over its earlier output and the disk fills: a file size limit stands in
    for the full disk (the same failed write(), EFBIG for ENOSPC), on any machine and any user."""
    import resource
    import signal

    from tasks import evaluate, gptq, pack as pack_stage, train

    # pack counts the exported script, which carries train, gptq, pack and eval (tasks.pack.submission_script)
    params = write_params(ctx.tmp / "params.yaml", train=train.Config(), gptq=gptq.Config(),
                          pack=pack_stage.Config(compressor="zlib"), eval=evaluate.Config())
    argv = cli("pack", params, ctx.tmp / "pack", gptq=tiny_gptq_output(ctx))
    subprocess.run(argv, check=True, capture_output=True, env=stage_env())  # the output to keep
    ctx.data = {**ctx.data, "kept": (ctx.tmp / "pack" / "artifact.bin").read_bytes()}

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write, not a killed process
        resource.setrlimit(resource.RLIMIT_FSIZE, (2048, 2048))
    return Run(argv, {}, preexec=limit_file_size)


def train_stopped(nproc: int):
    """SIGTERM (DVC, Prefect, a scheduler) while training: with nproc 2 it reaches torchrun's workers too."""
    def case(ctx) -> Run:
        cfg = tiny_train(iterations=1_000_000, nproc=nproc, train_batch_tokens=512 * nproc, log_every=1000)
        params = write_params(ctx.tmp / "params.yaml", train=cfg)
        out = ctx.tmp / "train_out"

        def training(ctx) -> bool:
            return any(ctx.tmp.glob(".train_out.tmp-*")) and time.time() > ctx.data.setdefault("t0", time.time()) + 3
        return Run(cli("train", params, out, shards=ctx.data["shards"]), {}, stop_when=training)
    return case


# id, case, exit code, the whole of stderr (one line, naming the file)
CLI_CASES = [
    ("unreadable-input", unreadable_corpus, 2, r"pgolf corpus: error: \S*docs.jsonl: Permission denied\n"),
    ("disk-full-while-pack-writes", disk_full_while_pack_writes, 2,
     r"pgolf pack: error: \S*/pack: File too large while writing this output \(its earlier version is kept\)\n"),
    ("sigterm-while-training", train_stopped(1), 143, r"(.*\n)*pgolf train: stopped by SIGTERM; its output is unchanged\n"),
    ("sigterm-while-training-on-two-ranks", train_stopped(2), 143,
     r"(.*\n)*pgolf train: stopped by SIGTERM; its output is unchanged\n"),
]


@pytest.mark.parametrize("case,code,stderr", [pytest.param(*row[1:], id=row[0]) for row in CLI_CASES])
def test_a_stage_process_refuses_or_stops_cleanly(case, code, stderr, data_dirs, tmp_path):
    """One line naming the file, the exit code, no temporary output left, the earlier output kept,
    and nothing left in TMPDIR (torchrun's and Dask's folders included)."""
    import signal

    ctx = Ctx(tmp_path, dict(data_dirs))
    scratch = tmp_path / "tmpdir"
    scratch.mkdir()
    spec = case(ctx)
    proc = subprocess.Popen(spec.argv, env=stage_env(TMPDIR=str(scratch), **spec.env), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=spec.preexec)
    if spec.stop_when is not None:
        deadline = time.time() + 300
        while not spec.stop_when(ctx):
            assert proc.poll() is None and time.time() < deadline, proc.communicate()
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == code, err
    assert re.fullmatch(stderr, err), err
    assert "Traceback" not in err
    assert not [p.name for p in tmp_path.rglob(".*.tmp-*")], "a temporary output was left"
    assert list(scratch.iterdir()) == [], "left in TMPDIR"
    if "kept" in ctx.data:
        assert (tmp_path / "pack" / "artifact.bin").read_bytes() == ctx.data["kept"]


def test_killing_a_stage_kills_its_ranks(data_dirs, tmp_path):
    """kill -9 of a training stage's process group (a crashed Prefect worker, a killed flow run):
    torchrun starts each rank in a session of its own, outside that group, so without
    pgolf.dist.die_with_launcher they trained on with the CPU or GPU that the rerun needs."""
    import signal

    ctx = Ctx(tmp_path, dict(data_dirs))
    spec = train_stopped(2)(ctx)
    proc = subprocess.Popen(spec.argv, env=stage_env(), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    ranks: list[int] = []
    try:
        deadline = time.time() + 300
        while not spec.stop_when(ctx) or len(ranks := rank_pids_under(proc.pid)) < 2:
            assert proc.poll() is None and time.time() < deadline, "the stage did not start training"
            time.sleep(0.2)
        assert {os.getsid(pid) for pid in ranks}.isdisjoint({proc.pid}), "ranks share the stage's session"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.time() + 30
        while alive := [pid for pid in ranks if is_running(pid)]:
            assert time.time() < deadline, f"ranks {alive} outlived their killed stage"
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        for pid in ranks:
            if is_running(pid):
                os.kill(pid, signal.SIGKILL)


def rank_pids_under(root: int) -> list[int]:
    """The ranks among root's descendants: `--worker` processes other than the torchrun agent."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            pid, rest = stat.read_text().split(" ", 1)
        except OSError:
            continue
        children.setdefault(int(rest.rsplit(")", 1)[1].split()[1]), []).append(int(pid))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            todo.append(child)
            try:
                argv = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
                if b"--worker" in argv and b"pgolf.agent" not in argv:
                    found.append(child)
            except OSError:
                pass
    return found


def is_running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")
