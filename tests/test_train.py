"""The train stage on CPU: in-process, two gloo ranks, two nodes; outputs, vocab check, rank invariance."""
from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest
import torch

from pgolf.errors import FormatError
from pgolf.model.config import ModelConfig
from pgolf.model.io import load_model
from pgolf.typed_params import from_dict
from pgolf.errors import ConfigError, TrainingError
from pgolf.train import loop as training_loop
from flows import export
from runner import params as P
from tasks import train as train_stage
from runner.stage import execute
from tests.conftest import TINY_MODEL, stage_env, write_params


def config(**kw) -> train_stage.Config:
    base = dict(model=ModelConfig(**TINY_MODEL), nproc=2, device="cpu", iterations=12, train_batch_tokens=512,
                train_seq_len=64, grad_accum_steps=1, max_wallclock_seconds=0, warmup_steps=2, warmdown_iters=4,
                compile=False, log_every=1, matrix_lr=0.02, scalar_lr=0.02, tied_embed_lr=0.03)
    return train_stage.Config(**{**base, **kw})


def losses(out) -> list[float]:
    return [json.loads(line)["train_loss"] for line in (out / "train_log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def two_rank_run(data_dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "train"
    metrics = execute(train_stage.SPEC, config(), {"shards": data_dirs["shards"]}, out)
    return out, metrics


def test_two_gloo_ranks_train_and_write_everything(two_rank_run):
    out, metrics = two_rank_run
    assert metrics["steps"] == 12 and metrics["world_size"] == 2 and metrics["tokens_per_s"] > 0
    for name in ("model.safetensors", "config.json", "train_log.jsonl", "metrics.json"):
        assert (out / name).is_file(), name
    assert (out / "dvclive").is_dir()
    curve = losses(out)
    assert len(curve) == 12 and curve[-1] < curve[0] - 0.3
    model, cfg = load_model(out)
    assert cfg == ModelConfig(**TINY_MODEL)
    resolved = json.loads((out / "config.json").read_text())
    assert resolved["train"]["nproc"] == 2 and "code_version" not in resolved  # the commit: the run record's
    assert "tokens_per_s" not in json.loads((out / "metrics.json").read_text())
    assert all("elapsed_ms" not in json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines())


def test_one_process_matches_two_on_the_same_global_batch(two_rank_run, data_dirs, tmp_path):
    out = tmp_path / "train1"
    execute(train_stage.SPEC, config(nproc=1, grad_accum_steps=2, iterations=12), {"shards": data_dirs["shards"]}, out)
    assert losses(out) == pytest.approx(losses(two_rank_run[0]), abs=2e-4)


def test_sharded_muon_on_two_ranks_matches_one_process(two_rank_run, data_dirs, tmp_path):
    out = tmp_path / "sharded"
    execute(train_stage.SPEC, config(muon_sharded=True, muon_row_normalize=True, muon_wd=0.05,
                                     muon_coefficients="polar_express"), {"shards": data_dirs["shards"]}, out)
    single = tmp_path / "single"
    execute(train_stage.SPEC, config(nproc=1, grad_accum_steps=2, muon_row_normalize=True, muon_wd=0.05,
                                     muon_coefficients="polar_express"), {"shards": data_dirs["shards"]}, single)
    assert losses(out) == pytest.approx(losses(single), abs=2e-4)


def test_vocab_mismatch_with_the_shards_is_clear(data_dirs, tmp_path):
    cfg = config(model=ModelConfig(**{**TINY_MODEL, "vocab_size": 512}))
    with pytest.raises(FormatError, match="400-piece") as err:
        execute(train_stage.SPEC, cfg, {"shards": data_dirs["shards"]}, tmp_path / "t")
    assert "manifest.json" in str(err.value)
    assert not (tmp_path / "t").exists()


def test_batch_geometry_is_validated():
    with pytest.raises(ConfigError, match="multiple"):
        from_dict(train_stage.Config, {"train_batch_tokens": 1000, "train_seq_len": 64, "nproc": 2}, "params.yaml: train")


def test_resume_after_a_kill_continues_with_identical_state(data_dirs, tmp_path, monkeypatch):
    """A run killed after its step-6 checkpoint, rerun, ends with exactly the weights, log and
    switches (looping on at 50%, late QAT) of a run that was never interrupted."""
    monkeypatch.chdir(tmp_path)
    model = ModelConfig(**TINY_MODEL, num_loops=1, loop_start=0, loop_end=0, enable_looping_at=0.5)
    common = dict(model=model, nproc=1, grad_accum_steps=2, iterations=8, warmup_steps=0, ema_decay=0.9,
                  swa_every=2, swa_start_lr_scale=0.9, swa_apply=True,
                  late_qat_threshold=0.6)
    shards = data_dirs["shards"]

    reference = training_loop.Trainer(config(**common), shards, tmp_path)
    (tmp_path / "ref").mkdir()
    reference.out = tmp_path / "ref"
    ref_metrics = reference.train()

    cfg = config(**common, resume_every=3)
    (tmp_path / "killed").mkdir()
    killed = training_loop.Trainer(cfg, shards, tmp_path / "killed")
    assert killed.train(stop_after=7) is None
    folder = killed.resume_folder()
    assert (folder / "latest.json").is_file()

    (tmp_path / "resumed").mkdir()
    resumed = training_loop.Trainer(cfg, shards, tmp_path / "resumed")
    metrics = resumed.train()
    timings = resumed.timings  # what train_in_process hands the run record
    assert timings["resumed_from_step"] == 6 and metrics["steps"] == 8
    assert metrics["looping_enabled_at_step"] == ref_metrics["looping_enabled_at_step"] == 4
    for (name, a), (_, b) in zip(reference.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), name
    assert losses(tmp_path / "resumed") == losses(tmp_path / "ref")
    assert not folder.exists(), "a finished run removes its checkpoints"


# The presets that switch a technique on (the baseline and smoke switch none).
TECHNIQUE_PRESETS = [p for p in P.list_presets() if export.techniques(P.render(p)["train"]["model"])]


@pytest.mark.parametrize("preset", TECHNIQUE_PRESETS)
def test_each_preset_trains_at_tiny_width(preset, data_dirs, tmp_path):
    """Every technique switch of a preset, through the real train stage, at a CPU-sized width."""
    section = P.render(preset, [f"train.model.{k}={v}" for k, v in
                                dict(vocab_size=400, model_dim=32, num_heads=2, num_kv_heads=1).items()]
                       + ["tokenizer.vocab_size=400"])["train"]
    section.update(nproc=1, device="cpu", iterations=6, train_batch_tokens=512, train_seq_len=64, grad_accum_steps=1,
                   max_wallclock_seconds=0, gptq_reserve_seconds=0, warmup_steps=1, compile=False, log_every=1)
    cfg = from_dict(train_stage.Config, section, preset)
    metrics = execute(train_stage.SPEC, cfg, {"shards": data_dirs["shards"]}, tmp_path / "train")
    curve = losses(tmp_path / "train")
    assert metrics["steps"] == 6 and all(map(lambda v: v == v, curve)) and curve[-1] < curve[0]
    if cfg.model.num_loops:
        assert metrics["looping_enabled_at_step"] == 3  # enable_looping_at 0.35 of 6 steps
    load_model(tmp_path / "train")


def test_import_a_state_dict_trained_elsewhere(data_dirs, tmp_path):
    """The challenge baseline's final_model.pt is a torch.compile'd module's state dict."""
    from pgolf.model.gpt import GPT

    torch.manual_seed(3)
    source = GPT(ModelConfig(**TINY_MODEL))
    torch.save({f"_orig_mod.{k}": v.bfloat16() for k, v in source.state_dict().items()}, tmp_path / "final_model.pt")
    cfg = config(import_from=str(tmp_path / "final_model.pt"))
    metrics = execute(train_stage.SPEC, cfg, {"shards": data_dirs["shards"]}, tmp_path / "train")
    assert metrics["steps"] == 0
    model, _ = load_model(tmp_path / "train")
    for name, tensor in source.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor.bfloat16().float()), name
    bad = {k: v for k, v in source.state_dict().items() if k != "skip_weights"}
    bad["blocks.0.attn.c_z.weight"] = torch.zeros(2, 2)
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(FormatError, match="missing \\['skip_weights'\\], unexpected \\['blocks.0.attn.c_z.weight'\\]"):
        execute(train_stage.SPEC, config(import_from=str(tmp_path / "bad.pt")), {"shards": data_dirs["shards"]},
                tmp_path / "t2")


def test_wallclock_cap_stops_every_rank_on_the_same_step(data_dirs, tmp_path):
    """The cap vote is read one step late on a process group (no step waits on it): with a cap
    that every clock has passed after the first step, two ranks stop after step 2, together;
    one process, which has no vote to wait for, stops after step 1."""
    cap = dict(max_wallclock_seconds=1e-6, warmdown_iters=0, log_every=100)
    two = execute(train_stage.SPEC, config(**cap), {"shards": data_dirs["shards"]}, tmp_path / "two")
    assert two["steps"] == 2 and two["world_size"] == 2
    one = execute(train_stage.SPEC, config(nproc=1, grad_accum_steps=2, **cap), {"shards": data_dirs["shards"]},
                  tmp_path / "one")
    assert one["steps"] == 1
    assert [json.loads(line)["step"] for line in (tmp_path / "two" / "train_log.jsonl").read_text().splitlines()] == [1]


def test_the_loss_reaches_the_host_only_at_log_steps(data_dirs, tmp_path, monkeypatch):
    """Reading the loss is a device sync; between log steps the host only queues work."""
    reads = []
    real = training_loop.Trainer.host_loss
    monkeypatch.setattr(training_loop.Trainer, "host_loss", lambda self, t: reads.append(1) or real(self, t))
    trainer = training_loop.Trainer(config(nproc=1, grad_accum_steps=2, iterations=12, log_every=5, warmup_steps=0),
                                  data_dirs["shards"], tmp_path)
    metrics = trainer.train()
    assert [r["step"] for r in map(json.loads, (tmp_path / "train_log.jsonl").read_text().splitlines())] == [1, 5, 10, 12]
    assert len(reads) == 5  # steps 1, 5, 10, 12 and the final metrics
    assert metrics["final_train_loss"] == json.loads((tmp_path / "train_log.jsonl").read_text().splitlines()[-1])["train_loss"]


def test_a_non_finite_loss_between_log_steps_still_stops_the_run(data_dirs, tmp_path, monkeypatch):
    trainer = training_loop.Trainer(config(nproc=1, grad_accum_steps=2, iterations=12, log_every=10, warmup_steps=0),
                                  data_dirs["shards"], tmp_path)
    real_step = trainer.step
    monkeypatch.setattr(trainer, "step", lambda step, lr: real_step(step, lr) * (float("nan") if step == 3 else 1.0))
    with pytest.raises(TrainingError, match="non-finite at or before step 10"):
        trainer.train()


def test_a_healthy_run_passes_the_learning_check(data_dirs, tmp_path):
    trainer = training_loop.Trainer(config(nproc=1, grad_accum_steps=2, iterations=8, warmup_steps=0, learn_check_step=8),
                                  data_dirs["shards"], tmp_path)
    assert trainer.train()["final_train_loss"] < 5.9915 - 0.05
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_on_localhost_train_what_one_node_trains(two_rank_run, data_dirs, tmp_path):
    """Two "nodes" of one rank each (c10d on 127.0.0.1, gloo) against one node of two ranks: the
    same world, so the same losses and the same weights, byte for byte; node 1 writes nothing."""
    one = two_rank_run[0]
    params = write_params(tmp_path / "params.yaml", train=config(nproc=1, nnodes=2))
    endpoint = f"127.0.0.1:{free_port()}"
    common = ["--params", str(params), "--shards", str(data_dirs["shards"])]
    node1 = subprocess.Popen([sys.executable, "-m", "runner.ranks", "train", *common], cwd=tmp_path,
                             env=stage_env(PGOLF_NODE_RANK="1", PGOLF_RDZV_ENDPOINT=endpoint),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    node0 = subprocess.run([sys.executable, "-m", "tasks.train", *common, "--out", str(tmp_path / "two")], cwd=tmp_path,
                           env=stage_env(PGOLF_NODE_RANK="0", PGOLF_RDZV_ENDPOINT=endpoint),
                           capture_output=True, text=True, timeout=300)
    node1_output, _ = node1.communicate(timeout=120)
    assert node0.returncode == 0, node0.stderr
    assert node1.returncode == 0, node1_output
    assert json.loads((tmp_path / "two" / "metrics.json").read_text())["world_size"] == 2
    assert losses(tmp_path / "two") == losses(one)
    assert (tmp_path / "two" / "model.safetensors").read_bytes() == (one / "model.safetensors").read_bytes()
    assert not (tmp_path / "artifacts" / "train").exists()


def test_val_every_logs_val_bpb_as_the_eval_stage_scores_it(data_dirs, tmp_path):
    from pgolf.data.shards import load_split
    from pgolf.evaluate.bpb import bytes_per_position, evaluate_bpb, truncate_val
    from pgolf.tokenize.token_bytes import build_byte_luts, load_tokenizer

    inputs = {"shards": data_dirs["shards"], "tokenizer": data_dirs["tokenizer"]}
    common = dict(nproc=1, grad_accum_steps=2, iterations=12, warmup_steps=0)
    out = tmp_path / "val"
    execute(train_stage.SPEC, config(**common, val_every=5, val_tokens=1024), inputs, out)
    log = json.loads((out / training_loop.VAL_LOG_NAME).read_text())
    assert [r["step"] for r in log] == [5, 10, 12]
    assert log[0]["tokens"] == 1024 and log[-1]["val_bpb"] < log[0]["val_bpb"]
    # The last entry is the saved model scored the eval stage's way (flat windows, its byte counts).
    model, cfg = load_model(out)
    tokens = truncate_val(load_split(data_dirs["shards"], "val", cfg.vocab_size)[:1025], 64)
    counts = bytes_per_position(tokens, build_byte_luts(load_tokenizer(data_dirs["tokenizer"])[0], cfg.vocab_size), None)
    result = evaluate_bpb(model, tokens, counts, 64, 0, 4, torch.device("cpu"))
    assert log[-1] == {"step": 12, "val_loss": round(result.val_loss, 6), "val_bpb": round(result.val_bpb, 6),
                       "tokens": 1024, "bytes": result.bytes}
    # Scoring leaves training as it was.
    plain = tmp_path / "plain"
    execute(train_stage.SPEC, config(**common), inputs, plain)
    assert losses(out) == losses(plain)
    assert not (plain / training_loop.VAL_LOG_NAME).exists()


def test_val_every_needs_the_tokenizer_and_ranges_are_checked(data_dirs, tmp_path):
    with pytest.raises(FormatError, match="needs the tokenizer"):
        training_loop.Trainer(config(nproc=1, grad_accum_steps=2, val_every=5), data_dirs["shards"], tmp_path)
    for field in ("val_every", "val_tokens"):
        with pytest.raises(ConfigError, match=field):
            from_dict(train_stage.Config, {field: -1}, "params.yaml: train")


def test_the_compiled_record_train_step_has_no_graph_break(data_dirs, tmp_path):
    """Issue 25: the Trainer's step of a tiny record model (varlen document attention on flat
    batches, looping, lanes, XSA, gates, sharded bf16 Muon, EMA) with its model compiled as the
    Trainer compiles it on CUDA (compile_for_training: fullgraph, so a graph break raises; dynamo's
    trace is the same with the aot_eager backend, which runs on CPU). Batches hold different
    document counts (cu_seqlens of 64 and 128 entries) and the loop switches on midway: dynamo
    compiles once per looping state and never again."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    section = P.render("record", [f"train.model.{k}={v}" for k, v in
                                  dict(vocab_size=400, model_dim=32, num_heads=4, num_kv_heads=2, num_layers=4, rope_dims=4,
                                       loop_start=1, loop_end=2, parallel_start_layer=2, xsa_last_n=4,
                                       doc_attention_max_len=8).items()] + ["tokenizer.vocab_size=400"])["train"]
    assert section["model"]["doc_attention_kernel"] == "varlen" and section["flat_batches"]
    section.update(nproc=1, device="cpu", iterations=6, train_batch_tokens=496, train_seq_len=8, grad_accum_steps=1,
                   max_wallclock_seconds=0, gptq_reserve_seconds=0, warmup_steps=0, compile=False, log_every=1)
    trainer = training_loop.Trainer(from_dict(train_stage.Config, section, "record"), data_dirs["shards"], tmp_path)
    trainer.train_model = training_loop.compile_for_training(trainer.model, backend="aot_eager")
    torch._dynamo.reset()
    counters.clear()
    next_batch, lengths = trainer.loader.next_batch, set()
    trainer.loader.next_batch = lambda *a: (lambda b: lengths.add(len(b[2])) or b)(next_batch(*a))
    trainer.model.set_looping(False)
    for step in range(6):
        if step == 3:
            trainer.model.set_looping(True)
        loss = trainer.step(step, 1.0)
        assert torch.isfinite(loss)
    assert lengths == {64, 128}, "the batches should need both cu_seqlens buckets"
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])


def test_the_library_trains_from_its_own_config_without_the_stages(data_dirs, tmp_path):
    """pgolf/ owns the trainer's config: a user of the library (a notebook, another pipeline) builds
    a TrainConfig and trains, and no tasks/ module is loaded."""
    code = ("import json, sys\n"
            "from pathlib import Path\n"
            "from pgolf.model.config import ModelConfig\n"
            "from pgolf.train.config import TrainConfig\n"
            "from pgolf.train.loop import Trainer\n"
            f"cfg = TrainConfig(model=ModelConfig(**{TINY_MODEL!r}), device='cpu', iterations=4, train_batch_tokens=512,\n"
            "                  train_seq_len=64, grad_accum_steps=1, max_wallclock_seconds=0, warmup_steps=0,\n"
            "                  compile=False, log_every=1, learn_check_step=0)\n"
            "cfg.validate()\n"
            f"metrics = Trainer(cfg, Path({str(data_dirs['shards'])!r}), Path({str(tmp_path)!r})).train()\n"
            "print(json.dumps({'steps': metrics['steps'], 'stages': sorted(m for m in sys.modules if m.split('.')[0] in ('runner', 'tasks', 'flows'))}))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=stage_env(), timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {"steps": 4, "stages": []}, result
