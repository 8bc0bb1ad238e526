"""The tokenizer variants: what each does to the text before SentencePiece sees it.

plain: nothing (bytes come from the organizer's LUT over the normalized text); casefold: NFKC then
lowercase (PR #1585 lineage); caseops: the bijective case transform with its four operator pieces
(R1). The transformed variants charge each val token the bytes of the ORIGINAL text (a sidecar).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from pgolf.tokenize import caseops
from pgolf.tokenize.casefold import casefold, casefold_with_provenance


@dataclass(frozen=True)
class Variant:
    transform: Callable[[str], str] | None
    with_provenance: Callable[[str], tuple[str, list[int], list[int]]] | None
    user_defined_symbols: list[str] = field(default_factory=list)


VARIANTS = {
    "plain": Variant(None, None),
    "casefold": Variant(casefold, casefold_with_provenance),
    "caseops": Variant(caseops.encode, caseops.encode_with_provenance, list(caseops.OPERATORS)),
}
