"""The pipeline's stages, in order: the registry that params rendering, the flows and the cache check
read. One params section per stage, named like the stage.

The order, each stage's output and its config class are written here as well as in each SPEC
(tests/test_contract.py checks they agree), so that `pgolf run`, the params check, the run records
and the cache check name them without importing a stage module: most import torch, seconds an
all-cached run would otherwise spend (issue 25). The configs live in the library, torch-free. A SPEC does not read them from here: the eval stage's imports are the code an artifact
is charged for (tasks/pack.py). The modules load when a spec or config is asked for."""
from __future__ import annotations

import importlib
from types import ModuleType

from pgolf.errors import ConfigError
from pgolf.typed_params import to_dict
from tasks.common import PIPELINE, StageSpec, stage_module

OUTS = {"corpus": "data/corpus", "tokenizer": "artifacts/tokenizer", "shards": "artifacts/shards",
        "train": "artifacts/train", "gptq": "artifacts/gptq", "pack": "artifacts/pack", "eval": "artifacts/eval"}
STAGES = PIPELINE
assert tuple(OUTS) == PIPELINE, "one output per stage of tasks.common.PIPELINE, in its order"
# Each stage's params section, as "module:class" (loaded on first use).
CONFIGS = {"corpus": "pgolf.data.corpus:CorpusConfig", "tokenizer": "pgolf.tokenize.config:TokenizerConfig",
           "shards": "pgolf.data.config:ShardsConfig", "train": "pgolf.train.config:TrainConfig",
           "gptq": "pgolf.quant.config:GPTQConfig", "pack": "pgolf.pack.config:PackConfig",
           "eval": "pgolf.evaluate.config:EvalConfig"}
assert tuple(CONFIGS) == PIPELINE, "one config per stage of tasks.common.PIPELINE, in its order"


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
