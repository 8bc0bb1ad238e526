"""The exported records folder: its train_gpt.py, run alone under torchrun, gives the pipeline's numbers."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from pgolf.typed_params import from_dict
from tasks import evaluate as eval_stage, gptq, pack, train
from flows import export
from runner import params as P
from runner.stage import execute

pytestmark = pytest.mark.e2e

TINY = ["tokenizer.vocab_size=400", "train.model.vocab_size=400", "train.model.num_layers=2",
        "train.model.model_dim=32", "train.model.num_heads=2", "train.model.num_kv_heads=1", "train.iterations=5",
        "train.train_batch_tokens=512", "train.train_seq_len=64", "train.grad_accum_steps=1", "train.warmup_steps=1",
        "gptq.calib_batches=1", "gptq.calib_seq_len=32", "gptq.passthrough_max_numel=512", "eval.seq_len=64"]


def test_exported_script_reproduces_the_pipeline(data_dirs, tmp_path):
    params = P.render("smoke", TINY)
    art = tmp_path / "artifacts"
    execute(train.SPEC, from_dict(train.Config, params["train"], "train"),
            {"shards": data_dirs["shards"], "tokenizer": data_dirs["tokenizer"]}, art / "train")
    execute(gptq.SPEC, from_dict(gptq.Config, params["gptq"], "gptq"),
            {"train": art / "train", "shards": data_dirs["shards"]}, art / "gptq")
    execute(pack.SPEC, from_dict(pack.Config, params["pack"], "pack"), {"gptq": art / "gptq"}, art / "pack", params=params)
    metrics = execute(eval_stage.SPEC, from_dict(eval_stage.Config, params["eval"], "eval"),
                      {"pack": art / "pack", "shards": data_dirs["shards"], "tokenizer": data_dirs["tokenizer"]},
                      art / "eval")

    records = tmp_path / "records" / "tiny"
    submission = export.export(records, params, "tiny run", "pgolf", "pgolf", art)
    assert sorted(p.name for p in records.iterdir()) == ["README.md", "eval_metrics.json", "requirements.txt",
                                                         "run_records.json", "size.json", "submission.json",
                                                         "train_gpt.py", "train_log.jsonl"]
    assert submission["val_bpb"] == metrics["val_bpb"]
    assert json.loads((records / "submission.json").read_text())["bytes_code"] < (records / "train_gpt.py").stat().st_size
    assert "torch==" in (records / "requirements.txt").read_text()

    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc_per_node={params['train']['nproc']}", "train_gpt.py",
                           "--shards", str(data_dirs["shards"]), "--tokenizer", str(data_dirs["tokenizer"])],
                          cwd=records, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    final = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("pgolf_final "))[12:])
    assert final["val_bpb"] == metrics["val_bpb"] and final["val_loss"] == metrics["val_loss"]
    assert final["model_bytes"] == json.loads((art / "pack/size.json").read_text())["model_bytes"]
    assert final["code_bytes"] == submission["bytes_code"]
    # the pipeline's own pack counted that same script: one count before and after the export
    pipeline = json.loads((art / "pack/size.json").read_text())
    assert (pipeline["code_bytes"], pipeline["total_bytes"]) == (final["code_bytes"], final["artifact_bytes"])
    readme = (records / "README.md").read_text()
    assert "the challenge's baseline architecture" not in readme and "- none switched on: the baseline GPT" in readme
    assert "(2 layers x 32, vocab 400)" in readme and "SHARDS: the run's shard folder, the pipeline's `artifacts/shards`" in readme
    assert "built from corpus `builtin`" in readme and "TOKENIZER: the run's tokenizer folder" in readme


def test_the_exported_script_serves_the_fused_kernels_from_its_own_source(tmp_path):
    """Triton compiles a kernel from its source text (inspect.getsource), so the bundle must hand
    out the source of the modules it embeds; the kernels must come from the bundle, not the repo."""
    script = tmp_path / "train_gpt.py"
    script.write_text(pack.submission_script(P.render("smoke", [])), encoding="utf-8")
    probe = (
        "import runpy, torch, torch.nn.functional as F\n"
        f"runpy.run_path({str(script)!r}, run_name='bundle')\n"
        "from pgolf.kernels import fused_mlp\n"
        "assert fused_mlp.__file__.startswith('<bundled>/'), fused_mlp.__file__\n"
        "import inspect\n"
        "assert 'def _matmul_activation_kernel(' in inspect.getsource(fused_mlp._matmul_activation_kernel.fn)\n"
        "torch.manual_seed(0)\n"
        "x, w1, w2 = torch.randn(5, 8), torch.randn(16, 8) / 3, torch.randn(8, 16) / 4\n"
        "torch.testing.assert_close(fused_mlp.fused_mlp(x, w1, w2, 0.5), F.linear(F.leaky_relu(F.linear(x, w1), 0.5).square(), w2),\n"
        "                           rtol=1e-5, atol=1e-5)\n"
        "print('bundled kernels ok')\n")
    proc = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "TRITON_INTERPRET": "1"})
    assert proc.returncode == 0 and "bundled kernels ok" in proc.stdout, proc.stderr[-3000:]


def test_each_stage_of_the_script_runs_with_the_pipelines_threads(monkeypatch):
    """torchrun sets OMP_NUM_THREADS=1 in every process; the script's stages take the thread count the
    pipeline gives them instead (its eval and GPTQ round otherwise differently on CPU)."""
    import torch

    from pgolf import dist
    from runner import submission

    monkeypatch.setattr("os.cpu_count", lambda: 6)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with submission.pipeline_threads(1):
            assert torch.get_num_threads() == dist.threads_per_process(1) == 6
        with submission.pipeline_threads(2):
            assert torch.get_num_threads() == dist.threads_per_process(2) == 3
        with submission.spread_or_solo(1):
            assert torch.get_num_threads() == 6 and dist.world_size() == 1
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


PR2135_TINY = ["tokenizer.vocab_size=400", "train.model.vocab_size=400", "train.model.model_dim=32",
               "train.model.num_heads=2", "train.model.num_kv_heads=1", "train.model.doc_attention_max_len=64",
               "train.nproc=1", "train.device=cpu", "train.compile=false", "train.iterations=4",
               "train.train_batch_tokens=512", "train.train_seq_len=64", "train.grad_accum_steps=1",
               "train.warmup_steps=1", "train.max_wallclock_seconds=0", "train.gptq_reserve_seconds=0",
               "gptq.nproc=1", "gptq.device=cpu", "gptq.calib_batches=2", "gptq.calib_seq_len=32",
               "gptq.calib_batch_seqs=2", "gptq.passthrough_max_numel=512", "eval.nproc=1", "eval.device=cpu",
               "eval.compile=false", "eval.seq_len=64", "eval.lora.context=64", "eval.lora.chunk=16",
               "eval.lora.batch_docs=8", "eval.lora.prefix_docs=8", "eval.lora.global_chunk_tokens=256",
               "eval.lora.global_seq_len=64", "eval.lora.global_batch_seqs=2",
               # the fixture's random words repeat short contexts only: a 3-gram tilt hints there
               "eval.tilt.order=3", "eval.tilt.threshold=0.3"]


def test_exported_pr2135_script_bundles_its_techniques_and_reproduces_the_pipeline(data_dirs, tmp_path):
    """The pr2135 preset (AsymLogit, LoRA TTT without K and one phase, the n-gram tilt) at tiny sizes:
    its records folder's train_gpt.py carries the new modules and, run alone, prints the pipeline's
    numbers."""
    from runner.submission import pipeline_threads

    params = P.render("pr2135", PR2135_TINY)
    art = tmp_path / "artifacts"
    # the threads the script gives its stages (tests run at one): TTT's training rounds with the count
    with pipeline_threads(1):
        execute(train.SPEC, from_dict(train.Config, params["train"], "train"),
                {"shards": data_dirs["shards"], "tokenizer": data_dirs["tokenizer"]}, art / "train")
        execute(gptq.SPEC, from_dict(gptq.Config, params["gptq"], "gptq"),
                {"train": art / "train", "shards": data_dirs["shards"]}, art / "gptq")
        execute(pack.SPEC, from_dict(pack.Config, params["pack"], "pack"), {"gptq": art / "gptq"}, art / "pack",
                params=params)
        metrics = execute(eval_stage.SPEC, from_dict(eval_stage.Config, params["eval"], "eval"),
                          {"pack": art / "pack", "shards": data_dirs["shards"], "tokenizer": data_dirs["tokenizer"]},
                          art / "eval")
    assert metrics["mode"] == "ttt_lora" and metrics["tilt"]["passed"] and len(metrics["audit"]["phases"]) == 1

    records = tmp_path / "records" / "pr2135"
    export.export(records, params, "pr2135 tiny", "pgolf", "pgolf", art)
    script = (records / "train_gpt.py").read_text()
    assert '"pgolf.evaluate.ngram_tilt"' in script and '"pgolf.model.asym_softcap"' in script
    readme = (records / "README.md").read_text()
    assert "AsymLogit" in readme and "n-gram tilt" in readme and "without K" in readme
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                           "train_gpt.py", "--shards", str(data_dirs["shards"]), "--tokenizer", str(data_dirs["tokenizer"])],
                          cwd=records, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    final = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("pgolf_final "))[12:])
    assert final["val_bpb"] == metrics["val_bpb"] and final["val_loss"] == metrics["val_loss"]
    run_metrics = json.loads((records / "run/eval/metrics.json").read_text())
    assert run_metrics["tilt"] == json.loads((art / "eval/metrics.json").read_text())["tilt"]
