"""Each technique of the leading entries: causal, identity at init where the reference says so,
no leak across BOS, and the layer plan followed exactly."""
from __future__ import annotations

import pytest
import torch

from pgolf.model.config import ModelConfig
from pgolf.model.embeddings import bigram_hash
from pgolf.model.gpt import GPT, count_parameters
from pgolf.model.plan import block_specs, layer_plan, num_skips, virtual_order

BASE = dict(vocab_size=64, num_layers=4, model_dim=32, num_heads=4, num_kv_heads=2, mlp_mult=2.0)
TECHNIQUES = {
    "smear_r1": dict(smear_gate="r1"),
    "smear_pr1693": dict(smear_gate="pr1693", smear_bos_mask=False),
    "smear_classic": dict(smear_gate="classic"),
    "attn_out_gate": dict(attn_gate="attn_out", attn_gate_width=8),
    "attn_out_gate_prenorm": dict(attn_gate="attn_out", attn_gate_src="prenorm"),
    "attn_out_gate_q": dict(attn_gate="attn_out", attn_gate_src="q"),
    "sparse_gate": dict(attn_gate="sparse"),
    "xsa": dict(xsa_last_n=2),
    "partial_rope_yarn": dict(rope_dims=4, rope_yarn=True, rope_train_len=8),
    "ln_scale_qk_gain": dict(ln_scale=True, qk_gain_init=5.0),
    "skip_gates": dict(skip_gates=True),
    "parallel_lanes": dict(parallel_start_layer=2),
    "recurrence": dict(num_loops=2, loop_start=1, loop_end=2),
    "film_block_map": dict(block_map=[0, 1, 1, 2, 3, 3], film=True),
    "leaky_relu2": dict(mlp_activation="leaky_relu2", mlp_mult=3.0),
    "bigram_hash": dict(bigram_vocab=96, bigram_dim=16),
    "value_embeddings": dict(ve_layers=[2, 3], ve_dim=8),
    "inhibitor": dict(inhibitor_blocks=[1], inhibitor_rank=4),
    "orthogonal_init": dict(orthogonal_init=True),
}
R1_TINY = dict(mlp_activation="leaky_relu2", orthogonal_init=True, rope_dims=4, qk_gain_init=5.0, ln_scale=True,
               xsa_last_n=4, skip_gates=True, parallel_start_layer=3, num_loops=2, loop_start=1, loop_end=2,
               smear_gate="r1", attn_gate="sparse")


def randomized(cfg: ModelConfig, seed: int = 0) -> GPT:
    """Every parameter random, so zero-init techniques actually act."""
    torch.manual_seed(seed)
    model = GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model


@pytest.mark.parametrize("name", list(TECHNIQUES) + ["r1_all"])
def test_causal(name):
    extra = R1_TINY if name == "r1_all" else TECHNIQUES[name]
    model = randomized(ModelConfig(**{**BASE, **extra}))
    model.set_looping(True)
    ids = torch.randint(2, 64, (2, 12))
    ids[:, 5] = 1  # a BOS inside the window
    changed = ids.clone()
    changed[:, 8:] = torch.randint(2, 64, (2, 4))
    a, b = model.forward_logits(ids), model.forward_logits(changed)
    assert torch.allclose(a[:, :8], b[:, :8], atol=1e-5), name
    assert not torch.allclose(a[:, 8:], b[:, 8:]), name


@pytest.mark.parametrize("name", ["smear_r1", "smear_pr1693", "attn_out_gate", "attn_out_gate_q", "bigram_hash",
                                  "value_embeddings"])
def test_zero_init_techniques_start_as_the_identity(name):
    torch.manual_seed(1)
    plain = GPT(ModelConfig(**BASE))
    with torch.no_grad():
        for block in plain.blocks:  # weight in the zero-init projections, so the comparison means something
            block.attn.proj.weight.normal_(0, 0.2)
            block.mlp.proj.weight.normal_(0, 0.2)
    torch.manual_seed(1)
    model = GPT(ModelConfig(**{**BASE, **TECHNIQUES[name]}))
    model.load_state_dict(plain.state_dict(), strict=False)
    ids = torch.randint(0, 64, (2, 10))
    assert torch.allclose(model.forward_logits(ids), plain.forward_logits(ids), atol=1e-6)


def test_film_starts_as_the_identity():
    cfg = dict(BASE, block_map=[0, 1, 1, 2, 3, 3])
    torch.manual_seed(2)
    plain = randomized(ModelConfig(**cfg))
    film = GPT(ModelConfig(**cfg, film=True))
    film.load_state_dict(plain.state_dict(), strict=False)
    ids = torch.randint(0, 64, (1, 9))
    assert torch.allclose(film.forward_logits(ids), plain.forward_logits(ids), atol=1e-6)
    assert film.film.film_gamma.shape == (4, 32)  # depths 1, 2, 4, 5 run shared blocks


def test_inhibitor_gate_starts_near_095():
    model = GPT(ModelConfig(**BASE, inhibitor_blocks=[1], inhibitor_rank=4))
    gate = model.blocks[1].attn_inhibitor(torch.randn(2, 3, 32))
    assert torch.allclose(gate, torch.full_like(gate, torch.sigmoid(torch.tensor(3.0)).item()))


@pytest.mark.parametrize("variant", ["r1", "pr1693", "classic"])
def test_smear_gate_does_not_leak_across_bos(variant):
    model = randomized(ModelConfig(**BASE, smear_gate=variant, smear_bos_mask=True))
    ids = torch.randint(2, 64, (1, 8))
    ids[0, 4] = 1
    changed = ids.clone()
    changed[0, 3] = (ids[0, 3] + 1) % 62 + 2  # the last token of the previous document
    assert torch.equal(model.embed(ids)[0, 4], model.embed(changed)[0, 4])
    leaky = randomized(ModelConfig(**BASE, smear_gate=variant, smear_bos_mask=False))
    assert not torch.equal(leaky.embed(ids)[0, 4], leaky.embed(changed)[0, 4])


def block_calls(model: GPT, ids) -> list[int]:
    """Physical blocks in the order they run (sequential blocks and two-lane blocks alike)."""
    calls: list[int] = []
    originals = {}
    for i, block in enumerate(model.blocks):
        originals[i] = (block.forward, block.forward_lanes)
        block.forward = (lambda *a, _f=block.forward, _i=i, **k: (calls.append(_i), _f(*a, **k))[1])
        block.forward_lanes = (lambda *a, _f=block.forward_lanes, _i=i, **k: (calls.append(_i), _f(*a, **k))[1])
    try:
        model.forward_logits(ids)
    finally:
        for i, block in enumerate(model.blocks):
            del block.forward, block.forward_lanes
    return calls


def test_recurrence_runs_the_loop_only_when_switched_on():
    cfg = ModelConfig(**{**BASE, "num_layers": 11}, num_loops=2, loop_start=3, loop_end=5, parallel_start_layer=8)
    assert virtual_order(cfg, True) == [0, 1, 2, 3, 4, 5, 3, 4, 5, 3, 4, 5, 6, 7, 8, 9, 10]
    plan = layer_plan(cfg, True)
    assert [s.physical for s in plan.encoder] == [0, 1, 2, 3, 4, 5, 3, 4]
    assert [s.physical for s in plan.decoder if s.parallel] == [8, 9, 10] and num_skips(cfg) == 8
    model = randomized(cfg)
    assert model.looping, "a looped model evaluates with its loop on"
    model.set_looping(False)
    ids = torch.randint(0, 64, (1, 6))
    off = model.forward_logits(ids)
    assert block_calls(model, ids) == list(range(11))
    model.set_looping(True)
    assert block_calls(model, ids) == virtual_order(cfg, True)
    assert not torch.allclose(model.forward_logits(ids), off)


def test_film_follows_the_block_map():
    cfg = ModelConfig(**{**BASE, "num_layers": 9}, block_map=[0, 1, 2, 3, 3, 4, 5, 6, 7, 8, 8], film=True)
    model = randomized(cfg)
    assert block_calls(model, torch.randint(0, 64, (1, 5))) == cfg.block_map
    assert [s.film_slot for s in layer_plan(cfg, False).steps] == [-1, -1, -1, 0, 1, -1, -1, -1, -1, 2, 3]


def test_bigram_hash_formula():
    ids = torch.tensor([[5, 7, 9]])
    h = bigram_hash(ids, 100)
    assert h[0, 0] == 99
    assert h[0, 1] == (36313 * 7 ^ 27191 * 5) % 99 and h[0, 2] == (36313 * 9 ^ 27191 * 7) % 99


def test_reference_parameter_counts():
    r1 = dict(vocab_size=8192, num_layers=11, model_dim=512, num_heads=8, num_kv_heads=4, mlp_mult=4.0,
              mlp_activation="leaky_relu2", rope_dims=16, qk_gain_init=5.0, ln_scale=True, xsa_last_n=11,
              skip_gates=True, parallel_start_layer=8, num_loops=2, loop_start=3, loop_end=5, smear_gate="r1",
              attn_gate="sparse")
    assert count_parameters(ModelConfig(**r1)) == 35_945_671  # docs/lineage.md#architecture
    assert count_parameters(ModelConfig(**r1, inhibitor_blocks=[5])) == 35_991_751  # PR #2116


def test_document_attention_isolates_documents():
    model = randomized(ModelConfig(**BASE, doc_attention=True))
    ids = torch.randint(2, 64, (2, 12))
    ids[:, 5] = 1
    changed = ids.clone()
    changed[:, :5] = torch.randint(2, 64, (2, 5))  # rewrite the previous document entirely
    a, b = model.forward_logits(ids), model.forward_logits(changed)
    assert torch.allclose(a[:, 5:], b[:, 5:], atol=1e-5)
    plain = randomized(ModelConfig(**BASE))
    assert not torch.allclose(plain.forward_logits(ids)[:, 5:], plain.forward_logits(changed)[:, 5:])


def r1_segments(ids: list[int], max_len: int, bos_id: int = 1) -> list[list[int]]:
    """R1's _build_cu_seqlens, written out: a segment at position 0 and at every BOS, long ones cut
    every max_len from their start; returns the positions of each segment."""
    starts = sorted({0} | {i for i, t in enumerate(ids) if t == bos_id}) + [len(ids)]
    cuts = [p for a, b in zip(starts, starts[1:]) for p in range(a, b, max_len)] + [len(ids)]
    return [list(range(a, b)) for a, b in zip(cuts, cuts[1:])]


def test_segments_are_r1s_cu_seqlens():
    from pgolf.model.docmask import segment_ids

    ids = [5, 6, 1, 7, 8, 9, 10, 1, 11]
    # by hand: bos at 2 and 7, cut every 2 from a document's start -> [0,2) [2,4) [4,6) [6,7) [7,9)
    assert r1_segments(ids, 2) == [[0, 1], [2, 3], [4, 5], [6], [7, 8]]
    seg = segment_ids(torch.tensor([ids]), 1, 2)[0].tolist()
    assert [[i for i in range(len(ids)) if seg[i] == seg[s[0]]] for s in r1_segments(ids, 2)] == r1_segments(ids, 2)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        row = torch.randint(1, 4, (1, 23), generator=g)
        seg = segment_ids(row, 1, 5)[0].tolist()
        expected = r1_segments(row[0].tolist(), 5)
        assert [[i for i in range(23) if seg[i] == seg[s[0]]] for s in expected] == expected


def test_flat_row_cuts_attention_but_smear_runs_across_the_cut():
    """A 12-token document in one row with doc_attention_max_len 4: position 4 attends only to
    4.. (R1's cut), yet SmearGate still mixes in token 3, as R1's smear runs across cu_seqlens cuts
    (fixed rows of 4 would give position 4 no previous token)."""
    model = randomized(ModelConfig(**BASE, doc_attention=True, doc_attention_max_len=4, smear_gate="r1"))
    ids = torch.randint(2, 64, (1, 12))
    ids[0, 0] = 1
    with torch.no_grad():
        base = model.forward_logits(ids)
        far = ids.clone()
        far[0, 1:3] = (ids[0, 1:3] + 1 - 2) % 62 + 2  # before the cut, not adjacent to it
        assert torch.allclose(model.forward_logits(far)[:, 4:], base[:, 4:], atol=1e-5)
        near = ids.clone()
        near[0, 3] = (ids[0, 3] + 1 - 2) % 62 + 2  # the token just before the cut
        changed = model.forward_logits(near)
        assert not torch.allclose(changed[:, 4], base[:, 4], atol=1e-4)
        assert torch.allclose(changed[:, 8:], base[:, 8:], atol=1e-5)  # the next segment: 8..11
        model.set_doc_attention(False)  # plainly causal: everything before reaches position 4
        assert not torch.allclose(model.forward_logits(far)[:, 4:], model.forward_logits(ids)[:, 4:], atol=1e-4)


def test_flex_document_attention_is_the_dense_mask():
    """doc_attention_kernel flex (FlexAttention block mask) computes what the dense mask does, with
    documents of several lengths in each row and GQA. On CPU only the forward can run flex (no
    backward there: training falls back to the dense mask); the backward is the GPU bench's."""
    dense = randomized(ModelConfig(**BASE, doc_attention=True))
    flex = GPT(ModelConfig(**BASE, doc_attention=True, doc_attention_kernel="flex"))
    flex.load_state_dict(dense.state_dict())
    ids = torch.randint(2, 64, (2, 40))
    ids[0, [0, 7, 30]] = 1
    ids[1, [12, 13]] = 1
    with torch.no_grad():
        assert torch.allclose(dense.forward_logits(ids), flex.forward_logits(ids), atol=1e-5)
        changed = ids.clone()
        changed[0, 8:30] = torch.randint(2, 64, (22,))  # the middle document of row 0
        a, b = flex.forward_logits(ids), flex.forward_logits(changed)
        assert torch.allclose(a[0, 30:], b[0, 30:], atol=1e-5) and torch.allclose(a[1], b[1])
        assert not torch.allclose(a[0, 8:30], b[0, 8:30])
    y = torch.randint(0, 64, (2, 40))
    assert torch.allclose(dense(ids, y), flex(ids, y))  # with grad on CPU: the dense fallback


def uneven_documents(rows: int, length: int, seed: int = 0) -> torch.Tensor:
    """Rows of documents of uneven lengths (1 token up to longer than doc_attention_max_len), a row
    starting inside a document, two BOS in a row."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 64, (rows, length), generator=g)
    ids[0, [0, 1, 9, 10, 31]] = 1
    if rows > 1:
        ids[1, [5, 6, 7, 30]] = 1
    return ids


def test_varlen_cu_seqlens_are_r1s():
    """document_segments: R1's cu_seqlens (segment starts, then the total, padded with the total to
    a multiple of 64), over the rows flattened, each row starting a segment."""
    from pgolf.model.docmask import document_segments

    ids = uneven_documents(3, 37)
    seg = document_segments(ids, 1, 8)
    starts = [r * 37 + p[0] for r in range(3) for p in r1_segments(ids[r].tolist(), 8)]
    assert seg.cu_seqlens.dtype == torch.int32 and len(seg.cu_seqlens) == 64
    assert seg.cu_seqlens.tolist() == starts + [3 * 37] * (64 - len(starts))
    assert seg.max_seqlen == 8 and document_segments(ids, 1, 0).max_seqlen == 37


@pytest.mark.parametrize("extra", [dict(), R1_TINY], ids=["base", "r1"])
def test_varlen_document_attention_is_the_mask_and_flex_in_logits_and_grads(extra):
    """Issue 25: doc_attention_kernel varlen (rows cut at cu_seqlens, no T x T mask; on CPU the
    exact per-segment path) computes the dense mask's and FlexAttention's logits, and the dense
    mask's gradients (FlexAttention has no backward on CPU: its gradients against varlen's are
    bench/varlen_attention.py's, on CUDA), on uneven documents with GQA and max_len cuts."""
    kernels = {k: ModelConfig(**{**BASE, **extra}, doc_attention=True, doc_attention_max_len=8, doc_attention_kernel=k)
               for k in ("mask", "flex", "varlen")}
    models = {k: randomized(cfg) for k, cfg in kernels.items()}
    for m in models.values():
        m.load_state_dict(models["mask"].state_dict())
        m.set_looping(True)
    ids, y = uneven_documents(2, 40), torch.randint(0, 64, (2, 40))
    with torch.no_grad():
        logits = {k: m.forward_logits(ids) for k, m in models.items()}
    assert torch.allclose(logits["varlen"], logits["mask"], atol=1e-5, rtol=0)
    assert torch.allclose(logits["varlen"], logits["flex"], atol=1e-5, rtol=0)
    grads = {}
    for k in ("mask", "varlen"):
        models[k](ids, y).backward()
        grads[k] = {n: p.grad for n, p in models[k].named_parameters() if p.grad is not None}
    assert grads["mask"].keys() == grads["varlen"].keys()
    for name, g in grads["mask"].items():
        assert torch.allclose(grads["varlen"][name], g, atol=1e-5, rtol=1e-4), name
    # the segments built on the host beforehand (what the loader passes) change nothing
    cu = models["varlen"].document_cu_seqlens(ids, ids.device)
    assert torch.equal(models["varlen"].forward_logits(ids, cu_seqlens=cu), logits["varlen"])


def test_segment_attention_gradients_are_exact():
    """The exact varlen path's backward (written out: autograd does not run inside a custom op)
    against finite differences, in float64, with GQA and an empty padding segment."""
    from pgolf.model.docmask import segment_attention

    g = torch.Generator().manual_seed(0)
    q = torch.randn(11, 4, 3, dtype=torch.float64, generator=g, requires_grad=True)
    k = torch.randn(11, 2, 3, dtype=torch.float64, generator=g, requires_grad=True)
    v = torch.randn(11, 2, 3, dtype=torch.float64, generator=g, requires_grad=True)
    cu = torch.tensor([0, 1, 5, 11, 11], dtype=torch.int32)
    assert torch.autograd.gradcheck(lambda q, k, v: segment_attention(q, k, v, cu, True), (q, k, v))


def test_each_block_is_built_from_its_spec():
    """Every per-layer choice is the plan's: the blocks the model builds follow block_specs, and a
    choice moved to another layer in the config moves in the model."""
    cfg = ModelConfig(**BASE, xsa_last_n=2, ve_layers=[1, 3], ve_dim=8, inhibitor_blocks=[2], inhibitor_rank=4,
                      ln_scale=True, parallel_start_layer=3)
    specs = block_specs(cfg)
    assert [s.xsa for s in specs] == [False, False, True, True]
    assert [s.value_embedding for s in specs] == [False, True, False, True]
    assert [s.inhibitor for s in specs] == [False, False, True, False]
    assert [round(s.norm_scale, 4) for s in specs] == [1.0, 0.7071, 0.5774, 0.5]
    model = GPT(cfg)
    for spec, block in zip(specs, model.blocks):
        assert block.attn.xsa == spec.xsa and (block.ve_scale is not None) == spec.value_embedding
        assert (block.attn_inhibitor is not None) == spec.inhibitor and block.norm_scale == spec.norm_scale
        assert hasattr(block, "parallel_resid_lambdas") == spec.lane_weights
    moved = GPT(ModelConfig(**{**BASE, "inhibitor_blocks": [0]}))
    assert [b.attn_inhibitor is not None for b in moved.blocks] == [True, False, False, False]


def test_each_technique_switch_has_its_own_lineage_line():
    """An exported README lists the switched techniques in the order their config fields give (lineage())."""
    import dataclasses

    places = [f.metadata["lineage"][0] for f in dataclasses.fields(ModelConfig) if "lineage" in f.metadata]
    assert places and len(places) == len(set(places)), sorted(places)
