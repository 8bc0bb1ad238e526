"""The pack stage's settings (params.yaml's `pack` section) and the challenge's cap, importable
without torch."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pgolf.typed_params import check_range

CHALLENGE_CAP_BYTES = 16_000_000
MAX_LEVELS = {"lzma": 9, "brotli": 11, "zlib": 9, "zstd": 22, "lrzip": 9}


@dataclass
class PackConfig:
    # best: each stream with whichever installed compressor (lrzip, lzma, brotli, zstd) is smallest
    compressor: Literal["lzma", "brotli", "zlib", "zstd", "lrzip", "best"] = "brotli"
    level: int = -1  # -1: the compressor's strongest (lzma 9e, brotli 11, zlib 9, zstd 22, lrzip 9)
    layout: Literal["flat", "pergroup"] = "flat"  # pergroup: R1's per-family streams, transposed
    sort_rows: bool = False  # pergroup: greedy L1 row order for tok_emb, c_q, mlp.fc (R1)
    cap_bytes: int = CHALLENGE_CAP_BYTES
    # A run under a cap above the challenge's cannot be a record, so it has to say so: size.json and
    # an exported submission.json then record that it does not meet the challenge's cap.
    non_record: bool = False
    # The one script that is the submission's code (an exported train_gpt.py): counted the records'
    # way, minified + brotli + base85 in a self-extracting stub. Empty: count the eval code's files.
    code_file: str = ""

    def validate(self) -> None:
        check_range(self, "cap_bytes", ge=1)
        # -1: each compressor's strongest; otherwise within its range (best hands the level to all of them).
        check_range(self, "level", ge=-1, le=MAX_LEVELS.get(self.compressor, min(MAX_LEVELS.values())))
        if self.cap_bytes > CHALLENGE_CAP_BYTES and not self.non_record:
            raise ValueError(f"cap_bytes {self.cap_bytes:,} is above the challenge's {CHALLENGE_CAP_BYTES:,}-byte cap; "
                             "set pack.non_record: true for a run that does not claim the record track")
