"""Paths that may be in Cloud Storage: `resolve` turns a config path (`run.dir`, a data glob, a
checkpoint) into an etils.epath Path, local paths stay local; `Staging` keeps a remote run
directory's appended files (metrics, TensorBoard) locally and uploads them when asked.

epath reads and writes `gs://` through tf.io.gfile when TensorFlow is installed, else through
fsspec (gcsfs: `pip install "maxlm[gcs]"`); `EPATH_USE_TF=false` forces gcsfs.
"""

from __future__ import annotations

import glob as pyglob
import hashlib
import os
import re
import shutil
from pathlib import Path
from typing import BinaryIO

import fsspec
from etils import epath

_URL = re.compile(r"^[a-z][a-z0-9+.-]*://")
STAGING_ROOT = "~/.cache/maxlm/runs"  # local copies of remote run directories' appended files


def is_remote(location: str | os.PathLike[str]) -> bool:
    """Whether `location` is a URL (`gs://bucket/...`) rather than a local path."""
    return bool(_URL.match(os.fspath(location)))


def resolve(location: str | os.PathLike[str]) -> epath.Path:
    """The epath Path of a config path: a URL as it is, a local path absolute with ~ expanded
    (pathlib would turn `gs://b/x` into `gs:/b/x`)."""
    if is_remote(location):
        return epath.Path(os.fspath(location))
    return epath.Path(os.path.abspath(os.path.expanduser(os.fspath(location))))


def glob(pattern: str) -> list[str]:
    """The files matching `pattern` (`**` recurses), sorted; a URL pattern through fsspec (epath
    refuses `**` on buckets), its matches as URLs."""
    if not is_remote(pattern):
        matches = pyglob.glob(os.path.expanduser(pattern), recursive=True)
        return sorted(m for m in matches if os.path.isfile(m))
    fs, path = fsspec.core.url_to_fs(pattern)
    protocol = pattern.split("://", 1)[0]
    return sorted(f"{protocol}://{m}" for m in fs.glob(path) if fs.isfile(m))


def open_read(location: str) -> BinaryIO:
    """A data file opened to read bytes: with the builtin open when local (it is called per
    document), else through fsspec, like `glob`, whatever epath's backend: pyarrow needs a real
    file object (TensorFlow's GFile, which epath may pick, has no `closed`)."""
    if is_remote(location):
        return fsspec.open(location, "rb").open()
    return open(location, "rb")


def size(location: str) -> int:
    """A data file's size in bytes."""
    if is_remote(location):
        fs, path = fsspec.core.url_to_fs(location)
        return int(fs.size(path))
    return os.path.getsize(location)


def append_text(path: epath.Path, text: str) -> None:
    """Append to a file; a remote object cannot be appended to, so it is rewritten whole (for
    rare lines only: events)."""
    if not is_remote(path):
        with open(path, "a") as f:
            f.write(text)
        return
    path.write_text((path.read_text() if path.exists() else "") + text)


def move(source: epath.Path, target: epath.Path) -> None:
    """Move a file or directory tree (a remote one object by object: buckets have no rename)."""
    if not is_remote(source):
        shutil.move(os.fspath(source), os.fspath(target))
        return
    fs, source_path = fsspec.core.url_to_fs(os.fspath(source))
    fs.mv(source_path, fsspec.core.url_to_fs(os.fspath(target))[1], recursive=True)


class Staging:
    """Where a run writes its appended files: the run directory itself when it is local; for a
    remote one, a local directory (under STAGING_ROOT, named for it) whose files `sync` uploads
    when they changed (at checkpoints and at the end)."""

    def __init__(self, run_dir: epath.Path) -> None:
        self.run_dir = run_dir
        self.remote = is_remote(run_dir)
        self.local = Path(os.fspath(run_dir))
        if self.remote:
            digest = hashlib.sha256(os.fspath(run_dir).encode()).hexdigest()[:16]
            self.local = Path(os.path.expanduser(STAGING_ROOT)) / f"{run_dir.name}-{digest}"
        self.local.mkdir(parents=True, exist_ok=True)
        self._uploaded: dict[Path, tuple[int, int]] = {}  # file -> (size, mtime_ns) uploaded

    def sync(self, *names: str) -> None:
        """Upload the files (or directory trees) `names` that changed since the last sync."""
        if not self.remote:
            return
        for name in names:
            top = self.local / name
            files = [top] if top.is_file() else sorted(p for p in top.rglob("*") if p.is_file())
            for file in files:
                stat = file.stat()
                if self._uploaded.get(file) == (stat.st_size, stat.st_mtime_ns):
                    continue
                target = self.run_dir / file.relative_to(self.local).as_posix()
                target.write_bytes(file.read_bytes())
                self._uploaded[file] = (stat.st_size, stat.st_mtime_ns)
