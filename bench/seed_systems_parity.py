"""The seed-system presets (presets/pr1693, pr1790, pr1383, pr2116) against each PR's own public
train_gpt.py (docs/lineage.md defines the PR codes), piece by piece, on CPU at small dims: the
counterpart of bench/record_parity.py for the seed systems besides the #1 record.

    python bench/seed_systems_parity.py                 # PRs' files in bench/reference/pr<N>/ (git-ignored)
    python bench/seed_systems_parity.py --rows gates,inhibitor --json out.json

bench/reference/pr<N>/ holds each PR's record folder as `git show refs/pull/<N>/head:<folder>/<file>`
writes it (openai/parameter-golf; the scripts are plain Python, none is an encoded wrapper):
train_gpt.py, README.md and one training log (pr2116: train_log.txt). The scripts import
FlashAttention (flash_attn_interface, or flash_attn in PR #1383) and PR #2116 also triton: this bench
puts CPU stand-ins in sys.modules first (bench/parity_common.py's causal SDPA; a triton whose @jit
leaves the kernel uncalled) and calls the PRs' functions and modules as written.

Rows:
  settings    every preset value a PR's run fixes, read from its training log's hyperparameter dump,
              else from its script's default (PR #1383 has no log: its script's defaults)
  gates       attention output gate: PR #1693's _apply_attn_out_gate_inline (pre-norm source, width 12)
              and PR #1790's CausalSelfAttention with its width-24 attn_gate_proj vs pgolf's
              AttnOutputGate built from the preset, same weights and inputs
  inhibitor   PR #2116's InhibitorGate vs pgolf's (weights copied), forward and init
  film        PR #1383's GPT._apply_film vs pgolf's FiLM, and the depths each modulates
  film_ttt    which parameters PR #1383's TTT trains vs the preset's `sgd.trainable: film`
  casefold    casefold v4 (PR #1693): only its use is public, not its text transform
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import re
import sys
import time
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from pgolf.model.film import FiLM  # noqa: E402
from pgolf.model.gates import AttnOutputGate  # noqa: E402
from pgolf.model.inhibitor import InhibitorGate  # noqa: E402
from runner import params as presets  # noqa: E402
from parity_common import dig, install_flash_attention, logged_hyperparameters  # noqa: E402

ROWS = ("settings", "gates", "inhibitor", "film", "film_ttt", "casefold")
SCRIPTS = {"1693": "pr1693", "1790": "pr1790", "1383": "pr1383", "2116": "pr2116"}


# --- the PRs' scripts with CPU stand-ins -----------------------------------------------------------

class _Anything(types.ModuleType):
    """triton and triton.language: names used at definition time (tl.constexpr annotations,
    @triton.jit, @triton.autotune(...)) resolve to a no-op; the kernels are never launched on CPU."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _identity_decorator


def _identity_decorator(*args, **kwargs):
    if len(args) == 1 and callable(args[0]) and not kwargs:
        return args[0]
    return _identity_decorator


def load_script(path: Path, name: str):
    install_flash_attention("flash_attn_interface", "flash_attn")
    try:
        importlib.import_module("triton")
    except ImportError:
        for mod in ("triton", "triton.language", "triton.tools", "triton.tools.tensor_descriptor"):
            sys.modules[mod] = _Anything(mod)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # main() runs only as __main__
    return module


def max_diff(a: torch.Tensor, b: torch.Tensor) -> str:
    abs_diff = (a.double() - b.double()).abs().max().item()
    rel = abs_diff / max(b.double().abs().max().item(), 1e-30)
    return f"max abs {abs_diff:.2e}, rel {rel:.2e}"


def preset(name: str) -> dict:
    return presets.load_preset(name)


# --- settings --------------------------------------------------------------------------------------

def script_default(script: Path, env: str) -> str:
    m = re.search(rf'os\.environ\.get\("{env}",\s*"?([^")]+)"?\)', script.read_text())
    return m.group(1) if m else "absent"


# (PR, log key or None, script env var, preset path); the log wins where it records the value
SETTINGS = [
    ("1693", "ttt_lora_rank", "TTT_LORA_RANK", "eval.lora.rank"),
    ("1693", None, None, "eval.lora.alpha"),  # no alpha in PR #1693: the LoRA output is unscaled
    ("1693", "ttt_weight_decay", "TTT_WEIGHT_DECAY", "eval.lora.weight_decay"),
    ("1693", "ttt_beta2", "TTT_BETA2", "eval.lora.beta2"),
    ("1693", "phased_ttt_num_phases", "PHASED_TTT_NUM_PHASES", "eval.lora.phases"),
    ("1693", "phased_ttt_prefix_docs", "PHASED_TTT_PREFIX_DOCS", "eval.lora.prefix_docs"),
    ("1693", "qk_gain_init", "QK_GAIN_INIT", "train.model.qk_gain_init"),
    ("1693", "mlp_clip_sigmas", "MLP_CLIP_SIGMAS", "gptq.mlp_clip_sigmas"),
    ("1693", "attn_clip_sigmas", "ATTN_CLIP_SIGMAS", "gptq.attn_clip_sigmas"),
    ("1693", "embed_clip_sigmas", "EMBED_CLIP_SIGMAS", "gptq.embed_clip_sigmas"),
    ("1693", "embed_bits", "EMBED_BITS", "gptq.embed_bits"),
    ("1693", "warmdown_frac", "WARMDOWN_FRAC", "train.warmdown_frac"),
    ("1693", "gptq_reserve_seconds", "GPTQ_RESERVE_SECONDS", "train.gptq_reserve_seconds"),
    ("1790", "ttt_lora_rank", "TTT_LORA_RANK", "eval.lora.rank"),
    ("1790", "ttt_lora_alpha", "TTT_LORA_ALPHA", "eval.lora.alpha"),
    ("1790", "ttt_warm_start_a", "TTT_WARM_START_A", "eval.lora.warm_start_a"),
    ("1790", "ttt_weight_decay", "TTT_WEIGHT_DECAY", "eval.lora.weight_decay"),
    ("1790", "ttt_beta2", "TTT_BETA2", "eval.lora.beta2"),
    ("1790", "phased_ttt_num_phases", "PHASED_TTT_NUM_PHASES", "eval.lora.phases"),
    ("1790", "phased_ttt_prefix_docs", "PHASED_TTT_PREFIX_DOCS", "eval.lora.prefix_docs"),
    ("1790", "gate_attn_width", "GATE_ATTN_WIDTH", "train.model.attn_gate_width"),
    ("1790", "qk_gain_init", "QK_GAIN_INIT", "train.model.qk_gain_init"),
    ("1790", "mlp_clip_sigmas", "MLP_CLIP_SIGMAS", "gptq.mlp_clip_sigmas"),
    ("1790", "embed_clip_sigmas", "EMBED_CLIP_SIGMAS", "gptq.embed_clip_sigmas"),
    ("1790", "embed_bits", "EMBED_BITS", "gptq.embed_bits"),
    ("1383", None, "NUM_LAYERS", "train.model.num_layers"),
    ("1383", None, "MLP_MULT", "train.model.mlp_mult"),
    ("1383", None, "BIGRAM_VOCAB_SIZE", "train.model.bigram_vocab"),
    ("1383", None, "XSA_LAST_N", "train.model.xsa_last_n"),
    ("1383", None, "VE_LAYERS", "train.model.ve_layers"),
    ("1383", None, "TTT_LR", "eval.sgd.lr"),
    ("1383", None, "TTT_MOMENTUM", "eval.sgd.momentum"),
    ("1383", None, "TTT_EPOCHS", "eval.sgd.epochs"),
    ("1383", None, "TTT_CHUNK_TOKENS", "eval.sgd.chunk_tokens"),
    ("1383", None, "TTT_BATCH_SEQS", "eval.sgd.batch_seqs"),
    ("1383", None, "TTT_GRAD_CLIP", "eval.sgd.clip"),
    ("2116", "inhibitor_rank", "INHIBITOR_RANK", "train.model.inhibitor_rank"),
    ("2116", "ttt_lora_rank", "TTT_LORA_RANK", "eval.lora.rank"),
    ("2116", "ttt_weight_decay", "TTT_WEIGHT_DECAY", "eval.lora.weight_decay"),
    ("2116", "phased_ttt_num_phases", "PHASED_TTT_NUM_PHASES", "eval.lora.phases"),
    ("2116", "qk_gain_init", "QK_GAIN_INIT", "train.model.qk_gain_init"),
    ("2116", "gptq_reserve_seconds", "GPTQ_RESERVE_SECONDS", "train.gptq_reserve_seconds"),
    # the rest of PR #2116's run: the preset is the record plus inhibitors (docs/lineage.md#pr2116), and
    # these show where its sibling stack's run and the record preset part
    ("2116", "ttt_beta2", "TTT_BETA2", "eval.lora.beta2"),
    ("2116", "phased_ttt_prefix_docs", "PHASED_TTT_PREFIX_DOCS", "eval.lora.prefix_docs"),
    ("2116", "ttt_batch_size", "TTT_BATCH_SIZE", "eval.lora.batch_docs"),
    ("2116", "ttt_lora_lr", "TTT_LORA_LR", "eval.lora.lr"),
    ("2116", "ttt_lora_alpha", "TTT_LORA_ALPHA", "eval.lora.alpha"),
    ("2116", "mlp_clip_sigmas", "MLP_CLIP_SIGMAS", "gptq.mlp_clip_sigmas"),
    ("2116", "attn_clip_sigmas", "ATTN_CLIP_SIGMAS", "gptq.attn_clip_sigmas"),
    ("2116", "embed_clip_sigmas", "EMBED_CLIP_SIGMAS", "gptq.embed_clip_sigmas"),
    ("2116", "embed_bits", "EMBED_BITS", "gptq.embed_bits"),
    ("2116", "lqer_rank", "LQER_RANK", "gptq.lqer_rank"),
    ("2116", "min_lr", "MIN_LR", "train.min_lr"),
    ("2116", "matrix_lr", "MATRIX_LR", "train.matrix_lr"),
    ("2116", "loop_start", "LOOP_START", "train.model.loop_start"),
    ("2116", "loop_end", "LOOP_END", "train.model.loop_end"),
    ("2116", "parallel_start_layer", "PARALLEL_START_LAYER", "train.model.parallel_start_layer"),
    ("2116", "sparse_attn_gate_scale", "SPARSE_ATTN_GATE_SCALE", "train.model.sparse_attn_gate_scale"),
]
PR1383_BANK_MAP = [0, 1, 2, 3, 3, 4, 5, 6, 7, 8, 8]  # its GPT.__init__ with recurrence on
LOGS = {"1693": "train_seed42.log", "1790": "train_seed42.log", "2116": "train_log.txt"}


def same(ref: str, ours) -> bool:
    if ref in ("absent",):
        return False
    if isinstance(ours, bool) or ref in ("True", "False"):
        return (ref in ("1", "True")) == bool(ours)
    if isinstance(ours, list):
        return [int(v) for v in ref.split(",")] == [int(v) for v in ours]
    try:
        return float(ref) == float(ours)
    except (TypeError, ValueError):
        return str(ref) == str(ours)


def row_settings(ref: Path) -> list[tuple[str, str]]:
    out = []
    for pr, log_key, env, path in SETTINGS:
        folder = ref / SCRIPTS[pr]
        try:
            ours = dig(preset(f"pr{pr}"), path)
        except KeyError:
            ours = "unset"
        if env == "NUM_LAYERS" and pr == "1383":  # its NUM_LAYERS counts virtual depths, pgolf's block_map does
            ours = len(dig(preset("pr1383"), "train.model.block_map"))
            path = "len(train.model.block_map)"
        logged = logged_hyperparameters(folder / LOGS[pr]) if pr in LOGS and (folder / LOGS[pr]).is_file() else {}
        if log_key and log_key in logged:
            theirs, where = logged[log_key], "log"
        elif env:
            theirs, where = script_default(folder / "train_gpt.py", env), "script default"
        else:
            theirs, where = "none (unscaled: alpha = rank)", "script"
            ours_ok = float(ours) == float(dig(preset(f"pr{pr}"), "eval.lora.rank"))
            out.append((f"settings pr{pr} {path}", f"{'ok' if ours_ok else 'DIFFERS'}: PR {theirs}, preset {ours}"))
            continue
        if env == "VE_LAYERS":  # PR #1383 names virtual depths, pgolf physical blocks: map by its bank_map
            theirs = ",".join(str(v) for v in sorted({PR1383_BANK_MAP[int(d)] for d in theirs.split(",")}))
            where += ", as physical blocks"
        verdict = "ok" if same(theirs, ours) else "DIFFERS"
        out.append((f"settings pr{pr} {path}", f"{verdict}: PR {theirs} ({where}), preset {ours}"))
    return out


# --- gates -----------------------------------------------------------------------------------------

def pgolf_gate(name: str, num_heads: int) -> AttnOutputGate:
    model = preset(name)["train"]["model"]
    cfg = types.SimpleNamespace(attn_gate=model["attn_gate"], attn_gate_width=model["attn_gate_width"],
                                attn_gate_src=model["attn_gate_src"], num_heads=num_heads,
                                sparse_attn_gate_scale=model.get("sparse_attn_gate_scale", 0.5))
    return AttnOutputGate(cfg)


def row_gates(ref: Path) -> list[tuple[str, str]]:
    g = torch.Generator().manual_seed(0)
    batch, seq, heads, head_dim = 2, 16, 4, 16
    dim = heads * head_dim
    out = []

    pr1693 = load_script(ref / "pr1693" / "train_gpt.py", "pr1693_train_gpt")
    ours = pgolf_gate("pr1693", heads)
    y = torch.randn(batch, seq, heads, head_dim, generator=g)
    prenorm = torch.randn(batch, seq, dim, generator=g) * 3
    with torch.no_grad():
        ours.attn_gate_w.copy_(torch.randn(heads, ours.width, generator=g))
        theirs = pr1693._apply_attn_out_gate_inline(y, prenorm, ours.attn_gate_w)
        mine = ours(y.transpose(1, 2), ours.source(normed=None, prenorm=prenorm, q=None)).transpose(1, 2)
    out.append((f"gates pr1693 attn_out (src {ours.src}, width {ours.width})", max_diff(mine, theirs)))

    pr1790 = load_script(ref / "pr1790" / "train_gpt.py", "pr1790_train_gpt")
    ours = pgolf_gate("pr1790", heads)
    attn = pr1790.CausalSelfAttention(dim, heads, heads, 10000.0, 5.25, seq)
    attn.gate_attn_out, attn.gate_attn_width = True, ours.width
    attn.attn_gate_proj = pr1790.CastedLinear(ours.width, heads, bias=False)
    normed = torch.randn(batch, seq, dim, generator=g)
    q_w, k_w, v_w = (torch.randn(dim, dim, generator=g) / dim ** 0.5 for _ in range(3))
    identity = torch.eye(dim)  # out_w = I: the block's output is the gated attention itself
    with torch.no_grad():
        attn.attn_gate_proj.weight.copy_(torch.randn(heads, ours.width, generator=g))
        ours.attn_gate_w.copy_(attn.attn_gate_proj.weight)
        gated = attn(normed, q_w, k_w, v_w, identity)
        attn.gate_attn_out = False
        ungated = attn(normed, q_w, k_w, v_w, identity).reshape(batch, seq, heads, head_dim)
        mine = ours(ungated.transpose(1, 2), ours.source(normed=normed, prenorm=None, q=None))
        mine = mine.transpose(1, 2).reshape(batch, seq, dim)
    out.append((f"gates pr1790 attn_out in its CausalSelfAttention (src {ours.src}, width {ours.width})",
                max_diff(mine, gated)))
    zero_init = pr1790.CastedLinear(ours.width, heads, bias=False)
    torch.nn.init.zeros_(zero_init.weight)
    out.append(("gates init (pgolf zeros vs PR #1790 zeros_)",
                max_diff(pgolf_gate("pr1790", heads).attn_gate_w, zero_init.weight.detach())))
    return out


# --- inhibitor -------------------------------------------------------------------------------------

def row_inhibitor(ref: Path) -> list[tuple[str, str]]:
    pr2116 = load_script(ref / "pr2116" / "train_gpt.py", "pr2116_train_gpt")
    model = preset("pr2116")["train"]["model"]
    dim, rank = 64, model["inhibitor_rank"]
    torch.manual_seed(0)
    theirs = pr2116.InhibitorGate(dim, rank=rank)
    ours = InhibitorGate(dim, rank, model["inhibitor_bias"])
    out = [("inhibitor init: up (zeros), bias (3.0)",
            f"{max_diff(ours.up, theirs.up.weight)}; bias {max_diff(ours.bias, theirs.up.bias)}"),
           ("inhibitor init: down, both nn.Linear's kaiming_uniform(a=sqrt 5) bound",
            f"bound pgolf {ours.down.abs().max().item():.4f}, PR {theirs.down.weight.abs().max().item():.4f} "
            f"(limit {1 / dim ** 0.5:.4f})")]
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        theirs.up.weight.copy_(torch.randn(dim, rank, generator=g) * 0.3)
        theirs.up.bias.copy_(torch.randn(dim, generator=g) + 3)
        ours.down.copy_(theirs.down.weight)
        ours.up.copy_(theirs.up.weight)
        ours.bias.copy_(theirs.up.bias)
        x = torch.randn(2, 16, dim, generator=g)
        out.append(("inhibitor forward fp32 (trained-like weights)", max_diff(ours(x), theirs(x))))
        xb = x.bfloat16()
        out.append(("inhibitor forward bf16", max_diff(ours(xb), theirs(xb))))
    placed = [i for i in range(11) if i == 5]  # its GPT.__init__: use_inhibitor=... and i == 5
    out.append(("inhibitor blocks", f"{'ok' if placed == list(model['inhibitor_blocks']) else 'DIFFERS'}: "
                                    f"PR {placed}, preset {model['inhibitor_blocks']}"))
    return out


# --- FiLM ------------------------------------------------------------------------------------------

def row_film(ref: Path) -> list[tuple[str, str]]:
    from pgolf.model.config import ModelConfig
    from pgolf.model.plan import shared_depths
    pr1383 = load_script(ref / "pr1383" / "train_gpt.py", "pr1383_train_gpt")
    model = preset("pr1383")["train"]["model"]
    cfg = ModelConfig(**{k: v for k, v in model.items() if k in ModelConfig.__dataclass_fields__})
    depths = shared_depths(cfg)
    pr_depths = [3, 4, 9, 10]  # its GPT.__init__: shared_virtual_layers with recurrence on
    out = [("film depths", f"{'ok' if depths == pr_depths else 'DIFFERS'}: PR {pr_depths}, pgolf {depths}")]
    dim = 64
    g = torch.Generator().manual_seed(0)
    ours = FiLM(len(depths), dim)
    with torch.no_grad():
        ours.film_gamma.copy_(1 + 0.1 * torch.randn(len(depths), dim, generator=g))
        ours.film_beta.copy_(0.1 * torch.randn(len(depths), dim, generator=g))
    pr_self = types.SimpleNamespace(
        _film_vl_to_idx={vl: i for i, vl in enumerate(pr_depths)},
        film_scales=[p.detach().clone() for p in ours.film_gamma],
        film_shifts=[p.detach().clone() for p in ours.film_beta])
    x = torch.randn(2, 16, dim, generator=g)
    worst = []
    with torch.no_grad():
        for slot, depth in enumerate(pr_depths):
            worst.append(max_diff(ours(x, slot), pr1383.GPT._apply_film(pr_self, x, depth)))
        unmodulated = pr1383.GPT._apply_film(pr_self, x, 0)
    out.append(("film forward, every slot", "; ".join(worst)))
    out.append(("film at an unshared depth (PR passes x through)", max_diff(unmodulated, x)))
    return out


def row_film_ttt(ref: Path) -> list[tuple[str, str]]:
    """Read, not run: PR #1383's eval_val_sliding_ttt needs its whole GPT and val shards; its selection
    loop is quoted by line so the difference can be checked."""
    script = (ref / "pr1383" / "train_gpt.py").read_text()
    freezes_first = "frozen_block_ids = set(range(min(args.ttt_freeze_blocks" in script
    freezes_shared = 'if f"blocks.{sbi}." in name' in script
    banks_trainable = "Bank params are shared across all layers - we allow them for TTT" in script
    enabled = script_default(ref / "pr1383" / "train_gpt.py", "TTT_ENABLED")
    trainable = preset("pr1383")["eval"]["sgd"]["trainable"]
    pr = ("all but blocks.0-1 (TTT_FREEZE_BLOCKS=2)" if freezes_first else "?") + \
         (" and the shared blocks' own params" if freezes_shared else "") + \
         ("; banks, embeddings, FiLM and other top-level params train" if banks_trainable else "")
    return [("film_ttt trainable set (read from its script)",
             f"DIFFERS: PR {pr}; preset sgd.trainable {trainable} (FiLM only)"),
            ("film_ttt ran in PR #1383", f"TTT_ENABLED default {enabled}: its submitted run scored no TTT")]


# --- casefold --------------------------------------------------------------------------------------

def row_casefold(ref: Path) -> list[tuple[str, str]]:
    readme = (ref / "pr1693" / "README.md").read_text()
    script = (ref / "pr1693" / "train_gpt.py").read_text()
    has_transform = re.search(r"def \w*casefold\w*\(", script) is not None
    return [("casefold v4 text transform",
             "not public: PR #1693's folder holds train_gpt.py, logs and README only; its script "
             f"{'defines' if has_transform else 'defines no'} casefold function and reads pre-built shards "
             f"({'README: ' + chr(39) + 'Casefolded shards expected at DATA_DIR' + chr(39) if 'Casefolded shards' in readme else 'no prep'})"),
            ("casefold v4 tokenizer (fineweb_8192_bpe.model on casefolded text)", "not public (not in the PR)")]


# --- main ------------------------------------------------------------------------------------------

RUNNERS = {"settings": row_settings, "gates": row_gates, "inhibitor": row_inhibitor, "film": row_film,
           "film_ttt": row_film_ttt, "casefold": row_casefold}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {','.join(ROWS)}")
    parser.add_argument("--json", type=Path, help="write the rows here as JSON")
    parser.add_argument("--reference", type=Path, default=ROOT / "bench" / "reference",
                        help="folder holding pr1693/ pr1790/ pr1383/ pr2116/ (each PR's record folder)")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    started = time.time()
    table = []
    for row in args.rows.split(","):
        try:
            table.extend(RUNNERS[row](args.reference))
        except FileNotFoundError as missing:
            table.append((row, f"not run: {missing.filename} missing (fetch the PR's folder, see the docstring)"))
    width = max(len(name) for name, _ in table)
    for name, result in table:
        print(f"{name:<{width}}  {result}")
    print(f"({time.time() - started:.1f} s)")
    if args.json:
        args.json.write_text(json.dumps([{"row": n, "result": r} for n, r in table], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
