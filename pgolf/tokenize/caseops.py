"""CaseOps (`lossless_caps_caseops_v1`, PR #1729 -> R1; docs/lineage.md#caseops): a bijective case transform.

Case moves out of the letters into four reserved operator characters, so the tokenizer sees
lowercase words and the model predicts case as tokens. Rules act on maximal runs of ASCII letters:
all lowercase stays; all uppercase (2+ letters) -> ALLCAPS + lowercase; one capital then lowercase ->
TITLE + lowercase; anything else -> TITLE if it starts upper, then CAPNEXT before every later capital.
A literal operator character in the text is escaped with ESC. decode(encode(x)) == x for any string.
"""
from __future__ import annotations

import re
from functools import lru_cache

TITLE, ALLCAPS, CAPNEXT, ESC = "\ue001", "\ue002", "\ue003", "\ue004"
OPERATORS = (TITLE, ALLCAPS, CAPNEXT, ESC)
_RUN = re.compile(r"[A-Za-z]+")
_OPERATOR = re.compile("[\ue001-\ue004]")
# A whole letter run holding a capital (all-lowercase runs stay as they are); the lookbehind starts a
# match only at a run's first letter, so even a very long lowercase run costs linear time.
_CASED_RUN = re.compile(r"(?<![A-Za-z])[a-z]*[A-Z][A-Za-z]*")


def _encode_run(run: str) -> list[tuple[str, int]]:
    """(output text, original UTF-8 bytes) per output piece; operators carry 0 bytes. Every letter is
    a piece of its own (1 byte), so a word that SentencePiece splits charges each token its own
    letters, as R1's surface_piece_original_byte_counts does (docs/lineage.md#caseops)."""
    lower = run.lower()
    if run.islower():
        ops = {}
    elif len(run) >= 2 and run.isupper():
        ops = {0: ALLCAPS}
    elif run[0].isupper() and (len(run) == 1 or run[1:].islower()):
        ops = {0: TITLE}
    else:
        ops = {i: TITLE if i == 0 else CAPNEXT for i, ch in enumerate(run) if ch.isupper()}
    out: list[tuple[str, int]] = []
    for i, ch in enumerate(lower):
        if i in ops:
            out.append((ops[i], 0))
        out.append((ch, 1))
    return out


def encode_with_provenance(text: str) -> tuple[str, list[int], list[int]]:
    """(transformed text, start byte offset of each piece in it, original bytes of each piece)."""
    pieces: list[tuple[str, int]] = []
    pos = 0
    for match in _RUN.finditer(text):
        pieces.extend(_encode_other(text[pos:match.start()]))
        pieces.extend(_encode_run(match.group()))
        pos = match.end()
    pieces.extend(_encode_other(text[pos:]))
    out, starts, sizes, offset = [], [], [], 0
    for piece, size in pieces:
        out.append(piece)
        starts.append(offset)
        sizes.append(size)
        offset += len(piece.encode("utf-8"))
    return "".join(out), starts, sizes


def _encode_other(chunk: str) -> list[tuple[str, int]]:
    pieces = []
    for ch in chunk:
        if ch in OPERATORS:
            # The escaped character, not the ESC piece, carries its bytes, as in R1's sidecar.
            pieces.append((ESC, 0))
            pieces.append((ch, len(ch.encode("utf-8"))))
        else:
            pieces.append((ch, len(ch.encode("utf-8"))))
    return pieces


@lru_cache(maxsize=1 << 16)
def _encoded_run(run: str) -> str:
    return "".join(piece for piece, _ in _encode_run(run))


def encode(text: str) -> str:
    """encode_with_provenance's text without a Python loop over characters: escape the operators (not
    letters, so no run changes), then rewrite each run that holds a capital; cased words repeat, so
    their rewrites are cached."""
    if any(op in text for op in OPERATORS):  # substring tests are far cheaper than a regex pass
        text = _OPERATOR.sub(ESC + r"\g<0>", text)
    return _CASED_RUN.sub(lambda m: _encoded_run(m.group()), text)


def decode(text: str) -> str:
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch == ESC and i + 1 < n:
            out.append(text[i + 1])
            i += 2
        elif ch == ALLCAPS:
            match = _RUN.match(text, i + 1)
            run = match.group() if match else ""
            out.append(run.upper())
            i += 1 + len(run)
        elif ch in (TITLE, CAPNEXT):
            if i + 1 < n:
                out.append(text[i + 1].upper())
            i += 2
        else:
            out.append(ch)
            i += 1
    return "".join(out)
