"""The kept corpus, read once and stored beside the records: Parquet parts the teacher reads shard by shard.

    kept = ingest(cfg, count_tokens)   # reads the corpus, or reuses the parts an earlier run finished
    kept.shard(k)                      # the k-th shard's comments (records.shard_size of them), in corpus order

Two engines keep the same comments in the same order, with the same counts (tested side by side):

    local  the driver reads the corpus itself (`corpus.read_corpus`), stopping at `corpus.limit`;
           for corpora that fit in its memory
    ray    Ray Data, for a Reddit month: one read task per file streams its rows in blocks (a `.zst`
           dump is one stream, decompressed once); parallel actors parse, screen (`corpus.screen`), count
           teacher tokens and hash each text. The blocks reach the driver in corpus order, and it drops
           duplicates as the local engine does (the first occurrence wins, across blocks and files) against
           an on-disk set of the texts' 128-bit digests and the ids (`SeenOnDisk`, SQLite), then streams
           the rows into parts and the quarantine file: it holds a block and one part at a time, never the
           corpus. No shuffle: nothing waits for the whole corpus, and the first parts are written early.

`corpus.engine=auto` reads in the driver when skip + limit keep at most LOCAL_LIMIT_ROWS comments (both engines
stop there; the driver does so without starting Ray and its actors), else on Ray when the corpus files hold more
than `corpus.ray_above_mb`.

Layout: {records.uri}/corpus/part-00000.parquet, ... (whole shards, one row group per shard, columns id,
text, split and the label fields, all strings), and {records.uri}/corpus.json, written last: the parts with
row counts and sha256, the shards' id hashes (what plan.json pins), the corpus counts, and the settings it
was made with. A rerun with the same settings reuses the parts; with other settings it stops with one line.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import io
import json
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from distill import records, storage
from distill.config import Config
from distill.corpus import (CORPUS_VERSION, TOKEN_BATCH, CorpusError, CorpusStats, _Bad, corpus_files, read_rows,
                            length_reason, quarantine_line, read_corpus, screen, split_for)

CORPUS_DIR = "corpus"
INDEX_NAME = "corpus.json"
"""Beside CORPUS_DIR, not in it: the parts folder is itself a Parquet corpus a later run can read."""
PART_ROWS = 65536
"""Rows per part, rounded down to whole shards (at least one)."""
BLOCK_ROWS = 16384
"""Rows per block a Ray read task emits."""
BLOCK_BYTES = 16 * 2**20
"""Ray Data's largest block while the ingest runs (its default, 128 MiB, is more than a small object store's
budget: a read task's merged blocks then stall it)."""
READ_AHEAD_BLOCKS = 4
"""Blocks per Screen actor that the read tasks may have read and not yet seen screened (`ReadAhead`); a
block here is the larger of BLOCK_ROWS and TOKEN_BATCH, since Ray Data gathers that many rows for a Screen call."""
SEEN_CACHE_MB = 64
"""SQLite's page cache for the dedupe set (the set itself is on local disk: a few tens of bytes a candidate)."""
LOCAL_LIMIT_ROWS = 1_000_000
"""corpus.engine=auto reads in the driver when skip + limit keep at most this many comments."""
_LINE_BITS = 40  # a row's position in the corpus: file index << 40 | line


@dataclass
class KeptCorpus:
    """The kept corpus on storage, as corpus.json describes it."""

    uri: str
    """The parts' folder."""
    index: dict

    @property
    def rows(self) -> int:
        return self.index["rows"]

    @property
    def n_shards(self) -> int:
        return len(self.index["shard_ids_sha256"])

    @property
    def stats(self) -> CorpusStats:
        s = self.index["stats"]
        return CorpusStats(read=s["read"], kept=s["kept"], kept_eval=s["kept_eval"],
                           dropped=collections.Counter(s["dropped"]), quarantined=collections.Counter(s["quarantined"]),
                           quarantine_uri=s["quarantine_uri"], limit_reached=s["limit_reached"])

    def shard_rows(self, k: int) -> int:
        size = self.index["shard_size"]
        return min(size, self.rows - k * size)

    def shard(self, k: int) -> pa.Table:
        """The k-th shard's comments: one row group of one part."""
        per_part = self.index["part_rows"] // self.index["shard_size"]
        part = self.index["parts"][k // per_part]
        with storage.open_file(storage.join(self.uri, part["name"])) as f:
            return pq.ParquetFile(f).read_row_group(k % per_part)

    def head(self, n: int) -> pa.Table:
        """The first n kept comments (fewer if the corpus keeps fewer)."""
        return pa.concat_tables(self.tables(limit=n)).slice(0, n)

    def tables(self, limit: Optional[int] = None) -> Iterator[pa.Table]:
        """The kept comments part by part, in corpus order, until `limit` rows have been given."""
        given = 0
        for part in self.index["parts"]:
            if limit is not None and given >= limit:
                return
            table = pq.read_table(io.BytesIO(storage.read_bytes(storage.join(self.uri, part["name"]))))
            given += table.num_rows
            yield table


def ingest(cfg: Config, count_tokens: Callable[[list[str]], list[int]], tokenizer_hash: str) -> KeptCorpus:
    """The kept corpus of this run: reused when an earlier run finished it, else read, filtered and stored."""
    uri = storage.join(cfg.records.uri, CORPUS_DIR)
    settings = corpus_settings(cfg, tokenizer_hash)
    index = records.read_json(cfg.records.uri, INDEX_NAME)
    if index is not None:
        old = index["settings"]
        differs = [f"corpus.{k}" for k in settings["corpus"] if old["corpus"].get(k) != settings["corpus"][k]]
        differs += [k for k in settings if k != "corpus" and old.get(k) != settings[k]]
        if differs:
            raise records.RecordsError(
                f"{cfg.records.uri} holds records of another extraction (its corpus was read with another "
                f"{differs[0]}); rerun with the same config or choose a new records.uri")
        return KeptCorpus(uri, index)

    started = time.perf_counter()
    engine = pick_engine(cfg)
    quarantine_uri = storage.join(cfg.records.uri, "quarantine.jsonl")
    writer = PartWriter(uri, cfg.records.shard_size)
    if engine == "local":
        table, stats = read_corpus(cfg.corpus, count_tokens, quarantine_uri)
        writer.add(table)
    else:
        stats = ingest_with_ray(cfg, writer, quarantine_uri)
    writer.close()
    index = {"corpus_version": CORPUS_VERSION, "settings": settings, "engine": engine,
             "rows": writer.rows, "shard_size": cfg.records.shard_size, "part_rows": writer.part_rows,
             "parts": writer.parts, "shard_ids_sha256": writer.shard_hashes,
             "stats": {"read": stats.read, "kept": stats.kept, "kept_eval": stats.kept_eval,
                       "dropped": dict(stats.dropped), "quarantined": dict(stats.quarantined),
                       "quarantine_uri": stats.quarantine_uri, "limit_reached": stats.limit_reached},
             "seconds": round(time.perf_counter() - started, 3)}
    records.write_json(cfg.records.uri, INDEX_NAME, index)
    return KeptCorpus(uri, index)


def corpus_settings(cfg: Config, tokenizer_hash: str) -> dict:
    """What decides the kept corpus: the corpus settings but the engine, the tokenizer, the shard size."""
    corpus = dataclasses.asdict(cfg.corpus)
    for key in ("engine", "ray_above_mb"):
        corpus.pop(key)
    return {"corpus": corpus, "tokenizer_hash": tokenizer_hash, "shard_size": cfg.records.shard_size}


def pick_engine(cfg: Config) -> str:
    """corpus.engine, or for auto: local where the driver stops early (a limit of at most LOCAL_LIMIT_ROWS
    comments: no Ray cluster and actors to start for them) or the corpus is small, ray otherwise."""
    cc = cfg.corpus
    if cc.engine != "auto":
        return cc.engine
    if cc.limit is not None and cc.skip + cc.limit <= LOCAL_LIMIT_ROWS:
        return "local"
    return "ray" if corpus_bytes(corpus_files(cc)) > cc.ray_above_mb * 2**20 else "local"


def corpus_bytes(files: list[tuple[str, str]]) -> int:
    total = 0
    for uri, _ in files:
        fs, path = storage.filesystem(uri)
        total += fs.size(path)
    return total


class PartWriter:
    """Takes kept rows in corpus order; writes whole parts and hashes each shard's ids as plan.json does."""

    def __init__(self, uri: str, shard_size: int):
        self.uri = uri
        self.shard_size = shard_size
        self.part_rows = max(1, PART_ROWS // shard_size) * shard_size
        self.pending: list[pa.Table] = []
        self.pending_rows = 0
        self.rows = 0
        self.parts: list[dict] = []
        self.shard_hashes: list[str] = []
        self._shard = hashlib.sha256()
        self._in_shard = 0

    def add(self, table: pa.Table) -> None:
        for row_id in table.column("id").to_pylist():
            self._shard.update((b"\n" if self._in_shard else b"") + row_id.encode())
            self._in_shard += 1
            if self._in_shard == self.shard_size:
                self._end_shard()
        self.rows += table.num_rows
        self.pending.append(table)
        self.pending_rows += table.num_rows
        while self.pending_rows >= self.part_rows:
            self._write(self.part_rows)

    def close(self) -> None:
        if self._in_shard:
            self._end_shard()
        if self.pending_rows:
            self._write(self.pending_rows)

    def _end_shard(self) -> None:
        self.shard_hashes.append(self._shard.hexdigest())
        self._shard, self._in_shard = hashlib.sha256(), 0

    def _write(self, n: int) -> None:
        table = pa.concat_tables(self.pending).combine_chunks()
        part, rest = table.slice(0, n), table.slice(n)
        self.pending, self.pending_rows = ([rest] if rest.num_rows else []), rest.num_rows
        buf = io.BytesIO()
        pq.write_table(part, buf, row_group_size=self.shard_size)
        data = buf.getvalue()
        name = f"part-{len(self.parts):05d}.parquet"
        storage.write_bytes(storage.join(self.uri, name), data)
        self.parts.append({"name": name, "rows": part.num_rows, "bytes": len(data),
                           "sha256": hashlib.sha256(data).hexdigest()})


# --- The Ray Data engine -------------------------------------------------------------

def ingest_with_ray(cfg: Config, writer: PartWriter, quarantine_uri: str) -> CorpusStats:
    """Read and screen the corpus on Ray Data; dedupe the rows in corpus order and stream the kept ones into
    `writer`."""
    import ray

    from distill.runtime import init_ray

    cc = cfg.corpus
    clash = {"id", "text", "split"} & set(cc.label_fields)
    if clash:
        raise CorpusError(f"corpus.label_fields may not contain {', '.join(sorted(clash))}: "
                          "those names are corpus columns")
    files = corpus_files(cc)
    init_ray()
    ctx = ray.data.DataContext.get_current()
    saved = ctx.execution_options.preserve_order, ctx.enable_progress_bars, ctx.target_max_block_size
    ctx.execution_options.preserve_order = True  # the screened rows reach the driver in corpus order
    ctx.enable_progress_bars = True  # Ray Data shows each stage's progress
    ctx.target_max_block_size = BLOCK_BYTES
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    gate = ray.remote(num_cpus=0)(ReadAhead).remote(READ_AHEAD_BLOCKS * max(BLOCK_ROWS, TOKEN_BATCH) * cpus)
    try:
        return _ingest(cfg, files, cpus, gate, writer, quarantine_uri)
    finally:
        ctx.execution_options.preserve_order, ctx.enable_progress_bars, ctx.target_max_block_size = saved
        ray.kill(gate)


def _ingest(cfg: Config, files: list[tuple[str, str]], cpus: int, gate, writer: PartWriter,
            quarantine_uri: str) -> CorpusStats:
    import ray
    from tqdm import tqdm

    cc = cfg.corpus
    ds = (ray.data.from_items([{"file": i} for i in range(len(files))], override_num_blocks=len(files))
          # its own tasks (other resources than Screen's, so not fused into it): a file is read once, screened in parallel
          .map_batches(read_files, batch_size=1, batch_format="pyarrow", num_cpus=0.25,
                       fn_kwargs={"files": files, "cfg": cc, "block_rows": BLOCK_ROWS, "gate": gate})
          # Ray Data merges what a task yields into blocks of up to 128 MiB: cut them so that all actors get work
          .repartition(target_num_rows_per_block=BLOCK_ROWS)
          .map_batches(Screen, batch_format="pyarrow", batch_size=TOKEN_BATCH,
                       fn_constructor_kwargs={"cfg": cfg, "files": files, "gate": gate},
                       # half a CPU each, up to one actor per CPU: beside a reading task, a second actor still fits
                       num_cpus=0.5, compute=ray.data.ActorPoolStrategy(min_size=1, max_size=cpus)))

    local_dir = None if storage.is_remote(quarantine_uri) else os.path.dirname(os.path.abspath(quarantine_uri))
    if local_dir:
        os.makedirs(local_dir, exist_ok=True)
    with (tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=local_dir, suffix=".tmp", delete=False) as q,
          SeenOnDisk() as seen):
        try:
            collect = _Collector(cc, writer, q, seen, CorpusStats(quarantine_uri=quarantine_uri))
            with tqdm(total=None, unit="row", desc="corpus", dynamic_ncols=True) as bar:
                for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
                    if collect.take(batch):
                        break
                    bar.update(batch.num_rows)
                    bar.set_postfix(kept=f"{collect.stats.kept:,}")
        except BaseException:
            os.remove(q.name)
            raise
    storage.put_file(q.name, quarantine_uri)
    stats = collect.stats
    stats.dropped = +stats.dropped  # no zero counts
    if stats.kept == 0:
        raise CorpusError(f"no comments kept from {', '.join(cc.paths)}: {stats.summary().replace(chr(10), '; ')}")
    return stats


class _Collector:
    """The driver's end: takes the screened rows block by block in corpus order, drops duplicates, counts
    every reason, writes the quarantine lines and hands the kept rows to the part writer; applies corpus.skip
    and corpus.limit as the local engine does (the first kept rows are "skipped"; reading stops at the row
    that fills the limit)."""

    def __init__(self, cfg, writer: PartWriter, quarantine, seen: "SeenOnDisk", stats: CorpusStats):
        self.cfg, self.writer, self.quarantine, self.seen, self.stats = cfg, writer, quarantine, seen, stats
        self.columns = ["id", "text", "split", *cfg.label_fields]
        self.last_pos = -1

    def take(self, batch: pa.Table) -> bool:
        """Take one block; True once corpus.limit is reached."""
        if batch.num_rows == 0:
            return False
        stats, cc = self.stats, self.cfg
        pos = batch.column("pos").to_numpy()
        if pos[0] <= self.last_pos or np.any(np.diff(pos) <= 0):
            raise RuntimeError("Ray Data returned corpus rows out of order; rerun")  # guards preserve_order
        self.last_pos = int(pos[-1])
        batch = self.drop_duplicates(batch)
        kept = pc.is_null(batch.column("reason")).to_numpy(zero_copy_only=False)
        skipped = kept & (np.cumsum(kept) <= max(0, cc.skip - stats.dropped["skipped"]))
        kept &= ~skipped
        if cc.limit is not None and kept.sum() >= cc.limit - stats.kept:
            end = int(np.argmax(np.cumsum(kept) >= cc.limit - stats.kept)) + 1
            batch, kept, skipped = batch.slice(0, end), kept[:end], skipped[:end]
            stats.limit_reached = True
        stats.read += batch.num_rows
        stats.dropped["skipped"] += int(skipped.sum())
        bad = pa.array(pc.is_valid(batch.column("quarantine")).to_numpy(zero_copy_only=False))
        self.quarantine.writelines(batch.column("quarantine").filter(bad).to_pylist())
        reason = batch.column("reason")
        stats.dropped.update(_value_counts(reason.filter(pc.invert(bad))))
        stats.quarantined.update(_value_counts(reason.filter(bad)))
        table = batch.filter(pa.array(kept)).select(self.columns)
        stats.kept += table.num_rows
        stats.kept_eval += pc.sum(pc.equal(table.column("split"), "eval")).as_py() or 0
        self.writer.add(table)
        return stats.limit_reached

    def drop_duplicates(self, batch: pa.Table) -> pa.Table:
        """As the local engine: a candidate whose text an earlier candidate had is a duplicate; one of a new
        text whose id an earlier kept row had is a duplicate_id."""
        candidates = np.nonzero(pc.is_null(batch.column("reason")).to_numpy(zero_copy_only=False))[0]
        reasons = batch.column("reason").to_pylist()
        for table, column, reason in (("texts", "text_key", "duplicate"), ("ids", "id", "duplicate_id")):
            new = np.array(self.seen.add_new(table, batch.column(column).take(candidates).to_pylist()), dtype=bool)
            for i in candidates[~new]:
                reasons[i] = reason
            candidates = candidates[new]  # only rows of a new text are checked for their id
        return batch.set_column(batch.schema.get_field_index("reason"), "reason", pa.array(reasons, pa.string()))


class SeenOnDisk:
    """The texts (as 128-bit BLAKE2b digests) and ids the ingest has seen, in a SQLite file on local disk:
    the driver's memory stays a page cache (SEEN_CACHE_MB), whatever the corpus. A digest stands for its
    text: two different texts share one with a chance of about n^2 / 2^129 (1e-23 at 100M comments)."""

    def __enter__(self) -> "SeenOnDisk":
        import sqlite3

        self.dir = tempfile.TemporaryDirectory(prefix="distill-seen-")
        self.db = sqlite3.connect(os.path.join(self.dir.name, "seen.sqlite"), isolation_level=None)
        for pragma in ("journal_mode=OFF", "synchronous=OFF", f"cache_size=-{SEEN_CACHE_MB * 1024}"):
            self.db.execute(f"PRAGMA {pragma}")
        self.db.execute("CREATE TABLE texts (k BLOB PRIMARY KEY) WITHOUT ROWID")
        self.db.execute("CREATE TABLE ids (k TEXT PRIMARY KEY) WITHOUT ROWID")
        return self

    def __exit__(self, *exc) -> None:
        self.db.close()
        self.dir.cleanup()

    def add_new(self, table: str, keys: list) -> list[bool]:
        """Adds the keys in order; for each, whether it was new (a key repeated within `keys` is new once)."""
        cur = self.db.cursor()
        insert = f"INSERT OR IGNORE INTO {table} VALUES (?)"
        new = []
        cur.execute("BEGIN")
        for key in keys:
            cur.execute(insert, (key,))
            new.append(cur.rowcount == 1)
        cur.execute("COMMIT")
        return new


def _value_counts(array: pa.Array) -> dict[str, int]:
    return {d["values"]: d["counts"] for d in pc.value_counts(array.drop_null()).to_pylist()}


def read_files(batch: pa.Table, files: list[tuple[str, str]], cfg, block_rows: int, gate) -> Iterator[pa.Table]:
    """Ray task: one corpus file's rows as blocks of (pos, raw JSON object or bad row's excerpt, bad reason).

    JSON lines pass unparsed (parsing is spread over the Screen actors); CSV/TSV/Parquet rows pass as JSON.
    `raw` is bytes: undecodable input travels as it came (surrogateescape), for Screen to quarantine.
    Each block waits for the `gate` (`ReadAhead`): reading stays a few blocks ahead of screening.
    """
    import ray

    (index,) = batch.column("file").to_pylist()
    uri, fmt = files[index]
    block: dict[str, list] = {"pos": [], "raw": [], "bad": []}
    for _, line, row in read_rows([(uri, fmt)], cfg, parse_json=False):
        block["pos"].append(index << _LINE_BITS | line)
        if isinstance(row, _Bad):
            raw, bad = row.excerpt, row.reason
        else:
            raw, bad = (row if isinstance(row, str) else json.dumps(row, ensure_ascii=False)), None
        block["raw"].append(raw.encode("utf-8", "surrogateescape"))
        block["bad"].append(bad)
        if len(block["pos"]) == block_rows:
            ray.get(gate.admit.remote(block_rows))
            yield _read_block(block)
            block = {"pos": [], "raw": [], "bad": []}
    if block["pos"]:
        ray.get(gate.admit.remote(len(block["pos"])))
        yield _read_block(block)


class ReadAhead:
    """Ray actor: how many rows the read tasks have read that the Screen actors have not yet screened,
    held at `limit` or less. A read task decompresses a dump faster than the actors can parse it, and
    Ray Data cannot pause a running task: without this, one task reads the whole month into the object
    store (an 18M-row dump: 16 GiB, 12 GiB of it spilled to disk, before a fifth of it was screened)."""

    def __init__(self, limit: int):
        import asyncio

        self.limit, self.pending, self.changed = limit, 0, asyncio.Condition()

    async def admit(self, rows: int) -> None:
        """Returns once `rows` more fit (at once when none are pending: a block larger than the limit passes)."""
        async with self.changed:
            await self.changed.wait_for(lambda: self.pending == 0 or self.pending + rows <= self.limit)
            self.pending += rows

    async def screened(self, rows: int) -> None:
        async with self.changed:
            self.pending = max(0, self.pending - rows)
            self.changed.notify_all()


def _read_block(block: dict) -> pa.Table:
    return pa.table({"pos": pa.array(block["pos"], pa.int64()), "raw": pa.array(block["raw"], pa.binary()),
                     "bad": pa.array(block["bad"], pa.string())})


class Screen:
    """Ray actor: parses rows, screens them as `corpus.screen` does, counts teacher tokens, splits them and
    hashes each text for the driver's dedupe. Every row comes out: kept candidates with reason null."""

    def __init__(self, cfg: Config, files: list[tuple[str, str]], gate):
        from distill.teacher import load_tokenizer

        self.cfg, self.files, self.gate = cfg.corpus, files, gate
        self.tokenizer = load_tokenizer(cfg.teacher)

    def __call__(self, batch: pa.Table) -> pa.Table:
        cc = self.cfg
        out: dict[str, list] = {name: [] for name in ["pos", "reason", "quarantine", "id", "text", "split",
                                                      *cc.label_fields, "text_key"]}
        candidates = []
        for pos, raw, bad in zip(*(batch.column(c).to_pylist() for c in ("pos", "raw", "bad"))):
            raw = raw.decode("utf-8", "surrogateescape")
            if bad is not None:
                row = _Bad(bad, raw)
            else:
                try:
                    row = json.loads(raw)
                except json.JSONDecodeError:
                    row = None
                if not isinstance(row, dict):
                    row = _Bad("malformed_json", raw.rstrip("\r\n"))
            verdict = screen(row, cc)
            if isinstance(verdict, _Bad):
                uri = self.files[pos >> _LINE_BITS][0]
                line = quarantine_line(uri, pos & ((1 << _LINE_BITS) - 1), verdict)
                self._append(out, pos, verdict.reason, line, None)
            elif isinstance(verdict, str):
                self._append(out, pos, verdict, None, None)
            else:
                candidates.append((len(out["pos"]), verdict))
                self._append(out, pos, None, None, verdict)
        # the fast tokenizer's own batch encoder: the same ids as tokenizer(...), without building Python lists
        encodings = (self.tokenizer.backend_tokenizer.encode_batch([v[1] for _, v in candidates],
                                                                  add_special_tokens=False) if candidates else [])
        for (i, (row_id, text, _)), encoding in zip(candidates, encodings, strict=True):
            reason = length_reason(len(encoding.ids), cc)
            if reason is not None:
                out["reason"][i] = reason
            else:
                out["split"][i] = split_for(row_id, cc.split_salt, cc.eval_fraction)
                out["text_key"][i] = hashlib.blake2b(text.encode(), digest_size=16).digest()
        self.gate.screened.remote(batch.num_rows)  # no wait: the readers may go on
        types = {"pos": pa.int64(), "text_key": pa.binary(16)}
        return pa.table({name: pa.array(values, types.get(name, pa.string())) for name, values in out.items()})

    def _append(self, out: dict, pos: int, reason, quarantine, comment) -> None:
        row_id, text, labels = comment if comment is not None else (None, None, [None] * len(self.cfg.label_fields))
        for name, value in zip(out, [pos, reason, quarantine, row_id, text, None, *labels, None]):
            out[name].append(value)
