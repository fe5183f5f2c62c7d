"""The kept corpus: both engines keep the same comments, counts and quarantine; parts, shards, reuse."""

import asyncio
import io
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from conftest import tiny_config
from distill import ingest, records
from distill.config import EMBEDDED_CORPUS
from distill.ingest import CORPUS_DIR, KeptCorpus
from distill.teacher import load_tokenizer, tokenizer_hash


def dev_comments(n):
    """The first n comment texts of the vendored dev split (real Reddit text)."""
    lines = open(EMBEDDED_CORPUS, encoding="utf-8").read().splitlines()
    return [line.split("\t")[0] for line in lines[:n]]


def write_corpus(folder):
    """Three files, two formats and a Pushshift dump, with repeats across blocks and files and bad rows."""
    texts = dev_comments(260)
    dump = []
    for i, text in enumerate(texts[:200]):
        dump.append(json.dumps({"id": f"a{i}", "body": text, "subreddit": f"s{i % 3}", "score": i}))
        if i % 17 == 5:
            dump.append(json.dumps({"id": f"r{i}", "body": texts[i // 2], "subreddit": "again"}))  # same text later
        if i % 23 == 7:
            dump.append(json.dumps({"id": f"a{i // 3}", "body": f"another text under an old id {i} here"}))
        if i % 31 == 3:
            dump += ["{not json", "[1, 2]", json.dumps({"id": f"n{i}"}), json.dumps({"body": "no id at all here"}),
                     json.dumps({"id": f"d{i}", "body": "[deleted]"}), "",
                     json.dumps({"id": f"u{i}", "body": "see https://example.com for more"})]
    data = ("\n".join(dump) + "\n").encode() + b'{"id": "bad", "body": "caf\xe9 latte is great today"}\n'
    (folder / "RC_2020-01.zst").write_bytes(zstandard.ZstdCompressor().compress(data))
    rows = [(texts[200 + i], f"b{i}", "x") for i in range(40)] + [(texts[i], f"b{40 + i}", "x") for i in range(0, 60, 7)]
    with open(folder / "b.csv", "w", encoding="utf-8", newline="") as f:
        f.write("body,id,subreddit\n" + "".join(f'"{t.replace(chr(34), chr(34) * 2)}",{i},{s}\n' for t, i, s in rows))
    table = pa.table({"id": [f"c{i}" for i in range(30)], "body": texts[230:260],
                      "subreddit": ["p"] * 30})
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    (folder / "c.parquet").write_bytes(buffer.getvalue())


def build(cfg):
    tokenizer = load_tokenizer(cfg.teacher)

    def count_tokens(texts):
        return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]

    return ingest.ingest(cfg, count_tokens, tokenizer_hash(tokenizer))


def test_ray_engine_keeps_what_the_driver_keeps(tiny_teacher_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(ingest, "BLOCK_ROWS", 37)  # many blocks per file: repeats fall in other blocks
    monkeypatch.setattr(ingest, "TOKEN_BATCH", 37)  # and a read-ahead of 4 x 37 rows per CPU: the readers wait
    monkeypatch.setattr(ingest, "PART_ROWS", 40)
    (tmp_path / "corpus").mkdir()
    write_corpus(tmp_path / "corpus")
    common = [f"corpus.paths=[{tmp_path / 'corpus'}]", "corpus.text_field=body", "corpus.label_fields=[subreddit]",
              "corpus.columns=null", "records.shard_size=16",
              "corpus.skip=40", "corpus.limit=160"]  # 200 of the 207 the corpus keeps: the cut falls in c.parquet
    kept = {}
    for engine in ("local", "ray"):
        cfg = tiny_config(tiny_teacher_dir, str(tmp_path / engine), f"corpus.engine={engine}", *common)
        kept[engine] = build(cfg)
    local, ray = kept["local"], kept["ray"]
    assert ray.index["engine"] == "ray" and local.index["engine"] == "local"

    stats = local.index["stats"]
    assert stats["dropped"]["duplicate"] > 0 and stats["dropped"]["duplicate_id"] > 0
    assert set(stats["quarantined"]) == {"malformed_json", "no_text", "no_id", "bad_encoding"}
    assert {k: v for k, v in ray.index["stats"].items() if k != "quarantine_uri"} == \
        {k: v for k, v in stats.items() if k != "quarantine_uri"}
    both = [pa.concat_tables(c.tables()) for c in (local, ray)]
    assert both[0].equals(both[1]) and both[0].num_rows == local.rows > 0
    assert ray.index["shard_ids_sha256"] == local.index["shard_ids_sha256"]
    assert [p["rows"] for p in ray.index["parts"]] == [p["rows"] for p in local.index["parts"]]
    assert all(p["rows"] == 32 for p in local.index["parts"][:-1])  # whole shards of 16 per part
    quarantine = [(tmp_path / engine / "quarantine.jsonl").read_text() for engine in ("local", "ray")]
    assert quarantine[0] == quarantine[1] and quarantine[0].count("\n") == sum(stats["quarantined"].values())

    ids = both[0].column("id").to_pylist()
    assert len(ids) == len(set(ids)) and len(set(both[0].column("text").to_pylist())) == len(ids)
    assert stats["dropped"]["skipped"] == 40 and local.rows == 160 and stats["limit_reached"]


def test_kept_corpus_shards_and_reuse(tiny_teacher_dir, tmp_path):
    cfg = tiny_config(tiny_teacher_dir, str(tmp_path / "records"), "corpus.limit=40", "records.shard_size=16")
    kept = build(cfg)
    whole = kept.head(40)
    assert kept.rows == 40 and kept.n_shards == 3 and [kept.shard_rows(k) for k in range(3)] == [16, 16, 8]
    assert pa.concat_tables([kept.shard(k) for k in range(3)]).equals(whole)
    assert kept.head(5).equals(whole.slice(0, 5))

    (tmp_path / "records" / CORPUS_DIR / "part-00000.parquet").write_bytes(b"not read again")
    again = build(cfg)  # a finished corpus is reused, not read again
    assert again.index == kept.index and isinstance(again, KeptCorpus)
    other = tiny_config(tiny_teacher_dir, cfg.records.uri, "corpus.limit=40", "records.shard_size=16",
                        "corpus.min_tokens=5")
    with pytest.raises(records.RecordsError, match="another corpus.min_tokens"):
        build(other)


def test_auto_engine_reads_in_the_driver_when_it_can_stop_early(tiny_teacher_dir, tmp_path):
    def engine(*overrides):
        return ingest.pick_engine(tiny_config(tiny_teacher_dir, str(tmp_path), *overrides))

    assert engine("corpus.limit=null") == "local"  # the vendored sample: 0.4 MB
    assert engine("corpus.limit=null", "corpus.ray_above_mb=0") == "ray"
    assert engine("corpus.limit=5000", "corpus.ray_above_mb=0") == "local"  # the driver stops at the limit
    assert engine("corpus.limit=999999", "corpus.skip=2", "corpus.ray_above_mb=0") == "ray"
    assert engine("corpus.engine=ray") == "ray"


def test_read_ahead_holds_a_reader_until_its_rows_are_screened():
    async def run():
        gate = ingest.ReadAhead(limit=100)
        await gate.admit(60)
        second = asyncio.create_task(gate.admit(60))  # 120 pending would pass the limit: waits
        await asyncio.sleep(0.05)
        assert not second.done()
        await gate.screened(30)  # 30 + 60 fit
        await asyncio.wait_for(second, 1)
        assert gate.pending == 90
        larger = asyncio.create_task(gate.admit(500))  # larger than the limit: waits until nothing is pending
        await gate.screened(50)
        await asyncio.sleep(0.05)
        assert not larger.done()
        await gate.screened(40)
        await asyncio.wait_for(larger, 1)
        assert gate.pending == 500

    asyncio.run(run())


def test_seen_on_disk_says_which_keys_are_new_in_order():
    with ingest.SeenOnDisk() as seen:
        assert seen.add_new("ids", ["a", "b", "a"]) == [True, True, False]  # a repeat within one call
        assert seen.add_new("ids", ["b", "c"]) == [False, True]  # and across calls
        assert seen.add_new("texts", [b"\x00" * 16, b"\x01" * 16]) == [True, True]  # tables apart: no clash
        assert seen.add_new("texts", []) == []
        folder = seen.dir.name
    assert not os.path.exists(folder)  # the set goes with the ingest
