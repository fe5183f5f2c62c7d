"""The vLLM teacher engine (distill.vllm_engine) without vLLM: processor, conversion, a simulated engine loop.

vLLM is not installed in CI. The stand-ins below copy the attribute names of vLLM's real
objects (vllm/logprobs.py Logprob / FlatLogprobs, vllm/outputs.py RequestOutput /
CompletionOutput, vllm/v1/sample/logits_processor/interface.py BatchUpdate /
MoveDirectionality), and `FakeLLM` drives the processor the way vLLM's V1 sampler does
with `logprobs_mode="processed_logits"` (vllm/v1/sample/sampler.py: processors, greedy
argmax, top-k of the processed logits with the sampled token first). Only
`test_vllm_matches_transformers_teacher` (marked gpu) runs the real vLLM.
"""

from __future__ import annotations

import enum
import os
import pickle
import sys
import types
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

from distill import records, vllm_engine
from distill.config import ConfigError, load_config
from distill.constrained import AnswerAutomaton
from distill.extract import ShardWriter, make_plan, pin_plan, prepare, shard_item
from distill.losses import forward_kl
from distill.teacher import Teacher
from distill.vllm_engine import (SHIFT, AnswerAutomatonLogitsCore, VLLMEngineError, VLLMTeacher,
                                 answer_from_completion, automaton_spec, center_logits, step_values)
from distill.vocab import OutputVocab
from tests.conftest import tiny_config

# --- stand-ins with vLLM's attribute names ---------------------------------------------


@dataclass
class Logprob:  # vllm/logprobs.py
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class FlatLogprobs:  # vllm/logprobs.py (the parts a reader uses)
    start_indices: list[int] = field(default_factory=list)
    end_indices: list[int] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    ranks: list[int | None] = field(default_factory=list)
    decoded_tokens: list[str | None] = field(default_factory=list)

    def append_fast(self, token_ids, logprobs, ranks, decoded_tokens):
        self.start_indices.append(len(self.logprobs))
        self.token_ids += token_ids
        self.logprobs += logprobs
        self.ranks += ranks
        self.decoded_tokens += decoded_tokens
        self.end_indices.append(len(self.logprobs))

    def __len__(self):
        return len(self.start_indices)


@dataclass
class CompletionOutput:  # vllm/outputs.py
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: object
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class RequestOutput:  # vllm/outputs.py
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = True


class MoveDirectionality(enum.Enum):  # vllm/v1/sample/logits_processor/interface.py
    UNIDIRECTIONAL = enum.auto()
    SWAP = enum.auto()


@dataclass(frozen=True)
class BatchUpdate:  # ditto; added = (index, params, prompt_tok_ids, output_tok_ids)
    batch_size: int
    removed: list
    added: list
    moved: list


class SamplingParams:
    """Takes what vllm.SamplingParams takes (flat_logprobs only where the vLLM has it)."""

    FIELDS = {"n", "temperature", "top_p", "max_tokens", "min_tokens", "stop_token_ids", "ignore_eos", "logprobs",
              "detokenize", "skip_special_tokens", "presence_penalty", "frequency_penalty", "repetition_penalty",
              "extra_args"}

    def __init__(self, **kwargs):
        unknown = set(kwargs) - self.FIELDS
        if unknown:
            raise TypeError(f"Unexpected keyword argument {sorted(unknown)[0]!r}")
        self.flat_logprobs = False
        self.__dict__.update(kwargs)


class FlatSamplingParams(SamplingParams):
    FIELDS = SamplingParams.FIELDS | {"flat_logprobs"}


class FakeLLM:
    """vLLM's offline loop, small: a persistent batch of `max_num_seqs` rows, the processor, greedy argmax.

    Each step: finished rows are removed, waiting requests fill the freed rows (lowest
    first, as InputBatch.add_request reuses removed indices), the remaining holes are
    condensed by moving the last rows down (UNIDIRECTIONAL), and every third step two rows
    swap (SWAP). Then, as vllm/v1/sample/sampler.py with logprobs_mode=processed_logits and
    an all-greedy batch: logits -> float32 -> non-argmax-invariant processors -> argmax ->
    top-`logprobs` of the processed logits, the sampled token in column 0 (gather_logprobs),
    turned into one {id: Logprob} dict per token (or FlatLogprobs) like
    vllm/v1/engine/logprobs.py. The model is a transformers causal LM (full recompute).
    """

    def __init__(self, model, max_num_seqs: int = 3):
        self.model = model
        self.max_num_seqs = max_num_seqs
        self.processor = AnswerAutomatonLogitsCore(None, torch.device("cpu"), False)
        self.steps = 0
        self.removed: list[int] = []  # rows freed in the last step, reported with the next one (even the next call's)

    @torch.no_grad()
    def next_logits(self, ids: list[int]) -> torch.Tensor:
        return self.model(input_ids=torch.tensor([ids]), logits_to_keep=1).logits[0, -1]

    def generate(self, prompts, params, use_tqdm=False):
        waiting = list(range(len(prompts)))
        outputs = [[] for _ in prompts]
        logprobs = [FlatLogprobs() if params.flat_logprobs else [] for _ in prompts]
        slots: dict[int, int] = {}  # batch index -> request
        done, removed = set(), self.removed
        while len(done) < len(prompts):
            added, moved = [], []
            for index in sorted(removed):  # refill freed rows first, lowest index first
                if waiting:
                    r = waiting.pop(0)
                    slots[index] = r
                    added.append((index, params, prompts[r]["prompt_token_ids"], outputs[r]))
                    removed.remove(index)
            while waiting and len(slots) < self.max_num_seqs:
                index = len(slots)
                r = waiting.pop(0)
                slots[index] = r
                added.append((index, params, prompts[r]["prompt_token_ids"], outputs[r]))
            for hole in sorted(i for i in range(self.max_num_seqs) if i not in slots):  # condense
                last = max(slots, default=-1)
                if last > hole:
                    slots[hole] = slots.pop(last)
                    moved.append((last, hole, MoveDirectionality.UNIDIRECTIONAL))
            if self.steps % 3 == 2 and len(slots) >= 2:
                slots[0], slots[1] = slots[1], slots[0]
                moved.append((0, 1, MoveDirectionality.SWAP))
            self.steps += 1
            update = BatchUpdate(len(slots), list(removed), added, moved) if (removed or added or moved) else None
            removed.clear()
            self.processor.update_state(update)

            B = len(slots)
            logits = torch.stack([self.next_logits(prompts[slots[i]]["prompt_token_ids"] + outputs[slots[i]])
                                  for i in range(B)]).float()
            logits = self.processor.apply(logits)
            sampled = logits.argmax(-1)
            top_values, top_ids = torch.topk(logits, params.logprobs, dim=-1)
            for i in range(B):
                r, token = slots[i], int(sampled[i])
                ids = [token] + top_ids[i].tolist()
                values = [float(logits[i, token])] + top_values[i].tolist()
                if params.flat_logprobs:
                    logprobs[r].append_fast(ids, values, [1] * len(ids), [None] * len(ids))
                else:
                    logprobs[r].append({t: Logprob(v) for t, v in zip(ids, values)})
                outputs[r].append(token)
                if token in params.stop_token_ids or len(outputs[r]) >= params.max_tokens:
                    done.add(r)
                    removed.append(i)
            for i in removed:
                del slots[i]
        return [RequestOutput(str(r), p["prompt_token_ids"],
                              [CompletionOutput(0, "", outputs[r], None, logprobs[r], "stop")])
                for r, p in enumerate(prompts)]


# --- a small hand-made automaton ---------------------------------------------------------
#
# Output vocabulary: teacher ids 10..15 (indices 0..5) in a 20-token model vocabulary.
# Answers: 0 (1 | 2 3) 5, i.e. state 0 -0-> 1; 1 -1-> 2, 1 -2-> 3; 3 -3-> 2; 2 -5-> final 4.

SMALL_IDS = (10, 11, 12, 13, 14, 15)


def small_automaton() -> tuple[AnswerAutomaton, OutputVocab]:
    table = torch.full((5, 6), -1, dtype=torch.long)
    table[0, 0], table[1, 1], table[1, 2], table[3, 3], table[2, 5] = 1, 2, 3, 2, 4
    vocab = OutputVocab(SMALL_IDS, tuple(f"t{t}" for t in SMALL_IDS), len(SMALL_IDS))
    return AnswerAutomaton(table, 4, 4), vocab


def small_params(spec=None):
    return types.SimpleNamespace(extra_args=None if spec is None else {vllm_engine.EXTRA_ARGS_KEY: spec})


def test_spec_round_trips_to_the_automaton_table():
    automaton, vocab = small_automaton()
    spec = automaton_spec(automaton, vocab)
    compiled = vllm_engine.CompiledSpec.from_spec(spec)
    assert compiled.vocab_ids == list(SMALL_IDS) and compiled.final == 4
    assert torch.equal(torch.tensor(compiled.table), automaton.table)
    assert automaton_spec(automaton, vocab)["key"] == spec["key"]
    AnswerAutomatonLogitsCore.validate_params(small_params(spec))
    with pytest.raises(ValueError, match="bad edge"):
        AnswerAutomatonLogitsCore.validate_params(small_params(dict(spec, edges=[[0, 9, 1]])))


def test_processor_masks_only_its_rows_and_keeps_allowed_logits_exact():
    automaton, vocab = small_automaton()
    spec = automaton_spec(automaton, vocab)
    proc = AnswerAutomatonLogitsCore(None, torch.device("cpu"), False)
    out0, out1, out2 = [], [], []
    proc.update_state(BatchUpdate(3, [], [(0, small_params(spec), [1, 2], out0), (1, small_params(), [1], out1),
                                          (2, small_params(spec), [3], out2)], []))
    torch.manual_seed(0)
    raw = torch.randn(3, 20) * 5
    got = proc.apply(raw.clone())
    ids = list(SMALL_IDS)
    others = [t for t in range(20) if t not in ids]
    assert torch.equal(got[1], raw[1])  # not our request: untouched
    for row in (0, 2):  # state 0: only index 0 (id 10) allowed
        assert torch.isinf(got[row, others]).all() and (got[row, others] < 0).all()
        assert got[row, 10] == raw[row, 10]  # allowed: bit-exact
        torch.testing.assert_close(got[row, ids[1:]], raw[row, ids[1:]] - SHIFT)
        assert int(got[row].argmax()) == 10
    out0 += [10]  # row 0 advances to state 1 (ids 11 or 12 allowed); row 2 stays at state 0
    got = proc.apply(raw.clone())
    assert got[0, 11] == raw[0, 11] and got[0, 12] == raw[0, 12]
    assert int(got[0].argmax()) == (11 if raw[0, 11] >= raw[0, 12] else 12)
    assert int(got[2].argmax()) == 10
    out0 += [11, 15]  # complete: the row is left alone (vLLM stops it)
    assert torch.equal(proc.apply(raw.clone())[0], raw[0])


def test_processor_follows_removed_added_and_moved_rows():
    automaton, vocab = small_automaton()
    spec = automaton_spec(automaton, vocab)
    proc = AnswerAutomatonLogitsCore()
    a, b = [10], []  # a is in state 1, b in state 0
    proc.update_state(BatchUpdate(2, [], [(0, small_params(spec), [], a), (1, small_params(spec), [], b)], []))
    proc.update_state(BatchUpdate(2, [], [], [(0, 1, MoveDirectionality.SWAP)]))
    raw = torch.zeros(2, 20)
    raw[:, 11], raw[:, 12] = 1.0, 2.0
    got = proc.apply(raw.clone())
    assert int(got[1].argmax()) == 12 and int(got[0].argmax()) == 10  # a now at row 1, b at row 0
    proc.update_state(BatchUpdate(1, [0], [], [(1, 0, MoveDirectionality.UNIDIRECTIONAL)]))  # b leaves, a moves down
    assert set(proc.rows) == {0} and proc.rows[0].output is a
    c = []
    proc.update_state(BatchUpdate(2, [], [(1, small_params(), [], c)], []))  # a request without the automaton
    assert set(proc.rows) == {0}
    proc.update_state(BatchUpdate(1, [0], [], []))
    assert not proc.rows


def test_processor_walks_an_output_list_shortened_in_place_again():
    automaton, vocab = small_automaton()
    proc = AnswerAutomatonLogitsCore()
    out = [10, 12]  # state 3: only 13 allowed
    proc.update_state(BatchUpdate(1, [], [(0, small_params(automaton_spec(automaton, vocab)), [], out)], []))
    raw = torch.zeros(1, 20)
    assert int(proc.apply(raw.clone())[0].argmax()) == 13
    del out[1:]  # vLLM discarded the last id: state 1, 11 and 12 allowed
    raw[0, 11] = 1.0
    assert int(proc.apply(raw.clone())[0].argmax()) == 11
    out.append(11)  # and wrote another one in its place: state 2, only 15 allowed
    out.append(15)
    del out[2:]
    assert int(proc.apply(raw.clone())[0].argmax()) == 15
    out[1] = 12  # rewritten in place at the same length: state 3 again
    assert int(proc.apply(raw.clone())[0].argmax()) == 13


def test_processor_refuses_rows_it_cannot_follow(caplog):
    automaton, vocab = small_automaton()
    spec = automaton_spec(automaton, vocab)
    proc = AnswerAutomatonLogitsCore()
    bad, placeholder, wide = [11], [10, -1], []
    proc.update_state(BatchUpdate(3, [], [(0, small_params(spec), [], bad), (1, small_params(spec), [], placeholder),
                                          (2, small_params(spec), [], wide)], []))
    raw = torch.randn(3, 20)
    raw[2, 15] = 2000.0  # the output-vocab logits of row 2 span more than SHIFT
    got = proc.apply(raw.clone())
    assert torch.equal(got[:2], raw[:2])  # broken rows are left unconstrained (their answers are refused later)
    assert "not allow" in caplog.text and "placeholder" in caplog.text
    assert torch.isnan(got[2, list(SMALL_IDS)]).all()


def completion_from(raw_steps: torch.Tensor, automaton: AnswerAutomaton, vocab: OutputVocab, flat=False, shuffle=False):
    """What vLLM returns for raw logits (steps, 20): greedy constrained tokens and processed top-V values."""
    proc = AnswerAutomatonLogitsCore()
    out = []
    proc.update_state(BatchUpdate(1, [], [(0, small_params(automaton_spec(automaton, vocab)), [], out)], []))
    positions = FlatLogprobs() if flat else []
    rng = np.random.default_rng(0)
    for step in raw_steps:
        processed = proc.apply(step[None].clone())[0]
        token = int(processed.argmax())
        values, ids = torch.topk(processed, len(vocab))
        pairs = [(token, float(processed[token]))] + list(zip(ids.tolist(), values.tolist()))
        if shuffle:
            pairs = [pairs[0]] + [pairs[1:][i] for i in rng.permutation(len(pairs) - 1)]
        if flat:
            positions.append_fast([p[0] for p in pairs], [p[1] for p in pairs], [1] * len(pairs), [None] * len(pairs))
        else:
            positions.append({t: Logprob(v) for t, v in pairs})
        out.append(token)
        if token == SMALL_IDS[5]:
            break
    return out, positions


@pytest.mark.parametrize("flat", [False, True])
@pytest.mark.parametrize("shuffle", [False, True])
def test_completion_converts_back_to_the_raw_logits(flat, shuffle):
    automaton, vocab = small_automaton()
    torch.manual_seed(1)
    raw = torch.randn(4, 20) * 8
    tokens, positions = completion_from(raw, automaton, vocab, flat=flat, shuffle=shuffle)
    answer = answer_from_completion(tokens, positions, vocab.ids, automaton)
    assert answer.teacher_ids == tokens and automaton.accepts(answer.vocab_indices)
    expected = raw[:len(tokens)][:, list(SMALL_IDS)]
    assert answer.logits.dtype == torch.float32 and answer.logits.shape == expected.shape
    torch.testing.assert_close(answer.logits, expected, atol=1e-4, rtol=0)  # the un-shifted ids: float32 rounding
    state = 0
    for t, j in enumerate(answer.vocab_indices):  # and the allowed ones bit-exact
        allowed = automaton.table[state] >= 0
        assert torch.equal(answer.logits[t][allowed], expected[t][allowed])
        state = int(automaton.table[state, j])


def test_step_values_reads_dicts_and_flat_lists_alike():
    vocab_ids = [7, 3, 5]
    dicts = [{5: Logprob(-1.0), 7: Logprob(-2.0), 99: Logprob(0.0), 3: Logprob(-3.0)}, {7: Logprob(-4.0)}]
    flat = FlatLogprobs()
    for position in dicts:
        flat.append_fast(list(position), [p.logprob for p in position.values()], [1] * len(position),
                         [None] * len(position))
    for source in (dicts, flat):
        values, present = step_values(source, vocab_ids)
        np.testing.assert_array_equal(values[0], [-2.0, -3.0, -1.0])
        assert present.tolist() == [[True, True, True], [True, False, False]]


def test_bad_completions_are_refused_with_one_line():
    automaton, vocab = small_automaton()
    torch.manual_seed(2)
    raw = torch.randn(4, 20)
    tokens, positions = completion_from(raw, automaton, vocab)

    def refused(tokens, positions, match):
        with pytest.raises(VLLMEngineError, match=match) as e:
            answer_from_completion(tokens, positions, vocab.ids, automaton)
        assert "\n" not in str(e.value)

    refused([10, 4], positions, "not in the output vocabulary")
    refused(tokens[:-1], positions[:-1], "not one complete valid answer")
    refused(tokens, positions[:-1], "logprob positions")
    missing = [dict(p) for p in positions]
    del missing[1][SMALL_IDS[4]]
    refused(tokens, missing, "step 1: 1 of 6 output-vocab ids have no value")
    nan = [dict(p) for p in positions]
    nan[0] = {t: Logprob(float("nan")) for t in nan[0]}
    refused(tokens, nan, "step 0: non-finite")
    swapped = [dict(p) for p in positions]  # step 1 chose between ids 11 and 12: make the other one larger
    other = 12 if tokens[1] == 11 else 11
    swapped[1][other] = Logprob(swapped[1][tokens[1]].logprob + 1.0)
    refused(tokens, swapped, "not the greedy choice")


def test_the_kl_does_not_see_a_per_step_constant():
    torch.manual_seed(3)
    teacher = torch.randn(2, 5, 525) * 4
    student = torch.randn(2, 5, 525)
    constant = torch.randn(2, 5, 1) * 30  # e.g. logsumexp over the full vocabulary: logprobs vs logits
    mask = torch.ones(2, 5, dtype=torch.bool)
    for tau in (1.0, 2.0):
        torch.testing.assert_close(forward_kl(student, teacher - constant, mask, tau),
                                   forward_kl(student, teacher, mask, tau))
    torch.testing.assert_close(center_logits(teacher - constant), center_logits(teacher), atol=1e-5, rtol=0)


def test_request_carries_the_automaton_and_asks_for_every_output_vocab_value():
    automaton, vocab = small_automaton()
    grammar = types.SimpleNamespace(automaton=lambda v: automaton, end_id=15)
    tokenizer = types.SimpleNamespace(encode=lambda text, add_special_tokens=False: [ord(c) for c in text],
                                      bos_token_id=2)
    for cls, flat in ((SamplingParams, False), (FlatSamplingParams, True)):
        teacher = VLLMTeacher(None, tokenizer, "ab", "c", grammar, vocab, cls)
        p = teacher.params
        assert (p.temperature, p.max_tokens, p.stop_token_ids, p.logprobs) == (0.0, 4, [15], 6)
        assert p.flat_logprobs is flat and p.detokenize is False
        assert p.extra_args[vllm_engine.EXTRA_ARGS_KEY] == automaton_spec(automaton, vocab)
        assert teacher.prompt_ids([50, 51]) == [2, 97, 98, 50, 51, 99]
    kwargs = vllm_engine.engine_kwargs(load_config(None, ["teacher.engine=vllm"]).teacher, 525, 900)
    assert kwargs["logits_processors"] == [vllm_engine.PROCESSOR_FQCN]
    assert (kwargs["logprobs_mode"], kwargs["max_logprobs"], kwargs["dtype"]) == ("processed_logits", 525, "auto")
    assert (kwargs["max_model_len"], kwargs["load_format"]) == (900, "auto")
    random = load_config(None, ["teacher.engine=vllm", "teacher.model=random:gemma3-4b"]).teacher
    assert vllm_engine.engine_kwargs(random, 525, 900)["load_format"] == "dummy"  # random weights, as the manifest says


def test_without_vllm_the_engine_says_how_to_get_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # as if not installed
    monkeypatch.setattr(vllm_engine, "_PROCESSOR_CLASS", None)
    cfg = load_config(None, ["teacher.engine=vllm"]).teacher
    for call in (vllm_engine.import_vllm, lambda: vllm_engine.AnswerAutomatonLogitsProcessor,
                 lambda: vllm_engine.load_vllm_teacher(cfg, "", "", None, None)):
        with pytest.raises(RuntimeError) as e:
            call()
        assert str(e.value) == "teacher.engine=vllm needs vLLM: pip install vllm (GPU machines only)"


def test_processor_class_is_a_vllm_logits_processor_loadable_by_name(monkeypatch):
    """With a stand-in for vLLM's abstract base: vLLM loads `module:Class`, checks the subclass, builds it."""
    from abc import ABC, abstractmethod

    class LogitsProcessor(ABC):  # vllm/v1/sample/logits_processor/interface.py
        @abstractmethod
        def __init__(self, vllm_config, device, is_pin_memory): ...

        @abstractmethod
        def apply(self, logits): ...

        @abstractmethod
        def is_argmax_invariant(self): ...

        @abstractmethod
        def update_state(self, batch_update): ...

    fake = types.ModuleType("vllm")
    module = types.ModuleType("vllm.v1.sample.logits_processor")
    module.LogitsProcessor = LogitsProcessor
    for name, mod in (("vllm", fake), ("vllm.v1", types.ModuleType("vllm.v1")),
                      ("vllm.v1.sample", types.ModuleType("vllm.v1.sample")),
                      ("vllm.v1.sample.logits_processor", module)):
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.setattr(vllm_engine, "_PROCESSOR_CLASS", None)
    import importlib

    module_path, qualname = vllm_engine.PROCESSOR_FQCN.split(":")  # as _load_logitsprocs_by_fqcns does
    cls = getattr(importlib.import_module(module_path), qualname)
    assert isinstance(cls, type) and issubclass(cls, LogitsProcessor)
    proc = cls(None, torch.device("cpu"), False)
    assert proc.is_argmax_invariant() is False and proc.needs_output_token_ids() is True
    assert pickle.loads(pickle.dumps(cls)) is cls


def test_config_engine_field():
    assert load_config().teacher.engine == "transformers"
    assert load_config(None, ["teacher.engine=vllm"]).teacher.engine == "vllm"
    for override, words in (("teacher.engine=llamacpp", ["teacher.engine", "llamacpp"]),
                            ("teacher.vllm_gpu_memory_utilization=0", ["teacher.vllm_gpu_memory_utilization"]),
                            ("teacher.vllm_gpu_memory_utilization=1.5", ["teacher.vllm_gpu_memory_utilization"])):
        with pytest.raises(ConfigError) as e:
            load_config(None, [override])
        assert all(w in str(e.value) for w in words) and "\n" not in str(e.value)


# --- building the engine: versions, runner, model length, random teachers ------------------


def fake_vllm(monkeypatch, version: str, v2_runner: bool = False) -> dict:
    """A `vllm` module whose LLM records its arguments and reports the model runner it would use."""
    built = {}

    class LLM:
        def __init__(self, **kwargs):
            built.update(kwargs, runner_env=os.environ.get(vllm_engine.RUNNER_ENV))
            self.llm_engine = types.SimpleNamespace(vllm_config=types.SimpleNamespace(use_v2_model_runner=v2_runner))

    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(__version__=version, LLM=LLM,
                                                                   SamplingParams=SamplingParams))
    monkeypatch.setattr(vllm_engine, "_processor_class", lambda: None)
    monkeypatch.delenv(vllm_engine.RUNNER_ENV, raising=False)
    return built


def test_engine_runs_on_the_v1_runner_with_the_tasks_model_length(tiny_prepared, tiny_teacher_dir, monkeypatch):
    p = tiny_prepared
    built = fake_vllm(monkeypatch, "0.33.1")
    cfg = load_config(None, [f"teacher.model={tiny_teacher_dir}", "teacher.engine=vllm"]).teacher
    teacher = vllm_engine.load_vllm_teacher(cfg, p.prefix, p.suffix, p.grammar, p.vocab, p.tokenizer,
                                            max_comment_tokens=25)
    assert built["runner_env"] == "0" and built["model"] == tiny_teacher_dir and built["load_format"] == "auto"
    longest = teacher.prompt_ids([0] * 25) + [0] * teacher.automaton.max_steps
    assert built["max_model_len"] == len(longest) < 2048  # not the model's 131,072 positions


@pytest.mark.parametrize("version,env,v2,words", [
    ("0.12.0", None, False, "vLLM 0.13 or later (this is 0.12.0)"),
    ("0.33.1", "1", False, "unset VLLM_USE_V2_MODEL_RUNNER"),
    ("0.33.1", None, True, "runs its V2 model runner"),
])
def test_an_engine_that_cannot_run_the_processor_is_refused_in_one_line(tiny_prepared, tiny_teacher_dir,
                                                                         monkeypatch, version, env, v2, words):
    p = tiny_prepared
    fake_vllm(monkeypatch, version, v2_runner=v2)
    if env is not None:
        monkeypatch.setenv(vllm_engine.RUNNER_ENV, env)
    cfg = load_config(None, [f"teacher.model={tiny_teacher_dir}", "teacher.engine=vllm"]).teacher
    with pytest.raises(RuntimeError) as e:
        vllm_engine.load_vllm_teacher(cfg, p.prefix, p.suffix, p.grammar, p.vocab, p.tokenizer)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_a_random_teacher_is_the_published_config_with_dummy_weights(tiny_prepared, gemma_tokenizer, tmp_path,
                                                                      monkeypatch):
    from transformers import AutoConfig, AutoTokenizer

    p = tiny_prepared
    built = fake_vllm(monkeypatch, "0.33.1")
    monkeypatch.setattr(vllm_engine, "load_tokenizer", lambda cfg: gemma_tokenizer)  # the embedded teacher's
    cfg = load_config(None, ["teacher.model=random:gemma3-4b", "teacher.engine=vllm",
                             f"teacher.cache_dir={tmp_path}"]).teacher
    vllm_engine.load_vllm_teacher(cfg, p.prefix, p.suffix, p.grammar, p.vocab, p.tokenizer)
    assert built["load_format"] == "dummy" and built["model"] == str(tmp_path / "random-gemma3-4b")
    config = AutoConfig.from_pretrained(built["model"])
    assert config.architectures == ["Gemma3ForCausalLM"] and config.hidden_size == 2560 and config.vocab_size == 262208
    assert len(AutoTokenizer.from_pretrained(built["model"])) == len(gemma_tokenizer)


# --- the simulated engine against the transformers teacher --------------------------------


@pytest.mark.parametrize("flat", [False, True])
def test_simulated_engine_gives_the_transformers_teachers_answers_and_logits(tiny_prepared, tiny_teacher_model, flat):
    p = tiny_prepared
    comments = [p.tokenizer.encode(t, add_special_tokens=False) for t in p.corpus.head(7).column("text").to_pylist()]
    reference = Teacher(tiny_teacher_model, p.tokenizer, p.prefix, p.suffix, p.grammar, p.vocab).answer_plain(comments)
    engine = VLLMTeacher(FakeLLM(tiny_teacher_model), p.tokenizer, p.prefix, p.suffix, p.grammar, p.vocab,
                         FlatSamplingParams if flat else SamplingParams)
    got = engine.answer(comments)
    assert engine.llm.steps > max(len(a.teacher_ids) for a in got)  # more comments than rows: rows were reused
    for a, b in zip(reference, got):
        assert b.teacher_ids == a.teacher_ids and b.vocab_indices == a.vocab_indices
        torch.testing.assert_close(b.logits, a.logits, atol=2e-3, rtol=2e-3)


def test_extraction_actor_uses_the_vllm_engine_and_writes_the_same_rows(tiny_teacher_dir, tiny_teacher_model,
                                                                         tmp_path, monkeypatch):
    cfg = tiny_config(tiny_teacher_dir, str(tmp_path / "records"))
    p = prepare(cfg)
    pin_plan(cfg.records.uri, make_plan(p))
    shard = shard_item(p.corpus, 0, p.tokenizer)
    threads = torch.get_num_threads()
    reference = ShardWriter(cfg, threads=1).answer_shard(shard)

    built = {}

    class CountingLLM(FakeLLM):
        def generate(self, prompts, params, use_tqdm=False):
            built.setdefault("prompts_per_call", []).append(len(prompts))
            return super().generate(prompts, params, use_tqdm)

    def fake_load(tcfg, prefix, suffix, grammar, vocab, tokenizer=None, max_comment_tokens=None):
        built["cfg"], built["max_comment_tokens"] = tcfg, max_comment_tokens
        return VLLMTeacher(CountingLLM(tiny_teacher_model), tokenizer, prefix, suffix, grammar, vocab, SamplingParams)

    monkeypatch.setattr(vllm_engine, "load_vllm_teacher", fake_load)
    cfg_vllm = tiny_config(tiny_teacher_dir, str(tmp_path / "records"), "teacher.engine=vllm")
    rows = ShardWriter(cfg_vllm, threads=1).answer_shard(shard)
    torch.set_num_threads(threads)  # ShardWriter set this process's torch threads
    assert built["cfg"].engine == "vllm" and built["max_comment_tokens"] == cfg.corpus.max_tokens
    assert built["prompts_per_call"] == [len(shard["ids"])]  # the whole shard in one generate call: vLLM batches
    assert [r["answer_ids"] for r in rows] == [r["answer_ids"] for r in reference]
    assert [r["answer_text"] for r in rows] == [r["answer_text"] for r in reference]
    V = len(p.vocab)
    for a, b in zip(reference, rows):
        la = records.decode_logits(a["logits"], a["n_steps"], V, "float16").float()
        lb = records.decode_logits(b["logits"], b["n_steps"], V, "float16").float()
        torch.testing.assert_close(lb, la, atol=2e-2, rtol=2e-3)  # float16 storage of the same float32 logits


# --- the real vLLM (GPU machines only) ----------------------------------------------------


@pytest.mark.gpu
def test_vllm_matches_transformers_teacher(tiny_prepared, tiny_teacher_dir):
    """The real engine on the tiny teacher against the transformers teacher, same GPU, same dtype.

    Not yet run anywhere: see the module docstring of distill.vllm_engine.
    """
    pytest.importorskip("vllm")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from distill.teacher import load_teacher
    from distill.vllm_engine import load_vllm_teacher

    dtype = os.environ.get("DISTILL_VLLM_TEST_DTYPE", "bfloat16")  # vLLM refuses float16 for Gemma 3
    atol = {"float32": 2e-3, "float16": 2e-2, "bfloat16": 1e-1}[dtype]
    p = tiny_prepared
    cfg = load_config(None, [f"teacher.model={tiny_teacher_dir}", "teacher.engine=vllm", f"teacher.dtype={dtype}",
                             "teacher.vllm_gpu_memory_utilization=0.3"]).teacher
    comments = [p.tokenizer.encode(t, add_special_tokens=False) for t in p.corpus.head(12).column("text").to_pylist()]
    got = load_vllm_teacher(cfg, p.prefix, p.suffix, p.grammar, p.vocab, p.tokenizer).answer(comments)
    reference = load_teacher(cfg, p.prefix, p.suffix, p.grammar, p.vocab, p.tokenizer,
                             device=torch.device("cuda")).answer_plain(comments)
    for i, (a, b) in enumerate(zip(reference, got)):
        assert b.teacher_ids == a.teacher_ids, f"comment {i}: vLLM {b.teacher_ids}, transformers {a.teacher_ids}"
        # raw logits in both; compared up to a per-step constant, which the KL does not see either
        torch.testing.assert_close(center_logits(b.logits), center_logits(a.logits.cpu()), atol=atol, rtol=0)


def test_bench_times_both_engines_on_a_whole_shard_and_counts_agreement(tiny_teacher_dir, tiny_teacher_model,
                                                                        tmp_path, monkeypatch):
    from distill.bench import bench_vllm

    cfg = tiny_config(tiny_teacher_dir, str(tmp_path / "records"), "teacher.engine=vllm", "corpus.limit=6")
    p = prepare(cfg)
    shard = shard_item(p.corpus, 0, p.tokenizer)
    monkeypatch.setattr(vllm_engine, "load_vllm_teacher", lambda tcfg, prefix, suffix, grammar, vocab, tokenizer,
                        max_comment_tokens: VLLMTeacher(FakeLLM(tiny_teacher_model), tokenizer, prefix, suffix,
                                                        grammar, vocab, SamplingParams))
    teacher = Teacher(tiny_teacher_model, p.tokenizer, p.prefix, p.suffix, p.grammar, p.vocab)
    r = bench_vllm(cfg, p, teacher, shard, repeats=1, device=torch.device("cpu"))
    assert r["comments"] == r["agree"] == 6 and r["max_logit_diff"] < 2e-3 and r["random_weights"] is False
    assert r["vllm_comments_per_s"] > 0 and r["transformers_comments_per_s"] > 0
