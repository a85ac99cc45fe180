"""Documents: the texts a run trains on, read lazily from files, and their train/eval split."""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import sysconfig
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from maxlm.config import ConfigError, SourceConfig

_SITE_DIRS = {"site-packages", "dist-packages"}


@dataclass(frozen=True, eq=False)
class Documents:
    """Random-access documents (a grain data source): doc i is `nbytes[i]` bytes of
    `files[file_index[i]]` starting at `offset[i]`, decoded as UTF-8 (bad bytes replaced);
    with a `text_field`, those bytes are a JSON record and the document is that field."""

    files: list[str]
    file_index: np.ndarray
    offset: np.ndarray
    nbytes: np.ndarray
    ids: list[str]
    text_field: str | None = field(default=None)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> str:
        with open(self.files[self.file_index[i]], "rb") as f:
            f.seek(int(self.offset[i]))
            raw = f.read(int(self.nbytes[i])).decode("utf-8", errors="replace")
        return raw if self.text_field is None else _field_text(json.loads(raw), self.text_field)

    def subset(self, indices: Sequence[int] | np.ndarray) -> Documents:
        """The documents at `indices`, in that order."""
        indices = np.asarray(indices, dtype=np.int64)
        return Documents(
            files=self.files,
            file_index=self.file_index[indices],
            offset=self.offset[indices],
            nbytes=self.nbytes[indices],
            ids=[self.ids[i] for i in indices],
            text_field=self.text_field,
        )


def documents(cfg: SourceConfig) -> Documents:
    """The documents `cfg` names: the interpreter's stdlib, or files matching globs."""
    if cfg.kind == "python_stdlib":
        root = Path(sysconfig.get_paths()["stdlib"])
        files = [
            str(p)
            for p in sorted(root.rglob("*.py"))
            if p.is_file() and not _SITE_DIRS & set(p.relative_to(root).parts)
        ]
        return _per_file(files, ids=[os.path.relpath(f, root) for f in files])
    files = _glob_all(cfg.paths)
    if cfg.kind == "jsonl":
        return _json_lines(files, cfg.text_field)
    if cfg.document_per == "line":
        return _per_line(files)
    return _per_file(files, ids=files)


def _glob_all(patterns: list[str]) -> list[str]:
    found: set[str] = set()
    for pattern in patterns:
        matches = glob.glob(os.path.expanduser(pattern), recursive=True)
        matches = [m for m in matches if os.path.isfile(m)]
        if not matches:
            raise ConfigError(f"data.source.paths: no files match {pattern!r}")
        found.update(matches)
    return sorted(found)


def _per_file(files: list[str], ids: list[str]) -> Documents:
    n = len(files)
    return Documents(
        files=files,
        file_index=np.arange(n, dtype=np.int64),
        offset=np.zeros(n, dtype=np.int64),
        nbytes=np.array([os.path.getsize(f) for f in files], dtype=np.int64),
        ids=ids,
    )


def _per_line(files: list[str]) -> Documents:
    """One document per non-blank line (without its newline); id = path:lineno (1-based)."""
    file_index, offset, nbytes, ids = [], [], [], []
    for k, path in enumerate(files):
        start = 0
        with open(path, "rb") as f:
            for lineno, line in enumerate(f, start=1):
                if line.strip():
                    file_index.append(k)
                    offset.append(start)
                    nbytes.append(len(line.rstrip(b"\r\n")))
                    ids.append(f"{path}:{lineno}")
                start += len(line)
    return Documents(
        files=files,
        file_index=np.array(file_index, dtype=np.int64),
        offset=np.array(offset, dtype=np.int64),
        nbytes=np.array(nbytes, dtype=np.int64),
        ids=ids,
    )


def _json_lines(files: list[str], text_field: str) -> Documents:
    """One document per JSON record; every record is checked now, so a bad one is an error
    naming its file and line rather than a crash hours into training."""
    docs = _per_line(files)
    lines = dataclasses.replace(docs, text_field=None)
    for i, doc_id in enumerate(docs.ids):
        try:
            _field_text(json.loads(lines[i]), text_field)
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ConfigError(f"data.source.text_field: record {doc_id}: {err}") from None
    return dataclasses.replace(docs, text_field=text_field)


def _field_text(record: object, text_field: str) -> str:
    value = record
    for key in text_field.split("."):
        if not isinstance(value, dict):
            raise TypeError(f"{text_field!r} does not lead to an object field")
        if key not in value:
            raise KeyError(f"no field {text_field!r}")
        value = value[key]
    if not isinstance(value, str):
        raise TypeError(f"field {text_field!r} is {type(value).__name__}, not a string")
    return value


def stable_hash(doc_id: str) -> float:
    """A uniform number in [0, 1) from the SHA-1 of `doc_id`: the same on every machine and run."""
    return int.from_bytes(hashlib.sha1(doc_id.encode()).digest()[:8], "big") / 2**64


def split(docs: Documents, eval_fraction: float) -> tuple[Documents, Documents]:
    """(train, held-out): a document is held out when the hash of its id is below
    `eval_fraction`; both sides are kept non-empty when `eval_fraction` > 0."""
    hashes = np.array([stable_hash(i) for i in docs.ids])
    held_out = hashes < eval_fraction
    if eval_fraction > 0:
        if len(docs) < 2:
            raise ConfigError(
                f"data.eval_fraction: {eval_fraction} needs at least 2 documents, "
                f"the source has {len(docs)}"
            )
        if not held_out.any():
            held_out[np.argmin(hashes)] = True
        if held_out.all():
            held_out[np.argmax(hashes)] = False
    return docs.subset(np.flatnonzero(~held_out)), docs.subset(np.flatnonzero(held_out))
