"""The one training loop under Ray Train: DDP and DeepSpeed ZeRO 1-3, golden losses, exact resume, stop,
torch.compile."""

import json
import math
import os
from pathlib import Path

import pytest

from distill import records
from distill.config import load_config
from distill.extract import run_extraction
from distill.train import MODEL_FILE, finish_run, latest_checkpoint, run_training, split_rows

GOLDEN = Path(__file__).parent / "golden" / "tiny_losses.json"


@pytest.fixture(scope="module")
def tiny_records(tiny_teacher_dir, tmp_path_factory):
    uri = str(tmp_path_factory.mktemp("train-records"))
    run_extraction(load_config(None, [f"teacher.model={tiny_teacher_dir}", f"records.uri={uri}",
                                      "corpus.limit=40", "records.shard_size=20", "teacher.batch_size=10", "teacher.cpu_threads=1",
                                      "teacher.dtype=float32"]))
    return uri


def train_config(tiny_teacher_dir, records_uri, run_dir, *extra):
    return load_config(None, [
        f"teacher.model={tiny_teacher_dir}", f"records.uri={records_uri}", f"train.run_dir={run_dir}",
        "student.preset=tiny", "train.epochs=2", "train.micro_batch_size=8", "train.warmup_steps=2",
        "train.lr=3e-3", "train.eval_rows=8", "train.init_from_teacher=false", "train.cpu_threads=1",
        "train.precision=fp32", *extra])  # fp32: the golden losses hold on every CPU (auto is bf16 on AVX512-BF16 ones)


def losses(run_dir) -> list[float]:
    return [json.loads(line)["loss"] for line in Path(run_dir, "metrics.jsonl").read_text().splitlines()]


def test_ddp_one_worker_learns_and_matches_golden_losses(tiny_teacher_dir, tiny_records, tmp_path):
    cfg = train_config(tiny_teacher_dir, tiny_records, tmp_path / "run", "train.epochs=4")
    outcome = finish_run(cfg, run_training(cfg))
    assert outcome["complete"]
    got = losses(tmp_path / "run")
    assert got[-1] < got[0]
    first = json.loads(Path(tmp_path / "run", "metrics.jsonl").read_text().splitlines()[0])
    for key in ("loss", "kl", "ce", "kl_weight", "lr", "grad_norm", "examples_per_s", "tokens_per_s", "mem_mb",
                "pad_fraction"):
        assert key in first
    assert first["kl_weight"] == pytest.approx(0.9, abs=1e-6)
    # regenerate (after a change that is meant to change the losses): DISTILL_UPDATE_GOLDEN=1 pytest -k golden
    if os.environ.get("DISTILL_UPDATE_GOLDEN"):
        GOLDEN.write_text(json.dumps(got[:5], indent=1) + "\n")
    assert got[:5] == pytest.approx(json.loads(GOLDEN.read_text()), rel=1e-4, abs=1e-5)
    assert (tmp_path / "run" / "model" / "model.safetensors").exists()
    assert Path(outcome["report"]).exists()
    eval_json = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert len(eval_json["per_epoch"]) == 4 and 0 <= eval_json["teacher_forced_acc"] <= 1


# ZeRO-1 (optimizer states sharded, as ZeRO-2 also does) is a `long` test: out of `make test`, to keep it under 25 minutes.
# ZeRO-2 reads streamed shards (windows of one 20-row shard): two ranks drawing their slices of each window's batches.
@pytest.mark.parametrize("stage,data", [pytest.param(1, "memory", marks=pytest.mark.long), (2, "stream"), (3, "memory")])
def test_deepspeed_zero_two_cpu_workers(tiny_teacher_dir, tiny_records, tmp_path, stage, data):
    cfg = train_config(tiny_teacher_dir, tiny_records, tmp_path / "run", "train.strategy=deepspeed",
                       f"train.zero_stage={stage}", "train.workers=2", "train.cpus_per_worker=0.5",
                       "train.micro_batch_size=4", "train.epochs=3", f"train.data={data}", "train.stream_window_rows=8")
    outcome = finish_run(cfg, run_training(cfg))
    assert outcome["complete"]
    got = losses(tmp_path / "run")
    assert sum(got[-3:]) < sum(got[:3])


def test_resume_continues_exactly(tiny_teacher_dir, tiny_records, tmp_path):
    whole = train_config(tiny_teacher_dir, tiny_records, tmp_path / "whole")
    finish_run(whole, run_training(whole))
    # the interrupted run builds its batches on the prefetch thread (on by default on GPUs only): the same losses
    part = train_config(tiny_teacher_dir, tiny_records, tmp_path / "part", "train.stop_after_steps=3",
                        "train.prefetch=true")
    assert not finish_run(part, run_training(part))["complete"]
    assert len(losses(tmp_path / "part")) == 3
    resumed = train_config(tiny_teacher_dir, tiny_records, tmp_path / "part", "train.prefetch=true")
    assert finish_run(resumed, run_training(resumed))["complete"]
    assert losses(tmp_path / "part") == pytest.approx(losses(tmp_path / "whole"), rel=1e-5, abs=1e-6)


def test_streamed_records_resume_exactly(tiny_teacher_dir, tiny_records, tmp_path):
    """train.data=stream (windows of one 20-row shard here): an interrupted and resumed run gives the
    uninterrupted run's losses; the final evaluation reads the held-out rows shard by shard."""
    stream = ("train.data=stream", "train.stream_window_rows=8")
    whole = train_config(tiny_teacher_dir, tiny_records, tmp_path / "whole", *stream)
    outcome = finish_run(whole, run_training(whole))
    held_out = records.read_records(tiny_records).column("split").to_pylist().count("eval")
    assert outcome["complete"] and outcome["eval"]["n"] == held_out > 0
    part = train_config(tiny_teacher_dir, tiny_records, tmp_path / "part", *stream, "train.stop_after_steps=3",
                        "train.prefetch=true")
    assert not finish_run(part, run_training(part))["complete"]
    resumed = train_config(tiny_teacher_dir, tiny_records, tmp_path / "part", *stream, "train.prefetch=true")
    assert finish_run(resumed, run_training(resumed))["complete"]
    assert losses(tmp_path / "part") == pytest.approx(losses(tmp_path / "whole"), rel=1e-5, abs=1e-6)
    first = json.loads(Path(tmp_path / "whole", "metrics.jsonl").read_text().splitlines()[0])
    assert first["rss_peak_mb"] >= first["mem_mb"] > 0


@pytest.mark.scale
def test_streamed_worker_memory_does_not_grow_with_the_records(tiny_teacher_dir, tiny_records, tmp_path):
    """jobs.train_memory at a small scale (the README's figures are its full-size run): 8x the records
    (25 MB -> 200 MB of shards), the same worker peak RSS; the in-memory path would hold them all."""
    from jobs.train_memory import synthesise, train

    peaks = []
    for n in (1000, 8000):
        uri = str(tmp_path / f"records-{n}")
        synthesise(tiny_records, uri, n, shard_size=32)
        got = train(tiny_teacher_dir, uri, tmp_path / f"run-{n}", "stream", 20, ["train.stream_window_rows=128"])
        peaks.append(got["rss_peak_mb"])
    assert peaks[1] < peaks[0] + 60, peaks


@pytest.mark.long  # torch.compile is on by default on CUDA only (train.compile=auto); 90 s of CPU compiling in CI
def test_compiled_forward_matches_golden_losses(tiny_teacher_dir, tiny_records, tmp_path):
    """train.compile=true on CPU (inductor): the golden run's first steps, within float tolerance of the
    eager losses, and a checkpoint with the plain module's keys (no `_orig_mod.`)."""
    from safetensors import safe_open

    cfg = train_config(tiny_teacher_dir, tiny_records, tmp_path / "run", "train.epochs=4", "train.compile=true",
                       "train.stop_after_steps=5")
    assert not finish_run(cfg, run_training(cfg))["complete"]
    assert losses(tmp_path / "run") == pytest.approx(json.loads(GOLDEN.read_text()), rel=1e-3)
    with safe_open(os.path.join(latest_checkpoint(str(tmp_path / "run")), MODEL_FILE), framework="pt") as f:
        keys = list(f.keys())
    assert "head.weight" in keys and not any("_orig_mod" in k for k in keys)


def test_max_train_rows_takes_a_stable_prefix_in_id_order():
    import pyarrow as pa

    ids = [f"c{i:03d}" for i in range(40)][::-1]  # shards read in any order
    table = pa.table({"id": ids, "split": ["eval" if i % 5 == 0 else "train" for i in range(40)]})
    train, held_out = split_rows(table)
    assert train.num_rows == 32 and held_out.num_rows == 8
    assert train.column("id").to_pylist() == sorted(train.column("id").to_pylist())
    small, held_small = split_rows(table, 10)
    bigger, _ = split_rows(table, 20)
    assert small.column("id").to_pylist() == bigger.column("id").to_pylist()[:10] == train.column("id").to_pylist()[:10]
    assert held_small.column("id").to_pylist() == held_out.column("id").to_pylist()  # the eval split is never cut
    with pytest.raises(ValueError, match="train.max_train_rows"):
        load_config(None, ["train.max_train_rows=0"])


def test_a_pruned_copy_of_the_teacher_trains_and_classifies(tiny_teacher_dir, tiny_records, tmp_path):
    """train.teacher_layers: the student takes the teacher's shapes and its chosen blocks; with the embedding
    frozen, the artifact still holds the teacher's embedding exactly; the artifact loads and classifies."""
    import torch
    from safetensors import safe_open

    from distill.config import ConfigError
    from distill.inference import load_artifact
    from distill.train import teacher_shaped_student

    cfg = train_config(tiny_teacher_dir, tiny_records, tmp_path / "run", "train.teacher_layers=[1]",
                       "train.freeze_embedding=true", "train.epochs=1", "train.lr=1e-3")
    assert finish_run(cfg, run_training(cfg))["complete"]
    student = load_artifact(str(tmp_path / "run" / "model"), device="cpu")
    s = student.model.cfg
    assert (s.d_model, s.n_layers, s.n_heads, s.n_kv_heads, s.head_dim, s.qk_norm, s.post_norms) == \
        (32, 1, 2, 1, 16, True, True)
    assert s.layer_rope_theta == [1e6]  # the teacher's layer 1 is its global-attention layer
    with safe_open(os.path.join(tiny_teacher_dir, "model.safetensors"), framework="pt") as f:
        embedding = f.get_tensor("model.embed_tokens.weight")
    assert torch.equal(student.model.embed.weight.float(), embedding.float())
    answers = student.classify(["you are all idiots", "have a nice day"])
    assert all(a["valid"] for a in answers)
    with pytest.raises(ConfigError, match="train.teacher_layers"):
        teacher_shaped_student(train_config(tiny_teacher_dir, tiny_records, tmp_path / "x", "train.teacher_layers=[2]"))


def test_choices_only_loss_trains(tiny_teacher_dir, tiny_records, tmp_path):
    """loss.positions=choices: the trainer hands the loss each position's allowed tokens; the loss,
    over far fewer positions than the whole answer, is not the plain run's and still falls."""
    cfg = train_config(tiny_teacher_dir, tiny_records, tmp_path / "run", "loss.positions=choices", "train.epochs=4")
    assert finish_run(cfg, run_training(cfg))["complete"]
    got = losses(tmp_path / "run")
    assert all(math.isfinite(l) for l in got) and got[-1] < got[0]
    assert got[0] != pytest.approx(json.loads(GOLDEN.read_text())[0], rel=1e-3)
