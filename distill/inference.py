"""The student as a deliverable: the model artifact, greedy decoding, and `classify`.

An artifact is a directory or s3:// prefix (ARTIFACT_FORMAT_VERSION = 1):

| file              | what                                                                   |
|-------------------|------------------------------------------------------------------------|
| model.safetensors | the student's weights (safetensors: loading never runs pickled code)   |
| config.json       | format_version, student (StudentConfig), sep_id, end_id, tokenizer_hash, extras |
| vocab.json        | the output vocabulary (OutputVocab.to_dict)                            |
| task.json         | the task (Task.to_dict): fields, values, prompt text                   |
| tokenizer files   | the teacher's tokenizer (save_pretrained): the student reads its ids   |
| SHA256SUMS        | `sha256  name` of every other file, in `sha256sum` format; written last |

An artifact is complete only once SHA256SUMS exists, and every load checks every file
against it. Everything needed to classify travels with the artifact, so the answer
grammar is rebuilt from task.json and the stored tokenizer, and must give exactly the
stored vocabulary's required tokens.

Decoding runs the student's forward pass over the whole sequence at each step (the
context is at most 75 tokens, so no KV cache). Its inputs come from `data.student_sequence`, the encoding the
student was trained on: the prompt `student_sequence(comment, [])` = comment + SEP, then
the answer so far as teacher ids; training's `student_sequence(comment, answer)` is the
same prompt + answer[:-1], so step k sees exactly what training position k saw.
Constrained decoding masks what the answer automaton forbids, and runs the model only
for rows with a choice to make: most answer tokens are literal JSON (`{"`, `tone`, `":`)
that the automaton forces, so a reddit_moderation answer of 25-27 tokens takes 4 forward
passes, one per field ("only predict the necessary tokens", the original's wish).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass

import safetensors.torch
import torch
from transformers import AutoTokenizer

from distill import storage
from distill.constrained import AnswerAutomaton, AnswerGrammar
from distill.data import student_sequence
from distill.extract import encode_comment
from distill.model import Student, StudentConfig, build_student
from distill.task import Task, TaskError
from distill.teacher import pick_device, tokenizer_hash
from distill.vocab import OutputVocab, VocabError

ARTIFACT_FORMAT_VERSION = 1
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
VOCAB_NAME = "vocab.json"
TASK_NAME = "task.json"
SUMS_NAME = "SHA256SUMS"
REQUIRED_FILES = (WEIGHTS_NAME, CONFIG_NAME, VOCAB_NAME, TASK_NAME)


class ArtifactError(ValueError):
    """A student artifact that is incomplete, corrupted or of another format; one line, naming the URI."""


# -----------------------------------------------------------------------------
# Decoding


def _last_logits(model: Student, seqs: list[list[int]], device) -> torch.Tensor:
    """Logits (B, V) at the last real position of each sequence; right padding with an attention mask."""
    lengths = torch.tensor([len(s) for s in seqs])
    input_ids = torch.zeros((len(seqs), int(lengths.max())), dtype=torch.long)  # (B, T)
    for i, s in enumerate(seqs):
        input_ids[i, :len(s)] = torch.tensor(s)
    attention = torch.arange(input_ids.shape[1])[None, :] < lengths[:, None]  # (B, T)
    logits = model(input_ids.to(device), attention.to(device))  # (B, T, V)
    return logits[torch.arange(len(seqs), device=device), lengths.to(device) - 1].float()  # (B, V)


@torch.no_grad()
def greedy_decode(model: Student, comments_ids: list[list[int]], sep_id: int, vocab_ids: list[int],
                  max_comment_tokens: int, max_steps: int, automaton: AnswerAutomaton | None) -> list[list[int]]:
    """Greedy answers of a batch of comments, as output-vocabulary indices.

    Constrained (automaton given): at each step only the indices the automaton allows
    compete; a row stops on reaching `automaton.final`, so with max_steps >=
    automaton.max_steps every answer is complete and valid. Unconstrained (None): argmax
    over the whole output vocabulary; a row stops after the end index (that of sep_id)
    or after max_steps. Each returned answer ends with the end index if it was reached.
    Comments longer than max_comment_tokens are cut, as in training."""
    device = next(model.parameters()).device
    prompts = [student_sequence(c, [], sep_id, max_comment_tokens) for c in comments_ids]
    answers: list[list[int]] = [[] for _ in comments_ids]
    end_index = list(vocab_ids).index(sep_id)
    if automaton is not None:
        automaton = automaton.to(device)
        states = torch.zeros(len(comments_ids), dtype=torch.long, device=device)  # (B,)
    active = list(range(len(comments_ids)))  # rows still decoding

    def inputs(rows: list[int]) -> list[list[int]]:  # comment + SEP + the answer so far, as teacher ids
        return [prompts[r] + [vocab_ids[i] for i in answers[r]] for r in rows]

    for _ in range(max_steps):
        if not active:
            break
        rows = torch.tensor(active, device=device)  # (A,)
        if automaton is None:
            choice = _last_logits(model, inputs(active), device).argmax(-1)  # (A,)
            done = (choice == end_index).tolist()  # host sync: once per step
        else:
            allowed = automaton.mask(states[rows])  # (A, V)
            needs_model = allowed.sum(-1) > 1  # (A,) rows with a choice; the others have one allowed index
            scores = torch.zeros(allowed.shape, device=device)  # (A, V)
            run = [r for r, needed in zip(active, needs_model.tolist()) if needed]  # host sync
            if run:
                scores[needs_model] = _last_logits(model, inputs(run), device)
            choice = scores.masked_fill(~allowed, float("-inf")).argmax(-1)  # (A,)
            states[rows] = automaton.step(states[rows], choice)
            done = (states[rows] == automaton.final).tolist()  # host sync
        for r, c in zip(active, choice.tolist()):
            answers[r].append(c)
        active = [r for r, finished in zip(active, done) if not finished]
    return answers


# -----------------------------------------------------------------------------
# The loaded student


@dataclass
class StudentModel:
    """A student ready to classify: the model and everything that turns text into its answers."""

    model: Student
    task: Task
    vocab: OutputVocab
    tokenizer: object
    grammar: AnswerGrammar
    automaton: AnswerAutomaton
    sep_id: int
    device: torch.device

    def classify(self, texts: list[str], constrained: bool = True, batch_size: int = 64) -> list[dict]:
        """Per text: {"text", "answer" (dict, or None if not a valid answer), "raw" (the answer's text), "valid"}.

        Constrained decoding always gives a valid answer (also for empty, over-long and
        non-English texts). Unconstrained, `answer` is whatever `task.parse_answer` reads
        from the decoded text: valid JSON with the task's fields and values, however tokenized."""
        cfg = self.model.cfg
        max_steps = self.automaton.max_steps if constrained else cfg.max_answer_tokens
        results = []
        for start in range(0, len(texts), batch_size):
            chunk = texts[start:start + batch_size]
            comments = [encode_comment(self.tokenizer, text) for text in chunk]
            decoded = greedy_decode(self.model, comments, self.sep_id, self.vocab.ids, cfg.max_comment_tokens,
                                    max_steps, self.automaton if constrained else None)
            for text, indices in zip(chunk, decoded):
                teacher_ids = [self.vocab.ids[i] for i in indices]
                if teacher_ids and teacher_ids[-1] == self.sep_id:
                    teacher_ids.pop()
                raw = self.tokenizer.decode(teacher_ids)
                answer = self.task.parse_answer(raw)
                results.append({"text": text, "answer": answer, "raw": raw, "valid": answer is not None})
        return results


# -----------------------------------------------------------------------------
# The artifact


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def save_artifact(uri: str, model: Student, task: Task, vocab: OutputVocab, tokenizer, sep_id: int,
                  extra: dict | None = None) -> None:
    """Write the artifact (see the module docstring) to a directory or s3:// prefix; SHA256SUMS last.

    `extra` (e.g. epoch, metrics, the training config) goes into config.json; it may not
    reuse config.json's own keys. Weights are saved in the dtype they have."""
    config = {"format_version": ARTIFACT_FORMAT_VERSION, "student": dataclasses.asdict(model.cfg),
              "sep_id": sep_id, "end_id": sep_id, "tokenizer_hash": tokenizer_hash(tokenizer)}
    clash = sorted(set(config) & set(extra or {}))
    if clash:
        raise ValueError(f"save_artifact: extra may not set {', '.join(clash)}")
    config.update(extra or {})
    state = {name: t.detach().cpu().contiguous() for name, t in model.state_dict().items()}
    files = {
        WEIGHTS_NAME: safetensors.torch.save(state),
        CONFIG_NAME: json.dumps(config, indent=2, ensure_ascii=False).encode(),
        VOCAB_NAME: json.dumps(vocab.to_dict(), ensure_ascii=False).encode(),
        TASK_NAME: json.dumps(task.to_dict(), indent=2, ensure_ascii=False).encode(),
    }
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        for name in sorted(os.listdir(tmp)):
            with open(os.path.join(tmp, name), "rb") as f:
                files[name] = f.read()
    for name, data in files.items():
        storage.write_bytes(storage.join(uri, name), data)
    sums = "".join(f"{_sha256(data)}  {name}\n" for name, data in sorted(files.items()))
    storage.write_bytes(storage.join(uri, SUMS_NAME), sums.encode())


def _read(uri: str) -> bytes:
    try:
        return storage.read_bytes(uri)
    except (storage.StorageError, FileNotFoundError):
        raise ArtifactError(f"{uri}: missing") from None


def read_artifact(uri: str) -> dict[str, bytes]:
    """name -> bytes of every file SHA256SUMS lists (SHA256SUMS included), each checked against it."""
    sums_uri = storage.join(uri, SUMS_NAME)
    if not storage.exists(sums_uri):
        raise ArtifactError(f"{uri}: no {SUMS_NAME}, not a complete student artifact")
    sums = _read(sums_uri)
    expected = {}
    for line in sums.decode().splitlines():
        digest, _, name = line.partition("  ")
        if len(digest) != 64 or not name or "/" in name or name.startswith("."):
            raise ArtifactError(f"{sums_uri}: malformed line {line!r}")
        expected[name] = digest
    missing = [name for name in REQUIRED_FILES if name not in expected]
    if missing:
        raise ArtifactError(f"{sums_uri}: does not list {', '.join(missing)}")
    files = {}
    for name, digest in expected.items():
        data = _read(storage.join(uri, name))
        if _sha256(data) != digest:
            raise ArtifactError(f"{storage.join(uri, name)}: checksum does not match {SUMS_NAME}")
        files[name] = data
    files[SUMS_NAME] = sums
    return files


def download_artifact(uri: str, dest: str) -> str:
    """Copy an artifact (local or s3://) to the local directory `dest`, verified; SHA256SUMS last. Returns dest."""
    files = read_artifact(uri)
    sums = files.pop(SUMS_NAME)
    for name, data in files.items():
        storage.write_bytes(os.path.join(dest, name), data)
    storage.write_bytes(os.path.join(dest, SUMS_NAME), sums)
    return dest


def load_artifact(uri: str, device=None) -> StudentModel:
    """The student saved at `uri` (local or s3://), every file verified, on `device` (default: CUDA if any)."""
    files = read_artifact(uri)
    config = json.loads(files[CONFIG_NAME])
    version = config.get("format_version")
    if version != ARTIFACT_FORMAT_VERSION:
        raise ArtifactError(f"{uri}: artifact format {version!r}, this distill reads {ARTIFACT_FORMAT_VERSION}")
    with tempfile.TemporaryDirectory() as tmp:
        for name, data in files.items():
            if name not in REQUIRED_FILES and name != SUMS_NAME:
                with open(os.path.join(tmp, name), "wb") as f:
                    f.write(data)
        tokenizer = AutoTokenizer.from_pretrained(tmp)
    if config.get("tokenizer_hash") not in (None, tokenizer_hash(tokenizer)):
        raise ArtifactError(f"{uri}: the stored tokenizer does not reload to the one the student was saved with")
    try:
        vocab = OutputVocab.from_dict(json.loads(files[VOCAB_NAME]))
        task = Task.from_dict(json.loads(files[TASK_NAME]), source=storage.join(uri, TASK_NAME))
        grammar = AnswerGrammar(task, tokenizer, config["end_id"])
    except (VocabError, TaskError) as e:
        raise ArtifactError(f"{uri}: {e}") from None
    if grammar.token_ids() != list(vocab.ids[:vocab.n_required]):
        raise ArtifactError(f"{uri}: the task's answer tokens are not the vocabulary's required tokens")

    device = torch.device(device) if device is not None else pick_device()
    with torch.device("meta"):  # no random initialisation: the weights come next
        model = build_student(StudentConfig(**config["student"]))
    try:
        model.load_state_dict(safetensors.torch.load(files[WEIGHTS_NAME]), assign=True)
    except RuntimeError as e:  # missing, unexpected or mis-shaped tensors: a multi-line message
        raise ArtifactError(f"{uri}: {WEIGHTS_NAME} does not fit config.json's student "
                            f"({' '.join(str(e).split())[:300]})") from None
    model = model.to(device).eval()
    return StudentModel(model, task, vocab, tokenizer, grammar, grammar.automaton(vocab).to(device),
                        config["sep_id"], device)
