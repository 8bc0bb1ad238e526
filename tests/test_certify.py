"""The shards manifest's certificate (pgolf.data.certify): each fault the judges found after the challenge
is planted here and must be caught; an honest run on other data is labelled, not refused."""
from __future__ import annotations

import json

import numpy as np
import pytest

from pgolf import canonical
from pgolf.data import certify, shard_writer
from pgolf.data.shards import list_shards, load_split, read_manifest, read_shard, write_shard
from pgolf.errors import FormatError
from pgolf.tokenize import caseops, token_bytes
from tasks import shards as shards_stage, tokenizer as tok_stage
from runner.stage import execute
from tests.conftest import make_docs, write_corpus


def build(data_dirs, out, corpus=None, tokenizer=None, **cfg):
    config = shards_stage.Config(**{"val_docs": 40, "shard_tokens": 4000, "workers": 1, **cfg})
    return execute(shards_stage.SPEC, config, {"corpus": corpus or data_dirs["corpus"],
                                               "tokenizer": tokenizer or data_dirs["tokenizer"]}, out)


def flat_copy(folder, dest, splits=("train", "val", "val_bytes")):
    """A published folder's layout (flat) of a shards stage output."""
    dest.mkdir(parents=True, exist_ok=True)
    for split in splits:
        for path in list_shards(folder, split):
            (dest / path.name).write_bytes(path.read_bytes())
    return dest


def test_a_built_folder_is_certified_and_labelled_not_canonical(data_dirs, docs, sp):
    manifest = read_manifest(data_dirs["shards"])
    cert = manifest["certificate"]
    assert cert["overlap"] == {"train_docs_in_val": 0, "val_docs_in_train": 0, "examples": []}
    assert cert["docs_val"] == 40 and cert["docs_train"] == len(docs) - 40
    assert cert["val_prefix"]["proven"] is True
    assert cert["bytes"]["checked"] and cert["bytes"]["rule"] == "lut" and cert["bytes"]["docs"] == 40
    # the LUT's total is the normalized text's, document by document
    assert cert["bytes"]["bytes"] == sum(len(sp.normalize(d).replace("\u2581", " ").encode()) for d in docs[:40])
    assert manifest["canonical"] is False and cert["canonical"] is False
    failed = {c["check"] for c in cert["canonical_checks"] if c["ok"] is False}
    assert {"export", "docs_val", "shard_size"} <= failed
    assert "canonical: false" in certify.summary(cert) and "50,000" in certify.summary(cert)


def test_documents_running_across_shards_hash_as_one(data_dirs, tmp_path):
    """The streamed train hashes (2 processes, documents split over shard edges) are the documents'."""
    train = load_split(data_dirs["shards"], "train")
    expected = [certify.digest(train[b:e]) for b, e in certify.doc_bounds(train, 1)]
    paths = list_shards(data_dirs["shards"], "train")
    assert len(paths) > 2 and read_shard(paths[1])[0] != 1  # a document does straddle an edge
    assert list(certify.stream_digests(paths, 1, workers=2)) == expected


def test_train_holding_val_documents_is_an_error_naming_folder_count_and_examples(data_dirs, tmp_path):
    """#2127: a re-export with --val-docs=10000 starts train at document 10,000 while val is the first
    50,000; here train starts at document 10 while val is the first 40."""
    build(data_dirs, tmp_path / "leaky", val_docs=10)
    published = flat_copy(data_dirs["shards"], tmp_path / "published", ("val",))
    flat_copy(tmp_path / "leaky", published, ("train",))
    with pytest.raises(FormatError) as err:
        build(data_dirs, tmp_path / "out", adopt=str(published))
    message = str(err.value)
    assert "train and val overlap: 30 train documents are val documents" in message
    assert "val 10 = train 0" in message and message.startswith(str(published))
    assert not (tmp_path / "out").exists()


def test_val_out_of_order_is_an_error(data_dirs, tmp_path, monkeypatch):
    """Results that come back out of order from the workers (as an unordered map over a cluster would)."""
    monkeypatch.setattr(shard_writer, "DOCS_PER_CHUNK", 8)
    ordered = shard_writer._ordered_map

    def swapped(*args, **kwargs):
        results = list(ordered(*args, **kwargs))
        results[0], results[1] = results[1], results[0]
        return iter(results)

    monkeypatch.setattr(shard_writer, "_ordered_map", swapped)
    with pytest.raises(FormatError, match="val document 0 is not the source's document 0"):
        build(data_dirs, tmp_path / "out", workers=2)


def test_val_taken_per_chunk_is_an_error(data_dirs, tmp_path, monkeypatch):
    """#2109: parallel chunks each emitting their own first documents as val."""
    def per_chunk(docs, val_docs):
        docs, half, k = list(docs), None, val_docs // 2
        half = len(docs) // 2
        yield "val", docs[:k] + docs[half:half + k]
        yield "train", docs[k:half] + docs[half + k:]

    monkeypatch.setattr(shard_writer, "_chunks", per_chunk)
    with pytest.raises(FormatError, match="val document 20 is not the source's document 20"):
        build(data_dirs, tmp_path / "out")


def byte_piece_ids(sp) -> np.ndarray:
    return np.array([i for i in range(sp.vocab_size()) if sp.is_byte(i)])


@pytest.mark.parametrize("bug", ["byte_fallback_3_bytes", "leading_space_twice"])
def test_a_wrong_lut_is_caught_document_by_document(data_dirs, sp, tmp_path, monkeypatch, bug):
    """#1271 counted byte-fallback tokens 3 bytes; #1632 counted a word's leading space twice."""
    val = load_split(data_dirs["shards"], "val")
    assert np.isin(val, byte_piece_ids(sp)).any()  # val has byte-fallback tokens to miscount
    build_luts = token_bytes.build_byte_luts

    def buggy(sp_, vocab):
        luts = build_luts(sp_, vocab)
        if bug == "byte_fallback_3_bytes":
            luts.base_bytes[byte_piece_ids(sp_)] = 3
        else:
            luts.base_bytes[luts.has_leading_space] += 1
        return luts

    monkeypatch.setattr(token_bytes, "build_byte_luts", buggy)
    with pytest.raises(FormatError) as err:
        build(data_dirs, tmp_path / "out")
    message = str(err.value)
    assert "val document" in message and "the eval counts" in message and "(lut), its text has" in message
    counts = [int(x.replace(",", "")) for x in
              (message.split("the eval counts ")[1].split(" ")[0], message.split("its text has ")[1].split(" ")[0])]
    assert counts[0] > counts[1]  # both counts named, the eval's too high
    assert not (tmp_path / "out").exists()


def tokenizer_without_a_lone_space_piece(data_dirs, dest):
    """#897: a tokenizer whose vocabulary has no standalone "\u2581" piece, as custom vocabularies had
    (#755): SentencePiece spells a space no piece covers as the byte-fallback tokens of U+2581's UTF-8
    (E2 96 81), which count 3 bytes, one each, for the 1 byte of a space."""
    import hashlib
    from sentencepiece import sentencepiece_model_pb2

    model = sentencepiece_model_pb2.ModelProto()
    model.ParseFromString((data_dirs["tokenizer"] / "tokenizer.model").read_bytes())
    lone = [p for p in model.pieces if p.piece == token_bytes.LEADING_SPACE]
    assert len(lone) == 1
    lone[0].type = sentencepiece_model_pb2.ModelProto.SentencePiece.UNUSED
    dest.mkdir()
    model_bytes = model.SerializeToString()
    (dest / "tokenizer.model").write_bytes(model_bytes)
    meta = json.loads((data_dirs["tokenizer"] / "tokenizer.json").read_text())
    (dest / "tokenizer.json").write_text(json.dumps({**meta, "sha256": hashlib.sha256(model_bytes).hexdigest()}))
    return dest


def test_a_space_spelled_in_byte_fallback_tokens_is_caught(data_dirs, docs, tmp_path):
    """#897: nothing is monkeypatched; the LUT rule itself (a byte token is 1 byte) overcounts such a
    tokenizer's spaces by 2 bytes each, and the text count sees it."""
    import sentencepiece as spm

    tokenizer = tokenizer_without_a_lone_space_piece(data_dirs, tmp_path / "tok")
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer / "tokenizer.model"))
    with pytest.raises(FormatError) as err:
        build(data_dirs, tmp_path / "out", tokenizer=tokenizer)
    message = str(err.value)
    assert "(lut), its text has" in message and "40 of 40 documents disagree" in message
    doc = int(message.split("val document ")[1].split(":")[0])
    eval_count, text_count = (int(message.split(key)[1].split(" ")[0].replace(",", ""))
                              for key in ("the eval counts ", "its text has "))
    pieces = sp.encode(docs[doc], out_type=str)
    spaces_in_bytes = sum(pieces[k:k + 3] == ["<0xE2>", "<0x96>", "<0x81>"] for k in range(len(pieces)))
    assert spaces_in_bytes > 0 and eval_count - text_count == 2 * spaces_in_bytes
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def caseops_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("caseops")
    docs = make_docs(120, seed=7)
    corpus = write_corpus(root / "corpus", docs)
    execute(tok_stage.SPEC, tok_stage.Config(variant="caseops", vocab_size=360, num_threads=1), {"corpus": corpus},
            root / "tok")
    execute(shards_stage.SPEC, shards_stage.Config(val_docs=30, shard_tokens=3000, workers=1),
            {"corpus": corpus, "tokenizer": root / "tok"}, root / "shards")
    return {"corpus": corpus, "tokenizer": root / "tok", "shards": root / "shards", "docs": docs}


def test_caseops_sidecar_is_certified(caseops_data):
    cert = read_manifest(caseops_data["shards"])["certificate"]
    assert cert["bytes"]["checked"] and cert["bytes"]["rule"] == "sidecar"
    assert cert["bytes"]["bytes"] == sum(len(d.strip().encode()) for d in caseops_data["docs"][:30])


def test_caseops_operators_charged_bytes_are_caught_when_built(caseops_data, tmp_path, monkeypatch):
    """#2138: the sentinel characters' own UTF-8 bytes charged to the operator tokens."""
    encode_run = caseops._encode_run
    monkeypatch.setattr(caseops, "_encode_run", lambda run: [(piece, len(piece.encode()) if piece in caseops.OPERATORS
                                                              else size) for piece, size in encode_run(run)])
    with pytest.raises(FormatError, match=r"val document \d+: the eval counts .* \(sidecar\), its text has"):
        execute(shards_stage.SPEC, shards_stage.Config(val_docs=30, shard_tokens=3000, workers=1),
                {"corpus": caseops_data["corpus"], "tokenizer": caseops_data["tokenizer"]}, tmp_path / "out")


def test_caseops_operators_charged_bytes_are_caught_in_an_adopted_sidecar(caseops_data, tmp_path):
    published = flat_copy(caseops_data["shards"], tmp_path / "published")
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(caseops_data["tokenizer"] / "tokenizer.model"))
    operators = [sp.piece_to_id(op) for op in caseops.OPERATORS]
    val = read_shard(published / "fineweb_val_000000.bin")
    side_path = published / "fineweb_val_bytes_000000.bin"
    sidecar = np.array(read_shard(side_path), dtype=np.int64)
    assert np.isin(val, operators).any()
    sidecar[np.isin(val, operators)] = 3
    write_shard(side_path, sidecar)
    with pytest.raises(FormatError, match=r"\(sidecar\), its text has"):
        execute(shards_stage.SPEC, shards_stage.Config(val_docs=30, adopt=str(published)),
                {"corpus": caseops_data["corpus"], "tokenizer": caseops_data["tokenizer"]}, tmp_path / "out")


def test_an_adopted_folder_with_its_documents_is_certified(data_dirs, tmp_path):
    published = flat_copy(data_dirs["shards"], tmp_path / "published")
    build(data_dirs, tmp_path / "out", adopt=str(published))
    cert = read_manifest(tmp_path / "out")["certificate"]
    assert cert["val_prefix"]["proven"] is True and cert["bytes"]["checked"]
    assert cert["val_docs_sha256"] == read_manifest(data_dirs["shards"])["certificate"]["val_docs_sha256"]


def test_an_adopted_folder_beside_another_corpus_is_labelled_not_proven(data_dirs, tmp_path):
    published = flat_copy(data_dirs["shards"], tmp_path / "published")
    other = write_corpus(tmp_path / "other", make_docs(60, seed=99))
    build(data_dirs, tmp_path / "out", corpus=other, adopt=str(published))
    cert = read_manifest(tmp_path / "out")["certificate"]
    assert cert["val_prefix"]["proven"] is None and "not the adopted shards' source" in cert["val_prefix"]["text"]
    assert cert["bytes"]["checked"] is False and cert["overlap"]["train_docs_in_val"] == 0


def test_canonical_when_the_published_figures_match(data_dirs, tmp_path, monkeypatch):
    """The challenge's figures, scaled to this corpus: 40 val documents, shards of 4,000 tokens."""
    manifest = read_manifest(data_dirs["shards"])
    stats = manifest["stats"]
    export = canonical.Export("tiny", "plain", 400, "tests", {64: canonical.truncated(stats["tokens_val"], 64)},
                              stats["tokens_val"], stats["files_train"])
    monkeypatch.setattr(canonical, "EXPORTS", (export,))
    monkeypatch.setattr(canonical, "DOCS_VAL", 40)
    monkeypatch.setattr(canonical, "SHARD_TOKENS", 4000)
    build(data_dirs, tmp_path / "good")
    assert read_manifest(tmp_path / "good")["canonical"] is True
    # more shards than the export has (#2127's 1,499 for its 80), though disjoint: not canonical
    build(data_dirs, tmp_path / "small_shards", shard_tokens=1000)
    cert = read_manifest(tmp_path / "small_shards")["certificate"]
    assert cert["canonical"] is False
    failed = {c["check"]: c["text"] for c in cert["canonical_checks"] if c["ok"] is False}
    assert "#2127" in failed["train_shards"] and "shard_size" in failed
