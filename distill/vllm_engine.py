"""The vLLM teacher engine (`teacher.engine=vllm`): the same records as `distill.teacher`, on GPU machines.

    distill extract --config ... teacher.engine=vllm teacher.batch_size=256

The default engine stays transformers (`distill.teacher`); nothing here imports vLLM
until a vLLM teacher is built, and no CPU test needs vLLM.

WHAT WAS VERIFIED, AND WHAT WAS NOT. This engine has never run against a real vLLM on a
GPU in this repository (the machine it was written on has no GPU and cannot install
vLLM). What is tested on CPU (tests/test_vllm_engine.py): the logits processor's
state tracking and masking on torch tensors; the conversion of vLLM-shaped outputs
(per-position `{token id: Logprob}` dicts and `FlatLogprobs`-shaped flat lists) into
records; and a whole simulated engine loop that drives the processor the way vLLM's
V1 sampler does (see below), with the tiny random Gemma 3 teacher as the model and
requests added, removed and moved in the persistent batch, which gives the same
answers and logits as `Teacher.answer_plain`. The vLLM behaviour that simulation
stands in for was read in vLLM's source, not run. `test_vllm_matches_transformers_teacher`
(`@pytest.mark.gpu`) runs the real engine against the transformers teacher; it has not
been run yet.

DESIGN. Two things are needed from vLLM's offline `LLM.generate`: (a) greedy decoding
restricted at every step to the tokens the answer automaton allows, with exactly our
tokenization (structured outputs constrain text, not token sequences, so they could
produce '{' '"' where the automaton demands '{"'), and (b) at every step the raw
logits of a FIXED list of V=525 token ids, before the constraint mask. What vLLM offers
(V1 engine; files in vllm-project/vllm):

- Per-request logprobs are the top-k of the whole vocabulary plus the sampled token
  (`SamplingParams.logprobs`, `Sampler.gather_logprobs` in vllm/v1/sample/sampler.py);
  `logprobs=-1` returns all 262,144 per step. `prompt_logprobs` is the same top-k per
  prompt position. Neither can name token ids.
- `SamplingParams.logprob_token_ids` (named ids) exists only in much newer vLLM (added
  with generative scoring, PR #34539, 2026), is capped at `MAX_LOGPROB_TOKEN_IDS = 128`
  ids in vllm/sampling_params.py (`_validate_logprobs`) in the recent copies read, and in
  the first revision read `Sampler.gather_specific_token_logprobs` was given the logits
  AFTER the logits processors (after our mask; later revisions pass the raw logprobs).
  Not usable for 525 ids, nor on 0.11-0.13.
- Engine arg `logprobs_mode` (vllm/config/model.py `LogprobsMode`): raw_logprobs |
  raw_logits | processed_logprobs | processed_logits. `Sampler.forward` takes the raw
  ones BEFORE any logits processor; with `processed_logits` and an all-greedy batch,
  `Sampler.sample` returns the logits AFTER `apply_logits_processors` (allowed ids,
  bad words, the non-argmax-invariant processors, penalties), which are also the
  logits the greedy argmax is taken on, and `gather_logprobs` takes their top-k.
- Custom V1 logits processors: `LLM(logits_processors=["module:Class"])`
  (vllm/v1/sample/logits_processor/__init__.py `_load_logitsprocs_by_fqcns`),
  subclasses of `vllm.v1.sample.logits_processor.LogitsProcessor`
  (.../interface.py): `__init__(vllm_config, device, is_pin_memory)`,
  `is_argmax_invariant()`, `update_state(BatchUpdate | None)` with `removed` batch
  indices, `added` tuples `(index, params, prompt_tok_ids, output_tok_ids)` whose
  `output_tok_ids` is a live reference to the request's generated ids, `moved`
  `(a, b, MoveDirectionality.UNIDIRECTIONAL | SWAP)`, and `apply(logits)` on the
  (batch, vocab) float32 tensor, row = batch index. Per-request data travels in
  `SamplingParams.extra_args`. Newer vLLM also asks `needs_output_token_ids()`, so that
  async scheduling repairs its -1 placeholders before the processors run
  (`InputBatch.update_async_output_token_ids` in vllm/v1/worker/gpu_input_batch.py).

So: one custom processor (`AnswerAutomatonLogitsProcessor`) does both jobs in the
processed logits. For each of our rows it tracks the automaton state from the live
output ids and rewrites the row as: every id outside the output vocabulary -> -inf;
allowed output-vocab ids -> their raw logit, unchanged; the other output-vocab ids ->
raw logit - SHIFT (1024). As long as the row's output-vocab logits span less than
SHIFT (checked on the device; a row that does not becomes NaN and the answer is
refused), the argmax is the greedy choice among the allowed tokens, and the top-V
processed "logprobs" that vLLM returns (engine `logprobs_mode="processed_logits"`,
`max_logprobs=V`, request `logprobs=V`) are exactly the V output-vocab ids: finite,
everything else -inf. `answer_from_completion` adds SHIFT back to the ids that were not
allowed at that step (it knows them from the automaton): allowed ids come back
bit-exact, the others within half a float32 ulp of 1024 (6e-5), far below the float16
the records store. The recorded values are then the raw logits themselves, not
log-probabilities: no per-step constant to remove (`center_logits` removes one where
two engines are compared; the KL over the output vocabulary does not depend on it).
The driver refuses an answer the automaton does not accept, a missing id, a non-finite
value, or a step whose chosen token is not the greedy choice among the allowed ones.

Requests are `{"prompt_token_ids": BOS + prefix + comment + suffix}` (exactly
`Teacher.prompt_ids`) with `SamplingParams(temperature=0, max_tokens=max_steps,
stop_token_ids=[end id], logprobs=V, detokenize=False, extra_args=...)`; the returned
`CompletionOutput.token_ids` include the stop token (vllm/v1/engine/detokenizer.py puts
the skipped stop id back) and `logprobs` has one position per token.

SUPPORTED VLLM VERSIONS: 0.13 and later, on the V1 model runner. From 0.31 vLLM picks its
V2 model runner by default (`VllmConfig.use_v2_model_runner` in vllm/config/vllm.py), whose
logits processors are another class (vllm/v1/worker/gpu/sample/logits_processor.py), so
`LLM(...)` refused ours; the env var VLLM_USE_V2_MODEL_RUNNER, when set, decides the runner
verbatim, so `load_vllm_teacher` sets it to 0 (and refuses in one line where it is set to 1,
or where the engine still reports the V2 runner). Before 0.13 async scheduling handed the
processors -1 placeholders for the ids of the last step, so older versions are refused.
Speculative decoding is not supported; tensor parallel size is 1 (one engine per Ray actor,
one GPU each). `max_model_len` is the task's longest request (BOS + prompt + the longest
comment + the longest answer), not the model's 131,072 tokens, so the KV cache reserved is
what the job uses. A `random:` teacher runs as the published architecture's config with
vLLM's dummy weights (`load_format="dummy"`): random like the manifest says, but not the
transformers engine's random weights, so the two engines agree only on a real checkpoint.
Cost, not measured: top-k of 525 over 262,144 columns per step on the GPU, and vLLM builds
526 Python `Logprob` objects per generated token (flat lists where
`SamplingParams.flat_logprobs` exists).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from packaging.version import Version

from distill.constrained import AnswerAutomaton, AnswerGrammar
from distill.teacher import (RANDOM_PREFIX, Answer, Teacher, cache_root, gemma3_config, load_tokenizer,
                             resolve_teacher_path)
from distill.vocab import OutputVocab

logger = logging.getLogger(__name__)

VLLM_MISSING = "teacher.engine=vllm needs vLLM: pip install vllm (GPU machines only)"
MIN_VLLM = "0.13"
RUNNER_ENV = "VLLM_USE_V2_MODEL_RUNNER"
"""Set, it decides vLLM's model runner (1 = V2, 0 = V1); our logits processor needs the V1 runner."""
EXTRA_ARGS_KEY = "distill_answer_automaton"
"""The key of `SamplingParams.extra_args` that carries a request's automaton spec."""
PROCESSOR_FQCN = "distill.vllm_engine:AnswerAutomatonLogitsProcessor"
SHIFT = 1024.0
"""Subtracted from the output-vocab logits the automaton does not allow at a step; added back when reading."""


class VLLMEngineError(RuntimeError):
    """The vLLM engine returned something that is not a valid constrained greedy answer; one line."""


def import_vllm():
    """vLLM, imported only here (and in the processor class), or one clear line if it is not installed."""
    try:
        import vllm
    except ImportError:
        raise RuntimeError(VLLM_MISSING) from None
    return vllm


# -- the request: the automaton as data ------------------------------------------


def automaton_spec(automaton: AnswerAutomaton, vocab: OutputVocab) -> dict:
    """What a request carries in `extra_args`: output-vocab teacher ids and the sparse automaton, JSON-able.

    `edges` lists [state, output-vocab index, next state]; `key` names the spec so the
    processor builds its tensors once per distinct automaton, not once per request.
    """
    table = automaton.table.tolist()
    edges = [[s, j, nxt] for s, row in enumerate(table) for j, nxt in enumerate(row) if nxt >= 0]
    spec = {"vocab_ids": [int(t) for t in vocab.ids], "states": len(table), "edges": edges,
            "final": int(automaton.final)}
    spec["key"] = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    return spec


def check_spec(spec: Any) -> None:
    """ValueError unless `spec` is a well-formed `automaton_spec` (vLLM's `validate_params` calls this)."""
    if not isinstance(spec, Mapping):
        raise ValueError(f"extra_args[{EXTRA_ARGS_KEY!r}] must be a mapping, not {type(spec).__name__}")
    for name in ("vocab_ids", "states", "edges", "final", "key"):
        if name not in spec:
            raise ValueError(f"extra_args[{EXTRA_ARGS_KEY!r}] has no {name!r}")
    V, S = len(spec["vocab_ids"]), int(spec["states"])
    if V == 0 or len(set(spec["vocab_ids"])) != V:
        raise ValueError(f"extra_args[{EXTRA_ARGS_KEY!r}]: vocab_ids must be distinct and not empty")
    if not 0 <= int(spec["final"]) < S:
        raise ValueError(f"extra_args[{EXTRA_ARGS_KEY!r}]: final state {spec['final']} not in [0, {S})")
    for s, j, nxt in spec["edges"]:
        if not (0 <= s < S and 0 <= j < V and 0 <= nxt < S):
            raise ValueError(f"extra_args[{EXTRA_ARGS_KEY!r}]: bad edge {[s, j, nxt]}")


@dataclass
class CompiledSpec:
    """An `automaton_spec` as the processor uses it: a host table for state tracking, device tensors for masking."""

    vocab_ids: list[int]
    table: list[list[int]]  # (S, V) next state or -1
    final: int
    index: dict[int, int]  # teacher id -> output-vocab index
    _device: dict = field(default_factory=dict)  # device -> (vocab_ids (V,), allowed (S, V) bool)

    @classmethod
    def from_spec(cls, spec: Mapping) -> "CompiledSpec":
        check_spec(spec)
        V, S = len(spec["vocab_ids"]), int(spec["states"])
        table = [[-1] * V for _ in range(S)]
        for s, j, nxt in spec["edges"]:
            table[s][j] = nxt
        ids = [int(t) for t in spec["vocab_ids"]]
        return cls(ids, table, int(spec["final"]), {t: j for j, t in enumerate(ids)})

    def on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._device:
            self._device[device] = (torch.tensor(self.vocab_ids, dtype=torch.long, device=device),
                                    torch.tensor(self.table, dtype=torch.long, device=device) >= 0)
        return self._device[device]

    def step(self, state: int, token: int) -> int:
        """The state after generated teacher id `token`; -1 if the automaton does not allow it there."""
        j = self.index.get(token)
        return self.table[state][j] if j is not None else -1


# -- the logits processor ----------------------------------------------------------


@dataclass
class _Row:
    spec: CompiledSpec
    output: Sequence[int]  # vLLM's live list of the request's generated ids
    state: int = 0
    walked: list[int] = field(default_factory=list)  # the ids the state was walked over

    def advance(self) -> int:
        """Walk the automaton over the ids generated since the last call; the current state, -1 once broken."""
        out = self.output
        if list(out[:len(self.walked)]) != self.walked:  # vLLM shortened or rewrote the list in place: walk it again
            self.state, self.walked = 0, []
        while len(self.walked) < len(out) and self.state not in (self.spec.final, -1):
            token = int(out[len(self.walked)])
            self.state = self.spec.step(self.state, token)
            self.walked.append(token)
            if self.state == -1:
                why = ("an async-scheduling placeholder: this vLLM gave the processor no real output ids"
                       if token == -1 else "the automaton does not allow it")
                logger.warning("distill answer automaton: generated token %d refused (%s); the row is left "
                               "unconstrained and its answer will be refused", token, why)
        return self.state


def _entry(added) -> tuple[int, Any, Sequence[int]]:
    """(index, params, output ids) of a `BatchUpdate.added` entry: (index, params, [prompt ids,] output ids)."""
    return added[0], added[1], added[-1]


def _is_swap(direction) -> bool:
    return getattr(direction, "name", direction) == "SWAP"


class AnswerAutomatonLogitsCore:
    """The logic of the vLLM logits processor, with no vLLM import (see the module docstring).

    Rows whose request carries `extra_args[EXTRA_ARGS_KEY]` are rewritten: ids outside the
    output vocabulary -> -inf, allowed ids unchanged, other output-vocab ids - SHIFT; a row
    whose output-vocab logits span SHIFT or more becomes NaN (refused downstream). Other rows,
    and rows whose answer is complete, are left alone.
    """

    SHIFT = SHIFT

    def __init__(self, vllm_config=None, device=None, is_pin_memory: bool = False):
        self.rows: dict[int, _Row] = {}  # persistent-batch index -> row state
        self.pin_memory = is_pin_memory  # vLLM says whether page-locked host memory is available
        self._compiled: dict[str, CompiledSpec] = {}

    @classmethod
    def validate_params(cls, params) -> None:
        spec = (getattr(params, "extra_args", None) or {}).get(EXTRA_ARGS_KEY)
        if spec is not None:
            check_spec(spec)

    def is_argmax_invariant(self) -> bool:
        return False  # it decides the greedy choice

    def needs_output_token_ids(self) -> bool:
        return True  # it reads the generated ids, so async scheduling must give real ones

    def _compile(self, spec: Mapping) -> CompiledSpec:
        key = spec.get("key") if isinstance(spec, Mapping) else None
        if key not in self._compiled:
            self._compiled[key] = CompiledSpec.from_spec(spec)
        return self._compiled[key]

    def update_state(self, batch_update) -> None:
        if not batch_update:
            return
        for index in batch_update.removed:  # in the documented order: removed, added, moved
            self.rows.pop(index, None)
        for added in batch_update.added:
            index, params, output = _entry(added)
            spec = (getattr(params, "extra_args", None) or {}).get(EXTRA_ARGS_KEY)
            if spec is None:
                self.rows.pop(index, None)
            else:
                self.rows[index] = _Row(self._compile(spec), output)
        for a, b, direction in batch_update.moved:
            row_a, row_b = self.rows.pop(a, None), self.rows.pop(b, None)
            if row_a is not None:
                self.rows[b] = row_a
            if _is_swap(direction) and row_b is not None:
                self.rows[a] = row_b

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.rows:
            return logits
        groups: dict[int, tuple[CompiledSpec, list[int], list[int]]] = {}
        for index, row in self.rows.items():
            if index >= logits.shape[0]:
                continue
            state = row.advance()
            if state in (row.spec.final, -1):
                continue  # answered (vLLM stops it; a token scheduled past the stop is discarded), or broken
            groups.setdefault(id(row.spec), (row.spec, [], []))
            groups[id(row.spec)][1].append(index)
            groups[id(row.spec)][2].append(state)
        for spec, indices, states in groups.values():
            vocab_ids, allowed_table = spec.on(logits.device)
            host = torch.tensor([indices, states], dtype=torch.long, pin_memory=self.pin_memory)  # (2, R)
            r, state = host.to(logits.device, non_blocking=self.pin_memory)  # one copy per step, async when pinned
            allowed = allowed_table[state]  # (R, V)
            sub = logits[r[:, None], vocab_ids[None, :]]  # (R, V) raw logits of the output vocabulary
            span = sub.amax(-1) - sub.amin(-1)  # (R,)
            new = torch.where(allowed, sub, sub - self.SHIFT)
            new = torch.where((span < self.SHIFT)[:, None], new, torch.full_like(new, float("nan")))
            logits[r] = float("-inf")
            logits[r[:, None], vocab_ids[None, :]] = new
        return logits


_PROCESSOR_CLASS = None


def _processor_class():
    """`AnswerAutomatonLogitsCore` as a subclass of vLLM's LogitsProcessor, built on first use (imports vLLM)."""
    global _PROCESSOR_CLASS
    if _PROCESSOR_CLASS is None:
        import_vllm()
        try:
            from vllm.v1.sample.logits_processor import LogitsProcessor
        except ImportError:
            raise RuntimeError(f"teacher.engine=vllm needs vLLM {MIN_VLLM} or later (V1 custom logits processors)"
                               ) from None
        cls = type("AnswerAutomatonLogitsProcessor", (AnswerAutomatonLogitsCore, LogitsProcessor),
                   {"__module__": __name__, "__doc__": AnswerAutomatonLogitsCore.__doc__})
        cls.__qualname__ = "AnswerAutomatonLogitsProcessor"
        _PROCESSOR_CLASS = cls
    return _PROCESSOR_CLASS


def __getattr__(name: str):
    # vLLM loads the processor by its name, PROCESSOR_FQCN, in its engine process; building the class
    # only then keeps `import distill.vllm_engine` free of vLLM.
    if name == "AnswerAutomatonLogitsProcessor":
        return _processor_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# -- reading vLLM's outputs ----------------------------------------------------------


def step_values(step_logprobs, vocab_ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Per-position returned values -> ((steps, V) float64 values, (steps, V) bool present), output-vocab order.

    `step_logprobs` is `CompletionOutput.logprobs`: a list with one `{token id: Logprob}`
    dict per generated token (vllm/v1/engine/logprobs.py `_make_logprob_dict`), or a
    `FlatLogprobs` (vllm/logprobs.py: flat `token_ids` / `logprobs` lists, `start_indices` /
    `end_indices` per position). Order within a position does not matter; ids outside
    `vocab_ids` are ignored; a missing id is `present=False` (its value NaN).
    """
    V = len(vocab_ids)
    if all(hasattr(step_logprobs, a) for a in ("start_indices", "end_indices", "token_ids", "logprobs")):
        steps = len(step_logprobs.start_indices)
        values, present = np.full((steps, V), np.nan), np.zeros((steps, V), dtype=bool)
        lookup = {int(t): j for j, t in enumerate(vocab_ids)}
        ids, logprobs = step_logprobs.token_ids, step_logprobs.logprobs
        for t, (s, e) in enumerate(zip(step_logprobs.start_indices, step_logprobs.end_indices)):
            for token, value in zip(ids[s:e], logprobs[s:e]):
                j = lookup.get(int(token))
                if j is not None:
                    values[t, j], present[t, j] = value, True
        return values, present
    values, present = np.full((len(step_logprobs), V), np.nan), np.zeros((len(step_logprobs), V), dtype=bool)
    for t, position in enumerate(step_logprobs):
        for j, token in enumerate(vocab_ids):
            entry = position.get(token) if position is not None else None
            if entry is not None:
                values[t, j], present[t, j] = getattr(entry, "logprob", entry), True
    return values, present


def answer_from_completion(token_ids: Sequence[int], step_logprobs, vocab_ids: Sequence[int],
                           automaton: AnswerAutomaton, shift: float = SHIFT) -> Answer:
    """One vLLM completion (processed values from `AnswerAutomatonLogitsProcessor`) -> our `Answer`.

    Checks everything it can: the ids form one complete valid answer, every step has a
    value for every output-vocab id, the values are finite (a NaN row = logit span >= shift),
    and each step's token is the greedy choice among the tokens allowed there.
    """
    index = {int(t): j for j, t in enumerate(vocab_ids)}
    token_ids = [int(t) for t in token_ids]
    outside = [t for t in token_ids if t not in index]
    if outside:
        raise VLLMEngineError(f"generated ids {outside[:5]} are not in the output vocabulary")
    indices = [index[t] for t in token_ids]
    if not automaton.accepts(indices):
        raise VLLMEngineError(f"generated ids {token_ids} are not one complete valid answer")
    if step_logprobs is None or len(step_logprobs) != len(indices):
        got = None if step_logprobs is None else len(step_logprobs)
        raise VLLMEngineError(f"{got} logprob positions for {len(indices)} generated tokens "
                              f"(the engine must run with logprobs=V and logprobs_mode=processed_logits)")
    values, present = step_values(step_logprobs, vocab_ids)  # (steps, V)
    if not present.all():
        t = int(np.nonzero(~present.all(-1))[0][0])
        raise VLLMEngineError(f"step {t}: {int((~present[t]).sum())} of {len(vocab_ids)} output-vocab ids have no "
                              f"value (max_logprobs and logprobs must be >= the vocabulary size)")
    table = automaton.table.cpu().numpy() if isinstance(automaton.table, torch.Tensor) else np.asarray(automaton.table)
    raw = np.empty_like(values)
    state = 0
    for t, j in enumerate(indices):
        allowed = table[state] >= 0
        raw[t] = np.where(allowed, values[t], values[t] + shift)
        if not np.isfinite(raw[t]).all():
            raise VLLMEngineError(f"step {t}: non-finite logits (the output-vocab logits span {shift:g} or more, "
                                  f"or the processor did not run)")
        if raw[t, j] < raw[t][allowed].max():
            raise VLLMEngineError(f"step {t}: token {token_ids[t]} is not the greedy choice among the allowed tokens")
        state = int(table[state, j])
    return Answer(token_ids, indices, torch.from_numpy(raw.astype(np.float32)))


def center_logits(logits: torch.Tensor) -> torch.Tensor:
    """Logits minus their logsumexp over the last dim: equal for two engines whose logits differ by a per-step
    constant (the KL over the output vocabulary does not see that constant either)."""
    logits = logits.float()
    return logits - torch.logsumexp(logits, -1, keepdim=True)


# -- the engine ----------------------------------------------------------------------


def sampling_kwargs(spec: dict, vocab_size: int, max_steps: int, end_id: int) -> dict:
    """SamplingParams for one constrained greedy answer with the processed values of the whole output vocabulary."""
    return dict(n=1, temperature=0.0, top_p=1.0, max_tokens=max_steps, min_tokens=0, stop_token_ids=[end_id],
                ignore_eos=False, logprobs=vocab_size, detokenize=False, skip_special_tokens=False,
                presence_penalty=0.0, frequency_penalty=0.0, repetition_penalty=1.0,
                extra_args={EXTRA_ARGS_KEY: spec})


def engine_kwargs(cfg, vocab_size: int, max_model_len: int) -> dict:
    """`vllm.LLM(...)` arguments besides the model: our processor, processed logits, room for V logprobs,
    a KV cache sized for the task's longest request; dummy weights for a `random:` teacher."""
    return dict(logits_processors=[PROCESSOR_FQCN], logprobs_mode="processed_logits", max_logprobs=vocab_size,
                gpu_memory_utilization=cfg.vllm_gpu_memory_utilization, tensor_parallel_size=1,
                dtype=cfg.dtype, seed=0,  # vLLM takes the same dtype names
                max_model_len=max_model_len, load_format="dummy" if cfg.model.startswith(RANDOM_PREFIX) else "auto")


def check_vllm(version: str) -> None:
    """One line where this vLLM cannot run our processor: too old, or told to use its V2 model runner."""
    if Version(version) < Version(MIN_VLLM):
        raise RuntimeError(f"teacher.engine=vllm needs vLLM {MIN_VLLM} or later (this is {version}): "
                           "older ones give logits processors placeholder ids under async scheduling")
    if os.environ.get(RUNNER_ENV, "0") not in ("0", "false", "False"):
        raise RuntimeError(f"teacher.engine=vllm needs vLLM's V1 model runner: unset {RUNNER_ENV} "
                           f"(it is {os.environ[RUNNER_ENV]!r}); its V2 runner does not take our logits processor")


def random_teacher_dir(cfg) -> str:
    """For a `random:` teacher, a model directory vLLM loads with dummy weights: the published config
    (`distill.teacher.GEMMA3_ARCHITECTURES`) and the embedded tokenizer, no weights."""
    name = cfg.model[len(RANDOM_PREFIX):]
    config = gemma3_config(name)
    config.architectures, config.dtype = ["Gemma3ForCausalLM"], "bfloat16"  # as the published config.json
    target = cache_root(cfg) / f"random-{name}"
    config.save_pretrained(target)
    load_tokenizer(cfg).save_pretrained(target)
    return str(target)


class VLLMTeacher:
    """The vLLM counterpart of `distill.teacher.Teacher`: `answer(comments_ids)` -> list[Answer], same records.

    `llm` is a `vllm.LLM` built with `engine_kwargs`; `sampling_params_cls` is `vllm.SamplingParams`
    (tests pass stand-ins for both).
    """

    def __init__(self, llm, tokenizer, prompt_prefix: str, prompt_suffix: str, grammar: AnswerGrammar,
                 vocab: OutputVocab, sampling_params_cls):
        self.llm = llm
        self.tokenizer = tokenizer
        self.grammar = grammar
        self.vocab = vocab
        self.automaton = grammar.automaton(vocab)
        self.prefix_ids = tokenizer.encode(prompt_prefix, add_special_tokens=False)
        self.suffix_ids = tokenizer.encode(prompt_suffix, add_special_tokens=False)
        self.spec = automaton_spec(self.automaton, vocab)
        kwargs = sampling_kwargs(self.spec, len(vocab), self.automaton.max_steps, grammar.end_id)
        try:  # flat lists instead of a dict of 526 Logprob objects per token, where this vLLM has them
            self.params = sampling_params_cls(**kwargs, flat_logprobs=True)
        except TypeError:
            self.params = sampling_params_cls(**kwargs)

    prompt_ids = Teacher.prompt_ids  # BOS + prompt prefix + comment + prompt suffix: the same ids

    def runtime(self) -> dict[str, str]:
        """As Teacher.runtime: the dtype vLLM resolved (teacher.dtype=auto: the checkpoint's)."""
        try:
            dtype = str(self.llm.llm_engine.vllm_config.model_config.dtype).removeprefix("torch.")
        except AttributeError:  # a vLLM that keeps it elsewhere
            dtype = "unknown"
        return {"engine": "vllm", "dtype": dtype, "device": "cuda"}

    def max_model_len(self, max_comment_tokens: int) -> int:
        """The longest request's tokens: BOS + prompt prefix + comment + prompt suffix + answer."""
        return 1 + len(self.prefix_ids) + max_comment_tokens + len(self.suffix_ids) + self.automaton.max_steps

    def answer(self, comments_ids: list[list[int]]) -> list[Answer]:
        """Greedy constrained answers with raw logits over the output vocabulary at every step."""
        prompts = [{"prompt_token_ids": self.prompt_ids(c)} for c in comments_ids]
        outputs = self.llm.generate(prompts, self.params, use_tqdm=False)
        answers = []
        for i, out in enumerate(outputs):
            completion = out.outputs[0]
            try:
                answers.append(answer_from_completion(completion.token_ids, completion.logprobs, self.vocab.ids,
                                                      self.automaton))
            except VLLMEngineError as e:
                raise VLLMEngineError(f"vLLM teacher, comment {i} of the batch: {e}") from None
        return answers


def load_vllm_teacher(cfg, prompt_prefix: str, prompt_suffix: str, grammar: AnswerGrammar, vocab: OutputVocab,
                      tokenizer=None, device=None, max_comment_tokens: int = 25) -> VLLMTeacher:
    """`distill.teacher.load_teacher`, with vLLM as the engine (`teacher.engine=vllm`); `max_comment_tokens`
    (corpus.max_tokens) sizes the engine's `max_model_len`."""
    import time

    vllm = import_vllm()
    check_vllm(vllm.__version__)
    os.environ[RUNNER_ENV] = "0"  # vLLM 0.31+ would pick its V2 runner, which refuses our processor
    _processor_class()  # a clear error now, not deep inside the engine process
    start = time.perf_counter()
    path = random_teacher_dir(cfg) if cfg.model.startswith(RANDOM_PREFIX) else resolve_teacher_path(cfg)
    tokenizer = tokenizer or load_tokenizer(cfg)
    teacher = VLLMTeacher(None, tokenizer, prompt_prefix, prompt_suffix, grammar, vocab, vllm.SamplingParams)
    teacher.llm = vllm.LLM(model=path, tokenizer=path, revision=cfg.revision,
                           **engine_kwargs(cfg, len(vocab), teacher.max_model_len(max_comment_tokens)))
    if getattr(teacher.llm.llm_engine.vllm_config, "use_v2_model_runner", False):
        raise RuntimeError(f"teacher.engine=vllm: vLLM {vllm.__version__} runs its V2 model runner despite "
                           f"{RUNNER_ENV}=0; our logits processor needs the V1 runner")
    print(f"[teacher] {cfg.model} on vLLM {vllm.__version__}, V1 model runner "
          f"(loaded in {time.perf_counter() - start:.1f}s)", flush=True)
    return teacher
