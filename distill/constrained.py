"""The answer grammar: the one way answers become token ids, and the automaton that allows only valid answers.

ONE ENCODING PATH. The canonical answer (see `distill.task`) is cut into segments,
literal pieces and values:

    {"tone": "  |  aggressive  |  ", "sentiment": "  |  negative  |  ...  |  toxic  |  "}

Each segment is encoded on its own with `tokenizer.encode(piece, add_special_tokens=False)`,
the encodings are concatenated and the end-of-answer id is appended. Teacher decoding,
records, student training and inference all take answer ids from
`AnswerGrammar.encode_answer` (or the automaton built from the same segments), so a
quote cannot be one token in training and another in inference.

What Gemma 3's tokenizer does with the segments of `reddit_moderation` (no leading
space is added to a piece; a space before a quote joins it, as '▁"'):

    '{"tone": "'           -> '{"' 'tone' '":' '▁"'
    '", "sentiment": "'    -> '",' '▁"' 'sentiment' '":' '▁"'      (likewise safety, toxicity)
    '"}'                   -> '"}'
    values                 -> 'aggressive' 'neutral' 'friendly' 'positive' 'negative' 'safe'
                              'harm' 'ful' | 'toxic' 'respect' 'ful'

so an answer is 25 to 27 tokens with the end id, and the grammar needs 20 distinct ids
(19 + end). For these pieces the concatenated segment encodings equal the encoding of the
whole answer string; the grammar does not rely on it (tested, not assumed).

The automaton is a DFA over teacher ids, built segment by segment, never by enumerating
answers: a literal is a chain of states; a field is a trie of its values' token
sequences, whose end nodes continue straight into the next literal. A value whose tokens
are a prefix of another value's ends at an inner trie node, which then both continues
the longer value and starts the next literal. If one token would lead two ways, the
answer cannot be decoded unambiguously and building the grammar fails. `automaton(vocab)`
re-indexes the DFA by output-vocabulary index as a dense (states x V) table for batched
masking on any device.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

import torch

from distill.task import Task, TaskError, resolve_style

if TYPE_CHECKING:
    from distill.vocab import OutputVocab


def end_of_answer_id(tokenizer, style: str) -> int:
    """The token that ends an answer: `<end_of_turn>` for chat teachers, EOS for few-shot (base) teachers."""
    if resolve_style(style, tokenizer) == "chat":
        end = tokenizer.convert_tokens_to_ids("<end_of_turn>")
        if end is None or end == tokenizer.unk_token_id:
            raise TaskError("chat prompt style: the tokenizer has no <end_of_turn> token")
        return end
    return tokenizer.eos_token_id


def answer_segments(task: Task) -> list[tuple[str, str | None]]:
    """(text, field) pieces of the answer template: field None = literal text, else that field's value goes here."""
    segments, opener = [], '{"'
    for field in task.fields:
        segments += [(f'{opener}{field}": "', None), ("", field)]
        opener = '", "'
    return segments + [('"}', None)]


class AnswerGrammar:
    """Every valid answer of a task as teacher token ids, and the DFA that accepts exactly those."""

    def __init__(self, task: Task, tokenizer, end_id: int):
        self.task = task
        self.end_id = end_id
        self.segments = answer_segments(task)
        self._literal_ids: dict[int, list[int]] = {}  # segment index -> ids of a literal
        self._value_ids: dict[str, dict[str, list[int]]] = {f: {} for f in task.fields}  # field -> value -> ids
        self._next: list[dict[int, int]] = [{}]  # per state: teacher id -> next state; state 0 = start
        self._value_at: dict[int, tuple[str, str]] = {}  # trie node where a value is complete -> (field, value)
        self.max_steps = 0  # tokens of the longest answer, the end id included

        frontier = [0]  # states where the next segment starts
        for i, (text, field) in enumerate(self.segments):
            if field is None:
                self._literal_ids[i] = tokenizer.encode(text, add_special_tokens=False)
                frontier = self._add_chain(frontier, self._literal_ids[i])
            else:
                frontier = self._add_trie(frontier, field, tokenizer)
        self.final = self._add_chain(frontier, [end_id])[0]

    def _new_state(self) -> int:
        self._next.append({})
        return len(self._next) - 1

    def _link(self, state: int, token: int, target: int) -> None:
        if self._next[state].setdefault(token, target) != target:
            # Tries and chains only add fresh states, so a clash can only be at a value's end,
            # where the next literal starts with a token that also continues a longer value.
            field, value = self._value_at[state]
            raise TaskError(f"task {self.task.name}: fields.{field}: after value {value!r}, token {token} would both "
                            f"continue a longer value and start the next literal, so answers are ambiguous")

    def _add_chain(self, frontier: list[int], ids: list[int]) -> list[int]:
        """A literal: the same chain of fresh states from every frontier state."""
        for token in ids:
            target = self._new_state()
            for state in frontier:
                self._link(state, token, target)
            frontier = [target]
        self.max_steps += len(ids)
        return frontier

    def _add_trie(self, frontier: list[int], field: str, tokenizer) -> list[int]:
        """A field: the trie of its values' ids, entered from every frontier state; returns the value ends."""
        nodes: dict[tuple[int, ...], int] = {}  # id prefix -> trie node
        ends = []
        for value in self.task.fields[field]:
            ids = tokenizer.encode(value, add_special_tokens=False)
            if not ids:
                raise TaskError(f"task {self.task.name}: fields.{field}: value {value!r} encodes to no tokens")
            self._value_ids[field][value] = ids
            parents, prefix = frontier, ()
            for token in ids:
                prefix += (token,)
                if prefix not in nodes:
                    nodes[prefix] = self._new_state()
                    for parent in parents:
                        self._link(parent, token, nodes[prefix])
                parents = [nodes[prefix]]
            end = nodes[prefix]
            if end in self._value_at:
                raise TaskError(f"task {self.task.name}: fields.{field}: values {self._value_at[end][1]!r} and "
                                f"{value!r} encode to the same tokens {ids}")
            self._value_at[end] = (field, value)
            ends.append(end)
        self.max_steps += max(len(ids) for ids in self._value_ids[field].values())
        return ends

    def encode_answer(self, values: dict[str, str]) -> list[int]:
        """Teacher ids of a valid answer, ending with the end id: THE encoding of answers everywhere."""
        self.task.format_answer(values)  # TaskError unless a valid answer
        ids = []
        for i, (_, field) in enumerate(self.segments):
            ids += self._literal_ids[i] if field is None else self._value_ids[field][values[field]]
        return ids + [self.end_id]

    def decode_answer(self, ids: list[int]) -> dict[str, str] | None:
        """The answer whose encoding is `ids`, or None if `ids` is not exactly one complete valid answer."""
        state, values = 0, {}
        for token in ids:
            state = self._next[state].get(token)
            if state is None:
                return None
            if state in self._value_at:  # the last value end visited in a field is where the field ended
                field, value = self._value_at[state]
                values[field] = value
        return values if state == self.final else None

    def token_ids(self) -> list[int]:
        """Every teacher id of any valid answer, and the end id, sorted."""
        return sorted({token for edges in self._next for token in edges})

    def automaton(self, vocab: "OutputVocab") -> "AnswerAutomaton":
        """The DFA over output-vocabulary indices."""
        table = torch.full((len(self._next), len(vocab)), -1, dtype=torch.long)  # (S, V)
        for state, edges in enumerate(self._next):
            for token, target in edges.items():
                table[state, vocab.index(token)] = target
        return AnswerAutomaton(table, self.final, self.max_steps)


@dataclass(frozen=True)
class AnswerAutomaton:
    """A DFA over output-vocabulary indices. State 0 = start; `final` is reached after the end id."""

    table: torch.Tensor
    """(S, V) long: next state, -1 = not allowed. Row `final` is all -1."""
    final: int
    max_steps: int
    """Tokens of the longest answer, the end id included."""

    def to(self, device) -> "AnswerAutomaton":
        return AnswerAutomaton(self.table.to(device), self.final, self.max_steps)

    @cached_property
    def edges(self) -> list[dict[int, int]]:
        """Per state: {allowed index: next state}, on the host (decoders walk forced tokens with it)."""
        return [{i: s for i, s in enumerate(row) if s >= 0} for row in self.table.tolist()]

    def allowed(self, state: int) -> list[int]:
        return (self.table[state] >= 0).nonzero().flatten().tolist()

    def forced(self, state: int) -> int | None:
        """The only allowed index, if there is exactly one (nothing to choose)."""
        allowed = self.allowed(state)
        return allowed[0] if len(allowed) == 1 else None

    def step(self, states: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """(B,) states, (B,) indices -> (B,) next states; -1 for a token not allowed or a state already -1."""
        nxt = self.table[states.clamp(min=0), tokens]  # (B,)
        return torch.where(states >= 0, nxt, -1)

    def mask(self, states: torch.Tensor) -> torch.Tensor:
        """(B,) states -> (B, V) bool: allowed indices (none for state -1)."""
        return (self.table[states.clamp(min=0)] >= 0) & (states >= 0)[:, None]

    def allowed_along(self, targets: torch.Tensor, answer_mask: torch.Tensor) -> torch.Tensor:
        """The allowed indices at every answer position of a teacher-forced batch, on its device.

        targets (B, T): the answer's indices, one contiguous run per row where answer_mask (B, T)
        is True (as `data.collate` lays them out). Walks each row's answer through the automaton
        from the start state. Returns (B, T, V) bool, all False off the answer. A position with
        more than one allowed index is a choice point."""
        table = self.table.to(targets.device)
        B, T = targets.shape
        states = torch.full((B, T), -1, dtype=torch.long, device=targets.device)
        state = torch.zeros(B, dtype=torch.long, device=targets.device)  # the start state, held until the answer
        for t in range(T):
            on = answer_mask[:, t]
            states[:, t] = torch.where(on, state, -1)
            nxt = torch.where(state >= 0, table[state.clamp(min=0), targets[:, t]], -1)  # -1 stays -1
            state = torch.where(on, nxt, state)
        return (table[states.clamp(min=0)] >= 0) & (states >= 0)[..., None]

    def accepts(self, indices: list[int]) -> bool:
        """Whether `indices` is exactly one complete valid answer."""
        state = 0
        for index in indices:
            if not 0 <= index < self.table.shape[1]:
                return False
            state = int(self.table[state, index])
            if state < 0:
                return False
        return state == self.final
