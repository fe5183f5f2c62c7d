"""The task contract (TASK_FORMAT_VERSION = 1): what makes the set of valid answers finite and known.

A task YAML (shipped ones live in `distill/tasks/<name>.yaml`) gives

    name, description            what the task is
    input_name                   how the prompt calls the input ("Comment", "Email")
    fields                       ordered mapping: JSON field -> its allowed string values
    instruction                  the text that opens the prompt
    examples                     few-shot examples: [{comment: str, answer: {field: value}}]

The canonical answer is `json.dumps` of the values in field order with `ensure_ascii=False`:
`{"tone": "aggressive", "sentiment": "negative", "safety": "harmful", "toxicity": "toxic"}`.
Field names and values may not contain a double quote, a backslash or a control
character (newline, tab, ...), so json.dumps never escapes anything and the answer is
the plain concatenation of literal pieces and values that `distill.constrained` encodes.

The prompt is `prefix + comment + suffix`, and the answer follows the suffix directly.
Every boundary sits at a newline:

    {instruction}

    Comment:
    {example comment}
    Answer:
    {example answer}

    Comment:
    {comment}
    Answer:

Gemma's tokenizer does not merge a newline with the words around it, so encoding
prefix, comment and suffix separately gives exactly the ids of the whole prompt (for a
comment without leading or trailing whitespace; checked on all 5,426 GoEmotions dev
comments), and the teacher sees its answer start after the same tokens as in the
examples. The obvious `Comment: {comment}\\nAnswer: {answer}` layout breaks both: the
space after the colon merges into the next word ('▁Thanks', '▁{"') in the examples but
stands alone ('▁') at the end of a separately encoded prefix.

Prompt styles: `fewshot` for base teachers (the text above), `chat` for instruct
teachers (the same text as the user message, rendered by the tokenizer's chat template;
the answer follows the template's generation prompt). Neither string holds the BOS
token: the encoder adds it.
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import yaml

from distill.storage import StorageError, read_bytes

TASK_FORMAT_VERSION = 1
TASKS_DIR = Path(__file__).resolve().parent / "tasks"
PLACEHOLDER = "{comment}"  # where the comment goes in a rendered chat prompt; no task text may contain it
_FORBIDDEN = re.compile(r'["\\\x00-\x1f\x7f]')  # what json.dumps would escape (and DEL)


class TaskError(ValueError):
    """A bad task definition or answer; one line, naming the file and the field."""


def shipped_tasks() -> list[str]:
    return sorted(p.stem for p in TASKS_DIR.glob("*.yaml"))


@dataclass(frozen=True)
class Task:
    name: str
    description: str
    fields: dict[str, tuple[str, ...]]
    """Ordered: the order of the fields in every answer."""
    instruction: str
    examples: tuple[tuple[str, dict[str, str]], ...]
    """Few-shot examples: (comment, answer)."""
    input_name: str = "Comment"

    def __post_init__(self):
        _require(bool(self.name.strip()), "name", "must not be empty")
        _require(bool(self.instruction.strip()), "instruction", "must not be empty")
        _require(bool(self.fields), "fields", "give at least one field")
        for field_name, values in self.fields.items():
            _require(bool(field_name) and not _FORBIDDEN.search(field_name), f"fields.{field_name!r}",
                     "a field name must be non-empty, without double quote, backslash or control characters")
            _require(len(values) > 0, f"fields.{field_name}", "give at least one allowed value")
            for value in values:
                _require(isinstance(value, str), f"fields.{field_name}",
                         f"value {value!r} is not a string (quote it in YAML: '{value}')")
                _require(value != "", f"fields.{field_name}", "a value must not be empty")
                _require(not _FORBIDDEN.search(value), f"fields.{field_name}",
                         f"value {value!r} contains a double quote, backslash or control character (newline, tab)")
            duplicates = sorted({v for v in values if values.count(v) > 1})
            _require(not duplicates, f"fields.{field_name}", f"duplicate values {duplicates}")
        _require(bool(self.input_name.strip()) and "\n" not in self.input_name, "input_name",
                 "must be one non-empty line")
        for i, (comment, answer) in enumerate(self.examples):
            _require(isinstance(comment, str) and comment.strip() != "", f"examples[{i}].comment",
                     "must be a non-empty string")
            problem = self._answer_problem(answer)
            _require(problem is None, f"examples[{i}].answer", problem)
        for where, text in [("instruction", self.instruction), ("input_name", self.input_name)] + [
                (f"examples[{i}].comment", c) for i, (c, _) in enumerate(self.examples)]:
            _require(PLACEHOLDER not in text, where,
                     f"must not contain {PLACEHOLDER}: the comment always goes after the examples")

    def _answer_problem(self, values) -> str | None:
        """Why `values` is not a valid answer, or None."""
        if not isinstance(values, dict):
            return f"expected a mapping of {list(self.fields)}, got {values!r}"
        unknown = [f for f in values if f not in self.fields]
        if unknown:
            return f"unknown field {unknown[0]!r} (fields: {', '.join(self.fields)})"
        missing = [f for f in self.fields if f not in values]
        if missing:
            return f"missing field {missing[0]!r}"
        for field_name, allowed in self.fields.items():
            if values[field_name] not in allowed:
                return f"{field_name}: {values[field_name]!r} is not allowed (allowed: {', '.join(allowed)})"
        return None

    def format_answer(self, values: dict[str, str]) -> str:
        """The canonical answer text; TaskError if `values` is not a valid answer."""
        problem = self._answer_problem(values)
        if problem is not None:
            raise TaskError(f"task {self.name}: answer {values!r}: {problem}")
        return json.dumps({f: values[f] for f in self.fields}, ensure_ascii=False)

    def parse_answer(self, text: str) -> dict[str, str] | None:
        """The answer in `text` (a JSON object with exactly the fields and allowed values), in field order; else None."""
        try:
            values = json.loads(text)
        except json.JSONDecodeError:
            return None
        if self._answer_problem(values) is not None:
            return None
        return {f: values[f] for f in self.fields}

    def all_answers(self) -> Iterator[dict[str, str]]:
        """Every valid answer: the cartesian product of the values, in field and value order."""
        for combo in itertools.product(*self.fields.values()):
            yield dict(zip(self.fields, combo))

    def prompt_parts(self, style: str, tokenizer=None) -> tuple[str, str]:
        """(prefix, suffix): the prompt is prefix + comment + suffix, and the answer follows directly."""
        style = resolve_style(style, tokenizer)
        shots = "".join(f"{self.input_name}:\n{comment}\nAnswer:\n{self.format_answer(answer)}\n\n"
                        for comment, answer in self.examples)
        head = f"{self.instruction.strip()}\n\n{shots}{self.input_name}:\n"
        suffix = "\nAnswer:\n"
        if style == "fewshot":
            return head, suffix
        # chat: the user message ends with the comment; the answer starts the model's turn
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": head + PLACEHOLDER}],
                                                 add_generation_prompt=True, tokenize=False)
        prefix, suffix = rendered.split(PLACEHOLDER)  # exactly once: no task text may contain it
        bos = tokenizer.bos_token or ""
        if bos and prefix.startswith(bos):
            prefix = prefix[len(bos):]
        return prefix, suffix

    def to_dict(self) -> dict:
        return {
            "format_version": TASK_FORMAT_VERSION,
            "name": self.name,
            "description": self.description,
            "input_name": self.input_name,
            "fields": {f: list(values) for f, values in self.fields.items()},
            "instruction": self.instruction,
            "examples": [{"comment": c, "answer": dict(a)} for c, a in self.examples],
        }

    @classmethod
    def from_dict(cls, data, source: str = "task") -> "Task":
        """A Task from its YAML/manifest form; TaskError (naming `source` and the field) if it is not valid."""
        try:
            _require(isinstance(data, dict), "", "a task must be a YAML mapping")
            known = {"format_version", "name", "description", "input_name", "fields", "instruction", "examples"}
            for key in data:
                _require(key in known, str(key), f"unknown key (known: {', '.join(sorted(known))})")
            version = data.get("format_version", TASK_FORMAT_VERSION)
            _require(version == TASK_FORMAT_VERSION, "format_version",
                     f"{version!r} is not supported (this code reads version {TASK_FORMAT_VERSION})")
            for key in ("name", "fields", "instruction"):
                _require(key in data, key, "missing")
            for key in ("name", "description", "input_name", "instruction"):
                _require(isinstance(data.get(key, ""), str), key, "must be a string")
            fields = data["fields"]
            _require(isinstance(fields, dict), "fields", "must be a mapping: field -> list of allowed values")
            for f, values in fields.items():
                _require(isinstance(f, str), f"fields.{f!r}", "a field name must be a string")
                _require(isinstance(values, list), f"fields.{f}", "must be a list of allowed values")
            examples = data.get("examples") or []
            _require(isinstance(examples, list), "examples", "must be a list of {comment, answer}")
            for i, ex in enumerate(examples):
                _require(isinstance(ex, dict) and set(ex) == {"comment", "answer"}, f"examples[{i}]",
                         "must be a mapping with exactly the keys comment and answer")
            return cls(
                name=data["name"],
                description=data.get("description", ""),
                fields={f: tuple(values) for f, values in fields.items()},
                instruction=data["instruction"],
                examples=tuple((ex["comment"], ex["answer"]) for ex in examples),
                input_name=data.get("input_name", "Comment"),
            )
        except TaskError as e:
            raise TaskError(f"{source}: {e}") from None


def _require(ok: bool, where: str, why: str | None) -> None:
    if not ok:
        raise TaskError(f"{where}: {why}" if where else str(why))


def load_task(name_or_path: str) -> Task:
    """A shipped task by name (`reddit_moderation`) or a task YAML file, local or s3://."""
    shipped = TASKS_DIR / f"{name_or_path}.yaml"
    uri = str(shipped) if re.fullmatch(r"[\w-]+", name_or_path) and shipped.is_file() else name_or_path
    try:
        text = read_bytes(uri).decode("utf-8")
    except (StorageError, FileNotFoundError, IsADirectoryError):
        raise TaskError(f"{name_or_path}: no such task file, nor a shipped task "
                        f"(shipped: {', '.join(shipped_tasks())})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise TaskError(f"{uri}: not valid YAML ({str(e).splitlines()[0]})") from None
    return Task.from_dict(data, source=uri)


def resolve_style(style: str, tokenizer) -> str:
    """auto -> chat if the tokenizer has a chat template, else fewshot. chat needs a template."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if style == "auto":
        return "chat" if has_template else "fewshot"
    if style == "chat" and not has_template:
        raise TaskError("task.prompt_style=chat: the tokenizer has no chat template (use fewshot or auto)")
    if style not in ("chat", "fewshot"):
        raise TaskError(f"task.prompt_style={style!r}: must be auto, chat or fewshot")
    return style
