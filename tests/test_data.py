"""The student's view of records: sequence lengths and the length-bucketed epoch order."""

import numpy as np
import pyarrow as pa
import pytest
import torch

from distill.data import bucketed_order, sequence_lengths, student_sequence


def padded_fraction(order: np.ndarray, lengths: np.ndarray, batch_size: int) -> float:
    """Share of padded positions when `order` is cut into batches padded to their longest row."""
    batches = [lengths[order[i:i + batch_size]] for i in range(0, len(order), batch_size)]
    return 1.0 - sum(b.sum() for b in batches) / sum(b.max() * len(b) for b in batches)


def skewed_lengths(n: int, seed: int = 0) -> np.ndarray:
    """Mostly short rows, a long tail: like comments (3-25 tokens) plus answers."""
    rng = np.random.default_rng(seed)
    return 10 + np.minimum(rng.geometric(0.08, size=n), 65)


def test_sequence_lengths_match_student_sequence():
    rows = [{"comment_ids": list(range(c)), "answer_ids": list(range(a))} for c, a in
            [(3, 5), (25, 1), (30, 12), (0, 0), (7, 0)]]
    table = pa.Table.from_pylist(rows, schema=pa.schema([("comment_ids", pa.list_(pa.int32())),
                                                          ("answer_ids", pa.list_(pa.int32()))]))
    want = [len(student_sequence(r["comment_ids"], r["answer_ids"], 1, 25)) for r in rows]
    assert sequence_lengths(table, 25).tolist() == want


@pytest.mark.parametrize("n, batch_size, buckets", [(1000, 32, 50), (1000, 32, 4), (1003, 32, 5), (10, 32, 50),
                                                     (64, 8, 1), (97, 1, 3)])
def test_every_row_once_and_deterministic(n, batch_size, buckets):
    lengths = skewed_lengths(n)
    order = bucketed_order(lengths, 3, 7, batch_size, buckets)
    assert sorted(order.tolist()) == list(range(n))
    assert np.array_equal(order, bucketed_order(lengths.copy(), 3, 7, batch_size, buckets))


def plain_shuffle(n: int, epoch: int, seed: int) -> np.ndarray:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).numpy()


def test_plain_shuffle_when_off():
    lengths = skewed_lengths(500)
    for buckets in (0, 1):
        assert np.array_equal(bucketed_order(lengths, 2, 5, 16, buckets), plain_shuffle(500, 2, 5))


def test_less_padding_than_plain_shuffle():
    lengths, batch_size = skewed_lengths(4096), 32
    plain = padded_fraction(plain_shuffle(4096, 0, 0), lengths, batch_size)
    bucketed = padded_fraction(bucketed_order(lengths, 0, 0, batch_size, 50), lengths, batch_size)
    assert bucketed < plain / 3


def test_depends_on_epoch_and_seed_and_shuffles_batches():
    lengths, batch_size = skewed_lengths(2048), 32
    order = bucketed_order(lengths, 0, 0, batch_size, 50)
    assert not np.array_equal(order, bucketed_order(lengths, 1, 0, batch_size, 50))
    assert not np.array_equal(order, bucketed_order(lengths, 0, 1, batch_size, 50))
    longest = lengths[order].reshape(-1, batch_size).max(axis=1)  # (n_batches,)
    assert longest[0] == longest.max()  # the longest batch first: out-of-memory shows at step 1
    assert not np.all(np.diff(longest[1:]) >= 0)  # the batches are shuffled, not in length order


def test_partial_last_batch_stays_last():
    lengths, batch_size = skewed_lengths(100), 32
    order = bucketed_order(lengths, 0, 0, batch_size, 50)
    # one window, sorted: the 4 rows after the 3 whole batches are the epoch's longest, and stay at the end
    assert sorted(lengths[order[96:]]) == sorted(lengths)[96:]
