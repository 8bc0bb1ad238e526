"""Training loaders: the baseline's token stream and R1's document-packing loader."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pgolf.data.loader import DistributedTokenLoader, DocumentPackingLoader
from pgolf.data.shards import write_shard

CPU = torch.device("cpu")


@pytest.fixture
def shards(tmp_path):
    # shard 0 starts mid-document (tokens 100.. before the first BOS at index 3)
    write_shard(tmp_path / "fineweb_train_000000.bin", np.array([100, 101, 102] + [1, 5, 6, 7, 1, 8, 9] * 4))
    write_shard(tmp_path / "fineweb_train_000001.bin", np.array([200, 1] + list(range(10, 40))))
    return tmp_path


def test_stream_ranks_take_disjoint_slices_of_one_span(shards):
    loaders = [DistributedTokenLoader(shards, r, 2, CPU) for r in range(2)]
    (x0, y0), (x1, y1) = [ld.next_batch(8, 4, 1) for ld in loaders]
    assert x0.flatten().tolist() == [100, 101, 102, 1] and y0.flatten().tolist() == [101, 102, 1, 5]
    assert x1.flatten().tolist() == [6, 7, 1, 8]  # rank 1 starts right after rank 0's span of 5


def test_document_loader_starts_at_first_bos_and_skips_shard_tails(shards):
    loader = DocumentPackingLoader(shards, 0, 1, CPU)
    x, y = loader.next_batch(8, 4, 1)
    assert x[0, 0].item() == 1 and x.flatten().tolist() == [1, 5, 6, 7, 1, 8, 9, 1]
    assert y.flatten().tolist() == [5, 6, 7, 1, 8, 9, 1, 5]
    for _ in range(2):
        loader.next_batch(8, 4, 1)
    # 3 + 28 tokens in shard 0: after three spans of 9 only 1 is left, so the next span comes from
    # shard 1, from its first BOS (skipping 200)
    x, _ = loader.next_batch(8, 4, 1)
    assert loader.file_index == 1 and x.flatten().tolist()[:3] == [1, 10, 11]


def test_document_loader_resumes_from_a_saved_position(shards):
    a = DocumentPackingLoader(shards, 0, 1, CPU)
    a.next_batch(8, 4, 1)
    saved = (a.stream.file_index, a.stream.pos)
    expected = a.next_batch(8, 4, 1)
    b = DocumentPackingLoader(shards, 0, 1, CPU)
    b.stream.seek(*saved)
    got = b.next_batch(8, 4, 1)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


@pytest.mark.parametrize("cls", [DistributedTokenLoader, DocumentPackingLoader])
def test_flat_batches_are_each_ranks_tokens_as_one_row(shards, cls):
    """R1's layout: rank r's micro-batch is one row of its whole slice, the same tokens as rows."""
    for rank in range(2):
        rows, flat = cls(shards, rank, 2, CPU), cls(shards, rank, 2, CPU, flat=True)
        for _ in range(3):
            (xr, yr), (xf, yf) = rows.next_batch(8, 2, 1), flat.next_batch(8, 2, 1)
            assert xr.shape == (2, 2) and xf.shape == yf.shape == (1, 4)
            assert torch.equal(xf.flatten(), xr.flatten()) and torch.equal(yf.flatten(), yr.flatten())
