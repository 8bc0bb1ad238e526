"""The artifact: exact round trips for every compressor, deterministic bytes, the cap, corrupt files."""
from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch

from pgolf.errors import CapExceededError, FormatError, InputError
from pgolf.errors import PgolfError
from pgolf.pack.compress import COMPRESSORS, available, compress, decompress
from pgolf.pack.serialize import CONTAINER, FORMAT_VERSION, load_artifact, pack, similarity_order, unpack

HERE = [c for c in COMPRESSORS if available(c)]
from pgolf.quant.quantized_model import QuantizedModel, load_quantized, save_quantized
from tasks import pack as pack_stage
from runner.stage import execute


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


@pytest.mark.parametrize("name", HERE)
def test_compressors_round_trip(name):
    data = bytes(range(256)) * 50
    assert decompress(compress(data, name), name) == data
    assert len(compress(data, name)) < len(data)


@pytest.mark.parametrize("layout,sort_rows", [("flat", False), ("pergroup", False), ("pergroup", True)])
@pytest.mark.parametrize("name", HERE)
def test_pack_unpack_is_bit_exact_and_deterministic(name, layout, sort_rows):
    qm = quantized_model()
    blob, sizes = pack(qm, name, layout=layout, sort_rows=sort_rows)
    assert blob == pack(qm, name, layout=layout, sort_rows=sort_rows)[0]
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
        "cut off": blob[:-20],
        "truncated or corrupt": blob[:-20] + bytes(20),
        "checksum": blob[:CONTAINER.size + 20] + bytes([blob[CONTAINER.size + 20] ^ 1]) + blob[CONTAINER.size + 21:],
    }
    for needle, data in cases.items():
        path.write_bytes(data)
        with pytest.raises(FormatError, match=needle) as err:
            load_artifact(path)
        assert str(path) in str(err.value)
    with pytest.raises(InputError, match="pack stage"):
        load_artifact(tmp_path / "missing.bin")


def run_pack(tmp_path, params=None, **cfg):
    gptq = tmp_path / "gptq"
    gptq.mkdir(exist_ok=True)
    save_quantized(quantized_model(), gptq / "quantized.safetensors")
    return execute(pack_stage.SPEC, pack_stage.Config(**cfg), {"gptq": gptq}, tmp_path / "pack", params=params)


def test_stage_counts_the_exported_script_and_groups(tmp_path):
    from pgolf.pack.codesize import wrapped_size
    from runner import params as P

    params = P.render("smoke")
    run_pack(tmp_path, params)
    size = json.loads((tmp_path / "pack/size.json").read_text())
    artifact = (tmp_path / "pack/artifact.bin").read_bytes()
    assert size["model_bytes"] == len(artifact)
    # The code is the script the export writes for these params, counted the records' way.
    assert size["code_bytes"] == wrapped_size(pack_stage.submission_script(params))
    assert "train_gpt.py" in size["code_counted"]
    assert "runner/submission.py" in size["code_files"] and "pgolf/optim/muon.py" in size["code_files"]
    assert "pgolf/train/plots.py" not in size["code_files"] and "runner/params.py" not in size["code_files"]
    # The files as they are: a labelled detail, larger, in no total.
    assert 0 < size["code_bytes"] < size["pipeline_code_bytes"] / 2
    assert size["total_bytes"] == size["model_bytes"] + size["code_bytes"]
    assert size["margin_bytes"] == 16_000_000 - size["total_bytes"]
    assert set(size["groups"]) == {"attention", "mlp", "scales", "passthrough"}
    assert size["groups"]["attention"]["raw_bytes"] == 16 * 32
    chart = (tmp_path / "pack/bytes_by_group.svg").read_text()
    assert chart.startswith("<svg") and all(group in chart for group in size["groups"])
    assert "code (train_gpt.py)" in chart and f"{size['code_bytes']:,} / " in chart


def test_code_count_follows_every_section_the_script_carries(tmp_path):
    """An eval or train setting is text in the exported script: its count moves with it (which is
    why dvc.yaml lists those sections as pack's params)."""
    from runner import params as P

    base = pack_stage.submission_script(P.render("smoke"))
    for override in ("eval.stride=64", "train.seed=7", "gptq.bits=8", "pack.level=9"):
        assert pack_stage.submission_script(P.render("smoke", [override])) != base, override
    assert pack_stage.submission_script(P.render("smoke", ["corpus.max_docs=5"])) == base
    with pytest.raises(PgolfError, match="no section eval"):
        pack_stage.submission_script({k: v for k, v in P.render("smoke").items() if k != "eval"})


def test_pipeline_only_modules_are_never_imported_at_a_bundled_modules_top():
    """The script leaves them out (pgolf.pack.single_file.PIPELINE_ONLY): a top-level import of one
    in any bundled module would make the exported script fail at its first line."""
    import ast
    from pathlib import Path

    from pgolf.pack.single_file import PIPELINE_ONLY, bundled_files

    root = Path(pack_stage.ROOT)
    names = {rel.removesuffix(".py").replace("/", ".") for rel in PIPELINE_ONLY}
    offenders = []
    for path in bundled_files(pack_stage.SUBMISSION_ENTRY, root):
        for node in ast.parse(path.read_text()).body:
            imported = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                        [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
                        if isinstance(node, ast.ImportFrom) and node.module else [])
            offenders += [f"{path.relative_to(root)}: {n}" for n in imported if n in names]
    assert not offenders
    assert not {(root / rel).resolve() for rel in PIPELINE_ONLY} & set(bundled_files(pack_stage.SUBMISSION_ENTRY, root))


def test_cap_exceeded_says_by_how_much_and_writes_nothing(tmp_path):
    with pytest.raises(CapExceededError, match="bytes over the 1,000-byte cap") as err:
        run_pack(tmp_path, cap_bytes=1000)
    assert "quantized.safetensors" in str(err.value)
    assert not (tmp_path / "pack").exists()


def test_lrzip_absent_is_a_clear_error(monkeypatch):
    monkeypatch.setattr("shutil.which", lambda name: None)
    with pytest.raises(PgolfError, match="apt-get install lrzip"):
        compress(b"data", "lrzip")


def test_similarity_order_chains_nearest_rows():
    rows = torch.tensor([[0, 0], [10, 10], [1, 1], [9, 9], [2, 2]], dtype=torch.int8).numpy()
    assert similarity_order(rows).tolist() == [0, 2, 4, 3, 1]


def test_pergroup_layout_is_smaller_on_structured_codes():
    """Rows that repeat with small changes: per-group transposed streams compress better."""
    g = torch.Generator().manual_seed(1)
    base = torch.randint(-3, 4, (1, 256), generator=g, dtype=torch.int8)
    tensors, entries = {}, {}
    for layer in range(4):
        rows = (base.repeat(64, 1) + torch.randint(-1, 2, (64, 256), generator=g, dtype=torch.int8)).to(torch.int8)
        rows = rows[torch.randperm(64, generator=g)]
        name = f"blocks.{layer}.mlp.fc.weight"
        tensors[name + ".q"], tensors[name + ".scale"] = rows, torch.ones(64).half()
        entries[name] = {"kind": "gptq", "bits": 6, "shape": [64, 256], "dtype": "float32"}
    qm = QuantizedModel({}, tensors, entries)
    flat = len(pack(qm, "lzma")[0])
    grouped = len(pack(qm, "lzma", layout="pergroup", sort_rows=True)[0])
    assert grouped < flat
    restored = unpack(pack(qm, "lzma", layout="pergroup", sort_rows=True)[0])
    assert all(torch.equal(restored.tensors[k], v) for k, v in tensors.items())


def test_wrapped_code_size_follows_the_records_rule():
    from pgolf.pack.codesize import minify, wrapped_size, wrapper

    source = 'def f(x):\n    """Docstring."""\n    assert x\n    return x + 1\n\nprint(f(2))\n'
    assert "Docstring" not in minify(source) and "assert" not in minify(source)
    text = wrapper(source)
    assert text.startswith("import brotli as B,base64 as b\nexec(B.decompress(b.b85decode(")
    assert wrapped_size(source) == len(text.encode())
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(text, {})
    assert out.getvalue() == "3\n"


@pytest.mark.parametrize("layout", ["flat", "pergroup"])
def test_best_is_never_larger_than_any_single_compressor_and_round_trips(layout):
    """compressor best: each stream with its smallest candidate (and the payload stream possibly
    byte-shuffled), so for the same layout no single compressor beats it; decoding is exact."""
    from pgolf.pack.compress import best_candidates
    from pgolf.pack.serialize import stream_choices

    qm = quantized_model()
    best, _ = pack(qm, "best", layout=layout, sort_rows=True)
    for name in best_candidates():
        single, _ = pack(qm, name, layout=layout, sort_rows=True)
        assert len(best) <= len(single), name
    restored = unpack(best)
    assert all(torch.equal(restored.tensors[n], t) for n, t in qm.tensors.items())
    choices = stream_choices(best)
    assert len(choices) == (1 if layout == "flat" else 9)
    assert {c["compressor"] for c in choices if c["stored_bytes"]} <= set(best_candidates())
    assert pack(qm, "best", layout=layout, sort_rows=True)[0] == best  # deterministic


def test_byte_shuffle_inverts_and_groups_high_bytes():
    from pgolf.pack.compress import byte_shuffle, byte_unshuffle

    data = np.arange(1001, dtype=np.uint8).tobytes()
    assert byte_unshuffle(byte_shuffle(data)) == data
    halves = np.array([1.0, 2.0, 3.0], dtype=np.float16).tobytes()
    assert byte_shuffle(halves) == halves[0::2] + halves[1::2]


def test_bad_quantized_models_are_clear_errors(tmp_path):
    """gptq's output truncated or of another format, and a manifest that names what is not stored."""
    from safetensors.torch import save_file

    from pgolf.quant.quantized_model import load_quantized

    path = tmp_path / "quantized.safetensors"
    save_quantized(quantized_model(), path)
    path.write_bytes(path.read_bytes()[:-30])
    with pytest.raises(FormatError, match="corrupt or truncated") as err:
        load_quantized(path)
    assert str(path) in str(err.value)
    save_file({"w": torch.zeros(2)}, str(path), metadata={"pgolf": json.dumps({"format": "pgolf-quant-v0"})})
    with pytest.raises(FormatError, match="'pgolf-quant-v0' is not 'pgolf-quant-v1'"):
        load_quantized(path)
    with pytest.raises(InputError, match="gptq stage output"):
        load_quantized(tmp_path / "missing.safetensors")
    qm = quantized_model()
    del qm.tensors["blocks.0.mlp.fc.weight.scale"]
    with pytest.raises(FormatError, match="blocks.0.mlp.fc.weight: kind 'gptq' needs stored tensors"):
        unpack(pack(qm, "zlib")[0]).dequantize()
    qm = quantized_model()
    qm.entries["blocks.0.attn_scale"]["kind"] = "int3"
    with pytest.raises(FormatError, match="kind 'int3' is not one of"):
        qm.dequantize()


def test_eval_of_an_artifact_with_a_tensor_the_model_lacks_names_it(data_dirs, tmp_path):
    from pgolf.model.config import ModelConfig
    from pgolf.model.gpt import GPT
    from pgolf.model.io import save_model
    from tasks import evaluate as eval_stage, gptq as gptq_stage
    from tests.conftest import TINY_MODEL

    model = GPT(ModelConfig(**TINY_MODEL))
    (tmp_path / "train").mkdir()
    save_model(model, model.cfg, tmp_path / "train")
    execute(gptq_stage.SPEC, gptq_stage.Config(method="int8_baseline", device="cpu"),
            {"train": tmp_path / "train", "shards": data_dirs["shards"]}, tmp_path / "gptq")
    qm = load_quantized(tmp_path / "gptq/quantized.safetensors")
    qm.tensors["blocks.0.attn.c_z.weight"] = qm.tensors.pop("blocks.0.attn_scale")
    qm.entries["blocks.0.attn.c_z.weight"] = qm.entries.pop("blocks.0.attn_scale")
    (tmp_path / "pack").mkdir()
    (tmp_path / "pack/artifact.bin").write_bytes(pack(qm, "zlib")[0])
    with pytest.raises(FormatError, match=r"missing \['blocks.0.attn_scale'\], unexpected \['blocks.0.attn.c_z.weight'\]") as err:
        execute(eval_stage.SPEC, eval_stage.Config(seq_len=32, device="cpu"),
                {"pack": tmp_path / "pack", "shards": data_dirs["shards"], "tokenizer": data_dirs["tokenizer"]},
                tmp_path / "eval")
    assert "artifact.bin" in str(err.value)


def test_a_non_record_cap_is_recorded_in_size_json_and_submission(tmp_path):
    """A cap above the challenge's needs pack.non_record; the size report and submission.json then
    say whether the artifact meets the challenge's 16,000,000 bytes."""
    from flows import export
    from runner import params as P

    params = P.render("smoke", ["pack.cap_bytes=20000000", "pack.non_record=true"])
    run_pack(tmp_path, params, cap_bytes=20_000_000, non_record=True)
    size = json.loads((tmp_path / "pack/size.json").read_text())
    assert size["non_record"] is True and size["meets_challenge_cap"] is True
    art = tmp_path / "artifacts"
    (art / "eval").mkdir(parents=True)
    (art / "train").mkdir()
    (art / "pack").mkdir()
    (art / "eval/metrics.json").write_text(json.dumps({"val_bpb": 1.5, "val_loss": 2.5, "mode": "flat",
                                                       "seq_len": 64, "tokens": 10, "bytes": 20}))
    (art / "train/metrics.json").write_text(json.dumps({"steps": 5, "ms_per_step": 1.0}))
    (art / "pack/size.json").write_text(json.dumps({**size, "model_bytes": 15_999_000}))
    submission = export.export(tmp_path / "records", params, "big", "a", "a", art)
    assert submission["non_record"] is True and submission["meets_challenge_cap"] is False
    assert submission["bytes_total"] > 16_000_000
    assert not pack_stage.meets_challenge_cap(16_000_001) and pack_stage.meets_challenge_cap(16_000_000)


def test_exported_readme_submission_and_size_json_count_the_same_bytes(tmp_path):
    """The records folder's three byte counts are one count (tasks.pack.counted_bytes): its code is
    the exported train_gpt.py as the records count it, and the script's own pack stage, given the
    same quantized model, writes the same size."""
    import shutil

    from flows import export

    from runner import params as P

    params = P.render("smoke", [])
    run_pack(tmp_path, params)
    art = tmp_path / "artifacts"
    (art / "eval").mkdir(parents=True)
    (art / "train").mkdir()
    shutil.copytree(tmp_path / "pack", art / "pack")
    (art / "eval/metrics.json").write_text(json.dumps({"val_bpb": 1.5, "val_loss": 2.5, "mode": "flat",
                                                       "seq_len": 64, "tokens": 10, "bytes": 20}))
    (art / "train/metrics.json").write_text(json.dumps({"steps": 5, "ms_per_step": 1.0}))
    submission = export.export(tmp_path / "records", params, "tiny", "a", "a", art)
    records = tmp_path / "records"
    size = json.loads((records / "size.json").read_text())
    written = json.loads((records / "submission.json").read_text())
    model = len((art / "pack/artifact.bin").read_bytes())
    judged = execute(pack_stage.SPEC, pack_stage.Config(code_file=str(records / "train_gpt.py")),
                     {"gptq": tmp_path / "gptq"}, tmp_path / "judge_pack")
    code, total = judged["code_bytes"], judged["total_bytes"]
    assert judged["model_bytes"] == model and total == model + code
    assert (size["code_bytes"], size["total_bytes"], size["model_bytes"]) == (code, total, model)
    assert (written["bytes_code"], written["bytes_total"]) == (submission["bytes_code"], submission["bytes_total"])
    assert (written["bytes_code"], written["bytes_total"]) == (code, total)
    assert written["seed_results"][str(params["train"]["seed"])]["artifact_bytes"] == total
    assert size["margin_bytes"] == size["cap_bytes"] - total and size["code_files"] == ["train_gpt.py"]
    readme = (records / "README.md").read_text()
    assert f"| {total:,} | {model:,} | {code:,} |" in readme
    # ... and it is the count the pipeline's own pack stage made before any export.
    pipeline = json.loads((art / "pack/size.json").read_text())
    assert (pipeline["code_bytes"], pipeline["total_bytes"], pipeline["margin_bytes"]) == (code, total, size["margin_bytes"])


def test_export_refuses_a_script_the_run_did_not_count(tmp_path):
    """params.yaml (or the code) changed since the run: the script the export would write is not
    the one pack counted, and a records folder with another count than the run's is refused."""
    import shutil

    from flows import export

    from runner import params as P

    run_pack(tmp_path, P.render("smoke"))
    art = tmp_path / "artifacts"
    (art / "eval").mkdir(parents=True)
    (art / "train").mkdir()
    shutil.copytree(tmp_path / "pack", art / "pack")
    (art / "eval/metrics.json").write_text(json.dumps({"val_bpb": 1.5, "val_loss": 2.5, "mode": "flat",
                                                       "seq_len": 64, "tokens": 10, "bytes": 20}))
    (art / "train/metrics.json").write_text(json.dumps({"steps": 5, "ms_per_step": 1.0}))
    with pytest.raises(InputError, match="pack counted .* rerun the pipeline") as err:
        export.export(tmp_path / "records", P.render("smoke", ["eval.stride=64"]), "x", "a", "a", art)
    assert "size.json" in str(err.value) and not (tmp_path / "records").exists()
