"""The baseline preset's train stage against the challenge's baseline script, step by step, on any
device: same shards, same seed, same batches, the script's own model, Muon, loader and schedule.

    python bench/reference_parity.py --reference bench/reference/train_gpt.py           # CPU, a 4x128 model, 40 steps
    python bench/reference_parity.py --reference bench/reference/train_gpt.py --device cuda --full --steps 200

The script's main() needs CUDA and runs its loop with no hooks, so its loop is driven here from
its own parts, in its order: GPT built and cast as main() casts it (bf16, then CastedLinear and
low-dim parameters back to fp32), its Adam / Muon / Adam split, warm-up steps then weights,
optimizer state and loader reset, its lr_mul (iteration warmdown) and momentum warm-up, grad
accumulation over 8 micro-steps with loss * 1/8. pgolf's side is its train stage's Trainer
itself. Both start from the same initial weights (same seed: the two GPTs draw identically,
checked first). On CPU pgolf trains its embedding in fp32 with no autocast, so the script's model
is made fp32 there too; on CUDA both use a bf16 embedding under bf16 autocast.

Reported: the loss at every step of both, the largest and the final difference (the issue asks
for the final one within 0.02 after 200 steps), and the ms/step of each (a GPU figure only).
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pgolf.model.config import ModelConfig  # noqa: E402
from pgolf.train import loop as training_loop  # noqa: E402
from tasks import train as train_stage  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from train_throughput import corpus_shards  # noqa: E402


def load_reference(script: Path):
    spec = importlib.util.spec_from_file_location("baseline_train_gpt", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # its main() runs only as __main__
    return module


def reference_losses(ref, cfg: train_stage.Config, shards: Path, device: torch.device) -> tuple[list[float], float]:
    m = cfg.model
    torch.manual_seed(cfg.seed)
    net = ref.GPT(vocab_size=m.vocab_size, num_layers=m.num_layers, model_dim=m.model_dim, num_heads=m.num_heads,
                  num_kv_heads=m.num_kv_heads, mlp_mult=int(m.mlp_mult), tie_embeddings=m.tie_embeddings,
                  tied_embed_init_std=m.tied_embed_init_std, logit_softcap=m.logit_softcap, rope_base=m.rope_base,
                  qk_gain_init=m.qk_gain_init).to(device).bfloat16()
    for module in net.modules():
        if isinstance(module, ref.CastedLinear):
            module.float()
    ref.restore_low_dim_params_to_fp32(net)
    if device.type != "cuda":
        net.float()
    model = torch.compile(net, dynamic=False, fullgraph=True) if device.type == "cuda" and cfg.compile else net
    blocks = list(net.blocks.named_parameters())
    matrix = [p for n, p in blocks if p.ndim == 2 and not any(c in n for c in ref.CONTROL_TENSOR_NAME_PATTERNS)]
    scalars = [p for n, p in blocks if p.ndim < 2 or any(c in n for c in ref.CONTROL_TENSOR_NAME_PATTERNS)]
    if net.skip_weights.numel() > 0:
        scalars.append(net.skip_weights)
    fused = device.type == "cuda"
    adam = dict(betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps, fused=fused)
    opt_tok = torch.optim.Adam([{"params": [net.tok_emb.weight], "lr": cfg.tied_embed_lr, "base_lr": cfg.tied_embed_lr}],
                               **adam)
    opt_muon = ref.Muon(matrix, lr=cfg.matrix_lr, momentum=cfg.muon_momentum, backend_steps=cfg.muon_backend_steps)
    for group in opt_muon.param_groups:
        group["base_lr"] = cfg.matrix_lr
    opt_scalar = torch.optim.Adam([{"params": scalars, "lr": cfg.scalar_lr, "base_lr": cfg.scalar_lr}], **adam)
    optimizers = [opt_tok, opt_muon, opt_scalar]
    accum = cfg.resolved_grad_accum()
    pattern = str(shards / "fineweb_train_*.bin")

    def step_once(loader, step: int, scale: float) -> float:
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        total = torch.zeros((), device=device)
        for _ in range(accum):
            x, y = loader.next_batch(cfg.train_batch_tokens, cfg.train_seq_len, accum)
            with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss = model(x, y)
            total += loss.detach()
            (loss * (1.0 / accum)).backward()
        frac = min(step / cfg.muon_momentum_warmup_steps, 1.0) if cfg.muon_momentum_warmup_steps > 0 else 1.0
        for group in opt_muon.param_groups:
            group["momentum"] = (1 - frac) * cfg.muon_momentum_warmup_start + frac * cfg.muon_momentum
        for opt in optimizers:
            for group in opt.param_groups:
                group["lr"] = group["base_lr"] * scale
        if cfg.grad_clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip_norm)
        for opt in optimizers:
            opt.step()
        return float(total / accum)

    def lr_mul(step: int) -> float:  # the script's schedule without a wallclock cap
        start = max(cfg.iterations - cfg.warmdown_iters, 0)
        if cfg.warmdown_iters <= 0 or not start <= step < cfg.iterations:
            return 1.0
        return max((cfg.iterations - step) / max(cfg.warmdown_iters, 1), 0.0)

    if cfg.warmup_steps > 0:
        initial = {k: v.detach().clone() for k, v in net.state_dict().items()}
        states = [copy.deepcopy(opt.state_dict()) for opt in optimizers]
        loader = ref.DistributedTokenLoader(pattern, 0, 1, device)
        for _ in range(cfg.warmup_steps):
            step_once(loader, 0, 1.0)  # the script's warm-up steps run at the base lr and momentum
        net.load_state_dict(initial, strict=True)
        for opt, state in zip(optimizers, states):
            opt.load_state_dict(state)
    loader = ref.DistributedTokenLoader(pattern, 0, 1, device)
    losses = []
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for step in range(cfg.iterations):
        losses.append(step_once(loader, step, lr_mul(step)))
    sync()
    return losses, (time.perf_counter() - t0) * 1000 / cfg.iterations


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", type=Path, default=ROOT / "bench/reference/train_gpt.py")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--full", action="store_true", help="the baseline's 9x512 model and 524,288-token steps")
    parser.add_argument("--corpus", default="builtin", help="corpus.source for the shards (default: builtin)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if not args.reference.is_file():
        parser.error(f"{args.reference}: the challenge's train_gpt.py is not there (bench/reference/ is git-ignored)")
    ref = load_reference(args.reference)
    device = torch.device(args.device)

    cfg = train_stage.Config()  # the stage defaults are the baseline
    model = cfg.model if args.full else ModelConfig(num_layers=4, model_dim=128, num_heads=4, num_kv_heads=2)
    cfg = train_stage.Config(model=model, device=args.device, nproc=1, iterations=args.steps, log_every=1,
                             max_wallclock_seconds=0, warmup_steps=2 if not args.full else cfg.warmup_steps,
                             warmdown_iters=max(args.steps // 4, 1) if not args.full else cfg.warmdown_iters,
                             train_batch_tokens=cfg.train_batch_tokens if args.full else 8 * 2048,
                             grad_accum_steps=8, compile=device.type == "cuda", resume_every=0)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        shards, _ = corpus_shards(args.corpus, model.vocab_size, tmp / "data")
        out = tmp / "train"
        out.mkdir()
        trainer = training_loop.Trainer(cfg, shards, out)
        init_ours = {k: v.detach().float().cpu().clone() for k, v in trainer.model.state_dict().items()}
        torch.manual_seed(cfg.seed)
        init_theirs = ref.GPT(vocab_size=model.vocab_size, num_layers=model.num_layers, model_dim=model.model_dim,
                              num_heads=model.num_heads, num_kv_heads=model.num_kv_heads, mlp_mult=int(model.mlp_mult),
                              tie_embeddings=model.tie_embeddings, tied_embed_init_std=model.tied_embed_init_std,
                              logit_softcap=model.logit_softcap, rope_base=model.rope_base,
                              qk_gain_init=model.qk_gain_init).state_dict()
        differing_init = sorted(k for k in init_theirs if not torch.equal(init_theirs[k].float(), init_ours.get(k)))
        metrics = trainer.train()
        ours = [json.loads(line)["train_loss"] for line in (out / "train_log.jsonl").read_text().splitlines()]
        theirs, their_ms = reference_losses(ref, cfg, shards, device)

    deltas = [a - b for a, b in zip(ours, theirs)]
    report = {"device": args.device, "steps": args.steps, "model": "baseline 9x512" if args.full else "4x128",
              "init_identical": not differing_init, "init_differs": differing_init,
              "final_loss_pgolf": ours[-1], "final_loss_script": theirs[-1], "final_delta": deltas[-1],
              "max_abs_delta": max(abs(d) for d in deltas), "within_0.02": abs(deltas[-1]) <= 0.02,
              "ms_per_step_pgolf": metrics["ms_per_step"], "ms_per_step_script": round(their_ms, 3),
              "losses_pgolf": ours, "losses_script": [round(v, 6) for v in theirs]}
    print(json.dumps({k: v for k, v in report.items() if not k.startswith("losses")}, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
