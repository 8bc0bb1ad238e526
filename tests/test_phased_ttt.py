"""Phased TTT's global SGD as R1 runs it: which documents, which text, when, in which rows."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from pgolf.evaluate import lora_ttt
from pgolf.evaluate.config import TTTSettings
from pgolf.evaluate.lora_ttt import evaluate_ttt, find_documents, global_sgd
from pgolf.model.config import ModelConfig
from pgolf.model.gpt import GPT
from tests.conftest import TINY_MODEL

CPU = torch.device("cpu")
SETTINGS = TTTSettings(rank=2, alpha=2.0, lr=1e-2, chunk=8, context=32, batch_docs=2, phases=2, prefix_docs=4,
                       global_lr=0.05, global_chunk_tokens=64, global_seq_len=16, global_batch_seqs=2)


def documents(lengths: list[int], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.concatenate([np.concatenate([[1], rng.integers(4, 400, n)]) for n in lengths])


def model(**changes) -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(**{**TINY_MODEL, **changes}))


@pytest.fixture
def sgd_calls(monkeypatch):
    calls = []

    def record(model, tokens, settings, device):
        calls.append(np.asarray(tokens).copy())
        return 1

    monkeypatch.setattr(lora_ttt, "global_sgd", record)
    return calls


def test_each_phase_trains_on_the_shortest_scored_documents_with_their_next_bos(sgd_calls):
    lengths = [30, 5, 60, 12, 45, 8, 20, 70]
    tokens = documents(lengths)
    docs = find_documents(tokens, 1)
    evaluate_ttt(model(), tokens, np.ones(len(tokens), dtype=np.int64), SETTINGS, CPU, 1)
    # batches of two, longest first: (70, 60), (45, 30), (20, 12), (8, 5); boundaries 2 and 4
    assert len(sgd_calls) == 2
    by_length = {lengths[i]: docs[i] for i in range(len(lengths))}
    first = np.concatenate([tokens[by_length[n][0]:by_length[n][1]] for n in (60, 70)])
    second = np.concatenate([tokens[by_length[n][0]:by_length[n][1]] for n in (30, 45, 60, 70)])
    assert np.array_equal(sgd_calls[0], first) and np.array_equal(sgd_calls[1], second)
    assert sum(np.diff(np.flatnonzero(sgd_calls[1] == 1)) == 1) == 3  # BOS BOS at each of the three joins


def test_one_phase_per_finished_batch(sgd_calls):
    tokens = documents([30, 5, 60, 12, 45, 8, 20, 70])
    settings = dataclasses.replace(SETTINGS, batch_docs=4, phases=4, prefix_docs=4)  # boundaries 1, 2, 3, 4
    _, summary, _ = evaluate_ttt(model(), tokens, np.ones(len(tokens), dtype=np.int64), settings, CPU, 1)
    # the first batch of four passes all four boundaries; one phase runs after it, one after the
    # second (last) batch would run only if a batch followed
    assert [p["boundary"] for p in summary["phases"]] == [1] and len(sgd_calls) == 1
    assert len(sgd_calls[0]) == 30 + 2  # the shortest of the four scored: 30 tokens, its BOS and the next BOS


def test_global_sgd_rows_are_one_flat_row_per_batch_with_document_attention(monkeypatch):
    seen = []
    original = GPT.forward

    def spy(self, input_ids, targets, *args, **kwargs):
        seen.append(tuple(input_ids.shape))
        return original(self, input_ids, targets, *args, **kwargs)

    monkeypatch.setattr(GPT, "forward", spy)
    tokens = documents([40, 90, 25, 70, 33])
    global_sgd(model(doc_attention=True, doc_attention_max_len=16), tokens, SETTINGS, CPU)
    assert seen and set(seen) == {(1, 32)}  # 64-token chunks: two batches of two 16-token sequences
    seen.clear()
    global_sgd(model(), tokens, SETTINGS, CPU)
    assert set(seen) == {(2, 16)}
