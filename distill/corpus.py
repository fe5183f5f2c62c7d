"""Read Reddit comments into the corpus table: filter, dedupe, split.

    table, stats = read_corpus(cfg.corpus, count_tokens=teacher_token_counts)
    print(stats.summary())

Input: files or directories (expanded to their sorted corpus files), local or s3://.
The format comes from the extension unless `corpus.format` names one; a `.zst`
suffix means zstandard-compressed:

    .ndjson .jsonl .json   one JSON object per line (Pushshift / Arctic-Shift dumps, where
                           the comment is `body`); a bare `RC_2019-01.zst` is one too
    .csv                   quote-aware CSV
    .tsv                   tab-separated, split on tabs only (GoEmotions keeps `""` verbatim)
    .parquet

CSV/TSV files take their column names from `corpus.columns`, or from a header row
when that is null.

Every row read lands in exactly one place, and the first reason that applies wins:

    quarantined  bad input, counted and written as one JSON line to the quarantine file:
                 malformed_json, malformed_csv, bad_columns, no_text, no_id, bad_encoding
    dropped      filtered out on purpose, counted: empty, deleted, url, special_tag,
                 markup, then (after counting teacher tokens) too_short, too_long,
                 duplicate (same text as an earlier row that passed the filters above),
                 duplicate_id (same id as an earlier row kept, of another text),
                 skipped (the first `corpus.skip` rows that would be kept; later rows are
                 still deduplicated against them)
    kept         a row of the returned table, until `corpus.limit` rows are kept

Corpus table, version CORPUS_VERSION (also in the schema metadata): `id`, `text`,
`split` ("train" | "eval"), then one string column per `corpus.label_fields`
("" where missing), all strings, in corpus order. The split depends only on the id
and `corpus.split_salt` (see `split_for`), so it is the same on every run and machine.
"""

from __future__ import annotations

import collections
import csv
import hashlib
import io
import json
import posixpath
import re
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, NamedTuple, Optional, Union

import pyarrow as pa
import pyarrow.parquet as pq
import zstandard

from distill import storage
from distill.config import CorpusConfig

CORPUS_VERSION = 1
TOKEN_BATCH = 4096
"""Texts per call of `count_tokens`."""
EXCERPT_CHARS = 200

_FORMATS = {".ndjson": "jsonl", ".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".tsv": "tsv",
            ".parquet": "parquet"}
_KNOWN_EXTENSIONS = ".ndjson, .jsonl, .json (optionally .zst), .csv, .tsv or .parquet"
_ZSTD_MAX_WINDOW = 2**31  # Pushshift dumps are compressed with a long window

_DELETED = {"[deleted]", "[removed]"}
_FILTERS = [
    ("url", re.compile(r"(?i:https?://|www\.)|(?<![\w/])/?[ru]/\w")),  # links, r/sub, /u/user
    ("special_tag", re.compile(r"</?[A-Za-z_]+>")),  # <start_of_turn>, <bos>, <eos>, <pad>, also bare <b>
    ("markup", re.compile("|".join([
        r"\[[^\]\n]*\]\([^)\n]*\)",  # markdown link [text](target); a bare [NAME] is fine
        r"</?[A-Za-z][^<>\n]*>",  # HTML tag, with attributes
        r"&(?:[A-Za-z]+|#\d+|#x[0-9A-Fa-f]+);",  # HTML entity: &gt; &amp; &#39;
        r"`",  # inline code or code fence
        r"^[ \t]*>",  # Reddit quote line
    ]), re.MULTILINE)),
]
_LINE_BREAKS = re.compile(r"\s*[\r\n\t]+\s*")
_SURROGATE = re.compile("[\ud800-\udfff]")  # what undecodable bytes turn into, see _lines


class CorpusError(ValueError):
    """A corpus that cannot be read, or that keeps nothing; one line, naming the file."""


@dataclass
class CorpusStats:
    """What happened to every row read."""

    read: int = 0
    """Rows read from all files (kept + dropped + quarantined)."""
    kept: int = 0
    kept_eval: int = 0
    """Kept rows in the eval split; the rest are train."""
    dropped: collections.Counter = field(default_factory=collections.Counter)
    """Reason -> rows filtered out on purpose."""
    quarantined: collections.Counter = field(default_factory=collections.Counter)
    """Reason -> bad input rows, each also written to the quarantine file."""
    quarantine_uri: Optional[str] = None
    limit_reached: bool = False
    """Reading stopped early because `corpus.limit` rows were kept."""

    def summary(self) -> str:
        read = f"read {self.read:,} rows"
        if self.limit_reached:
            read += " (stopped at corpus.limit)"
        quarantined = "quarantined: " + _counts(self.quarantined)
        if self.quarantined and self.quarantine_uri:
            quarantined += f" (see {self.quarantine_uri})"
        return "\n".join([
            f"{read}, kept {self.kept:,} (train {self.kept - self.kept_eval:,} / eval {self.kept_eval:,})",
            "dropped: " + _counts(self.dropped),
            quarantined,
        ])


def _counts(counter: collections.Counter) -> str:
    return ", ".join(f"{reason} {n:,}" for reason, n in counter.most_common()) or "none"


def split_for(row_id: str, salt: str, eval_fraction: float) -> str:
    """The split of a comment id, "eval" or "train": a hash, so stable across runs, machines and row order."""
    digest = hashlib.sha256(f"{salt}:{row_id}".encode()).hexdigest()
    return "eval" if int(digest[:16], 16) / 2**64 < eval_fraction else "train"


def read_corpus(cfg: CorpusConfig, count_tokens: Callable[[list[str]], list[int]],
                quarantine_uri: Optional[str] = None) -> tuple[pa.Table, CorpusStats]:
    """The filtered, deduplicated, split corpus table and what happened to every row read.

    `count_tokens` maps a list of texts to their teacher-token counts; it is called in
    batches, only for texts that passed the cheap filters. Bad input rows are written to
    `quarantine_uri` (JSON lines: file, line, reason, excerpt) when it is given.
    """
    clash = {"id", "text", "split"} & set(cfg.label_fields)
    if clash:
        raise CorpusError(f"corpus.label_fields may not contain {', '.join(sorted(clash))}: "
                          "those names are corpus columns")
    files = corpus_files(cfg)
    builder = _CorpusBuilder(cfg, count_tokens)
    for file, line, item in read_rows(files, cfg):
        builder.add(file, line, item)
        if builder.full:
            builder.stats.limit_reached = True
            break
    builder.flush()

    stats = builder.stats
    stats.quarantine_uri = quarantine_uri
    if quarantine_uri is not None:
        storage.write_bytes(quarantine_uri, "".join(builder.quarantine).encode())
    if stats.kept == 0:
        one_line = stats.summary().replace("\n", "; ")
        raise CorpusError(f"no comments kept from {', '.join(cfg.paths)}: {one_line}")
    return builder.table(), stats


# --- Which files, in which format ---------------------------------------------------

def corpus_files(cfg: CorpusConfig) -> list[tuple[str, str]]:
    """(uri, format) of every corpus file, in the configured order."""
    files = []
    for path in cfg.paths:
        for uri in _expand(path):
            fmt = cfg.format if cfg.format != "auto" else _format_from_name(uri)
            if fmt is None:
                raise CorpusError(f"{uri}: unknown corpus format, expected {_KNOWN_EXTENSIONS}; "
                                  "or set corpus.format")
            files.append((uri, fmt))
    return files


def _expand(path: str) -> list[str]:
    """A file as itself; a directory or prefix as its corpus files (recursively, sorted)."""
    try:
        fs, inner = storage.filesystem(path)
        is_file, is_dir = fs.isfile(inner), fs.isdir(inner)
        names = sorted(fs.find(inner)) if is_dir else []
    except (OSError, ValueError) as e:  # StorageError is an OSError
        raise CorpusError(f"cannot read corpus path {path}: {_first_line(e)}") from None
    if is_file:
        return [path]
    if not is_dir:
        raise CorpusError(f"corpus file not found: {path}")
    found = [fs.unstrip_protocol(n) if storage.is_remote(path) else n for n in names if _format_from_name(n)]
    if not found:
        raise CorpusError(f"{path}: no corpus files in this directory (expected {_KNOWN_EXTENSIONS})")
    return found


def _format_from_name(name: str) -> Optional[str]:
    name = name.lower()
    _, ext = posixpath.splitext(name.removesuffix(".zst"))
    if name.endswith(".zst") and ext == "":
        return "jsonl"  # Pushshift / Arctic-Shift dump: RC_2019-01.zst
    return _FORMATS.get(ext)


# --- Reading rows -------------------------------------------------------------------

class _Bad(NamedTuple):
    """A bad input row: why, and what it looked like."""
    reason: str
    excerpt: str


_Row = Union[dict, _Bad]  # a row's fields, or why it is bad input


def read_rows(files: list[tuple[str, str]], cfg: CorpusConfig,
          parse_json: bool = True) -> Iterator[tuple[str, int, Union[_Row, str]]]:
    """(file, 1-based line or row number, fields or _Bad) of every row of every file, streaming.
    With parse_json=False a JSON line comes as its text, for the caller to parse."""
    for uri, fmt in files:
        try:
            with storage.open_file(uri) as raw:
                if fmt == "parquet":
                    rows = _parquet_rows(raw, uri, cfg)
                else:
                    if uri.lower().endswith(".zst"):
                        raw = zstandard.ZstdDecompressor(max_window_size=_ZSTD_MAX_WINDOW).stream_reader(
                            raw, read_across_frames=True)
                    # fsspec's own line reading rereads a whole block per line; buffer it ourselves.
                    lines = _lines(io.BufferedReader(raw))
                    rows = (_json_rows(lines, parse_json) if fmt == "jsonl"
                            else _delimited_rows(lines, fmt, uri, cfg))
                for number, row in rows:
                    yield uri, number, row
        except CorpusError:
            raise
        except (OSError, ValueError, zstandard.ZstdError) as e:  # pyarrow's errors are among these
            raise CorpusError(f"{uri}: cannot read ({_first_line(e)})") from None


def _lines(stream: Iterable[bytes]) -> Iterator[str]:
    """The text lines of a binary stream, decoded one by one.

    Undecodable bytes become lone surrogates (Python's "surrogateescape"), so the row
    holding them is quarantined as bad_encoding and the rest of the file still reads.
    """
    for number, raw in enumerate(stream):
        yield raw.decode("utf-8-sig" if number == 0 else "utf-8", "surrogateescape")


def _json_rows(lines: Iterator[str], parse: bool = True) -> Iterator[tuple[int, Union[_Row, str]]]:
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if not parse:
            yield number, line
            continue
        try:
            fields = json.loads(line)
        except json.JSONDecodeError:
            fields = None
        yield number, fields if isinstance(fields, dict) else _Bad("malformed_json", line.rstrip("\r\n"))


def _delimited_rows(lines: Iterator[str], fmt: str, uri: str, cfg: CorpusConfig) -> Iterator[tuple[int, _Row]]:
    if fmt == "tsv":  # tabs only: quotes are ordinary characters
        delimiter, reader = "\t", csv.reader(lines, delimiter="\t", quoting=csv.QUOTE_NONE)
    else:
        delimiter, reader = ",", csv.reader(lines)
    columns = cfg.columns if cfg.columns is not None else next(reader, [])
    _require_columns(uri, columns, cfg)
    while True:
        number = reader.line_num + 1  # a quoted field may span lines: report the first
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:  # e.g. an unclosed quote that swallowed the lines after it
            yield number, _Bad("malformed_csv", str(e))
            continue
        if not row:
            continue  # blank line
        if len(row) != len(columns):
            yield number, _Bad("bad_columns", f"{len(row)} columns, expected {len(columns)}: {delimiter.join(row)}")
        else:
            yield number, dict(zip(columns, row))


def _parquet_rows(raw, uri: str, cfg: CorpusConfig) -> Iterator[tuple[int, _Row]]:
    parquet = pq.ParquetFile(raw)
    names = parquet.schema_arrow.names
    _require_columns(uri, names, cfg)
    wanted = [name for name in dict.fromkeys([cfg.text_field, cfg.id_field, *cfg.label_fields]) if name in names]
    rows = (row for batch in parquet.iter_batches(columns=wanted) for row in batch.to_pylist())
    yield from enumerate(rows, start=1)


def _require_columns(uri: str, columns: list[str], cfg: CorpusConfig) -> None:
    """A file without the text or id column is a configuration mistake, not bad rows."""
    for setting, name in (("corpus.text_field", cfg.text_field), ("corpus.id_field", cfg.id_field)):
        if name not in columns:
            raise CorpusError(f"{uri}: no column {name!r} (columns: {', '.join(columns) or 'none'}); "
                              f"set {setting}, or corpus.columns for a header-less CSV/TSV")


# --- Keeping, dropping, quarantining ------------------------------------------------

class _CorpusBuilder:
    """Takes rows one by one; keeps, drops or quarantines each; counts tokens in batches."""

    def __init__(self, cfg: CorpusConfig, count_tokens: Callable[[list[str]], list[int]]):
        self.cfg = cfg
        self.count_tokens = count_tokens
        self.stats = CorpusStats()
        self.columns: dict[str, list[str]] = {name: [] for name in ["id", "text", "split", *cfg.label_fields]}
        self.quarantine: list[str] = []  # JSON lines
        self.pending: list[tuple[str, str, list[str]]] = []  # (id, text, labels) waiting for token counts
        self.seen_texts: set[str] = set()  # texts of rows that passed the filters
        self.kept_ids: set[str] = set()  # ids of rows kept (or skipped)

    @property
    def skipped(self) -> int:
        return self.stats.dropped["skipped"]

    @property
    def full(self) -> bool:
        return self.cfg.limit is not None and self.stats.kept >= self.cfg.limit

    def add(self, file: str, line: int, row: _Row) -> None:
        self.stats.read += 1
        verdict = screen(row, self.cfg)
        if isinstance(verdict, _Bad):
            self.stats.quarantined[verdict.reason] += 1
            self.quarantine.append(quarantine_line(file, line, verdict))
            return
        if isinstance(verdict, str):
            self.stats.dropped[verdict] += 1
            return
        self.pending.append(verdict)
        # With a limit, never count more texts than could still be skipped or kept: reading stops right at it.
        remaining = (TOKEN_BATCH if self.cfg.limit is None
                     else self.cfg.skip - self.skipped + self.cfg.limit - self.stats.kept)
        if len(self.pending) >= min(TOKEN_BATCH, remaining):
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        counts = self.count_tokens([text for _, text, _ in self.pending])
        for (row_id, text, labels), n_tokens in zip(self.pending, counts, strict=True):
            reason = length_reason(n_tokens, self.cfg)
            if reason is None and text in self.seen_texts:
                reason = "duplicate"
            elif reason is None:
                self.seen_texts.add(text)
                if row_id in self.kept_ids:
                    reason = "duplicate_id"
            if reason is None:
                self.kept_ids.add(row_id)  # skipped or kept: a run without skip keeps it
                if self.skipped < self.cfg.skip:
                    reason = "skipped"
            if reason is not None:
                self.stats.dropped[reason] += 1
            else:
                self._keep(row_id, text, labels)
        self.pending.clear()

    def _keep(self, row_id: str, text: str, labels: list[str]) -> None:
        split = split_for(row_id, self.cfg.split_salt, self.cfg.eval_fraction)
        for name, value in zip(self.columns, [row_id, text, split, *labels]):
            self.columns[name].append(value)
        self.stats.kept += 1
        self.stats.kept_eval += split == "eval"

    def table(self) -> pa.Table:
        schema = pa.schema([(name, pa.string()) for name in self.columns],
                           metadata={"distill.corpus_version": str(CORPUS_VERSION)})
        return pa.table(self.columns, schema=schema)


def screen(row: _Row, cfg: CorpusConfig) -> Union[_Bad, str, tuple[str, str, list[str]]]:
    """A row before its tokens are counted: bad input (_Bad), a drop reason (str), or (id, text, labels)."""
    comment = row if isinstance(row, _Bad) else _comment(row, cfg)
    if isinstance(comment, _Bad):
        return comment
    row_id, raw_text, labels = comment
    text = _LINE_BREAKS.sub(" ", raw_text.strip())
    return _cheap_drop_reason(raw_text, text) or (row_id, text, labels)


def length_reason(n_tokens: int, cfg: CorpusConfig) -> Optional[str]:
    return "too_short" if n_tokens < cfg.min_tokens else "too_long" if n_tokens > cfg.max_tokens else None


def quarantine_line(file: str, line: int, bad: _Bad) -> str:
    """One JSON line of the quarantine file; undecodable bytes show as \ufffd."""
    excerpt = _SURROGATE.sub("\ufffd", bad.excerpt[:EXCERPT_CHARS])
    return json.dumps({"file": file, "line": line, "reason": bad.reason, "excerpt": excerpt}, ensure_ascii=False) + "\n"


def _comment(fields: dict, cfg: CorpusConfig) -> Union[tuple[str, str, list[str]], _Bad]:
    """(id, text, label strings) of a parsed row, or why it is bad input."""
    text, row_id = fields.get(cfg.text_field), fields.get(cfg.id_field)
    if not isinstance(text, str):
        return _Bad("no_text", _excerpt(fields))
    if row_id is None or str(row_id).strip() == "":
        return _Bad("no_id", _excerpt(fields))
    row_id = str(row_id).strip()
    labels = [_as_string(fields.get(name)) for name in cfg.label_fields]
    if any(_SURROGATE.search(value) for value in [text, row_id, *labels]):
        return _Bad("bad_encoding", _excerpt(fields))
    return row_id, text, labels


def _cheap_drop_reason(raw_text: str, text: str) -> Optional[str]:
    """Why a comment is filtered out before its tokens are counted, or None."""
    if not text:
        return "empty"
    if text in _DELETED:
        return "deleted"
    for reason, pattern in _FILTERS:
        if pattern.search(raw_text):  # the raw text still has its line starts (quote lines)
            return reason
    return None


def _as_string(value) -> str:
    if value is None:
        return ""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _excerpt(fields: dict) -> str:
    return json.dumps(fields, ensure_ascii=False, default=str)[:EXCERPT_CHARS]


def _first_line(error: Exception) -> str:
    return (str(error).splitlines() or [type(error).__name__])[0]
