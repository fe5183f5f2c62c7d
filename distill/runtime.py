"""Joining Ray: the cluster a job was submitted to, or a fresh in-process one on this machine.

Under `ray job submit` (or with RAY_ADDRESS set) the driver joins that cluster. Otherwise
it starts a private local instance (`address="local"`), never a stray cluster that happens
to run on the machine.
"""

import os


def init_ray() -> None:
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        ray.init(address="local", include_dashboard=False)
    ray.data.DataContext.get_current().enable_progress_bars = False  # distill prints its own progress
