"""distill bench: the FLOPs count, and a tiny end-to-end run whose bench.json the plan can read."""

import argparse
import json

import pytest
import torch

from distill.bench import add_bench_args, cmd_bench, flops_per_token, non_embedding_params
from distill.model import PRESETS, StudentConfig, build_student
from distill.plan import PlanRequest, plan_for


def test_flops_per_token_of_the_tiny_preset_by_hand():
    cfg = StudentConfig(preset="tiny")  # D 64, 2 layers, F 128, embedding rank 16, V_out 525
    per_layer = 4 * 64 * 64 + 3 * 64 * 128 + 2 * 64  # q k v o, gate up down, two norms
    n = 16 * 64 + 2 * per_layer + 64 + 64 * 525  # embed_proj, layers, final norm, head: 116,864
    assert non_embedding_params(cfg) == n == 116_864
    assert flops_per_token(cfg, 52) == 6 * 116_864 + 12 * 2 * 64 * 52 == 781_056


def test_non_embedding_params_of_a_teacher_shaped_student():
    cfg = StudentConfig(d_model=64, n_layers=2, n_heads=4, n_kv_heads=1, head_dim=32, d_ff=96, embed_rank=0,
                        qk_norm=True, post_norms=True, input_vocab_size=1000)
    with torch.device("meta"):
        model = build_student(cfg)
    assert non_embedding_params(cfg) == model.param_overview()["total"] - model.embed.weight.numel()


@pytest.mark.parametrize("preset", list(PRESETS))
def test_non_embedding_params_are_all_but_the_lookup_table(preset):
    with torch.device("meta"):
        model = build_student(StudentConfig(preset=preset, input_vocab_size=262144))
    assert non_embedding_params(model.cfg) == model.param_overview()["total"] - model.embed.weight.numel()


@pytest.fixture(scope="module")
def tiny_bench(tiny_teacher_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    parser = argparse.ArgumentParser()
    add_bench_args(parser)
    threads = torch.get_num_threads()
    try:  # one thread: on a busy machine, threads that wait on each other make this run 10x slower
        cmd_bench(parser.parse_args(["--out", str(out), "--comments", "8", "--teacher-batch", "4", "--presets", "tiny",
                                     "--train-steps", "2", "--repeats", "1", "--threads", "1", "--compare-precision",
                                     f"teacher.model={tiny_teacher_dir}", "teacher.dtype=float32", "corpus.limit=8"]))
    finally:
        torch.set_num_threads(threads)
    return out


def test_a_tiny_bench_writes_every_figure(tiny_bench, capsys):
    result = json.loads((tiny_bench / "bench.json").read_text())
    assert set(result) == {"command", "created", "device", "teacher", "extraction", "training", "classification",
                           "storage", "config", "precision", "vllm"}
    assert result["vllm"] is None  # teacher.engine=transformers
    assert {"name", "torch", "threads", "peak_flops", "bandwidth_bytes_per_s", "peak_source"} <= set(result["device"])
    e = result["extraction"]
    assert e["comments"] == 8 and e["batch_size"] == 4 and e["prompt_tokens"] > 0
    assert e["agree"] == 8  # the fast path gives the plain path's answers
    assert e["fast_passes_per_batch"] == 5  # one per branch point of reddit_moderation, plus the first
    for key in ("fast_comments_per_s", "plain_comments_per_s", "fast_over_plain", "fast_roofline_efficiency"):
        assert e[key] > 0
    (t,) = result["training"]
    assert t["preset"] == "tiny" and t["steps"] == 2 and len(t["step_seconds"]) == 2
    assert t["positions"] == 25 + 27 and t["flops_per_token"] == flops_per_token(StudentConfig(preset="tiny"), 52)
    assert t["examples_per_s"] > 0 and 0 < t["mfu"] < 1
    c = result["classification"]
    assert c["valid"] == 8 and c["student_over_teacher"] > 0
    s = result["storage"]
    assert s["comments"] == 8 and 0 < s["shard_bytes_per_comment"]
    assert s["logits_bytes_per_comment"] == pytest.approx(e["mean_answer_tokens"] * 525 * 2)  # float16 rows
    q = result["precision"]
    assert q["comments"] == 8 and q["fp32_comments_per_s"] > 0 and q["bf16_comments_per_s"] > 0
    assert 0 <= q["answers_agree"] <= 8 and q["training"][0]["preset"] == "tiny"
    assert q["student_fp32_comments_per_s"] > 0 and q["student_bf16_comments_per_s"] > 0
    assert 0 <= q["student_answers_agree"] <= 8
    assert q["training"][0]["bf16_over_fp32"] == pytest.approx(
        q["training"][0]["bf16_examples_per_s"] / q["training"][0]["fp32_examples_per_s"])
    markdown = (tiny_bench / "bench.md").read_text()
    assert "| extraction, fast path, comments/s |" in markdown
    assert "| measurement | value |" in markdown and "| tiny |" in markdown and result["command"] in markdown


def test_the_plan_reads_a_bench_json(tiny_bench):
    plan = plan_for(PlanRequest(student="tiny", bench=str(tiny_bench / "bench.json")))
    assert str(tiny_bench) in plan.rates.source and plan.extraction_hours > 0
