"""Teacher records: Parquet shards plus `manifest.json`, local or s3:// (RECORDS_FORMAT_VERSION).

One row per comment:

| column        | type            | what                                                             |
|---------------|-----------------|------------------------------------------------------------------|
| id            | string          | the corpus id                                                    |
| split         | string          | train / eval (stable hash of the id)                             |
| text          | string          | the comment                                                      |
| provenance    | string (JSON)   | the corpus's label fields, e.g. human labels                     |
| comment_ids   | list<int32>     | the comment's teacher token ids (what the student reads)         |
| answer_ids    | list<int32>     | the teacher's answer as output-vocabulary indices (ends with end) |
| answer_text   | string          | the answer as text (canonical JSON)                              |
| answer        | map<str, str>   | the parsed fields                                                |
| n_steps       | int32           | generated steps = len(answer_ids)                                |
| logits        | binary          | raw teacher logits, (n_steps, V) little-endian 16-bit, row-major |

`logits` holds float16 or bfloat16 bits as the manifest's `logits_dtype` says;
`decode_logits` turns a cell back into a (n_steps, V) tensor.

A record set is complete only when `manifest.json` exists. While extraction runs,
`plan.json` pins what the set is made of (corpus rows per shard, task, vocabulary,
teacher); each shard appears whole or not at all (see `distill.storage.write_bytes`),
so a rerun skips the shards that exist and no comment is ever written twice.
"""

from __future__ import annotations

import hashlib
import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from distill import storage

RECORDS_FORMAT_VERSION = 1
PLAN_NAME = "plan.json"
MANIFEST_NAME = "manifest.json"

SCHEMA = pa.schema([
    ("id", pa.string()),
    ("split", pa.string()),
    ("text", pa.string()),
    ("provenance", pa.string()),
    ("comment_ids", pa.list_(pa.int32())),
    ("answer_ids", pa.list_(pa.int32())),
    ("answer_text", pa.string()),
    ("answer", pa.map_(pa.string(), pa.string())),
    ("n_steps", pa.int32()),
    ("logits", pa.binary()),
])

TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}

RUNTIME_KEY = "distill.teacher_runtime"
"""Prefix of a shard's Parquet metadata keys for what its teacher actor resolved (teacher.dtype=auto, device)."""


class RecordsError(ValueError):
    """Records that are missing, incomplete, or made for another task/vocabulary/tokenizer."""


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.parquet"


def encode_logits(logits: torch.Tensor, dtype: str) -> bytes:
    """(steps, V) float tensor -> 16-bit little-endian bytes."""
    return logits.to(TORCH_DTYPES[dtype]).contiguous().view(torch.int16).numpy().astype("<i2").tobytes()


def decode_logits(cell: bytes, n_steps: int, vocab_size: int, dtype: str) -> torch.Tensor:
    """16-bit bytes -> (n_steps, V) tensor of the stored dtype."""
    bits = torch.from_numpy(np.frombuffer(cell, dtype="<i2").astype(np.int16).copy())
    return bits.view(TORCH_DTYPES[dtype]).reshape(n_steps, vocab_size)


def shard_bytes(rows: list[dict], teacher_runtime: dict[str, str] | None = None) -> bytes:
    """A Parquet shard; teacher_runtime (what the writing actor resolved, e.g. {"dtype": "bfloat16", "device":
    "cpu"}) goes into the file's key-value metadata, so every shard says how it was made."""
    schema = SCHEMA.with_metadata({f"{RUNTIME_KEY}.{k}": v for k, v in (teacher_runtime or {}).items()})
    sink = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), sink, compression="zstd")
    return sink.getvalue()


def write_shard(uri: str, index: int, rows: list[dict], teacher_runtime: dict[str, str] | None = None) -> dict:
    """Write one whole shard; returns its manifest entry."""
    data = shard_bytes(rows, teacher_runtime)
    storage.write_bytes(storage.join(uri, shard_name(index)), data)
    return {"index": index, "name": shard_name(index), "rows": len(rows), "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(), "teacher_runtime": dict(teacher_runtime or {})}


def existing_shards(uri: str) -> dict[int, str]:
    """Shard index -> URI for the complete shards already under `uri`."""
    found = {}
    for path in storage.list_files(uri):
        name = path.rsplit("/", 1)[-1]
        if name.startswith("shard-") and name.endswith(".parquet") and ".tmp-" not in name:
            found[int(name[len("shard-"):-len(".parquet")])] = path
    return found


def shard_entry(uri: str, index: int) -> dict:
    """Manifest entry of a shard already written (checksum from its bytes, row count from its footer)."""
    data = storage.read_bytes(storage.join(uri, shard_name(index)))
    footer = pq.ParquetFile(io.BytesIO(data)).metadata
    prefix = f"{RUNTIME_KEY}.".encode()
    runtime = {k[len(prefix):].decode(): v.decode() for k, v in (footer.metadata or {}).items() if k.startswith(prefix)}
    return {"index": index, "name": shard_name(index), "rows": footer.num_rows, "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(), "teacher_runtime": runtime}


def write_json(uri: str, name: str, obj: dict) -> None:
    storage.write_bytes(storage.join(uri, name), json.dumps(obj, indent=2, ensure_ascii=False).encode())


def read_json(uri: str, name: str) -> dict | None:
    path = storage.join(uri, name)
    if not storage.exists(path):
        return None
    return json.loads(storage.read_bytes(path))


def load_manifest(uri: str) -> dict:
    manifest = read_json(uri, MANIFEST_NAME)
    if manifest is None:
        plan = read_json(uri, PLAN_NAME)
        hint = " (extraction started but did not finish: rerun it to continue)" if plan else ""
        raise RecordsError(f"{uri}: no {MANIFEST_NAME}, not a complete record set{hint}")
    if manifest.get("format_version") != RECORDS_FORMAT_VERSION:
        raise RecordsError(f"{uri}: records format {manifest.get('format_version')}, "
                           f"this distill reads {RECORDS_FORMAT_VERSION}")
    return manifest


def read_shard(uri: str, shard: dict, verify: bool = True, columns: list[str] | None = None) -> pa.Table:
    """One shard of a record set (its manifest entry), checking its checksum against the manifest
    (all columns, or only `columns`: then the whole file is still read, to check it)."""
    data = storage.read_bytes(storage.join(uri, shard["name"]))
    if verify and hashlib.sha256(data).hexdigest() != shard["sha256"]:
        raise RecordsError(f"{uri}/{shard['name']}: checksum does not match the manifest")
    return pq.read_table(io.BytesIO(data), schema=SCHEMA, columns=columns)


def read_column(uri: str, shard: dict, column: str) -> pa.Array:
    """One column of one shard, reading only that column's pages (and the footer) from storage."""
    with storage.open_file(storage.join(uri, shard["name"])) as f:
        return pq.read_table(f, columns=[column]).column(column).combine_chunks()


def read_records(uri: str, manifest: dict | None = None, verify: bool = True) -> pa.Table:
    """All rows of a complete record set, checking each shard's checksum against the manifest."""
    manifest = manifest or load_manifest(uri)
    tables = [read_shard(uri, shard, verify) for shard in manifest["shards"]]
    return pa.concat_tables(tables) if tables else SCHEMA.empty_table()


def _token(s: str) -> str:
    return s.replace("▁", " ").replace("\n", "\\n")


def teacher_margin(row: dict, transitions: list[dict[int, int]], vocab_size: int, dtype: str) -> float:
    """The teacher's margin on a record: the smallest gap between its top two probabilities (softmax over
    the allowed tokens) over the answer's choice points; 1 where the answer had no choice."""
    logits = decode_logits(row["logits"], row["n_steps"], vocab_size, dtype).float()
    margin, state = 1.0, 0
    for step, idx in enumerate(row["answer_ids"]):
        allowed = sorted(transitions[state])
        if len(allowed) > 1:
            top = torch.softmax(logits[step, allowed], -1).topk(2).values
            margin = min(margin, float(top[0] - top[1]))
        state = transitions[state].get(idx)
        if state is None:
            raise ValueError(f"record {row.get('id')}: answer_ids are not an answer of the task's automaton")
    return margin


SUMMARY_ROWS = 10_000
"""`teacher_summary` reads at most this many records (decoding every record's logits of a large set is slow)."""


def teacher_summary(manifest: dict, table: pa.Table, transitions: list[dict[int, int]]) -> list[str]:
    """`describe`'s lines on the teacher itself: distinct answers, how sure it was (margin shares), and its
    agreement with the GoEmotions human sentiment labels where the records carry them and the task has them."""
    from distill.evaluate import GOEMOTIONS_SENTIMENT, human_label

    rows = table.slice(0, SUMMARY_ROWS).select(["answer_text", "answer", "provenance", "answer_ids", "n_steps",
                                                "logits"]).to_pylist()
    if not rows:
        return []
    margins = [teacher_margin(r, transitions, len(manifest["vocab"]["ids"]), manifest["logits_dtype"]) for r in rows]
    share = lambda test: sum(map(test, margins)) / len(margins)  # noqa: E731
    lines = [f"teacher   {len({r['answer_text'] for r in rows})} distinct answers; margin < 0.1 on "
             f"{share(lambda m: m < 0.1):.1%}, >= 0.2 on {share(lambda m: m >= 0.2):.1%}, "
             f">= 0.4 on {share(lambda m: m >= 0.4):.1%} of comments"
             + (f" (the first {SUMMARY_ROWS:,})" if table.num_rows > SUMMARY_ROWS else "")]
    spec = GOEMOTIONS_SENTIMENT
    if set(spec["mapping"].values()) <= set(manifest["task"]["fields"].get(spec["field"], ())):
        pairs = [(dict(r["answer"])[spec["field"]], label) for r in rows
                 if (label := human_label(r["provenance"], spec["provenance_key"], spec["mapping"])) is not None]
        if pairs:
            lines.append(f"          {spec['field']} = the human label (GoEmotions) on "
                         f"{sum(a == b for a, b in pairs) / len(pairs):.1%} of {len(pairs)} labelled comments")
    return lines


def describe(uri: str, n_examples: int = 3, top_k: int = 3) -> str:
    """What `distill inspect` prints: the manifest, counts, and a few decoded examples with the
    teacher's top alternatives (among the allowed tokens) at every position where the answer branches."""
    manifest = load_manifest(uri)
    table = read_records(uri, manifest)
    vocab_strings = manifest["vocab"]["strings"]
    transitions = [{int(k): v for k, v in row.items()} for row in manifest["automaton"]["transitions"]]
    teacher = manifest["teacher"]
    lines = [
        f"records   {uri}",
        f"format    v{manifest['format_version']}, created {manifest.get('created', '?')}",
        f"teacher   {teacher['model']}" + (f" @ {teacher['revision']}" if teacher.get("revision") else ""),
        f"task      {manifest['task']['name']} ({', '.join(manifest['task']['fields'])}); prompt style "
        f"{manifest['prompt']['style']}",
        f"vocab     {len(vocab_strings)} output tokens ({manifest['vocab']['n_required']} required), "
        + (f"from {source}" if (source := manifest.get("vocab_source")) else "built from the corpus"),
        f"logits    {manifest['logits_dtype']}, raw (before the constraint mask)",
        f"shards    {len(manifest['shards'])}, {manifest['rows']} rows, "
        f"{sum(s['bytes'] for s in manifest['shards']) / 1e6:.2f} MB "
        f"({sum(s['bytes'] for s in manifest['shards']) / max(1, manifest['rows']) / 1e3:.1f} kB per comment)",
    ]
    splits = table.column("split").to_pylist()
    lines.append(f"split     train {splits.count('train')}, eval {splits.count('eval')}")
    answers = table.column("answer").to_pylist()
    for field in manifest["task"]["fields"]:
        counts: dict[str, int] = {}
        for a in answers:
            value = dict(a)[field]
            counts[value] = counts.get(value, 0) + 1
        lines.append(f"  {field:<12}" + ", ".join(f"{v} {c}" for v, c in sorted(counts.items(), key=lambda x: -x[1])))
    V = len(vocab_strings)
    lines += teacher_summary(manifest, table, transitions)
    for row in table.slice(0, n_examples).to_pylist():
        lines += ["", f"[{row['id']}] {row['text']}", f"  -> {row['answer_text']}"]
        logits = decode_logits(row["logits"], row["n_steps"], V, manifest["logits_dtype"]).float()
        state = 0
        for step, idx in enumerate(row["answer_ids"]):
            allowed = sorted(transitions[state])
            if len(allowed) > 1:  # a branch: show the teacher's preference among the allowed tokens
                probs = torch.softmax(logits[step, allowed], -1)
                ranked = sorted(zip(probs.tolist(), allowed), reverse=True)[:top_k]
                alts = ", ".join(f"{_token(vocab_strings[a])!r} {p:.2f}" for p, a in ranked)
                lines.append(f"  step {step:>2}: chose {_token(vocab_strings[idx])!r}; allowed top: {alts}")
            state = transitions[state][idx]
    return "\n".join(lines)
