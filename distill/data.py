"""The student's view of a record: one encoding path for training, evaluation and `classify`.

A student sequence is

    comment teacher ids (<= max_comment_tokens) + [SEP] + answer teacher ids (without the last)

where SEP is the end-of-answer id (it also marks "the comment ended, answer now"). The
position of SEP predicts the first answer token; answer token t predicts token t + 1.
Answer tokens are fed back as TEACHER ids (the student's input vocabulary is the
teacher's), and predicted as OUTPUT-VOCABULARY indices. The original project lost its
student-only accuracy to a quote token encoded one way in training and another in
inference; here training, evaluation and inference all call `student_sequence`.
"""

from __future__ import annotations

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
    n = len(lengths)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
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
