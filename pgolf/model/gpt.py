"""The GPT of the challenge's baseline (docs/lineage.md#baseline-config) and of the leading entries (#architecture).

Defaults give the baseline: 9 layers x 512, GQA 8/4 heads, relu^2 MLP x2, U-Net skips, tied
embeddings, logit softcap 30. Every other technique is switched by ModelConfig and lives in its own
module; which layer does what comes from pgolf.model.plan. Training, evaluation and TTT share this
one forward. Each module declares its parameters' families (pgolf.model.families), which the
optimizer groups and GPTQ's gates read; parameter names are still an API: GPTQ's clip table, the
packer and the int8 baseline's format select by name.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pgolf import kernels as fused_kernels
from pgolf.model.asym_softcap import AsymSoftcap
from pgolf.model.config import ModelConfig
from pgolf.model.docmask import (Mask, Segments, document_block_mask, document_causal_mask, document_segments,
                                 masked_attention, max_segment_len)
from pgolf.model.embeddings import BigramHashEmbedding, ValueEmbedding
from pgolf.model.families import Family, declared_families
from pgolf.model.film import FiLM
from pgolf.model.gates import AttnOutputGate
from pgolf.model.inhibitor import InhibitorGate
from pgolf.model.layers import CastedLinear, rms_norm
from pgolf.model.lora import DocumentAdapters, SlotAdapters
from pgolf.model.mlp import MLP
from pgolf.model.plan import BlockSpec, LayerPlan, block_specs, layer_plan, num_skips, shared_depths
from pgolf.model.rope import Rotary, apply_rotary
from pgolf.model.smear import SmearGate
from pgolf.model.xsa import exclusive

__all__ = ["GPT", "CastedLinear", "count_parameters", "param_groups", "rms_norm"]


@dataclass(frozen=True)
class ForwardInputs:
    """What every block of one forward call reads besides its residual stream."""
    x0: Tensor  # the embedded input, which each block mixes back in (resid_mix)
    value_embed: Tensor | None  # the shared value embedding, for the blocks that add it
    mask: Mask | None  # the document mask; None: plain causal attention
    adapters: DocumentAdapters | None  # per-document LoRA, one slot per virtual depth

    def lora(self, virtual: int) -> SlotAdapters | None:
        return self.adapters.slot(virtual) if self.adapters is not None else None


class CausalSelfAttention(nn.Module):
    param_families: ClassVar = {"c_q.weight": Family.MATRIX, "c_k.weight": Family.MATRIX, "c_v.weight": Family.MATRIX,
                                "proj.weight": Family.MATRIX, "q_gain": Family.SCALAR}

    def __init__(self, cfg: ModelConfig, spec: BlockSpec):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        kv_dim = cfg.num_kv_heads * cfg.head_dim
        self.c_q = CastedLinear(cfg.model_dim, cfg.model_dim, orthogonal=cfg.orthogonal_init)
        self.c_k = CastedLinear(cfg.model_dim, kv_dim, orthogonal=cfg.orthogonal_init)
        self.c_v = CastedLinear(cfg.model_dim, kv_dim, orthogonal=cfg.orthogonal_init)
        self.proj = CastedLinear(cfg.model_dim, cfg.model_dim, zero_init=True)
        self.q_gain = nn.Parameter(torch.full((cfg.num_heads,), cfg.qk_gain_init, dtype=torch.float32))
        self.rotary = Rotary(cfg.head_dim, cfg.rope_base, cfg.rope_dims, cfg.rope_yarn, cfg.rope_train_len,
                             cfg.rope_bf16_freqs)
        self.xsa = spec.xsa
        self.gate = AttnOutputGate(cfg) if cfg.attn_gate != "off" else None

    def forward(self, n: Tensor, prenorm: Tensor, value_embed: Tensor | None = None,
                mask: Mask | None = None, lora: SlotAdapters | None = None) -> Tensor:
        bsz, seqlen, dim = n.shape
        q_flat, k_flat, v = self.c_q(n), self.c_k(n), self.c_v(n)
        if lora is not None:
            q_flat, v = q_flat + lora.q(n), v + lora.v(n)
            if lora.k is not None:
                k_flat = k_flat + lora.k(n)
        q = q_flat.reshape(bsz, seqlen, self.num_heads, self.head_dim).transpose(1, 2)
        k = k_flat.reshape(bsz, seqlen, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if value_embed is not None:
            v = v + value_embed
        v = v.reshape(bsz, seqlen, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = rms_norm(q), rms_norm(k)
        cos, sin = self.rotary(seqlen, n.device, q.dtype)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q = q * self.q_gain.to(q.dtype)[None, :, None, None]
        gqa = self.num_kv_heads != self.num_heads
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            y = masked_attention(q, k, v, mask, gqa)
        if self.xsa:
            y = exclusive(y, v)
        if self.gate is not None:
            y = self.gate(y, self.gate.source(n, prenorm, q_flat))
        out = self.proj(y.transpose(1, 2).reshape(bsz, seqlen, dim))
        return out + lora.o(n) if lora is not None else out


class Block(nn.Module):
    param_families: ClassVar = {"attn_scale": Family.SCALAR, "mlp_scale": Family.SCALAR, "resid_mix": Family.SCALAR,
                                "parallel_resid_lambdas": Family.PASSTHROUGH,
                                "parallel_post_lambdas": Family.PASSTHROUGH, "ve_scale": Family.PASSTHROUGH}

    def __init__(self, cfg: ModelConfig, spec: BlockSpec):
        super().__init__()
        self.attn = CausalSelfAttention(cfg, spec)
        self.mlp = MLP(cfg)
        self.attn_scale = nn.Parameter(torch.ones(cfg.model_dim, dtype=torch.float32))
        self.mlp_scale = nn.Parameter(torch.ones(cfg.model_dim, dtype=torch.float32))
        # x_in = resid_mix[0] * x + resid_mix[1] * x0: a learned pull back towards the embedding.
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(cfg.model_dim), torch.zeros(cfg.model_dim))).float())
        self.norm_scale = spec.norm_scale
        if spec.lane_weights:
            # Two-lane parallel residual (R1): lane_i = rho_i * lane_i + pi_0i * A + pi_1i * M.
            self.parallel_resid_lambdas = nn.Parameter(torch.full((2,), cfg.parallel_resid_init))
            self.parallel_post_lambdas = nn.Parameter(torch.ones(2, 2))
        self.ve_scale = nn.Parameter(torch.ones(1)) if spec.value_embedding else None
        if spec.inhibitor:
            self.attn_inhibitor = InhibitorGate(cfg.model_dim, cfg.inhibitor_rank, cfg.inhibitor_bias)
            self.mlp_inhibitor = InhibitorGate(cfg.model_dim, cfg.inhibitor_rank, cfg.inhibitor_bias)
        else:
            self.attn_inhibitor = self.mlp_inhibitor = None

    def _attn(self, x_in: Tensor, inputs: ForwardInputs, lora: SlotAdapters | None) -> Tensor:
        n = rms_norm(x_in) * self.norm_scale
        ve = (inputs.value_embed * self.ve_scale.to(n.dtype)
              if self.ve_scale is not None and inputs.value_embed is not None else None)
        scale = self.attn_scale.to(n.dtype)
        if self.attn_inhibitor is not None:
            scale = scale * self.attn_inhibitor(n)
        return scale * self.attn(n, x_in, ve, inputs.mask, lora)

    def _mlp(self, x: Tensor, lora: SlotAdapters | None = None) -> Tensor:
        n = rms_norm(x) * self.norm_scale
        scale = self.mlp_scale.to(n.dtype)
        if self.mlp_inhibitor is not None:
            scale = scale * self.mlp_inhibitor(n)
        out = self.mlp(n)
        return scale * (out + lora.mlp(n) if lora is not None else out)

    def mix(self, x: Tensor, x0: Tensor) -> Tensor:
        m = self.resid_mix.to(x.dtype)
        return m[0] * x + m[1] * x0

    def forward(self, x: Tensor, inputs: ForwardInputs, virtual: int) -> Tensor:
        """One step at virtual depth `virtual` (its LoRA slot)."""
        lora = inputs.lora(virtual)
        x = self.mix(x, inputs.x0)
        x = x + self._attn(x, inputs, lora)
        return x + self._mlp(x, lora)

    def forward_lanes(self, lane0: Tensor, lane1: Tensor, inputs: ForwardInputs, virtual: int) -> tuple[Tensor, Tensor]:
        """Attention reads the mixed lane 0, the MLP reads lane 1, both lanes take both outputs."""
        lora = inputs.lora(virtual)
        a = self._attn(self.mix(lane0, inputs.x0), inputs, lora)
        m = self._mlp(lane1, lora)
        rho, post = self.parallel_resid_lambdas.to(a.dtype), self.parallel_post_lambdas.to(a.dtype)
        return rho[0] * lane0 + post[0, 0] * a + post[1, 0] * m, rho[1] * lane1 + post[0, 1] * a + post[1, 1] * m


class GPT(nn.Module):
    param_families: ClassVar = {"tok_emb.weight": Family.EMBEDDING, "lm_head.weight": Family.EMBEDDING,
                                "skip_weights": Family.SCALAR, "skip_gates": Family.PASSTHROUGH}

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.model_dim)
        self.bigram = BigramHashEmbedding(cfg) if cfg.bigram_vocab else None
        self.smear = SmearGate(cfg) if cfg.smear_gate != "off" else None
        self.value_embed = ValueEmbedding(cfg) if cfg.ve_layers else None
        self.blocks = nn.ModuleList(Block(cfg, spec) for spec in block_specs(cfg))
        skips = num_skips(cfg)
        self.skip_weights = nn.Parameter(torch.ones(skips, cfg.model_dim, dtype=torch.float32))
        self.skip_gates = nn.Parameter(torch.zeros(skips, cfg.model_dim)) if cfg.skip_gates else None
        self.film = FiLM(len(shared_depths(cfg)), cfg.model_dim) if cfg.film else None
        self.lm_head = None if cfg.tie_embeddings else CastedLinear(cfg.model_dim, cfg.vocab_size, zero_init=True)
        self.softcap = AsymSoftcap(cfg.logit_softcap) if cfg.asym_softcap else None
        self.plans = {False: layer_plan(cfg, False), True: layer_plan(cfg, True)}
        # Recurrence is on by default (evaluation, calibration, TTT); training turns it off until
        # enable_looping_at and then back on for good.
        self.looping = bool(cfg.num_loops)
        self.doc_attention = cfg.doc_attention
        self.fused_cross_entropy = False
        self.reset_parameters()
        declared_families(self)  # a parameter no module classifies fails here, not in a consumer

    def reset_parameters(self) -> None:
        if self.cfg.tie_embeddings:
            nn.init.normal_(self.tok_emb.weight, mean=0.0, std=self.cfg.tied_embed_init_std)
        for module in self.modules():
            if isinstance(module, CastedLinear):
                if module.zero_init:
                    nn.init.zeros_(module.weight)
                elif module.orthogonal:
                    nn.init.orthogonal_(module.weight, gain=1.0)

    def set_looping(self, on: bool) -> None:
        """Depth recurrence switches on during training (enable_looping_at) and stays on for eval."""
        self.looping = bool(on and self.cfg.num_loops)

    def store_embedding_in_bf16(self) -> None:
        """Keep tok_emb as a bf16 parameter, as the baseline and R1 train it (docs/lineage.md#precision): the
        embedding then feeds the residual stream in bf16 under autocast (every control tensor is
        cast to the activation dtype), where an fp32 embedding would make the whole stream fp32."""
        self.tok_emb.to(torch.bfloat16)

    def set_fused_kernels(self, cross_entropy: bool, mlp: bool) -> None:
        """Train through the fused Triton loss and MLP (pgolf.kernels) if the model's device can run
        them (else the eager path, same math). Call after moving the model. Only the train stage
        asks, so eval, calibration and TTT keep the eager path, as R1 does."""
        device = next(self.parameters()).device
        if (cross_entropy or mlp) and device.type == "cuda" and not fused_kernels.triton_installed():
            raise ValueError("train.fused_cross_entropy / fused_mlp on CUDA need triton: pip install -e '.[gpu]'")
        if cross_entropy:
            fused_kernels.check_fusable_softcap(self.cfg.logit_softcap)
        runnable = fused_kernels.usable(device)
        self.fused_cross_entropy = cross_entropy and runnable
        for module in self.modules():
            if isinstance(module, MLP):
                module.fused = mlp and runnable

    def set_qat(self, bits: int) -> None:
        """Fake-quantize the blocks' attention and MLP matrices from now on (0 turns it off)."""
        for name, module in self.named_modules():
            if isinstance(module, CastedLinear) and name.startswith("blocks."):
                module.qat_bits = bits

    def set_doc_attention(self, on: bool) -> None:
        """Attend within documents (cfg.doc_attention) or plainly causal across them: R1 trains and
        evaluates with its varlen segments but calibrates GPTQ with plain causal attention
        (gptq.calib_doc_attention)."""
        self.doc_attention = bool(on)

    @property
    def plan(self) -> LayerPlan:
        return self.plans[self.looping]

    def embed(self, input_ids: Tensor) -> Tensor:
        x = self.tok_emb(input_ids)
        if self.bigram is not None:
            x = x + self.bigram(input_ids).to(x.dtype)
        if self.smear is not None and self.smear.before_norm:
            x = self.smear(x, input_ids)
        x = rms_norm(x)
        if self.smear is not None and not self.smear.before_norm:
            x = self.smear(x, input_ids)
        return x

    def _skip(self, x: Tensor, skip: Tensor, j: int) -> Tensor:
        weighted = self.skip_weights[j].to(x.dtype) * skip
        if self.skip_gates is None:
            return x + weighted
        g = torch.sigmoid(self.skip_gates[j].to(x.dtype))
        return g * x + (1 - g) * weighted

    def document_mask(self, input_ids: Tensor, cu_seqlens: Tensor | None) -> Mask | None:
        """The attention mask of doc_attention in the configured kernel's form (pgolf.model.docmask).
        `cu_seqlens`: the varlen segments of `input_ids` built on the host beforehand
        (docmask.document_segments); without them the varlen kernel builds them here, a device sync."""
        if not self.doc_attention:
            return None
        kernel, bos, max_len = self.cfg.doc_attention_kernel, self.cfg.bos_id, self.cfg.doc_attention_max_len
        if kernel == "varlen":
            if cu_seqlens is not None:
                return Segments(cu_seqlens, max_segment_len(input_ids.size(1), max_len))
            if not torch.compiler.is_compiling():
                return document_segments(input_ids, bos, max_len)
            # Inside a compiled graph segments cannot be read off the ids (a data-dependent shape):
            # callers that compile without passing them (TTT) get FlexAttention, the same function.
            kernel = "flex"
        # FlexAttention has no backward on CPU: there, training falls back to the dense mask.
        flex = kernel == "flex" and (input_ids.is_cuda or not torch.is_grad_enabled())
        return (document_block_mask if flex else document_causal_mask)(input_ids, bos, max_len)

    def document_cu_seqlens(self, host_ids: Tensor, device: torch.device) -> Tensor | None:
        """The cu_seqlens the varlen kernel needs for `host_ids` (a CPU tensor), built on the host and
        copied to `device` without a wait; None where the model needs none (pass it to forward)."""
        if not (self.doc_attention and self.cfg.doc_attention_kernel == "varlen"):
            return None
        return document_segments(host_ids, self.cfg.bos_id, self.cfg.doc_attention_max_len, device).cu_seqlens

    def hidden(self, input_ids: Tensor, adapters: DocumentAdapters | None = None,
               cu_seqlens: Tensor | None = None) -> Tensor:
        """Final-normed hidden states [B, T, D]: the input of the LM head (one path for train/eval/TTT;
        `adapters`: per-document LoRA, one slot per virtual depth; `cu_seqlens`: see document_mask)."""
        x = self.embed(input_ids)
        x0 = x
        ve = self.value_embed(input_ids).to(x.dtype) if self.value_embed is not None else None
        inputs = ForwardInputs(x0, ve, self.document_mask(input_ids, cu_seqlens), adapters)
        plan = self.plan
        skips: list[Tensor] = []
        for step in plan.encoder:
            x = self.blocks[step.physical](x, inputs, step.virtual)
            if step.film_slot >= 0:
                x = self.film(x, step.film_slot)
            skips.append(x)
        lanes: tuple[Tensor, Tensor] | None = None
        for j, step in enumerate(plan.decoder):
            block = self.blocks[step.physical]
            if step.parallel:
                if lanes is None:
                    lanes = (x, x)
                lane0 = self._skip(lanes[0], skips.pop(), j) if skips else lanes[0]
                lanes = block.forward_lanes(lane0, lanes[1], inputs, step.virtual)
                if step.film_slot >= 0:
                    lanes = (self.film(lanes[0], step.film_slot), self.film(lanes[1], step.film_slot))
                continue
            if skips:
                x = self._skip(x, skips.pop(), j)
            x = block(x, inputs, step.virtual)
            if step.film_slot >= 0:
                x = self.film(x, step.film_slot)
        if lanes is not None:
            x = 0.5 * (lanes[0] + lanes[1])
        return rms_norm(x)

    def head(self, h: Tensor) -> Tensor:
        """Logits before the softcap, in the activation dtype."""
        weight = self.tok_emb.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(h, weight.to(h.dtype))

    def capped(self, logits: Tensor, learned: bool = True) -> Tensor:
        """The softcap; `learned`: the AsymLogit pair where the model has one (everything that reads
        logits), else the constant cap (the training loss: docs/lineage.md#asymlogit)."""
        if learned and self.softcap is not None:
            return self.softcap(logits)
        cap = self.cfg.logit_softcap
        return cap * torch.tanh(logits / cap) if cap > 0 else logits

    def logits_from_hidden(self, h: Tensor, adapters: DocumentAdapters | None = None) -> Tensor:
        logits = self.head(h).float()
        if adapters is not None:
            logits = logits + adapters.head(h).float()
        return self.capped(logits)

    def forward_logits(self, input_ids: Tensor, adapters: DocumentAdapters | None = None,
                       cu_seqlens: Tensor | None = None) -> Tensor:
        return self.logits_from_hidden(self.hidden(input_ids, adapters, cu_seqlens), adapters)

    def virtual_depth(self) -> int:
        """Slots a DocumentAdapters needs: one per virtual depth of the current plan."""
        return len(self.plan.steps)

    def forward(self, input_ids: Tensor, target_ids: Tensor, cu_seqlens: Tensor | None = None) -> Tensor:
        """Mean next-token loss: the training objective."""
        if self.fused_cross_entropy:
            from pgolf.kernels.softcap_ce import softcap_cross_entropy

            logits = self.head(self.hidden(input_ids, cu_seqlens=cu_seqlens))
            return softcap_cross_entropy(logits.reshape(-1, logits.size(-1)), target_ids.reshape(-1),
                                         self.cfg.logit_softcap)
        logits = self.capped(self.head(self.hidden(input_ids, cu_seqlens=cu_seqlens)).float(), learned=False)
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), target_ids.reshape(-1))


def count_parameters(cfg: ModelConfig) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in GPT(cfg).parameters())


def param_groups(model: GPT) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Split parameters the way the entries' optimizers do: the blocks' attention and MLP matrices
    go to Muon, the embedding (and untied head) to Adam with their own lr, every control tensor
    (scales, mixes, gains, gates, lane lambdas, skip weights, small embeddings) to the scalar Adam."""
    groups: dict[str, list[tuple[str, nn.Parameter]]] = {"matrix": [], "embed": [], "head": [], "scalar": []}
    families = declared_families(model)
    for name, p in model.named_parameters():
        if name.startswith("softcap."):
            continue  # PR #2135's optimizers hold no AsymLogit cap: it keeps its init (docs/lineage.md#asymlogit)
        family = families[name]
        if family is Family.EMBEDDING:
            groups["embed" if name == "tok_emb.weight" else "head"].append((name, p))
        elif family is Family.MATRIX:
            groups["matrix"].append((name, p))
        else:
            groups["scalar"].append((name, p))
    return groups
