"""Training checkpoints that survive a killed run: one file per rank (each rank owns its shard of
Muon's momentum), written atomically, and a marker naming the last step every rank finished."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from pgolf.errors import FormatError

MARKER = "latest.json"


def rank_path(folder: Path, rank: int) -> Path:
    return Path(folder) / f"rank{rank:03d}.pt"


def save_rank_state(folder: Path, rank: int, state: dict) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = rank_path(folder, rank)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def mark_complete(folder: Path, step: int, world_size: int) -> None:
    """Called by rank 0 after every rank saved `step` (a barrier in between)."""
    tmp = Path(folder) / (MARKER + ".tmp")
    tmp.write_text(json.dumps({"step": step, "world_size": world_size}))
    os.replace(tmp, Path(folder) / MARKER)


def latest_step(folder: Path, world_size: int) -> int | None:
    """The step every rank has a checkpoint for, or None (none yet, or another world size)."""
    marker = Path(folder) / MARKER
    try:
        info = json.loads(marker.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    if info.get("world_size") != world_size:
        return None
    return int(info["step"])


def load_rank_state(folder: Path, rank: int, device: torch.device) -> dict:
    """Tensors and plain containers only (torch.load's weights_only): a resume point is state, never
    code, so a file planted in the resume folder cannot run anything; it is an error naming it."""
    path = rank_path(folder, rank)
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises several types for a bad or unsafe pickle
        raise FormatError(f"not a pgolf resume point ({type(err).__name__}: {str(err)[:200]}); remove the folder "
                          f"{folder} to start the run afresh", path) from err


def remove(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
