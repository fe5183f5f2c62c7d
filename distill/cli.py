"""The `distill` command line: thin wrappers that parse, build a config, run, and report.

    distill extract --config FILE [key=value ...]   teacher records from a corpus
    distill inspect RECORDS                         manifest, counts and a few decoded examples

Errors in the input (config, corpus, task, records, storage) print one line and exit 2.
"""

from __future__ import annotations

import argparse
import sys

from distill.config import ConfigError, config_to_yaml, load_config
from distill.corpus import CorpusError
from distill.records import RecordsError
from distill.storage import StorageError
from distill.task import TaskError

USER_ERRORS = (ConfigError, CorpusError, RecordsError, StorageError, TaskError)


def cmd_extract(args) -> None:
    from distill.extract import run_extraction

    cfg = load_config(args.config, args.overrides)
    print("[config]\n" + config_to_yaml(cfg), flush=True)
    run_extraction(cfg)
    print(f"records: {cfg.records.uri}  (look at them: distill inspect {cfg.records.uri})")


def cmd_inspect(args) -> None:
    from distill.records import describe

    print(describe(args.records, n_examples=args.examples))


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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
