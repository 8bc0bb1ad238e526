"""Stage pack: the quantized model as one compressed binary, the code bytes counted, the cap enforced."""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pgolf.errors import CapExceededError
from pgolf.pack.chart import bytes_chart
from pgolf.pack.codesize import code_bytes, import_closure, wrapped_size
from pgolf.pack.groups import group_sizes
from pgolf.pack.serialize import pack, stream_choices, unpack
from pgolf.quant.quantized_model import load_quantized
from pgolf.typed_params import check_range
from pgolf.json_files import write_json
from tasks.common import StageSpec, record_timings, stage_main

ROOT = Path(__file__).resolve().parent.parent
EVAL_ENTRY = ROOT / "tasks" / "evaluate.py"
CHALLENGE_CAP_BYTES = 16_000_000
MAX_LEVELS = {"lzma": 9, "brotli": 11, "zlib": 9, "zstd": 22, "lrzip": 9}


@dataclass
class Config:
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


def meets_challenge_cap(total_bytes: int) -> bool:
    return total_bytes <= CHALLENGE_CAP_BYTES


def counted_bytes(model_bytes: int, code_bytes: int, cap_bytes: int) -> dict:
    """The artifact's size as the challenge counts it: the one place size.json, an exported README
    and submission.json take their model, code and total bytes from, so they cannot disagree."""
    total = model_bytes + code_bytes
    return {"model_bytes": model_bytes, "code_bytes": code_bytes, "total_bytes": total, "cap_bytes": cap_bytes,
            "margin_bytes": cap_bytes - total, "meets_challenge_cap": meets_challenge_cap(total)}


def run(cfg: Config, inputs: dict[str, Path], out: Path) -> dict:
    qm = load_quantized(Path(inputs["gptq"]) / "quantized.safetensors")
    started = time.perf_counter()
    blob, raw_sizes = pack(qm, cfg.compressor, cfg.level, cfg.layout, cfg.sort_rows)
    pack_seconds = time.perf_counter() - started
    restored = unpack(blob, "packed artifact")
    unpack_seconds = time.perf_counter() - started - pack_seconds
    for name, tensor in qm.tensors.items():
        if not tensor.equal(restored.tensors[name]):
            raise AssertionError(f"pack round trip changed tensor {name}")
    if cfg.code_file:
        files, code = [Path(cfg.code_file)], wrapped_size(Path(cfg.code_file).read_text(encoding="utf-8"))
    else:
        files = import_closure(EVAL_ENTRY, ROOT)
        code = code_bytes(files)
    counted = counted_bytes(len(blob), code, cfg.cap_bytes)
    total = counted["total_bytes"]
    size = {
        **counted,
        "code_files": [str(f.relative_to(ROOT)) if f.is_relative_to(ROOT) else f.name for f in files],
        # What the same code would count as one self-extracting script (R1's rule); the count above
        # stays the files as they are until the export bundles them into that script.
        "code_bytes_wrapped_estimate": wrapped_size("\n".join(f.read_text(encoding="utf-8") for f in files)),
        "non_record": cfg.non_record,
        "compressor": cfg.compressor,
        "layout": cfg.layout,
        "payload_bytes": sum(raw_sizes.values()),
        "streams": stream_choices(blob),
        "groups": group_sizes(qm, raw_sizes, cfg.compressor, cfg.level),
    }
    if total > cfg.cap_bytes:
        raise CapExceededError(
            f"artifact is {total:,} bytes (model {len(blob):,} + code {code:,}), {total - cfg.cap_bytes:,} bytes over "
            f"the {cfg.cap_bytes:,}-byte cap; quantize harder (gptq.bits), shrink the model or try another compressor",
            Path(inputs["gptq"]) / "quantized.safetensors")
    record_timings(out, pack_seconds=round(pack_seconds, 3), unpack_seconds=round(unpack_seconds, 3))
    (out / "artifact.bin").write_bytes(blob)
    write_json(out / "size.json", size)
    (out / "bytes_by_group.svg").write_text(
        bytes_chart(size["groups"], f"artifact {total:,} bytes ({cfg.compressor}, {cfg.layout})"), encoding="utf-8")
    return {k: v for k, v in size.items() if isinstance(v, (int, float, str))}


SPEC = StageSpec(name="pack", config_cls=Config, run=run, out="artifacts/pack",
                 inputs={"gptq": "artifacts/gptq"}, producers={"gptq": "gptq"})

if __name__ == "__main__":
    sys.exit(stage_main(SPEC))
