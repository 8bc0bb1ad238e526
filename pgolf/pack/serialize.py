"""artifact.bin: the quantized model in one self-describing, compressed, checksummed binary.

    container: b"PGLF" | u16 format version | u8 layout | u8 compressor id (0: best) | u32 stream count
               | per stream: u64 raw length, u64 stored length, sha256(raw), u8 compressor id,
                 u8 transform (0: none, 1: 2-byte shuffle) | the stored streams
    payload:   u32 header length | header JSON | tensor bytes, in the header's order (sorted names)

Layout `flat` compresses one payload stream. Layout `pergroup` (R1, docs/lineage.md#model-formats) gives each
family of int codes its own stream, layers in order, each matrix optionally row-sorted by greedy
L1 nearest neighbour and stored transposed (column-major), so the coder sees long runs of
similar bytes; the payload stream keeps everything else and the row orders go in a last stream.
No pickle anywhere: the artifact alone is enough to rebuild the model for evaluation.

Compressor `best` stores each stream with whichever candidate compressor (lrzip when installed,
lzma, brotli, zstd), and for the payload stream with or without a 2-byte shuffle, makes it
smallest: for the same quantized model and layout it is never larger than any single compressor,
R1's pergroup + lrzip included.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from pgolf.errors import FormatError, InputError, PgolfError
from pgolf.pack.compress import COMPRESSOR_IDS, best_candidates, byte_shuffle, byte_unshuffle, compress, decompress
from pgolf.quant.quantized_model import QUANT_FORMAT, QuantizedModel

MAGIC = b"PGLF"
FORMAT_VERSION = 3
CONTAINER = struct.Struct("<4sHBBI")
STREAM = struct.Struct("<QQ32sBB")
BEST = 0  # the container's compressor id when each stream picked its own
TRANSFORMS = ("none", "shuffle2")
LAYOUTS = ("flat", "pergroup")
# R1's _GROUP_ORDER, by the suffix of the code tensors' names
GROUP_ORDER = ("tok_emb.weight.q", "attn.c_k.weight.q", "attn.c_q.weight.q", "attn.c_v.weight.q",
               "attn.proj.weight.q", "mlp.fc.weight.q", "mlp.proj.weight.q")
SORTED_GROUPS = ("tok_emb.weight.q", "attn.c_q.weight.q", "mlp.fc.weight.q")  # R1 sorts only these
DTYPES = {"int8": torch.int8, "float16": torch.float16, "float32": torch.float32, "int64": torch.int64,
          "int32": torch.int32, "bfloat16": torch.bfloat16, "uint8": torch.uint8}


def tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().tobytes()
    return t.numpy().tobytes()


def serialize_payload(qm: QuantizedModel, extra: dict | None = None) -> tuple[bytes, dict[str, int]]:
    """Return (payload bytes, raw bytes per stored tensor)."""
    layout, chunks, offset = [], [], 0
    sizes = {}
    for name in sorted(qm.tensors):
        t = qm.tensors[name]
        data = tensor_bytes(t)
        dtype = str(t.dtype).removeprefix("torch.")
        if dtype not in DTYPES:
            raise FormatError(f"tensor {name}: dtype {dtype} cannot be packed")
        layout.append({"name": name, "dtype": dtype, "shape": list(t.shape), "offset": offset, "nbytes": len(data)})
        chunks.append(data)
        sizes[name] = len(data)
        offset += len(data)
    header = json.dumps({"format": QUANT_FORMAT, "model": qm.model_config, "entries": qm.entries, "tensors": layout,
                         **(extra or {})},
                        sort_keys=True, separators=(",", ":")).encode("utf-8")
    return struct.pack("<I", len(header)) + header + b"".join(chunks), sizes


def deserialize_payload(payload: bytes, source: str | Path, with_header: bool = False):
    try:
        (header_len,) = struct.unpack_from("<I", payload, 0)
        header = json.loads(payload[4:4 + header_len].decode("utf-8"))
    except (struct.error, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise FormatError(f"artifact header is unreadable ({err})", source) from err
    base = 4 + header_len
    tensors = {}
    for item in header["tensors"]:
        start, end = base + item["offset"], base + item["offset"] + item["nbytes"]
        if end > len(payload):
            raise FormatError(f"tensor {item['name']} runs past the end of the payload", source)
        dtype = DTYPES[item["dtype"]]
        raw = payload[start:end]
        if not raw:  # a zero-size tensor (skip weights of a model too shallow for skips)
            t = torch.empty(item["shape"], dtype=dtype)
        elif dtype == torch.bfloat16:
            t = torch.from_numpy(np.frombuffer(raw, dtype=np.int16).copy()).view(torch.bfloat16)
        else:
            t = torch.frombuffer(bytearray(raw), dtype=dtype)
        tensors[item["name"]] = t.reshape(item["shape"])
    ends = [base + item["offset"] + item["nbytes"] for item in header["tensors"]]
    if max(ends, default=base) != len(payload):
        raise FormatError(f"the payload holds {len(payload) - max(ends, default=base):,} bytes its header does not "
                          "describe", source)
    qm = QuantizedModel(header["model"], tensors, header["entries"])
    return (qm, header) if with_header else qm


def group_of(name: str) -> str | None:
    for group in GROUP_ORDER:
        if name == group or name.endswith("." + group):
            return group
    return None


def _layer(name: str) -> int:
    parts = name.split(".")
    return int(parts[1]) if parts[0] == "blocks" and parts[1].isdigit() else -1


def similarity_order(rows: np.ndarray) -> np.ndarray:
    """Greedy L1 nearest-neighbour chain from row 0 (ties to the lowest index: deterministic)."""
    data = rows.astype(np.int16)
    remaining = np.ones(len(rows), dtype=bool)
    order = np.empty(len(rows), dtype=np.int64)
    current = 0
    for k in range(len(rows)):
        order[k] = current
        remaining[current] = False
        if k == len(rows) - 1:
            break
        candidates = np.flatnonzero(remaining)
        distances = np.abs(data[candidates] - data[current]).sum(axis=1)
        current = int(candidates[np.argmin(distances)])
    return order


def _streams_pergroup(qm: QuantizedModel, sort_rows: bool) -> list[bytes]:
    members: dict[str, list[str]] = {}
    for name, t in qm.tensors.items():
        group = group_of(name)
        if group is not None and t.dtype == torch.int8 and t.ndim == 2:
            members.setdefault(group, []).append(name)
    groups, streams, perms = [], [], []
    for group in GROUP_ORDER:
        names = sorted(members.get(group, []), key=lambda n: (_layer(n), n))
        chunks, layout = [], []
        for name in names:
            codes = qm.tensors[name].numpy()
            permuted = sort_rows and group in SORTED_GROUPS and codes.shape[0] < 2**16
            if permuted:
                order = similarity_order(codes)
                codes = codes[order]
                perms.append(order.astype("<u2").tobytes())
            chunks.append(np.ascontiguousarray(codes.T).tobytes())
            layout.append({"name": name, "shape": list(qm.tensors[name].shape), "permuted": bool(permuted)})
        groups.append({"group": group, "members": layout})
        streams.append(b"".join(chunks))
    grouped = {m["name"] for g in groups for m in g["members"]}
    remainder = QuantizedModel(qm.model_config, {k: v for k, v in qm.tensors.items() if k not in grouped}, qm.entries)
    payload, _ = serialize_payload(remainder, extra={"groups": groups})
    return [payload, *streams, b"".join(perms)]


def _unpack_pergroup(streams: list[bytes], source) -> QuantizedModel:
    qm, header = deserialize_payload(streams[0], source, with_header=True)
    perms = np.frombuffer(streams[-1], dtype="<u2")
    perm_offset = 0
    for group, data in zip(header["groups"], streams[1:-1]):
        offset = 0
        for member in group["members"]:
            rows, cols = member["shape"]
            chunk = np.frombuffer(data, dtype=np.int8, count=rows * cols, offset=offset)
            offset += rows * cols
            codes = chunk.reshape(cols, rows).T
            if member["permuted"]:
                order = perms[perm_offset:perm_offset + rows].astype(np.int64)
                perm_offset += rows
                restored = np.empty_like(codes)
                restored[order] = codes
                codes = restored
            qm.tensors[member["name"]] = torch.from_numpy(np.ascontiguousarray(codes))
        if offset != len(data):
            raise FormatError(f"group {group['group']}: {len(data) - offset} bytes left over", source)
    return qm


def store_stream(raw: bytes, compressor: str, level: int, try_shuffle: bool) -> tuple[bytes, str, str]:
    """(stored bytes, compressor, transform) of one stream; with `best`, the smallest of the candidates."""
    if not raw:
        return b"", compressor if compressor != "best" else "zlib", "none"
    if compressor != "best":
        return compress(raw, compressor, level), compressor, "none"
    options = []
    for name in best_candidates():
        options.append((compress(raw, name, level), name, "none"))
        if try_shuffle:
            options.append((compress(byte_shuffle(raw), name, level), name, "shuffle2"))
    return min(options, key=lambda o: (len(o[0]), o[1], o[2]))


def pack(qm: QuantizedModel, compressor: str, level: int = -1, layout: str = "flat",
         sort_rows: bool = False) -> tuple[bytes, dict[str, int]]:
    """Return (artifact bytes, raw bytes per stored tensor)."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {LAYOUTS}")
    payload, sizes = serialize_payload(qm)
    raw_streams = [payload] if layout == "flat" else _streams_pergroup(qm, sort_rows)
    # Only the payload stream holds fp16 scales and passthrough tensors; the others are int8 codes.
    with ThreadPoolExecutor(max_workers=max(1, min(len(raw_streams), os.cpu_count() or 1))) as pool:
        stored = list(pool.map(lambda i: store_stream(raw_streams[i], compressor, level, try_shuffle=i == 0),
                               range(len(raw_streams))))
    head = CONTAINER.pack(MAGIC, FORMAT_VERSION, LAYOUTS.index(layout),
                          BEST if compressor == "best" else COMPRESSOR_IDS[compressor], len(stored))
    table = b"".join(STREAM.pack(len(r), len(c), hashlib.sha256(r).digest(), COMPRESSOR_IDS[name],
                                 TRANSFORMS.index(transform))
                     for r, (c, name, transform) in zip(raw_streams, stored))
    return head + table + b"".join(c for c, _, _ in stored), sizes


def stream_choices(blob: bytes) -> list[dict]:
    """What each stream of an artifact was stored with (for size.json)."""
    _, _, _, _, count = CONTAINER.unpack_from(blob, 0)
    names = {v: k for k, v in COMPRESSOR_IDS.items()}
    rows = []
    for i in range(count):
        raw_len, stored_len, _, comp_id, transform = STREAM.unpack_from(blob, CONTAINER.size + i * STREAM.size)
        rows.append({"raw_bytes": raw_len, "stored_bytes": stored_len, "compressor": names[comp_id],
                     "transform": TRANSFORMS[transform]})
    return rows


def unpack(blob: bytes, source: str | Path = "artifact") -> QuantizedModel:
    if len(blob) < CONTAINER.size:
        raise FormatError(f"truncated artifact: {len(blob)} bytes is shorter than its {CONTAINER.size}-byte header", source)
    magic, version, layout, comp_id, count = CONTAINER.unpack_from(blob, 0)
    if magic != MAGIC:
        raise FormatError(f"wrong magic {magic!r} (expected {MAGIC!r}): not a pgolf artifact", source)
    if version != FORMAT_VERSION:
        raise FormatError(f"unsupported artifact format version {version} (this pgolf reads {FORMAT_VERSION}); "
                          "repack it with this version's pack stage", source)
    names = {v: k for k, v in COMPRESSOR_IDS.items()}
    if (comp_id not in names and comp_id != BEST) or layout >= len(LAYOUTS):
        raise FormatError(f"unknown compressor id {comp_id} or layout {layout}", source)
    offset = CONTAINER.size + count * STREAM.size
    if len(blob) < offset:
        raise FormatError("truncated artifact: the stream table is cut off", source)
    table = []
    for i in range(count):
        raw_len, stored_len, digest, stream_comp, transform = STREAM.unpack_from(blob, CONTAINER.size + i * STREAM.size)
        if stream_comp not in names or transform >= len(TRANSFORMS):
            raise FormatError(f"stream {i}: unknown compressor id {stream_comp} or transform {transform}", source)
        stored = blob[offset:offset + stored_len]
        offset += stored_len
        if len(stored) != stored_len:
            raise FormatError(f"truncated artifact: stream {i} is cut off", source)
        table.append((i, stored, raw_len, digest, names[stream_comp], TRANSFORMS[transform]))
    if offset != len(blob):
        # Bytes nobody reads would still count against the cap, or hide something: refused.
        raise FormatError(f"{len(blob) - offset:,} bytes follow the last stream ({offset:,} bytes by its own "
                          "table): the artifact was appended to or is not one pack wrote", source)
    # Streams decode in parallel, as R1 runs one lrzip per group: the slow coders dominate loading.
    with ThreadPoolExecutor(max_workers=max(1, min(len(table), os.cpu_count() or 1))) as pool:
        streams = list(pool.map(lambda entry: _decode_stream(*entry, source), table))
    if LAYOUTS[layout] == "flat":
        return deserialize_payload(streams[0], source)
    return _unpack_pergroup(streams, source)


def _decode_stream(index: int, stored: bytes, raw_len: int, digest: bytes, compressor: str, transform: str,
                   source) -> bytes:
    try:
        raw = decompress(stored, compressor) if stored else b""
    except PgolfError:
        raise
    except Exception as err:  # noqa: BLE001 - each codec raises its own error type on corrupt input
        raise FormatError(f"cannot decompress stream {index} ({compressor}): the artifact is truncated or "
                          f"corrupt ({err})", source) from err
    if transform == "shuffle2":
        raw = byte_unshuffle(raw)
    if len(raw) != raw_len or hashlib.sha256(raw).digest() != digest:
        raise FormatError(f"stream {index}: checksum mismatch, the artifact is corrupt", source)
    return raw


def load_artifact(path: str | Path) -> QuantizedModel:
    path = Path(path)
    if not path.is_file():
        raise InputError("artifact not found: run the pack stage first (dvc repro pack)", path)
    return unpack(path.read_bytes(), path)
