"""The run report (distill/report.py) on a small fake run directory, local and on S3."""

import json
import math

import pytest

from distill import storage
from distill.report import ReportError, write_report

FIELDS = {"tone": ["aggressive", "neutral", "friendly"], "sentiment": ["negative", "neutral", "positive"]}


def fake_eval(epoch=None, acc=0.9) -> dict:
    result = {
        "n": 40, "n_tokens": 1040, "teacher_forced_acc": 0.990, "held_out_kl": 0.0123,
        "student_only_exact": 0.875, "json_valid_unconstrained": acc,
        "field_agreement": {"tone": 0.925, "sentiment": 0.9},
        "confusion": {f: {"labels": labels, "matrix": [[10, 2, 1], [0, 12, 1], [0, 0, 14]]}
                      for f, labels in FIELDS.items()},
        "human": {"field": "sentiment", "n": 30, "teacher_agreement": 0.7, "student_agreement": 2 / 3},
    }
    return result if epoch is None else {**result, "epoch": epoch}


def write_run(run_dir: str, with_eval: bool = True) -> None:
    steps = range(1, 21)
    metrics = [{"step": s, "epoch": (s - 1) // 10, "loss": 3 * math.exp(-s / 5), "kl": 2 * math.exp(-s / 5),
                "ce": math.exp(-s / 6), "kl_weight": 0.1 + 0.8 * 0.5 * (1 + math.cos(math.pi * s / 20)),
                "lr": 3e-4 * min(1, s / 5), "grad_norm": 1.0, "examples_per_s": 120.0 + s,
                "tokens_per_s": 3000.0, "mem_mb": 500.0 + s} for s in steps]
    storage.write_bytes(storage.join(run_dir, "metrics.jsonl"), "".join(json.dumps(m) + "\n" for m in metrics).encode())
    if with_eval:
        final = {**fake_eval(), "per_epoch": [fake_eval(0, 0.5), fake_eval(1, 0.9)]}
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
