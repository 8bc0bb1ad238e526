"""Compressors for the artifact, selected by name, each at its strongest setting by default."""
from __future__ import annotations

import lzma
import zlib

import brotli

COMPRESSORS = ("lzma", "brotli", "zlib")
COMPRESSOR_IDS = {name: i for i, name in enumerate(COMPRESSORS, start=1)}


def compress(data: bytes, name: str, level: int = -1) -> bytes:
    if name == "lzma":
        preset = 9 | lzma.PRESET_EXTREME if level < 0 else level
        return lzma.compress(data, format=lzma.FORMAT_XZ, preset=preset)
    if name == "brotli":
        return brotli.compress(data, quality=11 if level < 0 else level, lgwin=24)
    if name == "zlib":
        return zlib.compress(data, 9 if level < 0 else level)
    raise ValueError(f"unknown compressor {name!r}; choose one of {COMPRESSORS}")


def decompress(data: bytes, name: str) -> bytes:
    if name == "lzma":
        return lzma.decompress(data)
    if name == "brotli":
        return brotli.decompress(data)
    if name == "zlib":
        return zlib.decompress(data)
    raise ValueError(f"unknown compressor {name!r}; choose one of {COMPRESSORS}")
