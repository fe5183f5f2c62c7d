"""The student's view of a record: one encoding path for training, evaluation and `classify`.

A student sequence is

    comment teacher ids (<= max_comment_tokens) + [SEP] + answer teacher ids (without the last)

where SEP is the end-of-answer id (it also marks "the comment ended, answer now"). The
position of SEP predicts the first answer token; answer token t predicts token t + 1.
Answer tokens are fed back as TEACHER ids (the student's input vocabulary is the
teacher's), and predicted as OUTPUT-VOCABULARY indices. The original project lost its
student-only accuracy to a quote token encoded one way in training and another in
inference; here training, evaluation and inference all call `student_sequence`.

Then the epoch's row order (`bucketed_order`: shuffled, length-bucketed) and where a training
worker's rows come from (train.data): the whole split in memory (`MemoryRows`), or windows of
whole shards streamed from local disk or s3:// (`StreamedRows`), a few at a time.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from distill import records


def student_sequence(comment_ids: list[int], answer_teacher_ids: list[int], sep_id: int,
                     max_comment_tokens: int) -> list[int]:
    """Input ids of one student sequence (the answer may be empty: the prompt for free decoding)."""
    return list(comment_ids[:max_comment_tokens]) + [sep_id] + list(answer_teacher_ids[:-1] if answer_teacher_ids
                                                                     else [])


def sequence_lengths(table: pa.Table, max_comment_tokens: int) -> np.ndarray:
    """len(student_sequence(...)) of every record row, vectorised: min(comment, max) + 1 + max(steps - 1, 0)."""
    comment = pc.list_value_length(table.column("comment_ids")).to_numpy()
    steps = pc.list_value_length(table.column("answer_ids")).to_numpy()
    return np.minimum(comment, max_comment_tokens) + np.maximum(steps, 1)


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T) teacher ids, right-padded with 0
    attention_mask: torch.Tensor  # (B, T) bool, real tokens
    targets: torch.Tensor  # (B, T) output-vocab index to predict at each position, 0 where not an answer step
    loss_mask: torch.Tensor  # (B, T) bool, positions that predict an answer token
    teacher_logits: torch.Tensor  # (B, T, V) raw teacher logits at answer positions, 0 elsewhere

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.input_ids, self.attention_mask, self.targets, self.loss_mask, self.teacher_logits

    def to(self, device) -> "Batch":
        return Batch(*(t.to(device, non_blocking=True) for t in self.tensors()))

    def pin_memory(self) -> "Batch":
        """Page-locked copies, so that `to(cuda)` is an asynchronous copy."""
        return Batch(*(t.pin_memory() for t in self.tensors()))

    @property
    def n_tokens(self) -> int:
        return int(self.loss_mask.sum())


def collate(rows: list[dict], vocab_ids: list[int], sep_id: int, max_comment_tokens: int, logits_dtype: str,
            context: int | None = None) -> Batch:
    """Record rows (dicts with comment_ids, answer_ids, n_steps, logits) -> one padded Batch."""
    V = len(vocab_ids)
    seqs, starts = [], []
    for r in rows:
        answer_teacher = [vocab_ids[i] for i in r["answer_ids"]]
        seq = student_sequence(r["comment_ids"], answer_teacher, sep_id, max_comment_tokens)
        seqs.append(seq)
        starts.append(len(seq) - len(r["answer_ids"]))  # position of SEP
    T = context or max(len(s) for s in seqs)
    B = len(rows)
    input_ids = torch.zeros((B, T), dtype=torch.long)
    attention = torch.zeros((B, T), dtype=torch.bool)
    targets = torch.zeros((B, T), dtype=torch.long)
    loss_mask = torch.zeros((B, T), dtype=torch.bool)
    teacher = torch.zeros((B, T, V), dtype=torch.float32)
    for i, (r, seq, s) in enumerate(zip(rows, seqs, starts)):
        if len(seq) > T:
            raise ValueError(f"record {r.get('id')}: {len(seq)} tokens exceed the student context {T}")
        n = r["n_steps"]
        input_ids[i, :len(seq)] = torch.tensor(seq)
        attention[i, :len(seq)] = True
        targets[i, s:s + n] = torch.tensor(r["answer_ids"])
        loss_mask[i, s:s + n] = True
        teacher[i, s:s + n] = records.decode_logits(r["logits"], n, V, logits_dtype).float()
    return Batch(input_ids, attention, targets, loss_mask, teacher)


def bucketed_order(lengths: np.ndarray, epoch: int, seed: int, batch_size: int, buckets: int) -> np.ndarray:
    """The row order of an epoch, with rows of similar length batched together (less padding).

    A permutation seeded by (seed, epoch), the epoch's shuffled order, is cut into windows of `buckets` batches of `batch_size` rows
    (the global batch); each window is sorted by length, and the whole batches (positions
    k * batch_size) are then shuffled, with the longest first (a micro-batch too big for
    memory fails at step 1, not hours in) and the partial last batch, if any, kept last.
    Every row comes exactly once; the result depends only on (lengths, epoch, seed,
    batch_size, buckets), so it is the same on every worker and every rerun. buckets 0 or 1:
    the plain shuffled order.
    """
    return shuffled_buckets(lengths, torch.Generator().manual_seed(seed * 1_000_003 + epoch), batch_size, buckets)


def shuffled_buckets(lengths: np.ndarray, g: torch.Generator, batch_size: int, buckets: int) -> np.ndarray:
    """`bucketed_order`'s work with a given generator: a permutation of range(len(lengths)), length-bucketed."""
    n = len(lengths)
    order = torch.randperm(n, generator=g).numpy()  # the shuffled order; g shuffles the batches below
    if buckets <= 1:
        return order
    window = batch_size * buckets
    for start in range(0, n, window):
        rows = order[start:start + window]
        order[start:start + window] = rows[np.argsort(lengths[rows], kind="stable")]  # ties: shuffled order
    full = n // batch_size * batch_size
    batches = order[:full].reshape(-1, batch_size)  # (n_batches, batch_size)
    if len(batches) == 0:
        return order
    batches = batches[torch.randperm(len(batches), generator=g).numpy()]
    longest = int(np.argmax(lengths[batches].max(axis=1)))
    batches[[0, longest]] = batches[[longest, 0]]
    return np.concatenate([batches.ravel(), order[full:]])


# -----------------------------------------------------------------------------
# Where a worker's training rows come from (train.data): the whole split in memory, or streamed shards.
# Both answer `rows(epoch, positions)`: the rows at those positions of the epoch's order (positions
# in [0, n)); the trainer cuts global batches from that order, so a rank reads only its own rows.


class MemoryRows:
    """The training split held whole (train.data=memory), in id order; the epoch's order is
    `bucketed_order` over all of it."""

    def __init__(self, train: pa.Table, seed: int, batch_size: int, buckets: int, max_comment_tokens: int):
        self.table, self.seed, self.batch_size, self.buckets = train, seed, batch_size, buckets
        self.n = train.num_rows
        self.lengths = sequence_lengths(train, max_comment_tokens)  # (N,) for bucketing
        self.order = (-1, None)  # (epoch, its row order), cached; with prefetch only its thread touches it

    def rows(self, epoch: int, positions: np.ndarray) -> pa.Table:
        if self.order[0] != epoch:
            self.order = (epoch, bucketed_order(self.lengths, epoch, self.seed, self.batch_size, self.buckets))
        return self.table.take(self.order[1][positions])

    def head(self, k: int) -> pa.Table:
        """The first k training rows (for a check before training)."""
        return self.table.slice(0, k)

    def close(self) -> None:
        pass


STREAM_COLUMNS = ["id", "split", "comment_ids", "answer_ids", "n_steps", "logits"]
"""The record columns training reads (not the text, the parsed answer or the provenance)."""


def shard_train_counts(uri: str, shards: list[dict], threads: int = 8) -> list[int]:
    """Training-split rows of each shard (manifest entries), from the `split` column alone."""
    def count(shard: dict) -> int:
        return int(pc.sum(pc.equal(records.read_column(uri, shard, "split"), "train")).as_py() or 0)

    with ThreadPoolExecutor(max_workers=threads) as pool:  # S3: latency-bound, so several at once
        return list(pool.map(count, shards))


def split_from_shards(uri: str, shards: list[dict], split: str, limit: int | None = None,
                      columns: list[str] | None = None) -> pa.Table:
    """The rows of one split, shard by shard in manifest order, up to `limit` rows (None = all): never
    more than those rows and one shard in memory."""
    tables, n = [], 0
    for shard in shards:
        if limit is not None and n >= limit:
            break
        table = records.read_shard(uri, shard, columns=columns)
        table = table.filter(pc.equal(table.column("split"), split))
        tables.append(table if limit is None else table.slice(0, limit - n))
        n += tables[-1].num_rows
    schema = records.SCHEMA if columns is None else pa.schema([records.SCHEMA.field(c) for c in columns])
    return pa.concat_tables(tables) if tables else schema.empty_table()


class StreamedRows:
    """The training split read shard by shard (train.data=stream): memory bounded by a few windows of
    shards, whatever the size of the record set.

    An epoch's order depends only on (seed, epoch) and the records: the shards that hold training rows,
    permuted, are cut into windows of consecutive shards of at least `window_rows` training rows; inside
    a window its rows come in `shuffled_buckets` order (a shuffle, length-bucketed like `bucketed_order`),
    seeded by (seed, epoch, window); the epoch's order is the windows' orders one after the other. So a
    global batch draws from one window (two where it straddles a boundary), the order is the same on
    every worker and every rerun, and a resumed run continues exactly. A worker holds at most `keep`
    windows (least recently used dropped) and loads the next one on a background thread while it trains
    on the current one. `train_counts` (`shard_train_counts`) gives the rows per shard without reading
    them; max_train_rows keeps the first N training rows in shard order (manifest order, then row order).
    """

    def __init__(self, uri: str, shards: list[dict], train_counts: list[int], seed: int, batch_size: int,
                 buckets: int, window_rows: int, max_comment_tokens: int, max_train_rows: int | None = None,
                 keep: int = 3):
        self.uri, self.shards, self.seed, self.batch_size, self.buckets = uri, shards, seed, batch_size, buckets
        self.window_rows, self.max_comment_tokens, self.keep = window_rows, max_comment_tokens, keep
        left = max_train_rows if max_train_rows is not None else sum(train_counts)
        self.quota = np.zeros(len(shards), dtype=np.int64)  # training rows taken from each shard
        for i, count in enumerate(train_counts):
            self.quota[i] = min(count, left)
            left -= self.quota[i]
        self.n = int(self.quota.sum())
        self.layouts: OrderedDict[int, tuple[list[np.ndarray], np.ndarray]] = OrderedDict()
        self.windows: OrderedDict[tuple[int, int], Future] = OrderedDict()  # (epoch, window) -> (table, order)
        self.loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="distill-shards")

    def layout(self, epoch: int) -> tuple[list[np.ndarray], np.ndarray]:
        """(the epoch's windows as arrays of shard indices, the position in the epoch's order where each
        starts)."""
        if epoch not in self.layouts:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            used = np.flatnonzero(self.quota)
            windows, current, rows = [], [], 0
            for i in used[torch.randperm(len(used), generator=g).numpy()]:
                current.append(i)
                rows += self.quota[i]
                if rows >= self.window_rows:
                    windows, current, rows = windows + [np.array(current)], [], 0
            windows += [np.array(current)] if current else []  # the last window may be smaller
            starts = np.cumsum([0] + [int(self.quota[w].sum()) for w in windows])
            self.layouts[epoch] = (windows, starts)
            while len(self.layouts) > 2:
                self.layouts.popitem(last=False)
        return self.layouts[epoch]

    def load(self, epoch: int, window: int, shards: np.ndarray) -> tuple[pa.Table, np.ndarray]:
        """A window's training rows (shards in window order, rows in shard order) and its row order."""
        tables = []
        for i in shards:
            table = records.read_shard(self.uri, self.shards[i], columns=STREAM_COLUMNS)
            tables.append(table.filter(pc.equal(table.column("split"), "train")).slice(0, self.quota[i]))
        table = pa.concat_tables(tables)
        if table.num_rows != self.quota[shards].sum():
            raise records.RecordsError(f"{self.uri}: shards {shards.tolist()} changed while training read them")
        g = torch.Generator().manual_seed(((self.seed * 1_000_003 + epoch) * 1_000_003 + window + 1) % 2**63)
        return table, shuffled_buckets(sequence_lengths(table, self.max_comment_tokens), g, self.batch_size,
                                       self.buckets)

    def window(self, epoch: int, window: int) -> tuple[pa.Table, np.ndarray]:
        """A window's (table, order), loading it if needed, and starting to load the one after it; keeps
        the `keep` most recently used."""
        after = self.successor(epoch, window)
        for e, w in ((epoch, window), after):  # this one first: the loader is one thread
            if (e, w) not in self.windows:
                self.windows[(e, w)] = self.loader.submit(self.load, e, w, self.layout(e)[0][w])
        self.windows.move_to_end(after)
        self.windows.move_to_end((epoch, window))
        while len(self.windows) > max(2, self.keep):
            self.windows.popitem(last=False)[1].cancel()  # a no-op once loaded or loading
        return self.windows[(epoch, window)].result()

    def successor(self, epoch: int, window: int) -> tuple[int, int]:
        return (epoch, window + 1) if window + 1 < len(self.layout(epoch)[0]) else (epoch + 1, 0)

    def rows(self, epoch: int, positions: np.ndarray) -> pa.Table:
        starts = self.layout(epoch)[1]
        which = np.searchsorted(starts, positions, side="right") - 1  # the window of each position
        pieces = []
        for w, group in itertools.groupby(range(len(positions)), key=lambda k: which[k]):
            table, order = self.window(epoch, int(w))
            pieces.append(table.take(order[positions[list(group)] - starts[w]]))
        return pa.concat_tables(pieces)

    def head(self, k: int) -> pa.Table:
        """The first k training rows in shard order, at most one shard's (for a check before training)."""
        first = self.shards[int(np.flatnonzero(self.quota)[0])]
        table = records.read_shard(self.uri, first, columns=STREAM_COLUMNS)
        return table.filter(pc.equal(table.column("split"), "train")).slice(0, k)

    def close(self) -> None:
        self.loader.shutdown(wait=False, cancel_futures=True)
