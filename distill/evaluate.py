"""Held-out evaluation of a student against its teacher (and, where the corpus has them, human labels).

One function, `evaluate`, that the train loop calls at the end of every epoch and
`distill eval` calls on a model artifact. On the held-out records it measures:

- teacher_forced_acc: next-token accuracy at every answer position given the teacher's
  prefix, argmax over the whole output vocabulary (the original's "teacher-forced
  accuracy"). It counts the literal JSON tokens too, most of them easy, so it runs high.
- held_out_kl: forward KL(teacher || student) at temperature 1, per answer token.
- student_only_exact: the student decodes alone, constrained by the answer automaton;
  the share of answers equal to the teacher's (the original's "student-only accuracy").
- json_valid_unconstrained: the student decodes alone, unconstrained; the share of
  outputs that are exactly the canonical token encoding of a valid answer
  (`automaton.accepts`, equivalently `grammar.decode_answer(...) is not None`). Strict:
  a parseable JSON answer tokenized differently (e.g. '"' for '▁"') counts as invalid,
  so this is a lower bound on "would json.loads + the task accept it". It needs no
  tokenizer, and it is what the student was trained to write.
- field_agreement and confusion: per field, the constrained answer against the teacher's.
- human (optional): the teacher's and the student's agreement with human labels kept
  in the records' provenance, e.g. GoEmotions sentiment groups.

Training and evaluation build their inputs the same way (`data.collate` and
`inference.greedy_decode`, both through `data.student_sequence`): the gap between
teacher-forced and student-only accuracy measures the student, not an encoding mismatch.
"""

from __future__ import annotations

import json

import torch

from distill.constrained import AnswerGrammar
from distill.data import collate
from distill.inference import greedy_decode
from distill.losses import forward_kl
from distill.model import Student
from distill.task import Task
from distill.vocab import OutputVocab

GOEMOTIONS_SENTIMENT = {
    "field": "sentiment",
    "provenance_key": "labels",
    "mapping": {"1": "negative", "2": "neutral", "3": "positive"},
}
"""GoEmotions' sentiment groups (group_labels.txt: 0 ambiguous, 1 negative, 2 neutral,
3 positive) as reddit_moderation's sentiment values; 0 has no counterpart and is ignored."""


def human_label(provenance: str | None, key: str, mapping: dict[str, str]) -> str | None:
    """The one human label of a record, or None.

    provenance[key] is a comma-separated list of label ids ("2,3"). Ids missing from
    `mapping` (GoEmotions' 0, ambiguous) are ignored; a record counts only if the rest
    map to exactly one value ("1" or "0,1" -> negative; "1,3", "0" or "" -> None)."""
    raw = json.loads(provenance).get(key) if provenance else None
    if not raw:
        return None
    values = {mapping[i.strip()] for i in str(raw).split(",") if i.strip() in mapping}
    return values.pop() if len(values) == 1 else None


def _check_human_labels(spec: dict, task: Task) -> None:
    field = spec["field"]
    if field not in task.fields:
        raise ValueError(f"human_labels.field={field!r}: task {task.name} has fields {', '.join(task.fields)}")
    unknown = sorted(set(spec["mapping"].values()) - set(task.fields[field]))
    if unknown:
        raise ValueError(f"human_labels.mapping: {unknown} are not values of {field} "
                         f"({', '.join(task.fields[field])})")


def _fraction(hits: int, n: int) -> float | None:
    return hits / n if n else None


@torch.no_grad()
def evaluate(model: Student, rows: list[dict], vocab: OutputVocab, sep_id: int, grammar: AnswerGrammar,
             logits_dtype: str, max_comment_tokens: int, batch_size: int = 64,
             human_labels: dict | None = None) -> dict:
    """Metrics of `model` on record rows (see the module docstring); the model's train/eval mode is restored.

    rows: dicts as `records.read_records(...).to_pylist()` gives (`answer` as (key, value)
    pairs or a dict). grammar: the task's answer grammar (its task and automaton are used,
    and it decodes the student's answers into field values). human_labels: like
    GOEMOTIONS_SENTIMENT. Returns plain floats and ints (JSON-ready):
    n, n_tokens, teacher_forced_acc, held_out_kl, student_only_exact,
    json_valid_unconstrained, field_agreement {field: share}, confusion {field:
    {"labels", "matrix" [teacher value i][student value j] counts}}, and with
    human_labels: human {"field", "n", "teacher_agreement", "student_agreement"}
    (agreements None when no record has a usable label)."""
    if not rows:
        raise ValueError("evaluate: no rows to evaluate")
    task = grammar.task
    if human_labels is not None:
        _check_human_labels(human_labels, task)
    automaton = grammar.automaton(vocab)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    correct = tokens = valid_unconstrained = 0
    kl_sum = 0.0
    teacher_answers, student_answers = [], []
    try:
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            batch = collate(chunk, vocab.ids, sep_id, max_comment_tokens, logits_dtype).to(device)
            logits = model(batch.input_ids, batch.attention_mask)  # (B, T, V)
            hits = (logits.argmax(-1) == batch.targets) & batch.loss_mask  # (B, T)
            n_tokens = batch.n_tokens  # host sync, as the two below: once per batch
            correct += int(hits.sum())
            tokens += n_tokens
            kl_sum += float(forward_kl(logits, batch.teacher_logits, batch.loss_mask)) * n_tokens

            comments = [r["comment_ids"] for r in chunk]
            for indices in greedy_decode(model, comments, sep_id, vocab.ids, max_comment_tokens,
                                         automaton.max_steps, automaton):
                student_answers.append(grammar.decode_answer([vocab.ids[i] for i in indices]))
            for indices in greedy_decode(model, comments, sep_id, vocab.ids, max_comment_tokens,
                                         automaton.max_steps, None):
                valid_unconstrained += automaton.accepts(indices)
            teacher_answers += [dict(r["answer"]) for r in chunk]
    finally:
        model.train(was_training)

    n = len(rows)
    metrics = {
        "n": n,
        "n_tokens": tokens,
        "teacher_forced_acc": correct / tokens,
        "held_out_kl": kl_sum / tokens,
        "student_only_exact": sum(s == t for s, t in zip(student_answers, teacher_answers)) / n,
        "json_valid_unconstrained": valid_unconstrained / n,
        "field_agreement": {f: sum(s[f] == t[f] for s, t in zip(student_answers, teacher_answers)) / n
                            for f in task.fields},
        "confusion": {},
    }
    for field, labels in task.fields.items():
        position = {value: i for i, value in enumerate(labels)}
        matrix = [[0] * len(labels) for _ in labels]
        for s, t in zip(student_answers, teacher_answers):
            matrix[position[t[field]]][position[s[field]]] += 1
        metrics["confusion"][field] = {"labels": list(labels), "matrix": matrix}
    if human_labels is not None:
        field, used, teacher_hits, student_hits = human_labels["field"], 0, 0, 0
        for row, s, t in zip(rows, student_answers, teacher_answers):
            label = human_label(row.get("provenance"), human_labels["provenance_key"], human_labels["mapping"])
            if label is not None:
                used += 1
                teacher_hits += t[field] == label
                student_hits += s[field] == label
        metrics["human"] = {"field": field, "n": used, "teacher_agreement": _fraction(teacher_hits, used),
                            "student_agreement": _fraction(student_hits, used)}
    return metrics
