"""The challenge's binary shard format: 256 x int32 header (magic, version, count), then uint16 tokens.

Readers check everything a truncated or foreign file can get wrong and name the file in the error.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from pgolf.errors import FormatError, InputError

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
MAX_TOKENS = 2**31 - 1


def write_shard(path: str | Path, tokens: np.ndarray) -> None:
    """Write `tokens` (any int dtype, values < 65536) as one shard, atomically."""
    path = Path(path)
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"{path}: tokens must be 1-D, got shape {tokens.shape}")
    if len(tokens) >= MAX_TOKENS:
        raise ValueError(f"{path}: {len(tokens)} tokens do not fit the int32 header")
    if len(tokens) and (tokens.min() < 0 or tokens.max() >= 2**16):
        raise ValueError(f"{path}: token ids must be in [0, 65536) to fit uint16")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[0], header[1], header[2] = SHARD_MAGIC, SHARD_VERSION, len(tokens)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.astype("<u2", copy=False).tobytes())
    os.replace(tmp, path)


def read_header(path: str | Path) -> int:
    """Validate a shard's header and size; return its token count."""
    path = Path(path)
    if not path.is_file():
        raise InputError("shard file not found", path)
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise FormatError(f"truncated shard: {size} bytes is shorter than the {HEADER_BYTES}-byte header", path)
    with open(path, "rb") as f:
        header = np.frombuffer(f.read(HEADER_BYTES), dtype="<i4")
    if header[0] != SHARD_MAGIC:
        raise FormatError(f"wrong magic {int(header[0])} (expected {SHARD_MAGIC}): not a challenge shard", path)
    if header[1] != SHARD_VERSION:
        raise FormatError(f"unsupported shard version {int(header[1])} (expected {SHARD_VERSION})", path)
    count = int(header[2])
    expected = HEADER_BYTES + 2 * count
    if count < 0 or size != expected:
        raise FormatError(
            f"size {size} bytes does not match the header's {count} tokens (expected {expected} bytes); "
            "the file is truncated or was written by a different tool",
            path,
        )
    return count


def read_shard(path: str | Path, vocab_size: int | None = None, mmap: bool = True) -> np.ndarray:
    """Return the shard's tokens as uint16 (memory-mapped by default); check the vocab range if given."""
    path = Path(path)
    count = read_header(path)
    if mmap:
        tokens = np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(count,))
    else:
        tokens = np.fromfile(path, dtype="<u2", offset=HEADER_BYTES, count=count)
    if vocab_size is not None and count:
        top = int(tokens.max())
        if top >= vocab_size:
            raise FormatError(
                f"token id {top} is out of range for vocab size {vocab_size}: the shard was built with a "
                "different tokenizer",
                path,
            )
    return tokens


def shard_name(split: str, index: int) -> str:
    if split not in ("train", "val", "val_bytes"):
        raise ValueError(f"unknown split {split!r}")
    return f"fineweb_{split}_{index:06d}.bin"


def list_shards(folder: str | Path, split: str) -> list[Path]:
    """Sorted shard paths of one split; `val` excludes the `val_bytes` sidecars."""
    folder = Path(folder)
    files = sorted(folder.glob(f"fineweb_{split}_[0-9]*.bin"))
    return files


def load_split(folder: str | Path, split: str, vocab_size: int | None = None) -> np.ndarray:
    """Concatenate every shard of a split into one int32 array (val is small; train uses streaming)."""
    files = list_shards(folder, split)
    if not files:
        raise InputError(f"no fineweb_{split}_*.bin shards found", folder)
    parts = [np.asarray(read_shard(f, vocab_size), dtype=np.int32) for f in files]
    return np.concatenate(parts) if len(parts) > 1 else parts[0]


MANIFEST_NAME = "manifest.json"


def read_manifest(folder: str | Path) -> dict:
    """The shards stage's manifest.json (vocab_size, bos_id, variant, files, stats)."""
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        raise InputError("manifest.json not found: is this a shards stage output?", path)
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise FormatError(f"not valid JSON: {err}", path) from err
    for key in ("vocab_size", "bos_id"):
        if key not in manifest:
            raise FormatError(f"missing key {key!r}", path)
    return manifest


def check_vocab(folder: str | Path, model_vocab_size: int) -> dict:
    """Fail clearly when shards were tokenized with a vocabulary other than the model's."""
    manifest = read_manifest(folder)
    if int(manifest["vocab_size"]) != model_vocab_size:
        raise FormatError(
            f"the shards were built with a {manifest['vocab_size']}-piece tokenizer but the model has "
            f"vocab_size {model_vocab_size}; set the model's vocab_size to match the tokenizer",
            Path(folder) / MANIFEST_NAME,
        )
    return manifest
