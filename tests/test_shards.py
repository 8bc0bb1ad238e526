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


@pytest.mark.parametrize("variant", ["plain", "caseops"])
def test_blank_documents_stay_lone_bos_so_val_is_the_first_n_documents(tmp_path, variant):
    """The challenge's export keeps every line as a document, so empty and whitespace-only ones are
    a lone BOS (0 bytes) and the val split is the first N documents, blank ones counted; the eval
    byte rule and TTT's document split take such documents."""
    import math

    import torch

    from pgolf.evaluate.bpb import bytes_per_position, evaluate_bpb, truncate_val
    from pgolf.evaluate.lora_ttt import find_documents
    from pgolf.tokenize.token_bytes import build_byte_luts, load_tokenizer, load_val_byte_sidecar
    from tasks import corpus as corpus_stage, shards as shards_stage, tokenizer as tok_stage
    from runner.stage import execute
    from tests.conftest import make_docs
    from tests.test_corpus import write_jsonl
    from tests.test_eval import UniformModel

    docs = make_docs(40, seed=3)
    for i, blank in [(0, ""), (3, "   "), (4, "\n\n"), (9, ""), (20, " \t ")]:
        docs.insert(i, blank)
    execute(corpus_stage.SPEC, corpus_stage.Config(source=str(write_jsonl(tmp_path / "d.jsonl", docs))), {},
            tmp_path / "corpus")
    execute(tok_stage.SPEC, tok_stage.Config(variant=variant, vocab_size=380, num_threads=1),
            {"corpus": tmp_path / "corpus"}, tmp_path / "tok")
    execute(shards_stage.SPEC, shards_stage.Config(val_docs=12, shard_tokens=3000, workers=1),
            {"corpus": tmp_path / "corpus", "tokenizer": tmp_path / "tok"}, tmp_path / "shards")
    val = load_split(tmp_path / "shards", "val")
    starts = list(np.flatnonzero(val == 1)) + [len(val)]
    assert len(starts) - 1 == 12 and starts[0] == 0
    lengths = [b - a for a, b in zip(starts[:-1], starts[1:])]
    assert [i for i, n in enumerate(lengths) if n == 1] == [0, 3, 4, 9]
    sp, _ = load_tokenizer(tmp_path / "tok")
    sidecar = load_val_byte_sidecar(tmp_path / "shards")
    per_position = bytes_per_position(val, None if variant == "caseops" else build_byte_luts(sp, sp.vocab_size()),
                                      sidecar)
    # bytes of every document's own targets: its tokens after its BOS
    doc_bytes = [int(per_position[a + 1:b].sum()) for a, b in zip(starts[:-1], starts[1:])]
    assert [doc_bytes[i] for i in (0, 3, 4, 9)] == [0, 0, 0, 0]
    # plain: the normalized text the LUT measures; caseops: the original text its tokens cover
    measured = (lambda d: sp.decode(sp.encode(d))) if variant == "plain" else (lambda d: d.strip(" \t\n"))
    assert sum(doc_bytes) == sum(len(measured(d).encode()) for d in docs[:12])
    documents = find_documents(val, 1)
    assert len(documents) == 12 and all(e - s == 2 for s, e in (documents[i] for i in (0, 3, 4, 9)))
    scored = truncate_val(val, 8)
    result = evaluate_bpb(UniformModel(sp.vocab_size()), scored, per_position[:len(scored)], seq_len=8, stride=0,
                          batch_seqs=4, device=torch.device("cpu"))
    assert result.tokens == len(scored) - 1 and result.bytes == int(per_position[1:len(scored)].sum())
    assert result.val_bpb == pytest.approx(math.log2(sp.vocab_size()) * result.tokens / result.bytes)

