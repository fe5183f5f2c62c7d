"""Plan a distillation: hours, storage and dollars on a given GPU, and whether it pays back.

    distill plan --comments 500000 --teacher gemma3-4b --student 537m --gpu h100 --gpus 8 [--epochs 15 | --chinchilla]
                 [--bench runs/bench/bench.json] [--calls-per-day 1000000]
    distill plan --example      # the MISSION's single RTX 4070, reproduced, vs one and eight H100s

The throughput model is a roofline per batch (Williams, Waterman & Patterson 2009,
"Roofline"): a batch takes max(FLOPs / (peak * e), bytes read / (bandwidth * e)), with one
efficiency e that says how close the software gets to the hardware.

Extraction (teacher.py's fast path), one batch of B comments on one GPU:

    FLOPs = 2 * N_teacher * (prefix + B * (comment + suffix + answer - 1))
    bytes = passes * N_teacher * 2          bf16 weights, read once per forward pass

- N_teacher counts the non-embedding parameters: the embedding lookup is not a matmul,
  and the fast path's LM head has the output vocabulary's 525 rows, not 262,144.
- The end token is predicted, never fed: `answer - 1`.
- The prompt prefix is counted once per batch. teacher.py encodes it once per process and
  copies its key/value cache into every batch, so this is conservative (~2 tokens per comment).
- passes = 1 + the answer's branch points: 5 for reddit_moderation (the first pass reads
  the comment and the forced '{"tone": "', then one per field). The plain path would take
  one pass per answer token (~27), and compute the full 262,144-row LM head at each.
- Left out: attention FLOPs (about 1.5% for Gemma 3 4B at ~200 tokens of context) and
  key/value-cache reads; both grow with the batch like the counted terms, and stay small.

Training: FLOPs = examples * T * flops_per_token(student, T) (bench.py: 6 N + 12 L D T,
T = 52 positions: 25 comment + SEP + 26 answer, batches padded to their longest), time =
FLOPs / (peak * MFU). MFU is end to end (optimizer step, data, everything), and the bench
measures it with the same FLOPs count, so a measured MFU composes with this model. One
ceiling applies to it: every optimizer step moves ~32 bytes per parameter (fused AdamW in
fp32, the gradient included), whatever the batch, so with few examples per step an
assumed MFU is cut to compute / (compute + AdamW traffic), both at the GPU's peaks. (At
the trainer's default 16 examples per step that is ~21% for 537m on an H100, whose
embedding table alone has 268M parameters: raise train.micro_batch_size or grad_accum.)
"Tokens" of training are answer tokens (the positions with a loss). Chinchilla (Hoffmann
et al. 2022): 20 tokens per parameter, all parameters (the MISSION: 537M -> ~11B tokens).

Scaling: both phases scale linearly with GPUs (a fixed batch per GPU). Extraction needs
no communication (one teacher actor per GPU); training is DDP, whose gradient all-reduce
is assumed hidden behind the backward pass. That needs enough examples per step: the
537m's fp32 gradients are 2.1 GB per step, ~8 ms of ring all-reduce over H100 NVLink.

Break-even (the MISSION's question: is the node called often enough?): a classification
served by the teacher costs its extraction time per comment (the same constrained
decoding) and one served by the student costs its own decoding time, both at the GPU's
hourly price; the distillation (extraction + training) pays back after
cost / (teacher per call - student per call) calls. The student's decoding
(inference.greedy_decode) reads each token once (KV cache) in 4 passes: comment + 1 +
answer positions per call, and the weights read 4 times.

Efficiencies default to stated assumptions (extraction 40% of the roofline, MFU 35%); `--bench`
takes them, and the records' bytes per comment, from a `distill bench` run.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, replace
from typing import Optional

from distill import storage
from distill.config import ConfigError
from distill.model import PRESETS, StudentConfig


class PlanError(ConfigError):
    """A bad plan option; one line naming the option."""


# -----------------------------------------------------------------------------
# Facts: GPUs and teachers


@dataclass(frozen=True)
class GPU:
    """One row of the hardware table."""

    name: str
    bf16_tflops: float
    """Dense tensor-core BF16 TFLOP/s (no 2:4 sparsity)."""
    bandwidth_gbs: float
    """Memory bandwidth, GB/s."""
    memory_gb: float
    usd_per_hour: float
    """Typical on-demand rental price per GPU."""
    cuda_name: str
    """Regex on torch.cuda.get_device_name(), for bench.py's MFU."""


# Sources:
# - H100 SXM5 80GB: 989.4 dense (1,979 is with sparsity), 3,350 GB/s HBM3: NVIDIA H100 datasheet.
# - H200 SXM 141GB: the same GH100 compute, 989.4; 4,800 GB/s HBM3e: NVIDIA H200 datasheet.
# - A100 SXM4 80GB: 312 dense, 2,039 GB/s: NVIDIA A100 datasheet.
# - GeForce cards run BF16 only with FP32 accumulation, at half their FP16-accumulate tensor rate.
#   RTX 4090: 165.2, 1,008 GB/s (NVIDIA Ada Lovelace architecture whitepaper, appendix).
#   RTX 4070: 58.3 = 184 tensor cores x 2.475 GHz x 256 FLOP/clock (FP16 accumulate, dense) / 2 for FP32
#   accumulation; it agrees with NVIDIA's "466 AI TOPS" (FP8, sparse) = 8 x 58.3. 504 GB/s, 12 GB.
#   RTX 5090: 209.5 (419 with sparsity), 1,792 GB/s, 32 GB (NVIDIA RTX Blackwell architecture whitepaper).
# - Prices: typical 2025 on-demand rental per GPU (RunPod, Lambda, vast.ai list prices); they move,
#   and --usd-per-hour overrides them.
GPUS: dict[str, GPU] = {
    "rtx4070": GPU("RTX 4070", 58.3, 504, 12, 0.15, r"RTX 4070$"),
    "rtx4090": GPU("RTX 4090", 165.2, 1008, 24, 0.50, r"RTX 4090$"),
    "rtx5090": GPU("RTX 5090", 209.5, 1792, 32, 0.90, r"RTX 5090$"),
    "a100": GPU("A100 80GB", 312.0, 2039, 80, 1.60, r"A100.*80GB"),
    "h100": GPU("H100 SXM", 989.4, 3350, 80, 2.70, r"H100 (80GB HBM3|SXM)"),
    "h200": GPU("H200", 989.4, 4800, 141, 3.60, r"H200$"),
}


def gpu_for_cuda_name(name: str) -> Optional[GPU]:
    """The table's GPU for a CUDA device name ("NVIDIA H100 80GB HBM3"), or None if it is not in the table."""
    return next((g for g in GPUS.values() if re.search(g.cuda_name, name)), None)


@dataclass(frozen=True)
class TeacherSpec:
    """What the model needs to know of a teacher: its size."""

    params: float
    """Parameters as loaded (what bf16 weights take in memory)."""
    non_embedding: float
    """Parameters every token goes through: the transformer blocks."""


# gemma3-270m: 268,098,176 loaded (counted from the embedded checkpoint), of them 262,144 x 640 =
#   167,772,160 in the embedding (Google: "170M embedding, 100M transformer").
# gemma3-1b, 4b, 12b: Gemma 3 Technical Report (2025), table 1: embedding 302M / 675M / 1,012M,
#   non-embedding 698M / 3,209M / 10,759M, plus a 417M vision encoder in 4b and 12b (loaded, unused for text).
TEACHERS: dict[str, TeacherSpec] = {
    "gemma3-270m": TeacherSpec(268_098_176, 100_326_016),
    "gemma3-1b": TeacherSpec(1_000e6, 698e6),
    "gemma3-4b": TeacherSpec(4_301e6, 3_209e6),
    "gemma3-12b": TeacherSpec(12_188e6, 10_759e6),
}


@dataclass(frozen=True)
class Workload:
    """The shape of one comment's work (defaults: reddit_moderation on the vendored GoEmotions sample)."""

    comment_tokens: float = 14.0
    """Mean kept comment, in teacher tokens (GoEmotions sample: 13.8; the MISSION: 3 to 25)."""
    prompt_prefix_tokens: int = 150
    """BOS + instruction + three examples (few-shot style 146, chat style 149)."""
    prompt_suffix_tokens: int = 5
    """After the comment: '\\nAnswer:\\n' (4) or the chat turn change (5)."""
    answer_tokens: float = 26.0
    """Answer tokens with the end token: 25 to 27."""
    teacher_passes: int = 5
    """Fast-path forward passes per batch: 1 + branch points."""
    student_passes: int = 4
    """Student forward passes per answer: one per field."""
    teacher_batch: int = 64
    """Comments per teacher (and serving student) batch."""
    train_seq_len: int = 52
    """Training positions per example: 25 comment + SEP + 26 answer (padded to the longest)."""
    train_batch: int = 16
    """Examples per GPU per optimizer step (the trainer's default: micro_batch_size 16 x grad_accum 1)."""
    bytes_per_comment: float = 25_000.0
    """Records (zstd Parquet) per comment: ~26 steps x 525 float16 logits = 27.2 kB raw, which zstd
    shrinks to 24.9 kB (`distill bench`, embedded teacher, 32 comments): logits barely compress."""


@dataclass(frozen=True)
class Efficiencies:
    """How close the software gets to the hardware: the model's two knobs."""

    extraction: float = 0.40
    """Fraction of the roofline that teacher (and student) decoding reaches (assumed)."""
    mfu: float = 0.35
    """Model FLOPs utilisation of training (assumed)."""
    source: str = "assumed: extraction 40% of the roofline, MFU 35%"


# -----------------------------------------------------------------------------
# The throughput model


def roofline_seconds(flops: float, bytes_read: float, peak_flops: float, bandwidth: float, efficiency: float) -> float:
    """Time of a step bound by compute or by memory traffic, whichever is slower."""
    return max(flops / (peak_flops * efficiency), bytes_read / (bandwidth * efficiency))


def teacher_batch_work(non_embedding: float, prefix_tokens: float, fed_tokens: float, passes: float,
                       bytes_per_param: float) -> tuple[float, float]:
    """(FLOPs, weight bytes read) of one fast-path teacher batch; fed_tokens = the batch's
    comment + suffix + answer - 1 tokens, summed over its comments."""
    return 2 * non_embedding * (prefix_tokens + fed_tokens), passes * non_embedding * bytes_per_param


# Fused AdamW in fp32 reads parameter, gradient and both moments and writes three of them back (28 bytes
# per parameter); the backward pass writes the gradient (4 more). Every step, whatever the batch.
ADAMW_BYTES_PER_PARAM = 32


@dataclass(frozen=True)
class Rates:
    """Per-GPU speeds a plan is made of."""

    teacher_per_s: float
    """Comments answered (and recorded) by the teacher per second."""
    train_examples_per_s: float
    student_per_s: float
    """Comments classified by the student per second."""
    source: str


GEMMA3_TOKENIZER_SIZE = 262144
"""A student's input vocabulary where its config leaves it to the tokenizer (the -it tokenizers have one more)."""


def student_params(cfg: StudentConfig) -> int:
    """All parameters, the input embedding table included (Chinchilla counts them)."""
    from distill.bench import non_embedding_params  # here: bench.py imports this module

    vocab = cfg.input_vocab_size or GEMMA3_TOKENIZER_SIZE
    return non_embedding_params(cfg) + vocab * (cfg.embed_rank or cfg.d_model)


def model_rates(teacher: TeacherSpec, student: StudentConfig, gpu: GPU, w: Workload, eff: Efficiencies) -> Rates:
    """Rates on one GPU from the roofline model (see the module docstring)."""
    from distill.bench import flops_per_token, non_embedding_params  # here: bench.py imports this module

    peak, bandwidth = gpu.bf16_tflops * 1e12, gpu.bandwidth_gbs * 1e9
    B = w.teacher_batch
    fed = B * (w.comment_tokens + w.prompt_suffix_tokens + w.answer_tokens - 1)
    flops, weights = teacher_batch_work(teacher.non_embedding, w.prompt_prefix_tokens, fed, w.teacher_passes, 2)
    teacher_per_s = B / roofline_seconds(flops, weights, peak, bandwidth, eff.extraction)

    step_flops = w.train_batch * w.train_seq_len * flops_per_token(student, w.train_seq_len)
    ceiling = 1 / (1 + ADAMW_BYTES_PER_PARAM * student_params(student) / bandwidth / (step_flops / peak))
    train_per_s = w.train_batch * peak * min(eff.mfu, ceiling) / step_flops
    source = eff.source
    if ceiling < eff.mfu:
        source += f"; MFU capped at {ceiling:.0%} by AdamW's memory traffic at {w.train_batch} examples per step"

    positions = w.comment_tokens + 1 + w.answer_tokens  # KV cache: each token read once
    forward_per_position = flops_per_token(student, w.train_seq_len) / 3  # forward = 1/3 of forward + backward
    student_flops = B * positions * forward_per_position
    student_weights = w.student_passes * non_embedding_params(student) * 2
    student_per_s = B / roofline_seconds(student_flops, student_weights, peak, bandwidth, eff.extraction)
    return Rates(teacher_per_s, train_per_s, student_per_s, source)


# The original pipeline's measured speeds on one RTX 4070 (MISSION.md): teacher 58-62 s per 32
# comments, "~0.5/s"; training ~1.25 s per example; student vs teacher on a MacBook M1 Pro
# 12.5 vs 1.7 tokens/s (the only student/teacher ratio measured: it stands for the serving costs).
ORIGINAL_4070 = Rates(teacher_per_s=0.5, train_examples_per_s=1 / 1.25, student_per_s=0.5 * 12.5 / 1.7,
                      source="measured by the original (MISSION.md)")
ORIGINAL_HOURS = {"extraction": 270.0, "training": 2600.0}  # the MISSION's own estimates


# -----------------------------------------------------------------------------
# A plan


@dataclass
class Plan:
    """One column of `distill plan`'s table: the times and costs of one distillation on one kind of GPU."""

    title: str
    teacher: str
    student: str
    gpu: GPU
    gpus: int
    usd_per_hour: float
    rates: Rates
    comments: int
    train_examples: float
    train_tokens: float
    training_basis: str
    storage_gb: float
    extraction_hours: float
    training_hours: float
    teacher_usd_per_call: float
    student_usd_per_call: float
    calls_per_day: Optional[float] = None

    @property
    def total_hours(self) -> float:
        return self.extraction_hours + self.training_hours

    @property
    def distillation_usd(self) -> float:
        return self.total_hours * self.gpus * self.usd_per_hour

    @property
    def break_even_calls(self) -> float:
        """Classifications after which serving the student instead of the teacher has paid for the distillation."""
        saving = self.teacher_usd_per_call - self.student_usd_per_call
        return self.distillation_usd / saving if saving > 0 else math.inf

    @property
    def payback_days(self) -> Optional[float]:
        return self.break_even_calls / self.calls_per_day if self.calls_per_day else None


def make_plan(title: str, *, comments: int, teacher: str, student: str, gpu: GPU, gpus: int, rates: Rates,
              workload: Workload, epochs: Optional[float] = None, chinchilla: bool = False,
              usd_per_hour: Optional[float] = None, calls_per_day: Optional[float] = None) -> Plan:
    """Hours, storage and dollars of extracting `comments` and training `epochs` over them (or Chinchilla's tokens)."""
    if chinchilla:
        train_tokens = 20 * student_params(StudentConfig(preset=student))
        train_examples = train_tokens / workload.answer_tokens
        basis = f"Chinchilla: 20 tokens/param = {train_examples / comments:,.1f} epochs"
    else:
        train_examples = comments * epochs
        train_tokens = train_examples * workload.answer_tokens
        basis = f"{epochs:g} epochs"
    price = usd_per_hour if usd_per_hour is not None else gpu.usd_per_hour
    return Plan(
        title=title, teacher=teacher, student=student, gpu=gpu, gpus=gpus, usd_per_hour=price, rates=rates,
        comments=comments, train_examples=train_examples, train_tokens=train_tokens, training_basis=basis,
        storage_gb=comments * workload.bytes_per_comment / 1e9,
        extraction_hours=comments / (rates.teacher_per_s * gpus) / 3600,
        training_hours=train_examples / (rates.train_examples_per_s * gpus) / 3600,
        teacher_usd_per_call=price / 3600 / rates.teacher_per_s,
        student_usd_per_call=price / 3600 / rates.student_per_s,
        calls_per_day=calls_per_day)


# -----------------------------------------------------------------------------
# From options to a plan


@dataclass(frozen=True)
class PlanRequest:
    """What `distill plan` is asked; every check names the option it is about."""

    comments: int = 500_000
    teacher: str = "gemma3-4b"
    student: str = "537m"
    gpu: str = "h100"
    gpus: int = 1
    epochs: Optional[float] = None
    """Epochs over the comments; None = 15 unless chinchilla."""
    chinchilla: bool = False
    bench: Optional[str] = None
    """A bench.json whose efficiencies and record size replace the assumed ones."""
    calls_per_day: Optional[float] = None
    usd_per_hour: Optional[float] = None
    """Overrides the GPU table's price."""
    teacher_batch: int = 64
    train_batch: int = 16

    def __post_init__(self):
        def check(ok: bool, option: str, value, why: str) -> None:
            if not ok:
                raise PlanError(f"{option} {value}: {why}")

        check(self.comments > 0, "--comments", self.comments, "must be a positive number of comments")
        check(self.teacher in TEACHERS, "--teacher", self.teacher, f"unknown teacher (known: {', '.join(TEACHERS)})")
        check(self.student in PRESETS, "--student", self.student,
              f"unknown student preset (known: {', '.join(PRESETS)})")
        check(self.gpu in GPUS, "--gpu", self.gpu, f"unknown GPU (known: {', '.join(GPUS)})")
        check(self.gpus >= 1, "--gpus", self.gpus, "must be >= 1")
        check(self.epochs is None or self.epochs > 0, "--epochs", self.epochs, "must be > 0")
        check(not (self.chinchilla and self.epochs is not None), "--epochs", self.epochs,
              "give either --epochs or --chinchilla")
        check(self.calls_per_day is None or self.calls_per_day > 0, "--calls-per-day", self.calls_per_day,
              "must be > 0")
        check(self.usd_per_hour is None or self.usd_per_hour >= 0, "--usd-per-hour", self.usd_per_hour,
              "must be >= 0")
        check(self.teacher_batch >= 1, "--teacher-batch", self.teacher_batch, "must be >= 1")
        check(self.train_batch >= 1, "--train-batch", self.train_batch, "must be >= 1")
        weights_gb = TEACHERS[self.teacher].params * 2 / 1e9
        check(weights_gb < GPUS[self.gpu].memory_gb, "--teacher", self.teacher,
              f"{weights_gb:.1f} GB of bf16 weights do not fit in one {self.gpu}'s {GPUS[self.gpu].memory_gb:g} GB")


def from_bench(path: str, student: str, gpu: GPU) -> tuple[Efficiencies, float]:
    """(efficiencies, record bytes per comment) measured by `distill bench`; the MFU is the student
    preset's if the bench trained it, else that of the largest preset it trained."""
    try:
        data = json.loads(storage.read_bytes(path))
    except (OSError, ValueError, storage.StorageError) as e:
        raise PlanError(f"--bench {path}: cannot read it ({' '.join(str(e).split())[:200]})") from None
    try:
        extraction = data["extraction"]["fast_roofline_efficiency"]
        trained = {t["preset"]: t for t in data["training"]}
        bytes_per_comment = data["storage"]["shard_bytes_per_comment"]
        device = data["device"]["name"]
    except (KeyError, TypeError) as e:
        raise PlanError(f"--bench {path}: not a distill bench.json (no {e})") from None
    if not trained:
        raise PlanError(f"--bench {path}: the bench trained no student preset")
    entry = trained.get(student) or max(trained.values(), key=lambda t: t["params"])
    source = (f"measured by {path} on {device}: extraction {extraction:.0%} of the roofline, "
              f"MFU {entry['mfu']:.0%} (preset {entry['preset']})")
    if gpu_for_cuda_name(device) is not gpu:
        source += f"; not on the plan's {gpu.name}: efficiencies seldom carry over from one device to another"
    return Efficiencies(extraction, entry["mfu"], source), bytes_per_comment


def plan_for(req: PlanRequest) -> Plan:
    """The roofline model's plan for a request."""
    gpu = GPUS[req.gpu]
    workload = replace(Workload(), teacher_batch=req.teacher_batch, train_batch=req.train_batch)
    eff = Efficiencies()
    if req.bench:
        eff, bytes_per_comment = from_bench(req.bench, req.student, gpu)
        workload = replace(workload, bytes_per_comment=bytes_per_comment)
    rates = model_rates(TEACHERS[req.teacher], StudentConfig(preset=req.student), gpu, workload, eff)
    epochs = None if req.chinchilla else (req.epochs or 15)
    return make_plan(f"{req.gpus} x {gpu.name} (model)", comments=req.comments, teacher=req.teacher,
                     student=req.student, gpu=gpu, gpus=req.gpus, rates=rates, workload=workload, epochs=epochs,
                     chinchilla=req.chinchilla, usd_per_hour=req.usd_per_hour, calls_per_day=req.calls_per_day)


def example_plans(bench: Optional[str] = None, calls_per_day: Optional[float] = None,
                  train_batch: int = Workload.train_batch) -> list[Plan]:
    """The MISSION's single RTX 4070 (its measured speeds) vs one and eight H100s (the model), 500k comments,
    Gemma 3 4B -> the 537m student, 15 epochs."""
    original = make_plan("1 x RTX 4070, the original (measured)", comments=500_000, teacher="gemma3-4b",
                         student="537m", gpu=GPUS["rtx4070"], gpus=1, rates=ORIGINAL_4070, workload=Workload(),
                         epochs=15, calls_per_day=calls_per_day)
    return [original] + [plan_for(PlanRequest(gpus=n, bench=bench, calls_per_day=calls_per_day,
                                              train_batch=train_batch)) for n in (1, 8)]


# -----------------------------------------------------------------------------
# Printing


def fmt_hours(h: float) -> str:
    if h >= 48:
        return f"{h:,.0f} h ({h / 24:,.1f} days)"
    return f"{h:.1f} h" if h >= 1 else f"{h * 60:.1f} min"


def fmt_number(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def fmt_usd(x: float) -> str:
    return f"${x:,.0f}" if x >= 100 else f"${x:.3g}"


ROWS = [
    ("teacher -> student", lambda p: f"{p.teacher} -> {p.student}"),
    ("GPU", lambda p: f"{p.gpus} x {p.gpu.name} ({p.gpu.bf16_tflops:g} TFLOP/s bf16, {p.gpu.bandwidth_gbs:,.0f} GB/s)"),
    ("speeds from", lambda p: p.rates.source),
    ("extraction", lambda p: f"{fmt_number(p.rates.teacher_per_s * p.gpus)} comments/s"),
    ("extraction time", lambda p: fmt_hours(p.extraction_hours)),
    ("training", lambda p: f"{p.training_basis}: {p.train_examples:,.0f} examples, "
                           f"{p.train_tokens / 1e9:.3g}B answer tokens"),
    ("training speed", lambda p: f"{fmt_number(p.rates.train_examples_per_s * p.gpus)} examples/s"),
    ("training time", lambda p: fmt_hours(p.training_hours)),
    ("total time", lambda p: fmt_hours(p.total_hours)),
    ("records", lambda p: f"{p.storage_gb:,.1f} GB"),
    ("price", lambda p: f"${p.usd_per_hour:.2f} per GPU-hour"),
    ("distillation cost", lambda p: fmt_usd(p.distillation_usd)),
    ("teacher, per 1M calls", lambda p: fmt_usd(p.teacher_usd_per_call * 1e6)),
    ("student, per 1M calls", lambda p: fmt_usd(p.student_usd_per_call * 1e6)),
    ("break-even", lambda p: "never: the student is not cheaper" if math.isinf(p.break_even_calls)
     else f"{p.break_even_calls:,.0f} calls"),
]


def format_plans(plans: list[Plan]) -> str:
    """A markdown table, one column per plan."""
    rows = ROWS + ([("payback", lambda p: f"{p.payback_days:,.1f} days at {p.calls_per_day:,.0f} calls/day")]
                   if plans[0].calls_per_day else [])
    lines = ["| | " + " | ".join(p.title for p in plans) + " |", "|---" * (len(plans) + 1) + "|"]
    lines += [f"| {label} | " + " | ".join(value(p) for p in plans) + " |" for label, value in rows]
    return "\n".join(lines)


def format_example(plans: list[Plan]) -> str:
    """The example table, the check against the MISSION's numbers, and what the model says of the 4070."""
    original = plans[0]
    checks = [f"{name} {getattr(original, name + '_hours'):,.0f} h vs the MISSION's {hours:,.0f} h "
              f"({getattr(original, name + '_hours') / hours - 1:+.1%})" for name, hours in ORIGINAL_HOURS.items()]
    on_4070 = model_rates(TEACHERS["gemma3-4b"], StudentConfig(preset="537m"), GPUS["rtx4070"], Workload(),
                          Efficiencies())
    return "\n".join([
        format_plans(plans), "",
        "The original, reproduced: " + "; ".join(checks) + ".",
        f"The same roofline model puts one RTX 4070 running this project's fast path at "
        f"{fmt_number(on_4070.teacher_per_s)} comments/s ({on_4070.teacher_per_s / ORIGINAL_4070.teacher_per_s:,.0f}x "
        f"the original) and {fmt_number(on_4070.train_examples_per_s)} training examples/s "
        f"({on_4070.train_examples_per_s / ORIGINAL_4070.train_examples_per_s:,.0f}x): most of the gain is software, "
        f"and `distill bench` on the target GPU measures how much of it this code reaches.",
    ])


def add_plan_args(parser) -> None:
    d = PlanRequest()
    parser.add_argument("--comments", type=int, default=d.comments, help="comments to extract and train on")
    parser.add_argument("--teacher", default=d.teacher, help=f"one of {', '.join(TEACHERS)}")
    parser.add_argument("--student", default=d.student, help=f"student preset: {', '.join(PRESETS)}")
    parser.add_argument("--gpu", default=d.gpu, help=f"one of {', '.join(GPUS)}")
    parser.add_argument("--gpus", type=int, default=d.gpus, help="GPUs of that kind")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--epochs", type=float, default=None, help="epochs over the comments (default 15)")
    group.add_argument("--chinchilla", action="store_true", help="train on 20 answer tokens per student parameter")
    parser.add_argument("--bench", help="bench.json of `distill bench`: measured efficiencies and record size")
    parser.add_argument("--calls-per-day", type=float, help="classifications per day, for the payback time")
    parser.add_argument("--usd-per-hour", type=float, help="price per GPU-hour (default: the GPU table's)")
    parser.add_argument("--teacher-batch", type=int, default=d.teacher_batch, help="comments per teacher batch")
    parser.add_argument("--train-batch", type=int, default=d.train_batch,
                        help="examples per GPU per optimizer step (micro_batch_size x grad_accum)")
    parser.add_argument("--example", action="store_true",
                        help="the MISSION's RTX 4070 reproduced vs one and eight H100s (of the other options, "
                             "only --bench, --calls-per-day and --train-batch apply)")


def cmd_plan(args) -> None:
    if args.example:
        print(format_example(example_plans(args.bench, args.calls_per_day, args.train_batch)))
        return
    req = PlanRequest(comments=args.comments, teacher=args.teacher, student=args.student, gpu=args.gpu,
                      gpus=args.gpus, epochs=args.epochs, chinchilla=args.chinchilla, bench=args.bench,
                      calls_per_day=args.calls_per_day, usd_per_hour=args.usd_per_hour,
                      teacher_batch=args.teacher_batch, train_batch=args.train_batch)
    print(format_plans([plan_for(req)]))
