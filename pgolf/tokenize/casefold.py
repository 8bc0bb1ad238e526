"""Casefold transform (PR #1585 / #1670 / #1693 lineage: NFKC, then lowercase) with byte provenance.

The transform works segment by segment: a segment is one character plus the combining marks that
follow it, so NFKC never composes across segments and every character of the casefolded text
comes from exactly one segment of the original. That is what lets the shards stage charge each
val token the UTF-8 bytes of the ORIGINAL text it stands for, instead of the casefolded bytes
(lowercasing changes lengths: "İ" is 2 bytes, its lowercase 3; NFKC turns "ﬁ" into "fi").
"""
from __future__ import annotations

import re
import unicodedata

_ASCII_RUN = re.compile(r"[\x00-\x7f]+")


def segments(text: str) -> list[str]:
    """Split into starter + following combining marks; concatenation gives `text` back."""
    out: list[str] = []
    for ch in text:
        if out and unicodedata.combining(ch):
            out[-1] += ch
        else:
            out.append(ch)
    return out


def casefold_segment(segment: str) -> str:
    return unicodedata.normalize("NFKC", segment).lower()


def _casefold_segments(text: str) -> str:
    return "".join(casefold_segment(s) for s in segments(text))


def casefold(text: str) -> str:
    """casefold_with_provenance's text, fast: an ASCII character is a segment of its own whose NFKC is
    itself, so ASCII runs are lowercased whole; only the rest goes segment by segment. A run's last
    character stays with the rest when a combining mark follows it (it starts that segment)."""
    if text.isascii():
        return text.lower()
    out, pos = [], 0
    for match in _ASCII_RUN.finditer(text):
        start, end = match.start(), match.end()
        if end < len(text) and unicodedata.combining(text[end]):
            end -= 1
        if start < end:
            out.append(_casefold_segments(text[pos:start]))
            out.append(text[start:end].lower())
            pos = end
    out.append(_casefold_segments(text[pos:]))
    return "".join(out)


def casefold_with_provenance(text: str) -> tuple[str, list[int], list[int]]:
    """Return (casefolded text, start byte offset in it of each original segment, UTF-8 byte
    length of each original segment). Segments whose casefold is empty start where the next does."""
    pieces, starts, sizes = [], [], []
    offset = 0
    for seg in segments(text):
        folded = casefold_segment(seg)
        starts.append(offset)
        sizes.append(len(seg.encode("utf-8")))
        pieces.append(folded)
        offset += len(folded.encode("utf-8"))
    return "".join(pieces), starts, sizes
