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


# -- streamed training rows ---------------------------------------------------------------------------------


def write_record_set(uri: str, shard_sizes: list[int], vocab_size: int = 4) -> list[dict]:
    """Record shards of synthetic rows (every 4th in the eval split), like extraction writes; their manifest entries."""
    from distill import records

    rng = np.random.default_rng(0)
    entries, k = [], 0
    for index, size in enumerate(shard_sizes):
        rows = []
        for _ in range(size):
            n = int(rng.integers(1, 4))
            rows.append({"id": f"r{k:05d}", "split": "eval" if k % 4 == 3 else "train", "text": "t", "provenance": "{}",
                         "comment_ids": list(range(int(rng.integers(1, 30)))), "answer_ids": [1] * n,
                         "answer_text": "{}", "answer": [("f", "v")], "n_steps": n,
                         "logits": records.encode_logits(torch.zeros(n, vocab_size), "float16")})
            k += 1
        entries.append(records.write_shard(uri, index, rows))
    return entries


def streamed(uri, entries, window_rows=10, batch_size=4, buckets=2, max_train_rows=None, seed=0):
    from distill.data import StreamedRows, shard_train_counts

    return StreamedRows(uri, entries, shard_train_counts(uri, entries), seed, batch_size, buckets, window_rows, 25,
                        max_train_rows)


def epoch_ids(rows, epoch: int) -> list[str]:
    return rows.rows(epoch, np.arange(rows.n)).column("id").to_pylist()


def test_streamed_epoch_has_every_training_row_once_and_is_deterministic(tmp_path):
    entries = write_record_set(str(tmp_path), [7, 12, 1, 9, 8, 0, 11])
    rows = streamed(str(tmp_path), entries)
    train_ids = [f"r{k:05d}" for k in range(48) if k % 4 != 3]
    assert rows.n == len(train_ids) == 36
    first = epoch_ids(rows, 0)
    assert sorted(first) == train_ids and first != train_ids
    assert first == epoch_ids(streamed(str(tmp_path), entries), 0)  # another worker, a rerun: the same order
    assert sorted(epoch_ids(rows, 1)) == train_ids and epoch_ids(rows, 1) != first
    assert epoch_ids(streamed(str(tmp_path), entries, seed=1), 0) != first
    # a batch read in pieces (a rank's slice, a resumed step) is the same rows as the whole order there
    assert rows.rows(0, np.array([9, 10, 11, 12])).column("id").to_pylist() == first[9:13]
    assert rows.rows(0, np.array([35, 0, 1])).column("id").to_pylist() == [first[35], first[0], first[1]]


def test_streamed_windows_are_whole_shards_and_bounded(tmp_path):
    sizes = [8] * 12
    entries = write_record_set(str(tmp_path), sizes)
    rows = streamed(str(tmp_path), entries, window_rows=12)  # 6 training rows per shard: windows of 2 shards
    windows, starts = rows.layout(0)
    assert [len(w) for w in windows] == [2] * 6 and starts.tolist() == list(range(0, 73, 12))
    assert sorted(np.concatenate(windows).tolist()) == list(range(12))
    for p in range(0, rows.n, 4):
        rows.rows(0, np.arange(p, min(p + 4, rows.n)))
        assert len(rows.windows) <= 3  # windows held: at most 3, whatever the number of shards
    order = epoch_ids(rows, 0)
    shard_of = {f"r{k:05d}": k // 8 for k in range(96)}
    for w, shards in enumerate(windows):  # each window's positions hold exactly its shards' rows
        assert {shard_of[i] for i in order[starts[w]:starts[w + 1]]} == set(shards.tolist())
    rows.close()


def test_streamed_max_train_rows_is_a_prefix_in_shard_order(tmp_path):
    entries = write_record_set(str(tmp_path), [8, 8, 8])
    rows = streamed(str(tmp_path), entries, max_train_rows=10)
    assert rows.n == 10 and rows.quota.tolist() == [6, 4, 0]
    assert sorted(epoch_ids(rows, 0)) == [f"r{k:05d}" for k in range(13) if k % 4 != 3]
    assert rows.head(2).column("id").to_pylist() == ["r00000", "r00001"]


def test_split_from_shards_stops_at_the_limit(tmp_path):
    from distill.data import split_from_shards

    entries = write_record_set(str(tmp_path), [8, 8, 8])
    assert split_from_shards(str(tmp_path), entries, "eval").column("id").to_pylist() == \
        [f"r{k:05d}" for k in range(24) if k % 4 == 3]
    assert split_from_shards(str(tmp_path), entries, "eval", 3, ["id", "split"]).column("id").to_pylist() == \
        ["r00003", "r00007", "r00011"]


@pytest.mark.s3
def test_streamed_rows_from_s3(s3_bucket):
    uri = f"{s3_bucket}/records"
    entries = write_record_set(uri, [8, 8, 8])
    rows = streamed(uri, entries, window_rows=6)
    assert sorted(epoch_ids(rows, 0)) == [f"r{k:05d}" for k in range(24) if k % 4 != 3]
    rows.close()
