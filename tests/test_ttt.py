"""Score-first LoRA TTT: the four conditions, checked by the run's own audit and from outside."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pgolf.evaluate.bpb import evaluate_bpb
from pgolf.evaluate.audit import Audit
from pgolf.evaluate.config import TTTSettings
from pgolf.evaluate.lora_ttt import evaluate_ttt, find_documents
from pgolf.model.config import ModelConfig
from pgolf.model.gpt import GPT
from tests.conftest import TINY_MODEL

CPU = torch.device("cpu")


def stream(seed=0, n=400):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(4, 400, n)
    tokens[[i for i in (0, 37, 90, 91, 200, 333) if i < n]] = 1  # documents of many lengths, one of them empty
    return tokens


def model():
    torch.manual_seed(0)
    m = GPT(ModelConfig(**TINY_MODEL))
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m


SETTINGS = TTTSettings(rank=4, alpha=4.0, lr=1e-2, chunk=8, context=32, batch_docs=3)


def test_documents_cover_every_target_once():
    tokens = stream()
    docs = find_documents(tokens, 1)
    covered = np.zeros(len(tokens), dtype=int)
    for start, end in docs:
        assert tokens[start] == 1
        covered[start + 1:end] += 1
    assert covered[0] == 0 and (covered[1:] == 1).all()


def test_ttt_scores_everything_once_and_passes_its_audit():
    tokens = stream()
    byte_counts = np.arange(len(tokens)) % 5
    result, audit, nll = evaluate_ttt(model(), tokens, byte_counts, SETTINGS, CPU, 1)
    assert audit["passed"], audit["violations"]
    assert result.tokens == len(tokens) - 1 == audit["scored_targets"] and audit["train_steps"] > 0
    assert result.bytes == byte_counts[1:].sum()
    assert not np.isnan(nll[1:]).any()


def repeating_document(seed=3, period=24, repeats=20):
    """One document that repeats a pattern the untrained model has not learned: adapting to what
    has been scored must lower the loss on the rest."""
    rng = np.random.default_rng(seed)
    return np.concatenate([[1], np.tile(rng.integers(4, 400, period), repeats)])


def test_ttt_learns_and_lr_zero_is_the_base_model():
    repeated = repeating_document()
    ones = np.ones(len(repeated), dtype=np.int64)
    flat = evaluate_bpb(model(), repeated, ones, SETTINGS.context, 0, 4, CPU)
    frozen, _, _ = evaluate_ttt(model(), repeated, ones, TTTSettings(**{**SETTINGS.__dict__, "lr": 0.0}), CPU, 1)
    adapted, _, _ = evaluate_ttt(model(), repeated, ones, TTTSettings(**{**SETTINGS.__dict__, "lr": 1e-2}), CPU, 1)
    assert flat.tokens == adapted.tokens
    # measured: flat 6.06 nats, lr 0 6.07, adapted 3.28
    assert adapted.val_loss < flat.val_loss - 1.0 and adapted.val_loss < frozen.val_loss - 1.0
    tokens = stream()
    byte_counts = np.ones(len(tokens), dtype=np.int64)
    frozen_settings = TTTSettings(**{**SETTINGS.__dict__, "lr": 0.0, "context": 512})
    base, _, base_nll = evaluate_ttt(model(), tokens, byte_counts, frozen_settings, CPU, 1)
    # with lr 0 every score is the frozen model's on the document alone (context covers each one)
    m = model()
    for start, end in find_documents(tokens, 1):
        doc = torch.from_numpy(tokens[start:end].astype(np.int64))[None]
        logits = m.forward_logits(doc[:, :-1])
        expected = torch.nn.functional.cross_entropy(logits[0], doc[0, 1:], reduction="none")
        assert np.allclose(base_nll[start + 1:end], expected.detach().numpy(), atol=1e-5)


@pytest.mark.parametrize("cut", [50, 95, 250])
def test_causal_future_tokens_do_not_change_earlier_scores(cut):
    """Perturb every token after position `cut` (documents and lengths kept): every score up to it,
    in this document and in the other documents of its batch, stays the same."""
    tokens = stream(seed=1)
    changed = tokens.copy()
    later = np.arange(len(tokens)) > cut
    keep = tokens == 1
    changed[later & ~keep] = (tokens[later & ~keep] + 7) % 396 + 4
    byte_counts = np.ones(len(tokens), dtype=np.int64)
    _, _, a = evaluate_ttt(model(), tokens, byte_counts, SETTINGS, CPU, 1)
    _, _, b = evaluate_ttt(model(), changed, byte_counts, SETTINGS, CPU, 1)
    assert np.allclose(a[1:cut + 1], b[1:cut + 1], atol=1e-6)
    assert not np.allclose(a[cut + 2:], b[cut + 2:])


def test_audit_catches_training_before_scoring_and_double_scoring():
    audit = Audit(num_targets=10)
    audit.scored(0, 1, 6)
    audit.trained(0, 1, 6)
    audit.trained(0, 6, 11)  # not scored yet, and the document's last chunk
    audit.scored(0, 6, 11)
    audit.scored(0, 3, 4)
    result = audit.check({0: 11})
    assert not result["passed"]
    text = " ".join(result["violations"])
    assert "before scoring" in text and "last chunk" in text and "scored 2 times" in text


def test_flat_and_ttt_count_the_same_tokens_and_bytes():
    tokens = stream()[:257]
    byte_counts = np.arange(len(tokens)) % 3
    flat = evaluate_bpb(model(), tokens, byte_counts, 64, 0, 4, CPU)
    ttt, _, _ = evaluate_ttt(model(), tokens, byte_counts, SETTINGS, CPU, 1)
    assert (flat.tokens, flat.bytes) == (ttt.tokens, ttt.bytes)


def test_phased_global_sgd_trains_only_on_scored_documents():
    from pgolf.evaluate.lora_ttt import phase_boundaries

    assert phase_boundaries(2500, 3) == [833, 1666, 2500] and phase_boundaries(2000, 3) == [666, 1333, 2000]
    tokens = stream(seed=2, n=600)
    tokens[[120, 160, 410, 470]] = 1
    byte_counts = np.ones(len(tokens), dtype=np.int64)
    phased = TTTSettings(**{**SETTINGS.__dict__, "batch_docs": 2, "phases": 2, "prefix_docs": 4,
                            "global_lr": 0.05, "global_chunk_tokens": 64, "global_seq_len": 16, "global_batch_seqs": 2})
    result, audit, nll = evaluate_ttt(model(), tokens, byte_counts, phased, CPU, 1)
    assert audit["passed"], audit["violations"]
    assert len(audit["global_sgd_chunks"]) == 2 and all(n > 0 for n in audit["global_sgd_chunks"])
    assert result.tokens == len(tokens) - 1
    _, _, plain = evaluate_ttt(model(), tokens, byte_counts, SETTINGS.__class__(**{**phased.__dict__, "phases": 0}), CPU, 1)
    # the first batch (scored before any phase) is untouched; documents scored after a phase are not
    docs = find_documents(tokens, 1)
    order = sorted(range(len(docs)), key=lambda i: (docs[i][1] - docs[i][0], i))
    first = order[-2:]  # the longest batch of two goes first
    for d in first:
        s, e = docs[d]
        assert np.allclose(nll[s + 1:e], plain[s + 1:e])
    later = [d for d in range(len(docs)) if d not in first and docs[d][1] - docs[d][0] > 2]
    assert any(not np.allclose(nll[docs[d][0] + 1:docs[d][1]], plain[docs[d][0] + 1:docs[d][1]]) for d in later)


def test_phased_global_sgd_carries_what_earlier_documents_taught_to_later_ones():
    """Per-document LoRA starts afresh on every document; the global SGD phases train the base model
    on the documents scored so far, so documents sharing a pattern score better after a phase."""
    pattern = np.random.default_rng(6).integers(4, 400, 20)
    docs = [np.concatenate([[1], np.tile(pattern, 2)[:20 + k]]) for k in range(20)]
    tokens = np.concatenate(docs + [[1]])
    ones = np.ones(len(tokens), dtype=np.int64)
    phased = TTTSettings(**{**SETTINGS.__dict__, "batch_docs": 2, "phases": 2, "prefix_docs": 8,
                            "global_lr": 0.05, "global_chunk_tokens": 64, "global_seq_len": 16, "global_batch_seqs": 2})
    with_phases, audit, _ = evaluate_ttt(model(), tokens, ones, phased, CPU, 1)
    lora_only, _, _ = evaluate_ttt(model(), tokens, ones, TTTSettings(**{**phased.__dict__, "phases": 0}), CPU, 1)
    assert audit["passed"] and len(audit["phases"]) == 2, audit
    flat = evaluate_bpb(model(), tokens, ones, 61, 0, 4, CPU)  # 61 divides the 610 targets
    assert with_phases.tokens == lora_only.tokens == flat.tokens
    # measured: flat 5.88 nats, LoRA alone 5.86, with the phases 5.56
    assert with_phases.val_loss < lora_only.val_loss - 0.15 and with_phases.val_loss < flat.val_loss - 0.15


# --- score-first chunked SGD TTT (R0409 full-weight, PR #1383 FiLM-only) and the time budget ---

from pgolf.errors import PgolfError  # noqa: E402
from pgolf.evaluate.budget import Budget  # noqa: E402
from pgolf.evaluate.config import SGDTTTSettings  # noqa: E402
from pgolf.evaluate.sgd_ttt import evaluate_sgd_ttt  # noqa: E402

SGD = SGDTTTSettings(lr=0.05, epochs=2, chunk_tokens=64, batch_seqs=2)


def film_model():
    torch.manual_seed(0)
    m = GPT(ModelConfig(**{**TINY_MODEL, "num_layers": 3}, block_map=[0, 1, 1, 2], film=True))
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m


def test_sgd_ttt_with_lr_zero_is_the_sliding_eval_and_passes_its_audit():
    tokens = stream(n=300)
    byte_counts = np.arange(len(tokens)) % 4
    sliding = evaluate_bpb(model(), tokens, byte_counts, 32, 8, 4, CPU)
    frozen, audit, _ = evaluate_sgd_ttt(model(), tokens, byte_counts, 32, 8, 4,
                                        SGDTTTSettings(**{**SGD.__dict__, "lr": 0.0}), CPU)
    assert frozen.loss_sum == pytest.approx(sliding.loss_sum, rel=1e-12)
    assert (frozen.tokens, frozen.bytes) == (sliding.tokens, sliding.bytes)
    trained, audit, _ = evaluate_sgd_ttt(model(), tokens, byte_counts, 32, 8, 4, SGD, CPU)
    assert audit["passed"], audit["violations"]
    assert audit["chunks"] == 5 and audit["chunks_trained"] == 4 and audit["sgd_steps"] == 4 * 2
    assert (trained.tokens, trained.bytes) == (sliding.tokens, sliding.bytes)
    assert trained.loss_sum != pytest.approx(sliding.loss_sum, rel=1e-6)


def test_sgd_ttt_learns_a_stream_that_repeats_itself():
    repeated = repeating_document()
    ones = np.ones(len(repeated), dtype=np.int64)
    flat = evaluate_bpb(model(), repeated, ones, 32, 0, 4, CPU)
    sliding = evaluate_bpb(model(), repeated, ones, 32, 8, 4, CPU)
    trained, audit, _ = evaluate_sgd_ttt(model(), repeated, ones, 32, 8, 4, SGD, CPU)
    assert audit["passed"] and audit["chunks_trained"] > 0
    assert trained.tokens == sliding.tokens == flat.tokens
    # measured: flat 6.06 nats, sliding 6.07, trained 4.98
    assert trained.val_loss < min(flat.val_loss, sliding.val_loss) - 0.5


@pytest.mark.parametrize("cut", [40, 150])
def test_sgd_ttt_is_causal(cut):
    """Training on chunk c changes only the scores of later chunks, and only with scored tokens:
    perturbing every token after `cut` leaves every score up to it unchanged."""
    tokens = stream(seed=4, n=300)
    changed = tokens.copy()
    changed[cut + 1:] = (tokens[cut + 1:] + 11) % 396 + 4
    ones = np.ones(len(tokens), dtype=np.int64)
    _, _, a = evaluate_sgd_ttt(model(), tokens, ones, 32, 8, 4, SGD, CPU)
    _, _, b = evaluate_sgd_ttt(model(), changed, ones, 32, 8, 4, SGD, CPU)
    assert np.allclose(a[1:cut + 1], b[1:cut + 1], atol=1e-6)
    assert not np.allclose(a[cut + 2:], b[cut + 2:])


def test_film_only_sgd_ttt_trains_only_film_and_learns():
    rng = np.random.default_rng(5)
    repeated = np.concatenate([[1], np.tile(rng.integers(4, 400, 16), 24)])
    ones = np.ones(len(repeated), dtype=np.int64)
    m = film_model()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    film = SGDTTTSettings(**{**SGD.__dict__, "trainable": "film", "lr": 0.5, "epochs": 3})
    adapted, audit, _ = evaluate_sgd_ttt(m, repeated, ones, 32, 16, 4, film, CPU)
    changed = {k for k, v in m.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"film.film_gamma", "film.film_beta"}
    assert audit["trainable_params"] == 2 * 2 * 32 and audit["passed"]
    frozen, _, _ = evaluate_sgd_ttt(film_model(), repeated, ones, 32, 16, 4,
                                    SGDTTTSettings(**{**film.__dict__, "lr": 0.0}), CPU)
    assert adapted.val_loss < frozen.val_loss - 0.03  # measured 5.96 against 6.03, from 128 parameters
    with pytest.raises(PgolfError, match="no FiLM parameters"):
        evaluate_sgd_ttt(model(), repeated, ones, 32, 16, 4, film, CPU)


def test_budget_skips_training_but_never_scoring():
    tokens = stream(seed=2, n=600)
    tokens[[120, 160, 410, 470]] = 1
    ones = np.ones(len(tokens), dtype=np.int64)
    phased = TTTSettings(**{**SETTINGS.__dict__, "batch_docs": 2, "phases": 2, "prefix_docs": 4,
                            "global_lr": 0.05, "global_chunk_tokens": 64, "global_seq_len": 16, "global_batch_seqs": 2})
    no_phases = TTTSettings(**{**phased.__dict__, "phases": 0})
    spent = Budget(1e-9)  # already over: every phase would overrun it
    skipped, summary, _ = evaluate_ttt(model(), tokens, ones, phased, CPU, 1, spent)
    plain, _, _ = evaluate_ttt(model(), tokens, ones, no_phases, CPU, 1)
    assert summary["phases"] == [] and summary["phases_skipped_at"] == [2, 4] and summary["passed"]
    assert skipped.loss_sum == pytest.approx(plain.loss_sum, rel=1e-12) and skipped.tokens == len(tokens) - 1
    roomy, summary, _ = evaluate_ttt(model(), tokens, ones, phased, CPU, 1, Budget(3600.0))
    assert [p["boundary"] for p in summary["phases"]] == [2, 4] and summary["phases_skipped_at"] == []
    sgd_skipped, summary, _ = evaluate_sgd_ttt(model(), tokens, ones, 32, 8, 4, SGD, CPU, Budget(1e-9))
    sliding = evaluate_bpb(model(), tokens, ones, 32, 8, 4, CPU)
    assert summary["chunks_trained"] == 0 and summary["training_skipped_from_chunk"] == 0
    assert sgd_skipped.loss_sum == pytest.approx(sliding.loss_sum, rel=1e-12)
