"""The token n-gram tilt at eval (PR #1145 -> PR #2130 -> PR #2135, docs/lineage.md#ngram-tilt).

Hints: an online n-gram count over the val stream, left to right, proposes for each target the token
that most often followed the same previous `order - 1` tokens earlier in the stream, with its
frequency p among those continuations; the hint is used where p >= threshold. Scoring: the model's
distribution is tilted towards the hint and renormalized, p'(a) = p(a) e^{beta [a = h]} / Z with
Z = 1 + q (e^beta - 1), q = p(h), so the scored loss is

    -log p'(y) = -log p(y) - beta [y = h] + log1p(q (e^beta - 1))   where hinted, else -log p(y).

The hints equal those of PR #2135's own online_ngram_state.c (its token channel; the word and
within-word channels it runs with their gates off are not computed) position for position: the same
64-bit context key (an XOR of token x coefficient over the context, its constants), the same
"first to reach the highest count" winner, its float32 p, and its quirk of seeding the context with
the first target, so the first context that counts repeats that token (bench/pr2135_parity.py, row
tilt). The PR walks a hash table token by token in C; here the whole stream is done at once with
sorts (numpy), faster on one core than its C code on the same stream (the bench's tilt row) and
nothing to compile: the bundled train_gpt.py and a machine without a compiler run it as it is.

Online, restated for sorting: the state before target i holds every (context, next token) pair of
the targets before i. Grouping the targets by context key (a stable order: by key, then position),
target i's hint is the winner over the earlier members of its group, and its p that winner's count
over the number of earlier members. Counts of (context, token) come from a second grouping; the
winner after each member is the token whose count first reached the group's running maximum.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pgolf.evaluate.config import TILT_MAX_ORDER, TiltSettings


# PR #2135's ROLLING_COEFFS (online_ngram_state.c): the context key is XOR_j token_j * COEFFS[j], oldest
# token first. The key is what decides which contexts are "the same", so it must be the PR's.
COEFFS = np.array([36313, 27191, 51647, 81929, 131071, 196613, 262147, 393241, 524309, 655373, 786433, 917521,
                   1048583, 1179653, 1310729, 1441801, 1572869, 1703941, 1835017, 1966087, 2097169, 2228243,
                   2359319, 2490389, 2621471, 2752549, 2883617, 3014687, 3145757, 3276833, 3407903, 3538973],
                  dtype=np.uint64)
assert len(COEFFS) + 1 == TILT_MAX_ORDER, "eval.tilt.order validates against the key's length"
HASH_BLOCK = 1 << 18  # targets hashed per block: the block's arrays stay in cache across the context's terms


@dataclass(frozen=True)
class Hints:
    """Per stream position t (the target tokens[t]; position 0 is never a target): the hinted token
    and whether it is used."""
    token: np.ndarray  # int64, 0 where not gated
    gated: np.ndarray  # bool
    boost: float


def context_keys(targets: np.ndarray, context: int) -> np.ndarray:
    """The key of each target's context: targets[i - context .. i - 1], with the PR's seed (targets[0]
    once more in front); keys exist from target max(context - 1, 0) on, as the PR's ring fills."""
    first = max(context - 1, 0)
    count = len(targets) - first
    seeded = np.empty(len(targets) + 1, dtype=np.uint64)
    seeded[0] = targets[0] if len(targets) else 0
    seeded[1:] = targets
    keys = np.zeros(max(count, 0), dtype=np.uint64)
    term = np.empty(min(HASH_BLOCK, max(count, 0)), dtype=np.uint64)
    for lo in range(0, max(count, 0), HASH_BLOCK):
        hi = min(lo + HASH_BLOCK, count)
        out, scratch = keys[lo:hi], term[:hi - lo]
        for j in range(context):
            start = first + 1 - context + j + lo
            np.multiply(seeded[start:start + hi - lo], COEFFS[j], out=scratch)
            np.bitwise_xor(out, scratch, out=out)
    return keys


def _grouped(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(order, starts): the indices of `keys` sorted by key then index, and where each run of equal
    keys begins in that order. Key and index share one uint64 when they fit (a plain value sort, far
    faster than an argsort); else a stable argsort."""
    n = len(keys)
    index_bits = max(1, (n - 1).bit_length())
    key_bits = int(keys.max()).bit_length() if n else 0
    if key_bits + index_bits <= 64:
        packed = keys << np.uint64(index_bits)
        packed |= np.arange(n, dtype=np.uint64)
        packed.sort()
        order = (packed & np.uint64((1 << index_bits) - 1)).astype(np.int64)
        packed >>= np.uint64(index_bits)
        sorted_keys = packed
    else:
        order = np.argsort(keys, kind="stable")
        sorted_keys = keys[order]
    starts = np.empty(n, dtype=bool)
    starts[:1] = True
    np.not_equal(sorted_keys[1:], sorted_keys[:-1], out=starts[1:])
    return order, starts


def top_continuations(targets: np.ndarray, context: int) -> tuple[np.ndarray, np.ndarray]:
    """For each target, the PR's online state just before it: the most frequent continuation of its
    context so far (0 if the context is new) and its frequency p (float32; 0 if new)."""
    targets = np.asarray(targets)
    top_token = np.zeros(len(targets), dtype=np.int64)
    top_prob = np.zeros(len(targets), dtype=np.float32)
    first = max(context - 1, 0)
    keys = context_keys(targets, context)
    if len(keys) < 2:
        return top_token, top_prob
    order, starts = _grouped(keys)
    del keys
    # A context seen once has no earlier member: only groups of two or more matter.
    ends = np.empty_like(starts)
    ends[-1] = True
    ends[:-1] = starts[1:]
    members = np.flatnonzero(~(starts & ends))
    if len(members) == 0:
        return top_token, top_prob
    position = order[members]  # index into keys; target first + position
    new_group = starts[members]
    del order, starts, ends
    group = np.cumsum(new_group) - 1
    token = targets[first + position].astype(np.int64)
    n = len(members)
    at = np.arange(n, dtype=np.int64)
    # count of (context, token) up to and including each member: its rank among equal pairs, which a
    # stable argsort over (group, token) keeps in stream order (the input is already by group, then position)
    pair_order = np.argsort(group * (int(token.max()) + 1) + token, kind="stable")
    pair = group[pair_order] * (int(token.max()) + 1) + token[pair_order]
    pair_start = np.empty(n, dtype=bool)
    pair_start[0] = True
    np.not_equal(pair[1:], pair[:-1], out=pair_start[1:])
    count = np.empty(n, dtype=np.int64)
    count[pair_order] = at - np.maximum.accumulate(np.where(pair_start, at, 0)) + 1
    del pair, pair_order, pair_start
    # running maximum of the counts within each group (offset so it cannot cross a group), and the
    # member where it last rose: the PR replaces its winner only on a strictly higher count
    offset = group * (n + 1)
    best = np.maximum.accumulate(count + offset) - offset
    rose = new_group.copy()
    rose[1:] |= best[1:] > best[:-1]
    winner = token[np.maximum.accumulate(np.where(rose, at, 0))]
    group_start = np.maximum.accumulate(np.where(new_group, at, 0))
    later = np.flatnonzero(~new_group)  # members with an earlier member: the hinted ones
    where = first + position[later]
    top_token[where] = winner[later - 1]
    top_prob[where] = best[later - 1].astype(np.float32) / (later - group_start[later]).astype(np.float32)
    return top_token, top_prob


def token_hints(tokens: np.ndarray, settings: TiltSettings) -> Hints:
    """The hints for every target of the val stream `tokens` (the PR's target_token_ids = tokens[1:])."""
    top_token, top_prob = top_continuations(np.asarray(tokens[1:]), settings.order - 1)
    gated = np.zeros(len(tokens), dtype=bool)
    gated[1:] = top_prob >= np.float32(settings.threshold)
    token = np.zeros(len(tokens), dtype=np.int64)
    token[1:] = np.where(gated[1:], top_token, 0)
    return Hints(token, gated, settings.boost)


def tilt_nll(nll: torch.Tensor, log_q: torch.Tensor, target: torch.Tensor, hint: torch.Tensor,
             gated: torch.Tensor, boost: float) -> torch.Tensor:
    """The tilted loss of each scored target, in float32 as PR #2135 computes it
    (apply_tilt_to_ptl_torch_fast); `log_q`: the model's log-probability of the hint."""
    beta = torch.tensor(boost, dtype=torch.float32, device=nll.device)
    q = log_q.float().clamp(max=0.0).exp()
    hit = (target == hint).float()
    log_z = torch.log1p(q * torch.expm1(beta))
    nll = nll.float()
    return torch.where(gated, nll - beta * hit + log_z, nll)


def score_tilted(logits: torch.Tensor, target: torch.Tensor, hint: torch.Tensor, gated: torch.Tensor,
                 boost: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(untilted NLL, tilted NLL) of `target` under `logits` [..., V] (float32), both as the PR reads
    them from one log-softmax; the untilted one keeps the graph (TTT trains on it)."""
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    nll = -log_probs.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    log_q = log_probs.detach().gather(-1, hint.unsqueeze(-1)).squeeze(-1)
    return nll, tilt_nll(nll.detach(), log_q, target, hint, gated, boost)


# --- the compliance audit (docs/lineage.md#compliance) -------------------------------------------

AUDIT_WINDOW = 1 << 20  # tokens re-hinted for the causality check
MASS_TOLERANCE = 1e-4  # |sum_a p'(a) - 1|: float32 losses summed in float64 over the vocabulary
LOG_TOLERANCE = 1e-3  # log p'(a) - log p(a) against its closed form


class TiltScorer:
    """The tilted score of each target (a pgolf.evaluate.bpb.Scorer); keeps rows for the audit."""

    def __init__(self, hints: Hints, sampler: ScoreSampler | None = None):
        self.token, self.gated = torch.from_numpy(hints.token), torch.from_numpy(hints.gated)
        self.boost, self.sampler = hints.boost, sampler

    def __call__(self, logits: torch.Tensor, target: torch.Tensor, position: torch.Tensor, scored: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        where = position.cpu()
        hint, gated = self.token[where].to(logits.device), self.gated[where].to(logits.device) & scored
        nll, tilted = score_tilted(logits, target, hint, gated, self.boost)
        if self.sampler is not None:
            self.sampler.offer(logits, target, hint, gated, scored)
        return nll, tilted


def audit_causal(tokens: np.ndarray, settings: TiltSettings, hints: Hints) -> dict:
    """Changing the tokens after position t leaves every hint up to t + 1 (so every tilted score up to
    t, whose target is at most t) as it was: hints recomputed from tokens[:t + 1] alone, and from a
    stream whose tokens after t are replaced, must equal the run's hints there, bit for bit."""
    window = min(len(tokens), AUDIT_WINDOW)
    cut = window // 2
    prefix = token_hints(tokens[:cut + 1], settings)
    suffix = np.asarray(tokens[cut + 1:window])[::-1].copy()
    if np.array_equal(suffix, tokens[cut + 1:window]):
        suffix += 1
    changed = np.concatenate([tokens[:cut + 1], suffix])
    perturbed = token_hints(changed, settings)
    through = min(cut + 2, window)

    def same(other: Hints, upto: int) -> bool:
        return bool(np.array_equal(other.token[:upto], hints.token[:upto])
                    and np.array_equal(other.gated[:upto], hints.gated[:upto]))

    return {"cut": cut, "prefix_equal": same(prefix, cut + 1), "changed_suffix_equal": same(perturbed, through)}


def audit_scores(samples: list[tuple[torch.Tensor, int, int, bool]], boost: float) -> dict:
    """Each sampled position's tilted distribution, read from the scoring function itself: every
    vocabulary entry a taken as the target, exp(-tilted NLL(a)) must sum to 1 (renormalized), and
    log p'(a) - log p(a) must be the same for every a but the hint, which gets beta more (the boost
    lands on the hint and nowhere else); an unhinted position must score exactly the untilted NLL.
    Where no sampled position was hinted, the unhinted ones are also checked as if hinted with token 0:
    the scoring function is checked all the same."""
    worst_mass = worst_shift = 0.0
    exact_unhinted = True
    hinted = sum(1 for s in samples if s[3])
    stand_ins = [(log_probs, target, 0, True) for log_probs, target, _, gated in samples if not gated] \
        if not hinted else []
    for log_probs, target, hint, gated in list(samples) + stand_ins:
        vocab = log_probs.numel()
        every = torch.arange(vocab)
        nll = -log_probs.float()
        tilted = tilt_nll(nll, log_probs[hint].expand(vocab), every, torch.full((vocab,), hint),
                          torch.full((vocab,), gated), boost)
        if not gated:
            exact_unhinted &= bool(torch.equal(tilted, nll))
            continue
        worst_mass = max(worst_mass, abs(float(torch.exp(-tilted.double()).sum()) - 1.0))
        shift = (nll - tilted).double()  # log p'(a) - log p(a)
        expected = torch.full((vocab,), -float(torch.log1p(torch.exp(log_probs[hint].double()) * np.expm1(boost))),
                              dtype=torch.float64)
        expected[hint] += boost
        worst_shift = max(worst_shift, float((shift - expected).abs().max()))
    return {"positions": len(samples), "hinted": hinted, "normalized": worst_mass <= MASS_TOLERANCE,
            "max_mass_error": worst_mass, "boost_on_hint_only": worst_shift <= LOG_TOLERANCE and exact_unhinted}


class ScoreSampler:
    """Keeps the log-softmax rows of the first `size` hinted and `size // 4` unhinted positions this
    rank scores, for audit_scores."""

    def __init__(self, size: int = 32):
        self.size, self.samples = size, []
        self.hinted = self.unhinted = 0

    def offer(self, logits: torch.Tensor, target: torch.Tensor, hint: torch.Tensor, gated: torch.Tensor,
              scored: torch.Tensor) -> None:
        """Rows of `logits` [N, V] with their target, hint, gate and whether the position is scored."""
        if self.hinted >= self.size and self.unhinted >= self.size // 4:
            return
        for want_gated in (True, False):
            room = (self.size if want_gated else self.size // 4) - (self.hinted if want_gated else self.unhinted)
            if room <= 0:
                continue
            rows = torch.nonzero(scored & (gated == want_gated)).flatten()[:room]
            if len(rows) == 0:
                continue
            log_probs = torch.log_softmax(logits[rows].detach().float(), dim=-1).cpu()
            for k, r in enumerate(rows.tolist()):
                self.samples.append((log_probs[k], int(target[r]), int(hint[r]), want_gated))
            if want_gated:
                self.hinted += len(rows)
            else:
                self.unhinted += len(rows)


def audit(tokens: np.ndarray, settings: TiltSettings, hints: Hints, sampler: ScoreSampler) -> dict:
    """The tilt's part of metrics.json: what it hinted and whether its conditions held."""
    causal = audit_causal(tokens, settings, hints)
    scores = audit_scores(sampler.samples, settings.boost)
    passed = causal["prefix_equal"] and causal["changed_suffix_equal"] and scores["normalized"] \
        and scores["boost_on_hint_only"] and scores["positions"] > 0
    return {"passed": bool(passed), "order": settings.order, "threshold": settings.threshold,
            "boost": settings.boost, "hinted_targets": int(hints.gated.sum()), "causal": causal, "scores": scores}
