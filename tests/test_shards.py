"""The challenge's shard format: round trip and every header and size check."""
from __future__ import annotations

import json

import numpy as np
import pytest

from pgolf.data.shards import (HEADER_BYTES, SHARD_MAGIC, check_vocab, list_shards, load_split, read_header,
                               read_manifest, read_shard, shard_name, write_shard)
from pgolf.errors import FormatError, InputError


def test_round_trip_and_layout(tmp_path):
    tokens = np.array([1, 5, 65535, 0, 42], dtype=np.int64)
    path = tmp_path / "fineweb_val_000000.bin"
    write_shard(path, tokens)
    raw = path.read_bytes()
    assert len(raw) == HEADER_BYTES + 2 * len(tokens)
    header = np.frombuffer(raw[:HEADER_BYTES], dtype="<i4")
    assert header[0] == SHARD_MAGIC and header[1] == 1 and header[2] == 5 and not header[3:].any()
    assert np.frombuffer(raw[HEADER_BYTES:], dtype="<u2").tolist() == tokens.tolist()
    assert read_shard(path).tolist() == tokens.tolist()
    assert read_shard(path, mmap=False).dtype == np.dtype("<u2")


def test_write_rejects_ids_that_do_not_fit(tmp_path):
    with pytest.raises(ValueError):
        write_shard(tmp_path / "x.bin", np.array([70000]))
    with pytest.raises(ValueError):
        write_shard(tmp_path / "x.bin", np.array([-1]))


def _shard(tmp_path, tokens=(1, 2, 3)):
    path = tmp_path / "fineweb_train_000000.bin"
    write_shard(path, np.array(tokens))
    return path


def test_wrong_magic_names_file(tmp_path):
    path = _shard(tmp_path)
    raw = bytearray(path.read_bytes())
    raw[0:4] = np.array([1234], dtype="<i4").tobytes()
    path.write_bytes(bytes(raw))
    with pytest.raises(FormatError, match="magic") as err:
        read_shard(path)
    assert str(path) in str(err.value)


def test_wrong_version(tmp_path):
    path = _shard(tmp_path)
    raw = bytearray(path.read_bytes())
    raw[4:8] = np.array([2], dtype="<i4").tobytes()
    path.write_bytes(bytes(raw))
    with pytest.raises(FormatError, match="version"):
        read_header(path)


@pytest.mark.parametrize("cut", [1, 2, 5])
def test_truncated_token_area(tmp_path, cut):
    path = _shard(tmp_path, range(10))
    path.write_bytes(path.read_bytes()[:-cut])
    with pytest.raises(FormatError, match="truncated") as err:
        read_header(path)
    assert str(path) in str(err.value)


def test_truncated_header_and_trailing_bytes(tmp_path):
    path = _shard(tmp_path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(FormatError, match="shorter than"):
        read_header(path)
    path = _shard(tmp_path)
    path.write_bytes(path.read_bytes() + b"\x00\x00")
    with pytest.raises(FormatError, match="does not match"):
        read_header(path)


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="not found"):
        read_header(tmp_path / "nope.bin")


def test_out_of_vocab_names_file_and_id(tmp_path):
    path = _shard(tmp_path, [1, 7, 300])
    assert read_shard(path, vocab_size=301).max() == 300
    with pytest.raises(FormatError, match="300") as err:
        read_shard(path, vocab_size=256)
    assert str(path) in str(err.value)


def test_split_listing_keeps_sidecars_apart(tmp_path):
    for split, i, toks in [("val", 0, [1, 2]), ("val", 1, [3]), ("val_bytes", 0, [0, 4]), ("train", 0, [5])]:
        write_shard(tmp_path / shard_name(split, i), np.array(toks))
    assert [p.name for p in list_shards(tmp_path, "val")] == ["fineweb_val_000000.bin", "fineweb_val_000001.bin"]
    assert load_split(tmp_path, "val").tolist() == [1, 2, 3]
    assert load_split(tmp_path, "val_bytes").tolist() == [0, 4]
    with pytest.raises(InputError):
        load_split(tmp_path / "empty", "val")


def test_manifest_and_vocab_check(tmp_path):
    with pytest.raises(InputError, match="manifest.json"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"vocab_size": 1024, "bos_id": 1}))
    assert check_vocab(tmp_path, 1024)["bos_id"] == 1
    with pytest.raises(FormatError, match="1024-piece") as err:
        check_vocab(tmp_path, 8192)
    assert "manifest.json" in str(err.value)
    (tmp_path / "manifest.json").write_text("{")
    with pytest.raises(FormatError, match="JSON"):
        read_manifest(tmp_path)


def test_verified_shards_are_not_hashed_again_until_they_change(data_dirs, tmp_path, monkeypatch):
    """The stamp beside the folder (never inside: it is a DVC output) keys each verified file by size,
    mtime, ctime and inode; an edit that restores the mtime still changes the ctime."""
    import os
    import shutil

    from pgolf.data import shards

    folder = tmp_path / "shards"
    shutil.copytree(data_dirs["shards"], folder)
    hashed = []
    real = shards.sha256_file
    monkeypatch.setattr(shards, "sha256_file", lambda path: hashed.append(path.name) or real(path))
    before = sorted(p.name for p in folder.rglob("*"))
    val = sorted(p.name for p in folder.rglob("fineweb_val_*.bin"))
    shards.verify_shards(folder, ("val",))
    assert hashed == val and shards.verify_stamp_path(folder).is_file()
    assert sorted(p.name for p in folder.rglob("*")) == before
    hashed.clear()
    shards.verify_shards(folder, ("val",))
    assert hashed == []
    path = folder / "val/fineweb_val_000000.bin"
    stat = path.stat()
    data = bytearray(path.read_bytes())
    data[HEADER_BYTES] ^= 1
    path.write_bytes(bytes(data))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises(FormatError, match="sha256"):
        shards.verify_shards(folder, ("val",))
    assert hashed == ["fineweb_val_000000.bin"]


def test_header_only_verification_skips_the_hash_and_says_so(data_dirs, tmp_path, monkeypatch, capsys):
    import shutil

    from pgolf.data import shards

    folder = tmp_path / "shards"
    shutil.copytree(data_dirs["shards"], folder)
    monkeypatch.setenv(shards.VERIFY_ENV, "header")
    monkeypatch.setattr(shards, "sha256_file", lambda path: pytest.fail("hashed in header mode"))
    assert shards.verify_shards(folder, ("train",))["vocab_size"] == 400
    assert "size and header only" in capsys.readouterr().err
    monkeypatch.setenv(shards.VERIFY_ENV, "md5")
    with pytest.raises(InputError, match="PGOLF_VERIFY_SHARDS='md5'"):
        shards.verify_shards(folder, ("train",))
