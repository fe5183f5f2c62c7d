"""distill.transfer: artifacts and run directories to and from the local S3 server, verified and resumable."""

import argparse
import hashlib
import logging
import os

import boto3
import pytest

from distill import storage
from distill.transfer import PART_SUFFIX, SUMS_NAME, DownloadError, UploadError, cmd_download, download, upload


def _write(root, rel: str, data: bytes) -> None:
    path = os.path.join(root, *rel.split("/"))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def _read_tree(root) -> dict[str, bytes]:
    tree = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                tree[os.path.relpath(path, root).replace(os.sep, "/")] = f.read()
    return tree


@pytest.fixture
def artifact(tmp_path):
    """A small fake model artifact: the files distill.inference writes, and SHA256SUMS over them."""
    files = {"model.safetensors": os.urandom(300_000), "config.json": b'{"format_version": 1}',
             "vocab.json": b'{"ids": [1, 2]}', "task.json": b'{"name": "t"}', "tokenizer.json": b"{}"}
    root = tmp_path / "artifact"
    for name, data in files.items():
        _write(root, name, data)
    sums = "".join(f"{hashlib.sha256(data).hexdigest()}  {name}\n" for name, data in sorted(files.items()))
    _write(root, SUMS_NAME, sums.encode())
    return root


def test_sums_name_is_the_artifact_format():
    from distill.inference import SUMS_NAME as ARTIFACT_SUMS_NAME

    assert SUMS_NAME == ARTIFACT_SUMS_NAME


@pytest.mark.s3
def test_artifact_round_trip(s3_bucket, artifact, tmp_path, caplog):
    from distill.inference import read_artifact

    uri = f"{s3_bucket}/models/a"
    sent = upload(str(artifact), uri, progress=True)
    assert sent[-1] == f"{uri}/{SUMS_NAME}"  # written last
    assert sorted(os.path.basename(u) for u in storage.list_files(uri)) == sorted(os.listdir(artifact))

    out = tmp_path / "out"
    got = download(uri, str(out))
    assert got[-1] == os.path.join(str(out), SUMS_NAME)
    assert _read_tree(out) == _read_tree(artifact)
    assert set(read_artifact(str(out))) == set(os.listdir(artifact))  # the artifact format's own check passes

    with caplog.at_level(logging.INFO, logger="distill.transfer"):
        download(uri, str(out), progress=False)  # again: nothing to fetch
    assert "6 of 6 files were already complete" in caplog.text


@pytest.mark.s3
def test_corrupted_object_is_refused(s3_bucket, artifact, tmp_path):
    uri = f"{s3_bucket}/models/a"
    upload(str(artifact), uri, progress=False)
    good = (artifact / "model.safetensors").read_bytes()
    storage.write_bytes(f"{uri}/model.safetensors", bytes([good[0] ^ 1]) + good[1:])  # same size, one bit off

    out = tmp_path / "out"
    with pytest.raises(DownloadError, match=r"models/a/model\.safetensors: sha256 does not match SHA256SUMS"):
        download(uri, str(out), progress=False)
    assert not (out / "model.safetensors").exists()
    assert not (out / f"model.safetensors{PART_SUFFIX}").exists()  # not resumed from next time either
    assert not (out / SUMS_NAME).exists()  # the local copy does not pass for a complete artifact


@pytest.mark.s3
def test_stale_local_file_is_replaced(s3_bucket, artifact, tmp_path):
    uri = f"{s3_bucket}/models/a"
    upload(str(artifact), uri, progress=False)
    out = tmp_path / "out"
    _write(out, "config.json", b'{"format_version": 0}')  # same size as the real one, other bytes
    download(uri, str(out), progress=False)
    assert _read_tree(out) == _read_tree(artifact)


@pytest.mark.s3
def test_resume_fetches_only_the_rest(s3_bucket, tmp_path, caplog):
    """A `.part` holding the first half is continued, not refetched: its (deliberately different)
    first half survives, and the second half comes from S3."""
    remote = os.urandom(1_000_000)
    storage.write_bytes(f"{s3_bucket}/runs/r/metrics.bin", remote)
    out = tmp_path / "out"
    half = len(remote) // 2
    _write(out, "metrics.bin" + PART_SUFFIX, b"\0" * half)

    with caplog.at_level(logging.INFO, logger="distill.transfer"):
        download(f"{s3_bucket}/runs/r", str(out), progress=False)
    assert (out / "metrics.bin").read_bytes() == b"\0" * half + remote[half:]
    assert f"metrics.bin: resuming at byte {half} of {len(remote)}" in caplog.text
    assert not (out / ("metrics.bin" + PART_SUFFIX)).exists()


@pytest.mark.s3
def test_resumed_artifact_is_verified(s3_bucket, artifact, tmp_path):
    uri = f"{s3_bucket}/models/a"
    upload(str(artifact), uri, progress=False)
    weights = (artifact / "model.safetensors").read_bytes()
    out = tmp_path / "out"

    _write(out, "model.safetensors" + PART_SUFFIX, weights[:1000])  # a genuine first part: completes
    download(uri, str(out), progress=False)
    assert (out / "model.safetensors").read_bytes() == weights

    (out / "model.safetensors").unlink()
    (out / SUMS_NAME).unlink()
    _write(out, "model.safetensors" + PART_SUFFIX, b"\0" * 1000)  # a damaged first part: caught, dropped
    with pytest.raises(DownloadError, match="model.safetensors: sha256 does not match"):
        download(uri, str(out), progress=False)
    download(uri, str(out), progress=False)  # the rerun starts that file afresh
    assert _read_tree(out) == _read_tree(artifact)


@pytest.mark.s3
def test_nested_run_directory(s3_bucket, artifact, tmp_path):
    """A whole run: checkpoints in subdirectories, and the final model under model/ with its own SHA256SUMS."""
    run = tmp_path / "run"
    files = {"config.yaml": b"train: {}\n", "metrics.jsonl": b'{"step": 1}\n',
             "checkpoint_000001/model.safetensors": os.urandom(5000),
             "checkpoint_000002/deepspeed/ds/mp_rank_00_model_states.pt": os.urandom(7000),
             "checkpoint_000002/model.safetensors": os.urandom(5000), "empty.txt": b""}
    files.update({f"model/{name}": data for name, data in _read_tree(artifact).items()})
    for rel, data in files.items():
        _write(run, rel, data)
    uri = f"{s3_bucket}/runs/a"
    upload(str(run), uri, progress=False)
    storage.write_bytes(f"{s3_bucket}/runs/ab/other.txt", b"a sibling prefix, not part of runs/a")

    out = tmp_path / "out"
    got = download(uri, str(out), progress=False)
    assert _read_tree(out) == files
    assert sorted(got) == sorted(os.path.join(str(out), *rel.split("/")) for rel in files)
    assert got[-1] == os.path.join(str(out), "model", SUMS_NAME)  # the nested artifact is complete once it appears

    storage.write_bytes(f"{uri}/model/vocab.json", b'{"ids": [1, 3]}')  # same size, other bytes: caught
    with pytest.raises(DownloadError, match=r"runs/a/model/vocab\.json: sha256 does not match SHA256SUMS"):
        download(uri, str(tmp_path / "again"), progress=False)


@pytest.mark.s3
def test_upload_refuses_a_damaged_artifact(s3_bucket, artifact):
    _write(artifact, "vocab.json", b'{"ids": [1, 3]}')
    with pytest.raises(UploadError, match=r"vocab\.json: sha256 does not match SHA256SUMS; nothing uploaded"):
        upload(str(artifact), f"{s3_bucket}/models/a", progress=False)
    assert boto3.client("s3").list_objects_v2(Bucket="distill-test").get("KeyCount") == 0


@pytest.mark.s3
def test_upload_replaces_an_artifact(s3_bucket, artifact, tmp_path):
    uri = f"{s3_bucket}/models/a"
    upload(str(artifact), uri, progress=False)
    newer = tmp_path / "newer"
    data = os.urandom(300_000)
    _write(newer, "model.safetensors", data)
    _write(newer, SUMS_NAME, f"{hashlib.sha256(data).hexdigest()}  model.safetensors\n".encode())
    upload(str(newer), uri, progress=False)
    out = tmp_path / "out"
    download(uri, str(out), progress=False)
    assert (out / "model.safetensors").read_bytes() == data


@pytest.mark.s3
def test_bad_sources_fail_in_one_line(s3_bucket, tmp_path):
    with pytest.raises(DownloadError, match="models/none: no files there"):
        download(f"{s3_bucket}/models/none", str(tmp_path / "out"), progress=False)
    storage.write_bytes(f"{s3_bucket}/m/model.safetensors", b"w")
    storage.write_bytes(f"{s3_bucket}/m/{SUMS_NAME}", f"{'0' * 64}  config.json\n".encode())
    with pytest.raises(DownloadError, match="m/config.json: listed in SHA256SUMS but not there"):
        download(f"{s3_bucket}/m", str(tmp_path / "out"), progress=False)
    storage.write_bytes(f"{s3_bucket}/m/{SUMS_NAME}", b"not a checksum line\n")
    with pytest.raises(DownloadError, match="malformed line 'not a checksum line'"):
        download(f"{s3_bucket}/m", str(tmp_path / "out"), progress=False)
    with pytest.raises(DownloadError, match="is a file"):
        download(f"{s3_bucket}/m/model.safetensors", str(tmp_path / "out"), progress=False)
    with pytest.raises(UploadError, match="not a local directory"):
        upload(str(tmp_path / "missing"), f"{s3_bucket}/x", progress=False)


def test_local_to_local_and_cli(artifact, tmp_path, capsys):
    """The same commands between local directories (no S3), through the argparse handlers."""
    copy = tmp_path / "copy"
    upload(str(artifact), str(copy), progress=False)
    assert _read_tree(copy) == _read_tree(artifact)
    cmd_download(argparse.Namespace(src=str(copy), dest=str(tmp_path / "back"), quiet=True))
    assert capsys.readouterr().out.strip() == f"downloaded 6 files to {tmp_path / 'back'}"
    assert _read_tree(tmp_path / "back") == _read_tree(artifact)
