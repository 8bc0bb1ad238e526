"""The tokenizer stage's settings (params.yaml's `tokenizer` section), importable without torch."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pgolf.tokenize.trainer import CHALLENGE_MAX_SENTENCE_LENGTH
from pgolf.typed_params import check_range


@dataclass
class TokenizerConfig:
    variant: Literal["plain", "casefold", "caseops"] = "plain"
    vocab_size: int = 1024
    train_docs: int = 0  # documents fed to the trainer, from document 0 (val included, as the challenge does); 0: all
    num_threads: int = 2
    seed: int = 1337
    # Documents longer than this many bytes are skipped by the trainer (SentencePiece's default,
    # kept by the challenge); raise it for corpora of long documents.
    max_sentence_length: int = CHALLENGE_MAX_SENTENCE_LENGTH
    # A published .model (e.g. the challenge's fineweb_1024_bpe.model) to validate against variant and
    # vocab_size and use instead of training one.
    adopt: str = ""

    def validate(self) -> None:
        # 4 specials + 256 byte-fallback pieces come first; shards store ids as uint16.
        check_range(self, "vocab_size", gt=260, le=65536)
        check_range(self, "train_docs seed", ge=0)
        check_range(self, "num_threads max_sentence_length", ge=1)
