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
import torch

from distill import records


def student_sequence(comment_ids: list[int], answer_teacher_ids: list[int], sep_id: int,
                     max_comment_tokens: int) -> list[int]:
    """Input ids of one student sequence (the answer may be empty: the prompt for free decoding)."""
    return list(comment_ids[:max_comment_tokens]) + [sep_id] + list(answer_teacher_ids[:-1] if answer_teacher_ids
                                                                     else [])


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T) teacher ids, right-padded with 0
    attention_mask: torch.Tensor  # (B, T) bool, real tokens
    targets: torch.Tensor  # (B, T) output-vocab index to predict at each position, 0 where not an answer step
    loss_mask: torch.Tensor  # (B, T) bool, positions that predict an answer token
    teacher_logits: torch.Tensor  # (B, T, V) raw teacher logits at answer positions, 0 elsewhere

    def to(self, device) -> "Batch":
        return Batch(*(t.to(device, non_blocking=True) for t in
                       (self.input_ids, self.attention_mask, self.targets, self.loss_mask, self.teacher_logits)))

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


def epoch_order(n: int, epoch: int, seed: int) -> np.ndarray:
    """The shuffled row order of an epoch: the same on every worker and on every rerun."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).numpy()
