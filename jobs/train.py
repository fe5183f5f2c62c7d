"""Student training job (resumes from the run's latest checkpoint when rerun).

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python -m jobs.train --config jobs/configs/gemma3-270m_to_270m-layers0-3_cpu.yaml [key=value ...]
    python -m jobs.train --config jobs/configs/gemma3-270m_to_270m-layers0-3_cpu.yaml      # one machine

Exits 0 only when training finished and the model, eval.json and report are written;
75 when it stopped early with a checkpoint (rerun to resume).
"""

import sys

from distill.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
