"""The run report (distill/report.py) on a small fake run directory, local and on S3; an eval.json of
today (choice points, margins, baselines, samples) and one written before those existed."""

import json
import math

import pytest

from distill import storage
from distill.report import ReportError, write_report

FIELDS = {"tone": ["aggressive", "neutral", "friendly"], "sentiment": ["negative", "neutral", "positive"]}


AGGRESSIVE = {"tone": "aggressive", "sentiment": "negative"}
FRIENDLY = {"tone": "friendly", "sentiment": "positive"}
NEW_FIELDS = {
    "n_choice_points": 80, "choice_point_acc": 0.8125, "student_only_exact_margin_ge_0.2": 0.9333,
    "agreement_by_margin": {
        "[0, 0.1)": {"n": 4, "student": 0.25, "majority_answer": 0.5, "bag_of_words": 0.5},
        "[0.1, 0.2)": {"n": 6, "student": 0.5, "majority_answer": 0.3333, "bag_of_words": 0.5},
        "[0.2, 0.4)": {"n": 0, "student": None, "majority_answer": None, "bag_of_words": None},
        "[0.4, 1]": {"n": 30, "student": 0.9333, "majority_answer": 0.4, "bag_of_words": 0.6},
        ">=0.2": {"n": 30, "student": 0.9333, "majority_answer": 0.4, "bag_of_words": 0.6}},
    "baselines": {"n_train": 360, "majority": AGGRESSIVE, "majority_answer": 0.4, "bag_of_words": 0.575},
    "samples": [{"text": "You <b>idiot</b> | go", "teacher": AGGRESSIVE, "student": AGGRESSIVE, "margin": 0.61},
                {"text": "thanks a lot", "teacher": FRIENDLY, "student": AGGRESSIVE, "margin": 0.04}],
}


def fake_eval(epoch=None, acc=0.9, new_fields=True) -> dict:
    result = {
        "n": 40, "n_tokens": 1040, "teacher_forced_acc": 0.990, "held_out_kl": 0.0123,
        "student_only_exact": 0.875, "json_valid_unconstrained": acc,
        "field_agreement": {"tone": 0.925, "sentiment": 0.9},
        "confusion": {f: {"labels": labels, "matrix": [[10, 2, 1], [0, 12, 1], [0, 0, 14]]}
                      for f, labels in FIELDS.items()},
        "human": {"field": "sentiment", "n": 30, "teacher_agreement": 0.7, "student_agreement": 2 / 3},
        **(NEW_FIELDS if new_fields else {}),
    }
    return result if epoch is None else {**result, "epoch": epoch}


def write_run(run_dir: str, with_eval: bool = True, new_fields: bool = True) -> None:
    steps = range(1, 21)
    metrics = [{"step": s, "epoch": (s - 1) // 10, "loss": 3 * math.exp(-s / 5), "kl": 2 * math.exp(-s / 5),
                "ce": math.exp(-s / 6), "kl_weight": 0.1 + 0.8 * 0.5 * (1 + math.cos(math.pi * s / 20)),
                "lr": 3e-4 * min(1, s / 5), "grad_norm": 1.0, "examples_per_s": 120.0 + s,
                "tokens_per_s": 3000.0, "mem_mb": 500.0 + s} for s in steps]
    storage.write_bytes(storage.join(run_dir, "metrics.jsonl"), "".join(json.dumps(m) + "\n" for m in metrics).encode())
    if with_eval:
        final = {**fake_eval(new_fields=new_fields),
                 "per_epoch": [fake_eval(0, 0.5, new_fields), fake_eval(1, 0.9, new_fields)]}
        storage.write_bytes(storage.join(run_dir, "eval.json"), json.dumps(final).encode())
    storage.write_bytes(storage.join(run_dir, "config.yaml"), b"train:\n  lr: 3.0e-4  # <b>not html</b>\n")


def check_report(html_uri: str, md_uri: str) -> None:
    page = storage.read_bytes(html_uri).decode()
    summary = storage.read_bytes(md_uri).decode()
    # loss; KL and CE; schedule; per-epoch accuracy; confusion matrices; agreement bars
    assert page.count('<img src="data:image/png;base64,') == 6
    for figure in ("99.0%", "87.5%", "90.0%", "0.0123", "92.5%", "70.0%", "66.7%", "520 MB"):
        assert figure in page and figure in summary
    assert "| student-only exact answers (constrained) | 87.5% |" in summary
    assert "| optimizer steps | 20 |" in summary
    assert "&lt;b&gt;not html&lt;/b&gt;" in page  # the config is shown, escaped

    # the student beside the baselines, all comments and per teacher-margin bucket; the samples
    for figure in ("81.2%", "93.3%", "40.0%", "57.5%"):
        assert figure in page and figure in summary
    assert "| choice-point accuracy (teacher-forced, constrained; 80 choices) | 81.2% |" in summary
    assert "| student-only exact where the teacher's margin >= 0.2 (30 comments) | 93.3% |" in summary
    assert "| bag-of-words baseline (TF-IDF + logistic regression), exact | 57.5% |" in summary
    assert "| comments | n | student | majority answer | bag of words |" in summary
    assert "| all | 40 | 87.5% | 40.0% | 57.5% |" in summary
    assert "| teacher margin [0.2, 0.4) | 0 | - | - | - |" in summary
    assert "| teacher margin >=0.2 | 30 | 93.3% | 40.0% | 60.0% |" in summary
    assert "<td>teacher margin [0, 0.1)</td><td>4</td><td>25.0%</td><td>50.0%</td><td>50.0%</td>" in page
    assert "| You <b>idiot</b> \\| go | aggressive/negative | aggressive/negative | yes | 0.61 |" in summary
    assert "| thanks a lot | friendly/positive | aggressive/negative | no | 0.04 |" in summary
    assert "<td>You &lt;b&gt;idiot&lt;/b&gt; | go</td>" in page  # escaped in the page


def test_report_local(tmp_path):
    run_dir = str(tmp_path / "run")
    write_run(run_dir)
    html_uri, md_uri = write_report(run_dir)
    assert (html_uri, md_uri) == (str(tmp_path / "run" / "report.html"), str(tmp_path / "run" / "summary.md"))
    check_report(html_uri, md_uri)


@pytest.mark.s3
def test_report_s3(s3_bucket):
    run_dir = f"{s3_bucket}/runs/r1"
    write_run(run_dir)
    check_report(*write_report(run_dir))


def test_report_while_training_has_no_eval_yet(tmp_path):
    run_dir = str(tmp_path / "run")
    write_run(run_dir, with_eval=False)
    html_uri, md_uri = write_report(run_dir)
    page = storage.read_bytes(html_uri).decode()
    assert page.count("data:image/png;base64,") == 3  # the training curves only
    assert "final loss" in storage.read_bytes(md_uri).decode()


def test_empty_run_dir_is_one_line(tmp_path):
    with pytest.raises(ReportError, match="neither metrics.jsonl nor eval.json") as e:
        write_report(str(tmp_path))
    assert "\n" not in str(e.value)


def test_report_of_an_eval_json_without_the_new_fields(tmp_path):
    run_dir = str(tmp_path / "run")
    write_run(run_dir, new_fields=False)
    html_uri, md_uri = write_report(run_dir)
    page = storage.read_bytes(html_uri).decode()
    summary = storage.read_bytes(md_uri).decode()
    assert page.count('<img src="data:image/png;base64,') == 6
    assert "| student-only exact answers (constrained) | 87.5% |" in summary
    for absent in ("choice-point", "baseline", "margin", "teacher and student on a few", "## "):
        assert absent not in summary.lower()
    assert "baselines" not in page and "teacher margin" not in page


def test_the_demo_prints_the_same_tables_as_text():
    from distill.cli import format_eval

    text = "\n".join(format_eval(fake_eval()))
    assert "held out (n=40): student-only exact 0.875; baselines learnt from 360 train records" in text
    rows = {line.strip().split("  ")[0]: line.split() for line in text.splitlines() if line.startswith("    ")}
    assert rows["all"][-4:] == ["40", "87.5%", "40.0%", "57.5%"]
    assert rows["teacher margin >=0.2"][-4:] == ["30", "93.3%", "40.0%", "60.0%"]
    assert rows["teacher margin [0.2, 0.4)"][-4:] == ["0", "-", "-", "-"]
    assert rows["thanks a lot"][-3:] == ["aggressive/negative", "no", "0.04"]
    assert "choice-point acc 0.812" in text and "vs human sentiment labels (n=30): teacher 0.700" in text

    old = "\n".join(format_eval(fake_eval(new_fields=False)))  # an eval dict from before these fields
    assert "student-only exact 0.875" in old and "baseline" not in old and "margin" not in old
    assert "choice-point" not in old
