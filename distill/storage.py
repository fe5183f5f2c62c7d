"""One way to reach files, local or s3://, through fsspec.

Credentials for s3:// come from the standard AWS chain (environment, shared config,
instance profile); nothing here reads, prints or stores them. `AWS_ENDPOINT_URL`
points everything at an S3-compatible server (tests use a local one).

A file counts only when written whole: `write_bytes` renames a finished temporary
file into place locally, and an S3 PUT (or multipart upload) is atomic by itself.
"""

from __future__ import annotations

import os
import posixpath
import uuid

import fsspec
from fsspec.core import url_to_fs


class StorageError(OSError):
    """An input or output location that cannot be read or written; one line, naming the URI."""


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def join(uri: str, *parts: str) -> str:
    if is_remote(uri):
        return posixpath.join(uri, *parts)
    return os.path.join(uri, *parts)


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for a URI. S3 listings are not cached, so reruns see new files."""
    kwargs = {"use_listings_cache": False} if uri.startswith("s3://") else {}
    try:
        return url_to_fs(uri, **kwargs)
    except ImportError as e:
        raise StorageError(f"{uri}: no filesystem for this scheme ({e})") from None


def open_file(uri: str, mode: str = "rb"):
    fs, path = filesystem(uri)
    return fs.open(path, mode)


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.exists(path)


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    try:
        return fs.cat_file(path)
    except FileNotFoundError:
        raise StorageError(f"{uri}: no such file") from None


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole file so that readers see either nothing or all of it."""
    fs, path = filesystem(uri)
    if is_remote(uri):
        fs.pipe_file(path, data)
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def put_file(local_path: str, uri: str) -> None:
    """Move a finished local file to `uri` whole (rename locally, upload to S3), without reading it into memory."""
    fs, path = filesystem(uri)
    if is_remote(uri):
        fs.put_file(local_path, path)
        os.remove(local_path)
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    os.replace(local_path, path)


def list_files(uri: str) -> list[str]:
    """Full URIs of the files directly under a directory/prefix (empty if it does not exist)."""
    fs, path = filesystem(uri)
    try:
        names = fs.ls(path, detail=False)
    except FileNotFoundError:
        return []
    protocol = uri.split("://", 1)[0] + "://" if is_remote(uri) else ""
    return sorted(protocol + n if protocol and not n.startswith(protocol) else n for n in names)


def remove(uri: str) -> None:
    fs, path = filesystem(uri)
    fs.rm(path)


def check_writable(uri: str) -> None:
    """Fail fast, in one line, when an output location cannot be written."""
    probe = join(uri, f".write-probe-{uuid.uuid4().hex[:8]}")
    try:
        write_bytes(probe, b"ok")
        remove(probe)
    except Exception as e:  # noqa: BLE001 - any failure means "cannot write here"
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise StorageError(f"cannot write to {uri}: {reason}") from None
