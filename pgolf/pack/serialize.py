"""artifact.bin: the quantized model in one self-describing, compressed, checksummed binary.

    outer:   b"PGLF" | u16 format version | u8 compressor id | u64 payload length | sha256(payload) | compressed payload
    payload: u32 header length | header JSON | tensor bytes, in the header's order (sorted names)

No pickle: the header says each tensor's name, dtype, shape, offset and length, and the model
config, so the artifact alone is enough to rebuild the model for evaluation.
"""
from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import numpy as np
import torch

from pgolf.errors import FormatError, InputError
from pgolf.pack.compress import COMPRESSOR_IDS, compress, decompress
from pgolf.quant.format import QUANT_FORMAT, QuantizedModel

MAGIC = b"PGLF"
FORMAT_VERSION = 1
OUTER = struct.Struct("<4sHBQ32s")
DTYPES = {"int8": torch.int8, "float16": torch.float16, "float32": torch.float32, "int64": torch.int64,
          "int32": torch.int32, "bfloat16": torch.bfloat16, "uint8": torch.uint8}


def tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().tobytes()
    return t.numpy().tobytes()


def serialize_payload(qm: QuantizedModel) -> tuple[bytes, dict[str, int]]:
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
    header = json.dumps({"format": QUANT_FORMAT, "model": qm.model_config, "entries": qm.entries, "tensors": layout},
                        sort_keys=True, separators=(",", ":")).encode("utf-8")
    return struct.pack("<I", len(header)) + header + b"".join(chunks), sizes


def deserialize_payload(payload: bytes, source: str | Path) -> QuantizedModel:
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
        if dtype == torch.bfloat16:
            t = torch.from_numpy(np.frombuffer(raw, dtype=np.int16).copy()).view(torch.bfloat16)
        else:
            t = torch.frombuffer(bytearray(raw), dtype=dtype)
        tensors[item["name"]] = t.reshape(item["shape"])
    return QuantizedModel(header["model"], tensors, header["entries"])


def pack(qm: QuantizedModel, compressor: str, level: int = -1) -> tuple[bytes, dict[str, int]]:
    payload, sizes = serialize_payload(qm)
    body = compress(payload, compressor, level)
    outer = OUTER.pack(MAGIC, FORMAT_VERSION, COMPRESSOR_IDS[compressor], len(payload), hashlib.sha256(payload).digest())
    return outer + body, sizes


def unpack(blob: bytes, source: str | Path = "artifact") -> QuantizedModel:
    if len(blob) < OUTER.size:
        raise FormatError(f"truncated artifact: {len(blob)} bytes is shorter than its {OUTER.size}-byte header", source)
    magic, version, comp_id, length, digest = OUTER.unpack_from(blob, 0)
    if magic != MAGIC:
        raise FormatError(f"wrong magic {magic!r} (expected {MAGIC!r}): not a pgolf artifact", source)
    if version != FORMAT_VERSION:
        raise FormatError(f"unsupported artifact format version {version} (this pgolf reads {FORMAT_VERSION}); "
                          "repack it with this version's pack stage", source)
    names = {v: k for k, v in COMPRESSOR_IDS.items()}
    if comp_id not in names:
        raise FormatError(f"unknown compressor id {comp_id}", source)
    try:
        payload = decompress(blob[OUTER.size:], names[comp_id])
    except Exception as err:  # noqa: BLE001 - each codec raises its own error type on corrupt input
        raise FormatError(f"cannot decompress ({names[comp_id]}): the artifact is truncated or corrupt ({err})", source) from err
    if len(payload) != length or hashlib.sha256(payload).digest() != digest:
        raise FormatError("payload checksum mismatch: the artifact is corrupt", source)
    return deserialize_payload(payload, source)


def load_artifact(path: str | Path) -> QuantizedModel:
    path = Path(path)
    if not path.is_file():
        raise InputError("artifact not found: run the pack stage first (dvc repro pack)", path)
    return unpack(path.read_bytes(), path)
