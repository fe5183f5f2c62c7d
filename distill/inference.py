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

Decoding reads each token once, keeping keys and values in a KVCache. Its inputs come
from `data.student_sequence`, the encoding the student was trained on: the prompt `student_sequence(comment, [])` = comment + SEP, then
the answer so far as teacher ids; training's `student_sequence(comment, answer)` is the
same prompt + answer[:-1], so step k sees exactly what training position k saw.
Constrained decoding masks what the answer automaton forbids, and runs the model only
for rows with a choice to make: most answer tokens are literal JSON (`{"`, `tone`, `":`)
that the automaton forces, so a reddit_moderation answer of 25-27 tokens takes 4 forward
passes, one per field ("only predict the necessary tokens", the original's wish): the
first reads the comment, each later one only the tokens since the last choice.
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
from distill.model import KVCache, Student, StudentConfig, build_student
from distill.task import Task, TaskError
from distill.teacher import pick_device, tokenizer_hash, use_bf16
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


def _read_next(model: Student, cache: KVCache, chunks: list[list[int]], device) -> torch.Tensor:
    """Feed each row its next tokens (left-padded, so every row's last token is last); (B, V) logits after it."""
    width = max(len(c) for c in chunks)
    input_ids = torch.zeros((len(chunks), width), dtype=torch.long)  # (B, W)
    real = torch.zeros((len(chunks), width), dtype=torch.bool)  # (B, W)
    for i, c in enumerate(chunks):
        input_ids[i, width - len(c):] = torch.tensor(c)
        real[i, width - len(c):] = True
    return model(input_ids.to(device), real.to(device), cache=cache)[:, -1].float()  # (B, V)


@torch.no_grad()
def greedy_decode(model: Student, comments_ids: list[list[int]], sep_id: int, vocab_ids: list[int],
                  max_comment_tokens: int, max_steps: int, automaton: AnswerAutomaton | None) -> list[list[int]]:
    """Greedy answers of a batch of comments, as output-vocabulary indices.

    Constrained (automaton given): at each step only the indices the automaton allows
    compete; a row stops on reaching `automaton.final`, so with max_steps >=
    automaton.max_steps every answer is complete and valid. Unconstrained (None): argmax
    over the whole output vocabulary; a row stops after the end index (that of sep_id)
    or after max_steps. Each returned answer ends with the end index if it was reached.
    Comments longer than max_comment_tokens are cut, as in training.

    The model reads each token once (KVCache). Between model calls, every row takes the
    tokens the automaton forces, which join its next call's input; so each call is one
    choice point for every row still decoding (4 for a reddit_moderation answer)."""
    device = next(model.parameters()).device
    answers: list[list[int]] = [[] for _ in comments_ids]
    unread = [student_sequence(c, [], sep_id, max_comment_tokens) for c in comments_ids]  # ids not yet read
    states = [0] * len(comments_ids)
    end_index = list(vocab_ids).index(sep_id)
    edges = automaton.edges if automaton is not None else None

    def take(r: int, index: int) -> None:
        answers[r].append(index)
        unread[r].append(vocab_ids[index])
        if edges is not None:
            states[r] = edges[states[r]][index]

    def finished(r: int) -> bool:
        if len(answers[r]) >= max_steps:
            return True
        return states[r] == automaton.final if edges is not None else bool(answers[r]) and answers[r][-1] == end_index

    cache = KVCache(model.cfg.n_layers)
    active = list(range(len(comments_ids)))  # rows still decoding: the cache's rows, in this order
    while True:
        for r in active if edges is not None else ():
            while not finished(r) and len(edges[states[r]]) == 1:  # forced: no choice, no model call
                take(r, next(iter(edges[states[r]])))
        keep = [i for i, r in enumerate(active) if not finished(r)]
        if not keep:
            return answers
        if len(keep) < len(active):
            active = [active[i] for i in keep]
            cache.keep(torch.tensor(keep, device=device))
        logits = _read_next(model, cache, [unread[r] for r in active], device)  # (A, V)
        if edges is not None:
            allowed = automaton.mask(torch.tensor([states[r] for r in active], device=device))  # (A, V)
            logits = logits.masked_fill(~allowed, float("-inf"))
        for r, index in zip(active, logits.argmax(-1).tolist()):  # host sync: once per choice point
            unread[r] = []
            take(r, index)


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
    bf16: bool = False
    """Run the student's forward passes under bf16 autocast (`load_artifact`'s precision)."""

    def autocast(self):
        """bf16 autocast where the student was loaded for it; a no-op context otherwise."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

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
            with self.autocast():
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


def read_artifact(uri: str, names: tuple[str, ...] | None = None) -> dict[str, bytes]:
    """name -> bytes of every file SHA256SUMS lists (SHA256SUMS included), each checked against it;
    only of `names` (and SHA256SUMS) when given, e.g. to read the vocabulary without the weights."""
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
        if names is not None and name not in names:
            continue
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


def load_artifact(uri: str, device=None, precision: str = "auto") -> StudentModel:
    """The student saved at `uri` (local or s3://), every file verified, on `device` (default: CUDA if any).
    precision: its forward passes in fp32, or bf16 autocast (weights stay fp32); auto = bf16 where the
    hardware is fast at it, as training's train.precision (on an AVX512-BF16 CPU about twice the comments/s)."""
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
                        config["sep_id"], device, use_bf16(precision, device))
