"""The artifact: exact round trips for every compressor, deterministic bytes, the cap, corrupt files."""
from __future__ import annotations

import json
import struct

import pytest
import torch

from pgolf.errors import CapExceededError, FormatError, InputError
from pgolf.pack.compress import COMPRESSORS, compress, decompress
from pgolf.pack.serialize import FORMAT_VERSION, OUTER, load_artifact, pack, unpack
from pgolf.quant.format import QuantizedModel, save_quantized
from tasks import pack as pack_stage
from tasks.common import execute


def quantized_model() -> QuantizedModel:
    g = torch.Generator().manual_seed(0)
    tensors = {
        "blocks.0.attn.c_q.weight.q": torch.randint(-31, 32, (16, 32), generator=g, dtype=torch.int8),
        "blocks.0.attn.c_q.weight.scale": torch.rand(16, generator=g).half(),
        "blocks.0.mlp.fc.weight.q": torch.randint(-31, 32, (32, 16), generator=g, dtype=torch.int8),
        "blocks.0.mlp.fc.weight.scale": torch.rand(32, generator=g).half(),
        "blocks.0.attn_scale": torch.randn(16, generator=g).half(),
    }
    entries = {
        "blocks.0.attn.c_q.weight": {"kind": "gptq", "bits": 6, "shape": [16, 32], "dtype": "float32"},
        "blocks.0.mlp.fc.weight": {"kind": "gptq", "bits": 6, "shape": [32, 16], "dtype": "float32"},
        "blocks.0.attn_scale": {"kind": "passthrough", "shape": [16], "dtype": "float32"},
    }
    return QuantizedModel({"vocab_size": 64, "model_dim": 16}, tensors, entries)


@pytest.mark.parametrize("name", COMPRESSORS)
def test_compressors_round_trip(name):
    data = bytes(range(256)) * 50
    assert decompress(compress(data, name), name) == data
    assert len(compress(data, name)) < len(data)


@pytest.mark.parametrize("name", COMPRESSORS)
def test_pack_unpack_is_bit_exact_and_deterministic(name):
    qm = quantized_model()
    blob, sizes = pack(qm, name)
    assert blob == pack(qm, name)[0]
    restored = unpack(blob)
    assert restored.model_config == qm.model_config and restored.entries == qm.entries
    assert set(restored.tensors) == set(qm.tensors)
    for key, tensor in qm.tensors.items():
        assert restored.tensors[key].dtype == tensor.dtype and torch.equal(restored.tensors[key], tensor), key
    for key, value in qm.dequantize().items():
        assert torch.equal(restored.dequantize()[key], value)
    assert sizes["blocks.0.attn.c_q.weight.q"] == 16 * 32


def test_corrupt_artifacts_are_clear_errors(tmp_path):
    blob, _ = pack(quantized_model(), "brotli")
    path = tmp_path / "artifact.bin"
    cases = {
        "shorter than": blob[:10],
        "magic": b"XXXX" + blob[4:],
        "version": blob[:4] + struct.pack("<H", FORMAT_VERSION + 1) + blob[6:],
        "truncated or corrupt": blob[:-20],
        "checksum": blob[:OUTER.size - 1] + bytes([blob[OUTER.size - 1] ^ 1]) + blob[OUTER.size:],
    }
    for needle, data in cases.items():
        path.write_bytes(data)
        with pytest.raises(FormatError, match=needle) as err:
            load_artifact(path)
        assert str(path) in str(err.value)
    with pytest.raises(InputError, match="pack stage"):
        load_artifact(tmp_path / "missing.bin")


def run_pack(tmp_path, **cfg):
    gptq = tmp_path / "gptq"
    gptq.mkdir(exist_ok=True)
    save_quantized(quantized_model(), gptq / "quantized.safetensors")
    return execute(pack_stage.SPEC, pack_stage.Config(**cfg), {"gptq": gptq}, tmp_path / "pack")


def test_stage_counts_code_and_groups(tmp_path):
    run_pack(tmp_path)
    size = json.loads((tmp_path / "pack/size.json").read_text())
    artifact = (tmp_path / "pack/artifact.bin").read_bytes()
    assert size["model_bytes"] == len(artifact)
    assert "tasks/eval.py" in size["code_files"] and "pgolf/evaluate/bpb.py" in size["code_files"]
    assert "pgolf/optim/muon.py" not in size["code_files"] and "tasks/train.py" not in size["code_files"]
    assert size["total_bytes"] == size["model_bytes"] + size["code_bytes"]
    assert size["margin_bytes"] == 16_000_000 - size["total_bytes"]
    assert set(size["groups"]) == {"attention", "mlp", "scales", "passthrough"}
    assert size["groups"]["attention"]["raw_bytes"] == 16 * 32


def test_cap_exceeded_says_by_how_much_and_writes_nothing(tmp_path):
    with pytest.raises(CapExceededError, match="bytes over the 1,000-byte cap") as err:
        run_pack(tmp_path, cap_bytes=1000)
    assert "quantized.safetensors" in str(err.value)
    assert not (tmp_path / "pack").exists()
