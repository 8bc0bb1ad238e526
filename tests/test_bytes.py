"""Byte accounting: the challenge's LUT rule on hand-worked cases, and casefold's original-byte sidecar."""
from __future__ import annotations

import numpy as np
import pytest

from pgolf.tokenize.bytes import build_byte_luts, original_byte_counts, target_bytes
from pgolf.tokenize.casefold import casefold, casefold_with_provenance, segments

BOS = 1


def test_lut_entries_by_piece_kind(sp):
    luts = build_byte_luts(sp, sp.vocab_size())
    for special in (0, 1, 2, 3):  # pad, bos, eos, unk
        assert luts.is_boundary[special] and luts.base_bytes[special] == 0
    byte_id = sp.piece_to_id("<0xC3>")
    assert sp.is_byte(byte_id) and luts.base_bytes[byte_id] == 1 and not luts.has_leading_space[byte_id]
    th = sp.piece_to_id("\u2581th")
    assert th != sp.unk_id(), "the tiny model should know '▁th'"
    assert luts.has_leading_space[th] and luts.base_bytes[th] == 2 and not luts.is_boundary[th]


def test_ids_past_the_sp_vocab_are_zero_byte_boundaries(sp):
    luts = build_byte_luts(sp, sp.vocab_size() + 8)
    assert len(luts.base_bytes) == sp.vocab_size() + 8
    assert luts.is_boundary[-1] and luts.base_bytes[-1] == 0


def test_leading_space_not_charged_after_bos(sp):
    luts = build_byte_luts(sp, sp.vocab_size())
    th = sp.piece_to_id("\u2581th")
    word = sp.piece_to_id("\u2581wor")
    assert sp.unk_id() not in (th, word)
    # [BOS] ▁th ▁wor : "th" right after BOS costs 2 bytes (the space the tokenizer never saw is
    # not charged), " wor" costs 4 (space + 3).
    assert target_bytes(np.array([BOS, th]), np.array([th, word]), luts).tolist() == [2, 4]
    # a BOS target (end of document) carries no bytes
    assert target_bytes(np.array([word]), np.array([BOS]), luts).tolist() == [0]


def test_byte_fallback_pieces_count_one_each(sp):
    luts = build_byte_luts(sp, sp.vocab_size())
    ids = sp.encode("\u263a")  # ☺ is not in the tiny vocab: three byte pieces
    assert all(sp.is_byte(i) for i in ids) and len(ids) == 3
    assert target_bytes(np.array([BOS] + ids[:-1]), np.array(ids), luts).sum() == 3


@pytest.mark.parametrize("text", ["The people of the world.", "Café naïve   résumé, 42 ½ ﬁne!", "a\tb\n\nc  d"])
def test_lut_total_equals_normalized_text_bytes(sp, text):
    """What the LUT measures is the UTF-8 length of the text SentencePiece normalized and encoded."""
    luts = build_byte_luts(sp, sp.vocab_size())
    ids = sp.encode(text)
    stream = np.array([BOS] + ids)
    total = target_bytes(stream[:-1], stream[1:], luts).sum()
    assert total == len(sp.decode(ids).encode("utf-8"))


ADVERSARIAL = [
    "Hello World",
    "İstanbul İİ",  # lower() of İ is 3 bytes where the original is 2
    "ﬁne ﬂour ½ ㎏ Ⅻ",  # NFKC expansions
    "e\u0301te\u0301 A\u030a",  # combining marks
    "  leading and trailing  \n",
    "tabs\t\tand\n\n\nnewlines   runs",
    "emoji 😀👍🏽 and CJK 日本語",
    "control\x01char\x7f and NUL\x00 here",
    "ÀÉÎÕÜ ΣΊΣΥΦΟΣ Ǆ ǅ",
]


@pytest.mark.parametrize("text", ADVERSARIAL)
def test_casefold_sidecar_sums_to_original_bytes(sp, text):
    ids, counts = original_byte_counts(sp, text)
    assert ids == sp.encode(casefold(text))
    assert sum(counts) == len(text.encode("utf-8"))
    assert all(c >= 0 for c in counts)


@pytest.mark.parametrize("text", ADVERSARIAL)
def test_casefold_provenance_is_consistent(text):
    folded, starts, sizes = casefold_with_provenance(text)
    assert "".join(segments(text)) == text
    assert folded == casefold(text) and folded == folded.lower()
    assert sum(sizes) == len(text.encode("utf-8"))
    assert starts == sorted(starts) and (not starts or starts[-1] <= len(folded.encode("utf-8")))


def test_casefold_is_nfkc_then_lower():
    assert casefold("ﬁNE Café") == "fine café"
    assert casefold("İ") == "i\u0307"
