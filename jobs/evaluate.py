"""Evaluation job: a model artifact on held-out teacher records, metrics as JSON.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python -m jobs.evaluate runs/demo/train/model runs/demo/records [--split eval]
    python -m jobs.evaluate runs/demo/train/model runs/demo/records
"""

import sys

from distill.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
