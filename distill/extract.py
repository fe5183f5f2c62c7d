"""Teacher extraction: corpus -> teacher records, through Ray Data.

    distill extract --config jobs/configs/gemma3-270m_to_270m-layers0-3_cpu.yaml records.uri=s3://bucket/run/records

1. Prepare (driver, before any long work): check the output location is writable, load
   the tokenizer and task, build the answer grammar, read, filter and dedupe the corpus
   into Parquet parts beside the records (`distill.ingest`: in the driver for small
   corpora, on Ray Data for a Reddit month, the driver's memory bounded either way; a
   rerun reuses finished parts), and build the output vocabulary from its first kept
   comments. Kept comments are cut into shards of `records.shard_size` in corpus order.
   With `vocab.from_uri` the vocabulary is not built but taken, ids and order unchanged,
   from a model artifact or record set (`reused_vocab`), and checked against the run
   first: records made so can evaluate or train that model.
2. Pin the plan: `plan.json` records which comment ids go to which shard and what the
   records are made with. A rerun against the same location must produce the same
   plan (else it stops with one line saying what differs), and skips every shard that
   already exists: shards are written whole or not at all, so no comment is written twice.
3. Extract: the missing shards' indices go through `ray.data.from_items(...).map_batches(ShardWriter)`,
   a callable class that loads the teacher once per actor (one actor per GPU, or one
   on a CPU machine), reads each shard's comments from the corpus parts, answers them
   in teacher batches and writes the shard itself;
   only a small summary per shard returns to the driver, which shows progress and records/s.
4. Seal: `manifest.json` (format version, teacher, tokenizer hash, vocabulary and where it
   came from (`vocab_source`: null = built from the corpus, else vocab.from_uri), task,
   prompt, decoding, automaton, shard list with row counts and sha256) is written last.
"""

from __future__ import annotations

import collections
import functools
import itertools
import json
import os
import time
from dataclasses import dataclass

import pyarrow as pa
from tqdm import tqdm

from distill import records, storage
from distill.config import Config, ConfigError, config_to_dict, config_to_yaml
from distill.constrained import AnswerGrammar, end_of_answer_id
from distill.corpus import CorpusStats
from distill.ingest import CORPUS_DIR, INDEX_NAME, KeptCorpus, ingest
from distill.runtime import init_ray
from distill.task import Task, load_task, resolve_style
from distill.teacher import load_teacher, load_tokenizer, teacher_fingerprint, tokenizer_hash
from distill.vocab import OutputVocab, VocabError, build_output_vocab


@dataclass
class Prepared:
    """Everything extraction needs, built once in the driver."""

    cfg: Config
    tokenizer: object
    task: Task
    style: str
    prefix: str
    suffix: str
    grammar: AnswerGrammar
    vocab: OutputVocab
    corpus: KeptCorpus
    stats: CorpusStats


def encode_comment(tokenizer, text: str) -> list[int]:
    """The one encoding of a comment, shared by corpus filtering, the teacher and the student."""
    return tokenizer.encode(text, add_special_tokens=False)


def prepare(cfg: Config) -> Prepared:
    storage.check_writable(cfg.records.uri)
    tokenizer = load_tokenizer(cfg.teacher)
    task = load_task(cfg.task.name)
    style = resolve_style(cfg.task.prompt_style, tokenizer)
    prefix, suffix = task.prompt_parts(style, tokenizer)
    grammar = AnswerGrammar(task, tokenizer, end_of_answer_id(tokenizer, style))

    def count_tokens(texts: list[str]) -> list[int]:
        return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]

    reused = reused_vocab(cfg, grammar, tokenizer) if cfg.vocab.from_uri is not None else None
    corpus = ingest(cfg, count_tokens, tokenizer_hash(tokenizer))
    if reused is not None:
        vocab = reused
    else:
        n = cfg.vocab.sample_comments
        texts = (text for table in corpus.tables(limit=n) for text in table.column("text").to_pylist())
        vocab = build_output_vocab(grammar, tokenizer, cfg.vocab.size, prefix + suffix, itertools.islice(texts, n))
    return Prepared(cfg, tokenizer, task, style, prefix, suffix, grammar, vocab, corpus, corpus.stats)


def read_vocab_source(uri: str) -> tuple[OutputVocab, str | None, str]:
    """(vocabulary, tokenizer hash, "record set" | "model artifact") stored at `uri`."""
    from distill.inference import CONFIG_NAME, SUMS_NAME, VOCAB_NAME, ArtifactError, read_artifact

    where = f"vocab.from_uri={uri}"
    if storage.exists(storage.join(uri, records.MANIFEST_NAME)):
        manifest = records.load_manifest(uri)
        data, tok_hash, kind = manifest["vocab"], manifest["tokenizer_hash"], "record set"
    elif storage.exists(storage.join(uri, SUMS_NAME)):
        try:
            files = read_artifact(uri, names=(CONFIG_NAME, VOCAB_NAME))
        except ArtifactError as e:
            raise VocabError(f"{where}: {e}") from None
        data, kind = json.loads(files[VOCAB_NAME]), "model artifact"
        tok_hash = json.loads(files[CONFIG_NAME]).get("tokenizer_hash")
    else:
        raise VocabError(f"{where}: neither a record set ({records.MANIFEST_NAME}) "
                         f"nor a model artifact ({SUMS_NAME})")
    try:
        return OutputVocab.from_dict(data), tok_hash, kind
    except VocabError as e:
        raise VocabError(f"{where}: {e}") from None


def reused_vocab(cfg: Config, grammar: AnswerGrammar, tokenizer) -> OutputVocab:
    """The vocabulary at vocab.from_uri, checked against this run: size, required tokens, tokenizer."""
    uri = cfg.vocab.from_uri
    vocab, tok_hash, kind = read_vocab_source(uri)
    if len(vocab) != cfg.vocab.size:
        raise ConfigError(f"vocab.size={cfg.vocab.size}: the {kind} at vocab.from_uri={uri} has "
                          f"{len(vocab)} output tokens; set vocab.size={len(vocab)}")
    if tok_hash != tokenizer_hash(tokenizer):
        raise VocabError(f"vocab.from_uri={uri}: the {kind} was made with another tokenizer than "
                         f"teacher {cfg.teacher.model!r} of this run")
    required, have = grammar.token_ids(), list(vocab.ids[:vocab.n_required])
    if required != have:
        missing = [t for t in required if t not in have]
        if missing:
            tokens = ", ".join(repr(t) for t in tokenizer.convert_ids_to_tokens(missing[:5]))
            what = f"lacks {len(missing)} required answer token(s) of task {grammar.task.name!r} ({tokens})"
        else:
            what = f"requires tokens that answers of task {grammar.task.name!r} never use"
        raise VocabError(f"vocab.from_uri={uri}: the {kind}'s vocabulary {what}; "
                         f"it was made for another task or prompt style")
    return vocab


def automaton_spec(grammar: AnswerGrammar, vocab: OutputVocab) -> dict:
    """The answer automaton over output-vocab indices, sparse, so records are self-describing."""
    automaton = grammar.automaton(vocab)
    table = automaton.table.tolist()
    return {"transitions": [{str(v): nxt for v, nxt in enumerate(row) if nxt >= 0} for row in table],
            "final": automaton.final, "max_steps": automaton.max_steps}


def corpus_stats_dict(stats: CorpusStats) -> dict:
    return {"read": stats.read, "kept": stats.kept, "kept_eval": stats.kept_eval, "dropped": dict(stats.dropped),
            "quarantined": dict(stats.quarantined)}


def make_plan(p: Prepared) -> dict:
    return {
        "format_version": records.RECORDS_FORMAT_VERSION,
        "teacher": teacher_fingerprint(p.cfg.teacher),
        "tokenizer_hash": tokenizer_hash(p.tokenizer),
        "task": p.task.to_dict(),
        "prompt": {"style": p.style, "prefix": p.prefix, "suffix": p.suffix},
        "vocab": p.vocab.to_dict(),
        "vocab_fingerprint": p.vocab.fingerprint(),
        # null = built from this corpus; a key older plans lack, so they read as null and still resume
        "vocab_source": p.cfg.vocab.from_uri,
        "decoding": {"method": "greedy", "constrained": True, "end_id": p.grammar.end_id},
        "automaton": automaton_spec(p.grammar, p.vocab),
        "logits_dtype": p.cfg.records.logits_dtype,
        "shard_size": p.cfg.records.shard_size,
        "shard_ids_sha256": p.corpus.index["shard_ids_sha256"],  # sha256 of each shard's ids, one per line
    }


def pin_plan(uri: str, plan: dict) -> None:
    """Write plan.json, or check that an earlier run's plan is the same one."""
    old = records.read_json(uri, records.PLAN_NAME)
    if old is None:
        records.write_json(uri, records.PLAN_NAME, plan)
        return
    for key in plan:
        if old.get(key) != plan[key]:
            raise records.RecordsError(
                f"{uri} holds records of another extraction ({key} differs); "
                f"rerun with the same config or choose a new records.uri")


class ShardWriter:
    """Ray Data callable class: loads the teacher once, then answers and writes whole shards."""

    def __init__(self, cfg: Config, threads: int):
        import torch

        if not torch.cuda.is_available():
            torch.set_num_threads(threads)
        self.cfg = cfg
        plan = records.read_json(cfg.records.uri, records.PLAN_NAME)  # what the driver pinned: task, vocab, prompt
        self.task = Task.from_dict(plan["task"])
        tokenizer = load_tokenizer(cfg.teacher)
        grammar = AnswerGrammar(self.task, tokenizer, plan["decoding"]["end_id"])
        load = load_teacher
        if cfg.teacher.engine == "vllm":  # imports vLLM only here
            from distill.vllm_engine import load_vllm_teacher

            load = functools.partial(load_vllm_teacher, max_comment_tokens=cfg.corpus.max_tokens)
        self.teacher = load(cfg.teacher, plan["prompt"]["prefix"], plan["prompt"]["suffix"], grammar,
                            OutputVocab.from_dict(plan["vocab"]), tokenizer)
        self.runtime = self.teacher.runtime()  # what teacher.dtype=auto became here, written into every shard
        self.corpus = KeptCorpus(storage.join(cfg.records.uri, CORPUS_DIR),
                                 records.read_json(cfg.records.uri, INDEX_NAME))  # where its shards are read from

    def __call__(self, batch: pa.Table) -> dict:
        out = {"index": [], "rows": [], "bytes": [], "sha256": [], "seconds": []}
        for k in batch.column("index").to_pylist():
            start = time.perf_counter()
            shard = shard_item(self.corpus, k, self.teacher.tokenizer)
            rows = self.answer_shard(shard)
            entry = records.write_shard(self.cfg.records.uri, shard["index"], rows, self.runtime)
            for key in ("index", "rows", "bytes", "sha256"):
                out[key].append(entry[key])
            out["seconds"].append(time.perf_counter() - start)
        return out

    def answer_shard(self, shard: dict) -> list[dict]:
        n = len(shard["ids"])
        bs = self.cfg.teacher.batch_size if self.cfg.teacher.engine == "transformers" else n  # vLLM batches itself
        order = sorted(range(n), key=lambda i: len(shard["comment_ids"][i]))  # length-sorted batches pad less
        answers = [None] * n
        for start in range(0, n, bs):
            chunk = order[start:start + bs]
            for i, answer in zip(chunk, self.teacher.answer([shard["comment_ids"][i] for i in chunk])):
                answers[i] = answer
        rows = []
        for i, a in enumerate(answers):
            fields = self.teacher.grammar.decode_answer(a.teacher_ids)
            if fields is None:  # cannot happen under the automaton; refuse to write a bad record
                raise RuntimeError(f"comment {shard['ids'][i]}: teacher answer is not valid: {a.teacher_ids}")
            rows.append({
                "id": shard["ids"][i], "split": shard["splits"][i], "text": shard["texts"][i],
                "provenance": shard["provenance"][i], "comment_ids": shard["comment_ids"][i],
                "answer_ids": a.vocab_indices, "answer_text": self.task.format_answer(fields), "answer": fields,
                "n_steps": len(a.vocab_indices),
                "logits": records.encode_logits(a.logits, self.cfg.records.logits_dtype),
            })
        return rows


def shard_item(corpus: KeptCorpus, k: int, tokenizer) -> dict:
    """Shard k's comments as the teacher takes them: ids, texts, splits, provenance, encoded comments."""
    t = corpus.shard(k)
    label_fields = [c for c in t.column_names if c not in ("id", "text", "split")]
    texts = t.column("text").to_pylist()
    labels = [t.column(c).to_pylist() for c in label_fields]
    return {
        "index": k,
        "ids": t.column("id").to_pylist(),
        "texts": texts,
        "splits": t.column("split").to_pylist(),
        "provenance": [json.dumps(dict(zip(label_fields, values))) for values in zip(*labels)]
        if label_fields else ["{}"] * len(texts),
        "comment_ids": [encode_comment(tokenizer, text) for text in texts],
    }


def actor_resources(cfg: Config) -> tuple[int, dict, int]:
    """(number of actors, Ray resources per actor, torch threads per actor)."""
    import ray

    gpus = int(ray.cluster_resources().get("GPU", 0))
    if gpus:
        n = cfg.teacher.actors or max(1, int(gpus / cfg.teacher.gpus_per_actor))
        return n, {"num_gpus": cfg.teacher.gpus_per_actor, "num_cpus": 1}, 1
    n = cfg.teacher.actors or 1
    cpus = os.cpu_count() or 1
    # Fractional CPUs: on a 2-core machine an actor asking for whole cores can starve Ray Data's other stages.
    return n, {"num_cpus": 0.5}, cfg.teacher.cpu_threads or max(1, cpus // n)


def run_extraction(cfg: Config) -> dict:
    """Extract (or finish extracting) teacher records; returns the manifest."""
    import ray

    started = time.perf_counter()
    uri = cfg.records.uri
    p = prepare(cfg)
    print(f"[corpus] {p.stats.summary()}", flush=True)
    source = f"from {cfg.vocab.from_uri}" if cfg.vocab.from_uri is not None else "built from the corpus"
    print(f"[vocab] {len(p.vocab)} output tokens ({p.vocab.n_required} required, "
          f"{len(p.vocab) - p.vocab.n_required} auxiliary), {source}; prompt style {p.style}", flush=True)
    plan = make_plan(p)
    pin_plan(uri, plan)
    storage.write_bytes(storage.join(uri, "config.yaml"), config_to_yaml(cfg).encode())

    n_shards = p.corpus.n_shards
    done = records.existing_shards(uri)
    todo = [k for k in range(n_shards) if k not in done]
    print(f"[extract] {n_shards} shards of up to {cfg.records.shard_size} comments -> {uri}; "
          f"{len(done)} already complete, {len(todo)} to do", flush=True)

    wrote = 0
    if todo:
        init_ray()
        n_actors, resources, threads = actor_resources(cfg)
        ds = ray.data.from_items([{"index": k} for k in todo], override_num_blocks=len(todo)).map_batches(
            ShardWriter, batch_size=1, batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=n_actors),
            fn_constructor_kwargs=dict(cfg=cfg, threads=threads),
            # Ray Data restarts a lost actor and retries its shard; shards are whole files, so nothing doubles.
            **resources)
        todo_rows = sum(p.corpus.shard_rows(k) for k in todo)
        t0 = time.perf_counter()
        with tqdm(total=todo_rows, unit="comment", desc="extract", dynamic_ncols=True) as bar:
            for row in ds.iter_rows():
                wrote += row["rows"]
                bar.update(row["rows"])
                bar.set_postfix(records_per_s=f"{wrote / (time.perf_counter() - t0):.2f}")
        extract_seconds = time.perf_counter() - t0
    else:
        extract_seconds = 0.0

    missing = [k for k in range(n_shards) if k not in records.existing_shards(uri)]
    if missing:
        raise records.RecordsError(f"{uri}: shards {missing[:5]} missing after extraction; rerun to finish")
    shards = [records.shard_entry(uri, k) for k in range(n_shards)]
    runtimes = collections.Counter(json.dumps(s["teacher_runtime"], sort_keys=True) for s in shards)
    manifest = dict(plan, shards=shards, rows=sum(s["rows"] for s in shards),
                    teacher_runtime=[{**json.loads(r), "shards": n} for r, n in sorted(runtimes.items())],
                    corpus_stats=corpus_stats_dict(p.stats),
                    config=config_to_dict(cfg), created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    records.write_json(uri, records.MANIFEST_NAME, manifest)
    rate = wrote / extract_seconds if extract_seconds else 0.0
    print(f"[extract] done: {manifest['rows']} records in {n_shards} shards at {uri} "
          f"({wrote} new in {extract_seconds:.1f}s, {rate:.2f} records/s; "
          f"{time.perf_counter() - started:.1f}s in all)", flush=True)
    return manifest
