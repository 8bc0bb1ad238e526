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


def variant_misfit(model_bytes: bytes, variant: str) -> str | None:
    """Why a SentencePiece model cannot be the `variant`'s tokenizer, or None when it fits. Every
    covered character is a piece of its own, so a tokenizer trained on cased text has uppercase
    pieces and one trained on casefolded (or CaseOps) text has none."""
    from sentencepiece import sentencepiece_model_pb2

    model = sentencepiece_model_pb2.ModelProto()
    model.ParseFromString(model_bytes)
    normal = sentencepiece_model_pb2.ModelProto.SentencePiece.NORMAL
    pieces = [p.piece for p in model.pieces if p.type == normal]
    operators = [p.piece for p in model.pieces if any(op in p.piece for op in caseops.OPERATORS)]
    normalizer = model.normalizer_spec.name
    if variant == "plain":
        if normalizer.endswith("_cf"):
            return f"its normalizer {normalizer} case-folds the text, which a plain tokenizer must not"
        if operators:
            return "it holds CaseOps operator pieces: adopt it as variant caseops"
        if not any(p != p.lower() for p in pieces):
            return "no piece holds an uppercase letter, so it was trained on casefolded text: adopt it as casefold"
        return None
    if variant == "casefold":
        cased = [p for p in pieces if p != p.lower()]
        if cased:
            return (f"{len(cased)} pieces hold uppercase letters (e.g. {cased[0]!r}), which casefolded text has none "
                    "of: adopt it as plain")
        if operators:
            return "it holds CaseOps operator pieces: adopt it as variant caseops"
        return None
    cased = [p for p in pieces if any("A" <= c <= "Z" for c in p)]
    if cased:
        return (f"{len(cased)} pieces hold ASCII capitals (e.g. {cased[0]!r}), which CaseOps moves into operators, "
                "so the text it was trained on was not CaseOps-encoded")
    return None
