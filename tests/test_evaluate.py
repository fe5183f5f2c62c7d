"""Held-out evaluation (distill/evaluate.py): exact values on a student whose answers are known, and a tiny
student that learns to copy the teacher, on records made from the real grammar and vocabulary."""

import io
import json
from types import SimpleNamespace

import pyarrow.parquet as pq
import pytest
import torch

from distill import records
from distill.data import collate
from distill.evaluate import GOEMOTIONS_SENTIMENT, evaluate, human_label
from distill.losses import cross_entropy, forward_kl
from distill.model import StudentConfig, build_student
from distill.vocab import build_output_vocab

DTYPE = "bfloat16"
MAX_COMMENT = 25


@pytest.fixture(scope="module")
def vocab(grammar, gemma_tokenizer):
    return build_output_vocab(grammar, gemma_tokenizer, 64, "", ["some corpus text"])


def answer(tone, sentiment, safety, toxicity):
    return {"tone": tone, "sentiment": sentiment, "safety": safety, "toxicity": toxicity}


def make_rows(examples, grammar, vocab, tokenizer, seed=0) -> list[dict]:
    """Record rows, as read back from a Parquet shard, from (text, answer, human labels) triples.

    The teacher's logits are random with its chosen token 4 above the rest."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i, (text, values, labels) in enumerate(examples):
        answer_ids = vocab.indices(grammar.encode_answer(values))
        logits = torch.randn(len(answer_ids), len(vocab), generator=g)
        logits[torch.arange(len(answer_ids)), answer_ids] += 4.0
        rows.append({
            "id": f"c{i}", "split": "eval", "text": text,
            "provenance": json.dumps({"labels": labels}),
            "comment_ids": tokenizer.encode(text, add_special_tokens=False),
            "answer_ids": answer_ids, "answer_text": grammar.task.format_answer(values),
            "answer": list(values.items()), "n_steps": len(answer_ids),
            "logits": records.encode_logits(logits, DTYPE),
        })
    return pq.read_table(io.BytesIO(records.shard_bytes(rows))).to_pylist()


class FixedAnswer(torch.nn.Module):
    """A 'student' that always writes one answer: at answer step k it puts logit 10 on target[k]
    (0 everywhere past the answer, so the argmax there is index 0)."""

    cfg = SimpleNamespace(n_layers=1)  # what greedy_decode sizes its KVCache with

    def __init__(self, target: list[int], sep_id: int, vocab_size: int):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # where evaluate finds the device
        self.target, self.sep_id, self.vocab_size = target, sep_id, vocab_size

    def forward(self, input_ids, attention_mask=None, cache=None):
        if cache is None:
            return self.logits(input_ids)
        # decoding: the cache keeps every id read so far (its "keys"); only the last position is used
        ids, real = cache.extend(0, input_ids[:, None, :, None], attention_mask[:, None, :, None])
        logits = torch.zeros(*input_ids.shape, self.vocab_size)  # (B, T, V)
        for b in range(len(ids)):
            logits[b, -1] = self.logits(ids[b, 0, :, 0][real[b, 0, :, 0]][None])[0, -1]
        return logits

    def logits(self, input_ids):
        B, T = input_ids.shape
        logits = torch.zeros(B, T, self.vocab_size)  # (B, T, V)
        for b in range(B):
            sep = int((input_ids[b] == self.sep_id).nonzero()[0])
            for k in range(min(T - sep, len(self.target))):
                logits[b, sep + k, self.target[k]] = 10.0
        return logits


# hand-made: 6 comments, their teacher answers and GoEmotions sentiment-group labels
EXAMPLES = [
    ("You are an idiot.", answer("aggressive", "negative", "harmful", "toxic"), "1"),
    ("I hate this so much.", answer("aggressive", "negative", "safe", "toxic"), "0,1"),
    ("Thanks, great post!", answer("friendly", "positive", "safe", "respectful"), "3"),
    ("It opens at nine.", answer("neutral", "neutral", "safe", "respectful"), "1,3"),
    ("Meh, whatever.", answer("neutral", "negative", "safe", "respectful"), "0"),
    ("Go away.", answer("aggressive", "negative", "harmful", "toxic"), ""),
]
STUDENT_ANSWER = answer("aggressive", "negative", "harmful", "toxic")


def test_human_label():
    mapping = GOEMOTIONS_SENTIMENT["mapping"]
    assert human_label(json.dumps({"labels": "1"}), "labels", mapping) == "negative"
    assert human_label(json.dumps({"labels": "0,1"}), "labels", mapping) == "negative"  # ambiguous ignored
    assert human_label(json.dumps({"labels": "3,3"}), "labels", mapping) == "positive"
    assert human_label(json.dumps({"labels": "1,3"}), "labels", mapping) is None  # two different labels
    assert human_label(json.dumps({"labels": "0"}), "labels", mapping) is None
    assert human_label(json.dumps({"labels": ""}), "labels", mapping) is None
    assert human_label(json.dumps({}), "labels", mapping) is None
    assert human_label(None, "labels", mapping) is None


def test_exact_values_for_a_known_student(task, grammar, vocab, gemma_tokenizer):
    rows = make_rows(EXAMPLES, grammar, vocab, gemma_tokenizer)
    target = vocab.indices(grammar.encode_answer(STUDENT_ANSWER))
    student = FixedAnswer(target, grammar.end_id, len(vocab))
    m = evaluate(student, rows, vocab, grammar.end_id, grammar, DTYPE, MAX_COMMENT, batch_size=4,
                 human_labels=GOEMOTIONS_SENTIMENT)

    assert m["n"] == 6
    teachers = [values for _, values, _ in EXAMPLES]
    assert m["student_only_exact"] == pytest.approx(2 / 6)  # rows 0 and 5
    assert m["json_valid_unconstrained"] == 1.0  # the fixed answer is valid, with or without the automaton
    for field in task.fields:
        assert m["field_agreement"][field] == pytest.approx(sum(t[field] == STUDENT_ANSWER[field]
                                                                for t in teachers) / 6)
    assert m["field_agreement"]["sentiment"] == pytest.approx(4 / 6)

    # teacher-forced: at step k the student predicts target[k] (index 0 past its end)
    hits = sum(int((target[k] if k < len(target) else 0) == r["answer_ids"][k]) for r in rows
               for k in range(r["n_steps"]))
    assert m["n_tokens"] == sum(r["n_steps"] for r in rows)
    assert m["teacher_forced_acc"] == pytest.approx(hits / m["n_tokens"])
    batch = collate(rows, vocab.ids, grammar.end_id, MAX_COMMENT, DTYPE)
    expected_kl = forward_kl(student(batch.input_ids), batch.teacher_logits, batch.loss_mask)
    assert m["held_out_kl"] == pytest.approx(float(expected_kl), rel=1e-5)

    # the student always says aggressive: the teacher's tone counts fill that column
    tone = m["confusion"]["tone"]
    assert tone["labels"] == list(task.fields["tone"])
    column = tone["labels"].index("aggressive")
    for i, value in enumerate(tone["labels"]):
        assert tone["matrix"][i][column] == sum(t["tone"] == value for t in teachers)
    for field, c in m["confusion"].items():
        assert sum(map(sum, c["matrix"])) == 6
        assert sum(c["matrix"][i][i] for i in range(len(c["labels"]))) == round(m["field_agreement"][field] * 6)

    # human labels: rows 0 ("1") and 1 ("0,1") are negative, row 2 ("3") positive; "1,3", "0", "" skipped.
    # The teacher agrees on all three; the student (always negative) on the first two.
    assert m["human"] == {"field": "sentiment", "n": 3, "teacher_agreement": 1.0, "student_agreement": 2 / 3}


def test_training_to_copy_the_teacher_improves_the_metrics(task, grammar, vocab, gemma_tokenizer):
    rows = make_rows(EXAMPLES[:4], grammar, vocab, gemma_tokenizer)
    torch.manual_seed(0)
    model = build_student(StudentConfig(preset="tiny", output_vocab_size=len(vocab)))

    def metrics():
        return evaluate(model, rows, vocab, grammar.end_id, grammar, DTYPE, MAX_COMMENT)

    before = metrics()
    assert model.training  # evaluate restores the mode it found
    batch = collate(rows, vocab.ids, grammar.end_id, MAX_COMMENT, DTYPE)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(50):
        logits = model(batch.input_ids, batch.attention_mask)
        loss = forward_kl(logits, batch.teacher_logits, batch.loss_mask) + cross_entropy(
            logits, batch.targets, batch.loss_mask)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = metrics()

    assert after["teacher_forced_acc"] > before["teacher_forced_acc"]
    assert after["teacher_forced_acc"] > 0.95
    assert after["held_out_kl"] < before["held_out_kl"]
    assert after["student_only_exact"] == 1.0 and after["json_valid_unconstrained"] == 1.0
    for m in (before, after):
        assert m["n"] == 4 and "human" not in m
        for key in ("teacher_forced_acc", "student_only_exact", "json_valid_unconstrained"):
            assert 0.0 <= m[key] <= 1.0
        assert m["held_out_kl"] >= 0.0
        assert all(0.0 <= v <= 1.0 for v in m["field_agreement"].values())
        assert all(sum(map(sum, c["matrix"])) == 4 for c in m["confusion"].values())
    json.dumps(after)  # JSON-ready for eval.json


def test_bad_human_label_spec_fails_fast(grammar, vocab, gemma_tokenizer):
    rows = make_rows(EXAMPLES[:1], grammar, vocab, gemma_tokenizer)
    student = FixedAnswer([0], grammar.end_id, len(vocab))
    with pytest.raises(ValueError, match="human_labels.field='mood'"):
        evaluate(student, rows, vocab, grammar.end_id, grammar, DTYPE, MAX_COMMENT,
                 human_labels={**GOEMOTIONS_SENTIMENT, "field": "mood"})
    with pytest.raises(ValueError, match=r"\['glad'\] are not values of sentiment"):
        evaluate(student, rows, vocab, grammar.end_id, grammar, DTYPE, MAX_COMMENT,
                 human_labels={**GOEMOTIONS_SENTIMENT, "mapping": {"1": "glad"}})
