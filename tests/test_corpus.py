"""Corpus sources and the corpus stage: readers, the builtin corpus, and clear errors."""
from __future__ import annotations

import gzip
import hashlib
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pgolf.data.corpus import BUILTIN, builtin_documents, read_documents
from pgolf.data.docs import iter_docs
from pgolf.errors import FormatError, InputError
from tasks import corpus as corpus_stage
from runner.stage import execute

DOCS = ["first document\nwith two lines", "second — with non-ASCII ✓", "third"]


def write_jsonl(path, docs, field="text"):
    path.write_text("".join(json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(docs)), encoding="utf-8")
    return path


def test_jsonl_gz_parquet_txt_and_folder(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", DOCS)
    with gzip.open(tmp_path / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    pq.write_table(pa.table({"text": DOCS, "n": [1, 2, 3]}), tmp_path / "c.parquet", row_group_size=2)
    (tmp_path / "d.txt").write_text(DOCS[0], encoding="utf-8")
    assert list(read_documents(str(tmp_path / "a.jsonl"))) == DOCS
    assert list(read_documents(str(tmp_path / "b.jsonl.gz"))) == DOCS
    assert list(read_documents(str(tmp_path / "c.parquet"))) == DOCS
    assert list(read_documents(str(tmp_path / "d.txt"))) == [DOCS[0]]
    # a folder: its files in sorted order
    assert list(read_documents(str(tmp_path))) == DOCS + DOCS + DOCS + [DOCS[0]]


def test_other_text_field(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", DOCS, field="content")
    assert list(read_documents(str(path), "content")) == DOCS
    with pytest.raises(FormatError, match="line 1: no 'text' field"):
        list(read_documents(str(path)))
    pq.write_table(pa.table({"body": DOCS}), tmp_path / "b.parquet")
    with pytest.raises(FormatError, match="no 'text' column"):
        list(read_documents(str(tmp_path / "b.parquet")))


def test_non_utf8_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(FormatError, match="line 2") as err:
        list(read_documents(str(path)))
    assert str(path) in str(err.value) and "UTF-8" in str(err.value)
    txt = tmp_path / "bad.txt"
    txt.write_bytes(b"\xff\xfe")
    with pytest.raises(FormatError, match="UTF-8"):
        list(read_documents(str(txt)))


def test_invalid_json_and_missing_source(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(FormatError, match="line 2: invalid JSON"):
        list(read_documents(str(path)))
    with pytest.raises(InputError, match="not found"):
        list(read_documents(str(tmp_path / "missing.jsonl")))
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(InputError, match="unsupported"):
        list(read_documents(str(tmp_path / "x.csv")))


# The builtin corpus stage's docs.jsonl: what dvc.lock pins for the default run. It comes from bytes
# shipped with pgolf, so it is the same on every Python release (text read from the interpreter,
# as before, changed with the patch release and rewrote every hash in dvc.lock).
BUILTIN_DOCS_SHA256 = "95595eea9847b1a08db0c1185596ff73a6fd36cf9ad3724e8727d5da5e06e709"


def test_builtin_corpus_is_fixed_bytes_and_large_enough(tmp_path):
    docs = list(builtin_documents())
    assert len(docs) == 2354 and sum(len(d.encode()) for d in docs) == 1_550_061
    assert len(set(docs)) == len(docs)
    metrics = execute(corpus_stage.SPEC, corpus_stage.Config(), {}, tmp_path / "corpus")
    assert metrics == {"num_docs": 2354, "text_bytes": 1_550_061}
    assert hashlib.sha256((tmp_path / "corpus" / "docs.jsonl").read_bytes()).hexdigest() == BUILTIN_DOCS_SHA256


def test_builtin_corpus_readme_names_the_shipped_file():
    """The licence and provenance note beside the file gives its sha256: a file swapped without it
    fails here."""
    readme = (BUILTIN.parent / "README.md").read_text()
    assert hashlib.sha256(BUILTIN.read_bytes()).hexdigest() in readme
    assert "public domain" in readme


def test_stage_writes_docs_and_meta_and_caps(tmp_path):
    src = write_jsonl(tmp_path / "a.jsonl", DOCS + ["   ", ""])
    out = tmp_path / "corpus"
    metrics = execute(corpus_stage.SPEC, corpus_stage.Config(source=str(src), max_docs=2), {}, out)
    assert metrics["num_docs"] == 2 and list(iter_docs(out)) == DOCS[:2]
    meta = json.loads((out / "meta.json").read_text())
    assert meta["num_docs"] == 2 and len(meta["sha256"]) == 64
    metrics = execute(corpus_stage.SPEC, corpus_stage.Config(source=str(src)), {}, out)
    assert metrics["num_docs"] == 5  # blank documents are kept, as the challenge's export keeps every line
    assert list(iter_docs(out)) == DOCS + ["   ", ""]


def test_empty_corpus_is_an_error_and_leaves_no_output(tmp_path):
    src = write_jsonl(tmp_path / "empty.jsonl", [])
    out = tmp_path / "corpus"
    with pytest.raises(InputError, match="no documents") as err:
        execute(corpus_stage.SPEC, corpus_stage.Config(source=str(src)), {}, out)
    assert str(src) in str(err.value)
    assert not out.exists()


def published(folder, docs=DOCS, tamper=False):
    """A docs_selected.jsonl with its source manifest, as the challenge publishes them."""
    import hashlib

    folder.mkdir(parents=True, exist_ok=True)
    path = write_jsonl(folder / "docs_selected.jsonl", docs)
    manifest = {"num_docs": len(docs), "docs_val": 1, "shuffle_seed": 1337,
                "docs_sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    (folder / "docs_selected.source_manifest.json").write_text(json.dumps(manifest))
    if tamper:
        path.write_text(path.read_text().replace("third", "THIRD"))
    return path


def test_published_docs_are_verified_against_their_manifest(tmp_path):
    path = published(tmp_path / "ok")
    execute(corpus_stage.SPEC, corpus_stage.Config(source=str(path)), {}, tmp_path / "c")
    meta = json.loads((tmp_path / "c/meta.json").read_text())
    assert meta["source_manifest"]["docs_val"] == 1 and list(iter_docs(tmp_path / "c")) == DOCS
    bad = published(tmp_path / "bad", tamper=True)
    with pytest.raises(FormatError, match="does not match docs_sha256") as err:
        execute(corpus_stage.SPEC, corpus_stage.Config(source=str(bad)), {}, tmp_path / "c2")
    assert str(bad) in str(err.value) and not (tmp_path / "c2").exists()


def test_hub_source_downloads_then_verifies_and_offline_is_a_clear_error(tmp_path, monkeypatch):
    """hf://owner/dataset/path: both files through huggingface_hub (a local stand-in for the Hub here:
    tests have no network), then the same verification as a local copy."""
    import huggingface_hub

    hub = tmp_path / "hub"
    published(hub / "datasets")
    calls = []

    def fake_download(repo_id, filename, repo_type):
        calls.append((repo_id, filename, repo_type))
        return str(hub / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    source = "hf://willdepueoai/parameter-golf/datasets/docs_selected.jsonl"
    metrics = execute(corpus_stage.SPEC, corpus_stage.Config(source=source), {}, tmp_path / "c")
    assert metrics["num_docs"] == 3 and calls == [
        ("willdepueoai/parameter-golf", "datasets/docs_selected.jsonl", "dataset"),
        ("willdepueoai/parameter-golf", "datasets/docs_selected.source_manifest.json", "dataset")]
    assert json.loads((tmp_path / "c/meta.json").read_text())["source"] == source

    tampered = published(tmp_path / "hub" / "datasets", tamper=True)
    with pytest.raises(FormatError, match="does not match docs_sha256") as err:
        execute(corpus_stage.SPEC, corpus_stage.Config(source=source), {}, tmp_path / "c2")
    assert str(tampered) in str(err.value) and not (tmp_path / "c2").exists()

    def offline(repo_id, filename, repo_type):
        raise huggingface_hub.errors.LocalEntryNotFoundError("no connection and not in the cache")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(InputError, match="Offline\\? Download it on a connected machine"):
        execute(corpus_stage.SPEC, corpus_stage.Config(source=source), {}, tmp_path / "c3")
    with pytest.raises(InputError, match="expected hf://<owner>/<dataset>/<path"):
        execute(corpus_stage.SPEC, corpus_stage.Config(source="hf://just-a-name"), {}, tmp_path / "c4")


def test_txt_line_ends_become_lf_and_jsonl_stays_verbatim(tmp_path):
    """A .txt source is read as Python's text mode would (CRLF and CR -> LF); a jsonl document,
    the challenge's own format, keeps its bytes."""
    (tmp_path / "a.txt").write_bytes(b"one\r\ntwo\rthree\n\tfour\x0c")
    assert list(read_documents(str(tmp_path / "a.txt"))) == ["one\ntwo\nthree\n\tfour\x0c"]
    write_jsonl(tmp_path / "b.jsonl", ["one\r\ntwo\x00"])
    assert list(read_documents(str(tmp_path / "b.jsonl"))) == ["one\r\ntwo\x00"]
