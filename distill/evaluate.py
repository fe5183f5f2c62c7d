"""Held-out evaluation of a student against its teacher (and, where the corpus has them, human labels).

One function, `evaluate`, that the train loop calls at the end of every epoch and
`distill eval` calls on a model artifact. On the held-out records it measures:

- teacher_forced_acc: next-token accuracy at every answer position given the teacher's
  prefix, argmax over the whole output vocabulary (the original's "teacher-forced
  accuracy"). INFLATED: about 21 of a reddit_moderation answer's 25 positions are JSON
  tokens the automaton forces, so it reads ~98% for a student that knows little.
- choice_point_acc: the same, only at the choice points (positions where the answer
  automaton allows more than one token: the states come from walking the teacher's
  answer through the automaton: `allowed_along`), argmax over the allowed tokens only, as
  constrained decoding does. The honest teacher-forced figure; n_choice_points counts them.
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
- agreement_by_margin: the teacher's confidence in a record is its margin
  (`records.teacher_margin`, which `distill inspect` shows too): the smallest gap over the
  answer's choice points between the top two allowed tokens' probabilities (softmax over
  the allowed tokens of the record's raw logits). Per margin bucket
  (MARGIN_BUCKETS, and ">=0.2"): n and the share of exact answers equal to the teacher's,
  for the student and each baseline. Where the teacher hardly preferred its answer,
  nobody can be expected to agree with it; student_only_exact_margin_ge_0.2 is the
  student's exact agreement where it did.
- baselines (with train_rows): what the student must beat, from the training records
  alone (`baselines`): majority_answer, the most common teacher answer; bag_of_words,
  TF-IDF of the comment + logistic regression predicting the whole answer as one class.
  Exact agreement with the teacher on the evaluated rows, and by margin bucket.
- samples: up to N_SAMPLES held-out comments with the teacher's and the student's
  answers and the margin: the first rows, then the first where the two disagree.

Training and evaluation build their inputs the same way (`data.collate` and
`inference.greedy_decode`, both through `data.student_sequence`): the gap between
teacher-forced and student-only accuracy measures the student, not an encoding mismatch.
"""

from __future__ import annotations

import json
from collections import Counter

import pyarrow as pa
import pyarrow.compute as pc
import torch

from distill.constrained import AnswerGrammar
from distill.data import collate
from distill.inference import greedy_decode
from distill.losses import forward_kl
from distill.records import teacher_margin
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


MARGIN_BUCKETS = [("[0, 0.1)", 0.0, 0.1), ("[0.1, 0.2)", 0.1, 0.2), ("[0.2, 0.4)", 0.2, 0.4), ("[0.4, 1]", 0.4, 1.0)]
"""(label, low, high) of the teacher-margin buckets: low <= margin < high (the last includes 1)."""
CONFIDENT = ">=0.2"
"""The label of every record with margin >= CONFIDENT_MARGIN, beside the buckets."""
CONFIDENT_MARGIN = 0.2
N_SAMPLES = 8


def margin_bucket(margin: float) -> str:
    """The MARGIN_BUCKETS label of a margin in [0, 1]."""
    for label, low, high in MARGIN_BUCKETS:
        if low <= margin < high:
            return label
    return MARGIN_BUCKETS[-1][0]


def training_rows(table: pa.Table) -> list[dict]:
    """The "text" and "answer" of a records table's split == "train" rows: what `baselines` learns from."""
    return table.filter(pc.equal(table.column("split"), "train")).select(["text", "answer"]).to_pylist()


def baselines(train_rows: list[dict], eval_rows: list[dict]) -> dict:
    """What two baselines learnt from `train_rows` answer for each of `eval_rows` (dicts with "text", "answer").

    Returns {"majority_answer": [answer dict per eval row], "bag_of_words": [...], "majority": the
    majority answer}. majority_answer: the most common teacher answer of the training rows (ties:
    the first in sorted JSON order). bag_of_words: TF-IDF of the text (words of any length and
    word pairs) + logistic regression, each distinct whole answer one class (the majority answer if there is
    only one)."""
    if not train_rows:
        raise ValueError("baselines: no training rows")
    answers = {}  # class label (the answer as sorted JSON) -> the answer, fields in the task's order
    labels = []
    for r in train_rows:
        label = json.dumps(dict(r["answer"]), sort_keys=True)
        answers.setdefault(label, dict(r["answer"]))
        labels.append(label)
    majority = min(Counter(labels).items(), key=lambda kv: (-kv[1], kv[0]))[0]
    if len(answers) == 1:
        predicted = [majority] * len(eval_rows)
    else:
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline

        words = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True,
                                token_pattern=r"(?u)\b\w+\b")  # words of one letter too
        classifier = make_pipeline(words, LogisticRegression(max_iter=1000))
        classifier.fit([r["text"] for r in train_rows], labels)
        predicted = classifier.predict([r["text"] for r in eval_rows]).tolist()
    return {"majority_answer": [answers[majority]] * len(eval_rows),
            "bag_of_words": [answers[label] for label in predicted], "majority": answers[majority]}


def _agreement_by_margin(margins: list[float], teacher: list[dict], predictions: dict[str, list[dict]]) -> dict:
    """{bucket label: {"n", and per predictor name its exact agreement share (None when n = 0)}}."""
    groups = {label: [i for i, m in enumerate(margins) if margin_bucket(m) == label] for label, _, _ in MARGIN_BUCKETS}
    groups[CONFIDENT] = [i for i, m in enumerate(margins) if m >= CONFIDENT_MARGIN]
    return {label: {"n": len(rows), **{name: _fraction(sum(answers[i] == teacher[i] for i in rows), len(rows))
                                       for name, answers in predictions.items()}}
            for label, rows in groups.items()}


def _samples(rows: list[dict], teacher: list[dict], student: list[dict], margins: list[float]) -> list[dict]:
    """Up to N_SAMPLES rows: the first half from the start, the rest the first disagreements (else the next rows)."""
    first = list(range(min(len(rows), N_SAMPLES // 2)))
    rest = [i for i in range(len(rows)) if i not in first]
    rest = [i for i in rest if student[i] != teacher[i]] + [i for i in rest if student[i] == teacher[i]]
    picked = sorted(first + rest[:N_SAMPLES - len(first)])
    return [{"text": rows[i]["text"], "teacher": teacher[i], "student": student[i], "margin": margins[i]}
            for i in picked]


@torch.no_grad()
def evaluate(model: Student, rows: list[dict], vocab: OutputVocab, sep_id: int, grammar: AnswerGrammar,
             logits_dtype: str, max_comment_tokens: int, batch_size: int = 64,
             human_labels: dict | None = None, train_rows: list[dict] | None = None) -> dict:
    """Metrics of `model` on record rows (see the module docstring); the model's train/eval mode is restored.

    rows: dicts as `records.read_records(...).to_pylist()` gives (`answer` as (key, value)
    pairs or a dict). grammar: the task's answer grammar (its task and automaton are used,
    and it decodes the student's answers into field values). human_labels: like
    GOEMOTIONS_SENTIMENT. train_rows: training records (at least "text" and "answer", as
    `training_rows` gives), for the baselines; None = no baselines (per-epoch evaluation).
    Returns plain floats and ints (JSON-ready):
    n, n_tokens, teacher_forced_acc, n_choice_points, choice_point_acc, held_out_kl,
    student_only_exact, student_only_exact_margin_ge_0.2, json_valid_unconstrained,
    field_agreement {field: share}, confusion {field: {"labels", "matrix" [teacher value i]
    [student value j] counts}}, agreement_by_margin {bucket: {"n", "student", and with
    train_rows "majority_answer", "bag_of_words"}}, samples [{"text", "teacher", "student",
    "margin"}]; with human_labels: human {"field", "n", "teacher_agreement",
    "student_agreement"} (agreements None when no record has a usable label); with
    train_rows: baselines {"n_train", "majority", "majority_answer", "bag_of_words"} (the
    majority answer, then the two baselines' exact agreement). Shares are None where n = 0."""
    if not rows:
        raise ValueError("evaluate: no rows to evaluate")
    task = grammar.task
    if human_labels is not None:
        _check_human_labels(human_labels, task)
    automaton = grammar.automaton(vocab)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    correct = tokens = choice_correct = choice_points = valid_unconstrained = 0
    kl_sum = 0.0
    teacher_answers, student_answers, margins = [], [], []
    try:
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            batch = collate(chunk, vocab.ids, sep_id, max_comment_tokens, logits_dtype).to(device)
            logits = model(batch.input_ids, batch.attention_mask).float()  # (B, T, V), fp32 also under autocast
            hits = (logits.argmax(-1) == batch.targets) & batch.loss_mask  # (B, T)
            n_tokens = batch.n_tokens  # host sync, as the ones below: a few per batch
            correct += int(hits.sum())
            tokens += n_tokens
            kl_sum += float(forward_kl(logits, batch.teacher_logits, batch.loss_mask)) * n_tokens

            # choice points: where the automaton, walked along the teacher's answer, allows more than one
            allowed = automaton.allowed_along(batch.targets, batch.loss_mask)  # (B, T, V)
            choice = allowed.sum(-1) > 1  # (B, T)
            constrained = logits.masked_fill(~allowed, float("-inf")).argmax(-1)  # (B, T)
            choice_correct += int(((constrained == batch.targets) & choice).sum())
            choice_points += int(choice.sum())
            margins += [teacher_margin(r, automaton.edges, len(vocab.ids), logits_dtype) for r in chunk]

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
    predictions = {"student": student_answers}
    if train_rows is not None:
        base = baselines(train_rows, rows)
        predictions.update(majority_answer=base["majority_answer"], bag_of_words=base["bag_of_words"])
    by_margin = _agreement_by_margin(margins, teacher_answers, predictions)
    metrics = {
        "n": n,
        "n_tokens": tokens,
        "teacher_forced_acc": correct / tokens,
        "n_choice_points": choice_points,
        "choice_point_acc": _fraction(choice_correct, choice_points),
        "held_out_kl": kl_sum / tokens,
        "student_only_exact": sum(s == t for s, t in zip(student_answers, teacher_answers)) / n,
        "student_only_exact_margin_ge_0.2": by_margin[CONFIDENT]["student"],
        "json_valid_unconstrained": valid_unconstrained / n,
        "field_agreement": {f: sum(s[f] == t[f] for s, t in zip(student_answers, teacher_answers)) / n
                            for f in task.fields},
        "confusion": {},
        "agreement_by_margin": by_margin,
        "samples": _samples(rows, teacher_answers, student_answers, margins),
    }
    if train_rows is not None:
        metrics["baselines"] = {
            "n_train": len(train_rows), "majority": base["majority"],
            **{name: sum(a == t for a, t in zip(predictions[name], teacher_answers)) / n
               for name in ("majority_answer", "bag_of_words")}}
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
