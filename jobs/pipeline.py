"""The whole main job: extraction -> training -> evaluation -> report -> a few classifications.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python -m jobs.pipeline --config jobs/configs/gemma3-270m_to_tiny_cpu.yaml [key=value ...]
    python -m jobs.pipeline --config jobs/configs/gemma3-270m_to_tiny_cpu.yaml      # one machine (make demo)

Each stage resumes: finished record shards and training checkpoints are kept, so a rerun
continues where the last one stopped. Exits 0 only when every stage's outputs are complete.
"""

import argparse
import sys
import time

from distill.cli import EXIT_STOPPED, USER_ERRORS, print_outcome
from distill.config import config_to_yaml, load_config

SAMPLES = [
    "You are an absolute idiot and everyone hates you.",
    "Thanks so much, this made my day!",
    "The game starts at 7pm on Saturday.",
]


def run(config: str | None, overrides: list[str]) -> int:
    from distill.extract import run_extraction
    from distill.inference import load_artifact
    from distill.train import finish_run, run_training

    cfg = load_config(config, overrides)
    print("[config]\n" + config_to_yaml(cfg), flush=True)
    start = time.perf_counter()
    run_extraction(cfg)
    extracted = time.perf_counter()
    outcome = finish_run(cfg, run_training(cfg))
    trained = time.perf_counter()
    if not outcome["complete"]:
        print(f"[pipeline] training stopped at step {outcome['step']}; rerun the same command to resume")
        return EXIT_STOPPED
    print_outcome(outcome)
    student = load_artifact(outcome["model"])
    for r in student.classify(SAMPLES):
        print(f"[classify] {r['text']!r} -> {r['raw']}")
    print(f"[pipeline] extraction {extracted - start:.0f}s, training + evaluation + report {trained - extracted:.0f}s, "
          f"total {time.perf_counter() - start:.0f}s")
    print(f"[pipeline] records: {cfg.records.uri}\n[pipeline] model:   {outcome['model']}\n"
          f"[pipeline] report:  {outcome['report']}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    try:
        return run(args.config, args.overrides)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
