"""scripts/gpu_acceptance.sh end to end in its CPU dry mode (DRY=1): small sizes, the tiny teacher, no installs."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_acceptance_script_dry_run_writes_one_json_and_one_markdown(tiny_teacher_dir, tmp_path):
    env = dict(os.environ, DRY="1", TEACHER=tiny_teacher_dir, OUT=str(tmp_path), PYTHON=sys.executable,
               PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    subprocess.run(["bash", str(REPO / "scripts" / "gpu_acceptance.sh")], env=env, check=True, timeout=300)
    result = json.loads((tmp_path / "acceptance.json").read_text())
    bench = result["bench"]["bench"]
    assert bench["extraction"]["fast_comments_per_s"] > 0 and bench["training"][0]["preset"] == "tiny"
    assert "skipped" in result["skipped"]
    md = (tmp_path / "acceptance.md").read_text()
    assert md.startswith("# GPU acceptance") and "fast / plain" in md
