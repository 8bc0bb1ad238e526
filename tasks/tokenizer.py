"""Stage tokenizer: SentencePiece BPE with the challenge's settings, plain or casefold."""
from __future__ import annotations

import hashlib
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import sentencepiece as spm

from pgolf.data.docs import iter_docs
from pgolf.errors import InputError
from pgolf.tokenize.variants import VARIANTS
from pgolf.tokenize.trainer import (BOS_ID, CHALLENGE_MAX_SENTENCE_LENGTH, CHALLENGE_TRAINER_SETTINGS, train_bpe,
                                    training_sentences)
from tasks.common import StageSpec, stage_main, write_json


@dataclass
class Config:
    variant: Literal["plain", "casefold", "caseops"] = "plain"
    vocab_size: int = 1024
    train_docs: int = 0  # documents fed to the trainer, from document 0 (val included, as the challenge does); 0: all
    num_threads: int = 2
    seed: int = 1337
    # Documents longer than this many bytes are skipped by the trainer (SentencePiece's default,
    # kept by the challenge); raise it for corpora of long documents.
    max_sentence_length: int = CHALLENGE_MAX_SENTENCE_LENGTH

    def validate(self) -> None:
        # 4 specials + 256 byte-fallback pieces come first; shards store ids as uint16.
        if not 260 < self.vocab_size <= 65536:
            raise ValueError(f"vocab_size {self.vocab_size} must be in (260, 65536]")


def run(cfg: Config, inputs: dict[str, Path], out: Path) -> dict:
    variant = VARIANTS[cfg.variant]
    docs = iter_docs(inputs["corpus"])
    if variant.transform:
        docs = (variant.transform(d) for d in docs)
    try:
        model = train_bpe(training_sentences(docs, cfg.train_docs), cfg.vocab_size, cfg.num_threads, cfg.seed,
                          variant.user_defined_symbols, cfg.max_sentence_length)
    except InputError as err:
        raise InputError(str(err), Path(inputs["corpus"]) / "docs.jsonl") from err
    (out / "tokenizer.model").write_bytes(model)
    sp = spm.SentencePieceProcessor(model_proto=model)
    with open(out / "tokenizer.vocab", "w", encoding="utf-8") as f:
        for i in range(sp.vocab_size()):
            f.write(f"{sp.id_to_piece(i)}\t{sp.get_score(i):g}\n")
    meta = {
        "variant": cfg.variant,
        "vocab_size": sp.vocab_size(),
        "bos_id": BOS_ID,
        "sha256": hashlib.sha256(model).hexdigest(),
        "trainer": {**CHALLENGE_TRAINER_SETTINGS, **asdict(cfg)},
    }
    write_json(out / "tokenizer.json", meta)
    return {"vocab_size": sp.vocab_size(), "variant": cfg.variant}


SPEC = StageSpec(name="tokenizer", config_cls=Config, run=run, out="artifacts/tokenizer",
                 inputs={"corpus": "data/corpus"}, producers={"corpus": "corpus"})

if __name__ == "__main__":
    sys.exit(stage_main(SPEC))
