"""Held-out evaluation (distill/evaluate.py): exact values on a student whose answers are known, and a tiny
student that learns to copy the teacher, on records made from the real grammar and vocabulary; choice-point
accuracy and teacher margins against naive references; the majority and bag-of-words baselines."""

import io
import json
import math
import random
from types import SimpleNamespace

import pyarrow.parquet as pq
import pytest
import torch

from distill import records
from distill.data import collate
from distill.evaluate import GOEMOTIONS_SENTIMENT, baselines, evaluate, human_label, margin_bucket
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


def make_rows(examples, grammar, vocab, tokenizer, seed=0, chosen_logits=None) -> list[dict]:
    """Record rows, as read back from a Parquet shard, from (text, answer, human labels) triples.

    The teacher's logits are random with its chosen token 4 above the rest; or, with
    chosen_logits (one number per example), 0 with the chosen token at that number."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i, (text, values, labels) in enumerate(examples):
        answer_ids = vocab.indices(grammar.encode_answer(values))
        if chosen_logits is None:
            logits = torch.randn(len(answer_ids), len(vocab), generator=g)
            logits[torch.arange(len(answer_ids)), answer_ids] += 4.0
        else:
            logits = torch.zeros(len(answer_ids), len(vocab))
            logits[torch.arange(len(answer_ids)), answer_ids] = chosen_logits[i]
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
    model = build_student(StudentConfig(preset="tiny", input_vocab_size=262144, output_vocab_size=len(vocab)))

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
        assert m["n"] == 4 and "human" not in m and "baselines" not in m
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


class NoisyAnswer(FixedAnswer):
    """FixedAnswer plus fixed noise in [0, 1) at every answer step (the same whatever the comment),
    so that no two logits tie: where its fixed answer's token is not allowed, the allowed token
    with the most noise is the constrained argmax."""

    def __init__(self, target: list[int], sep_id: int, vocab_size: int, max_steps: int = 40):
        super().__init__(target, sep_id, vocab_size)
        self.noise = torch.rand(max_steps, vocab_size, generator=torch.Generator().manual_seed(1))

    def logits(self, input_ids):
        logits = super().logits(input_ids)
        for b in range(len(input_ids)):
            sep = int((input_ids[b] == self.sep_id).nonzero()[0])
            logits[b, sep:] += self.noise[:input_ids.shape[1] - sep]
        return logits


def margin_logit(margin: float) -> float:
    """The chosen token's logit (the others 0) that gives a 3-way choice this top-two probability gap:
    (e^c - 1) / (e^c + 2) = margin. A 2-way choice at the same logit has a larger gap, tanh(c / 2),
    so on reddit_moderation (tone and sentiment 3 ways) the row's margin is `margin`."""
    return math.log((1 + 2 * margin) / (1 - margin))


def test_margin_bucket_edges():
    assert [margin_bucket(m) for m in (0.0, 0.099, 0.1, 0.199, 0.2, 0.399, 0.4, 0.9, 1.0)] == [
        "[0, 0.1)", "[0, 0.1)", "[0.1, 0.2)", "[0.1, 0.2)", "[0.2, 0.4)", "[0.2, 0.4)", "[0.4, 1]", "[0.4, 1]",
        "[0.4, 1]"]


def test_choice_points_and_margins_against_naive_references(task, grammar, vocab, gemma_tokenizer):
    margins = [0.05, 0.15, 0.3, 0.5, None, 0.35]  # None: chosen logit 20, margin 1 in float32
    chosen = [margin_logit(m) if m is not None else 20.0 for m in margins]
    examples = EXAMPLES * 2  # 12 comments: the student (always STUDENT_ANSWER) agrees on rows 0, 5, 6, 11
    rows = make_rows(examples, grammar, vocab, gemma_tokenizer, chosen_logits=chosen * 2)
    target = vocab.indices(grammar.encode_answer(STUDENT_ANSWER))
    student = NoisyAnswer(target, grammar.end_id, len(vocab))
    m = evaluate(student, rows, vocab, grammar.end_id, grammar, DTYPE, MAX_COMMENT, batch_size=5)

    # naive references, one step at a time: the automaton's allowed tokens from its table, the
    # student's scores as NoisyAnswer defines them, the teacher's softmax over the allowed tokens
    table = grammar.automaton(vocab).table.tolist()
    hits = points = 0
    expected_margins = []
    for r in rows:
        logits = records.decode_logits(r["logits"], r["n_steps"], len(vocab), DTYPE).float()
        state, gaps = 0, []
        for k, index in enumerate(r["answer_ids"]):
            allowed = [i for i, nxt in enumerate(table[state]) if nxt >= 0]
            if len(allowed) > 1:
                scores = [float(student.noise[k, i]) + (10.0 if k < len(target) and i == target[k] else 0.0)
                          for i in allowed]
                points += 1
                hits += allowed[scores.index(max(scores))] == index
                probs = sorted(torch.softmax(logits[k, allowed], -1).tolist(), reverse=True)
                gaps.append(probs[0] - probs[1])
            state = table[state][index]
        expected_margins.append(min(gaps))

    assert points == 4 * len(rows)  # one choice per field: 'harm' -> 'ful', 'respect' -> 'ful' are forced
    assert m["n_choice_points"] == points
    assert m["choice_point_acc"] == pytest.approx(hits / points)
    assert 0 < m["choice_point_acc"] < m["teacher_forced_acc"]  # the forced JSON tokens are the easy ones

    assert expected_margins[:6] == pytest.approx([0.05, 0.15, 0.3, 0.5, 1.0, 0.35], abs=0.01)
    by_margin = m["agreement_by_margin"]
    assert {label: b["n"] for label, b in by_margin.items()} == {
        "[0, 0.1)": 2, "[0.1, 0.2)": 2, "[0.2, 0.4)": 4, "[0.4, 1]": 4, ">=0.2": 8}
    # the student agrees on rows 0 and 5 (and 6, 11): margins 0.05 and 0.35
    assert {label: b["student"] for label, b in by_margin.items()} == {
        "[0, 0.1)": 1.0, "[0.1, 0.2)": 0.0, "[0.2, 0.4)": 0.5, "[0.4, 1]": 0.0, ">=0.2": 0.25}
    assert m["student_only_exact_margin_ge_0.2"] == 0.25
    assert all(set(b) == {"n", "student"} for b in by_margin.values())  # no baselines without train_rows

    # samples: the first 4 rows, then the first 4 disagreements after them (rows 4, 7, 8, 9)
    assert [s["text"] for s in m["samples"]] == [examples[i][0] for i in (0, 1, 2, 3, 4, 7, 8, 9)]
    for s, i in zip(m["samples"], (0, 1, 2, 3, 4, 7, 8, 9)):
        assert s["teacher"] == examples[i][1] and s["student"] == STUDENT_ANSWER
        assert s["margin"] == pytest.approx(expected_margins[i], abs=1e-5)
    json.dumps(m)


def text_row(text: str, values: dict) -> dict:
    return {"text": text, "answer": list(values.items())}  # as records give it: (key, value) pairs


A = answer("aggressive", "negative", "harmful", "toxic")
F = answer("friendly", "positive", "safe", "respectful")
N = answer("neutral", "neutral", "safe", "respectful")


def test_majority_baseline_on_hand_made_rows():
    train = [text_row("a", F), text_row("b", A), text_row("c", F), text_row("d", N), text_row("e", F)]
    held_out = [text_row("x", F), text_row("y", A), text_row("z", N)]
    result = baselines(train, held_out)
    assert result["majority"] == F and list(result["majority"]) == list(F)  # the fields in the task's order
    assert result["majority_answer"] == [F, F, F]
    assert len(result["bag_of_words"]) == 3
    # a tie (A twice, N twice) goes to the first answer in sorted JSON order: "aggressive" < "neutral"
    tie = baselines([text_row("a", N), text_row("b", A), text_row("c", N), text_row("d", A)], held_out)
    assert tie["majority"] == A
    # one answer only: both baselines give it
    assert baselines([text_row("a", N), text_row("b", N)], held_out)["bag_of_words"] == [N, N, N]
    with pytest.raises(ValueError, match="no training rows"):
        baselines([], held_out)


def synthetic_rows(n: int, seed: int) -> list[dict]:
    """Comments whose words give the answer away: half aggressive, 30% friendly, 20% neutral, amid filler."""
    rng = random.Random(seed)
    words = {"A": ["idiot", "moron", "hate", "stupid", "shut"], "F": ["thanks", "love", "great", "awesome", "kind"],
             "N": ["schedule", "tuesday", "meeting", "address", "train"]}
    filler = ["the", "this", "really", "post", "people", "just", "about", "thread", "guy", "week"]
    rows = []
    for _ in range(n):
        key = rng.choices("AFN", weights=[5, 3, 2])[0]
        text = rng.sample(filler, 3) + rng.sample(words[key], 3)
        rows.append(text_row(" ".join(rng.sample(text, 6)), {"A": A, "F": F, "N": N}[key]))
    return rows


def test_bag_of_words_beats_majority_on_a_separable_set():
    train, held_out = synthetic_rows(80, seed=0), synthetic_rows(40, seed=1)
    result = baselines(train, held_out)
    truth = [dict(r["answer"]) for r in held_out]

    def exact(answers):
        return sum(a == t for a, t in zip(answers, truth)) / len(truth)

    assert result["majority"] == A
    assert exact(result["majority_answer"]) == sum(t == A for t in truth) / len(truth) < 0.7
    assert exact(result["bag_of_words"]) >= 0.95
    assert exact(result["bag_of_words"]) > exact(result["majority_answer"]) + 0.25


def test_evaluate_reports_baselines_beside_the_student(grammar, vocab, gemma_tokenizer):
    chosen = [margin_logit(m) for m in (0.05, 0.15, 0.3, 0.5, 0.7, 0.35)]
    rows = make_rows(EXAMPLES, grammar, vocab, gemma_tokenizer, chosen_logits=chosen)
    # training rows: aggressive answers the most common; the held-out comments' texts among them
    train = [text_row(text, values) for text, values, _ in EXAMPLES] + [text_row("Go away, idiot.", A)]
    student = FixedAnswer(vocab.indices(grammar.encode_answer(F)), grammar.end_id, len(vocab))
    m = evaluate(student, rows, vocab, grammar.end_id, grammar, DTYPE, MAX_COMMENT, train_rows=train)

    expected = baselines(train, rows)
    teacher = [values for _, values, _ in EXAMPLES]
    assert expected["majority"] == A
    assert m["baselines"] == {
        "n_train": 7, "majority": A, "majority_answer": 2 / 6,  # rows 0 and 5 are aggressive/.../toxic
        "bag_of_words": sum(a == t for a, t in zip(expected["bag_of_words"], teacher)) / 6}
    assert m["student_only_exact"] == pytest.approx(1 / 6)  # the student always says F: row 2
    # rows by margin bucket: [0, 0.1): 0; [0.1, 0.2): 1; [0.2, 0.4): 2, 5; [0.4, 1]: 3, 4
    by_margin = m["agreement_by_margin"]
    assert by_margin["[0, 0.1)"] == {"n": 1, "student": 0.0, "majority_answer": 1.0,
                                     "bag_of_words": float(expected["bag_of_words"][0] == teacher[0])}
    assert by_margin["[0.2, 0.4)"]["student"] == 0.5 and by_margin["[0.2, 0.4)"]["majority_answer"] == 0.5
    assert by_margin["[0.4, 1]"]["majority_answer"] == 0.0
    assert by_margin[">=0.2"]["n"] == 4 and by_margin[">=0.2"]["majority_answer"] == 0.25
    json.dumps(m)


def test_inspect_summary_of_the_teacher_margin_and_human_agreement():
    import math

    import pyarrow as pa

    from distill import records

    # automaton over 3 output tokens: state 0 chooses token 0 or 1, state 1 forces token 2, then final
    transitions = [{0: 1, 1: 1}, {2: 2}, {}]
    manifest = {"vocab": {"ids": [10, 11, 12]}, "logits_dtype": "float16",
                "task": {"fields": {"sentiment": ["positive", "neutral", "negative"]}}}

    def row(first_logits, sentiment, labels):
        logits = torch.tensor([first_logits, [0.0, 0.0, 5.0]])
        return {"id": sentiment + labels, "split": "train", "text": "a comment", "comment_ids": [1, 2],
                "answer_text": sentiment, "answer": [("sentiment", sentiment)], "answer_ids": [0, 2], "n_steps": 2,
                "provenance": json.dumps({"labels": labels}), "logits": records.encode_logits(logits, "float16")}

    rows = [row([2.0, 0.0, 9.0], "negative", "1"),     # sure (token 2 is not allowed at the choice), human agrees
            row([0.0, 0.0, 0.0], "positive", "1"),     # a tie: margin 0, human disagrees
            row([1.0, 0.0, 0.0], "negative", "0")]     # ambiguous label only: not counted
    table = pa.Table.from_pylist(rows, schema=records.SCHEMA)
    sure = math.tanh(1.0)  # softmax([2, 0]) top-two gap = tanh(1)
    assert abs(records.teacher_margin(rows[0], transitions, 3, "float16") - sure) < 1e-3
    assert records.teacher_margin(rows[1], transitions, 3, "float16") == 0.0
    with pytest.raises(ValueError, match="record positive1: answer_ids are not an answer"):
        records.teacher_margin(dict(rows[1], answer_ids=[2, 2]), transitions, 3, "float16")
    lines = records.teacher_summary(manifest, table, transitions)
    assert lines[0].startswith("teacher   2 distinct answers; margin < 0.1 on 33.3%, >= 0.2 on 66.7%, >= 0.4 on 66.7%")
    assert "sentiment = the human label (GoEmotions) on 50.0% of 2 labelled comments" in lines[1]
    no_sentiment = dict(manifest, task={"fields": {"tone": ["a", "b"]}})
    assert len(records.teacher_summary(no_sentiment, table, transitions)) == 1
