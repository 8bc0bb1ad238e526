"""Shared tiny fixtures: generated text, a small SentencePiece model, shard folders, a model."""
from __future__ import annotations

import os
import random
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)
if not torch.cuda.is_available():
    # pgolf.kernels' Triton kernels run in Triton's interpreter on CPU tensors; it is chosen when a
    # kernel is defined, so before anything imports them.
    os.environ.setdefault("TRITON_INTERPRET", "1")

WORDS = ("the of and to in is was for on that with as by at from his her they this which were be "
         "are it an or had not but have their one all been has when there who more so out up into "
         "time year people way day man thing woman life child world school state family student "
         "group country problem hand part place case week company system program question work "
         "government number night point home water room mother area money story fact month lot "
         "right study book eye job word business issue side kind head house service friend father "
         "power hour game line end member law car city community name president team minute idea").split()


def make_docs(n: int, seed: int = 0, min_words: int = 20, max_words: int = 120) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words))]
        sentences, i = [], 0
        while i < len(words):
            k = rng.randint(5, 15)
            chunk = words[i:i + k]
            sentences.append(chunk[0].capitalize() + " " + " ".join(chunk[1:]) + rng.choice([".", "!", "?", ","]))
            i += k
        text = " ".join(sentences)
        if rng.random() < 0.2:
            text += " Café naïve résumé 42 ½ ﬁne İstanbul 日本 😀"
        docs.append(text)
    return docs


@pytest.fixture(scope="session")
def docs() -> list[str]:
    return make_docs(300)


@pytest.fixture(scope="session")
def sp_model_bytes(docs) -> bytes:
    from pgolf.tokenize.trainer import train_bpe, training_sentences

    return train_bpe(training_sentences(docs), vocab_size=400, num_threads=1, seed=1)


@pytest.fixture(scope="session")
def sp(sp_model_bytes):
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_proto=sp_model_bytes)


def write_corpus(folder: Path, docs: list[str]) -> Path:
    from pgolf.data.docs import DOCS_NAME, encode_doc

    folder.mkdir(parents=True, exist_ok=True)
    (folder / DOCS_NAME).write_bytes(b"".join(encode_doc(d) for d in docs))
    return folder


@pytest.fixture(scope="session")
def data_dirs(tmp_path_factory, docs):
    """corpus -> tokenizer -> shards through the real stages, once per session."""
    from tasks import shards as shards_stage, tokenizer as tok_stage
    from runner.stage import execute

    root = tmp_path_factory.mktemp("data")
    corpus = write_corpus(root / "corpus", docs)
    execute(tok_stage.SPEC, tok_stage.Config(vocab_size=400, num_threads=1), {"corpus": corpus}, root / "tokenizer")
    execute(shards_stage.SPEC, shards_stage.Config(val_docs=40, shard_tokens=4000, workers=1),
            {"corpus": corpus, "tokenizer": root / "tokenizer"}, root / "shards")
    return {"corpus": corpus, "tokenizer": root / "tokenizer", "shards": root / "shards", "root": root}


ROOT = Path(__file__).resolve().parents[1]


def stage_env(**extra: str) -> dict:
    """The environment of a stage run as a subprocess: this checkout's code, no PGOLF_ switches."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PGOLF_")}
    return {**env, "PYTHONPATH": str(ROOT), **extra}


def write_params(path: Path, **sections) -> Path:
    """A params file with these stages' configs, for a stage run as a subprocess."""
    import yaml

    path.write_text(yaml.safe_dump({name: asdict(cfg) for name, cfg in sections.items()}))
    return path


TINY_MODEL = dict(vocab_size=400, num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1)
