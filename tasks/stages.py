"""The pipeline's stages, in order: the registry that the runner, params rendering, the flows and the
cache check read. One params section per stage, named like the stage.

Each stage's output and config class are written here as well as in its SPEC (tests/test_contract.py
checks they agree), so that `pgolf run`, the params check, the run records and the cache check name
them without importing a stage module: most import torch, seconds an all-cached run would otherwise
spend (issue 25). The configs live in the library, torch-free, and load when asked for. This module
imports no stage: it is part of the code an exported script carries (through runner.stage)."""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import TYPE_CHECKING

from pgolf.errors import ConfigError
from pgolf.typed_params import to_dict

if TYPE_CHECKING:
    from runner.stage import StageSpec

# Each stage has the params section of its name.
STAGES = ("corpus", "tokenizer", "shards", "train", "gptq", "pack", "eval")
# A stage's module is tasks/<stage>.py, but for eval: a module named `eval` shadows the builtin
# wherever it is imported by name. bin/stage has the same one exception.
MODULE_OF_STAGE = {"eval": "evaluate"}
OUTS = {"corpus": "data/corpus", "tokenizer": "artifacts/tokenizer", "shards": "artifacts/shards",
        "train": "artifacts/train", "gptq": "artifacts/gptq", "pack": "artifacts/pack", "eval": "artifacts/eval"}
assert tuple(OUTS) == STAGES, "one output per stage, in pipeline order"
# Each stage's params section, as "module:class" (loaded on first use).
CONFIGS = {"corpus": "pgolf.data.corpus:CorpusConfig", "tokenizer": "pgolf.tokenize.config:TokenizerConfig",
           "shards": "pgolf.data.config:ShardsConfig", "train": "pgolf.train.config:TrainConfig",
           "gptq": "pgolf.quant.config:GPTQConfig", "pack": "pgolf.pack.config:PackConfig",
           "eval": "pgolf.evaluate.config:EvalConfig"}
assert tuple(CONFIGS) == STAGES, "one config per stage, in pipeline order"


def out_of(stage: str) -> str:
    """The stage's output folder, relative to the workspace."""
    if stage not in OUTS:
        raise ConfigError(f"unknown stage {stage!r}; stages are {list(STAGES)}")
    return OUTS[stage]


def config_of(stage: str) -> type:
    """The class of the stage's params section, without importing the stage."""
    out_of(stage)
    module, name = CONFIGS[stage].split(":")
    return getattr(importlib.import_module(module), name)


def stage_module(stage: str) -> str:
    return f"tasks.{MODULE_OF_STAGE.get(stage, stage)}"


def module_of(stage: str) -> ModuleType:
    out_of(stage)
    return importlib.import_module(stage_module(stage))


def spec_of(stage: str) -> StageSpec:
    return module_of(stage).SPEC


def stage_modules() -> tuple[ModuleType, ...]:
    return tuple(module_of(stage) for stage in STAGES)


def __getattr__(name: str):
    if name == "STAGE_MODULES":  # loaded on first use
        return stage_modules()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def defaults() -> dict:
    return {stage: to_dict(config_of(stage)()) for stage in STAGES}
