"""The whole main job: extraction -> training -> evaluation -> report -> a few classifications (student and teacher).

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python -m jobs.pipeline --config jobs/configs/gemma3-270m_to_270m-layers0-3_cpu.yaml [key=value ...]
    python -m jobs.pipeline --config jobs/configs/gemma3-270m_to_270m-layers0-3_cpu.yaml      # one machine (make demo)

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


def teacher_answers(cfg, student, texts: list[str]) -> list[str]:
    """The teacher's constrained answers to `texts`, as text, with the prompt the records were made with."""
    from distill.extract import encode_comment
    from distill.task import resolve_style
    from distill.teacher import load_teacher

    tokenizer = student.tokenizer
    prefix, suffix = student.task.prompt_parts(resolve_style(cfg.task.prompt_style, tokenizer), tokenizer)
    teacher = load_teacher(cfg.teacher, prefix, suffix, student.grammar, student.vocab, tokenizer)
    answers = teacher.answer([encode_comment(tokenizer, text) for text in texts])
    return [tokenizer.decode([i for i in a.teacher_ids if i != student.sep_id]) for a in answers]


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
    teacher_says = teacher_answers(cfg, student, SAMPLES)
    for r, teacher in zip(student.classify(SAMPLES), teacher_says):
        print(f"[classify] {r['text']!r}\n    student -> {r['raw']}\n    teacher -> {teacher}"
              f"  ({'the same' if r['raw'] == teacher else 'different'})")
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
