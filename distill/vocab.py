"""The output vocabulary (VOCAB_FORMAT_VERSION = 1): the teacher token ids the student may emit.

The student's output index of a token is its position in `OutputVocab.ids`. The first
`n_required` ids, sorted, are every token of every valid answer plus the end-of-answer id
(`AnswerGrammar.token_ids`): the student can write any answer. The rest are auxiliary
tokens, kept because the teacher's logits over them carry more of its "dark knowledge"
than the required ones alone. `build_output_vocab` chooses them deterministically, in
this order, until the vocabulary has `size` ids:

1. whitespace (' ', '\\n', '\\n\\n', '\\t', '  '), the '▁' (space) twin of every required
   token ('tone' <-> '▁tone', '▁"' <-> '"'), and the tokens of the field names and values
   space-prefixed and capitalised (' aggressive', 'Aggressive', ' Aggressive');
2. the tokens of the prompt, in order;
3. the corpus's most frequent tokens (ties broken by id);
4. should the corpus be too small to fill it, the lowest remaining ids.

Special tokens (BOS, padding, `<start_of_turn>`, `<unusedN>`, ...) are never auxiliary.
The default size, 525, is the original project's: its 27 required + 498 auxiliary.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass
from functools import cached_property
from itertools import islice
from typing import Iterable

from distill.constrained import AnswerGrammar
from distill.storage import read_bytes, write_bytes

VOCAB_FORMAT_VERSION = 1
WHITESPACE = (" ", "\n", "\n\n", "\t", "  ")


class VocabError(ValueError):
    """An output vocabulary that cannot be built or read; one line."""


@dataclass(frozen=True)
class OutputVocab:
    ids: tuple[int, ...]
    """Teacher token ids; the student's output index of a token is its position here."""
    strings: tuple[str, ...]
    """The tokenizer's raw token string of each id ('▁the'), for reading and for checks."""
    n_required: int
    """ids[:n_required] (sorted) are the tokens of the valid answers and the end id; the rest are auxiliary."""

    def __post_init__(self):
        if len(self.ids) != len(self.strings):
            raise VocabError(f"output vocabulary: {len(self.ids)} ids but {len(self.strings)} strings")
        if len(set(self.ids)) != len(self.ids):
            raise VocabError("output vocabulary: duplicate ids")
        if not 1 <= self.n_required <= len(self.ids):
            raise VocabError(f"output vocabulary: n_required={self.n_required} must be in [1, {len(self.ids)}]")
        if list(self.ids[:self.n_required]) != sorted(self.ids[:self.n_required]):
            raise VocabError("output vocabulary: the required ids must come first, sorted")

    @cached_property
    def _position(self) -> dict[int, int]:
        return {teacher_id: i for i, teacher_id in enumerate(self.ids)}

    def __len__(self) -> int:
        return len(self.ids)

    def index(self, teacher_id: int) -> int:
        """The output index of a teacher id."""
        try:
            return self._position[teacher_id]
        except KeyError:
            raise KeyError(f"teacher token id {teacher_id} is not in the output vocabulary "
                           f"({len(self)} ids, fingerprint {self.fingerprint()[:12]})") from None

    def indices(self, teacher_ids: Iterable[int]) -> list[int]:
        return [self.index(t) for t in teacher_ids]

    def fingerprint(self) -> str:
        """sha256 of the ordered ids: two vocabularies with the same fingerprint index tokens the same way."""
        return hashlib.sha256(json.dumps(list(self.ids)).encode()).hexdigest()

    def to_dict(self) -> dict:
        return {"format_version": VOCAB_FORMAT_VERSION, "n_required": self.n_required,
                "ids": list(self.ids), "strings": list(self.strings)}

    @classmethod
    def from_dict(cls, data: dict) -> "OutputVocab":
        version = data.get("format_version")
        if version != VOCAB_FORMAT_VERSION:
            raise VocabError(f"output vocabulary format_version={version!r}: this code reads version "
                             f"{VOCAB_FORMAT_VERSION}")
        return cls(tuple(data["ids"]), tuple(data["strings"]), data["n_required"])

    def save(self, uri: str) -> None:
        write_bytes(uri, json.dumps(self.to_dict(), ensure_ascii=False).encode("utf-8"))

    @classmethod
    def load(cls, uri: str) -> "OutputVocab":
        return cls.from_dict(json.loads(read_bytes(uri)))


def build_output_vocab(grammar: AnswerGrammar, tokenizer, size: int, prompt_text: str,
                       corpus_texts: Iterable[str]) -> OutputVocab:
    """Required answer tokens, then auxiliary tokens in the order the module docstring gives, up to `size`."""
    required = grammar.token_ids()
    if len(required) > size:
        raise VocabError(f"vocab.size={size} is too small: task {grammar.task.name} needs {len(required)} "
                         f"required answer tokens (end id included); set vocab.size >= {len(required)}")
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    chosen, taken = list(required), set(required)

    def take(candidates: Iterable[int]) -> None:
        for token in candidates:
            if len(chosen) == size:
                return
            if token not in taken and token not in special:
                chosen.append(token)
                taken.add(token)

    def encode(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False)

    # 1. whitespace and the variants of the answer's tokens and words
    for text in WHITESPACE:
        take(encode(text))
    for token in tokenizer.convert_ids_to_tokens([t for t in required if t != grammar.end_id]):
        twin = token[1:] if token.startswith("▁") else "▁" + token
        twin_id = tokenizer.convert_tokens_to_ids(twin)
        if twin_id is not None and twin_id != tokenizer.unk_token_id:
            take([twin_id])
    words = [w for field, values in grammar.task.fields.items() for w in (field, *values)]
    for word in words:
        for variant in (" " + word, word.capitalize(), " " + word.capitalize()):
            take(encode(variant))
    # 2. the prompt's tokens
    take(encode(prompt_text))
    # 3. the corpus's most frequent tokens
    counts = Counter()
    texts = iter(corpus_texts)
    while batch := list(islice(texts, 4096)):
        for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
            counts.update(ids)
    take(sorted(counts, key=lambda t: (-counts[t], t)))
    # 4. only for a corpus too small to fill the vocabulary
    take(range(len(tokenizer)))

    return OutputVocab(tuple(chosen), tuple(tokenizer.convert_ids_to_tokens(chosen)), len(required))
