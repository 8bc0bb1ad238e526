"""CaseOps: the reference's examples, losslessness on generated text, and its byte sidecar."""
from __future__ import annotations

import random

import numpy as np
import sentencepiece as spm

from pgolf.data.shards import load_split
from pgolf.tokenize.token_bytes import load_val_byte_sidecar, original_byte_counts
from pgolf.tokenize.caseops import ALLCAPS, CAPNEXT, ESC, OPERATORS, TITLE, decode, encode, encode_with_provenance
from tasks import shards as shards_stage, tokenizer as tok_stage
from runner.stage import execute
from tests.conftest import make_docs, write_corpus

ALPHABET = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ") * 3 + list("0123456789 .,'-\n\t") + \
    ["É", "ß", "İ", "ı", "ﬁ", "Σ", "日", "😀", "\u0301", "\x00"] + list(OPERATORS)


def test_reference_examples():
    assert encode("The NASA Launch") == f"{TITLE}the {ALLCAPS}nasa {TITLE}launch"
    assert encode("iPhone OpenAI") == f"i{CAPNEXT}phone {TITLE}open{CAPNEXT}a{CAPNEXT}i"
    assert encode("I") == f"{TITLE}i" and encode("already lower") == "already lower"
    assert encode(f"x{TITLE}y") == f"x{ESC}{TITLE}y"


def test_lossless_on_generated_text():
    rng = random.Random(0)
    for _ in range(3000):
        text = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 40)))
        encoded = encode(text)
        assert decode(encoded) == text, repr(text)
        assert not any("A" <= ch <= "Z" for ch in encoded), repr(text)


def test_provenance_charges_original_bytes_and_nothing_to_operators():
    rng = random.Random(1)
    for _ in range(500):
        text = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 30)))
        encoded, starts, sizes = encode_with_provenance(text)
        assert sum(sizes) == len(text.encode("utf-8"))
        raw = encoded.encode("utf-8")
        for start, size in zip(starts, sizes):
            escaped = raw[start - 3:start].decode("utf-8", "ignore") == ESC
            if raw[start:start + 3].decode("utf-8", "ignore")[:1] in OPERATORS and size and not escaped:
                raise AssertionError(f"an operator carries bytes in {text!r}")


def test_tokenizer_reserves_operators_and_shards_carry_original_bytes(tmp_path):
    docs = make_docs(80, seed=9)
    corpus = write_corpus(tmp_path / "corpus", docs)
    execute(tok_stage.SPEC, tok_stage.Config(variant="caseops", vocab_size=380, num_threads=1), {"corpus": corpus},
            tmp_path / "tok")
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tok/tokenizer.model"))
    assert [sp.id_to_piece(i) for i in range(4, 8)] == list(OPERATORS)  # always single tokens, ids 4-7
    assert sp.id_to_piece(8) == "<0x00>"
    ids, counts = original_byte_counts(sp, "The NASA Launch", encode_with_provenance)
    assert sum(counts) == len("The NASA Launch") and all(c == 0 for i, c in zip(ids, counts) if 4 <= i <= 7)
    assert decode(sp.decode(ids)) == "The NASA Launch"
    execute(shards_stage.SPEC, shards_stage.Config(val_docs=30, shard_tokens=3000, workers=2),
            {"corpus": corpus, "tokenizer": tmp_path / "tok"}, tmp_path / "shards")
    val, sidecar = load_split(tmp_path / "shards", "val"), load_val_byte_sidecar(tmp_path / "shards")
    starts = list(np.flatnonzero(val == 1)) + [len(val)]
    for i, (a, b) in enumerate(zip(starts[:-1], starts[1:])):
        assert sidecar[a:b].sum() == len(docs[i].encode("utf-8"))
    assert sidecar[(val >= 4) & (val <= 7)].sum() == 0


def test_fast_transforms_equal_the_provenance_paths():
    """encode / casefold take shortcuts (regular expressions, ASCII runs lowercased whole); their
    text must be exactly what the character-by-character provenance paths produce."""
    from pgolf.tokenize.casefold import casefold, casefold_with_provenance

    rng = random.Random(7)
    alphabet = list("abcXYZ Q\n\t.,'-09") + ["\u0301", "\u0308", "\u0130", "\u1100", "\u1161", "\ufb01", "\u00c5",
                                           "\u212b", "\u2460", "\ue001", "\ue004", "\U0001f600", "\u00df", "\u03a3"]
    for _ in range(3000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        assert encode(text) == encode_with_provenance(text)[0], repr(text)
        assert casefold(text) == casefold_with_provenance(text)[0], repr(text)
    long_lower = "a" * 200_000 + "B"
    assert encode(long_lower) == encode_with_provenance(long_lower)[0]


def r1_surface_bytes(surfaces: list[str]) -> list[int]:
    """R1's rule (surface_piece_original_byte_counts for caseops v1), written out again: each piece
    is charged its own surface's bytes; operators and ESC are 0, an escaped character its own bytes."""
    counts, pending_escape = [], False
    for surface in surfaces:
        n = 0
        for ch in surface:
            if pending_escape:
                n, pending_escape = n + len(ch.encode("utf-8")), False
            elif ch == ESC:
                pending_escape = True
            elif ch not in OPERATORS:
                n += len(ch.encode("utf-8"))
        counts.append(n)
    return counts


SPLIT_WORDS = ["Antidisestablishmentarianism", "iPhone OpenAI McDonald", "NASA SPACEX quixotically",
               f"x{TITLE}y {ESC}{ESC}z {CAPNEXT}Q", "  Leading and trailing Words  \n", "日本 😀Xy naïve Résumé",
               "a  B\n\nCd\t\tEFG"]


def test_sidecar_charges_each_token_its_own_text_as_r1(tmp_path):
    """A word SentencePiece splits into several pieces charges each piece its own letters (not the
    whole run to the first), an escaped operator's bytes go to the escaped piece (not to ESC), and
    whitespace no piece covers counts nowhere: per token equal to R1's rule, so a window or chunk
    starting inside a word counts R1's bytes."""
    docs = make_docs(80, seed=9)
    corpus = write_corpus(tmp_path / "corpus", docs)
    execute(tok_stage.SPEC, tok_stage.Config(variant="caseops", vocab_size=380, num_threads=1), {"corpus": corpus},
            tmp_path / "tok")
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tok/tokenizer.model"))
    split_inside_a_word = 0
    for text in SPLIT_WORDS:
        ids, counts = original_byte_counts(sp, text, encode_with_provenance)
        pieces = sp.encode(encode(text), return_type="proto").pieces
        assert ids == [p.id for p in pieces]
        assert counts == r1_surface_bytes([p.surface for p in pieces]), repr(text)
        assert sum(counts) == len(text.strip(" \t\n").encode("utf-8"))
        split_inside_a_word += sum(1 for a, b in zip(pieces, pieces[1:])
                                   if a.surface[-1:].isalpha() and b.surface[:1].isalpha())
        # a window that starts at any token inside the text counts R1's bytes from there on
        for start in range(len(ids)):
            assert sum(counts[start:]) == sum(r1_surface_bytes([p.surface for p in pieces])[start:])
    assert split_inside_a_word >= 10, "the tiny tokenizer should split these long words"
    escaped = original_byte_counts(sp, f"x{TITLE}y", encode_with_provenance)
    assert escaped[1][escaped[0].index(sp.piece_to_id(ESC))] == 0
    assert escaped[1][escaped[0].index(sp.piece_to_id(TITLE))] == 3
