"""Tokenizer stage: the challenge's trainer settings, determinism, the casefold variant."""
from __future__ import annotations

import json

import pytest
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as model_pb2

from pgolf.errors import ConfigError
from pgolf.typed_params import from_dict
from tasks import tokenizer as tok_stage
from runner.stage import execute
from tests.conftest import make_docs, write_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("c") / "corpus", make_docs(150, seed=3))


def train(corpus, out, **overrides):
    cfg = tok_stage.Config(vocab_size=360, num_threads=1, **overrides)
    execute(tok_stage.SPEC, cfg, {"corpus": corpus}, out)
    return (out / "tokenizer.model").read_bytes()


def test_trainer_spec_matches_the_challenge(corpus, tmp_path):
    model = model_pb2.ModelProto()
    model.ParseFromString(train(corpus, tmp_path / "tok"))
    spec = model.trainer_spec
    assert spec.model_type == model_pb2.TrainerSpec.BPE
    assert spec.byte_fallback and spec.split_digits and not spec.hard_vocab_limit
    assert abs(spec.character_coverage - 0.999) < 1e-6
    assert (spec.pad_id, spec.bos_id, spec.eos_id, spec.unk_id) == (0, 1, 2, 3)
    assert model.normalizer_spec.name == "nmt_nfkc" and not model.normalizer_spec.add_dummy_prefix
    sp = spm.SentencePieceProcessor(model_proto=model.SerializeToString())
    assert [sp.id_to_piece(i) for i in (4, 259)] == ["<0x00>", "<0xFF>"]
    meta = json.loads((tmp_path / "tok/tokenizer.json").read_text())
    assert meta["vocab_size"] == sp.vocab_size() == 360 and meta["bos_id"] == 1 and meta["variant"] == "plain"


def test_same_inputs_same_bytes(corpus, tmp_path):
    assert train(corpus, tmp_path / "a") == train(corpus, tmp_path / "b")
    assert (tmp_path / "a/tokenizer.vocab").read_bytes() == (tmp_path / "b/tokenizer.vocab").read_bytes()


def test_casefold_variant_has_no_uppercase_pieces(corpus, tmp_path):
    sp = spm.SentencePieceProcessor(model_proto=train(corpus, tmp_path / "cf", variant="casefold"))
    learned = [sp.id_to_piece(i) for i in range(260, sp.vocab_size())]
    assert learned and not any(p != p.lower() for p in learned)


def test_vocab_size_is_validated():
    with pytest.raises(ConfigError, match="vocab_size"):
        from_dict(tok_stage.Config, {"vocab_size": 100}, "params.yaml: tokenizer")
    with pytest.raises(ConfigError, match="variant"):
        from_dict(tok_stage.Config, {"variant": "upper"}, "params.yaml: tokenizer")


def test_corpus_of_only_long_documents_is_a_clear_error(tmp_path):
    from pgolf.errors import InputError

    corpus = write_corpus(tmp_path / "corpus", [" ".join(make_docs(40, seed=i)) for i in range(3)])
    with pytest.raises(InputError, match="longer than 4192 bytes") as err:
        train(corpus, tmp_path / "tok")
    assert "docs.jsonl" in str(err.value) and not (tmp_path / "tok").exists()
    assert len(train(corpus, tmp_path / "tok", max_sentence_length=1 << 20)) > 0


def test_adopting_a_published_model_checks_it_and_keeps_its_bytes(corpus, tmp_path):
    from pgolf.errors import FormatError, InputError

    published = tmp_path / "fineweb_360_bpe.model"
    published.write_bytes(train(corpus, tmp_path / "trained"))

    def adopt(out, path=published, **cfg):
        config = tok_stage.Config(**{"vocab_size": 360, "num_threads": 1, "adopt": str(path), **cfg})
        return execute(tok_stage.SPEC, config, {"corpus": corpus}, tmp_path / out)

    assert adopt("adopted")["vocab_size"] == 360
    assert (tmp_path / "adopted/tokenizer.model").read_bytes() == published.read_bytes()
    info = json.loads((tmp_path / "adopted/tokenizer.json").read_text())
    assert info["adopted_from"] == str(published) and info["trainer"] is None
    with pytest.raises(FormatError, match="360 pieces, but tokenizer.vocab_size is 512"):
        adopt("a2", vocab_size=512)
    with pytest.raises(FormatError, match="variant caseops needs the pieces"):
        adopt("a3", variant="caseops")
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(FormatError, match="not a SentencePiece model") as err:
        adopt("a4", path=tmp_path / "junk.model")
    assert "junk.model" in str(err.value) and not (tmp_path / "a4").exists()
    with pytest.raises(InputError, match="not found"):
        adopt("a5", path=tmp_path / "missing.model")
