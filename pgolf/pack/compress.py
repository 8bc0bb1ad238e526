"""Compressors for the artifact, selected by name, each at its strongest setting by default.

lrzip (ZPAQ back-end, what R1 ships) is a separate binary: asking for it where it is not
installed is a clear error, never a silent fallback.
"""
from __future__ import annotations

import lzma
import shutil
import subprocess
import tempfile
import zlib
from pathlib import Path

import brotli
import numpy as np
import zstandard

from pgolf.errors import PgolfError

COMPRESSORS = ("lzma", "brotli", "zlib", "zstd", "lrzip")
COMPRESSOR_IDS = {name: i for i, name in enumerate(COMPRESSORS, start=1)}


def _lrzip(args: list[str], data: bytes) -> bytes:
    binary = shutil.which("lrzip")
    if binary is None:
        raise PgolfError("compressor 'lrzip' needs the lrzip program, which is not installed here "
                         "(Debian/Ubuntu: apt-get install lrzip); or choose pack.compressor brotli/lzma/zstd")
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "in", Path(tmp) / "out"
        src.write_bytes(data)
        subprocess.run([binary, *args, "-q", "-f", "-o", str(dst), str(src)], check=True, capture_output=True)
        return dst.read_bytes()


def compress(data: bytes, name: str, level: int = -1) -> bytes:
    if name == "lzma":
        preset = 9 | lzma.PRESET_EXTREME if level < 0 else level
        return lzma.compress(data, format=lzma.FORMAT_XZ, preset=preset)
    if name == "brotli":
        return brotli.compress(data, quality=11 if level < 0 else level, lgwin=24)
    if name == "zlib":
        return zlib.compress(data, 9 if level < 0 else level)
    if name == "zstd":
        return zstandard.ZstdCompressor(level=22 if level < 0 else level).compress(data)
    if name == "lrzip":
        return _lrzip(["-z", "-L", str(9 if level < 0 else level)], data)
    raise ValueError(f"unknown compressor {name!r}; choose one of {COMPRESSORS}")


def decompress(data: bytes, name: str) -> bytes:
    if name == "lzma":
        return lzma.decompress(data)
    if name == "brotli":
        return brotli.decompress(data)
    if name == "zlib":
        return zlib.decompress(data)
    if name == "zstd":
        return zstandard.ZstdDecompressor().decompress(data)
    if name == "lrzip":
        return _lrzip(["-d"], data)
    raise ValueError(f"unknown compressor {name!r}; choose one of {COMPRESSORS}")


def available(name: str) -> bool:
    return name != "lrzip" or shutil.which("lrzip") is not None


# compressor "best": every stream is stored with whichever of these (that is installed) makes it smallest
BEST_CANDIDATES = ("lrzip", "lzma", "brotli", "zstd")


def best_candidates() -> tuple[str, ...]:
    return tuple(name for name in BEST_CANDIDATES if available(name))


def byte_shuffle(data: bytes, stride: int = 2) -> bytes:
    """Byte k of every stride-byte word together (R0409's BSHF): the high bytes of fp16 values repeat
    far more than the low ones, and the coder sees them as one run."""
    usable = len(data) - len(data) % stride
    words = np.frombuffer(data, dtype=np.uint8, count=usable).reshape(-1, stride)
    return words.T.tobytes() + data[usable:]


def byte_unshuffle(data: bytes, stride: int = 2) -> bytes:
    usable = len(data) - len(data) % stride
    planes = np.frombuffer(data, dtype=np.uint8, count=usable).reshape(stride, -1)
    return planes.T.tobytes() + data[usable:]
