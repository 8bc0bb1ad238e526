"""The pipeline's stages, in order: the registry that params rendering, the flows and the cache check
read. One params section per stage, named like the stage."""
from __future__ import annotations

from pgolf.errors import ConfigError
from pgolf.typed_params import to_dict
from tasks import corpus, evaluate, gptq, pack, shards, tokenizer, train
from tasks.common import StageSpec

STAGE_MODULES = (corpus, tokenizer, shards, train, gptq, pack, evaluate)
STAGES = tuple(m.SPEC.name for m in STAGE_MODULES)


def spec_of(stage: str) -> StageSpec:
    for module in STAGE_MODULES:
        if module.SPEC.name == stage:
            return module.SPEC
    raise ConfigError(f"unknown stage {stage!r}; stages are {list(STAGES)}")


def defaults() -> dict:
    return {m.SPEC.name: to_dict(m.SPEC.config_cls()) for m in STAGE_MODULES}
