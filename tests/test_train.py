"""The train stage under torchrun on CPU: two gloo ranks, outputs, vocab check, rank invariance."""
from __future__ import annotations

import json

import pytest

from pgolf.errors import FormatError
from pgolf.model.config import ModelConfig
from pgolf.model.io import load_model
from pgolf.params import from_dict
from pgolf.errors import ConfigError
from tasks import train as train_stage
from tasks.common import execute
from tests.conftest import TINY_MODEL


def config(**kw) -> train_stage.Config:
    base = dict(model=ModelConfig(**TINY_MODEL), nproc=2, device="cpu", iterations=12, train_batch_tokens=512,
                train_seq_len=64, grad_accum_steps=1, max_wallclock_seconds=0, warmup_steps=2, warmdown_iters=4,
                compile=False, log_every=1, matrix_lr=0.02, scalar_lr=0.02, tied_embed_lr=0.03)
    return train_stage.Config(**{**base, **kw})


def losses(out) -> list[float]:
    return [json.loads(line)["train_loss"] for line in (out / "train_log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def two_rank_run(data_dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "train"
    metrics = execute(train_stage.SPEC, config(), {"shards": data_dirs["shards"]}, out)
    return out, metrics


def test_two_gloo_ranks_train_and_write_everything(two_rank_run):
    out, metrics = two_rank_run
    assert metrics["steps"] == 12 and metrics["world_size"] == 2 and metrics["tokens_per_s"] > 0
    for name in ("model.safetensors", "config.json", "train_log.jsonl", "metrics.json"):
        assert (out / name).is_file(), name
    assert (out / "dvclive").is_dir()
    curve = losses(out)
    assert len(curve) == 12 and curve[-1] < curve[0] - 0.3
    model, cfg = load_model(out)
    assert cfg == ModelConfig(**TINY_MODEL)
    resolved = json.loads((out / "config.json").read_text())
    assert resolved["train"]["nproc"] == 2 and "code_version" in resolved


def test_one_process_matches_two_on_the_same_global_batch(two_rank_run, data_dirs, tmp_path):
    out = tmp_path / "train1"
    execute(train_stage.SPEC, config(nproc=1, grad_accum_steps=2, iterations=12), {"shards": data_dirs["shards"]}, out)
    assert losses(out) == pytest.approx(losses(two_rank_run[0]), abs=2e-4)


def test_vocab_mismatch_with_the_shards_is_clear(data_dirs, tmp_path):
    cfg = config(model=ModelConfig(**{**TINY_MODEL, "vocab_size": 512}))
    with pytest.raises(FormatError, match="400-piece") as err:
        execute(train_stage.SPEC, cfg, {"shards": data_dirs["shards"]}, tmp_path / "t")
    assert "manifest.json" in str(err.value)
    assert not (tmp_path / "t").exists()


def test_batch_geometry_is_validated():
    with pytest.raises(ConfigError, match="multiple"):
        from_dict(train_stage.Config, {"train_batch_tokens": 1000, "train_seq_len": 64, "nproc": 2}, "params.yaml: train")
