"""SentencePiece BPE with the challenge's trainer settings (docs/lineage.md#tokenizer-training)."""
from __future__ import annotations

import io
from collections.abc import Iterable, Iterator

import sentencepiece as spm

from pgolf.errors import InputError

# Exactly the fields the challenge's exporter sets; everything else stays SentencePiece's default
# (so documents over max_sentence_length=4192 bytes are skipped by the trainer, as there).
CHALLENGE_TRAINER_SETTINGS = {
    "model_type": "bpe",
    "character_coverage": 0.999,
    "byte_fallback": True,
    "split_digits": True,
    "normalization_rule_name": "nmt_nfkc",
    "add_dummy_prefix": False,
    "pad_id": 0,
    "bos_id": 1,
    "eos_id": 2,
    "unk_id": 3,
    "hard_vocab_limit": False,
}
BOS_ID = 1


def training_sentences(docs: Iterable[str], max_docs: int = 0) -> Iterator[str]:
    """The exporter's iterator: NUL -> space, strip, empty documents skipped, from document 0."""
    count = 0
    for text in docs:
        text = text.replace("\x00", " ").strip()
        if not text:
            continue
        yield text
        count += 1
        if max_docs and count >= max_docs:
            return


CHALLENGE_MAX_SENTENCE_LENGTH = 4192  # SentencePiece's default, which the challenge leaves in place


def train_bpe(sentences: Iterable[str], vocab_size: int, num_threads: int, seed: int,
              user_defined_symbols: list[str] | None = None,
              max_sentence_length: int = CHALLENGE_MAX_SENTENCE_LENGTH) -> bytes:
    """Train and return the serialized model; identical inputs and seed give identical bytes."""
    spm.set_random_generator_seed(seed)
    model = io.BytesIO()
    kwargs = dict(CHALLENGE_TRAINER_SETTINGS, vocab_size=vocab_size, num_threads=num_threads)
    if max_sentence_length != CHALLENGE_MAX_SENTENCE_LENGTH:
        kwargs["max_sentence_length"] = max_sentence_length
    if user_defined_symbols:
        kwargs["user_defined_symbols"] = user_defined_symbols
    counted = _Counting(sentences)
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(counted), model_writer=model, minloglevel=2, **kwargs)
    except RuntimeError as err:
        if counted.n == 0:
            raise InputError("no non-empty documents to train the tokenizer on") from err
        if "sentences_.empty()" in str(err):
            raise InputError(f"every one of the {counted.n} training documents is longer than "
                             f"{max_sentence_length} bytes, and SentencePiece skips those (as the challenge "
                             "does); raise tokenizer.max_sentence_length for a corpus of long documents") from err
        raise InputError(f"SentencePiece could not train on this corpus: {err}") from err
    return model.getvalue()


class _Counting:
    def __init__(self, items: Iterable[str]):
        self.items, self.n = items, 0

    def __iter__(self):
        for item in self.items:
            self.n += 1
            yield item
