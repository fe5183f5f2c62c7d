"""The `distill` command line: thin wrappers that parse, build a config, run, and report.

    distill extract --config FILE [key=value ...]   teacher records from a corpus
    distill inspect RECORDS                         manifest, counts and a few decoded examples
    distill train --config FILE [key=value ...]     train (or resume) the student on the records
    distill eval MODEL RECORDS [--train-records R]  held-out metrics of a model artifact, beside baselines
    distill export RUN_DIR OUT                      model artifact from a run's latest checkpoint
    distill classify MODEL [TEXT ...]               answer comments (arguments, --file, or stdin) as JSON lines
    distill report RUN_DIR                          HTML report + markdown summary of a run
    distill model-info [--config FILE] [key=value]  parameter overview of a student
    distill download SRC DEST / upload SRC DEST     copy an artifact or run, checksums verified, resumable
    distill bench [--out DIR]                       extraction / training / classification speed, side by side
    distill plan --comments N --gpu h100 --gpus 8   hours, storage and dollars of a job; --example

Errors in the input (config, corpus, task, records, storage) print one line and exit 2.
"""

from __future__ import annotations

import argparse
import sys

from distill.bench import add_bench_args
from distill.config import ConfigError, config_to_yaml, load_config
from distill.plan import add_plan_args
from distill.corpus import CorpusError
from distill.records import RecordsError
from distill.storage import StorageError
from distill.task import TaskError

from distill.inference import ArtifactError
from distill.report import ReportError
from distill.transfer import TransferError, cmd_download, cmd_upload
from distill.vocab import VocabError

USER_ERRORS = (ConfigError, CorpusError, RecordsError, StorageError, TaskError, ArtifactError, VocabError,
               ReportError, TransferError)


def cmd_extract(args) -> None:
    from distill.extract import run_extraction

    cfg = load_config(args.config, args.overrides)
    print("[config]\n" + config_to_yaml(cfg), flush=True)
    run_extraction(cfg)
    print(f"records: {cfg.records.uri}  (look at them: distill inspect {cfg.records.uri})")


def cmd_inspect(args) -> None:
    from distill.records import describe

    print(describe(args.records, n_examples=args.examples))


EXIT_STOPPED = 75  # EX_TEMPFAIL: stopped early with a checkpoint; rerun the same command to resume


def cmd_train(args) -> int:
    from distill.train import finish_run, run_training

    cfg = load_config(args.config, args.overrides)
    print("[config]\n" + config_to_yaml(cfg), flush=True)
    outcome = finish_run(cfg, run_training(cfg))
    if not outcome["complete"]:
        print(f"[train] stopped at step {outcome['step']} of {outcome['total_steps']} with a checkpoint in "
              f"{cfg.train.run_dir}; rerun the same command to resume")
        return EXIT_STOPPED
    print_outcome(outcome)
    return 0


def _aligned(head: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    """A plain-text table: the first column left-aligned, the others right-aligned, two spaces apart."""
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    return ["    " + "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)
                               for i, (c, w) in enumerate(zip(row, widths))) for row in [head, *rows]]


def format_eval(ev: dict) -> list[str]:
    """The lines `print_outcome` shows for an `evaluate()` dict: the report's tables as text (exact
    agreement with the teacher of the student beside the baselines, all comments and per teacher-margin
    bucket; a few comments with both answers), the token-level figures and the human-label agreement.
    Parts an older eval dict lacks are left out."""
    from distill.report import baseline_table, sample_table

    base = ev.get("baselines")
    lines = [f"[eval] held out (n={ev['n']}): student-only exact {ev['student_only_exact']:.3f}"
             + (f"; baselines learnt from {base['n_train']} train records" if base else "")]
    if table := baseline_table(ev):
        lines += ["[eval] exact answer = teacher's", *_aligned(*table)]
    figures = [f"choice-point acc {ev['choice_point_acc']:.3f}"] if ev.get("choice_point_acc") is not None else []
    figures += [f"teacher-forced acc {ev['teacher_forced_acc']:.3f} (all positions, inflated by forced JSON)",
                f"JSON valid unconstrained {ev['json_valid_unconstrained']:.3f}",
                f"held-out KL {ev['held_out_kl']:.4f}"]
    lines.append("[eval] " + "; ".join(figures))
    human = ev.get("human") or {}
    if human.get("n"):
        lines.append(f"[eval] vs human {human['field']} labels (n={human['n']}): teacher "
                     f"{human['teacher_agreement']:.3f}, student {human['student_agreement']:.3f}")
    if table := sample_table(ev):
        head, rows = table
        rows = [(text if len(text) <= 60 else text[:57] + "...", *rest) for text, *rest in rows]
        lines += ["[eval] teacher vs student on a few held-out comments", *_aligned(head, rows)]
    return lines


def print_outcome(outcome: dict) -> None:
    if outcome["eval"]:
        print("\n".join(format_eval(outcome["eval"])))
    print(f"model:  {outcome['model']}")
    print(f"report: {outcome['report']}")


def cmd_eval(args) -> None:
    import json

    from distill import records
    from distill.evaluate import evaluate, training_rows
    from distill.inference import load_artifact
    from distill.train import human_labels_for, split_rows

    student = load_artifact(args.model, precision=args.precision)
    manifest = records.load_manifest(args.records)
    if manifest["vocab"]["ids"] != list(student.vocab.ids):
        raise RecordsError(f"{args.records}: records' output vocabulary differs from the model's; "
                           f"extract them with vocab.from_uri={args.model}")
    table = records.read_records(args.records, manifest)
    rows = [r for r in table.to_pylist() if args.split == "all" or r["split"] == args.split][:args.limit]
    if args.train_records:  # the baselines' training rows
        train_manifest = records.load_manifest(args.train_records)
        if train_manifest["task"] != manifest["task"]:
            raise RecordsError(f"{args.train_records}: records of another task than {args.records}")
        train_table = records.read_records(args.train_records, train_manifest)
        train_rows = training_rows(split_rows(train_table, args.max_train_rows)[0])
        if not train_rows:
            raise RecordsError(f"{args.train_records}: no records in the train split")
    else:
        train_rows = training_rows(split_rows(table, args.max_train_rows)[0])
    with student.autocast():
        metrics = evaluate(student.model, rows, student.vocab, student.sep_id, student.grammar,
                           manifest["logits_dtype"], student.model.cfg.max_comment_tokens,
                           human_labels=human_labels_for(student.task), train_rows=train_rows or None)
    print("\n".join(format_eval(metrics)) if args.text else json.dumps(metrics, indent=2))


def cmd_export(args) -> None:
    from distill.train import export_checkpoint

    print(f"model: {export_checkpoint(args.run_dir, args.out)}")


def cmd_classify(args) -> None:
    import json
    import time

    from distill.inference import load_artifact

    student = load_artifact(args.model, precision=args.precision)
    if args.texts:
        texts = args.texts
    elif args.file:
        with open(args.file, encoding="utf-8") as f:
            texts = [line.rstrip("\n") for line in f]
    else:
        texts = [line.rstrip("\n") for line in sys.stdin]
    start = time.perf_counter()
    results = student.classify(texts, constrained=not args.unconstrained, batch_size=args.batch_size)
    seconds = time.perf_counter() - start
    for r in results:
        print(json.dumps(r, ensure_ascii=False))
    print(f"[classify] {len(texts)} comments in {seconds:.2f}s ({len(texts) / max(seconds, 1e-9):.1f} comments/s)",
          file=sys.stderr)


def cmd_report(args) -> None:
    from distill.report import write_report

    html, md = write_report(args.run_dir)
    print(f"report: {html}\nsummary: {md}")


def cmd_model_info(args) -> None:
    import torch

    from distill.model import build_student, format_param_overview
    from distill.teacher import load_tokenizer
    from distill.train import teacher_shaped_student, with_input_vocab

    cfg = teacher_shaped_student(load_config(args.config, args.overrides))
    cfg = with_input_vocab(cfg, load_tokenizer(cfg.teacher))
    with torch.device("meta"):  # count parameters without allocating them
        model = build_student(cfg.student)
    s = cfg.student
    shape = (f"a copy of teacher layers {cfg.train.teacher_layers}" if cfg.train.teacher_layers is not None
             else f"student {s.preset}")
    print(f"{shape}: d_model {s.d_model}, {s.n_layers} layers, {s.n_heads} heads "
          f"({s.n_kv_heads} key/value, width {s.head_dim}), d_ff {s.d_ff}, "
          f"embedding rank {s.embed_rank or 'full'}, input vocab {s.input_vocab_size:,}, "
          f"output vocab {s.output_vocab_size}, context {s.context}")
    print(format_param_overview(model.param_overview()))


def cmd_bench(args) -> None:
    from distill.bench import cmd_bench as run

    run(args)


def cmd_plan(args) -> None:
    from distill.plan import cmd_plan as run

    run(args)


def add_precision_arg(p) -> None:
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="the student's forward passes: bf16 autocast or fp32; auto = bf16 on GPUs and on CPUs "
                        "with AVX512-BF16 / AMX (as train.precision)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distill", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("extract", help="run the teacher over a corpus and write teacher records")
    p.add_argument("--config", help="YAML job config (defaults: embedded teacher and corpus)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. teacher.batch_size=32")
    p.set_defaults(func=cmd_extract)

    p = sub.add_parser("inspect", help="show a record set: manifest, counts, decoded examples")
    p.add_argument("records", help="records directory or s3:// prefix")
    p.add_argument("--examples", type=int, default=3, help="how many decoded examples to show")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("train", help="train (or resume) the student on teacher records")
    p.add_argument("--config", help="YAML job config")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.strategy=deepspeed")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a model artifact on teacher records")
    p.add_argument("model", help="model artifact directory or s3:// prefix")
    p.add_argument("records", help="records directory or s3:// prefix")
    p.add_argument("--split", default="eval", choices=["eval", "train", "all"])
    p.add_argument("--limit", type=int, default=None, help="evaluate at most this many records")
    p.add_argument("--train-records", help="records whose train split the baselines learn from "
                                           "(default: RECORDS' train split, if it has one)")
    p.add_argument("--max-train-rows", type=int, help="the baselines learn from the first N of those train "
                                                       "records in id order, as train.max_train_rows")
    p.add_argument("--text", action="store_true", help="the tables `distill train` prints, not JSON")
    add_precision_arg(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("export", help="write a model artifact from a run's latest checkpoint")
    p.add_argument("run_dir", help="the run's train.run_dir")
    p.add_argument("out", help="artifact directory or s3:// prefix")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("classify", help="answer comments with a trained student, as JSON lines")
    p.add_argument("model", help="model artifact directory or s3:// prefix")
    p.add_argument("texts", nargs="*", help="comments (default: --file, else one per line on stdin)")
    p.add_argument("--file", help="a file with one comment per line")
    p.add_argument("--unconstrained", action="store_true", help="free decoding (answers may be invalid)")
    p.add_argument("--batch-size", type=int, default=64)
    add_precision_arg(p)
    p.set_defaults(func=cmd_classify)

    p = sub.add_parser("report", help="HTML report and markdown summary of a training run")
    p.add_argument("run_dir")
    p.set_defaults(func=cmd_report)

    for name, func, what in (("download", cmd_download, "s3:// prefix (or dir) -> local dir"),
                             ("upload", cmd_upload, "local dir -> s3:// prefix (or dir)")):
        p = sub.add_parser(name, help=f"copy a model artifact or run directory, {what}; verified, resumable")
        p.add_argument("src")
        p.add_argument("dest")
        p.add_argument("--quiet", action="store_true", help="no progress bar")
        p.set_defaults(func=func)

    p = sub.add_parser("bench", help="measure extraction, training and classification speed side by side")
    add_bench_args(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("plan", help="what a distillation job will take: hours, storage, dollars, break-even")
    add_plan_args(p)
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("model-info", help="parameter overview of the configured student")
    p.add_argument("--config", help="YAML job config")
    p.add_argument("overrides", nargs="*", help="e.g. student.preset=537m")
    p.set_defaults(func=cmd_model_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
