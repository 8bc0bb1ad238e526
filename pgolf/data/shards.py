"""The challenge's binary shard format: 256 x int32 header (magic, version, count), then uint16 tokens.

Readers check everything a truncated or foreign file can get wrong and name the file in the error.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
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


# The shards stage writes each split into its own subfolder, so that DVC tracks them as separate
# outputs and a judge pulls the val shards without the training ones (eval's deps name only val/
# and the manifest). A published folder (the challenge's fineweb10B_sp1024) is flat; both are read.
SPLIT_FOLDERS = {"train": "train", "val": "val", "val_bytes": "val"}


def shard_path(folder: str | Path, split: str, index: int) -> Path:
    """Where the shards stage writes shard `index` of `split` (its split's subfolder)."""
    return Path(folder) / SPLIT_FOLDERS[split] / shard_name(split, index)


def list_shards(folder: str | Path, split: str) -> list[Path]:
    """Sorted shard paths of one split, from its subfolder or a flat folder; `val` excludes the
    `val_bytes` sidecars."""
    folder = Path(folder)
    sub = folder / SPLIT_FOLDERS[split]
    return sorted((sub if sub.is_dir() else folder).glob(f"fineweb_{split}_[0-9]*.bin"))


def shard_entry_name(folder: str | Path, path: Path) -> str:
    """A shard's name in manifest.json: its path relative to the shard folder."""
    return path.relative_to(folder).as_posix()


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


def sha256_file(path: str | Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


# "sha256" (default): every shard a stage reads is hashed against manifest.json, unless the stamp
# records that this very file (same size, mtime, ctime and inode) already matched; "header": only
# size and header, for a folder too large to hash whose files are trusted.
VERIFY_ENV = "PGOLF_VERIFY_SHARDS"
HASH_THREADS = 8


def verify_stamp_path(folder: str | Path) -> Path:
    """Beside the shard folder, never inside it: the folder is a DVC output whose bytes must not
    change when a stage reads it."""
    folder = Path(folder).resolve()
    return folder.with_name(f".{folder.name}.verified.json")


def _file_identity(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def verify_shards(folder: str | Path, splits: tuple[str, ...]) -> dict:
    """Check every shard of `splits` against the manifest: listed, present, the header's token count
    the manifest's, and (by default) its sha256; a shard the manifest does not list is an error too,
    since readers glob the folder. Returns the manifest."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    manifest_path = folder / MANIFEST_NAME
    entries = manifest.get("files")
    if not isinstance(entries, list) or not entries:
        raise FormatError("lists no shard files (key 'files'): rebuild the folder with the shards stage",
                          manifest_path)
    listed = {e.get("name"): e for e in entries if isinstance(e, dict)}
    for split in splits:
        for path in list_shards(folder, split):
            if shard_entry_name(folder, path) not in listed:
                raise FormatError(f"{shard_entry_name(folder, path)} is not listed in manifest.json: a shard added after the shards "
                                  "stage wrote the folder; remove it or rebuild the folder", path)
    mode = os.environ.get(VERIFY_ENV, "sha256")
    if mode not in ("sha256", "header"):
        raise InputError(f"{VERIFY_ENV}={mode!r}: expected 'sha256' (default) or 'header'")
    stamp_path = verify_stamp_path(folder)
    stamp = _read_stamp(stamp_path)
    verified, unstamped = {}, []
    for name, entry in sorted(listed.items()):
        if entry.get("split") not in splits:
            continue
        path = folder / name
        count = read_header(path)
        if count != entry.get("tokens"):
            raise FormatError(f"holds {count} tokens but manifest.json lists {entry.get('tokens')}: the shard was "
                              "replaced after the shards stage wrote it; rebuild it (dvc checkout or dvc repro shards)",
                              path)
        if mode == "header":
            continue
        # Taken before hashing: a file that changes while it is hashed no longer matches its stamp.
        identity = _file_identity(path)
        if stamp.get(name) == {"identity": identity, "sha256": entry.get("sha256")}:
            verified[name] = stamp[name]
        else:
            unstamped.append((path, identity, entry.get("sha256")))
    # hashlib releases the GIL, so threads hash several shards at once (one core each).
    with ThreadPoolExecutor(max_workers=max(1, min(HASH_THREADS, os.cpu_count() or 1, len(unstamped)))) as pool:
        digests = list(pool.map(sha256_file, [path for path, _, _ in unstamped]))
    for (path, identity, expected), digest in zip(unstamped, digests):
        if digest != expected:
            raise FormatError(f"sha256 {digest[:16]}... differs from manifest.json's {str(expected)[:16]}...: the shard "
                              "was edited after the shards stage wrote it; rebuild it (dvc checkout or dvc repro shards)",
                              path)
        verified[shard_entry_name(folder, path)] = {"identity": identity, "sha256": digest}
    if mode == "header":
        print(f"{folder}: shards checked by size and header only ({VERIFY_ENV}=header), not by sha256",
              file=sys.stderr, flush=True)
    elif verified != {k: v for k, v in stamp.items() if k in verified}:
        _write_stamp(stamp_path, {**stamp, **verified})
    return manifest


def _read_stamp(path: Path) -> dict:
    try:
        stamp = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # no stamp, or a damaged one: hash everything again
    return stamp if isinstance(stamp, dict) else {}


def _write_stamp(path: Path, stamp: dict) -> None:
    """Best effort: a folder beside read-only data simply hashes again next time."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(stamp, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)


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
