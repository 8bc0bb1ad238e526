"""Artifacts of the R1 lineage (final_model.int6.ptz), read into pgolf's quantized model.

A judge rescoring a submission needs its model, not its script: this reads what R1's serialize()
writes (docs/lineage.md#model-formats), and PR #2135's (#pr2135), with code of its own, and hands
pgolf's eval the same weights their deserialize() gives their own eval. Container forms:

  pergroup   (R1) b"PGRP" | u32 n | n x u32 length | n streams: one per code family in R1's group
             order (each lrzip'd: int8 codes of that family's matrices, layers in order, each
             stored transposed; rows of three families permuted by L1 similarity), then the
             rest (torch.save {"r": tensors, "m": kinds, "s": shapes}, brotli), then the row
             permutations (u16, brotli)
  pergroup2  (PR #2135) b"PGRP" | u32 version 2 | u32 n | per code tensor, by name: u16 name
             length, name, u32 rows, u32 cols, rows x u16 permutation | u8 coder (0 brotli,
             1 lrzip) | u32 size | the codes, every tensor's rows permuted and stored
             transposed, one after another | u32 size | the rest (torch.save {"w", "m"},
             byte-shuffled, brotli)
  flat       torch.save {"w": tensors, "m": kinds}, brotli or lzma (PR #2135: byte-shuffled first)

Only tensors and plain containers are unpickled (torch.load weights_only): an artifact cannot
run code. The kinds R1 records ("gptq (int6)+lqer_asym", "gate_int8_row", "passthrough
(float16)") map onto pgolf's entries; R1's tensor names onto pgolf's parameter names.
"""
from __future__ import annotations

import io
import lzma
import re
import struct
from pathlib import Path

import brotli
import numpy as np
import torch

from pgolf.errors import FormatError, InputError
from pgolf.pack.compress import decompress
from pgolf.quant.quantized_model import QuantizedModel

PACK_MAGIC = b"PGRP"
# R1's _GROUP_ORDER: a leading "_" marks a tensor outside the blocks
GROUP_ORDER = ("_tok_emb.weight.q", "attn.c_k.weight.q", "attn.c_q.weight.q", "attn.c_v.weight.q",
               "attn.proj.weight.q", "mlp.fc.weight.q", "mlp.proj.weight.q")
SORTED_GROUPS = frozenset({"_tok_emb.weight.q", "attn.c_q.weight.q", "mlp.fc.weight.q"})
# R1 keeps per-layer lane mixes as one [num_layers, ...] tensor; pgolf has one per block.
LAYER_STACKED = ("parallel_post_lambdas", "parallel_resid_lambdas")
RENAMED = {"smear_gate.weight": "smear.gate", "smear_lambda": "smear.lam",
           "softcap_pos": "softcap.pos", "softcap_neg": "softcap.neg"}  # PR #2135's AsymLogit pair
PGRP_VERSION = 2  # PR #2135's frame; R1's has the stream count (9) in that place
SHUFFLE_MAGIC = b"BSHF"  # PR #2135's _byte_shuffle header: magic, stride, then the bytes by stride phase
# R1's deserialize() builds its eval model in bf16 and returns every tensor but the token
# embedding to fp32 (restore_fp32_params): the embedding it scores with is bf16-rounded.
BF16_IN_R1_EVAL = frozenset({"tok_emb.weight"})


def detect_format(blob: bytes) -> str:
    if blob[:4] == PACK_MAGIC:
        return "pergroup2" if blob[4:8] == struct.pack("<I", PGRP_VERSION) else "pergroup"
    if blob[:6] == b"\xfd7zXZ\x00":
        return "lzma"
    return "brotli"


def _torch_load(raw: bytes, what: str, source: Path):
    try:
        return torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises several types for a bad or unsafe pickle
        raise FormatError(f"{what} is not a tensors-only torch.save ({err})", source) from err


def _unpack_streams(blob: bytes, source: Path) -> list[bytes]:
    try:
        (count,) = struct.unpack_from("<I", blob, 4)
        lengths = struct.unpack_from(f"<{count}I", blob, 8)
    except struct.error as err:
        raise FormatError(f"truncated R1 pergroup header ({err})", source) from err
    offset, streams = 8 + 4 * count, []
    for length in lengths:
        streams.append(blob[offset:offset + length])
        offset += length
    if offset != len(blob) or count != len(GROUP_ORDER) + 2:
        raise FormatError(f"R1 pergroup container: {count} streams ending at byte {offset} of {len(blob)} "
                          f"(expected {len(GROUP_ORDER) + 2} streams filling the file)", source)
    return streams


def _read_pergroup(blob: bytes, num_layers: int, source: Path) -> tuple[dict, dict]:
    streams = _unpack_streams(blob, source)
    rest = _torch_load(brotli.decompress(streams[len(GROUP_ORDER)]), "the remainder stream", source)
    result, kinds, shapes = dict(rest["r"]), rest["m"], rest["s"]
    perms = np.frombuffer(brotli.decompress(streams[-1]), dtype="<u2") if streams[-1] else np.empty(0, "<u2")
    used = 0
    for group, stored in zip(GROUP_ORDER, streams):
        if not stored:
            continue
        data = np.frombuffer(decompress(stored, "lrzip"), dtype=np.int8)
        names = [group[1:]] if group.startswith("_") else [f"blocks.{i}.{group}" for i in range(num_layers)]
        offset = 0
        for name, shape in zip(names, shapes[group]):
            count = int(np.prod(shape))
            codes = data[offset:offset + count]
            offset += count
            if len(shape) == 2:
                rows, cols = shape
                codes = codes.reshape(cols, rows).T
                if group in SORTED_GROUPS:
                    order = perms[used:used + rows].astype(np.int64)
                    used += rows
                    restored = np.empty_like(codes)
                    restored[order] = codes
                    codes = restored
            result[name] = torch.from_numpy(np.ascontiguousarray(codes).reshape(shape))
        if offset != len(data):
            raise FormatError(f"group {group}: {len(data) - offset} code bytes left over (num_layers "
                              f"{num_layers} is not the artifact's?)", source)
    return result, kinds


def byte_unshuffle(data: bytes) -> bytes:
    """PR #2135's _byte_unshuffle: data that does not start with its header is returned as it is."""
    if len(data) < 5 or data[:4] != SHUFFLE_MAGIC:
        return data
    stride, payload = data[4], np.frombuffer(data, dtype=np.uint8, offset=5)
    if stride < 2:
        return payload.tobytes()
    out = np.empty(len(payload), dtype=np.uint8)
    offset = 0
    for phase in range(stride):
        count = len(payload) // stride + (1 if phase < len(payload) % stride else 0)
        out[phase::stride] = payload[offset:offset + count]
        offset += count
    return out.tobytes()


def _read_pergroup2(blob: bytes, source: Path) -> tuple[dict, dict]:
    try:
        (count,) = struct.unpack_from("<I", blob, 8)
        offset, layout = 12, []
        for _ in range(count):
            (length,) = struct.unpack_from("<H", blob, offset)
            name = blob[offset + 2:offset + 2 + length].decode()
            rows, cols = struct.unpack_from("<II", blob, offset + 2 + length)
            offset += 10 + length
            perm = np.frombuffer(blob, dtype="<u2", count=rows, offset=offset).astype(np.int64)
            offset += 2 * rows
            layout.append((name, rows, cols, perm))
        coder, size = struct.unpack_from("<BI", blob, offset)
        codes_blob = blob[offset + 5:offset + 5 + size]
        offset += 5 + size
        (rest_size,) = struct.unpack_from("<I", blob, offset)
        rest_blob = blob[offset + 4:offset + 4 + rest_size]
        end = offset + 4 + rest_size
    except (struct.error, UnicodeDecodeError, ValueError) as err:
        raise FormatError(f"truncated PR #2135 pergroup frame ({err})", source) from err
    if end != len(blob) or len(codes_blob) != size or len(rest_blob) != rest_size or coder not in (0, 1):
        raise FormatError(f"PR #2135 pergroup frame: its sections end at byte {end} of {len(blob)} "
                          f"(coder {coder}); the file is truncated or not this format", source)
    try:
        rest = _torch_load(byte_unshuffle(brotli.decompress(rest_blob)), "the remainder section", source)
        data = np.frombuffer(decompress(codes_blob, "lrzip") if coder == 1 else brotli.decompress(codes_blob),
                             dtype=np.int8)
    except brotli.error as err:
        raise FormatError(f"PR #2135 pergroup frame: a section does not decompress ({err})", source) from err
    result, used = dict(rest["w"]), 0
    for name, rows, cols, perm in layout:
        stored = data[used:used + rows * cols]
        used += rows * cols
        if len(stored) != rows * cols or sorted(perm.tolist()) != list(range(rows)):
            raise FormatError(f"PR #2135 pergroup frame: tensor {name} ({rows} x {cols}) runs past the codes "
                              "or its row permutation is not one", source)
        codes = np.empty((rows, cols), dtype=np.int8)
        codes[perm] = stored.reshape(cols, rows).T  # stored: the permuted rows, transposed
        result[name] = torch.from_numpy(codes)
    if used != len(data):
        raise FormatError(f"PR #2135 pergroup frame: {len(data) - used} code bytes left over", source)
    return result, dict(rest["m"])


def read_r1_artifact(path: str | Path, num_layers: int) -> tuple[dict[str, torch.Tensor], dict[str, str], str]:
    """R1's quantized tensors and their kinds, by R1's names, and the container form."""
    path = Path(path)
    if not path.is_file():
        raise InputError("R1 artifact not found", path)
    blob = path.read_bytes()
    form = detect_format(blob)
    if form == "pergroup":
        return (*_read_pergroup(blob, num_layers, path), form)
    if form == "pergroup2":
        return (*_read_pergroup2(blob, path), form)
    try:
        raw = byte_unshuffle(lzma.decompress(blob) if form == "lzma" else brotli.decompress(blob))
    except (lzma.LZMAError, brotli.error) as err:
        raise FormatError(f"neither an R1 pergroup container nor {form}-compressed ({err})", path) from err
    state = _torch_load(raw, "the artifact", path)
    if not isinstance(state, dict) or not {"w", "m"} <= set(state):
        raise FormatError("expected R1's {'w': tensors, 'm': kinds}", path)
    return dict(state["w"]), dict(state["m"]), form


def pgolf_name(r1_name: str) -> str:
    if r1_name in RENAMED:
        return RENAMED[r1_name]
    return re.sub(r"^(blocks\.\d+\.attn)\.attn_gate_w$", r"\1.gate.attn_gate_w", r1_name)


def to_quantized_model(result: dict[str, torch.Tensor], kinds: dict[str, str], model_config: dict,
                       shapes: dict[str, list[int]], source: Path) -> QuantizedModel:
    """R1's tensors under pgolf's names and entries; `shapes` are the pgolf model's parameters."""
    tensors, entries = {}, {}

    def add(name: str, entry: dict, stored: dict[str, torch.Tensor]) -> None:
        if name not in shapes:
            raise FormatError(f"R1 tensor for {name} has no parameter in the pgolf model (another R1 variant? "
                              "pass its hyperparameters with --set train.model.KEY=VALUE)", source)
        dtype = "bfloat16" if name in BF16_IN_R1_EVAL else "float32"
        entries[name] = {"shape": shapes[name], "dtype": dtype, **entry}
        tensors.update(stored)

    for r1_name, kind in sorted(kinds.items()):
        if kind.startswith("passthrough"):
            value = result[r1_name]
            if r1_name in LAYER_STACKED:
                for i, row in enumerate(value):
                    name = f"blocks.{i}.{r1_name}"
                    # R1 stores a row for every layer and reads only those of layers with lanes; a
                    # pgolf model without lanes has no such parameters
                    if name in shapes:
                        add(name, {"kind": "passthrough"}, {name: row.clone()})
                continue
            name = pgolf_name(r1_name)
            add(name, {"kind": "passthrough"}, {name: value})
        elif kind == "gate_int8_row":
            name = pgolf_name(r1_name)
            add(name, {"kind": "int8_row", "bits": 8},
                {f"{name}.q": result[f"{r1_name}.gq"], f"{name}.scale": result[f"{r1_name}.gs"]})
        elif (found := re.fullmatch(r"gptq \(int(\d+)\)(\+lqer_asym|\+lqer)?", kind)):
            name = pgolf_name(r1_name)
            stored = {f"{name}.q": result[f"{r1_name}.q"], f"{name}.scale": result[f"{r1_name}.scale"]}
            entry = {"kind": "gptq", "bits": int(found.group(1))}
            if found.group(2):
                suffixes = (".lqA_a", ".lqAs_a", ".lqB_a", ".lqBs_a") if found.group(2) == "+lqer_asym" else \
                    (".lqA", ".lqAs", ".lqB", ".lqBs")
                factors = {s: result[r1_name + s] for s in suffixes}
                stored.update({name + s: t for s, t in factors.items()})
                qa, qb, sb = factors[suffixes[0]], factors[suffixes[2]], factors[suffixes[3]]
                entry["lqer"] = {"rank": int(qa.shape[1]), "group": int(qb.numel() // max(sb.numel(), 1)),
                                 "asym": found.group(2) == "+lqer_asym"}
            add(name, entry, stored)
        else:
            raise FormatError(f"tensor {r1_name}: R1 kind {kind!r} is not one this reader knows", source)
    missing = sorted(set(shapes) - set(entries))
    if missing:
        raise FormatError(f"the artifact has no tensor for {len(missing)} parameter(s) of the pgolf model: "
                          f"{missing[:6]}{' ...' if len(missing) > 6 else ''} (another R1 variant? check the "
                          "model config)", source)
    return QuantizedModel(model_config, tensors, entries)


def load_r1_artifact(path: str | Path, model_config: dict) -> tuple[QuantizedModel, str]:
    """An R1-lineage artifact as a pgolf QuantizedModel for `model_config` (a ModelConfig's dict);
    returns it with the container form."""
    from pgolf.model.gpt import GPT
    from pgolf.model.io import model_config_from_dict

    cfg = model_config_from_dict(model_config)
    shapes = {name: list(t.shape) for name, t in GPT(cfg).state_dict().items()}
    result, kinds, form = read_r1_artifact(path, cfg.num_layers)
    qm = to_quantized_model(result, kinds, model_config, shapes, Path(path))
    try:
        dequantized = qm.dequantize()
    except FormatError as err:
        raise FormatError(f"{err} (is the model config the artifact's?)", path) from err
    del dequantized
    return qm, form
