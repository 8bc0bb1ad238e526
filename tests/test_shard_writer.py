"""Shard building and adoption: format, split, determinism across worker counts, sidecars, errors."""
from __future__ import annotations


import numpy as np
import pytest

from pgolf.data.shards import list_shards, load_split, read_manifest, read_shard, write_shard
from pgolf.errors import ConfigError, FormatError, InputError
from pgolf.typed_params import from_dict
from pgolf.tokenize.token_bytes import load_val_byte_sidecar
from tasks import shards as shards_stage, tokenizer as tok_stage
from runner.stage import execute
from tests.conftest import make_docs, write_corpus


def build(data_dirs, out, tokenizer=None, **cfg):
    config = shards_stage.Config(**{"val_docs": 40, "shard_tokens": 4000, "workers": 1, **cfg})
    return execute(shards_stage.SPEC, config, {"corpus": data_dirs["corpus"], "tokenizer": tokenizer or data_dirs["tokenizer"]}, out)


def test_docs_are_bos_plus_tokens_split_val_first(data_dirs, docs, sp):
    out = data_dirs["shards"]
    manifest = read_manifest(out)
    assert manifest["stats"]["docs_val"] == 40 and manifest["stats"]["docs_train"] == len(docs) - 40
    val = load_split(out, "val").tolist()
    expected_val = [t for d in docs[:40] for t in [1] + sp.encode(d)]
    assert val == expected_val
    train = load_split(out, "train").tolist()
    assert train == [t for d in docs[40:] for t in [1] + sp.encode(d)]
    # shards are full except the last of each split; documents straddle shard boundaries
    sizes = [len(read_shard(p)) for p in list_shards(out, "train")]
    assert len(sizes) > 2 and all(s == 4000 for s in sizes[:-1]) and 0 < sizes[-1] <= 4000
    assert not manifest["val_bytes_sidecar"] and load_val_byte_sidecar(out) is None


def test_manifest_lists_every_file_with_hash(data_dirs):
    manifest = read_manifest(data_dirs["shards"])
    names = sorted(p.relative_to(data_dirs["shards"]).as_posix() for p in data_dirs["shards"].rglob("fineweb_*.bin"))
    # Each split in its own folder: DVC tracks them apart, so eval's inputs are the val shards alone.
    assert {n.split("/")[0] for n in names} == {"train", "val"}
    assert [f["name"] for f in manifest["files"]] == names
    assert all(len(f["sha256"]) == 64 for f in manifest["files"])
    assert manifest["vocab_size"] == 400 and manifest["bos_id"] == 1 and manifest["append_eos"] is False


def test_same_bytes_for_one_or_two_workers(data_dirs, tmp_path, monkeypatch):
    from pgolf.data import shard_writer

    monkeypatch.setattr(shard_writer, "DOCS_PER_CHUNK", 16)  # many chunks, so order across workers matters
    build(data_dirs, tmp_path / "w1", workers=1)
    build(data_dirs, tmp_path / "w2", workers=2)
    files = sorted(p.relative_to(tmp_path / "w1") for p in (tmp_path / "w1").rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / "w2") for p in (tmp_path / "w2").rglob("*") if p.is_file())
    for name in files:
        assert (tmp_path / "w1" / name).read_bytes() == (tmp_path / "w2" / name).read_bytes(), name


def test_a_dask_cluster_writes_the_same_bytes(data_dirs, tmp_path, monkeypatch):
    """shards.dask_address: chunks encoded on the workers of a Dask cluster (here a LocalCluster of
    two processes) come back in order: the same files as one local process."""
    from pgolf.data import shard_writer

    monkeypatch.setattr(shard_writer, "DOCS_PER_CHUNK", 16)
    build(data_dirs, tmp_path / "w1", workers=1)
    stats = build(data_dirs, tmp_path / "dask", workers=2, dask_address="local")
    files = sorted(p.relative_to(tmp_path / "w1") for p in (tmp_path / "w1").rglob("*") if p.is_file())
    dask = sorted(p.relative_to(tmp_path / "dask") for p in (tmp_path / "dask").rglob("*") if p.is_file())
    assert files == dask and stats["docs_train"] > 16
    for name in files:
        assert (tmp_path / "w1" / name).read_bytes() == (tmp_path / "dask" / name).read_bytes(), name


def test_an_unreachable_dask_scheduler_is_a_clear_error(data_dirs, tmp_path, monkeypatch):
    from pgolf.data import shard_writer

    monkeypatch.setattr(shard_writer, "DASK_CONNECT_TIMEOUT_S", 1)
    with pytest.raises(InputError, match="cannot reach the Dask scheduler at shards.dask_address='tcp://127.0.0.1:9'"):
        build(data_dirs, tmp_path / "s", dask_address="tcp://127.0.0.1:9")
    assert not (tmp_path / "s").exists()
    with pytest.raises(ConfigError, match="dask_address 'my-cluster': expected"):
        from_dict(shards_stage.Config, {"dask_address": "my-cluster"}, "shards")


def test_a_dask_worker_with_other_encoding_code_refuses(data_dirs):
    """A worker on another machine with another pgolf or SentencePiece would write other bytes."""
    from pgolf.data import shard_writer

    model = (data_dirs["tokenizer"] / "tokenizer.model").read_bytes()
    item = (["some text"], "plain", 1, False, "val")
    split, n_docs, chunk = shard_writer._on_dask_worker(shard_writer._encode_with_split, model, shard_writer.encoding_code_digest(), *item)
    assert (split, n_docs) == ("val", 1) and chunk.tokens[0] == 1 and len(chunk.tokens) > 1
    with pytest.raises(InputError, match="differs from the machine that started the shards stage"):
        shard_writer._on_dask_worker(shard_writer._encode_with_split, model, "0" * 64, *item)


def test_casefold_shards_carry_original_byte_sidecar(tmp_path):
    docs = make_docs(80, seed=5)
    corpus = write_corpus(tmp_path / "corpus", docs)
    execute(tok_stage.SPEC, tok_stage.Config(variant="casefold", vocab_size=360, num_threads=1), {"corpus": corpus}, tmp_path / "tok")
    execute(shards_stage.SPEC, shards_stage.Config(val_docs=30, shard_tokens=3000, workers=2),
            {"corpus": corpus, "tokenizer": tmp_path / "tok"}, tmp_path / "shards")
    val = load_split(tmp_path / "shards", "val")
    sidecar = load_val_byte_sidecar(tmp_path / "shards")
    assert len(sidecar) == len(val)
    assert sidecar[val == 1].sum() == 0  # BOS carries no bytes
    assert sidecar.sum() == sum(len(d.encode("utf-8")) for d in docs[:30])
    starts = list(np.flatnonzero(val == 1)) + [len(val)]
    for i, (a, b) in enumerate(zip(starts[:-1], starts[1:])):
        assert sidecar[a:b].sum() == len(docs[i].encode("utf-8"))
    assert read_manifest(tmp_path / "shards")["val_bytes_sidecar"]


def test_too_few_documents_for_val(data_dirs, tmp_path):
    with pytest.raises(InputError, match="all of them val"):
        build(data_dirs, tmp_path / "s", val_docs=10_000)
    assert not (tmp_path / "s").exists()


def test_adopt_published_folder_without_copying(data_dirs, tmp_path):
    out = tmp_path / "adopted"
    build(data_dirs, out, adopt=str(data_dirs["shards"]))
    src = data_dirs["shards"] / "train/fineweb_train_000000.bin"
    assert (out / "train" / src.name).stat().st_ino == src.stat().st_ino  # hard link, same file
    manifest = read_manifest(out)
    assert manifest["adopted_from"] == str(data_dirs["shards"].resolve())
    assert manifest["stats"]["docs_val"] == 40
    assert load_split(out, "val").tolist() == load_split(data_dirs["shards"], "val").tolist()


@pytest.mark.parametrize("damage", ["magic", "truncate", "vocab"])
def test_adopt_rejects_bad_shards_naming_the_file(data_dirs, tmp_path, damage):
    src = tmp_path / "published"
    src.mkdir()
    for p in data_dirs["shards"].rglob("fineweb_*.bin"):  # published folders are flat
        (src / p.name).write_bytes(p.read_bytes())
    bad = src / "fineweb_train_000001.bin"
    if damage == "magic":
        bad.write_bytes(b"\x00" * 4 + bad.read_bytes()[4:])
    elif damage == "truncate":
        bad.write_bytes(bad.read_bytes()[:-3])
    else:
        write_shard(bad, np.array([1, 5, 999]))
    with pytest.raises(FormatError) as err:
        build(data_dirs, tmp_path / "out", adopt=str(src))
    assert bad.name in str(err.value)
    assert not (tmp_path / "out").exists()


def test_adopt_needs_both_splits(data_dirs, tmp_path):
    src = tmp_path / "published"
    src.mkdir()
    write_shard(src / "fineweb_train_000000.bin", np.array([1, 2]))
    with pytest.raises(InputError, match="0 val"):
        build(data_dirs, tmp_path / "out", adopt=str(src))
