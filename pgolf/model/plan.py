"""The layer plan: what each physical block is, which one runs at each virtual depth, and what it
does there.

Pure functions of the config, so every per-layer choice (XSA, value embeddings, inhibitors, the
LN scale, recurrence, FiLM slots, U-Net pairing and parallel lanes) is decided in one place
instead of index lists scattered through the model's constructors.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from pgolf.model.config import ModelConfig


@dataclass(frozen=True)
class BlockSpec:
    """What one physical block is built with; the same at every depth it runs at."""
    physical: int
    xsa: bool  # exclusive self-attention (the last xsa_last_n blocks)
    value_embedding: bool  # its V adds the shared value embedding (ve_layers)
    inhibitor: bool  # PR #2116's inhibitory gates on its attention and MLP outputs (inhibitor_blocks)
    norm_scale: float  # its input norms x 1/sqrt(physical + 1) under ln_scale, else 1
    # The two-lane mixing weights. Every block has them once lanes are on, as R1's do, though only
    # decoder steps from parallel_start_layer run on lanes: the state dict keeps R1's names and shapes.
    lane_weights: bool


def block_specs(cfg: ModelConfig) -> tuple[BlockSpec, ...]:
    return tuple(BlockSpec(physical=i, xsa=i >= cfg.num_layers - cfg.xsa_last_n, value_embedding=i in cfg.ve_layers,
                           inhibitor=i in cfg.inhibitor_blocks,
                           norm_scale=1.0 / math.sqrt(i + 1) if cfg.ln_scale else 1.0,
                           lane_weights=cfg.parallel_start_layer >= 0)
                 for i in range(cfg.num_layers))


@dataclass(frozen=True)
class LayerStep:
    virtual: int  # depth in the virtual order
    physical: int  # the block that runs there
    film_slot: int  # index of this depth's FiLM scale/shift, -1 for none
    parallel: bool  # runs on two residual lanes (decoder steps from parallel_start_layer on)


@dataclass(frozen=True)
class LayerPlan:
    encoder: tuple[LayerStep, ...]
    decoder: tuple[LayerStep, ...]

    @property
    def steps(self) -> tuple[LayerStep, ...]:
        return self.encoder + self.decoder


def virtual_order(cfg: ModelConfig, looping: bool) -> list[int]:
    """R1 with layers 3-5 looped twice: [0,1,2,3,4,5,3,4,5,3,4,5,6,7,8,9,10] (docs/lineage.md#architecture)."""
    if cfg.block_map:
        return list(cfg.block_map)
    layers = list(range(cfg.num_layers))
    if not (looping and cfg.num_loops):
        return layers
    loop = layers[cfg.loop_start:cfg.loop_end + 1]
    return layers[:cfg.loop_start] + loop * (cfg.num_loops + 1) + layers[cfg.loop_end + 1:]


def shared_depths(cfg: ModelConfig) -> list[int]:
    """Virtual depths whose block also runs at another depth (the ones FiLM modulates)."""
    order = virtual_order(cfg, looping=True)
    return [v for v, p in enumerate(order) if order.count(p) > 1]


def layer_plan(cfg: ModelConfig, looping: bool) -> LayerPlan:
    order = virtual_order(cfg, looping)
    film = {v: i for i, v in enumerate(shared_depths(cfg))} if cfg.film else {}
    n_enc = len(order) // 2
    steps = []
    for v, p in enumerate(order):
        parallel = v >= n_enc and 0 <= cfg.parallel_start_layer <= p
        steps.append(LayerStep(v, p, film.get(v, -1) if looping or cfg.block_map else -1, parallel))
    return LayerPlan(tuple(steps[:n_enc]), tuple(steps[n_enc:]))


def num_skips(cfg: ModelConfig) -> int:
    """Skip connections sized for the deepest schedule (R1: 8 pairs for the 17-deep looped order)."""
    plans = [layer_plan(cfg, False), layer_plan(cfg, True)]
    return max(min(len(p.encoder), len(p.decoder)) for p in plans)
