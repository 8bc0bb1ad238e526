"""Byte accounting: the challenge's LUT rule on hand-worked cases, and casefold's original-byte sidecar."""
from __future__ import annotations

import numpy as np
import pytest

from pgolf.tokenize.token_bytes import build_byte_luts, original_byte_counts, target_bytes
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


def covered_bytes(sp, transformed: str, original: str) -> int:
    """Original UTF-8 bytes of the text the tokens cover: all of it but the whitespace
    SentencePiece drops at the ends (these texts' casefold keeps every such character as it is)."""
    raw = transformed.encode("utf-8")
    pieces = [p for p in sp.encode(transformed, return_type="proto").pieces if p.begin < p.end]
    if not pieces:
        return 0
    lead, trail = raw[:pieces[0].begin].decode(), raw[pieces[-1].end:].decode()
    assert not (lead + trail).strip(" \t\n"), "only ASCII whitespace is dropped at the ends"
    return len(original.encode("utf-8")) - len(lead) - len(trail)


@pytest.mark.parametrize("text", ADVERSARIAL)
def test_casefold_sidecar_sums_to_the_bytes_its_tokens_cover(sp, text):
    ids, counts = original_byte_counts(sp, text)
    assert ids == sp.encode(casefold(text))
    assert sum(counts) == covered_bytes(sp, casefold(text), text)
    assert all(c >= 0 for c in counts)


def test_sidecar_skips_whitespace_no_token_covers_as_the_lut_does(sp):
    """Leading/trailing whitespace SentencePiece drops is predicted by no token: neither the plain
    LUT nor the sidecar may count it (one rule for every variant, as R1's)."""
    luts = build_byte_luts(sp, sp.vocab_size())
    for pad in ("  ", "\n\n", " \t\n"):
        text = pad + "the people" + pad
        ids, counts = original_byte_counts(sp, text)
        stream = np.array([BOS] + sp.encode(text))
        lut_total = int(target_bytes(stream[:-1], stream[1:], luts).sum())
        assert sum(counts) == lut_total == len("the people"), repr(text)
    assert original_byte_counts(sp, " \n ") == ([], [])


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
