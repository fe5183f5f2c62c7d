"""Cluster scale on one machine: a real Ray head on 127.0.0.1, `ray job submit`, storage on a local S3 server.

The head is started by this module with `ray start --head --block` in its own process
group and stopped by signalling that group only: `ray stop` would stop every Ray
process of the machine. The head inherits the test session's AWS variables (pointing
at the local S3 server), as cluster nodes get their credentials from an instance
profile: nothing secret travels in a job.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import boto3
import pytest

from distill import records, storage

pytestmark = [pytest.mark.cluster, pytest.mark.s3]

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
BUCKET = "distill-cluster"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head(s3_server):
    gcs_port, dashboard_port = free_port(), free_port()
    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths must stay < 108 chars
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_JOB_STOP_WAIT_TIME_S="60",
               PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", f"--port={gcs_port}", "--num-cpus=2",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}", "--include-dashboard=true",
         f"--temp-dir={temp_dir}", "--disable-usage-stats"],
        env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    address = f"http://127.0.0.1:{dashboard_port}"
    from ray.job_submission import JobSubmissionClient

    deadline = time.time() + 120
    while True:
        try:
            client = JobSubmissionClient(address)
            client.list_jobs()
            break
        except Exception:
            if time.time() > deadline or head.poll() is not None:
                os.killpg(head.pid, signal.SIGKILL)
                pytest.fail("the Ray head did not come up")
            time.sleep(1)
    boto3.client("s3").create_bucket(Bucket=BUCKET)
    yield {"address": address, "client": client, "env": env, "gcs": f"127.0.0.1:{gcs_port}"}
    os.killpg(head.pid, signal.SIGTERM)  # only the processes this test started
    try:
        head.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)


def submit(head, *args: str) -> str:
    """`ray job submit --no-wait` exactly as a user types it; returns the job id."""
    deadline = time.time() + 120
    while True:
        done = subprocess.run(
            [str(BIN / "ray"), "job", "submit", "--address", head["address"], "--working-dir", str(REPO), "--no-wait",
             "--", "python", *args], env=head["env"], capture_output=True, text=True)
        # a head under load may not have its job agent up yet: Ray answers "please try again later"
        if done.returncode == 0 or "No available agent" not in done.stderr or time.time() > deadline:
            break
        time.sleep(3)
    assert done.returncode == 0, f"ray job submit failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return next(line.split("'")[1] for line in done.stdout.splitlines() if "submitted successfully" in line)


def wait_for(head, job_id: str, timeout: float = 600) -> str:
    from ray.job_submission import JobStatus

    deadline = time.time() + timeout
    while time.time() < deadline:
        status = head["client"].get_job_status(job_id)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            return status
        time.sleep(2)
    raise AssertionError(f"job {job_id} still {status} after {timeout}s:\n{head['client'].get_job_logs(job_id)[-3000:]}")


def job_args(tiny_teacher_dir, run: str, *extra: str) -> list[str]:
    return [f"teacher.model={tiny_teacher_dir}", f"records.uri=s3://{BUCKET}/{run}/records",
            f"train.run_dir=s3://{BUCKET}/{run}/train", "corpus.limit=40", "records.shard_size=10",
            "teacher.batch_size=5", "student.preset=tiny", "train.epochs=2", "train.micro_batch_size=8",
            "train.init_from_teacher=false", "train.eval_rows=8", "teacher.cpu_threads=1", "train.cpu_threads=1",
            *extra]


def test_pipeline_job_on_s3_then_download_and_classify(ray_head, tiny_teacher_dir, tmp_path):
    job = submit(ray_head, "-m", "jobs.pipeline", *job_args(tiny_teacher_dir, "pipeline"))
    status = wait_for(ray_head, job)
    logs = ray_head["client"].get_job_logs(job)
    assert status == "SUCCEEDED", logs[-3000:]
    assert "testing" not in logs  # the S3 secret never reaches a log
    assert "student ->" in logs and "teacher ->" in logs  # the samples, answered by both
    base = f"s3://{BUCKET}/pipeline"
    assert records.load_manifest(f"{base}/records")["rows"] == 40
    listing = storage.list_files(f"{base}/train")
    assert any(u.rsplit("/", 1)[-1].startswith("checkpoint_") for u in listing)
    for name in ("model/SHA256SUMS", "report.html", "summary.md", "eval.json", "metrics.jsonl"):
        assert storage.exists(f"{base}/train/{name}"), name

    local = tmp_path / "model"
    subprocess.run([str(BIN / "distill"), "download", f"{base}/train/model", str(local), "--quiet"], check=True)
    out = subprocess.run([str(BIN / "distill"), "classify", str(local), "you are all idiots", "have a nice day"],
                         capture_output=True, text=True, check=True).stdout
    answers = [json.loads(line) for line in out.splitlines()]
    assert len(answers) == 2 and all(a["valid"] for a in answers)


def test_killing_an_extraction_actor_mid_run_loses_and_doubles_nothing(ray_head, tiny_teacher_dir):
    from ray.util.state import list_actors

    uri = f"s3://{BUCKET}/killed/records"
    job = submit(ray_head, "-m", "jobs.extract", *job_args(tiny_teacher_dir, "killed", "corpus.limit=60",
                                                           "records.shard_size=3", "teacher.batch_size=3"))
    deadline = time.time() + 300
    while time.time() < deadline and not records.existing_shards(uri):
        time.sleep(0.5)
    actors = [a for a in list_actors(address=ray_head["gcs"], filters=[("state", "=", "ALIVE")])
              if "ShardWriter" in a.class_name]
    assert actors, "no extraction actor found"
    os.kill(actors[0].pid, signal.SIGKILL)
    status = wait_for(ray_head, job)
    assert status == "SUCCEEDED", ray_head["client"].get_job_logs(job)[-3000:]
    ids = records.read_records(uri).column("id").to_pylist()
    assert len(ids) == 60 == len(set(ids))


def test_stopped_training_job_resumes_when_resubmitted(ray_head, tiny_teacher_dir):
    # Trains on the records the pipeline test above wrote to s3://distill-cluster/pipeline/records.
    args = job_args(tiny_teacher_dir, "pipeline", "train.epochs=24", "train.checkpoint_every=5",
                    "train.run_dir=s3://distill-cluster/stopped/train")
    job = submit(ray_head, "-m", "jobs.train", *args)
    deadline = time.time() + 300
    while time.time() < deadline and not any(
            u.rsplit("/", 1)[-1].startswith("checkpoint_") for u in storage.list_files(f"s3://{BUCKET}/stopped/train")):
        time.sleep(1)
    subprocess.run([str(BIN / "ray"), "job", "stop", "--address", ray_head["address"], job], env=ray_head["env"],
                   check=True, capture_output=True)
    assert wait_for(ray_head, job) in ("STOPPED", "FAILED")
    assert not storage.exists(f"s3://{BUCKET}/stopped/train/model/SHA256SUMS")

    again = submit(ray_head, "-m", "jobs.train", *args)
    status = wait_for(ray_head, again)
    logs = ray_head["client"].get_job_logs(again)
    assert status == "SUCCEEDED", logs[-3000:]
    assert "resumed at step" in logs
    assert storage.exists(f"s3://{BUCKET}/stopped/train/model/SHA256SUMS")
