"""The challenge's published data, as figures a judge compares a run's data with (docs/lineage.md#canonical-data).

Val is the first 50,000 documents of `docs_selected.jsonl`, every tokenizer's export scores that one
stream, and training reads the export's shards of 10^8 tokens. A run on other data is allowed and
honest, but it is not the challenge's score: everything that reports a score says `canonical: true`
or `false`, and why. The figures come from the records' own logs (val tokens scored at a sequence
length, train shard counts) and the audits that settled what the canonical CaseOps export is
(#2127, #2146); a figure nobody published is None, and a comparison with it is unknown, not passed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

DOCS_VAL = 50_000
SHARD_TOKENS = 100_000_000  # a full shard of every export
# The bytes behind val_bpb over the canonical val, the same text whatever the tokenizer: the whole
# CaseOps stream's sidecar total (#2014's logs: 47,853,343 tokens x val_loss / (ln 2 x val_bpb)).
# A run's own figure (its scored tokens x val_loss / (ln 2 x val_bpb)) lands within VAL_BYTES_SLACK of
# it: a cut to whole windows drops the last < seq_len tokens, and the plain LUT counts normalized
# text a few KB apart from the sidecar's raw bytes (SP8192 at seq 2048: 151,078,222; SP1024 at seq
# 1024: 151,080,363; CaseOps at seq 2048: 151,074,498). The denominator faults are far outside it:
# +4.13% (#1271), +8.95% (#2138).
VAL_BYTES = 151_080_644
VAL_BYTES_SLACK = 30_000


@dataclass(frozen=True)
class Export:
    name: str
    variant: str  # pgolf's tokenizer variant of the same transform
    vocab_size: int
    dataset: str  # where it is published, and the folder name its files sit in
    # Scored val tokens at an eval sequence length, as the records' logs print them
    # (((N - 1) // seq_len) * seq_len of the N-token stream).
    scored_at: dict[int, int] = field(default_factory=dict)
    val_tokens: int | None = None  # N, the whole val stream, where a log printed it
    train_shards: int | None = None  # how many train shards the export has, where known
    log_names: tuple[str, ...] = ()  # tokenizer or dataset names that identify it in a record's log
    tokenizer_sha256: str | None = None  # of the published .model, where pgolf has seen it


EXPORTS = (
    # #2014's logs print val_tokens == target_tokens == 47,853,343 (the whole stream); R1 and every
    # CaseOps record score 47,851,520 at seq 2048. The export has 80 train shards (#2146: "clean
    # canonical CaseOps data (train_shards: 80 ...)"); 1,499 is #2127's leak fingerprint.
    Export("sp8192_caseops", "caseops", 8192, "romeerp/parameter-golf-caseops-v1 "
           "fineweb10B_sp8192_lossless_caps_caseops_v1_reserved", {2048: 47_851_520}, 47_853_343, 80,
           ("lossless_caps_caseops_v1",),
           # fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model as R1 and its followers ship it
           "97754754561f20def5edd99765ca0668f880bd94e67316d54aa10ab25f45cc4d"),
    # R0405 and its line score 40,540,160 at seq 2048 (a 4096-token run 40,538,112: the same stream).
    Export("sp8192", "plain", 8192, "kevclark/parameter-golf fineweb10B_sp8192", {2048: 40_540_160, 4096: 40_538_112},
           log_names=("fineweb_8192_bpe.model", "fineweb10B_sp8192/", "fineweb10B_sp8192 ")),
    # The baseline's loader prints 62,021,632 at seq 1024 (the first records, with an earlier
    # tokenizer, 63,779,840).
    Export("sp1024", "plain", 1024, "willdepueoai/parameter-golf fineweb10B_sp1024", {1024: 62_021_632},
           log_names=("fineweb_1024_bpe", "fineweb10B_sp1024")),
)
# The challenge's downloader fetches 80 train shards unless told otherwise, so every export has at
# least 80; an export whose total is not known here is judged on that.
DEFAULT_TRAIN_SHARDS = 80


def export_named(name: str) -> Export | None:
    return next((e for e in EXPORTS if e.name == name), None)


def export_for(variant: str, vocab_size: int) -> Export | None:
    """The published export a tokenizer of this variant and size would reproduce, if any."""
    return next((e for e in EXPORTS if e.variant == variant and e.vocab_size == vocab_size), None)


def export_in_text(text: str) -> Export | None:
    """The export a record's log names (its tokenizer or dataset path), checked most specific first."""
    for export in EXPORTS:
        if any(name in text for name in export.log_names):
            return export
    return None


def truncated(tokens: int, seq_len: int) -> int:
    """Targets scored of an N-token stream cut to whole windows: ((N - 1) // seq_len) * seq_len."""
    return ((tokens - 1) // seq_len) * seq_len


def stream_bounds(export: Export) -> tuple[int, int] | None:
    """The smallest and largest N the published figures allow (exact when a log printed N)."""
    if export.val_tokens is not None:
        return export.val_tokens, export.val_tokens
    lo, hi = 0, None
    for seq_len, scored in export.scored_at.items():
        lo, top = max(lo, scored + 1), scored + seq_len
        hi = top if hi is None else min(hi, top)
    return (lo, hi) if hi is not None else None


@dataclass(frozen=True)
class Finding:
    ok: bool | None  # None: unknown
    text: str


def val_coverage(export: Export | None, scored: int | None, seq_len: int | None, explain: bool = True) -> Finding:
    """Does `scored` (tokens a run scored, at eval windows of `seq_len`) cover the export's whole val
    stream? Either the whole stream (N or N - 1 targets) or its cut to whole windows passes.
    `explain`: say what a shortfall means for a run that claims the canonical data."""
    if export is None:
        return Finding(None, "no canonical val stream is known for this tokenizer")
    if scored is None:
        return Finding(None, f"the scored token count is not given (canonical {export.name}: {_stream_text(export)})")
    bounds = stream_bounds(export)
    if bounds is None:
        return Finding(None, f"no val token figure is published for {export.name}")
    lo, hi = bounds
    whole = lo - 1 <= scored <= hi
    cut = seq_len is not None and seq_len > 0 and scored % seq_len == 0 and truncated(lo, seq_len) <= scored <= truncated(hi, seq_len)
    if whole or cut:
        how = "the whole stream" if whole else f"the stream cut to windows of {seq_len}"
        return Finding(True, f"{scored:,} tokens scored: {how} of the canonical {export.name} val ({_stream_text(export)})")
    expected = truncated(hi, seq_len) if seq_len else hi
    short = expected - scored
    if not explain:
        why = f"{abs(short):,} tokens {'fewer' if short > 0 else 'more'}"
    elif short > 0:
        why = f"{short:,} tokens short: val is not the first {DOCS_VAL:,} documents (as PR #2109's per-chunk split)"
    else:
        why = f"{-short:,} tokens more than the canonical stream: val holds other documents"
    if seq_len is None and short > 0 and short < 65_536:
        return Finding(None, f"{scored:,} tokens scored, {short:,} fewer than the canonical {export.name} val "
                             f"({_stream_text(export)}); the eval sequence length is not given, so whether that is "
                             "the cut to whole windows cannot be told")
    what = "tokens scored" if explain else "val tokens"
    return Finding(False, f"{scored:,} {what} where the canonical {export.name} val is {_stream_text(export)}: {why}")


def implied_bytes(scored: int | None, val_loss: float | None, val_bpb: float | None) -> int | None:
    """The bytes a run divided by: val_bpb = val_loss / ln 2 x tokens / bytes."""
    if not scored or not val_loss or not val_bpb:
        return None
    return round(scored * val_loss / (math.log(2) * val_bpb))


def val_bytes(bytes_: int | None, seq_len: int | None = None, implied: bool = False) -> Finding:
    """Is the bpb denominator the canonical val's bytes (within what a cut and the byte rule move)?
    `implied`: recovered from printed val_loss and val_bpb, so good to about ten bytes."""
    if bytes_ is None:
        return Finding(None, "the scored tokens, val_loss and val_bpb needed to recover the bpb denominator are not all given")
    slack = VAL_BYTES_SLACK + 4 * (seq_len or 0)
    off = bytes_ - VAL_BYTES
    shown = f"about {round(bytes_, -1):,}" if implied else f"{bytes_:,}"
    if abs(off) <= slack:
        return Finding(True, f"the bpb denominator is {shown} bytes, the canonical val's {VAL_BYTES:,} (within {slack:,})")
    return Finding(False, f"the bpb denominator is {shown} bytes where the canonical val has {VAL_BYTES:,} "
                          f"({off / VAL_BYTES:+.2%}): other text, or bytes counted wrong (#1271 +4.13%, #2138 +8.95%, #1632 +16.71%)")


def _stream_text(export: Export) -> str:
    parts = [f"{export.val_tokens:,} tokens"] if export.val_tokens is not None else []
    parts += [f"{scored:,} scored at seq {seq}" for seq, scored in sorted(export.scored_at.items())]
    return ", ".join(parts)


def train_shards(export: Export | None, count: int | None) -> Finding:
    """Is a train shard count one the export can give (a prefix of its shards)? More shards than the
    export has means other shards: #2127's leak made 1,499 shards of 10^7 tokens from a local re-export
    whose train began at document 10,000, inside val."""
    if export is None:
        return Finding(None, "no canonical export is known for this tokenizer")
    if count is None:
        return Finding(None, "the train shard count is not given")
    if export.train_shards is not None:
        if count <= export.train_shards:
            return Finding(True, f"{count} train shards, of the {export.train_shards} the canonical {export.name} export has")
        return Finding(False, f"{count} train shards where the canonical {export.name} export has {export.train_shards}: "
                              "not the export's shards. 1,499 is issue #2127's fingerprint: prepare_caseops_data.py's "
                              "default --val-docs=10000 starts train at document 10,000, so documents 10,000-49,999 "
                              "(80% of val) are trained on")
    if count <= DEFAULT_TRAIN_SHARDS:
        return Finding(True, f"{count} train shards, within the {DEFAULT_TRAIN_SHARDS} every export has")
    return Finding(None, f"{count} train shards: more than the {DEFAULT_TRAIN_SHARDS} the downloader fetches, and the "
                         f"{export.name} export's total is not known here")
