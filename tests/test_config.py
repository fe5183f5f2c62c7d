"""The typed config: YAML + dotted overrides, one-line errors naming the field, every shipped config loads."""

from pathlib import Path

import pytest
import yaml

from distill.config import ConfigError, config_to_yaml, load_config

CONFIGS = sorted(Path(__file__).resolve().parents[1].glob("jobs/configs/*.yaml"))


def test_defaults_are_the_embedded_ones():
    cfg = load_config()
    assert cfg.teacher.model == "gemma3-270m-gguf"
    assert Path(cfg.corpus.paths[0]).exists()
    assert cfg.vocab.size == 525


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("teacher:\n  batch_size: 8\nrecords:\n  uri: s3://bucket/x\n")
    cfg = load_config(str(path), ["teacher.batch_size=32", "corpus.limit=10"])
    assert cfg.teacher.batch_size == 32
    assert cfg.records.uri == "s3://bucket/x"
    assert cfg.corpus.limit == 10


@pytest.mark.parametrize("override, words", [
    ("teacher.batch_size=abc", ["teacher.batch_size", "abc"]),
    ("teacher.batch_size=0", ["teacher.batch_size", "0"]),
    ("teacher.bogus=1", ["bogus"]),
    ("corpus.max_tokens=1", ["corpus.max_tokens", "1"]),
    ("corpus.skip=-1", ["corpus.skip", "-1"]),
    ("records.logits_dtype=float32", ["records.logits_dtype", "float32"]),
    ("no_equals_sign", ["no_equals_sign", "key=value"]),
])
def test_bad_values_name_the_field(override, words):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    message = str(e.value)
    assert "\n" not in message
    for w in words:
        assert w in message


def test_bad_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(str(bad))


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["teacher.batch_size=7"])
    path = tmp_path / "resolved.yaml"
    path.write_text(config_to_yaml(cfg))
    assert load_config(str(path)) == cfg


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_load(path):
    assert yaml.safe_load(path.read_text())
    load_config(str(path))
