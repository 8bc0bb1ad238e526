"""The challenge baseline's own quantization (`quantize_state_dict_int8`, "int8_clean_per_row_v1",
docs/lineage.md#model-formats), so a model trained anywhere can be scored the way the baseline scores itself.

- non-float tensors: kept as they are;
- float tensors of at most 65,536 elements: kept, fp32 when the name holds a control pattern
  (attn_scale, mlp_scale, resid_mix, q_gain, skip_weight, ...), else stored fp16;
- matrices: int8 per row, clipped at the 99.99984th percentile of |w| in the row,
  scale = max(clip / 127, 1 / 127) (codes from the fp32 scale, the scale stored fp16);
- other float tensors: int8 with one fp32 scale, clip at the same percentile of the whole tensor.
No calibration: no Hessian, no GPTQ. Dequantization gives each tensor back in the dtype the
checkpoint held it in (`dequantize_state_dict_int8` casts to it): the baseline trains its embedding
in bf16, so its dequantized embedding is rounded to bf16; entries record that dtype.
"""
from __future__ import annotations

import torch

from pgolf.model.families import is_control
from pgolf.quant.quantized_model import QuantizedModel

KEEP_FLOAT_MAX_NUMEL = 65_536
CLIP_QUANTILE = 99.99984 / 100.0


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    w = weight.float()
    clip = torch.quantile(w.abs(), CLIP_QUANTILE, dim=1)
    clipped = torch.maximum(torch.minimum(w, clip[:, None]), -clip[:, None])
    scale = (clip / 127.0).clamp_min(1.0 / 127.0)
    codes = torch.clamp(torch.round(clipped / scale[:, None]), -127, 127).to(torch.int8)
    return codes, scale.to(torch.float16)


def quantize_tensor(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    w = weight.float()
    clip = float(torch.quantile(w.abs().flatten(), CLIP_QUANTILE)) if w.numel() else 0.0
    scale = torch.tensor(clip / 127.0 if clip > 0 else 1.0, dtype=torch.float32)
    codes = torch.clamp(torch.round(torch.clamp(w, -clip, clip) / scale), -127, 127).to(torch.int8)
    return codes, scale


def quantize_baseline_int8(state: dict[str, torch.Tensor], model_config: dict,
                           source_dtypes: dict[str, str] | None = None) -> tuple[QuantizedModel, dict]:
    """`source_dtypes`: the checkpoint's dtype of tensors that `state` holds in another one (an
    imported bf16 embedding now fp32); the rest keep their own."""
    tensors, entries, report = {}, {}, {}
    for name, tensor in sorted(state.items()):
        dtype = (source_dtypes or {}).get(name, str(tensor.dtype).removeprefix("torch."))
        entry = {"shape": list(tensor.shape), "dtype": dtype}
        if not tensor.is_floating_point() or tensor.numel() <= KEEP_FLOAT_MAX_NUMEL:
            control = is_control(name)
            kept = tensor.float() if control else tensor.to(torch.float16) if tensor.is_floating_point() else tensor
            tensors[name] = kept.contiguous()
            entries[name] = {**entry, "kind": "passthrough"}
            continue
        if tensor.ndim == 2:
            codes, scale = quantize_rows(tensor)
            kind = "int8_row"
        else:
            codes, scale = quantize_tensor(tensor)
            kind = "int8_tensor"
        tensors[f"{name}.q"], tensors[f"{name}.scale"] = codes.contiguous(), scale
        entries[name] = {**entry, "kind": kind, "bits": 8}
    qm = QuantizedModel(model_config, tensors, entries)
    dequantized = qm.dequantize()
    for name, entry in entries.items():
        if entry["kind"] != "passthrough":
            report[name] = {"kind": entry["kind"], "bits": 8,
                            "error_fro": float(torch.linalg.vector_norm(state[name].float() - dequantized[name]))}
    return qm, report
