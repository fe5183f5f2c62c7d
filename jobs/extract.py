"""Teacher extraction job.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python -m jobs.extract --config jobs/configs/gemma3-270m_to_270m-layers0-3_cpu.yaml [key=value ...]
    python -m jobs.extract --config jobs/configs/gemma3-270m_to_270m-layers0-3_cpu.yaml      # one machine

Exits 0 only when every shard and the manifest are written.
"""

import sys

from distill.cli import main

if __name__ == "__main__":
    sys.exit(main(["extract", *sys.argv[1:]]))
