"""Stage tokenizer: SentencePiece BPE with the challenge's settings (plain, casefold or CaseOps), or
a published SentencePiece model adopted as it is (to go with adopted published shards)."""
from __future__ import annotations

import hashlib
import sys
from dataclasses import asdict
from pathlib import Path

import sentencepiece as spm

from pgolf.data.docs import iter_docs
from pgolf.errors import FormatError, InputError
from pgolf.tokenize.config import TokenizerConfig as Config
from pgolf.tokenize.variants import VARIANTS, variant_misfit
from pgolf.tokenize.trainer import (BOS_ID, CHALLENGE_TRAINER_SETTINGS, train_bpe,
                                    training_sentences)
from pgolf.json_files import write_json
from runner.stage import StageSpec, stage_main


def adopt_model(path: Path, cfg: Config) -> bytes:
    """A published model, checked to be what the config says: the vocab size, BOS at the challenge's
    id, and for CaseOps its operator pieces as single pieces."""
    if not path.is_file():
        raise InputError("tokenizer.adopt model not found", path)
    model = path.read_bytes()
    try:
        sp = spm.SentencePieceProcessor(model_proto=model)
    except Exception as err:  # noqa: BLE001 - SentencePiece raises RuntimeError/OSError variants
        raise FormatError(f"not a SentencePiece model ({err})", path) from err
    if sp.vocab_size() != cfg.vocab_size:
        raise FormatError(f"{sp.vocab_size()} pieces, but tokenizer.vocab_size is {cfg.vocab_size}", path)
    if sp.bos_id() != BOS_ID:
        raise FormatError(f"BOS is id {sp.bos_id()}, the challenge's shards use {BOS_ID}", path)
    missing = [s for s in VARIANTS[cfg.variant].user_defined_symbols if sp.piece_to_id(s) == sp.unk_id()]
    if missing:
        raise FormatError(f"variant {cfg.variant} needs the pieces {[hex(ord(s)) for s in missing]}, which this "
                          "model does not have", path)
    misfit = variant_misfit(model, cfg.variant)
    if misfit:
        raise FormatError(f"not a {cfg.variant} tokenizer: {misfit}; set tokenizer.variant to the one it was "
                          "trained for", path)
    return model


def run(cfg: Config, inputs: dict[str, Path], out: Path) -> dict:
    variant = VARIANTS[cfg.variant]
    if cfg.adopt:
        model = adopt_model(Path(cfg.adopt), cfg)
    else:
        docs = iter_docs(inputs["corpus"])
        if variant.transform:
            docs = (variant.transform(d) for d in docs)
        try:
            model = train_bpe(training_sentences(docs, cfg.train_docs), cfg.vocab_size, cfg.num_threads, cfg.seed,
                              variant.user_defined_symbols, cfg.max_sentence_length)
        except InputError as err:
            raise InputError(str(err), Path(inputs["corpus"]) / "docs.jsonl") from err
        reached = spm.SentencePieceProcessor(model_proto=model).vocab_size()
        if reached != cfg.vocab_size:
            # The challenge's trainer sets hard_vocab_limit=False, so SentencePiece stops quietly at
            # what the corpus supports; a model sized for vocab_size would then carry unused rows.
            raise InputError(f"SentencePiece reached only {reached:,} pieces on this corpus, not tokenizer.vocab_size "
                             f"{cfg.vocab_size:,}: lower tokenizer.vocab_size and train.model.vocab_size to at most "
                             f"{reached} or use a larger corpus (tokenizer.train_docs: 0 trains on all of it)",
                             Path(inputs["corpus"]) / "docs.jsonl")
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
        "trainer": None if cfg.adopt else {**CHALLENGE_TRAINER_SETTINGS, **asdict(cfg)},
        "adopted_from": cfg.adopt or None,  # as configured: an absolute path would differ per clone
    }
    write_json(out / "tokenizer.json", meta)
    return {"vocab_size": sp.vocab_size(), "variant": cfg.variant}


SPEC = StageSpec(name="tokenizer", config_cls=Config, run=run, out="artifacts/tokenizer",
                 inputs={"corpus": "data/corpus"}, producers={"corpus": "corpus"})

if __name__ == "__main__":
    sys.exit(stage_main(SPEC))
