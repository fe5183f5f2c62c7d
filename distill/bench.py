"""Measure on this machine what `distill plan` assumes: extraction, training, classification, storage.

    distill bench [--out runs/bench] [--comments 64] [--teacher-batch 16] [--presets tiny,50m]
                  [--train-steps 3] [--repeats 3] [--model ARTIFACT] [--threads N] [key=value ...]

Everything is measured in one run on one machine (CUDA if present, else the CPU), with
the same config as extraction (defaults: the embedded Gemma 3 270M teacher and the
vendored GoEmotions corpus). Shared machines are noisy, so the figures to trust are the
ratios: the timed runs are interleaved (fast, plain, student; fast, plain, student; ...)
and each figure is the median of the repeats.

1. Extraction: `Teacher.answer_fast` vs `Teacher.answer_plain` on the first N kept
   comments, in length-sorted batches as extraction makes them, after one untimed call of
   each (which also builds the fast path's prompt-prefix cache, as every extraction actor
   does once). Their answers are compared. The fast path's efficiency is plan.py's
   roofline time of each batch at 100% (its forward passes counted by a hook) over the
   measured time: the number `distill plan --bench` uses.
2. Training: a few AdamW steps per student preset, after warm-up steps, on a synthetic
   batch shaped like collate's (25 comment tokens + SEP + answer, the teacher's logits over
   the output vocabulary): the step of train.Loop.train_step (bf16 autocast and
   torch.compile where the trainer would use them, DistillLoss, gradient clipping,
   AdamW) without Ray and the data pipeline. MFU = flops_per_token * positions / step time / peak.
3. Classification: `StudentModel.classify` (the `tiny` preset with random weights, or
   `--model`) vs the teacher's fast path on the same comments and batch size, both
   constrained; the teacher's figure is the fast extraction run (the same decoding; it
   also copies the recorded logits to the CPU).
4. Storage: one real record shard of the N comments (extract.ShardWriter.answer_shard,
   records.shard_bytes): bytes per comment, and the 16-bit logits per comment before
   compression.

FLOPs (`flops_per_token`, also the trainer's): 6 N + 12 L D T per position of training
(forward + backward), the estimate of Kaplan et al. 2020 and of PaLM (Chowdhery et al.
2022, appendix B) that nanoGPT's `estimate_mfu` uses. N is every parameter except the
input embedding table, a lookup rather than a matmul; the low-rank embedding's
projection is a matmul and counts. The attention term counts the whole T x T score and
value matmuls, as the convention does, although causal masking could skip half.

Peaks: a GPU in plan.GPUS has its datasheet's dense bf16 peak and memory bandwidth. Any
other device, the CPU included, is measured here: the best of 5 large matmuls (bf16 on a
GPU, fp32 on a CPU: the precision training runs in) and of 5 copies of 256 MB. On a CPU,
MFU is therefore against this machine's measured matmul peak at the thread count the
bench runs with, not a datasheet. (`--threads 1` on a shared machine: with two threads
and another busy process, each parallel region waits for a descheduled thread, and a
tiny training step took 40x longer than with one.)
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from distill import records, storage
from distill.config import Config, ConfigError, TrainConfig, config_to_dict, load_config
from distill.data import Batch
from distill.extract import Prepared, ShardWriter, prepare, shard_item
from distill.inference import StudentModel, load_artifact
from distill.losses import DistillLoss
from distill.model import PRESET_FIELDS, PRESETS, StudentConfig, build_student
from distill.plan import gpu_for_cuda_name, roofline_seconds, teacher_batch_work
from distill.task import Task
from distill.teacher import Teacher, cpu_has_fast_bf16, load_teacher, pick_device, use_bf16

# -----------------------------------------------------------------------------
# FLOPs


def non_embedding_params(cfg: StudentConfig) -> int:
    """Every parameter except the input embedding table: the projection of a low-rank embedding,
    per layer 2 D H Dh (q, o) + 2 D Hkv Dh (k, v) + 3 D F (GeGLU) + norms (2 D, 4 D with post_norms,
    2 Dh more with qk_norm), the final norm and the output head. H Dh = D and Hkv = H: 4 D^2 + 3 D F + 2 D."""
    D, F, Dh = cfg.d_model, cfg.d_ff, cfg.head_dim
    attention = 2 * D * cfg.n_heads * Dh + 2 * D * cfg.n_kv_heads * Dh
    norms = (4 if cfg.post_norms else 2) * D + (2 * Dh if cfg.qk_norm else 0)
    return cfg.embed_rank * D + cfg.n_layers * (attention + 3 * D * F + norms) + D + D * cfg.output_vocab_size


def flops_per_token(cfg: StudentConfig, seq_len: int) -> float:
    """Training FLOPs (forward + backward) per position of a length-seq_len sequence: 6 N + 12 L H Dh T."""
    return 6 * non_embedding_params(cfg) + 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len


# -----------------------------------------------------------------------------
# The device


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # host sync: the clock must see the GPU's work finished


def timed(fn: Callable, device: torch.device) -> tuple[float, object]:
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


def measured_peaks(device: torch.device) -> tuple[float, float, str]:
    """(FLOP/s, bytes/s, how): the best of 5 square matmuls and of 5 copies of 256 MB on this device."""
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (2048, torch.float32)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm-up
    flops = max(2 * n**3 / timed(lambda: a @ b, device)[0] for _ in range(5))
    src = torch.empty(64 * 2**20, device=device, dtype=torch.float32)  # 256 MB
    dst = torch.empty_like(src)
    bandwidth = max(2 * src.nbytes / timed(lambda: dst.copy_(src), device)[0] for _ in range(5))  # read + write
    how = f"measured here: best of 5 {n}x{n} {str(dtype).removeprefix('torch.')} matmuls, 256 MB copies"
    return flops, bandwidth, how


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def device_info(device: torch.device) -> dict:
    """What the figures were measured on, and the peaks MFU and efficiencies are against."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    gpu = gpu_for_cuda_name(name) if device.type == "cuda" else None
    if gpu:
        peak, bandwidth = gpu.bf16_tflops * 1e12, gpu.bandwidth_gbs * 1e9
        source = f"{gpu.name} datasheet (plan.GPUS): dense bf16, memory bandwidth"
    else:
        peak, bandwidth, source = measured_peaks(device)
    return {"type": device.type, "name": name, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "load_average": [round(x, 2) for x in os.getloadavg()], "peak_flops": peak,
            "bandwidth_bytes_per_s": bandwidth, "peak_source": source}


# -----------------------------------------------------------------------------
# 1 + 3. Extraction and classification, interleaved


def teacher_shape(teacher: Teacher) -> dict:
    decoder = teacher.model.get_decoder()
    params = sum(p.numel() for p in decoder.parameters())
    return {"params": sum(p.numel() for p in teacher.model.parameters()),
            "non_embedding_params": params - decoder.get_input_embeddings().weight.numel(),
            "dtype": str(next(decoder.parameters()).dtype).removeprefix("torch."),
            "prompt_prefix_tokens": len(teacher.prompt_ids([])) - len(teacher.suffix_ids),  # BOS + prefix
            "prompt_suffix_tokens": len(teacher.suffix_ids)}


def shard_batches(shard: dict, batch_size: int) -> tuple[list[int], list[list[list[int]]]]:
    """(row order, batches of comment ids) of a shard, shortest comments first, as ShardWriter batches them."""
    order = sorted(range(len(shard["ids"])), key=lambda i: len(shard["comment_ids"][i]))
    return order, [[shard["comment_ids"][i] for i in order[s:s + batch_size]] for s in range(0, len(order), batch_size)]


def bench_answers(teacher: Teacher, student: StudentModel, shard: dict, batch_size: int, repeats: int,
                  device: torch.device, peak: float, bandwidth: float) -> tuple[dict, dict]:
    """(extraction figures, classification figures) from interleaved timed runs over the shard's comments."""
    order, batches = shard_batches(shard, batch_size)
    texts = [shard["texts"][i] for i in order]
    passes = 0

    def count_pass(*_) -> None:  # a forward hook on the teacher's decoder: one call per forward pass
        nonlocal passes
        passes += 1

    def run(answer) -> tuple[list, list[int]]:
        out, per_batch = [], []
        for batch in batches:
            before = passes
            out += answer(batch)
            per_batch.append(passes - before)
        return out, per_batch

    hook = teacher.model.get_decoder().register_forward_hook(count_pass)

    teacher.answer_fast(batches[0][:2])  # warm-up, and the prompt-prefix cache
    teacher.answer_plain(batches[0][:2])
    student.classify(texts[:2], batch_size=batch_size)
    seconds = {"fast": [], "plain": [], "student": []}
    for _ in range(repeats):
        t, (fast, fast_passes) = timed(lambda: run(teacher.answer_fast), device)
        seconds["fast"].append(t)
        t, (plain, _) = timed(lambda: run(teacher.answer_plain), device)
        seconds["plain"].append(t)
        t, classified = timed(lambda: student.classify(texts, batch_size=batch_size), device)
        seconds["student"].append(t)
    hook.remove()

    n, median = len(texts), {k: statistics.median(v) for k, v in seconds.items()}
    shape = teacher_shape(teacher)
    bytes_per_param = next(teacher.model.parameters()).element_size()
    ideal, flops = 0.0, 0.0
    answers = iter(fast)
    for batch, batch_passes in zip(batches, fast_passes):
        fed = sum(len(c) + len(teacher.suffix_ids) + len(next(answers).teacher_ids) - 1 for c in batch)
        f, weights = teacher_batch_work(shape["non_embedding_params"], shape["prompt_prefix_tokens"], fed,
                                        batch_passes, bytes_per_param)
        ideal += roofline_seconds(f, weights, peak, bandwidth, 1.0)
        flops += f
    agree = sum(a.teacher_ids == b.teacher_ids for a, b in zip(fast, plain))
    max_diff = max((float((a.logits - b.logits).abs().max()) for a, b in zip(fast, plain)
                    if a.teacher_ids == b.teacher_ids), default=0.0)  # over the answers that agree
    extraction = {
        **shape, "prompt_tokens": shape["prompt_prefix_tokens"] + shape["prompt_suffix_tokens"],
        "comments": n, "batch_size": batch_size, "repeats": repeats,
        "mean_comment_tokens": sum(len(c) for b in batches for c in b) / n,
        "mean_answer_tokens": sum(len(a.teacher_ids) for a in fast) / n,
        "fast_passes_per_batch": sum(fast_passes) / len(batches),
        "fast_comments_per_s": n / median["fast"], "plain_comments_per_s": n / median["plain"],
        "fast_over_plain": median["plain"] / median["fast"],
        "agree": agree, "max_logit_diff": max_diff,
        "fast_flops_per_s": flops / median["fast"], "fast_roofline_efficiency": ideal / median["fast"],
        "fast_seconds": seconds["fast"], "plain_seconds": seconds["plain"],
    }
    classification = {
        "batch_size": batch_size, "comments": n,
        "student_comments_per_s": n / median["student"], "teacher_comments_per_s": n / median["fast"],
        "student_over_teacher": median["fast"] / median["student"],
        "valid": sum(r["valid"] for r in classified), "student_seconds": seconds["student"],
    }
    return extraction, classification


def preset_config(base: StudentConfig, preset: str, vocab_size: int) -> StudentConfig:
    """`base` with another preset's sizes and the output vocabulary's size."""
    return StudentConfig(**{**dataclasses.asdict(base), **dict.fromkeys(PRESET_FIELDS), "preset": preset,
                            "output_vocab_size": vocab_size})


def bench_student(model_uri: Optional[str], p: Prepared, device: torch.device) -> tuple[StudentModel, str]:
    """The student that classifies: the artifact at model_uri, or the tiny preset with random weights."""
    if model_uri:
        return load_artifact(model_uri, device), model_uri
    torch.manual_seed(0)
    model = build_student(preset_config(p.cfg.student, "tiny", len(p.vocab))).to(device).eval()
    automaton = p.grammar.automaton(p.vocab).to(device)
    return (StudentModel(model, p.task, p.vocab, p.tokenizer, p.grammar, automaton, p.grammar.end_id, device,
                         use_bf16("auto", device)), "tiny (random weights)")


# -----------------------------------------------------------------------------
# 2. Training


def synthetic_batch(cfg: StudentConfig, batch_size: int, answer_tokens: int, device: torch.device) -> Batch:
    """A full batch as collate makes it: comment (max_comment_tokens) + SEP + answer[:-1], so T =
    comment + answer; loss on the answer_tokens positions from SEP on; random ids and teacher logits."""
    g = torch.Generator().manual_seed(0)
    B, C, V = batch_size, cfg.max_comment_tokens, cfg.output_vocab_size
    T = C + answer_tokens
    loss_mask = torch.zeros((B, T), dtype=torch.bool)
    loss_mask[:, C:] = True  # SEP at position C predicts the first answer token
    return Batch(input_ids=torch.randint(cfg.input_vocab_size, (B, T), generator=g),  # (B, T)
                 attention_mask=torch.ones((B, T), dtype=torch.bool),
                 targets=torch.randint(V, (B, T), generator=g) * loss_mask,  # (B, T)
                 loss_mask=loss_mask,
                 teacher_logits=torch.randn((B, T, V), generator=g) * loss_mask[..., None]).to(device)  # (B, T, V)


def bench_training(cfg: StudentConfig, loss: DistillLoss, train: TrainConfig, answer_tokens: int, steps: int,
                   warmup_steps: int, device: torch.device, peak: float) -> dict:
    """Examples/s, answer tokens/s and MFU of `steps` optimizer steps after `warmup_steps`."""
    torch.manual_seed(0)
    model = build_student(cfg).to(device).train()
    bf16 = use_bf16(train.precision, device)  # as train.Loop
    optimizer = torch.optim.AdamW(model.parameters(), lr=train.lr, betas=(train.beta1, train.beta2),
                                  weight_decay=train.weight_decay, fused=device.type == "cuda")
    batch = synthetic_batch(cfg, train.micro_batch_size, answer_tokens, device)
    B, T = batch.input_ids.shape
    compiled = train.compile == "true" or (train.compile == "auto" and device.type == "cuda")
    if compiled:  # as train.Loop.compile_forward; the warm-up steps pay for the compilation
        model.compile(dynamic=True)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(batch.input_ids, batch.attention_mask)  # (B, T, V)
        out = loss(logits.float(), batch.teacher_logits, batch.targets, batch.loss_mask, 0.5)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip or float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds = [timed(step, device)[0] for _ in range(warmup_steps + steps)][warmup_steps:]
    step_s = statistics.median(seconds)
    fpt = flops_per_token(cfg, T)
    return {"preset": cfg.preset, "params": sum(p.numel() for p in model.parameters()),
            "non_embedding_params": non_embedding_params(cfg), "batch_size": B, "positions": T,
            "answer_tokens": answer_tokens, "warmup_steps": warmup_steps,
            "precision": ("bf16" if bf16 else "fp32") + (", compiled" if compiled else ""),
            "steps": steps, "step_seconds": seconds, "examples_per_s": B / step_s,
            "tokens_per_s": B * answer_tokens / step_s, "flops_per_token": fpt,
            "flops_per_s": fpt * B * T / step_s, "mfu": fpt * B * T / step_s / peak}


# -----------------------------------------------------------------------------
# fp32 against bf16, side by side


def bench_precision(cfg: Config, p, teacher: Teacher, student: StudentModel, shard: dict, spec: "BenchSpec",
                    device: torch.device, peak: float) -> dict:
    """Teacher extraction (fast path) in float32 and bfloat16, then the student's classification in fp32 and
    bf16 autocast, each interleaved over `spec.repeats` runs, with the answers they agree on; then training
    examples/s of each preset in fp32 and in bf16 autocast."""
    dtypes = {"float32": None, "bfloat16": None}
    for name in dtypes:
        same = str(next(teacher.model.parameters()).dtype).removeprefix("torch.") == name
        dtypes[name] = teacher if same else load_teacher(dataclasses.replace(cfg.teacher, dtype=name), p.prefix,
                                                         p.suffix, p.grammar, p.vocab, p.tokenizer, device)
    order, batches = shard_batches(shard, cfg.teacher.batch_size)
    seconds, answers = {name: [] for name in dtypes}, {}
    for t in dtypes.values():
        t.answer_fast(batches[0][:2])  # warm-up and the prompt-prefix cache
    for _ in range(spec.repeats):
        for name, t in dtypes.items():
            took, out = timed(lambda: [a for batch in batches for a in t.answer_fast(batch)], device)
            seconds[name].append(took)
            answers[name] = [a.vocab_indices for a in out]
    students = {name: dataclasses.replace(student, bf16=name == "bfloat16") for name in dtypes}
    texts = shard["texts"]
    student_seconds, student_answers = {name: [] for name in dtypes}, {}
    for _ in range(spec.repeats):
        for name, s in students.items():
            took, out = timed(lambda: s.classify(texts, batch_size=cfg.teacher.batch_size), device)
            student_seconds[name].append(took)
            student_answers[name] = [r["answer"] for r in out]
    n = len(order)
    rate = {name: n / statistics.median(v) for name, v in seconds.items()}
    student_rate = {name: n / statistics.median(v) for name, v in student_seconds.items()}
    training = []
    for preset in spec.presets:
        student = preset_config(cfg.student, preset, len(p.vocab))
        rows = {precision: bench_training(student, cfg.loss, dataclasses.replace(cfg.train, precision=precision),
                                          teacher.automaton.max_steps, spec.train_steps, spec.warmup_steps, device,
                                          peak)["examples_per_s"] for precision in ("fp32", "bf16")}
        training.append({"preset": preset, "fp32_examples_per_s": rows["fp32"], "bf16_examples_per_s": rows["bf16"],
                         "bf16_over_fp32": rows["bf16"] / rows["fp32"]})
    return {"comments": n, "fp32_comments_per_s": rate["float32"], "bf16_comments_per_s": rate["bfloat16"],
            "bf16_over_fp32": rate["bfloat16"] / rate["float32"],
            "answers_agree": sum(a == b for a, b in zip(answers["float32"], answers["bfloat16"])),
            "student_fp32_comments_per_s": student_rate["float32"],
            "student_bf16_comments_per_s": student_rate["bfloat16"],
            "student_bf16_over_fp32": student_rate["bfloat16"] / student_rate["float32"],
            "student_answers_agree": sum(a == b for a, b in zip(student_answers["float32"],
                                                                 student_answers["bfloat16"])),
            "fast_bf16_cpu": cpu_has_fast_bf16() if device.type == "cpu" else None, "training": training}


def bench_vllm(cfg: Config, p, teacher: Teacher, shard: dict, repeats: int, device: torch.device) -> dict:
    """teacher.engine=vllm: the vLLM engine on the same comments, given whole as extraction gives a shard, against
    the transformers teacher's fast path: comments/s of each, and the answers they agree on. A `random:` teacher
    runs with vLLM's own dummy weights, so only the speeds compare there; agreement needs a real checkpoint."""
    from distill.vllm_engine import center_logits, load_vllm_teacher

    engine = load_vllm_teacher(cfg.teacher, p.prefix, p.suffix, p.grammar, p.vocab, p.tokenizer,
                               max_comment_tokens=cfg.corpus.max_tokens)
    comments = shard["comment_ids"]
    order, batches = shard_batches(shard, cfg.teacher.batch_size)
    engine.answer(comments[:2])  # warm-up
    seconds = {"vllm": [], "transformers": []}
    for _ in range(repeats):
        took, got = timed(lambda: engine.answer(comments), device)
        seconds["vllm"].append(took)
        took, ref = timed(lambda: [a for batch in batches for a in teacher.answer_fast(batch)], device)
        seconds["transformers"].append(took)
    ref = [ref[order.index(i)] for i in range(len(comments))]  # back to shard order
    same = [(a, b) for a, b in zip(got, ref) if a.teacher_ids == b.teacher_ids]
    rate = {name: len(comments) / statistics.median(v) for name, v in seconds.items()}
    diff = max((float((center_logits(a.logits) - center_logits(b.logits.cpu())).abs().max()) for a, b in same),
               default=0.0)  # up to a per-step constant, which the KL does not see either
    return {"comments": len(comments), "vllm_comments_per_s": rate["vllm"],
            "transformers_comments_per_s": rate["transformers"],
            "vllm_over_transformers": rate["vllm"] / rate["transformers"], "agree": len(same), "max_logit_diff": diff,
            "random_weights": cfg.teacher.model.startswith("random:")}


# -----------------------------------------------------------------------------
# 4. Storage


class LoadedShardWriter(ShardWriter):
    """extract.ShardWriter around a teacher that is already loaded: the records extraction writes."""

    def __init__(self, cfg: Config, task: Task, teacher: Teacher):
        self.cfg, self.task, self.teacher = cfg, task, teacher


def bench_storage(cfg: Config, task: Task, teacher: Teacher, shard: dict) -> dict:
    rows = LoadedShardWriter(cfg, task, teacher).answer_shard(shard)
    shard_size = len(records.shard_bytes(rows))
    logits = sum(len(r["logits"]) for r in rows)
    return {"comments": len(rows), "logits_dtype": cfg.records.logits_dtype, "shard_bytes": shard_size,
            "shard_bytes_per_comment": shard_size / len(rows), "logits_bytes_per_comment": logits / len(rows)}


# -----------------------------------------------------------------------------
# The run


@dataclass(frozen=True)
class BenchSpec:
    """What to measure, besides the config; every check names its option."""

    comments: int = 64
    presets: tuple[str, ...] = ("tiny", "50m")
    train_steps: int = 3
    warmup_steps: int = 1
    repeats: int = 3
    model: Optional[str] = None
    """A student artifact to classify with; None = the tiny preset with random weights."""
    compare_precision: bool = False
    """Also measure the teacher and the presets' training in fp32 and bf16 side by side (bench_precision)."""
    command: str = "distill bench"

    def __post_init__(self):
        def check(ok: bool, option: str, value, why: str) -> None:
            if not ok:
                raise ConfigError(f"{option} {value}: {why}")

        check(self.comments >= 1, "--comments", self.comments, "must be >= 1")
        for preset in self.presets:
            check(preset in PRESETS, "--presets", preset, f"unknown preset (known: {', '.join(PRESETS)})")
        check(self.train_steps >= 1, "--train-steps", self.train_steps, "must be >= 1")
        check(self.warmup_steps >= 0, "--warmup-steps", self.warmup_steps, "must be >= 0")
        check(self.repeats >= 1, "--repeats", self.repeats, "must be >= 1")


def run_bench(cfg: Config, spec: BenchSpec) -> dict:
    """All four measurements; cfg.teacher.batch_size is the batch of both teacher and student."""
    device = pick_device()
    info = device_info(device)
    cfg = dataclasses.replace(cfg, records=dataclasses.replace(cfg.records, shard_size=spec.comments))
    p = prepare(cfg)
    cfg = dataclasses.replace(cfg, student=dataclasses.replace(
        cfg.student, input_vocab_size=cfg.student.input_vocab_size or len(p.tokenizer)))
    p = dataclasses.replace(p, cfg=cfg)
    shard = shard_item(p.corpus, 0, p.tokenizer)  # the first N kept comments, encoded as extraction encodes them
    teacher = load_teacher(cfg.teacher, p.prefix, p.suffix, p.grammar, p.vocab, p.tokenizer, device)
    student, student_name = bench_student(spec.model, p, device)
    extraction, classification = bench_answers(teacher, student, shard, cfg.teacher.batch_size, spec.repeats,
                                               device, info["peak_flops"], info["bandwidth_bytes_per_s"])
    training = [bench_training(preset_config(cfg.student, preset, len(p.vocab)), cfg.loss, cfg.train,
                               teacher.automaton.max_steps, spec.train_steps, spec.warmup_steps, device,
                               info["peak_flops"]) for preset in spec.presets]
    return {"command": spec.command, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "device": info, "teacher": cfg.teacher.model, "extraction": extraction, "training": training,
            "classification": {"student": student_name, **classification},
            "storage": bench_storage(cfg, p.task, teacher, shard), "config": config_to_dict(cfg),
            "precision": bench_precision(cfg, p, teacher, student, shard, spec, device, info["peak_flops"])
            if spec.compare_precision else None,
            "vllm": bench_vllm(cfg, p, teacher, shard, spec.repeats, device) if cfg.teacher.engine == "vllm" else None}


# -----------------------------------------------------------------------------
# Output


def si(x: float, unit: str = "") -> str:
    """1.23e11 -> '123 G' + unit."""
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= factor * 0.9995:  # 999.9e6 -> '1 G', not '1e+03 M'

            return f"{x / factor:.3g} {prefix}{unit}"
    return f"{x:.3g} {unit}".rstrip()


def num(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def format_bench(r: dict) -> str:
    """bench.md: the setup, one table of extraction / classification / storage, one of training by preset."""
    d, e, c, s = r["device"], r["extraction"], r["classification"], r["storage"]
    lines = [
        "# distill bench", "", f"    {r['command']}", "",
        f"- device: {d['type']}, {d['name']}; torch {d['torch']}; threads {d['threads']}; load average "
        f"{' / '.join(str(x) for x in d['load_average'])} at the start",
        f"- peaks: {si(d['peak_flops'], 'FLOP/s')}, {si(d['bandwidth_bytes_per_s'], 'B/s')} ({d['peak_source']})",
        f"- teacher: {r['teacher']}, {e['dtype']}, {si(e['params'])} parameters ({si(e['non_embedding_params'])} "
        f"non-embedding); prompt {e['prompt_tokens']} tokens ({e['prompt_prefix_tokens']} before the comment, "
        f"BOS included, {e['prompt_suffix_tokens']} after)",
        f"- comments: the first {e['comments']} kept (mean {e['mean_comment_tokens']:.1f} tokens, answers "
        f"{e['mean_answer_tokens']:.1f}); teacher and student batch {e['batch_size']}; medians of "
        f"{e['repeats']} interleaved repeats",
        "",
        "| measurement | value |",
        "|---|---|",
        f"| extraction, fast path | {num(e['fast_comments_per_s'])} comments/s |",
        f"| extraction, plain path | {num(e['plain_comments_per_s'])} comments/s |",
        f"| fast / plain | {e['fast_over_plain']:.2f}x |",
        f"| fast and plain agree | {e['agree']} of {e['comments']} answers (max logit difference of those "
        f"{e['max_logit_diff']:.2g}) |",
        f"| fast path, forward passes per batch | {e['fast_passes_per_batch']:.1f} |",
        f"| fast path, teacher FLOP/s | {si(e['fast_flops_per_s'], 'FLOP/s')} |",
        f"| fast path, roofline efficiency | {e['fast_roofline_efficiency']:.1%} |",
        f"| classification, student {c['student']} | {num(c['student_comments_per_s'])} comments/s "
        f"({c['valid']} of {c['comments']} valid) |",
        f"| classification, teacher (fast path) | {num(c['teacher_comments_per_s'])} comments/s |",
        f"| student / teacher | {c['student_over_teacher']:.2f}x |",
        f"| records per comment (zstd Parquet, shard of {s['comments']}) | {si(s['shard_bytes_per_comment'], 'B')} |",
        f"| logits per comment before compression ({s['logits_dtype']}) | {si(s['logits_bytes_per_comment'], 'B')} |",
        "",
        "| training preset | params | non-embedding | batch x positions | precision | examples/s | answer tokens/s "
        "| FLOPs/token | achieved | MFU |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for t in r["training"]:
        lines.append(f"| {t['preset']} | {si(t['params'])} | {si(t['non_embedding_params'])} | {t['batch_size']} x "
                     f"{t['positions']} | {t['precision']} | {num(t['examples_per_s'])} | {num(t['tokens_per_s'])} | "
                     f"{si(t['flops_per_token'])} | {si(t['flops_per_s'], 'FLOP/s')} | {t['mfu']:.1%} |")
    q = r.get("precision")
    if q:
        lines += ["", f"fp32 against bf16, side by side (CPU with AMX-BF16 / AVX512-BF16: {q['fast_bf16_cpu']})", "",
                  "| measurement | fp32 | bf16 | bf16 / fp32 |", "|---|---|---|---|",
                  f"| extraction, fast path, comments/s | {num(q['fp32_comments_per_s'])} | "
                  f"{num(q['bf16_comments_per_s'])} | {q['bf16_over_fp32']:.2f}x |",
                  f"| classification, student, comments/s | {num(q['student_fp32_comments_per_s'])} | "
                  f"{num(q['student_bf16_comments_per_s'])} | {q['student_bf16_over_fp32']:.2f}x |",
                  *(f"| training {t['preset']}, examples/s | {num(t['fp32_examples_per_s'])} | "
                    f"{num(t['bf16_examples_per_s'])} | {t['bf16_over_fp32']:.2f}x |" for t in q["training"]),
                  "", f"fp32 and bf16 teachers give the same answer on {q['answers_agree']} of {q['comments']} comments; "
                  f"fp32 and bf16 students on {q['student_answers_agree']}."]
    v = r.get("vllm")
    if v:
        lines += ["", f"vLLM against transformers (fast path), {v['comments']} comments"
                  f"{' (random weights: each engine its own, so only the speeds compare)' if v['random_weights'] else ''}",
                  "", "| measurement | value |", "|---|---|",
                  f"| vLLM | {num(v['vllm_comments_per_s'])} comments/s |",
                  f"| transformers, fast path | {num(v['transformers_comments_per_s'])} comments/s |",
                  f"| vLLM / transformers | {v['vllm_over_transformers']:.2f}x |",
                  f"| same answers | {v['agree']} of {v['comments']} (max centred logit difference of those "
                  f"{v['max_logit_diff']:.2g}) |"]
    return "\n".join(lines) + "\n"


def write_bench(result: dict, out: str) -> str:
    """Write bench.json and bench.md into `out` (local or s3://); returns the markdown."""
    markdown = format_bench(result)
    storage.write_bytes(storage.join(out, "bench.json"), json.dumps(result, indent=2).encode())
    storage.write_bytes(storage.join(out, "bench.md"), markdown.encode())
    return markdown


# -----------------------------------------------------------------------------
# Command line


def add_bench_args(parser) -> None:
    d = BenchSpec()
    parser.add_argument("--config", help="YAML job config (default: the embedded teacher and corpus)")
    parser.add_argument("--out", default="runs/bench", help="where bench.json and bench.md go")
    parser.add_argument("--comments", type=int, default=d.comments, help="first N kept comments to answer")
    parser.add_argument("--teacher-batch", type=int, help="comments per batch (default: teacher.batch_size)")
    parser.add_argument("--presets", default=",".join(d.presets), help="student presets to train, comma-separated")
    parser.add_argument("--train-steps", type=int, default=d.train_steps, help="timed optimizer steps per preset")
    parser.add_argument("--warmup-steps", type=int, default=d.warmup_steps, help="untimed steps before them")
    parser.add_argument("--repeats", type=int, default=d.repeats, help="interleaved repeats of the timed answers")
    parser.add_argument("--model", help="student artifact to classify with (default: tiny, random weights)")
    parser.add_argument("--compare-precision", action="store_true",
                        help="also time the teacher and training in fp32 and bf16 side by side")
    parser.add_argument("--threads", type=int,
                        help="torch CPU threads (default: torch's); on a shared machine 1 avoids threads "
                             "waiting on each other")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. teacher.model=google/gemma-3-4b-it")


def cmd_bench(args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    # The kept corpus (in shards of --comments) and its quarantine are scratch: a fresh place per run.
    scratch = tempfile.TemporaryDirectory(prefix="distill-bench-")
    overrides = [f"records.uri={scratch.name}", *args.overrides]
    if args.teacher_batch is not None:
        overrides.append(f"teacher.batch_size={args.teacher_batch}")
    cfg = load_config(args.config, overrides)
    command = " ".join(["distill bench", *([f"--config {args.config}"] if args.config else []), f"--out {args.out}",
                        f"--comments {args.comments}", f"--teacher-batch {cfg.teacher.batch_size}",
                        f"--presets {args.presets}", f"--train-steps {args.train_steps}",
                        f"--warmup-steps {args.warmup_steps}", f"--repeats {args.repeats}",
                        *([f"--model {args.model}"] if args.model else []),
                        *(["--compare-precision"] if args.compare_precision else []),
                        *([f"--threads {args.threads}"] if args.threads else []), *args.overrides])
    spec = BenchSpec(comments=args.comments, presets=tuple(x for x in args.presets.split(",") if x),
                     train_steps=args.train_steps, warmup_steps=args.warmup_steps, repeats=args.repeats,
                     model=args.model, compare_precision=args.compare_precision, command=command)
    with scratch:
        print(write_bench(run_bench(cfg, spec), args.out))
