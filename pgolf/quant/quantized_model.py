"""The quantized model as tensors: `<name>.q` int8 codes + `<name>.scale` fp16 per row for
quantized matrices, `<name>` fp16 for passthrough tensors, and a manifest of what each one is.
gptq writes it as safetensors; pack serializes the same dict; eval dequantizes it."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from pgolf.errors import FormatError, InputError
from pgolf.quant.lqer import correction

QUANT_FORMAT = "pgolf-quant-v1"
KINDS = ("gptq", "rtn", "int8_row", "int8_tensor", "passthrough")
# Dequantized tensors are rounded to the dtype their entry records when it is one of these.
ROUNDED_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class QuantizedModel:
    model_config: dict
    tensors: dict[str, torch.Tensor]  # stored tensors (codes, scales, passthrough)
    entries: dict[str, dict] = field(default_factory=dict)  # original name -> {kind, bits, shape, dtype}

    def dequantize(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, entry in sorted(self.entries.items()):
            kind = entry.get("kind")
            stored = [name] if kind == "passthrough" else [f"{name}.q", f"{name}.scale"]
            if kind not in KINDS or any(key not in self.tensors for key in stored):
                raise FormatError(f"tensor {name}: kind {kind!r} " + (f"is not one of {KINDS}" if kind not in KINDS else
                                  f"needs stored tensors {stored}, which are not all there"))
            if entry["kind"] == "passthrough":
                out[name] = self.tensors[name].float()
            elif entry["kind"] == "int8_tensor":  # one scale for the whole tensor (the baseline's non-matrices)
                out[name] = self.tensors[f"{name}.q"].float() * self.tensors[f"{name}.scale"].float()
            else:
                codes, scale = self.tensors[f"{name}.q"], self.tensors[f"{name}.scale"]
                out[name] = codes.float() * scale.float()[:, None]
                if "lqer" in entry:
                    out[name] = out[name] + correction(self.tensors, name, entry["lqer"]["group"])
            if list(out[name].shape) != list(entry["shape"]):
                raise FormatError(f"tensor {name}: stored shape {list(out[name].shape)} != recorded {entry['shape']}")
            if entry.get("dtype") in ROUNDED_DTYPES:
                # The value the source model held (the baseline's bf16 embedding), carried in fp32.
                out[name] = out[name].to(ROUNDED_DTYPES[entry["dtype"]]).float()
        return out


def save_quantized(qm: QuantizedModel, path: str | Path) -> None:
    meta = {"format": QUANT_FORMAT, "model": qm.model_config, "entries": qm.entries}
    tensors = {k: v.contiguous() for k, v in sorted(qm.tensors.items())}
    save_file(tensors, str(path), metadata={"pgolf": json.dumps(meta, sort_keys=True)})


def load_quantized(path: str | Path) -> QuantizedModel:
    path = Path(path)
    if not path.is_file():
        raise InputError("quantized.safetensors not found: is this a gptq stage output?", path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("pgolf", "{}"))
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, json.JSONDecodeError) as err:
        raise FormatError(f"cannot read quantized model ({err}); the file is corrupt or truncated", path) from err
    if meta.get("format") != QUANT_FORMAT:
        raise FormatError(f"format {meta.get('format')!r} is not {QUANT_FORMAT!r}", path)
    return QuantizedModel(meta["model"], tensors, meta["entries"])
