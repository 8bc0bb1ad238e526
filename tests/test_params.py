"""Strict configs, presets and overrides; params.yaml in the repo is the rendered smoke preset."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
import yaml

from pgolf.errors import ConfigError
from pgolf.params import deep_merge, from_dict, parse_override
from tasks import params as P

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Inner:
    width: int = 4
    ratio: float = 0.5


@dataclass
class Outer:
    name: str = "x"
    mode: Literal["a", "b"] = "a"
    inner: Inner = field(default_factory=Inner)
    sizes: list[int] = field(default_factory=lambda: [1, 2])

    def validate(self):
        if self.inner.width <= 0:
            raise ValueError("inner.width must be positive")


def test_from_dict_builds_nested_and_coerces():
    cfg = from_dict(Outer, {"inner": {"ratio": 1}, "sizes": [3]}, "t")
    assert cfg.inner.ratio == 1.0 and isinstance(cfg.inner.ratio, float) and cfg.sizes == [3]


@pytest.mark.parametrize("data,needle", [
    ({"nmae": "y"}, "nmae"),
    ({"mode": "c"}, "'c'"),
    ({"inner": {"width": "wide"}}, "t.inner.width"),
    ({"inner": {"width": True}}, "t.inner.width"),
    ({"inner": {"width": 0}}, "positive"),
    ({"sizes": 3}, "t.sizes"),
])
def test_from_dict_rejects_with_location(data, needle):
    with pytest.raises(ConfigError) as err:
        from_dict(Outer, data, "t")
    assert needle in str(err.value)


def test_parse_override_and_merge():
    assert parse_override("train.model.num_layers=11") == {"train": {"model": {"num_layers": 11}}}
    assert parse_override("pack.compressor=lzma") == {"pack": {"compressor": "lzma"}}
    with pytest.raises(ConfigError):
        parse_override("no_equals_sign")
    assert deep_merge({"a": {"b": 1, "c": 2}}, {"a": {"c": 3}}) == {"a": {"b": 1, "c": 3}}


def test_render_defaults_cover_every_stage():
    params = P.render()
    assert list(params) == list(P.STAGES)
    assert params["train"]["model"]["num_layers"] == 9  # challenge baseline
    assert params["shards"]["val_docs"] == 50000


def test_every_preset_renders():
    for name in P.list_presets():
        params = P.render(name)
        assert set(params) == set(P.STAGES), name


def test_overrides_apply_after_preset():
    params = P.render("smoke", ["train.iterations=7", "eval.stride=64"])
    assert params["train"]["iterations"] == 7 and params["eval"]["stride"] == 64
    assert params["train"]["model"]["num_layers"] == yaml.safe_load((ROOT / "presets/smoke.yaml").read_text())["train"]["model"]["num_layers"]


def test_bad_override_and_preset_are_clear():
    with pytest.raises(ConfigError, match="unknown section"):
        P.render(None, ["trian.iterations=3"])
    with pytest.raises(ConfigError, match="unknown key"):
        P.render(None, ["train.iteratons=3"])
    with pytest.raises(ConfigError, match="unknown preset"):
        P.render("nope")


def test_preset_extends_chain(tmp_path):
    (tmp_path / "base.yaml").write_text("train: {iterations: 5, seed: 3}\n")
    (tmp_path / "child.yaml").write_text("extends: base\ntrain: {iterations: 9}\n")
    (tmp_path / "loop.yaml").write_text("extends: loop\n")
    params = P.render("child", presets_dir=tmp_path)
    assert params["train"]["iterations"] == 9 and params["train"]["seed"] == 3
    with pytest.raises(ConfigError, match="loops"):
        P.render("loop", presets_dir=tmp_path)


def test_repo_params_yaml_is_the_rendered_smoke_preset():
    committed = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert committed == P.render("smoke"), "params.yaml is stale: run `python -m tasks.params --preset smoke`"
