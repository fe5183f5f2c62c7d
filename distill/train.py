"""The one training loop: teacher records -> a student, on CPU, one GPU, or many.

    distill train --config jobs/configs/gemma3-270m_to_270m-layers0-3_cpu.yaml [train.strategy=deepspeed train.workers=2]

`run_training` (the driver) checks the records' manifest against the run's task,
vocabulary and tokenizer, then hands `train_loop_per_worker` to Ray Train's
`TorchTrainer`. The same loop runs with strategy `ddp` (torch DDP; a plain model on one
worker) or `deepspeed` (ZeRO stage 1, 2 or 3), with bf16 autocast where the hardware
has it.

Loss: `distill.losses.DistillLoss`, KL(teacher || student) and CE on the teacher's
tokens, the KL weight annealed 0.9 -> 0.1 on a cosine over training (Hinton et al.
2015 for the temperature-scaled KD term). LR: linear warm-up, then cosine decay to a
floor of `min_lr_ratio * lr` that is never zero (Loshchilov & Hutter 2017, SGDR).

Data (`train.data`): every worker takes its slice of every global batch from one
per-epoch order seeded by (seed, epoch), length-bucketed (`train.length_buckets`), so
the order is the same on every rerun and a resumed run continues exactly where it
stopped. Small record sets are held whole (`memory`: read through Ray Data, sorted by
id, `data.MemoryRows`); larger ones are streamed (`stream`: `data.StreamedRows` reads
windows of whole shards of a seeded shard permutation, local or s3://, and holds at
most three windows, so a worker's memory does not grow with the record set). On GPUs
the next micro-batch is built on a background thread while the current one trains
(collate, which decodes the teacher's logits; then pinned and copied asynchronously;
`train.prefetch`), and a step syncs with the host once, at its end, for the metrics.

Speed: bf16 autocast and fused AdamW on CUDA; `train.compile` compiles the training
forward (`nn.Module.compile`, in place, so state_dict keys and checkpoints are those
of the plain module; evaluation runs it eagerly).

Checkpoints (every epoch end and every `checkpoint_every` steps): model weights
(safetensors), optimizer and LR schedule, step (which gives the epoch, the position in
the epoch and the curriculum position), RNG state, and the metrics so far, reported
through `ray.train.report`. Rerunning with the same `train.run_dir` resumes from the
latest one; `FailureConfig` restarts lost workers from it. A STOP file in the run
directory (written by the driver on SIGTERM) makes every worker checkpoint and return.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import resource
import signal
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.compute as pc
import torch

from distill import records, storage
from distill.bench import flops_per_token
from distill.config import Config, ConfigError, config_to_yaml
from distill.constrained import AnswerGrammar
from distill.data import (Batch, MemoryRows, StreamedRows, collate, sequence_lengths, shard_train_counts,
                          split_from_shards)
from distill.evaluate import GOEMOTIONS_SENTIMENT, evaluate
from distill.model import build_student, format_param_overview
from distill.runtime import init_ray
from distill.task import Task, load_task
from distill.teacher import load_tokenizer, resolve_teacher_path, tokenizer_hash, use_bf16
from distill.vocab import OutputVocab

STOP_FILE = "STOP"


def say(message: str) -> None:
    """Print from a worker: Ray Train routes `print` to its log files, stderr reaches the driver's console."""
    sys.stderr.write(message + "\n")
    sys.stderr.flush()


MODEL_FILE = "model.safetensors"
STATE_FILE = "trainer_state.json"


# -----------------------------------------------------------------------------
# Schedules


def lr_factor(step: int, warmup: int, total: int, floor: float) -> float:
    """Multiplier of the peak LR: linear warm-up, cosine decay to `floor` (> 0) at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak FLOP/s of a GPU in the planner's table (None elsewhere: no MFU on CPU)."""
    if device.type != "cuda":
        return None
    from distill.plan import gpu_for_cuda_name

    gpu = gpu_for_cuda_name(torch.cuda.get_device_name(device))
    return gpu.bf16_tflops * 1e12 if gpu else None


def split_rows(table: pa.Table, max_train_rows: int | None = None) -> tuple[pa.Table, pa.Table]:
    """(train, eval) rows of a records table, each in id order (a canonical order, whatever order the
    shards were read in); train cut to its first `max_train_rows` (train.max_train_rows)."""
    table = table.sort_by("id")
    split = np.array(table.column("split").to_pylist())
    train = table.take(np.flatnonzero(split == "train"))
    if max_train_rows is not None:
        train = train.slice(0, max_train_rows)
    return train, table.take(np.flatnonzero(split == "eval"))


AUTO_MEMORY_BYTES = 512 << 20
"""train.data=auto holds the records in memory up to this many bytes of shards (the demo's 14.8k records
are 370 MB), and streams them beyond: the in-memory path peaks at about 5x the shards' bytes per worker
(Ray Data's blocks, their concatenation, the sorted split) and is no faster per step (README, "Record
sets larger than memory")."""
BASELINE_TRAIN_ROWS = 100_000
"""The final evaluation's baselines learn from at most this many training rows (the first, in the data order)."""


def data_mode(t, manifest: dict) -> str:
    """memory or stream: train.data, with auto decided by the size of the record set."""
    if t.data != "auto":
        return t.data
    return "memory" if sum(s["bytes"] for s in manifest["shards"]) <= AUTO_MEMORY_BYTES else "stream"


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, MiB (Linux reports ru_maxrss in KiB, macOS in bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def human_labels_for(task: Task) -> dict | None:
    """GoEmotions sentiment groups are the human labels of the embedded corpus, for tasks with that field."""
    field, values = GOEMOTIONS_SENTIMENT["field"], set(GOEMOTIONS_SENTIMENT["mapping"].values())
    return GOEMOTIONS_SENTIMENT if values <= set(task.fields.get(field, ())) else None


# -----------------------------------------------------------------------------
# What the driver checks before any worker starts


def check_records(manifest: dict, task: Task, vocab_size: int, tok_hash: str, uri: str) -> None:
    """Refuse records made for another task, vocabulary size or tokenizer (one line each)."""
    if manifest["task"] != task.to_dict():
        raise records.RecordsError(f"{uri}: records were made for task {manifest['task']['name']!r} "
                                   f"with other fields or prompt than this run's task {task.name!r}")
    if len(manifest["vocab"]["ids"]) != vocab_size:
        raise records.RecordsError(f"{uri}: records have {len(manifest['vocab']['ids'])} output tokens, "
                                   f"this run's vocab.size is {vocab_size}")
    if manifest["tokenizer_hash"] != tok_hash:
        raise records.RecordsError(f"{uri}: records were made with another tokenizer than teacher "
                                   f"{manifest['teacher']['model']!r} of this run")


def teacher_weights(cfg: Config, layers: list[int] | None = None) -> dict[str, torch.Tensor]:
    """Tensors (float32) of the teacher's language model from its local safetensors files, by transformers
    name: its input embedding (`...embed_tokens.weight`), and with `layers` also its final norm and those
    blocks (not the rest, nor a vision tower: a 4B teacher's other weights stay on disk). Empty when the
    teacher is not stored locally."""
    import re

    from safetensors import safe_open

    blocks = "|".join(str(i) for i in layers or [])
    wanted = re.compile(r"(^|\.)embed_tokens\.weight$" + (rf"|(^|\.)norm\.weight$|(^|\.)layers\.({blocks})\."
                                                          if layers else ""))
    path = Path(resolve_teacher_path(cfg.teacher))
    weights = {}
    for file in sorted(path.glob("*.safetensors")) if path.is_dir() else []:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                if wanted.search(key) and "vision" not in key:
                    weights[key] = f.get_tensor(key).float()
    return weights


def teacher_shaped_student(cfg: Config) -> Config:
    """cfg with student.* in the teacher's shapes when train.teacher_layers is set (else cfg itself):
    the student a pruned copy of those teacher blocks can fill (Student.init_from_teacher_layers)."""
    layers = cfg.train.teacher_layers
    if layers is None:
        return cfg
    from transformers import AutoConfig

    teacher = AutoConfig.from_pretrained(resolve_teacher_path(cfg.teacher), revision=cfg.teacher.revision)
    teacher = getattr(teacher, "text_config", teacher)  # multimodal Gemma 3: the language model's config
    if teacher.model_type != "gemma3_text":
        raise ConfigError(f"train.teacher_layers: the teacher is a {teacher.model_type!r} model; "
                          "copying its layers needs a Gemma 3 teacher")
    if max(layers) >= teacher.num_hidden_layers:
        raise ConfigError(f"train.teacher_layers={layers}: the teacher has layers 0..{teacher.num_hidden_layers - 1}")
    thetas = [teacher.rope_parameters[teacher.layer_types[i]]["rope_theta"] for i in layers]
    student = dataclasses.replace(
        cfg.student, d_model=teacher.hidden_size, n_layers=len(layers), n_heads=teacher.num_attention_heads,
        n_kv_heads=teacher.num_key_value_heads, head_dim=teacher.head_dim, d_ff=teacher.intermediate_size,
        embed_rank=0, query_scale=teacher.query_pre_attn_scalar ** -0.5, qk_norm=True, post_norms=True,
        layer_rope_theta=thetas)
    return dataclasses.replace(cfg, student=student)


def with_input_vocab(cfg: Config, tokenizer) -> Config:
    """cfg with student.input_vocab_size = the teacher tokenizer's size where null; another size is refused."""
    if cfg.student.input_vocab_size not in (None, len(tokenizer)):
        raise ConfigError(f"student.input_vocab_size={cfg.student.input_vocab_size}: "
                          f"must equal the teacher tokenizer's size ({len(tokenizer)}), or be null to take it")
    return dataclasses.replace(cfg, student=dataclasses.replace(cfg.student, input_vocab_size=len(tokenizer)))


# -----------------------------------------------------------------------------
# The loop each Ray Train worker runs


class Loop:
    """State of one worker's training: model, optimizer, schedule, data, metrics."""

    def __init__(self, cfg: Config, manifest: dict, data: dict):
        import ray.train
        import ray.train.torch

        self.cfg, self.t = cfg, cfg.train
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        if self.device.type == "cpu":
            torch.set_num_threads(self.t.cpu_threads or max(1, (os.cpu_count() or 1) // ctx.get_local_world_size()))
        self.bf16 = use_bf16(self.t.precision, self.device)
        self.peak_flops = peak_flops(self.device)

        self.vocab = OutputVocab.from_dict(manifest["vocab"])
        self.sep_id = manifest["decoding"]["end_id"]
        self.logits_dtype = manifest["logits_dtype"]
        self.task = Task.from_dict(manifest["task"])
        self.tokenizer = load_tokenizer(cfg.teacher)
        self.grammar = AnswerGrammar(self.task, self.tokenizer, self.sep_id)
        self.automaton = self.grammar.automaton(self.vocab).to(self.device)

        self.per_rank = self.t.micro_batch_size * self.t.grad_accum
        self.global_batch = self.per_rank * self.world
        self.data_mode = data["mode"]
        self.rows, self.eval_rows = self.open_data(data)  # training rows (n, rows(epoch, positions)); evaluated rows
        if self.rows.n == 0:
            raise ValueError("no training rows in the records (every comment is in the eval split)")
        self.steps_per_epoch = math.ceil(self.rows.n / self.global_batch)
        self.total_steps = self.steps_per_epoch * self.t.epochs
        prefetch = self.t.prefetch if self.t.prefetch is not None else self.device.type == "cuda"
        self.prefetch = ThreadPoolExecutor(max_workers=1, thread_name_prefix="distill-batch") if prefetch else None
        self.pending = None  # ((step, micro), Future) of the next micro-batch
        self.step = 0
        self.metrics: list[dict] = []
        self.evals: list[dict] = []

        torch.manual_seed(self.t.seed)
        self.model = build_student(cfg.student)
        self.restored = self.restore_or_init()
        self.model.embed.weight.requires_grad_(not self.t.freeze_embedding)
        self.setup_strategy()
        self.check_one_batch()
        self.compile_forward()

    # -- set-up ---------------------------------------------------------------

    def open_data(self, data: dict) -> tuple[MemoryRows | StreamedRows, pa.Table]:
        """(the training rows, the held-out rows evaluated at epoch ends: the first train.eval_rows)."""
        import ray.train

        t, max_comment = self.t, self.cfg.student.max_comment_tokens
        limit = t.eval_rows or None
        if data["mode"] == "memory":
            shard = ray.train.get_dataset_shard("records")
            train, held_out = split_rows(pa.concat_tables(list(shard.iter_batches(batch_size=4096,
                                                                                  batch_format="pyarrow"))),
                                         t.max_train_rows)
            rows = MemoryRows(train, t.seed, self.global_batch, t.length_buckets, max_comment)
            return rows, held_out.slice(0, limit)
        uri = self.cfg.records.uri
        rows = StreamedRows(uri, data["shards"], data["train_counts"], t.seed, self.global_batch, t.length_buckets,
                            t.stream_window_rows, max_comment, t.max_train_rows)
        return rows, split_from_shards(uri, data["shards"], "eval", limit)

    def restore_or_init(self) -> str | None:
        """Load the latest checkpoint's weights if Ray Train hands us one; else init from the teacher."""
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            if self.t.teacher_layers is not None:
                self.model.init_from_teacher_layers(teacher_weights(self.cfg, self.t.teacher_layers),
                                                    self.t.teacher_layers, list(self.vocab.ids))
            elif self.t.init_from_teacher:
                emb = teacher_weights(self.cfg)
                if emb:
                    self.model.init_embedding_from_teacher(next(iter(emb.values())))
            return None
        ckpt_dir = tempfile.mkdtemp(prefix="distill-restore-")
        checkpoint.to_directory(ckpt_dir)
        from safetensors.torch import load_file

        self.model.load_state_dict(load_file(os.path.join(ckpt_dir, MODEL_FILE)))
        state = json.loads(Path(ckpt_dir, STATE_FILE).read_text())
        self.step = state["step"]
        self.metrics = [json.loads(line) for line in Path(ckpt_dir, "metrics.jsonl").read_text().splitlines()]
        self.evals = json.loads(Path(ckpt_dir, "evals.json").read_text())
        return ckpt_dir

    def param_groups(self) -> list[dict]:
        params = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        decay = [p for n, p in params if p.dim() >= 2 and "embed" not in n]
        rest = [p for n, p in params if not (p.dim() >= 2 and "embed" not in n)]
        return [{"params": decay, "weight_decay": self.t.weight_decay}, {"params": rest, "weight_decay": 0.0}]

    def setup_strategy(self) -> None:
        t = self.t
        fused = self.device.type == "cuda"
        optimizer = torch.optim.AdamW(self.param_groups(), lr=t.lr, betas=(t.beta1, t.beta2), fused=fused)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_factor(s, t.warmup_steps, self.total_steps, t.min_lr_ratio))
        if t.strategy == "deepspeed":
            import deepspeed

            ds_config = {
                "train_micro_batch_size_per_gpu": t.micro_batch_size,
                "gradient_accumulation_steps": t.grad_accum,
                "gradient_clipping": t.grad_clip,
                "zero_optimization": {"stage": t.zero_stage},
                "bf16": {"enabled": self.bf16},
                "steps_per_print": 10**9,
            }
            self.engine, self.optimizer, _, self.schedule = deepspeed.initialize(
                model=self.model.to(self.device), optimizer=optimizer, lr_scheduler=schedule, config=ds_config)
            if self.restored:
                self.engine.load_checkpoint(os.path.join(self.restored, "deepspeed"), tag="ds",
                                            load_module_strict=True)
            self.module = self.engine.module
        else:
            import ray.train.torch

            self.engine = ray.train.torch.prepare_model(self.model)  # DDP when world > 1; moves to device
            self.module = self.engine.module if hasattr(self.engine, "module") else self.engine
            self.optimizer, self.schedule = optimizer, schedule
            if self.restored:
                state = torch.load(os.path.join(self.restored, "optimizer.pt"), weights_only=True,
                                   map_location=self.device)
                self.optimizer.load_state_dict(state["optimizer"])
                self.schedule.load_state_dict(state["schedule"])
        if self.restored:
            torch.set_rng_state(torch.load(os.path.join(self.restored, "rng.pt"), weights_only=True))

    def check_one_batch(self) -> None:
        """Fail before the long run: one forward pass on real records checks vocabulary and shapes."""
        batch = self.batch(self.rows.head(2))
        with torch.no_grad():
            logits = self.module(batch.input_ids, batch.attention_mask)  # (B, T, V)
        if logits.shape[-1] != batch.teacher_logits.shape[-1]:
            raise ValueError(f"student output size {logits.shape[-1]} != records' vocabulary "
                             f"{batch.teacher_logits.shape[-1]} (set student.output_vocab_size = vocab.size)")

    def compile_forward(self) -> None:
        """torch.compile the training forward in place (`nn.Module.compile`: no `_orig_mod.` in state_dict
        keys). dynamic=True: T is each micro-batch's longest row, so static shapes would recompile for every
        new T, and padding T to a multiple of 8 would still give several graphs and undo part of the length
        bucketing; one graph with a symbolic T (and B) instead."""
        if not (self.t.compile == "true" or (self.t.compile == "auto" and self.device.type == "cuda")):
            return
        if self.t.strategy == "deepspeed":
            self.engine.compile(compile_kwargs={"dynamic": True})  # DeepSpeed compiles engine.module in place
        else:
            self.engine.compile(dynamic=True)  # the DDP wrapper on several workers (DDPOptimizer), else the model

    # -- one step ------------------------------------------------------------

    def batch(self, rows: pa.Table) -> Batch:
        """Rows -> a Batch on the device (pinned first on CUDA, so the copy is asynchronous)."""
        batch = collate(rows.to_pylist(), list(self.vocab.ids), self.sep_id,
                        self.cfg.student.max_comment_tokens, self.logits_dtype)
        return (batch.pin_memory() if self.device.type == "cuda" else batch).to(self.device)

    def micro_positions(self, step: int, micro: int) -> tuple[int, np.ndarray]:
        """(epoch, this worker's positions in the epoch's order) of micro-batch `micro` of global batch `step`
        (wrapping around at the epoch's end)."""
        epoch, s = divmod(step, self.steps_per_epoch)
        start = s * self.global_batch + self.rank * self.per_rank + micro * self.t.micro_batch_size
        return epoch, (start + np.arange(self.t.micro_batch_size)) % self.rows.n

    def make_micro_batch(self, step: int, micro: int) -> tuple[tuple[int, int], Batch]:
        rows = self.rows.rows(*self.micro_positions(step, micro))
        answer_tokens = int(pc.sum(rows.column("n_steps")).as_py())  # host-side counts, for tokens/s and padding
        real_tokens = int(sequence_lengths(rows, self.cfg.student.max_comment_tokens).sum())
        return (answer_tokens, real_tokens), self.batch(rows)

    def micro_batch(self, step: int, micro: int) -> tuple[tuple[int, int], Batch]:
        """((answer tokens, sequence tokens), Batch) of micro-batch `micro` of step `step`; with prefetch,
        submits the next one to the background thread, so it is built while this one trains."""
        if self.prefetch is None:
            return self.make_micro_batch(step, micro)
        if self.pending is None or self.pending[0] != (step, micro):  # the first step (of a run or a resume)
            self.pending = ((step, micro), self.prefetch.submit(self.make_micro_batch, step, micro))
        got = self.pending[1].result()
        step, micro = (step, micro + 1) if micro + 1 < self.t.grad_accum else (step + 1, 0)
        self.pending = (((step, micro), self.prefetch.submit(self.make_micro_batch, step, micro))
                        if step < self.total_steps else None)
        return got

    def train_step(self) -> dict:
        t, progress = self.t, self.step / max(1, self.total_steps - 1)
        start = time.perf_counter()
        parts = []
        n_tokens = seq_tokens = real_tokens = 0
        for micro in range(t.grad_accum):
            (answer_tokens, sequence_tokens), batch = self.micro_batch(self.step, micro)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16 and t.strategy == "ddp"):
                logits = self.engine(batch.input_ids, batch.attention_mask)  # (B, T, V)
            allowed = (self.automaton.allowed_along(batch.targets, batch.loss_mask)
                       if self.cfg.loss.positions == "choices" else None)  # (B, T, V)
            out = self.cfg.loss(logits.float(), batch.teacher_logits, batch.targets, batch.loss_mask, progress,
                                allowed)
            if t.strategy == "deepspeed":
                self.engine.backward(out["loss"])
                self.engine.step()  # DeepSpeed steps optimizer and schedule at the accumulation boundary
            else:
                (out["loss"] / t.grad_accum).backward()
            parts.append(torch.stack([out["loss"].detach(), out["kl"], out["ce"]]))  # (3,), stays on the device
            n_tokens += answer_tokens  # host-side counts: no device sync
            real_tokens += sequence_tokens
            seq_len, seq_tokens = batch.input_ids.shape[1], seq_tokens + batch.input_ids.numel()
        if t.strategy == "deepspeed":
            grad_norm = self.engine.get_global_grad_norm() or 0.0
        else:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.engine.parameters(), t.grad_clip or float("inf"))
            self.optimizer.step()
            self.schedule.step()
            self.optimizer.zero_grad(set_to_none=True)
        # the step's one host sync, after all its work is queued: the metrics
        sums = dict(zip(("loss", "kl", "ce"), torch.stack(parts).double().mean(0).tolist()))
        grad_norm = float(grad_norm)
        seconds = time.perf_counter() - start
        self.step += 1
        rss = psutil.Process().memory_info().rss / 2**20
        mem = torch.cuda.max_memory_allocated() / 2**20 if self.device.type == "cuda" else rss
        # MFU: tokens of every position (not only answer tokens) x FLOPs per token / the device's peak
        flops = flops_per_token(self.cfg.student, seq_len) * seq_tokens * self.world / seconds
        return {"step": self.step, "epoch": (self.step - 1) // self.steps_per_epoch + 1,
                **{k: round(v, 6) for k, v in sums.items()},
                "kl_weight": round(out["kl_weight"], 6), "lr": self.schedule.get_last_lr()[0],
                "grad_norm": round(grad_norm, 6),
                "examples_per_s": round(self.global_batch / seconds, 2),
                "tokens_per_s": round(n_tokens * self.world / seconds, 1), "mem_mb": round(mem, 1),
                "rss_peak_mb": round(max(peak_rss_mb(), rss), 1),  # the kernel updates its peak lazily
                "pad_fraction": round(1.0 - real_tokens / seq_tokens, 4),
                "mfu": round(flops / self.peak_flops, 4) if self.peak_flops else None}

    # -- checkpoints ----------------------------------------------------------

    def full_state_dict(self) -> dict:
        """The student's full weights on every rank (ZeRO-3 gathers the partitions)."""
        if self.t.strategy == "deepspeed" and self.t.zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(self.module.parameters())):
                return {k: v.detach().cpu().clone() for k, v in self.module.state_dict().items()}
        return {k: v.detach().cpu().clone() for k, v in self.module.state_dict().items()}

    def save_and_report(self, eval_metrics: dict | None) -> None:
        import ray.train
        from safetensors.torch import save_file

        weights = self.full_state_dict()
        with tempfile.TemporaryDirectory(prefix="distill-ckpt-") as tmp:
            if self.t.strategy == "deepspeed":
                self.engine.save_checkpoint(os.path.join(tmp, "deepspeed"), tag="ds")  # every rank its shard
            if self.rank == 0:
                save_file(weights, os.path.join(tmp, MODEL_FILE))
                if self.t.strategy == "ddp":
                    torch.save({"optimizer": self.optimizer.state_dict(), "schedule": self.schedule.state_dict()},
                               os.path.join(tmp, "optimizer.pt"))
                torch.save(torch.get_rng_state(), os.path.join(tmp, "rng.pt"))
                Path(tmp, STATE_FILE).write_text(json.dumps({
                    "step": self.step, "epoch": self.step / self.steps_per_epoch, "total_steps": self.total_steps,
                    "steps_per_epoch": self.steps_per_epoch, "global_batch": self.global_batch}))
                Path(tmp, "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in self.metrics))
                Path(tmp, "evals.json").write_text(json.dumps(self.evals))
                Path(tmp, "config.yaml").write_text(config_to_yaml(self.cfg))
            last = self.metrics[-1] if self.metrics else {}
            report = {"step": self.step, "loss": last.get("loss"), "done": self.step >= self.total_steps}
            if eval_metrics:
                report.update({k: v for k, v in eval_metrics.items() if isinstance(v, (int, float))})
            has_files = self.rank == 0 or self.t.strategy == "deepspeed"
            ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(tmp) if has_files else None)

    def evaluate(self) -> dict | None:
        if self.eval_rows.num_rows == 0:
            return None
        self.module.eval()
        with torch.compiler.set_stance("force_eager"):  # no graphs for decoding's shapes; a no-op uncompiled
            metrics = evaluate(self.module, self.eval_rows.to_pylist(), self.vocab, self.sep_id,
                               self.grammar, self.logits_dtype, self.cfg.student.max_comment_tokens,
                               human_labels=human_labels_for(self.task))
        self.module.train()
        return metrics

    # -- the loop -------------------------------------------------------------

    def stop_requested(self) -> bool:
        """Rank 0 looks for the STOP file (at most every 2 s); every rank gets its answer."""
        now = time.monotonic()
        flag = torch.zeros(1)
        if self.rank == 0 and now - getattr(self, "_last_stop_check", 0.0) > 2.0:
            self._last_stop_check = now
            flag[0] = float(storage.exists(storage.join(self.t.run_dir, STOP_FILE)))
        if self.world > 1:
            import torch.distributed as dist

            flag = flag.to(self.device)
            dist.broadcast(flag, 0)  # host sync: one scalar per step, so all ranks stop together
        return bool(flag.item())

    def run(self) -> None:
        from tqdm import tqdm

        if self.rank == 0:
            say(f"[train] {self.rows.n} train records ({self.data_mode}), {self.eval_rows.num_rows} held-out "
                f"evaluated per epoch; {self.world} worker(s), {self.t.strategy}"
                + (f" ZeRO-{self.t.zero_stage}" if self.t.strategy == "deepspeed" else "")
                + f", {'bf16' if self.bf16 else 'fp32'} on {self.device}; global batch {self.global_batch}; "
                f"{self.steps_per_epoch} steps/epoch, {self.total_steps} steps"
                + (f"; resumed at step {self.step}" if self.restored else ""))
            say(format_param_overview(self.module.param_overview()))
        self.engine.train()
        bar = tqdm(total=self.total_steps, initial=self.step, desc="train", unit="step", disable=self.rank != 0,
                   dynamic_ncols=True)
        board = None
        if self.t.tensorboard and self.rank == 0:
            from tensorboardX import SummaryWriter

            board = SummaryWriter(self.t.tensorboard)
        while self.step < self.total_steps:
            m = self.train_step()
            self.metrics.append(m)
            if board is not None:
                for key, value in m.items():
                    if key not in ("step", "epoch"):
                        board.add_scalar(f"train/{key}", value, m["step"])
            bar.update(1)
            bar.set_postfix(loss=f"{m['loss']:.4f}", kl=f"{m['kl']:.4f}", ce=f"{m['ce']:.4f}",
                            lr=f"{m['lr']:.2e}", ex_s=f"{m['examples_per_s']:.1f}")
            epoch_end = self.step % self.steps_per_epoch == 0
            stop = self.stop_requested() or self.step == self.t.stop_after_steps
            if epoch_end or stop or (self.t.checkpoint_every and self.step % self.t.checkpoint_every == 0):
                eval_metrics = self.evaluate() if epoch_end else None
                if eval_metrics:
                    self.evals.append({"epoch": self.step // self.steps_per_epoch, "step": self.step, **eval_metrics})
                    if self.rank == 0:
                        say(f"[eval] epoch {self.evals[-1]['epoch']}: teacher-forced acc "
                                  f"{eval_metrics['teacher_forced_acc']:.3f}, student-only exact "
                                  f"{eval_metrics['student_only_exact']:.3f}, "
                                  f"held-out KL {eval_metrics['held_out_kl']:.4f}")
                self.save_and_report(eval_metrics)
            if stop:
                if self.rank == 0:
                    say(f"[train] stop requested: checkpoint saved at step {self.step}")
                break
        if self.prefetch is not None:
            self.prefetch.shutdown(cancel_futures=True)
        self.rows.close()
        bar.close()
        if board is not None:
            board.close()


def train_loop_per_worker(config: dict) -> None:
    """Ray Train's entry on every worker: config = {"cfg": Config, "manifest": dict, "data": dict} (data: "mode",
    and when streamed the manifest's "shards" and their "train_counts")."""
    cfg: Config = config["cfg"]
    if cfg.train.strategy == "deepspeed" and not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    Loop(cfg, config["manifest"], config["data"]).run()


# -----------------------------------------------------------------------------
# The driver


def run_name_and_storage(run_dir: str) -> tuple[str, str]:
    """Ray Train's (name, storage_path) for a run directory, local or s3:// (then a path inside the
    bucket, as Ray expects beside an explicit `storage_filesystem`)."""
    if storage.is_remote(run_dir):
        parent, name = run_dir.rstrip("/").split("://", 1)[1].rsplit("/", 1)
        return name, parent
    path = Path(run_dir).resolve()
    return path.name, str(path.parent)


def storage_filesystem(uri: str):
    """A pyarrow filesystem over fsspec's, so Ray sees S3 exactly as the rest of distill does."""
    if not storage.is_remote(uri):
        return None
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    return PyFileSystem(FSSpecHandler(storage.filesystem(uri)[0]))


def run_training(cfg: Config):
    """Train (or resume training) the student; returns Ray Train's Result."""
    import ray
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    uri = cfg.records.uri
    manifest = records.load_manifest(uri)
    task = load_task(cfg.task.name)
    cfg = teacher_shaped_student(cfg)
    if cfg.train.teacher_layers is not None:
        s = cfg.student
        print(f"[train] student: a copy of teacher blocks {cfg.train.teacher_layers} (d_model {s.d_model}, "
              f"{s.n_heads} heads of width {s.head_dim}, d_ff {s.d_ff}); student.preset and sizes are not used "
              "(train.teacher_layers=null for a student of those)", flush=True)
    tokenizer = load_tokenizer(cfg.teacher)
    check_records(manifest, task, cfg.vocab.size, tokenizer_hash(tokenizer), uri)
    if cfg.student.output_vocab_size != cfg.vocab.size:
        raise ConfigError(f"student.output_vocab_size={cfg.student.output_vocab_size}: "
                          f"must equal vocab.size ({cfg.vocab.size})")
    cfg = with_input_vocab(cfg, tokenizer)
    run_dir = cfg.train.run_dir
    storage.check_writable(run_dir)
    stop_file = storage.join(run_dir, STOP_FILE)
    if storage.exists(stop_file):
        storage.remove(stop_file)
    storage.write_bytes(storage.join(run_dir, "config.yaml"), config_to_yaml(cfg).encode())

    init_ray()
    use_gpu = cfg.train.use_gpu if cfg.train.use_gpu is not None else ray.cluster_resources().get("GPU", 0) > 0
    data = {"mode": data_mode(cfg.train, manifest)}
    if data["mode"] == "memory":  # every worker reads all rows through Ray Data (DataConfig below)
        shard_uris = [storage.join(uri, s["name"]) for s in manifest["shards"]]
        datasets = {"records": ray.data.read_parquet(shard_uris, filesystem=storage_filesystem(uri))}
    else:  # workers read their windows of shards themselves; they only need the training rows per shard
        data.update(shards=manifest["shards"], train_counts=shard_train_counts(uri, manifest["shards"]))
        datasets = None
    name, storage_path = run_name_and_storage(run_dir)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg, "manifest": {k: manifest[k] for k in
                                                    ("vocab", "decoding", "logits_dtype", "task")}, "data": data},
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.train.workers, use_gpu=use_gpu,
                                               resources_per_worker={"CPU": cfg.train.cpus_per_worker}),
        run_config=ray.train.RunConfig(
            name=name, storage_path=storage_path, storage_filesystem=storage_filesystem(run_dir),
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints)),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=[]),  # every worker reads all rows (see docstring)
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
    )

    def request_stop(signum, frame):  # SIGTERM (a reclaimed node, `ray job stop`): checkpoint, then return
        print(f"[train] signal {signum}: asking workers to checkpoint and stop", flush=True)
        storage.write_bytes(stop_file, b"stop\n")

    previous = signal.signal(signal.SIGTERM, request_stop)
    try:
        return trainer.fit()
    finally:
        signal.signal(signal.SIGTERM, previous)


def finish_run(cfg: Config, result) -> dict:
    """After `fit`: metrics and per-epoch evals to the run dir; when training is complete, the model
    artifact (run_dir/model), a final evaluation on the whole held-out split (eval.json, with the
    baselines learnt from the train split) and the report."""
    from safetensors.torch import load_file

    from distill.evaluate import training_rows
    from distill.inference import save_artifact
    from distill.report import write_report

    run_dir, cfg = cfg.train.run_dir, teacher_shaped_student(cfg)
    if result.checkpoint is None:
        raise RuntimeError(f"training produced no checkpoint in {run_dir}: {result.error}")
    with tempfile.TemporaryDirectory(prefix="distill-final-") as tmp:
        result.checkpoint.to_directory(tmp)
        state = json.loads(Path(tmp, STATE_FILE).read_text())
        storage.write_bytes(storage.join(run_dir, "metrics.jsonl"), Path(tmp, "metrics.jsonl").read_bytes())
        evals = json.loads(Path(tmp, "evals.json").read_text())
        weights = load_file(os.path.join(tmp, MODEL_FILE))
    if state["step"] < state["total_steps"]:
        return {"complete": False, "step": state["step"], "total_steps": state["total_steps"]}

    manifest = records.load_manifest(cfg.records.uri)
    tokenizer = load_tokenizer(cfg.teacher)
    cfg = with_input_vocab(cfg, tokenizer)
    model = build_student(cfg.student)
    model.load_state_dict(weights)
    task, vocab = Task.from_dict(manifest["task"]), OutputVocab.from_dict(manifest["vocab"])
    sep_id = manifest["decoding"]["end_id"]
    model_uri = storage.join(run_dir, "model")
    save_artifact(model_uri, model, task, vocab, tokenizer, sep_id,
                  extra={"teacher": manifest["teacher"], "records": cfg.records.uri, "steps": state["step"]})

    train_table, eval_table = final_rows(cfg, manifest)
    held_out = eval_table.to_pylist()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16(cfg.train.precision, torch.device("cpu"))):
        final = evaluate(model, held_out, vocab, sep_id, AnswerGrammar(task, tokenizer, sep_id),  # as classify runs
                         manifest["logits_dtype"], cfg.student.max_comment_tokens,
                         human_labels=human_labels_for(task),
                         train_rows=training_rows(train_table) or None) if held_out else {}
    storage.write_bytes(storage.join(run_dir, "eval.json"),
                        json.dumps({**final, "per_epoch": evals}, indent=2).encode())
    html, md = write_report(run_dir)
    return {"complete": True, "step": state["step"], "model": model_uri, "eval": final, "report": html,
            "summary": md}


def final_rows(cfg: Config, manifest: dict) -> tuple[pa.Table, pa.Table]:
    """(training rows for the baselines: id, split, text and answer of at most BASELINE_TRAIN_ROWS; the first
    train.final_eval_rows held-out rows) in the run's data order, read shard by shard: never the whole set."""
    uri, shards, t = cfg.records.uri, manifest["shards"], cfg.train
    light = ["id", "split", "text", "answer"]
    n_train = min(t.max_train_rows or BASELINE_TRAIN_ROWS, BASELINE_TRAIN_ROWS)
    if data_mode(t, manifest) == "stream":  # shard order
        return (split_from_shards(uri, shards, "train", n_train, light),
                split_from_shards(uri, shards, "eval", t.final_eval_rows or None))
    train = split_from_shards(uri, shards, "train", columns=light).sort_by("id")  # id order, as split_rows
    held_out = split_from_shards(uri, shards, "eval").sort_by("id")
    return train.slice(0, n_train), held_out.slice(0, t.final_eval_rows or None)


def latest_checkpoint(run_dir: str) -> str:
    """URI of the newest Ray Train checkpoint directory of a run."""
    names = {u: u.rstrip("/").rsplit("/", 1)[-1] for u in storage.list_files(run_dir)}
    # checkpoint_<timestamp> directories; not Ray's checkpoint_manager_snapshot.json beside them
    found = sorted(u for u, name in names.items() if name.startswith("checkpoint_") and name[11:12].isdigit())
    if not found:
        raise records.RecordsError(f"{run_dir}: no checkpoint yet")
    return found[-1]


def export_checkpoint(run_dir: str, out: str) -> str:
    """A model artifact at `out` from the latest checkpoint of the run at `run_dir`."""
    from safetensors.torch import load as load_safetensors

    from distill.config import load_config
    from distill.inference import save_artifact

    ckpt = latest_checkpoint(run_dir)
    with tempfile.NamedTemporaryFile("wb", suffix=".yaml") as f:
        f.write(storage.read_bytes(storage.join(ckpt, "config.yaml")))
        f.flush()
        cfg = load_config(f.name)
    manifest = records.load_manifest(cfg.records.uri)
    model = build_student(cfg.student)
    model.load_state_dict(load_safetensors(storage.read_bytes(storage.join(ckpt, MODEL_FILE))))
    save_artifact(out, model, Task.from_dict(manifest["task"]), OutputVocab.from_dict(manifest["vocab"]),
                  load_tokenizer(cfg.teacher), manifest["decoding"]["end_id"],
                  extra={"teacher": manifest["teacher"], "records": cfg.records.uri, "checkpoint": ckpt})
    return out
