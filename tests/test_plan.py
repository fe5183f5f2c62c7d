"""distill plan: the MISSION's RTX 4070 reproduced, linear GPU scaling, Chinchilla, break-even, one-line errors."""

import argparse
import dataclasses
import json

import pytest
import torch

from distill.config import ConfigError
from distill.model import PRESETS, StudentConfig, build_student
from distill.plan import (PlanError, PlanRequest, add_plan_args, cmd_plan, example_plans, plan_for, student_params)


def parse(*argv):
    parser = argparse.ArgumentParser()
    add_plan_args(parser)
    return parser.parse_args(list(argv))


def test_the_4070_example_reproduces_the_missions_numbers(capsys):
    original = example_plans()[0]
    assert original.extraction_hours == pytest.approx(270, rel=0.05)  # 500k comments at 0.5/s
    assert original.training_hours == pytest.approx(2600, rel=0.05)  # 15 epochs at 1.25 s per example
    cmd_plan(parse("--example"))
    out = capsys.readouterr().out
    assert "| | 1 x RTX 4070, the original (measured) | 1 x H100 SXM (model) | 8 x H100 SXM (model) |" in out
    assert "MISSION's 270 h" in out and "MISSION's 2,600 h" in out


def test_eight_gpus_take_an_eighth_of_the_time_at_the_same_cost():
    one, eight = plan_for(PlanRequest(gpus=1)), plan_for(PlanRequest(gpus=8))
    assert eight.extraction_hours == pytest.approx(one.extraction_hours / 8)
    assert eight.training_hours == pytest.approx(one.training_hours / 8)
    assert eight.distillation_usd == pytest.approx(one.distillation_usd)


@pytest.mark.parametrize("preset", list(PRESETS))
def test_chinchilla_trains_on_20_tokens_per_parameter(preset):
    with torch.device("meta"):
        total = build_student(StudentConfig(preset=preset, input_vocab_size=262144)).param_overview()["total"]
    assert student_params(StudentConfig(preset=preset, input_vocab_size=262144)) == total
    plan = plan_for(PlanRequest(student=preset, chinchilla=True))
    assert plan.train_tokens == pytest.approx(20 * total)
    assert plan.train_examples == pytest.approx(20 * total / 26)  # 26 answer tokens per example


def test_break_even_is_positive_and_falls_as_the_student_gets_cheaper():
    big, small = plan_for(PlanRequest(student="537m")), plan_for(PlanRequest(student="50m"))
    assert 0 < small.break_even_calls < big.break_even_calls
    cheaper = dataclasses.replace(big, student_usd_per_call=big.student_usd_per_call / 2)
    assert cheaper.break_even_calls < big.break_even_calls
    dearer = dataclasses.replace(big, student_usd_per_call=big.teacher_usd_per_call)
    assert dearer.break_even_calls == float("inf")
    paid = plan_for(PlanRequest(calls_per_day=1e6))
    assert paid.payback_days == pytest.approx(paid.break_even_calls / 1e6)


def test_few_examples_per_step_cap_the_assumed_mfu():
    small_batch, large_batch = plan_for(PlanRequest(train_batch=16)), plan_for(PlanRequest(train_batch=1024))
    assert "capped" in small_batch.rates.source and "capped" not in large_batch.rates.source
    assert small_batch.training_hours > large_batch.training_hours


@pytest.mark.parametrize("argv, option", [
    (["--gpu", "h101"], "--gpu"),
    (["--comments", "0"], "--comments"),
    (["--teacher", "gemma3-27b"], "--teacher"),
    (["--student", "1b"], "--student"),
    (["--gpus", "0"], "--gpus"),
    (["--teacher", "gemma3-12b", "--gpu", "rtx4070"], "--teacher"),  # 24 GB of weights, 12 GB of memory
    (["--bench", "/nonexistent/bench.json"], "--bench"),
])
def test_bad_options_give_one_line_naming_the_option(argv, option):
    with pytest.raises(PlanError) as err:
        cmd_plan(parse(*argv))
    message = str(err.value)
    assert message.startswith(option) and "\n" not in message
    assert isinstance(err.value, ConfigError)  # the CLI prints ConfigErrors as one line and exits 2


def test_a_bench_json_replaces_the_assumed_efficiencies(tmp_path):
    bench = {"device": {"name": "NVIDIA H100 80GB HBM3"}, "extraction": {"fast_roofline_efficiency": 0.2},
             "training": [{"preset": "50m", "params": 50_641_920, "mfu": 0.1},
                          {"preset": "tiny", "params": 4_311_168, "mfu": 0.01}],
             "storage": {"shard_bytes_per_comment": 10_000}}
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(bench))
    assumed = plan_for(PlanRequest(student="50m"))
    measured = plan_for(PlanRequest(student="50m", bench=str(path)))
    assert str(path) in measured.rates.source and "MFU 10%" in measured.rates.source
    assert "carry over" not in measured.rates.source  # benched on the plan's GPU
    assert "carry over" in plan_for(PlanRequest(student="50m", gpu="a100", bench=str(path))).rates.source
    assert measured.rates.teacher_per_s == pytest.approx(assumed.rates.teacher_per_s / 2)  # 20% vs 40%
    assert measured.storage_gb == pytest.approx(500_000 * 10_000 / 1e9)
    other = plan_for(PlanRequest(student="537m", bench=str(path)))  # not benched: the largest preset's MFU
    assert "preset 50m" in other.rates.source
    path.write_text("{}")
    with pytest.raises(PlanError, match="^--bench .*not a distill bench.json"):
        plan_for(PlanRequest(bench=str(path)))
