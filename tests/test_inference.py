"""The student artifact and decoding (distill/inference.py), with a tiny random student on the real
Gemma 3 tokenizer, answer grammar and output vocabulary."""

import hashlib
import json
import os
import shutil

import pytest
import torch

from distill.data import collate
from distill.inference import (
    ArtifactError,
    StudentModel,
    download_artifact,
    greedy_decode,
    load_artifact,
    save_artifact,
)
from distill.model import StudentConfig, build_student
from distill.vocab import build_output_vocab

TEXTS = [
    "",
    "word " * 300,  # far past max_comment_tokens
    "このコメントは本当にひどいと思います。",
    "🔥🔥🔥 😡 👍🏽",
    "Thanks, that was really helpful!",
    "Nobody asked for your opinion, idiot.",
]


@pytest.fixture(scope="module")
def vocab(grammar, gemma_tokenizer):
    return build_output_vocab(grammar, gemma_tokenizer, 64, "", ["some corpus text"])


@pytest.fixture(scope="module")
def automaton(grammar, vocab):
    return grammar.automaton(vocab)


def random_student(vocab, seed: int, sharpness: float = 1.0):
    """A tiny random student; `sharpness` scales the output head, so argmaxes vary from token to token."""
    torch.manual_seed(seed)
    model = build_student(StudentConfig(preset="tiny", input_vocab_size=262144, output_vocab_size=len(vocab))).eval()
    with torch.no_grad():
        model.head.weight.mul_(sharpness)
    return model


def student_model(model, task, vocab, tokenizer, grammar, automaton) -> StudentModel:
    return StudentModel(model, task, vocab, tokenizer, grammar, automaton, grammar.end_id, torch.device("cpu"))


def comments(tokenizer):
    return [tokenizer.encode(t, add_special_tokens=False) for t in TEXTS]


def same_logits(a, b, gemma_tokenizer):
    ids = torch.tensor([gemma_tokenizer.encode("a quick check of the weights", add_special_tokens=False) + [1]])
    with torch.no_grad():
        return torch.equal(a(ids), b(ids))


# -----------------------------------------------------------------------------
# The artifact


@pytest.fixture(scope="module")
def saved(tmp_path_factory, task, vocab, grammar, gemma_tokenizer):
    """(uri, model): a tiny random student saved once for the local tests."""
    model = random_student(vocab, seed=0)
    uri = str(tmp_path_factory.mktemp("artifact") / "student")
    save_artifact(uri, model, task, vocab, gemma_tokenizer, grammar.end_id, extra={"epoch": 3})
    return uri, model


def test_round_trip_local(saved, task, vocab, grammar, gemma_tokenizer):
    uri, model = saved
    names = set(os.listdir(uri))
    assert {"model.safetensors", "config.json", "vocab.json", "task.json", "SHA256SUMS", "tokenizer.json"} <= names
    with open(os.path.join(uri, "SHA256SUMS")) as f:
        assert {line.split("  ")[1] for line in f.read().splitlines()} == names - {"SHA256SUMS"}
    with open(os.path.join(uri, "config.json")) as f:
        config = json.load(f)
    assert config["format_version"] == 1 and config["epoch"] == 3 and config["end_id"] == config["sep_id"] == 1

    loaded = load_artifact(uri, device="cpu")
    assert same_logits(model, loaded.model, gemma_tokenizer)
    assert loaded.vocab == vocab and loaded.task == task and loaded.sep_id == grammar.end_id
    assert not loaded.model.training
    assert all(r["valid"] for r in loaded.classify(TEXTS[:2]))


def test_precision_bf16_runs_the_student_under_autocast(saved):
    uri, _ = saved
    fp32, bf16 = load_artifact(uri, device="cpu", precision="fp32"), load_artifact(uri, device="cpu", precision="bf16")
    ids = torch.tensor([[5, 6, 7]])
    for student, dtype in ((fp32, torch.float32), (bf16, torch.bfloat16)):
        with student.autocast():
            assert student.model(ids).dtype == dtype
        assert student.model.embed.weight.dtype == torch.float32  # the weights stay as saved
    assert all(r["valid"] for r in bf16.classify(TEXTS[:2]))
    with pytest.raises(ValueError, match="precision 'fp16': must be auto, fp32 or bf16"):
        load_artifact(uri, device="cpu", precision="fp16")


@pytest.mark.s3
def test_round_trip_s3_and_download(s3_bucket, tmp_path, task, vocab, grammar, gemma_tokenizer):
    model = random_student(vocab, seed=1)
    uri = f"{s3_bucket}/runs/r1/student"
    save_artifact(uri, model, task, vocab, gemma_tokenizer, grammar.end_id)
    assert same_logits(model, load_artifact(uri, device="cpu").model, gemma_tokenizer)

    local = download_artifact(uri, str(tmp_path / "copy"))
    assert same_logits(model, load_artifact(local, device="cpu").model, gemma_tokenizer)


def test_refuses_corrupted_incomplete_or_other_format(saved, tmp_path):
    uri = str(tmp_path / "student")
    shutil.copytree(saved[0], uri)

    def fails(match):
        with pytest.raises(ArtifactError, match=match) as e:
            load_artifact(uri, device="cpu")
        assert "\n" not in str(e.value)

    weights = tmp_path / "student" / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    fails(r"model\.safetensors: checksum does not match SHA256SUMS")
    weights.write_bytes(good)

    config_path = tmp_path / "student" / "config.json"
    config = json.loads(config_path.read_text())
    config["format_version"] = 2
    config_path.write_text(json.dumps(config))
    sums_path = tmp_path / "student" / "SHA256SUMS"
    sums = sums_path.read_text()
    new_digest = hashlib.sha256(config_path.read_bytes()).hexdigest()
    sums_path.write_text("\n".join(f"{new_digest}  config.json" if line.endswith("  config.json") else line
                                   for line in sums.splitlines()) + "\n")
    fails("artifact format 2, this distill reads 1")

    os.remove(tmp_path / "student" / "vocab.json")
    fails(r"vocab\.json: missing")
    os.remove(sums_path)
    fails("no SHA256SUMS, not a complete student artifact")


# -----------------------------------------------------------------------------
# Decoding


@pytest.mark.parametrize("seed", range(3))
def test_constrained_answers_are_always_valid(seed, task, vocab, grammar, automaton, gemma_tokenizer):
    """Empty, over-long, Japanese and emoji comments: every constrained answer is complete and valid."""
    model = random_student(vocab, seed, sharpness=30.0)
    decoded = greedy_decode(model, comments(gemma_tokenizer), grammar.end_id, vocab.ids, 25,
                            automaton.max_steps, automaton)
    for indices in decoded:
        assert automaton.accepts(indices)

    results = student_model(model, task, vocab, gemma_tokenizer, grammar, automaton).classify(TEXTS, batch_size=4)
    assert [r["text"] for r in results] == TEXTS
    for r, indices in zip(results, decoded):
        assert r["valid"] and task.parse_answer(r["raw"]) == r["answer"]
        assert grammar.decode_answer([vocab.ids[i] for i in indices]) == r["answer"]


def test_random_students_give_different_answers(task, vocab, grammar, automaton, gemma_tokenizer):
    """The masking chooses among real alternatives: the answers are not all one forced path."""
    answers = set()
    for seed in range(6):
        model = random_student(vocab, seed, sharpness=30.0)
        for r in student_model(model, task, vocab, gemma_tokenizer, grammar, automaton).classify(TEXTS):
            answers.add(json.dumps(r["answer"]))
    assert len(answers) > 3


def test_unconstrained_classify_reports_what_it_decoded(task, vocab, grammar, automaton, gemma_tokenizer):
    model = random_student(vocab, seed=0, sharpness=30.0)
    results = student_model(model, task, vocab, gemma_tokenizer, grammar, automaton).classify(TEXTS, constrained=False)
    for r in results:
        assert isinstance(r["raw"], str) and r["valid"] == (r["answer"] is not None)
        assert r["answer"] == task.parse_answer(r["raw"])


@pytest.mark.parametrize("constrained", [True, False])
def test_batched_equals_one_at_a_time(constrained, vocab, grammar, automaton, gemma_tokenizer):
    model = random_student(vocab, seed=5, sharpness=30.0)
    fsm = automaton if constrained else None
    steps = automaton.max_steps if constrained else 12
    batched = greedy_decode(model, comments(gemma_tokenizer), grammar.end_id, vocab.ids, 25, steps, fsm)
    single = [greedy_decode(model, [c], grammar.end_id, vocab.ids, 25, steps, fsm)[0]
              for c in comments(gemma_tokenizer)]
    assert batched == single
    if not constrained:
        end = vocab.index(grammar.end_id)
        assert all(len(a) == steps or (a[-1] == end and end not in a[:-1]) for a in batched)


def naive_constrained_decode(model, comment_ids, sep_id, vocab_ids, automaton):
    """One comment, the model run at every step (also where the automaton allows one token), no padding."""
    state, answer = 0, []
    while state != automaton.final:
        ids = comment_ids[:25] + [sep_id] + [vocab_ids[i] for i in answer]
        with torch.no_grad():
            logits = model(torch.tensor([ids]))[0, -1]  # (V,)
        allowed = automaton.allowed(state)
        answer.append(allowed[int(logits[allowed].argmax())])
        state = int(automaton.table[state, answer[-1]])
    return answer


def test_skipping_forced_steps_changes_nothing(vocab, grammar, automaton, gemma_tokenizer):
    """The fast path (no forward pass where only one token is allowed) against the obvious slow one."""
    for seed in range(3):
        model = random_student(vocab, seed, sharpness=30.0)
        fast = greedy_decode(model, comments(gemma_tokenizer), grammar.end_id, vocab.ids, 25,
                             automaton.max_steps, automaton)
        assert fast == [naive_constrained_decode(model, c, grammar.end_id, vocab.ids, automaton)
                        for c in comments(gemma_tokenizer)]


def test_decoding_sees_what_training_sees(vocab, grammar, gemma_tokenizer):
    """Feed a free-running answer back as a record through data.collate: the teacher-forced argmax at
    every answer position is the token the decoder chose, so decoding and training encode alike."""
    model = random_student(vocab, seed=2, sharpness=30.0)
    decoded = greedy_decode(model, comments(gemma_tokenizer), grammar.end_id, vocab.ids, 25, 12, None)
    rows = [{"comment_ids": c, "answer_ids": a, "n_steps": len(a), "logits": bytes(2 * len(a) * len(vocab))}
            for c, a in zip(comments(gemma_tokenizer), decoded)]
    batch = collate(rows, vocab.ids, grammar.end_id, 25, "bfloat16")
    with torch.no_grad():
        predicted = model(batch.input_ids, batch.attention_mask).argmax(-1)  # (B, T)
    for i, answer in enumerate(decoded):
        assert predicted[i][batch.loss_mask[i]].tolist() == answer
