"""The answer grammar and its automaton, on the real Gemma 3 tokenizer, checked against enumeration."""

import random
import time

import pytest
import torch

from distill.constrained import AnswerGrammar, answer_segments, end_of_answer_id
from distill.task import Task, TaskError
from distill.vocab import build_output_vocab


@pytest.fixture(scope="module")
def vocab(grammar, gemma_tokenizer):
    return build_output_vocab(grammar, gemma_tokenizer, 525, "", ["some corpus text"])


@pytest.fixture(scope="module")
def automaton(grammar, vocab):
    return grammar.automaton(vocab)


def tiny_task(fields: dict) -> Task:
    return Task(name="tiny", description="", fields={f: tuple(v) for f, v in fields.items()},
                instruction="Label it.", examples=())


def walk(automaton, state=0, path=()):
    """Every accepted sequence: DFS over the allowed transitions."""
    if state == automaton.final:
        yield list(path)
    for index in automaton.allowed(state):
        yield from walk(automaton, int(automaton.table[state, index]), path + (index,))


def test_end_of_answer_id(gemma_tokenizer, gemma_chat_tokenizer):
    assert end_of_answer_id(gemma_tokenizer, "fewshot") == gemma_tokenizer.eos_token_id == 1
    assert end_of_answer_id(gemma_chat_tokenizer, "chat") == 106
    assert gemma_chat_tokenizer.convert_ids_to_tokens(106) == "<end_of_turn>"


def test_segments_concatenate_to_the_canonical_answer(task):
    segments = answer_segments(task)
    assert [text for text, field in segments if field is None] == [
        '{"tone": "', '", "sentiment": "', '", "safety": "', '", "toxicity": "', '"}']
    for answer in task.all_answers():
        text = "".join(answer[field] if field else text for text, field in segments)
        assert text == task.format_answer(answer)


def test_how_gemma_tokenizes_the_segments(task, grammar, gemma_tokenizer):
    """What the module docstring documents: no leading space is added; a space before a quote joins it."""
    def pieces(text):
        return gemma_tokenizer.convert_ids_to_tokens(gemma_tokenizer.encode(text, add_special_tokens=False))

    assert pieces('{"tone": "') == ['{"', "tone", '":', '▁"']
    assert pieces('", "sentiment": "') == ['",', '▁"', "sentiment", '":', '▁"']
    assert pieces('"}') == ['"}']
    assert pieces("harmful") == ["harm", "ful"] and pieces("respectful") == ["respect", "ful"]
    assert len(grammar.token_ids()) == 20
    assert grammar.max_steps == 27


def test_every_answer_encodes_decodes_and_is_accepted(task, grammar, automaton, vocab, gemma_tokenizer):
    for answer in task.all_answers():
        ids = grammar.encode_answer(answer)
        assert ids[-1] == grammar.end_id
        assert gemma_tokenizer.decode(ids[:-1]) == task.format_answer(answer)
        # for Gemma these segments happen to encode like the whole string (not relied upon)
        assert ids[:-1] == gemma_tokenizer.encode(task.format_answer(answer), add_special_tokens=False)
        assert grammar.decode_answer(ids) == answer
        assert automaton.accepts(vocab.indices(ids))
        assert set(ids) <= set(grammar.token_ids())
    assert {t for a in task.all_answers() for t in grammar.encode_answer(a)} == set(grammar.token_ids())


def test_automaton_accepts_exactly_the_valid_answers(task, grammar, automaton, vocab):
    expected = sorted(vocab.indices(grammar.encode_answer(a)) for a in task.all_answers())
    assert len(expected) == 36
    assert sorted(walk(automaton)) == expected
    assert automaton.max_steps == max(len(e) for e in expected)
    assert automaton.table[automaton.final].eq(-1).all()


def test_invalid_sequences_are_rejected(task, grammar, automaton, vocab):
    rng = random.Random(0)
    valid = sorted(tuple(vocab.indices(grammar.encode_answer(a))) for a in task.all_answers())
    good = valid[0]
    assert not automaton.accepts(list(good[:-1]))  # no end
    assert not automaton.accepts(list(good) + [good[-1]])  # past the end
    assert not automaton.accepts([])
    assert not automaton.accepts([len(vocab)])  # out of range
    assert grammar.decode_answer(grammar.encode_answer(next(task.all_answers()))[:-1]) is None
    for _ in range(2000):
        seq = list(rng.choice(valid))
        kind = rng.randrange(3)
        if kind == 0:  # substitute one token
            seq[rng.randrange(len(seq))] = rng.randrange(len(vocab))
        elif kind == 1:  # drop one token
            del seq[rng.randrange(len(seq))]
        else:  # random sequence
            seq = [rng.randrange(len(vocab)) for _ in range(rng.randrange(1, 30))]
        accepted = automaton.accepts(seq)
        assert accepted == (tuple(seq) in valid)
        decoded = grammar.decode_answer([vocab.ids[i] for i in seq])
        assert (decoded is not None) == accepted


def test_batched_step_and_mask_agree_with_allowed(automaton, vocab):
    n_states = automaton.table.shape[0]
    states = torch.arange(-1, n_states).repeat_interleave(len(vocab))  # every (state, index) pair, and state -1
    tokens = torch.arange(len(vocab)).repeat(n_states + 1)
    nxt = automaton.step(states, tokens)  # (B,)
    mask = automaton.mask(torch.arange(-1, n_states))  # (S + 1, V)
    assert not mask[0].any() and (nxt[: len(vocab)] == -1).all()  # state -1 stays -1
    for state in range(n_states):
        allowed = automaton.allowed(state)
        assert mask[state + 1].nonzero().flatten().tolist() == allowed
        row = nxt[(state + 1) * len(vocab):(state + 2) * len(vocab)]
        assert (row >= 0).nonzero().flatten().tolist() == allowed
        assert row.tolist() == automaton.table[state].tolist()
    assert automaton.to("cpu").table.equal(automaton.table)


def test_allowed_along_walks_each_answer_from_its_own_start(task, grammar, automaton, vocab):
    """Answers laid out as collate does (comment, then the answer at a row's own offset, then padding):
    at each answer position exactly the allowed set of the host-side walk; nothing elsewhere."""
    answers = [vocab.indices(grammar.encode_answer(a)) for a in list(task.all_answers())[:5]]
    starts = [3, 0, 7, 1, 4]
    T = max(s + len(a) for s, a in zip(starts, answers)) + 2
    targets = torch.zeros((len(answers), T), dtype=torch.long)
    mask = torch.zeros((len(answers), T), dtype=torch.bool)
    for i, (s, a) in enumerate(zip(starts, answers)):
        targets[i, s:s + len(a)], mask[i, s:s + len(a)] = torch.tensor(a), True
    allowed = automaton.allowed_along(targets, mask)  # (B, T, V)
    assert allowed.shape == (len(answers), T, len(vocab))
    assert not allowed[~mask].any()
    for i, (s, a) in enumerate(zip(starts, answers)):
        state = 0
        for k, index in enumerate(a):
            assert allowed[i, s + k].nonzero().flatten().tolist() == automaton.allowed(state)
            state = automaton.edges[state][index]
    assert ((allowed.sum(-1) > 1).sum(1) == len(task.fields)).all()  # one choice per field here


def test_forced_is_none_exactly_at_value_branch_points(task, automaton, vocab, gemma_tokenizer):
    # walk one answer segment by segment; a value is chosen where each field's segment starts
    answer, state, branch_points = next(task.all_answers()), 0, {}  # state -> field
    for text, field in answer_segments(task):
        if field is not None:
            branch_points[state] = field
        for index in vocab.indices(gemma_tokenizer.encode(answer[field] if field else text, add_special_tokens=False)):
            state = int(automaton.table[state, index])
    assert len(branch_points) == 4
    for state in range(automaton.table.shape[0]):
        allowed = automaton.allowed(state)
        if state in branch_points:
            assert automaton.forced(state) is None and len(allowed) == len(task.fields[branch_points[state]])
        elif state == automaton.final:
            assert automaton.forced(state) is None and allowed == []
        else:
            assert len(allowed) == 1 and automaton.forced(state) == allowed[0]


def test_value_that_is_a_token_prefix_of_another(gemma_tokenizer):
    """'harm' is one token and 'harmful' is 'harm' 'ful': after 'harm' the state both continues and ends a value."""
    task = tiny_task({"safety": ["harm", "harmful", "safe"], "tone": ["calm", "rude"]})
    grammar = AnswerGrammar(task, gemma_tokenizer, gemma_tokenizer.eos_token_id)
    harm = gemma_tokenizer.encode("harm", add_special_tokens=False)
    assert gemma_tokenizer.encode("harmful", add_special_tokens=False)[: len(harm)] == harm
    vocab = build_output_vocab(grammar, gemma_tokenizer, 60, "", [])
    automaton = grammar.automaton(vocab)
    expected = sorted(vocab.indices(grammar.encode_answer(a)) for a in task.all_answers())
    assert sorted(walk(automaton)) == expected
    for answer in task.all_answers():
        assert grammar.decode_answer(grammar.encode_answer(answer)) == answer
    state = 0
    for index in vocab.indices(gemma_tokenizer.encode('{"safety": "harm', add_special_tokens=False)):
        state = int(automaton.table[state, index])
    ful, next_literal = (gemma_tokenizer.encode(t, add_special_tokens=False)[0] for t in ("ful", '", "tone": "'))
    assert automaton.allowed(state) == sorted(vocab.indices([ful, next_literal]))  # continue 'harmful' or end 'harm'
    assert grammar.decode_answer(gemma_tokenizer.encode('{"safety": "harm", "tone": "calm"}', add_special_tokens=False)
                                 + [grammar.end_id]) == {"safety": "harm", "tone": "calm"}


def test_ambiguous_grammar_is_refused(gemma_tokenizer):
    """A value end from which one token would both continue a longer value and start the next literal."""
    literal_first = gemma_tokenizer.encode('", "topic": "', add_special_tokens=False)[0]  # '",'
    ok = gemma_tokenizer.encode("ok", add_special_tokens=False)

    class Colliding:  # a tokenizer for which "okay" is 'ok' '",'
        def encode(self, text, add_special_tokens=False):
            return ok + [literal_first] if text == "okay" else gemma_tokenizer.encode(text, add_special_tokens=False)

    task = tiny_task({"mood": ["ok", "okay"], "topic": ["cats"]})
    with pytest.raises(TaskError, match="task tiny: fields.mood: after value 'ok', token .* would both continue "
                                        "a longer value and start the next literal") as err:
        AnswerGrammar(task, Colliding(), 1)
    assert "\n" not in str(err.value)


def test_values_with_the_same_tokens_are_refused(gemma_tokenizer):
    task = tiny_task({"mood": ["ok", "fine"]})

    class Same:
        def encode(self, text, add_special_tokens=False):
            return [10] if text in ("ok", "fine") else gemma_tokenizer.encode(text, add_special_tokens=False)

    with pytest.raises(TaskError, match="fields.mood: values 'ok' and 'fine' encode to the same tokens"):
        AnswerGrammar(task, Same(), 1)


def test_value_without_tokens_is_refused(gemma_tokenizer):
    class Empty:
        def encode(self, text, add_special_tokens=False):
            return [] if text == "ok" else gemma_tokenizer.encode(text, add_special_tokens=False)

    with pytest.raises(TaskError, match="fields.mood: value 'ok' encodes to no tokens"):
        AnswerGrammar(tiny_task({"mood": ["ok", "fine"]}), Empty(), 1)


def test_encode_answer_refuses_invalid_answers(grammar):
    with pytest.raises(TaskError, match="tone: 'angry' is not allowed"):
        grammar.encode_answer({"tone": "angry", "sentiment": "neutral", "safety": "safe", "toxicity": "toxic"})


def test_large_task_builds_fast_without_enumerating(gemma_tokenizer, monkeypatch):
    """6 fields x 10 values = 10^6 answers: the grammar is built per segment, never per answer."""
    words = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white", "grey", "brown",
             "cat", "dog", "bird", "fish", "horse", "cow", "sheep", "goat", "pig", "duck"]
    fields = {f"field_{i}": [f"{w}{i}" if i % 2 else w for w in words[(i % 2) * 10:(i % 2) * 10 + 10]]
              for i in range(6)}
    task = tiny_task(fields)
    monkeypatch.setattr(Task, "all_answers", lambda self: pytest.fail("enumerated the answers"))
    start = time.perf_counter()
    grammar = AnswerGrammar(task, gemma_tokenizer, 1)
    vocab = build_output_vocab(grammar, gemma_tokenizer, max(525, len(grammar.token_ids())), "", [])
    automaton = grammar.automaton(vocab)
    assert time.perf_counter() - start < 1.0
    assert automaton.table.shape[0] < 500  # states grow with the segments, not with the 10^6 answers
    answer = {f: values[7] for f, values in fields.items()}
    assert grammar.decode_answer(grammar.encode_answer(answer)) == answer
    assert automaton.accepts(vocab.indices(grammar.encode_answer(answer)))
