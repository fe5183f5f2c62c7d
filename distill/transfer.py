"""`distill download` / `distill upload`: copy a model artifact or a whole run directory
between S3 (or any path storage.py reaches) and a local directory, resumably and verified.

    distill download s3://bucket/runs/a/train/model models/a   # an artifact: every file checked against SHA256SUMS
    distill download s3://bucket/runs/a/train runs/a           # a run: checkpoint_*/, metrics, report, model/
    distill upload models/a s3://bucket/models/a               # SHA256SUMS checked here first, uploaded last

Download lists every file under the prefix (recursively) and fetches each into
`<dest>/<relative path>.part`, renamed to its final name only once it checks out:
- a broken download resumes: an existing `.part` file is continued from its size with a
  ranged read, so only the missing bytes travel again;
- a file already at its final name with the right size (and sha256, where known) is skipped;
- every file a `SHA256SUMS` lists must match it: model artifacts have one at their top
  (`sha256  name` lines, see distill/inference.py), and a run's `model/` has its own.
  On a mismatch `DownloadError` names the file and its bad `.part` is deleted (the next
  try starts that file afresh). Every `SHA256SUMS` comes last, so a local artifact is
  complete once it appears;
- other files (a run's checkpoints, metrics) must have the size the listing gave. A run's
  files are written once (Ray Train makes a new `checkpoint_*` directory each time), so
  sizes are a fair check there, but they would not notice a file rewritten on S3 with the
  same size between a broken download and its resumption.

Upload sends every local file (no resumption: an S3 object appears whole or not at all,
so rerun a broken upload). Every file a `SHA256SUMS` lists is checked locally before
anything is sent; the destination's old `SHA256SUMS` files are deleted first and the new
ones sent last, so readers never take a half-replaced artifact for a complete one.
Afterwards every uploaded object's size is compared with its local file.

`.part` files are never sent nor listed as content. Credentials come from the standard
AWS chain (see storage.py); nothing here reads or prints them.
"""

from __future__ import annotations

import hashlib
import logging
import os
import posixpath
import re
import shutil

from fsspec.callbacks import Callback
from tqdm.auto import tqdm

from distill import storage

SUMS_NAME = "SHA256SUMS"  # the model artifact's checksum file (distill.inference.SUMS_NAME), written last
PART_SUFFIX = ".part"
CHUNK = 8 * 2**20  # bytes per read: one ranged GET each on S3

log = logging.getLogger(__name__)


class TransferError(ValueError):
    """A download or upload that cannot be done or does not check out; one line, naming the file."""


class DownloadError(TransferError):
    """A downloaded file that does not match SHA256SUMS or the listing, or a source that cannot be listed."""


class UploadError(TransferError):
    """A local artifact that does not match its own SHA256SUMS, or an upload that did not arrive whole."""


# -----------------------------------------------------------------------------
# Listing and checksums


def _listing(uri: str, error: type[TransferError]) -> dict[str, int]:
    """Relative path (with /) -> size of every file under a directory or prefix, `.part` files left out."""
    fs, root = storage.filesystem(uri)
    root = root.rstrip("/")
    try:
        found = fs.find(root, detail=True)
    except OSError as e:
        raise error(f"{uri}: cannot list ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    files = {}
    for path, info in found.items():
        if path.rstrip("/") == root:
            raise error(f"{uri}: is a file; give the directory or prefix that holds it")
        rel = path[len(root) + 1:]
        if rel.startswith("/") or ".." in rel.split("/"):
            raise error(f"{uri}: refusing {path!r}, it would land outside the destination")
        if not rel.endswith(PART_SUFFIX):
            files[rel] = int(info["size"])
    return files


def _parse_sums(text: str, uri: str, error: type[TransferError]) -> dict[str, str]:
    """name -> sha256 from `sha256sum` output (`<64 hex>  <name>`, or ` *<name>` for binary mode)."""
    expected = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        digest, mode, name = line[:64], line[64:66], line[66:]
        if not re.fullmatch(r"[0-9a-f]{64}", digest) or mode not in ("  ", " *") or not name:
            raise error(f"{uri}: malformed line {line!r}")
        expected[name] = digest
    return expected


def _sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _mismatch(path: str, size: int, sha256: str | None) -> str | None:
    """Why the local file at `path` is not the expected one, or None if it is."""
    actual = os.path.getsize(path)
    if actual != size:
        return f"{actual} bytes where {size} were expected"
    if sha256 is not None and _sha256_file(path) != sha256:
        return f"sha256 does not match {SUMS_NAME}"
    return None


def _expected_sha256(uri: str, files: dict[str, int], error: type[TransferError]) -> dict[str, str]:
    """Relative path -> sha256 of every file a SHA256SUMS vouches for: one at the top (an artifact) or in any
    subdirectory (a run's `model/`). Each SHA256SUMS is included with the hash of the bytes read here."""
    expected = {}
    for sums_rel in (rel for rel in files if posixpath.basename(rel) == SUMS_NAME):
        raw = storage.read_bytes(storage.join(uri, sums_rel))
        folder = posixpath.dirname(sums_rel)
        for name, digest in _parse_sums(raw.decode(), storage.join(uri, sums_rel), error).items():
            rel = posixpath.join(folder, name)
            if rel not in files:
                raise error(f"{storage.join(uri, rel)}: listed in {SUMS_NAME} but not there")
            expected[rel] = digest
        expected[sums_rel] = hashlib.sha256(raw).hexdigest()
    return expected


def _sums_last(rel: str) -> tuple[bool, str]:
    """Sort key: every SHA256SUMS after all other files, so a copy is complete once they appear."""
    return posixpath.basename(rel) == SUMS_NAME, rel


def _bar(total: int, desc: str, progress: bool) -> tqdm:
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=not progress)


# -----------------------------------------------------------------------------
# Download


def download(src: str, dest: str, progress: bool = True) -> list[str]:
    """Copy every file under `src` (s3:// or local) into the local directory `dest`; returns the local paths.

    Resumes `.part` files, skips complete files, verifies against SHA256SUMS or sizes (module docstring)."""
    files = _listing(src, DownloadError)
    if not files:
        raise DownloadError(f"{src}: no files there")
    expected = _expected_sha256(src, files, DownloadError)
    fs, root = storage.filesystem(src)
    root = root.rstrip("/")
    written, skipped = [], 0
    with _bar(sum(files.values()), f"download {src}", progress) as bar:
        for rel in sorted(files, key=_sums_last):
            final = os.path.join(dest, *rel.split("/"))
            size, sha256 = files[rel], expected.get(rel)
            if os.path.isfile(final):
                if _mismatch(final, size, sha256) is None:
                    skipped += 1
                    bar.update(size)
                    written.append(final)
                    continue
                os.remove(final)  # a stale or damaged copy: never leave it under the final name
            part = final + PART_SUFFIX
            _fetch(fs, f"{root}/{rel}", part, size, rel, bar)
            problem = _mismatch(part, size, sha256)
            if problem:
                os.remove(part)
                raise DownloadError(f"{storage.join(src, rel)}: {problem}; not kept, rerun to fetch it again")
            os.replace(part, final)
            written.append(final)
    if skipped:
        log.info("%s: %d of %d files were already complete in %s", src, skipped, len(files), dest)
    return written


def _fetch(fs, path: str, part: str, size: int, rel: str, bar: tqdm) -> None:
    """Append the bytes of `path` that `part` lacks (all of them if there is no `part`, or one too long)."""
    offset = os.path.getsize(part) if os.path.exists(part) else 0
    if offset > size:
        offset = 0
    if offset:
        log.info("%s: resuming at byte %d of %d", rel, offset, size)
        bar.update(offset)
    os.makedirs(os.path.dirname(part) or ".", exist_ok=True)
    with fs.open(path, "rb") as fin, open(part, "ab" if offset else "wb") as fout:
        fin.seek(offset)  # S3: the reads below are ranged GETs from here on
        while chunk := fin.read(CHUNK):
            fout.write(chunk)
            bar.update(len(chunk))


# -----------------------------------------------------------------------------
# Upload


class _BarCallback(Callback):
    """fsspec's progress hook, advancing the shared tqdm bar by the bytes each put reports."""

    def __init__(self, bar: tqdm):
        super().__init__()
        self.bar = bar

    def relative_update(self, inc=1):
        self.bar.update(inc)


def upload(src: str, dest: str, progress: bool = True) -> list[str]:
    """Copy every file under the local directory `src` to `dest` (s3:// or local); returns the destination URIs.

    What a SHA256SUMS lists is verified locally first; every SHA256SUMS is sent last (module docstring)."""
    if not os.path.isdir(src):
        raise UploadError(f"{src}: not a local directory")
    files = _listing(src, UploadError)
    if not files:
        raise UploadError(f"{src}: no files there")
    expected = _expected_sha256(src, files, UploadError)
    for rel, sha256 in sorted(expected.items()):
        problem = _mismatch(os.path.join(src, *rel.split("/")), files[rel], sha256)
        if problem:
            raise UploadError(f"{os.path.join(src, rel)}: {problem}; nothing uploaded")
    fs, root = storage.filesystem(dest)
    root = root.rstrip("/")
    for rel in files:
        if posixpath.basename(rel) == SUMS_NAME and fs.exists(f"{root}/{rel}"):
            fs.rm_file(f"{root}/{rel}")  # that folder is incomplete until its new SHA256SUMS lands
    uploaded = []
    with _bar(sum(files.values()), f"upload {dest}", progress) as bar:
        for rel in sorted(files, key=_sums_last):
            local = os.path.join(src, *rel.split("/"))
            target = f"{root}/{rel}"
            if storage.is_remote(dest):
                fs.put_file(local, target, callback=_BarCallback(bar))  # S3: one PUT, or a multipart upload
            else:
                os.makedirs(os.path.dirname(target), exist_ok=True)
                shutil.copyfile(local, target + PART_SUFFIX)
                os.replace(target + PART_SUFFIX, target)
                bar.update(files[rel])
            uploaded.append(storage.join(dest, rel))
    arrived = _listing(dest, UploadError)
    for rel, size in files.items():
        if arrived.get(rel) != size:
            raise UploadError(f"{storage.join(dest, rel)}: {arrived.get(rel)} bytes arrived where {size} were sent")
    return uploaded


# -----------------------------------------------------------------------------
# Command line (wired into distill/cli.py)


def cmd_download(args) -> None:
    """`distill download SRC DEST [--quiet]`."""
    logging.basicConfig(level=logging.INFO, format="[download] %(message)s")  # resumed and skipped files
    paths = download(args.src, args.dest, progress=not args.quiet)
    print(f"downloaded {len(paths)} files to {args.dest}")


def cmd_upload(args) -> None:
    """`distill upload SRC DEST [--quiet]`."""
    paths = upload(args.src, args.dest, progress=not args.quiet)
    print(f"uploaded {len(paths)} files to {args.dest}")
