"""Strict configs, presets and overrides; params.yaml in the repo is the rendered smoke preset."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
import yaml

from pgolf.errors import ConfigError
from pgolf.typed_params import deep_merge, from_dict, parse_override
from runner import params as P
from tasks import stages

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
    assert list(params) == list(stages.STAGES)
    assert params["train"]["model"]["num_layers"] == 9  # challenge baseline
    assert params["shards"]["val_docs"] == 50000


def test_every_preset_renders():
    for name in P.list_presets():
        params = P.render(name)
        assert set(params) == set(stages.STAGES), name


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


def test_a_checkouts_params_render_from_its_own_presets(tmp_path):
    """A slot at another commit, or a copy sharing this venv, renders the presets it holds."""
    (tmp_path / "presets").mkdir()
    (tmp_path / "presets" / "smoke.yaml").write_text("extends: tiny\ntrain: {iterations: 3}\n")
    (tmp_path / "presets" / "tiny.yaml").write_text("corpus: {max_docs: 7}\n")
    params, _ = P.render_file(tmp_path / "params.yaml", "smoke")
    assert params["train"]["iterations"] == 3 and params["corpus"]["max_docs"] == 7
    assert P.render_file(tmp_path / "elsewhere" / "params.yaml", "smoke")[0] == P.render("smoke")


def committed_params() -> dict | None:
    """params.yaml as the last commit holds it (None outside a git checkout)."""
    import subprocess

    proc = subprocess.run(["git", "show", "HEAD:params.yaml"], cwd=ROOT, capture_output=True, text=True)
    return yaml.safe_load(proc.stdout) if proc.returncode == 0 else None


def test_repo_params_yaml_is_the_rendered_smoke_preset():
    """The committed params.yaml, not the working one: a user's experiments (dvc exp run -S, make run
    SET=...) rewrite that, and are no fault of the repository. A working file that is the render
    (presets/smoke.yaml edited and re-rendered, not yet committed) passes too."""
    smoke = P.render("smoke")
    working = yaml.safe_load((ROOT / "params.yaml").read_text()) if (ROOT / "params.yaml").is_file() else None
    assert smoke in (committed_params(), working), \
        "the committed params.yaml is not the smoke preset: run `.venv/bin/pgolf params --preset smoke` and commit it"


def _parsed_sections(path) -> dict:
    """params.yaml as each stage reads it (runner.stage.load_config), every field resolved (those
    declared LATER while at their default left out, as rendering leaves them)."""
    from pgolf.typed_params import recorded_dict
    from runner.stage import load_config

    return {stage: recorded_dict(load_config(stages.spec_of(stage), path)) for stage in stages.STAGES}


def _field_diff(a: dict, b: dict, where: str = "") -> list[str]:
    diffs = []
    for key in sorted(set(a) | set(b)):
        here = f"{where}.{key}" if where else key
        if isinstance(a.get(key), dict) and isinstance(b.get(key), dict):
            diffs += _field_diff(a[key], b[key], here)
        elif a.get(key) != b.get(key) or type(a.get(key)) is not type(b.get(key)):
            diffs.append(f"{here}: {a.get(key)!r} != {b.get(key)!r}")
    return diffs


@pytest.mark.parametrize("preset", P.list_presets())
def test_dvc_set_rewrite_keeps_every_field_of_every_preset(preset, tmp_path):
    """`dvc exp run -S k=v` rewrites the whole params.yaml through ruamel.yaml (YAML 1.2), which
    drops the quotes around 'off' and writes lists in block style: every field must still mean
    what it meant."""
    from dvc.utils.hydra import apply_overrides  # what `dvc exp run -S` calls

    path = tmp_path / "params.yaml"
    P.write_params(P.render(preset), path, P.header_for(preset, []))
    apply_overrides(str(path), ["eval.batch_seqs=3"])
    expected = P.render(preset, ["eval.batch_seqs=3"])
    assert _field_diff(_parsed_sections(path), expected) == []


def test_yaml_1_1_lookalikes_mean_the_same_to_every_writer(tmp_path):
    """A hand edit, `--set` and a preset all read `off`/`yes`/`on` as strings and 1e-3 as a float."""
    path = tmp_path / "params.yaml"
    P.write_params(P.render("record"), path)
    text = path.read_text()
    assert "ttt: lora" in text
    edited = re.sub(r"(?m)^(\s+matrix_lr:).*$", r"\1 1e-3", text.replace("ttt: lora", "ttt: off"))
    path.write_text(edited)
    by_hand = _parsed_sections(path)
    assert by_hand["eval"]["ttt"] == "off" and by_hand["train"]["matrix_lr"] == 1e-3
    by_set = P.render("record", ["eval.ttt=off", "train.matrix_lr=1e-3", "train.model.ve_layers=[1, 2]"])
    assert by_set["eval"]["ttt"] == "off" and by_set["train"]["matrix_lr"] == 1e-3
    assert by_set["train"]["model"]["ve_layers"] == [1, 2]
    assert parse_override("corpus.source=no") == {"corpus": {"source": "no"}}
    # What pgolf writes reads back the same under YAML 1.1 too (PyYAML's default loader, other tools).
    P.write_params(by_set, path)
    assert yaml.safe_load(path.read_text()) == by_set == _parsed_sections(path)


def with_a_new_switch(metadata: dict):
    """TrainConfig as it would be with one more technique switch in ModelConfig, off by default."""
    from dataclasses import make_dataclass

    from pgolf.model.config import ModelConfig
    from pgolf.train.config import TrainConfig

    # make_dataclass, not a class statement: its annotations are types, not strings to resolve here
    model = make_dataclass("ModelWithSwitch", [("new_switch", bool, field(default=False, metadata=metadata))],
                           bases=(ModelConfig,))
    return make_dataclass("TrainWithSwitch", [("model", model, field(default_factory=model))], bases=(TrainConfig,))


@pytest.mark.parametrize("declared", ["later", "plain"])
def test_a_switch_added_off_changes_no_other_presets_params_or_config(declared, monkeypatch, tmp_path):
    """Issue 28: a technique's default-off field changes no hash of a run that leaves it off: every
    preset renders the same params.yaml (so dvc.lock's params are the same) and the train stage
    records the same config.json. Declared without LATER, it would change them all (the control)."""
    from dvc.utils.hydra import apply_overrides
    from pgolf.typed_params import LATER, recorded_dict
    from tasks.train import resolved_config

    before = {preset: P.render(preset) for preset in P.list_presets()}
    configs_before = {preset: resolved_config(from_dict(stages.config_of("train"), before[preset]["train"], preset))
                      for preset in before}
    extended = with_a_new_switch(LATER if declared == "later" else {})
    original = stages.config_of
    monkeypatch.setattr(stages, "config_of", lambda stage: extended if stage == "train" else original(stage))
    monkeypatch.setattr(P, "config_of", stages.config_of)
    for preset, params in before.items():
        after = P.render(preset)
        config = resolved_config(from_dict(extended, after["train"], preset))
        if declared == "later":
            assert after == params and config == configs_before[preset], preset
        else:
            assert after["train"]["model"]["new_switch"] is False and config != configs_before[preset], preset
    switched = P.render("record", ["train.model.new_switch=true"])
    assert switched["train"]["model"]["new_switch"] is True
    assert recorded_dict(from_dict(extended, switched["train"], "record"))["model"]["new_switch"] is True
    if declared == "later":  # DVC's -S adds a key params.yaml leaves out with `+`
        path = tmp_path / "params.yaml"
        P.write_params(before["record"], path)
        apply_overrides(str(path), ["+train.model.new_switch=true"])
        assert from_dict(extended, yaml.safe_load(path.read_text())["train"], "record").model.new_switch is True


def unrecorded_paths(cls: type, prefix: str) -> list[str]:
    """The field paths of a config that are not declared LATER (nested configs followed)."""
    import dataclasses

    out = []
    for f in dataclasses.fields(cls):
        if f.metadata.get("later"):
            continue
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        out += unrecorded_paths(type(default), f"{prefix}.{f.name}") if dataclasses.is_dataclass(default) \
            else [f"{prefix}.{f.name}"]
    return out


def test_every_field_added_since_is_declared_later():
    """tests/golden/recorded_fields.json: the fields of every stage's config when LATER came in, the
    ones committed params.yaml files and outputs hold whatever their value. Any other field must be
    declared LATER, or adding it changes every preset's params.yaml, dvc.lock and outputs."""
    recorded = json.loads((ROOT / "tests" / "golden" / "recorded_fields.json").read_text())
    now = [path for stage in stages.STAGES for path in unrecorded_paths(stages.config_of(stage), stage)]
    added = sorted(set(now) - set(recorded))
    assert not added, f"declare these fields with metadata=LATER (pgolf.typed_params): {added}"
    assert sorted(now) == sorted(recorded), \
        f"fields gone from the configs: {sorted(set(recorded) - set(now))}; remove them from recorded_fields.json"
