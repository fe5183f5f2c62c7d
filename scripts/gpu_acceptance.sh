#!/usr/bin/env bash
# GPU acceptance, from a fresh clone on one H100 or H200 (about 8 minutes; installs what it needs):
#
#   scripts/gpu_acceptance.sh
#
# writes runs/gpu_acceptance/acceptance.json and acceptance.md: the GPU tests; `distill bench` with
# random:gemma3-4b on the transformers engine (comments/s, fast vs plain) and on vLLM (comments/s); vLLM
# against transformers on the embedded Gemma 3 270M (real weights: random ones differ between the engines);
# training examples/s and MFU of the 200m and 537m students in bf16; DeepSpeed ZeRO-2 on one GPU.
#
#   DRY=1 TEACHER=<local teacher dir> scripts/gpu_acceptance.sh
#
# is the CPU dry run the test suite makes (tests/test_gpu_acceptance.py): no installs, small sizes, and the
# steps that need a GPU, vLLM or DeepSpeed are listed as skipped in the summary.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_acceptance}
PY=${PYTHON:-python}
mkdir -p "$OUT"
distill() { "$PY" -m distill.cli "$@"; }

if [ "${DRY:-0}" = 1 ]; then
  teacher=${TEACHER:?DRY=1 needs TEACHER=<a local teacher directory>}
  sizes=(--comments 8 --teacher-batch 4 --presets tiny --train-steps 2 --warmup-steps 1 --repeats 1 --threads 1)
  distill bench --out "$OUT/bench" "${sizes[@]}" "teacher.model=$teacher" teacher.dtype=float32 corpus.limit=8
  echo "gpu tests, vLLM benches, DeepSpeed ZeRO-2: skipped (DRY=1)" > "$OUT/skipped.txt"
else
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  "$PY" -m pip install -q -e ".[test]" vllm
  DS_BUILD_OPS=0 "$PY" -m pip install -q --no-build-isolation "deepspeed==0.19.8"
  "$PY" -m pytest -q -m gpu tests/ | tee "$OUT/gpu_tests.txt"
  sizes=(--comments 512 --teacher-batch 64 --train-steps 20 --warmup-steps 3 --repeats 3)
  distill bench --out "$OUT/bench" "${sizes[@]}" --presets 200m,537m teacher.model=random:gemma3-4b train.precision=bf16
  distill bench --out "$OUT/bench-vllm-4b" "${sizes[@]}" --presets tiny teacher.model=random:gemma3-4b \
    teacher.engine=vllm teacher.vllm_gpu_memory_utilization=0.6
  distill bench --out "$OUT/bench-vllm-270m" --comments 256 --teacher-batch 64 --presets tiny --repeats 1 \
    teacher.engine=vllm teacher.vllm_gpu_memory_utilization=0.6
  distill extract records.uri="$OUT/records" corpus.limit=2048 teacher.batch_size=64
  distill train records.uri="$OUT/records" train.run_dir="$OUT/train-zero2" train.strategy=deepspeed \
    train.zero_stage=2 student.preset=200m train.micro_batch_size=64 train.epochs=1 train.precision=bf16
fi
"$PY" - "$OUT" <<'PY'
"""One JSON and one markdown file of every figure the steps above wrote."""
import json
import sys
from pathlib import Path

out = Path(sys.argv[1])
result = {"bench": {d.name: json.loads((d / "bench.json").read_text()) for d in sorted(out.glob("bench*"))}}
metrics = out / "train-zero2" / "metrics.jsonl"
if metrics.exists():
    result["zero2"] = [json.loads(line) for line in metrics.read_text().splitlines()][-1]
for name in ("gpu_tests.txt", "skipped.txt"):
    if (out / name).exists():
        result[name.split(".")[0]] = (out / name).read_text().strip().splitlines()[-1]
(out / "acceptance.json").write_text(json.dumps(result, indent=1))
lines = ["# GPU acceptance", ""] + [f"- {k}: {result[k]}" for k in ("gpu_tests", "skipped") if k in result]
if "zero2" in result:
    lines.append(f"- DeepSpeed ZeRO-2, 200m student, last step: {json.dumps(result['zero2'])}")
lines += [(out / name / "bench.md").read_text() for name in result["bench"]]
(out / "acceptance.md").write_text("\n".join(lines) + "\n")
print(f"wrote {out / 'acceptance.json'} and {out / 'acceptance.md'}")
PY
