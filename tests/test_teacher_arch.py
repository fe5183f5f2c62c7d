"""`random:` teachers: the published Gemma 3 architectures with random weights, for speed
measurements where the weights cannot be downloaded (distill bench teacher.model=random:gemma3-4b)."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from distill.config import TeacherConfig
from distill.plan import TEACHERS
from distill.teacher import (GEMMA3_ARCHITECTURES, cpu_has_fast_bf16, gemma3_config, pick_dtype, resolve_teacher_path,
                             teacher_fingerprint)


@pytest.mark.parametrize("name", sorted(GEMMA3_ARCHITECTURES))
def test_architecture_has_the_published_non_embedding_parameter_count(name):
    """The planner's parameter table (the technical report's) and the built model agree."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(gemma3_config(name))
    total = sum(p.numel() for p in model.parameters())
    non_embedding = total - model.get_input_embeddings().weight.numel()
    assert abs(non_embedding - TEACHERS[name].non_embedding) / TEACHERS[name].non_embedding < 1e-3


@pytest.mark.slow  # reads the converted embedded teacher (converted once, about a minute)
def test_layer_pattern_matches_a_real_published_config():
    """Five sliding-window layers, then one global: as in the embedded Gemma 3 270M's own config.json."""
    real = json.load(open(f"{resolve_teacher_path(TeacherConfig())}/config.json"))
    assert gemma3_config("gemma3-1b").layer_types[:real["num_hidden_layers"]] == real["layer_types"]


def test_random_teacher_is_marked_and_unknown_names_are_one_line():
    cfg = TeacherConfig(model="random:gemma3-4b")
    assert teacher_fingerprint(cfg)["random_weights"] is True
    with pytest.raises(ValueError, match="known architectures are random:gemma3-1b, random:gemma3-4b"):
        gemma3_config("gemma3-27b")


def test_auto_dtype_is_bf16_only_where_the_hardware_has_it(monkeypatch):
    avx2_only = "flags\t\t: fpu sse2 avx avx2 fma\n"
    assert not cpu_has_fast_bf16(avx2_only)
    assert cpu_has_fast_bf16("flags\t\t: avx2 avx512f avx512_bf16\n")
    assert cpu_has_fast_bf16("flags\t\t: avx2 amx_bf16 amx_tile\n")
    assert not cpu_has_fast_bf16("flags\t\t: avx512_bf16x\n")  # whole flags only
    monkeypatch.setattr("distill.teacher.cpu_has_fast_bf16", lambda: False)
    assert pick_dtype(TeacherConfig(), torch.device("cpu")) == torch.float32
    assert pick_dtype(TeacherConfig(), torch.device("cuda")) == torch.bfloat16
    assert pick_dtype(TeacherConfig(dtype="bfloat16"), torch.device("cpu")) == torch.bfloat16
    monkeypatch.setattr("distill.teacher.cpu_has_fast_bf16", lambda: True)
    assert pick_dtype(TeacherConfig(), torch.device("cpu")) == torch.bfloat16
    assert pick_dtype(TeacherConfig(dtype="float32"), torch.device("cpu")) == torch.float32
