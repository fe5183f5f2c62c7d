"""Corpus reading: every format, every filter and quarantine reason, the stable split, S3."""

import collections
import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from distill import storage
from distill.config import EMBEDDED_CORPUS, EMBEDDED_TRAIN_CORPUS, CorpusConfig
from distill.corpus import TOKEN_BATCH, CorpusError, read_corpus, split_for


def words(texts):
    """Token counter for tests: whitespace words."""
    return [len(t.split()) for t in texts]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def read(path, **cfg):
    return read_corpus(CorpusConfig(paths=[str(p) for p in (path if isinstance(path, list) else [path])], **cfg), words)


def column(table, name):
    return table.column(name).to_pylist()


# --- formats ------------------------------------------------------------------------

PUSHSHIFT = [
    {"id": "c1", "body": "first comment with enough words", "subreddit": "aww", "score": 3},
    {"id": "c2", "body": "second comment, also long enough", "subreddit": "pics"},
    {"id": 3, "body": "a numeric id becomes a string"},
]


def test_ndjson_pushshift_fields(tmp_path):
    table, stats = read(write_jsonl(tmp_path / "RC.ndjson", PUSHSHIFT), text_field="body", label_fields=["subreddit"])
    assert table.column_names == ["id", "text", "split", "subreddit"]
    assert column(table, "id") == ["c1", "c2", "3"]
    assert column(table, "text") == [r["body"] for r in PUSHSHIFT]
    assert column(table, "subreddit") == ["aww", "pics", ""]  # a missing label field is ""
    assert set(column(table, "split")) <= {"train", "eval"}
    assert table.schema.metadata == {b"distill.corpus_version": b"1"}
    assert (stats.read, stats.kept, sum(stats.dropped.values()), sum(stats.quarantined.values())) == (3, 3, 0, 0)


@pytest.mark.parametrize("name", ["comments.ndjson.zst", "RC_2019-01.zst"])
def test_zstd_ndjson_with_a_long_window_and_several_frames(tmp_path, name):
    # Pushshift dumps are compressed with --long=31, which a default decompressor refuses.
    params = zstandard.ZstdCompressionParameters.from_level(3, window_log=31)
    data = io.BytesIO()
    for rows in (PUSHSHIFT[:1], PUSHSHIFT[1:]):  # concatenated frames (pzstd, cat a.zst b.zst) read as one
        with zstandard.ZstdCompressor(compression_params=params).stream_writer(data, closefd=False) as writer:
            writer.write("".join(json.dumps(r) + "\n" for r in rows).encode())
    (tmp_path / name).write_bytes(data.getvalue())
    table, _ = read(tmp_path / name, text_field="body")
    assert column(table, "text") == [r["body"] for r in PUSHSHIFT]


def test_corrupt_zstd_file_is_one_line_error(tmp_path):
    (tmp_path / "bad.jsonl.zst").write_bytes(b"this is not zstandard data at all")
    with pytest.raises(CorpusError, match="bad.jsonl.zst: cannot read") as e:
        read(tmp_path / "bad.jsonl.zst")
    assert "\n" not in str(e.value)


def test_jsonl_labels_of_any_type_become_strings(tmp_path):
    rows = [{"id": "a", "text": "one two three", "labels": [1, 2]}, {"id": "b", "text": "four five six", "labels": 7}]
    table, _ = read(write_jsonl(tmp_path / "x.jsonl", rows))
    assert column(table, "labels") == ["[1, 2]", "7"]


def test_csv_with_header_quoted_commas_and_newlines(tmp_path):
    (tmp_path / "x.csv").write_text(
        'id,text,labels\n'
        'a,"commas, inside, quotes",1\n'
        'b,"a ""quoted"" word here",2\n'
        'c,"two\nlines of text",3\n'
        'd,only two columns\n',
        encoding="utf-8")
    quarantine = tmp_path / "q.jsonl"
    table, stats = read_corpus(CorpusConfig(paths=[str(tmp_path / "x.csv")], columns=None), words, str(quarantine))
    assert column(table, "text") == ["commas, inside, quotes", 'a "quoted" word here', "two lines of text"]
    assert column(table, "labels") == ["1", "2", "3"]
    assert stats.quarantined == {"bad_columns": 1}
    [bad] = [json.loads(line) for line in quarantine.read_text().splitlines()]
    assert bad["line"] == 6  # the record of id c spans lines 4 and 5


def test_csv_unclosed_quote_is_quarantined_and_reading_goes_on(tmp_path):
    filler = "".join(f"f{i},{'word ' * 20}\n" for i in range(1500))  # > csv's 131,072-char field limit
    (tmp_path / "x.csv").write_text('id,text\na,"never closed\n' + filler + "z,the last row is read\n")
    table, stats = read(tmp_path / "x.csv", columns=None, label_fields=[])
    assert stats.quarantined == {"malformed_csv": 1}
    assert column(table, "id")[-1] == "z"


def test_tsv_goemotions_style_keeps_doubled_quotes_byte_for_byte(tmp_path):
    lines = ['"""Quoted"" at the start, like GoEmotions"\t2\tq1',
             'he said ""no way"" twice\t1,3\tq2',
             'an ordinary [NAME] comment here\t3\tq3']
    (tmp_path / "g.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    table, _ = read(tmp_path / "g.tsv")
    assert column(table, "text") == [line.split("\t")[0] for line in lines]
    assert column(table, "labels") == ["2", "1,3", "3"]
    assert column(table, "id") == ["q1", "q2", "q3"]


def test_parquet(tmp_path):
    pq.write_table(pa.table({"id": ["p1", "p2"], "body": ["parquet comment number one", "and number two here"],
                             "score": [5, None], "unused": [1.0, 2.0]}), tmp_path / "x.parquet")
    table, _ = read(tmp_path / "x.parquet", text_field="body", label_fields=["score"])
    assert column(table, "text") == ["parquet comment number one", "and number two here"]
    assert column(table, "score") == ["5", ""]


def test_directory_expands_to_sorted_corpus_files(tmp_path):
    (tmp_path / "sub").mkdir()
    write_jsonl(tmp_path / "sub" / "c.ndjson", [{"id": "c", "text": "from the subdirectory file"}])
    write_jsonl(tmp_path / "b.jsonl", [{"id": "b", "text": "from the jsonl file here"}])
    (tmp_path / "a.tsv").write_text("from the tsv file here\t0\ta\n")
    (tmp_path / "notes.txt").write_text("not a corpus file\n")
    table, _ = read(tmp_path)
    assert column(table, "id") == ["a", "b", "c"]


# --- filters ------------------------------------------------------------------------

def test_every_drop_reason_is_counted(tmp_path):
    texts = {
        "keep": ["[NAME] is my best friend forever", "[RELIGION] people are fine too",
                 "her/him and/or them, all fine", "I <3 you so much", "  line one\n\nline two\tend  "],
        "empty": ["", "   \n\t "],
        "deleted": ["[deleted]", " [removed] "],
        "url": ["see https://example.com now please", "www.example.org has it all", "go to r/aww for cuteness",
                "thanks /u/someone for the gold", "HTTP://SHOUTING.COM is a site"],
        "special_tag": ["<start_of_turn>user hello there friend", "words then <eos> and more", "<b>bold</b> is html"],
        "markup": ["[click here](/wiki/page) for more", "line<br/>break in html here", "this &amp; that and more",
                   "&gt; quoted with an entity", "use `code` in here please", "> a reddit quote line here",
                   "first line is fine\n> but the second quotes"],
        "too_short": ["hi there"],
        "too_long": [" ".join(["word"] * 26)],
    }
    rows = [{"id": f"{reason}{i}", "text": t} for reason, group in texts.items() for i, t in enumerate(group)]
    rows += [{"id": "dup-text", "text": "  [NAME] is my best friend forever\n"},  # same text after stripping
             {"id": "dup-lines", "text": "line one line two end"},  # same text after collapsing line breaks
             {"id": "keep0", "text": "a different text with a repeated id"}]
    counted = []
    table, stats = read_corpus(CorpusConfig(paths=[str(write_jsonl(tmp_path / "x.jsonl", rows))]),
                               lambda batch: counted.extend(batch) or words(batch))
    assert column(table, "id") == [f"keep{i}" for i in range(5)]
    assert column(table, "text")[-1] == "line one line two end"  # stripped, line breaks and tabs collapsed
    expected = {reason: len(group) for reason, group in texts.items() if reason != "keep"}
    assert stats.dropped == collections.Counter(expected, duplicate=2, duplicate_id=1)
    assert stats.read == len(rows) and stats.quarantined == {}
    # Only texts that passed the cheap filters had their tokens counted.
    assert len(counted) == 5 + 3 + 1 + 1  # kept, duplicates, too_short, too_long
    summary = stats.summary()
    assert summary.startswith(f"read {len(rows)} rows, kept 5 (train ")
    assert "url 5" in summary and "quarantined: none" in summary


def test_limit_stops_reading_at_the_limit():
    calls = []
    table, stats = read_corpus(CorpusConfig(limit=100), lambda batch: calls.append(len(batch)) or words(batch))
    assert table.num_rows == stats.kept == 100 and stats.limit_reached
    assert stats.read < 200 and stats.read == stats.kept + sum(stats.dropped.values())
    assert max(calls) <= 100 and "stopped at corpus.limit" in stats.summary()


def test_skip_takes_the_kept_comments_after_the_first_n():
    whole, _ = read_corpus(CorpusConfig(limit=100), words)
    calls = []
    tail, stats = read_corpus(CorpusConfig(skip=60, limit=40), lambda batch: calls.append(len(batch)) or words(batch))
    assert column(tail, "id") == column(whole, "id")[60:100]
    assert stats.dropped["skipped"] == 60 and stats.kept == 40 and stats.limit_reached
    assert stats.read == stats.kept + sum(stats.dropped.values()) and max(calls) <= 100


def test_skipped_comments_still_count_for_dedupe(tmp_path):
    rows = [{"id": f"c{i}", "text": f"comment number {i} here"} for i in range(6)]
    rows.insert(3, {"id": "d", "text": "comment number 1 here"})  # the same text as a skipped comment
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    whole, _ = read(path)
    tail, stats = read(path, skip=2, limit=3)
    assert column(tail, "id") == column(whole, "id")[2:5] == ["c2", "c3", "c4"]
    assert stats.dropped == {"skipped": 2, "duplicate": 1}


# --- quarantine ---------------------------------------------------------------------

def test_every_quarantine_reason_is_counted_and_written(tmp_path):
    jsonl = tmp_path / "x.jsonl"
    jsonl.write_bytes(b"\n".join([
        b'{"id": "ok1", "text": "a good comment before the bad ones"}',
        b'{"id": "bad", "text": ',  # line 2: cut off
        b'[1, 2, 3]',  # line 3: JSON, but not an object
        b'',  # blank lines are skipped, not counted
        b'{"id": "enc", "text": "caf\xe9 in latin-1, not UTF-8"}',  # line 5
        b'{"id": "notext"}',  # line 6
        b'{"id": "numtext", "text": 42}',  # line 7
        b'{"text": "a comment without any id"}',  # line 8
        b'{"id": "ok2", "text": "a good comment after the bad ones"}',
    ]) + b"\n")
    tsv = tmp_path / "y.tsv"
    tsv.write_bytes(b"a good tsv comment here\t1\tok3\nonly\ttwo\nbad \xff\xfe byte here\t1\tenc2\n")
    quarantine = tmp_path / "out" / "quarantine.jsonl"
    table, stats = read_corpus(CorpusConfig(paths=[str(jsonl), str(tsv)]), words, str(quarantine))

    assert column(table, "id") == ["ok1", "ok2", "ok3"]
    assert stats.quarantined == {"malformed_json": 2, "bad_encoding": 2, "no_text": 2, "no_id": 1, "bad_columns": 1}
    assert stats.read == 3 + 8
    records = [json.loads(line) for line in quarantine.read_text(encoding="utf-8").splitlines()]
    assert [(Path(r["file"]).name, r["line"], r["reason"]) for r in records] == [
        ("x.jsonl", 2, "malformed_json"), ("x.jsonl", 3, "malformed_json"), ("x.jsonl", 5, "bad_encoding"),
        ("x.jsonl", 6, "no_text"), ("x.jsonl", 7, "no_text"), ("x.jsonl", 8, "no_id"),
        ("y.tsv", 2, "bad_columns"), ("y.tsv", 3, "bad_encoding")]
    assert records[0]["excerpt"] == '{"id": "bad", "text": '
    assert "caf\ufffd in latin-1" in records[2]["excerpt"]  # the bad byte shows as a replacement character
    assert all(len(r["excerpt"]) <= 200 for r in records)
    assert f"(see {quarantine})" in stats.summary()


def test_nothing_kept_is_an_error_and_the_quarantine_is_still_written(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", ["not json", {"id": "a", "text": "[deleted]"}])
    quarantine = tmp_path / "q.jsonl"
    with pytest.raises(CorpusError, match=r"no comments kept from .*x\.jsonl.*malformed_json 1") as e:
        read_corpus(CorpusConfig(paths=[str(path)]), words, str(quarantine))
    assert "\n" not in str(e.value)
    assert json.loads(quarantine.read_text())["reason"] == "malformed_json"


def test_missing_file_is_one_line_naming_the_path(tmp_path):
    missing = tmp_path / "nope.ndjson"
    with pytest.raises(CorpusError) as e:
        read(missing)
    assert str(e.value) == f"corpus file not found: {missing}"


@pytest.mark.parametrize("setup, words_in_error", [
    (lambda d: (d / "x.txt").write_text("hello\n"), ["x.txt", "unknown corpus format"]),
    (lambda d: (d / "x.csv").write_text("id,comment\na,some words here\n"), ["x.csv", "no column 'text'", "comment"]),
])
def test_configuration_mistakes_are_one_line(tmp_path, setup, words_in_error):
    setup(tmp_path)
    with pytest.raises(CorpusError) as e:
        read(next(tmp_path.iterdir()), columns=None)
    assert "\n" not in str(e.value) and all(w in str(e.value) for w in words_in_error)


# --- split and the vendored sample --------------------------------------------------

def test_split_is_stable_and_independent_of_row_order(tmp_path):
    rows = [{"id": f"id{i}", "text": f"comment number {i} is here"} for i in range(300)]
    forward, _ = read(write_jsonl(tmp_path / "a.jsonl", rows), eval_fraction=0.3)
    backward, _ = read(write_jsonl(tmp_path / "b.jsonl", rows[::-1]), eval_fraction=0.3)
    assert dict(zip(column(forward, "id"), column(forward, "split"))) == \
        dict(zip(column(backward, "id"), column(backward, "split")))
    assert split_for("edgurhb", "distill-v1", 0.1) == split_for("edgurhb", "distill-v1", 0.1)
    resalted, _ = read(tmp_path / "a.jsonl", eval_fraction=0.3, split_salt="other")
    assert column(resalted, "split") != column(forward, "split")


def test_vendored_sample_reads_with_the_default_config():
    calls = []
    table, stats = read_corpus(CorpusConfig(), lambda batch: calls.append(len(batch)) or words(batch))
    assert stats.read == 5426 and stats.kept > 4000 and stats.quarantined == {}
    assert 0.07 < stats.kept_eval / stats.kept < 0.13
    assert column(table, "split").count("eval") == stats.kept_eval
    # Tokens are counted in batches, only for texts that passed the cheap filters.
    after_counting = ["too_short", "too_long", "duplicate", "duplicate_id"]
    assert calls[0] == TOKEN_BATCH and max(calls) == TOKEN_BATCH
    assert sum(calls) == stats.kept + sum(stats.dropped[r] for r in after_counting)
    assert set(column(table, "labels")) >= {"0", "1", "2", "3"}
    # Rows with GoEmotions' doubled quotes keep them exactly as in the file.
    raw = {line.split("\t")[2].rstrip("\n"): line.split("\t")[0]
           for line in Path(EMBEDDED_CORPUS).read_text(encoding="utf-8").splitlines(keepends=True)}
    quoted = [(i, t) for i, t in zip(column(table, "id"), column(table, "text")) if '""' in t]
    assert len(quoted) > 50 and all(raw[i].strip() == t for i, t in quoted)


def test_vendored_train_split_reads_and_its_tail_is_disjoint():
    """The shipped train split (zstd TSV) reads like the dev sample; skip + limit give a disjoint tail."""
    head, stats = read_corpus(CorpusConfig(paths=[EMBEDDED_TRAIN_CORPUS], limit=300), words)
    assert stats.kept == 300 and stats.quarantined == {}
    assert set(column(head, "labels")) >= {"1", "2", "3"}
    tail, tail_stats = read_corpus(CorpusConfig(paths=[EMBEDDED_TRAIN_CORPUS], skip=300, limit=100), words)
    assert tail_stats.dropped["skipped"] == 300 and tail.num_rows == 100
    assert not set(column(head, "id")) & set(column(tail, "id"))
    assert not set(column(head, "text")) & set(column(tail, "text"))


def test_vendored_sample_ships_with_its_notice():
    folder = Path(EMBEDDED_CORPUS).parent
    assert (folder / "group_labels.txt").read_text().split() == ["ambiguous", "negative", "neutral", "positive"]
    notice = (folder / "NOTICE.md").read_text()
    assert all(s in notice for s in ["GoEmotions", "arXiv:2005.00547", "Apache", "b75f9d3a8b76", "profanity"])
    assert Path(EMBEDDED_TRAIN_CORPUS).name in notice


# --- S3 -----------------------------------------------------------------------------

@pytest.mark.s3
def test_reads_ndjson_and_parquet_from_s3(s3_bucket):
    storage.write_bytes(f"{s3_bucket}/corpus/a.ndjson", "".join(json.dumps(r) + "\n" for r in PUSHSHIFT).encode())
    buffer = io.BytesIO()
    pq.write_table(pa.table({"id": ["p1"], "body": ["a parquet comment on s3"]}), buffer)
    storage.write_bytes(f"{s3_bucket}/corpus/b.parquet", buffer.getvalue())
    storage.write_bytes(f"{s3_bucket}/corpus/c.ndjson", b'{"id": "x"}\n{"id": "y", "body": "one more good comment"}\n')

    quarantine = f"{s3_bucket}/runs/quarantine.jsonl"
    cfg = CorpusConfig(paths=[f"{s3_bucket}/corpus"], text_field="body", label_fields=[])
    table, stats = read_corpus(cfg, words, quarantine)
    assert column(table, "id") == ["c1", "c2", "3", "p1", "y"]
    record = json.loads(storage.read_bytes(quarantine))
    assert record == {"file": f"{s3_bucket}/corpus/c.ndjson", "line": 1, "reason": "no_text", "excerpt": '{"id": "x"}'}

    single, _ = read_corpus(CorpusConfig(paths=[f"{s3_bucket}/corpus/b.parquet"], text_field="body"), words)
    assert column(single, "text") == ["a parquet comment on s3"]
    with pytest.raises(CorpusError, match="corpus file not found: s3://distill-test/corpus/missing.ndjson"):
        read_corpus(CorpusConfig(paths=[f"{s3_bucket}/corpus/missing.ndjson"]), words)
