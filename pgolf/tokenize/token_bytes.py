"""How many bytes each scored token stands for: the challenge's LUT rule and per-token sidecars.

Plain tokenizers: the organizer's LUT (docs/lineage.md#bpb) measures the normalized text the
tokenizer produced. Variants that transform the text first (casefold) ship a per-token sidecar
of ORIGINAL-text bytes, aligned 1:1 with the val tokens.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import sentencepiece as spm

from pgolf.data.shards import list_shards, read_shard
from pgolf.errors import FormatError, InputError
from pgolf.tokenize.casefold import casefold_with_provenance

LEADING_SPACE = "\u2581"


@dataclass
class ByteLUTs:
    base_bytes: np.ndarray  # int16: UTF-8 bytes of the piece without its leading "▁"
    has_leading_space: np.ndarray  # bool: the piece starts with "▁" (one space byte, unless after a boundary)
    is_boundary: np.ndarray  # bool: control / unknown / unused pieces, and ids past the SP vocab


def build_byte_luts(sp: spm.SentencePieceProcessor, vocab_size: int) -> ByteLUTs:
    size = max(sp.vocab_size(), vocab_size)
    base = np.zeros(size, dtype=np.int16)
    lead = np.zeros(size, dtype=bool)
    boundary = np.ones(size, dtype=bool)
    for i in range(sp.vocab_size()):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            continue
        boundary[i] = False
        if sp.is_byte(i):
            base[i] = 1
            continue
        piece = sp.id_to_piece(i)
        if piece.startswith(LEADING_SPACE):
            lead[i] = True
            piece = piece[1:]
        base[i] = len(piece.encode("utf-8"))
    return ByteLUTs(base, lead, boundary)


def target_bytes(prev_ids: np.ndarray, target_ids: np.ndarray, luts: ByteLUTs) -> np.ndarray:
    """Bytes charged to each target: its piece, plus its leading space unless it follows a boundary
    (so the first word of a document is not charged the space the tokenizer never saw)."""
    prev_ids = np.asarray(prev_ids, dtype=np.int64)
    target_ids = np.asarray(target_ids, dtype=np.int64)
    extra = luts.has_leading_space[target_ids] & ~luts.is_boundary[prev_ids]
    return luts.base_bytes[target_ids].astype(np.int64) + extra.astype(np.int64)


def bytes_per_position(tokens: np.ndarray, luts: ByteLUTs | None, sidecar: np.ndarray | None) -> np.ndarray:
    """Bytes charged to the target at each stream position (position 0 is never a target: 0)."""
    out = np.zeros(len(tokens), dtype=np.int64)
    if sidecar is not None:
        if len(sidecar) < len(tokens):
            raise ValueError(f"the val byte sidecar has {len(sidecar)} entries for {len(tokens)} tokens")
        out[1:] = sidecar[1:len(tokens)]
    else:
        out[1:] = target_bytes(tokens[:-1], tokens[1:], luts)
    return out


def val_byte_counts(tokens: np.ndarray, sp: spm.SentencePieceProcessor, vocab_size: int,
                    shards_folder: str | Path) -> np.ndarray:
    """The bytes behind val_bpb, per position of `tokens` (the val stream or a prefix of it): the
    shards' sidecar where they carry one, else the LUT rule. The eval and the shards stage's
    certificate (pgolf.data.certify, which checks them against the text) both count with this."""
    sidecar = load_val_byte_sidecar(shards_folder)
    return bytes_per_position(tokens, None if sidecar is not None else build_byte_luts(sp, vocab_size), sidecar)


def original_byte_counts(sp: spm.SentencePieceProcessor, original: str,
                         with_provenance=casefold_with_provenance) -> tuple[list[int], list[int]]:
    """Transform `original` (casefold by default), encode it, and return (token ids, original UTF-8
    bytes per token).

    Each original segment (for casefold a character and its combining marks; for CaseOps one
    character, or an operator, which carries 0 bytes) is charged to the token whose span in the
    transformed text covers the segment's first byte: each token gets the bytes of its own text, as
    R1's surface_piece_original_byte_counts (docs/lineage.md#caseops). A segment no token covers
    (leading or trailing whitespace SentencePiece's normalizer drops) is charged to none, as the
    plain LUT rule charges nothing for it: the model never predicts those bytes. So a document's
    counts sum to the UTF-8 bytes of the text its tokens cover."""
    transformed, starts, sizes = with_provenance(original)
    proto = sp.encode(transformed, return_type="proto")
    ids = [p.id for p in proto.pieces]
    counts = [0] * len(ids)
    # Byte-fallback pieces before a character's last byte have an empty span; the last one carries it.
    spans = [(p.begin, p.end, i) for i, p in enumerate(proto.pieces) if p.begin < p.end]
    k = 0
    for start, size in zip(starts, sizes):
        while k < len(spans) and spans[k][1] <= start:
            k += 1
        if k == len(spans):
            break
        begin, _, token = spans[k]
        if size and begin <= start:
            counts[token] += size
    return ids, counts


def load_tokenizer(folder: str | Path) -> tuple[spm.SentencePieceProcessor, dict]:
    folder = Path(folder)
    model_path, meta_path = folder / "tokenizer.model", folder / "tokenizer.json"
    for path in (model_path, meta_path):
        if not path.is_file():
            raise InputError(f"{path.name} not found: is this a tokenizer stage output?", path)
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as err:
        raise FormatError(f"not valid JSON: {err}", meta_path) from err
    sp = spm.SentencePieceProcessor()
    try:
        sp.load(str(model_path))
    except (OSError, RuntimeError) as err:
        raise FormatError(f"not a SentencePiece model: {err}", model_path) from err
    return sp, meta


def load_val_byte_sidecar(shards_folder: str | Path) -> np.ndarray | None:
    """Concatenated fineweb_val_bytes_*.bin as int64, or None when the shards carry no sidecar."""
    files = list_shards(shards_folder, "val_bytes")
    if not files:
        return None
    return np.concatenate([np.asarray(read_shard(f), dtype=np.int64) for f in files])
