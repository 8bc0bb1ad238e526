"""Model checkpoints: model.safetensors (fp32, sorted names) + config.json ({"model": {...}, ...})."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from pgolf.errors import FormatError, InputError
from pgolf.model.config import ModelConfig
from pgolf.model.gpt import GPT
from pgolf.typed_params import from_dict, recorded_dict


def model_config_from_dict(data: dict, where: str = "model config") -> ModelConfig:
    return from_dict(ModelConfig, data, where)


def state_dict_fp32(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in sorted(model.state_dict().items())}


def save_model(model: torch.nn.Module, cfg: ModelConfig, folder: str | Path, extra_config: dict | None = None) -> None:
    folder = Path(folder)
    save_file(state_dict_fp32(model), str(folder / "model.safetensors"))
    config = {"model": recorded_dict(cfg), **(extra_config or {})}
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str, allow_nan=False) + "\n")


def read_model_config(folder: str | Path) -> ModelConfig:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise InputError("config.json not found: is this a train stage output?", path)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise FormatError(f"not valid JSON: {err}", path) from err
    if "model" not in data:
        raise FormatError("no 'model' section", path)
    return model_config_from_dict(data["model"], f"{path}: model")


def load_state_dict_into(model: GPT, tensors: dict[str, torch.Tensor], source: str | Path) -> None:
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    missing, unexpected = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    if missing or unexpected:
        raise FormatError(f"tensor names do not match the model config: missing {missing[:5]}, "
                          f"unexpected {unexpected[:5]}", source)
    wrong = [f"{k}: {got[k]} != {expected[k]}" for k in expected if got[k] != expected[k]]
    if wrong:
        raise FormatError(f"tensor shapes do not match the model config: {wrong[:5]}", source)
    model.load_state_dict(tensors, strict=True)


def load_model(folder: str | Path, device: str | torch.device = "cpu") -> tuple[GPT, ModelConfig]:
    folder = Path(folder)
    cfg = read_model_config(folder)
    path = folder / "model.safetensors"
    if not path.is_file():
        raise InputError("model.safetensors not found: is this a train stage output?", path)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise FormatError(f"cannot read weights ({err}); the file is corrupt or truncated", path) from err
    model = GPT(cfg)
    load_state_dict_into(model, tensors, path)
    return model.to(device), cfg


# Prefixes torch.compile and DDP put in front of every name of the module they wrap.
WRAPPER_PREFIXES = ("_orig_mod.", "module.")


def import_state_dict(path: str | Path, cfg: ModelConfig) -> tuple[GPT, dict[str, str]]:
    """A model saved elsewhere with torch.save (e.g. the challenge baseline's final_model.pt):
    a plain state dict or {"model": state_dict}, names possibly prefixed by compile/DDP wrappers.
    Returns the model (fp32) and the checkpoint's dtype of every tensor that was not fp32 (the
    baseline keeps its embedding in bf16), which its own int8 format restores on dequantization."""
    path = Path(path)
    if not path.is_file():
        raise InputError("checkpoint to import not found", path)
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises several types for a bad file
        raise FormatError(f"cannot read as a torch checkpoint ({err})", path) from err
    if isinstance(data, dict) and "model" in data and isinstance(data["model"], dict):
        data = data["model"]
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise FormatError("expected a state dict (name -> tensor)", path)
    tensors, dtypes = {}, {}
    for name, tensor in data.items():
        for prefix in WRAPPER_PREFIXES:
            name = name.removeprefix(prefix)
        tensors[name] = tensor.float()
        if tensor.dtype != torch.float32:
            dtypes[name] = str(tensor.dtype).removeprefix("torch.")
    model = GPT(cfg)
    load_state_dict_into(model, tensors, path)
    return model, dict(sorted(dtypes.items()))


def source_dtypes(folder: str | Path) -> dict[str, str]:
    """The non-fp32 dtypes an imported checkpoint had (config.json `source_dtypes`); empty for a
    model the train stage trained itself."""
    path = Path(folder) / "config.json"
    try:
        return dict(json.loads(path.read_text()).get("source_dtypes", {}))
    except (OSError, json.JSONDecodeError) as err:
        raise FormatError(f"cannot read config.json ({err})", path) from err
