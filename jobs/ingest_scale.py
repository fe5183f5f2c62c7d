"""Corpus ingest at scale: a generated Reddit month on the local S3 server, through Ray Data, memory measured.

    python -m jobs.ingest_scale --rows 1000000 [--out runs/ingest-scale] [--sample 512]
    python -m jobs.ingest_scale --rows 5000000     # one size per process: getrusage's peak is that size's

1. A dump, `RC_<rows>.zst` under --out (kept for reruns): NDJSON in the Pushshift layout
   (body, id, author, subreddit, created_utc, score, permalink, ... 35 fields), zstd with a 2 GiB window
   as the real dumps are. Bodies are real Reddit comments (the vendored GoEmotions splits), some verbatim
   (so later ones are duplicates), most with a distinct tail, some [deleted], with links, too long.
2. A moto S3 server on 127.0.0.1 in its own process (its memory is not the driver's); the dump is
   uploaded to s3://distill-scale/.
3. `distill.ingest.ingest` with corpus.engine=ray reads the dump from S3 and writes the kept corpus to
   s3://distill-scale/records-<rows>/corpus. Printed: rows read and kept, the counts by reason, seconds,
   the driver's peak RSS (getrusage) and the largest peak RSS of any Ray worker process (sampled
   every 0.2 s with psutil; a worker's RSS includes the object-store pages it touched).
4. The tiny test teacher (random 2-layer Gemma 3, the real tokenizer) extracts the first --sample
   kept comments of that kept corpus, read as a Parquet corpus from S3. Figures go to ingest-<rows>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import zstandard

BUCKET = "distill-scale"


def comments() -> list[str]:
    """Real comment texts: the vendored GoEmotions train and dev splits."""
    from distill.config import EMBEDDED_CORPUS, EMBEDDED_TRAIN_CORPUS

    train = zstandard.ZstdDecompressor().decompress(Path(EMBEDDED_TRAIN_CORPUS).read_bytes(),
                                                    max_output_size=2**30).decode()
    dev = Path(EMBEDDED_CORPUS).read_text(encoding="utf-8")
    return [line.split("\t")[0] for line in (train + dev).splitlines() if line]


def write_dump(path: Path, rows: int, seed: int = 0, chunk: int = 65536) -> None:
    """`rows` Pushshift-layout lines (35 of the fields a recent month's lines carry), zstd with --long=31 as
    the monthly dumps are. Ids, authors, links and scores are random: a row takes ~140 bytes compressed."""
    rng = np.random.default_rng(seed)
    texts = comments()
    esc = [json.dumps(t)[1:-1] for t in texts]  # JSON-escaped, without quotes
    words = sorted({w for t in texts for w in t.split() if w.isalpha() and w.isascii()})
    subs = ["AskReddit", "funny", "gaming", "worldnews", "aww", "politics", "soccer", "movies"]
    sub_ids = [f"t5_{zlib.crc32(s.encode()) % 10**6:x}" for s in subs]
    params = zstandard.ZstdCompressionParameters.from_level(3, window_log=31, threads=-1)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f, zstandard.ZstdCompressor(compression_params=params).stream_writer(f) as out:
        for start in range(0, rows, chunk):
            n = min(chunk, rows - start)
            kind, text, extra = rng.random(n), rng.integers(len(texts), size=n), rng.integers(len(texts), size=(n, 3))
            tail, ntail = rng.integers(len(words), size=(n, 12)), rng.integers(2, 13, size=n)
            author, fullname, born = rng.integers(10**6, size=n), rng.integers(36**8, size=n), rng.integers(5 * 10**8, size=n)
            link, parent, sub = rng.integers(10**8, size=n), rng.integers(10**9, size=n), rng.integers(len(subs), size=n)
            score, retrieved = rng.integers(-5, 90, size=n), rng.integers(10**5, size=n)
            lines = []
            for j in range(n):
                i, k, body = start + j, kind[j], esc[text[j]]
                if k < 0.55:
                    body = body + " " + " ".join(words[w] for w in tail[j, :ntail[j]])
                elif k < 0.70:
                    body = "[deleted]" if k < 0.65 else "[removed]"
                elif k < 0.75:
                    body = f"{body} https://www.reddit.com/r/{subs[sub[j]]}/comments/{i:x}"
                elif k < 0.85:
                    body = " ".join([body] + [esc[e] for e in extra[j]])
                lines.append(
                    f'{{"all_awardings": [], "author": "user{author[j]}", "author_flair_text": null, "body": "{body}", '
                    f'"controversiality": 0, "created_utc": {1767225600 + i // 6}, "distinguished": null, "edited": false, '
                    f'"gilded": 0, "id": "k{i:09x}", "is_submitter": false, "link_id": "t3_{link[j]:x}", '
                    f'"parent_id": "t1_{parent[j]:x}", "retrieved_on": 1767300000, "score": {score[j]}, '
                    f'"stickied": false, "subreddit": "{subs[sub[j]]}", "subreddit_id": "{sub_ids[sub[j]]}", '
                    f'"author_fullname": "t2_{fullname[j]:x}", "author_created_utc": {1200000000 + born[j]}, '
                    f'"author_flair_css_class": null, "author_flair_richtext": [], "author_flair_type": "text", '
                    f'"author_patreon_flair": false, "author_premium": false, "collapsed": false, '
                    f'"collapsed_reason": null, "comment_type": null, "gildings": {{}}, "locked": false, '
                    f'"name": "t1_k{i:09x}", "no_follow": {str(score[j] < 2).lower()}, '
                    f'"permalink": "/r/{subs[sub[j]]}/comments/{link[j]:x}/comment/k{i:09x}/", '
                    f'"retrieved_utc": {1767300000 + retrieved[j]}, "score_hidden": false, "send_replies": true, '
                    f'"subreddit_name_prefixed": "r/{subs[sub[j]]}", "subreddit_type": "public", '
                    f'"total_awards_received": 0, "treatment_tags": [], "ups": {score[j]}}}\n')
            out.write("".join(lines).encode())
    tmp.rename(path)


def start_s3() -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.1)
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                      AWS_DEFAULT_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true")
    return server, endpoint


class WorkerRSS:
    """Peak RSS of every Ray worker process (`ray::...`) and the driver's peak private memory (USS: its RSS
    without the object-store pages it maps to read blocks), sampled on a thread."""

    def __init__(self, every: float = 0.2):
        self.peak: dict[int, int] = {}
        self.names: dict[int, str] = {}
        self.driver_uss = self.driver_rss = 0
        self.every = every
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        me = psutil.Process()
        while not self.stop.is_set():
            info = me.memory_full_info()
            self.driver_uss, self.driver_rss = max(self.driver_uss, info.uss), max(self.driver_rss, info.rss)
            for proc in psutil.process_iter(["pid", "name", "cmdline"]):
                try:
                    cmd = " ".join(proc.info["cmdline"] or [])
                    if cmd.startswith("ray::") or "default_worker.py" in cmd:
                        rss = proc.memory_info().rss
                        if rss > self.peak.get(proc.pid, 0):
                            self.peak[proc.pid], self.names[proc.pid] = rss, cmd[:60]
                except Exception:  # noqa: BLE001 - a process that ended between listing and reading
                    continue
            time.sleep(self.every)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows in the generated dump")
    parser.add_argument("--out", default="runs/ingest-scale")
    parser.add_argument("--sample", type=int, default=512, help="comments the tiny teacher extracts")
    parser.add_argument("--object-store-mb", type=int, help="Ray's object store (default: Ray's, 30%% of RAM); "
                        "a small one shows at 1M rows what a month does to the default one")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sizes = [args.rows]

    for n in sizes:
        path = out / f"RC_{n}.zst"
        if not path.exists():
            t0 = time.perf_counter()  # in a child process: zstd's 2 GiB window is not the driver's memory
            subprocess.run([sys.executable, "-c", "import sys; from pathlib import Path; from jobs.ingest_scale "
                            "import write_dump; write_dump(Path(sys.argv[1]), int(sys.argv[2]))", str(path), str(n)],
                           check=True)
            print(f"[dump] {path}: {n:,} rows, {path.stat().st_size / 2**20:,.0f} MiB "
                  f"({time.perf_counter() - t0:.0f}s)", flush=True)

    server, endpoint = start_s3()
    try:
        import ray

        from distill import storage
        from distill.config import load_config
        from distill.extract import run_extraction
        from distill.ingest import ingest
        from distill.teacher import load_tokenizer, tokenizer_hash
        from jobs.train_memory import tiny_teacher

        storage.filesystem(f"s3://{BUCKET}")[0].mkdir(BUCKET)
        teacher = tiny_teacher(out / "tiny-teacher")
        ray.init(address="local", include_dashboard=False,
                 object_store_memory=args.object_store_mb and args.object_store_mb * 2**20)  # after the S3 environment, so workers inherit it
        ray.data.DataContext.get_current().enable_progress_bars = False
        results = []
        for n in sizes:
            uri = f"s3://{BUCKET}/RC_{n}.zst"
            # uploaded by a child process: what s3fs buffers for the upload is not counted as the driver's
            subprocess.run([sys.executable, "-c", "import sys; from distill import storage; "
                            "storage.filesystem(sys.argv[2])[0].put_file(sys.argv[1], sys.argv[2][5:])",
                            str(out / f"RC_{n}.zst"), uri], check=True)
            ingest_cfg = load_config(None, [f"teacher.model={teacher}", f"corpus.paths=[{uri}]",
                                            "corpus.text_field=body", "corpus.label_fields=[subreddit]",
                                            "corpus.engine=ray", f"records.uri=s3://{BUCKET}/records-{n}"])
            tokenizer = load_tokenizer(ingest_cfg.teacher)

            def count_tokens(texts):
                return [len(t) for t in tokenizer(texts, add_special_tokens=False)["input_ids"]]

            before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            t0 = time.perf_counter()
            with WorkerRSS() as workers:
                kept = ingest(ingest_cfg, count_tokens, tokenizer_hash(tokenizer))
            seconds = time.perf_counter() - t0
            stats = kept.index["stats"]
            row = {"rows": n, "driver_peak_rss_sampled_mb": round(workers.driver_rss / 2**20), "dump_mib": round((out / f"RC_{n}.zst").stat().st_size / 2**20),
                   "read": stats["read"], "kept": stats["kept"], "dropped": stats["dropped"],
                   "quarantined": stats["quarantined"], "seconds": round(seconds),
                   "driver_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
                   "driver_peak_rss_before_mb": round(before / 1024),
                   "driver_peak_uss_mb": round(workers.driver_uss / 2**20),
                   "worker_peak_rss_mb": round(max(workers.peak.values(), default=0) / 2**20),
                   "largest_worker": workers.names.get(max(workers.peak, key=workers.peak.get, default=0)),
                   "workers_seen": len(workers.peak)}
            results.append(row)
            print(json.dumps(row), flush=True)

        largest = sizes[-1]
        cfg = load_config(None, [f"teacher.model={teacher}", f"corpus.paths=[s3://{BUCKET}/records-{largest}/corpus]",
                                 "corpus.label_fields=[subreddit]", f"corpus.limit={args.sample}",
                                 "teacher.dtype=float32", f"records.uri=s3://{BUCKET}/sample-{largest}"])
        manifest = run_extraction(cfg)
        print(f"[teacher] {manifest['rows']} records from the kept corpus of {largest:,} rows", flush=True)

        # The same commands again, as after a crash: the finished corpus and shards are found, not redone.
        t0 = time.perf_counter()
        again = ingest(ingest_cfg, count_tokens, tokenizer_hash(tokenizer))
        results[-1]["rerun_ingest_seconds"] = round(time.perf_counter() - t0, 1)
        assert again.index == kept.index, "a rerun's corpus differs from the first run's"
        t0 = time.perf_counter()
        assert run_extraction(cfg)["rows"] == manifest["rows"]
        results[-1]["rerun_extraction_seconds"] = round(time.perf_counter() - t0, 1)
        print(f"[rerun] ingest {results[-1]['rerun_ingest_seconds']} s (corpus reused), "
              f"extraction {results[-1]['rerun_extraction_seconds']} s (every shard found)", flush=True)
        (out / f"ingest-{largest}.json").write_text(json.dumps(results, indent=2))
        print("\n| dump rows | .zst MiB | kept | seconds | driver peak RSS | largest worker peak RSS |")
        print("|---:|---:|---:|---:|---:|---:|")
        for r in results:
            print(f"| {r['rows']:,} | {r['dump_mib']:,} | {r['kept']:,} | {r['seconds']:,} | "
                  f"{r['driver_peak_rss_mb']:,} MB | {r['worker_peak_rss_mb']:,} MB |")
    finally:
        server.terminate()


if __name__ == "__main__":
    main()
