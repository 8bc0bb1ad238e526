"""The token n-gram tilt (PR #2135): its hints, its tilted scores, and the audit that checks both.

The hints are compared with a token-by-token online count written from PR #2135's description
(online_ngram_state.c's token channel: the same context key, the winner replaced only on a strictly
higher count, float32 frequencies); bench/pr2135_parity.py compares them with the PR's own C code.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pgolf.evaluate import ngram_tilt as tilt
from pgolf.evaluate.config import TiltSettings
from pgolf.evaluate.ngram_tilt import (COEFFS, Hints, ScoreSampler, TiltScorer, audit_causal,
                                       audit_scores, tilt_nll, token_hints, top_continuations)

SETTINGS = TiltSettings(order=4, threshold=0.5, boost=2.625)


def online_reference(targets, context: int):
    """The PR's state machine, one target at a time, with Python dicts for its hash tables."""
    mask = (1 << 64) - 1
    ring = [int(targets[0])]  # the PR seeds its context with the first target
    table, pairs = {}, {}
    top_token = np.zeros(len(targets), dtype=np.int64)
    top_prob = np.zeros(len(targets), dtype=np.float32)
    for i, tok in enumerate(int(t) for t in targets):
        if len(ring) >= context:
            key = 0
            for j, t in enumerate(ring[len(ring) - context:] if context else []):
                key ^= (t * int(COEFFS[j])) & mask
            entry = table.get(key)
            if entry is not None:
                top_token[i] = entry["tok"]
                top_prob[i] = np.float32(entry["top"]) / np.float32(entry["total"])
            pairs[key, tok] = pairs.get((key, tok), 0) + 1
            if entry is None:
                table[key] = {"total": 1, "top": pairs[key, tok], "tok": tok}
            else:
                entry["total"] += 1
                if pairs[key, tok] > entry["top"]:
                    entry["top"], entry["tok"] = pairs[key, tok], tok
        ring.append(tok)
    return top_token, top_prob


def repetitive_stream(n=3000, vocab=50, seed=0):
    """Documents that quote each other: many contexts recur, with one or several continuations."""
    rng = np.random.default_rng(seed)
    phrases = [rng.integers(2, vocab, rng.integers(6, 30)) for _ in range(12)]
    out = [1]
    while len(out) < n:
        if rng.random() < 0.1:
            out.append(1)
        out.extend(phrases[rng.integers(0, len(phrases))] if rng.random() < 0.7 else rng.integers(2, vocab, 5))
    return np.array(out[:n], dtype=np.int64)


@pytest.mark.parametrize("order", [1, 2, 4, 16])
def test_hints_equal_the_online_count_position_for_position(order):
    targets = repetitive_stream()[1:]
    ours = top_continuations(targets, order - 1)
    ref = online_reference(targets, order - 1)
    assert np.array_equal(ours[0], ref[0]) and np.array_equal(ours[1], ref[1])
    assert (ref[1] >= 0.5).sum() > (100 if order > 1 else 0)  # the stream does exercise the gate (not a unigram's)


def test_hints_cover_the_stream_and_gate_at_the_threshold():
    tokens = repetitive_stream()
    hints = token_hints(tokens, SETTINGS)
    top, prob = online_reference(tokens[1:], SETTINGS.order - 1)
    assert hints.gated[0] == False and len(hints.token) == len(tokens)  # noqa: E712 position 0 is no target
    assert np.array_equal(hints.gated[1:], prob >= np.float32(0.5))
    assert np.array_equal(hints.token[1:], np.where(prob >= np.float32(0.5), top, 0))


def test_a_hint_reads_only_the_tokens_before_its_target():
    tokens = repetitive_stream()
    full = token_hints(tokens, SETTINGS)
    for cut in (200, 1500, 2998):
        changed = tokens.copy()
        changed[cut + 1:] = changed[cut + 1:][::-1] + 1
        other = token_hints(changed, SETTINGS)
        assert np.array_equal(other.token[:cut + 2], full.token[:cut + 2])
        assert np.array_equal(other.gated[:cut + 2], full.gated[:cut + 2])
    assert audit_causal(tokens, SETTINGS, full) == {"cut": 1500, "prefix_equal": True, "changed_suffix_equal": True}


def test_the_causal_audit_catches_a_hint_that_reads_its_target(monkeypatch):
    tokens = repetitive_stream()
    real = tilt.top_continuations

    def peeking(targets, context):  # the target itself proposed wherever the honest count proposes
        top, prob = real(targets, context)
        return np.where(prob > 0, targets, top), prob

    monkeypatch.setattr(tilt, "top_continuations", peeking)
    leaky = token_hints(tokens, SETTINGS)
    assert audit_causal(tokens, SETTINGS, leaky)["changed_suffix_equal"] is False


def test_the_causal_audit_catches_counts_taken_over_the_whole_stream(monkeypatch):
    tokens = repetitive_stream()
    real = tilt.top_continuations

    def offline(targets, context):  # each position sees the counts of the whole stream
        top, prob = real(targets, context)
        last = {}
        for i in range(len(targets)):
            last[tuple(targets[max(0, i - context):i])] = (top[i], prob[i])
        keys = [tuple(targets[max(0, i - context):i]) for i in range(len(targets))]
        return np.array([last[k][0] for k in keys]), np.array([last[k][1] for k in keys], dtype=np.float32)

    monkeypatch.setattr(tilt, "top_continuations", offline)
    cheat = token_hints(tokens, SETTINGS)
    assert audit_causal(tokens, SETTINGS, cheat)["prefix_equal"] is False


def test_the_tilted_loss_is_the_nll_of_the_renormalized_tilted_softmax():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 40, generator=g) * 3
    target = torch.randint(0, 40, (64,), generator=g)
    hint = torch.where(torch.rand(64, generator=g) < 0.5, target, torch.randint(0, 40, (64,), generator=g))
    gated = torch.rand(64, generator=g) < 0.7
    nll, tilted = tilt.score_tilted(logits, target, hint, gated, 2.625)
    boosted = logits + 2.625 * F.one_hot(hint, 40) * gated[:, None]
    explicit = F.cross_entropy(boosted, target, reduction="none")
    torch.testing.assert_close(tilted, explicit, rtol=0, atol=2e-5)
    torch.testing.assert_close(nll, F.cross_entropy(logits, target, reduction="none"), rtol=0, atol=1e-6)
    assert torch.equal(tilted[~gated], nll[~gated])  # unhinted targets keep their loss, bit for bit


def tilted_distribution(log_probs: torch.Tensor, hint: int, gated: bool = True) -> torch.Tensor:
    """exp(-tilted NLL) of every vocabulary entry taken as the target: the tilted distribution."""
    vocab = log_probs.numel()
    return torch.exp(-tilt_nll(-log_probs, log_probs[hint].expand(vocab), torch.arange(vocab),
                               torch.full((vocab,), hint), torch.full((vocab,), gated), 2.625).double())


def test_each_tilted_distribution_sums_to_one_and_boosts_only_the_hint():
    """Fails if the renormalization (log Z) is dropped or the boost lands on another token than the hint."""
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        log_probs = torch.log_softmax(torch.randn(300, generator=g) * 4, dim=0)
        hint = int(torch.randint(0, 300, (1,), generator=g))
        p = tilted_distribution(log_probs, hint)
        assert abs(float(p.sum()) - 1) < 1e-5
        ratio = p / log_probs.double().exp()
        others = torch.cat([ratio[:hint], ratio[hint + 1:]])
        assert float(others.max() - others.min()) < 1e-5 * float(others.max())  # every other token alike
        assert float(ratio[hint] / others[0]) == pytest.approx(math.exp(2.625), rel=1e-5)
        assert torch.equal(tilted_distribution(log_probs, hint, gated=False), log_probs.double().exp())


def sampled_positions(n=24, vocab=300, seed=2):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, vocab, generator=g) * 4
    target = torch.randint(0, vocab, (n,), generator=g)
    hint = torch.randint(0, vocab, (n,), generator=g)
    gated = torch.arange(n) % 4 != 0
    sampler = ScoreSampler(size=16)
    sampler.offer(logits, target, hint, gated, torch.ones(n, dtype=torch.bool))
    return sampler


def test_the_score_audit_passes_the_real_tilt():
    audit = audit_scores(sampled_positions().samples, 2.625)
    assert audit["normalized"] and audit["boost_on_hint_only"]
    assert audit["positions"] == 20 and audit["hinted"] == 16 and audit["max_mass_error"] < 1e-6


@pytest.mark.parametrize("bug", ["no_renormalization", "boost_on_the_target", "boost_everywhere"])
def test_the_score_audit_catches_a_broken_tilt(bug, monkeypatch):
    real = tilt.tilt_nll

    def broken(nll, log_q, target, hint, gated, boost):
        if bug == "no_renormalization":
            return torch.where(gated, nll.float() - boost * (target == hint).float(), nll.float())
        if bug == "boost_on_the_target":  # the realized token gets the boost, hinted or not
            return real(nll, log_q, target, target, gated, boost)
        return real(nll, log_q, target, hint, torch.ones_like(gated), boost)  # unhinted positions tilted too

    monkeypatch.setattr(tilt, "tilt_nll", broken)
    audit = audit_scores(sampled_positions().samples, 2.625)
    assert not (audit["normalized"] and audit["boost_on_hint_only"]), audit


def test_the_scorer_tilts_only_gated_scored_positions():
    hints = Hints(token=np.array([0, 5, 6, 7, 8]), gated=np.array([False, True, False, True, True]), boost=2.625)
    scorer = TiltScorer(hints)
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 10, generator=g)
    target = torch.tensor([5, 5, 7, 1])
    nll, tilted = scorer(logits, target, torch.tensor([1, 2, 3, 4]), torch.tensor([True, True, True, False]))
    assert torch.equal(tilted[[1, 3]], nll[[1, 3]])  # position 2 is not gated, position 4 not scored
    assert tilted[0] < nll[0] and tilted[2] < nll[2]  # hits: the hinted target gets cheaper


def test_settings_are_range_checked():
    from pgolf.errors import ConfigError
    from pgolf.typed_params import from_dict
    for bad in ({"order": -1}, {"threshold": 1.5}, {"boost": -1.0}, {"order": 40}):
        with pytest.raises(ConfigError):
            from_dict(TiltSettings, bad, "eval.tilt")
    assert not TiltSettings().on and json.dumps(TiltSettings().__dict__)


def test_with_nothing_hinted_the_scoring_function_is_still_checked(monkeypatch):
    sampler = ScoreSampler(size=8)
    g = torch.Generator().manual_seed(4)
    sampler.offer(torch.randn(6, 50, generator=g), torch.arange(6), torch.zeros(6, dtype=torch.long),
                  torch.zeros(6, dtype=torch.bool), torch.ones(6, dtype=torch.bool))
    audit = audit_scores(sampler.samples, 2.625)
    assert audit["hinted"] == 0 and audit["normalized"] and audit["boost_on_hint_only"]
    monkeypatch.setattr(tilt, "tilt_nll", lambda nll, log_q, target, hint, gated, boost: torch.where(
        gated, nll.float() - boost * (target == hint).float(), nll.float()))
    assert not audit_scores(sampler.samples, 2.625)["normalized"]


GOLDEN_TILT = Path(__file__).parent / "golden" / "pr2135_tilt"


@pytest.mark.parametrize("entry", json.loads((GOLDEN_TILT / "pr_hints.json").read_text())["settings"],
                         ids=lambda e: e["file"])
def test_hints_equal_pr2135s_own_c_state_position_for_position(entry):
    """The hints PR #2135's build_hints_for_targets (online_ngram_state.c) gave on this stream, written by
    `bench/pr2135_parity.py --write-tilt-fixture` where its code is (bench/reference/, git-ignored)."""
    stream = np.fromfile(GOLDEN_TILT / "stream.u16", dtype="<u2").astype(np.int64)
    pr_hint = np.fromfile(GOLDEN_TILT / f"{entry['file']}.u16", dtype="<u2").astype(np.int64)
    pr_gate = np.unpackbits(np.fromfile(GOLDEN_TILT / f"{entry['file']}.gate.bits", dtype=np.uint8))[:len(stream) - 1]
    ours = token_hints(stream, TiltSettings(order=entry["order"], threshold=entry["threshold"], boost=2.625))
    assert int(pr_gate.sum()) == entry["hinted"] > len(stream) // 3  # the stream does hint, often
    assert np.array_equal(ours.gated[1:], pr_gate.astype(bool))
    assert np.array_equal(ours.token[1:], pr_hint)
