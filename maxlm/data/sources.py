"""Documents: what a run trains on, read lazily from files (text, JSON lines, Parquet,
ArrayRecord token shards, Hugging Face datasets saved to disk, seqio), and their train/eval split.

Every source is a random-access `Documents` (a grain data source): `docs[i]` is a text, or for
pre-tokenized sources an int32 array of token ids; `ids[i]` names the document stably.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import sysconfig
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import grain
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from maxlm import paths
from maxlm.config import ConfigError, SourceConfig

_SITE_DIRS = {"site-packages", "dist-packages"}
TOKENS_FORMAT = "maxlm-tokens-v1"  # ArrayRecord shards written by `python -m maxlm.data.prepare`
MANIFEST = "manifest.json"


class Documents(Protocol):
    """Random-access documents. `nbytes` (UTF-8 size per document) is None for token sources;
    `tokenizer_fingerprint` names the tokenizer of pre-tokenized ones (None for text)."""

    @property
    def ids(self) -> Sequence[str]: ...

    @property
    def nbytes(self) -> np.ndarray | None: ...

    @property
    def tokenizer_fingerprint(self) -> str | None: ...

    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> str | np.ndarray: ...

    def subset(self, indices: Sequence[int] | np.ndarray) -> Documents: ...


class _OpenFiles(threading.local):
    """One thread's most recently read files, kept open: opening a file in a bucket costs a
    round trip or two, once per document otherwise, and an open file's read-ahead buffer
    serves the documents next to the one read."""

    KEEP = 4

    def __init__(self) -> None:
        self.files: OrderedDict[str, BinaryIO] = OrderedDict()

    def read(self, location: str, offset: int, nbytes: int) -> bytes:
        file = self.files.pop(location, None) or paths.open_read(location)
        file.seek(offset)
        data = file.read(nbytes)  # a file that failed to read is not kept
        self.files[location] = file
        if len(self.files) > self.KEEP:
            self.files.popitem(last=False)[1].close()
        return data


@dataclass(frozen=True, eq=False)
class FileDocuments:
    """Random-access documents (a grain data source): doc i is `nbytes[i]` bytes of
    `files[file_index[i]]` starting at `offset[i]`, decoded as UTF-8 (bad bytes replaced);
    with a `text_field`, those bytes are a JSON record and the document is that field."""

    files: list[str]
    file_index: np.ndarray
    offset: np.ndarray
    nbytes: np.ndarray
    ids: list[str]
    text_field: str | None = field(default=None)
    tokenizer_fingerprint: None = None
    _open: _OpenFiles = field(default_factory=_OpenFiles, init=False, repr=False)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> str:
        location, offset, nbytes = self.files[self.file_index[i]], self.offset[i], self.nbytes[i]
        raw = self._open.read(location, int(offset), int(nbytes)).decode("utf-8", "replace")
        return raw if self.text_field is None else _field_text(json.loads(raw), self.text_field)

    def __getstate__(self) -> dict[str, Any]:
        """Pickled for grain's worker processes without the open files (each opens its own)."""
        return {k: v for k, v in self.__dict__.items() if k != "_open"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _open=_OpenFiles())

    def subset(self, indices: Sequence[int] | np.ndarray) -> FileDocuments:
        """The documents at `indices`, in that order."""
        indices = np.asarray(indices, dtype=np.int64)
        return FileDocuments(
            files=self.files,
            file_index=self.file_index[indices],
            offset=self.offset[indices],
            nbytes=self.nbytes[indices],
            ids=[self.ids[i] for i in indices],
            text_field=self.text_field,
        )


def documents(cfg: SourceConfig, key: str = "data.sources") -> Documents:
    """The documents `cfg` names; errors name `key` (the source's config path)."""
    if cfg.kind == "python_stdlib":
        root = Path(sysconfig.get_paths()["stdlib"])
        files = [
            str(p)
            for p in sorted(root.rglob("*.py"))
            if p.is_file() and not _SITE_DIRS & set(p.relative_to(root).parts)
        ]
        return _per_file(files, ids=[os.path.relpath(f, root) for f in files])
    if cfg.kind == "seqio":
        from maxlm.data.seqio_source import seqio_documents  # TensorFlow: only when asked for

        return seqio_documents(cfg, key)
    if cfg.kind == "hf_dataset":
        return _hf_dataset(cfg, key)
    files = _glob_all(cfg.paths, key)
    if cfg.kind == "jsonl":
        return _json_lines(files, cfg.text_field, key)
    if cfg.kind == "parquet":
        return _parquet(files, cfg.text_field, key)
    if cfg.kind == "array_record":
        if any(paths.is_remote(f) for f in files):  # its C++ file layer reads local disks only
            raise ConfigError(
                f"{key}.paths: array_record shards must be on a local disk (ArrayRecord cannot "
                f"read {files[0].split('://')[0]}://): copy them (gcloud storage cp -r) or mount "
                "the bucket with gcsfuse and give the mounted path"
            )
        return _token_shards(files, key)
    if cfg.document_per == "line":
        return _per_line(files)
    return _per_file(files, ids=files)


def concat(parts: Sequence[Documents]) -> Documents:
    """All documents of `parts`, one after another (e.g. every text source, to train a
    tokenizer on)."""
    return parts[0] if len(parts) == 1 else _Concatenated(tuple(parts))


@dataclass(frozen=True, eq=False)
class _Concatenated:
    parts: tuple[Documents, ...]
    tokenizer_fingerprint: None = None

    @functools.cached_property
    def _starts(self) -> np.ndarray:
        return np.cumsum([0] + [len(p) for p in self.parts])

    @property
    def ids(self) -> list[str]:
        return [i for p in self.parts for i in p.ids]

    @property
    def nbytes(self) -> np.ndarray | None:
        sizes = [p.nbytes for p in self.parts]
        return None if any(n is None for n in sizes) else np.concatenate(sizes)  # type: ignore[arg-type]

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, i: int) -> str | np.ndarray:
        part = int(np.searchsorted(self._starts, i, side="right")) - 1
        return self.parts[part][i - int(self._starts[part])]

    def subset(self, indices: Sequence[int] | np.ndarray) -> Documents:
        return _Rows(self, np.asarray(indices, dtype=np.int64))


@dataclass(frozen=True, eq=False)
class _Rows:
    """A selection of another source's documents (for sources without a cheaper subset)."""

    base: Any
    rows: np.ndarray
    tokenizer_fingerprint: str | None = None

    @property
    def ids(self) -> list[str]:
        return [self.base.ids[r] for r in self.rows]

    @property
    def nbytes(self) -> np.ndarray | None:
        return None if self.base.nbytes is None else self.base.nbytes[self.rows]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> str | np.ndarray:
        return self.base[int(self.rows[i])]

    def subset(self, indices: Sequence[int] | np.ndarray) -> Documents:
        return _Rows(self.base, self.rows[np.asarray(indices, dtype=np.int64)],
                     self.tokenizer_fingerprint)  # fmt: skip


@dataclass(frozen=True, eq=False)
class ArrowDocuments:
    """A string column of Arrow tables (Parquet files, a Hugging Face dataset): document i
    is row `rows[i]` of the concatenated column. `load` rebuilds the column, so a pickled copy
    (a grain worker) reopens the memory-mapped files instead of copying the text."""

    load: Any  # () -> list[pa.Array]: the column's chunks in order
    rows: np.ndarray
    ids: list[str]
    nbytes: np.ndarray
    tokenizer_fingerprint: None = None

    @functools.cached_property
    def _chunks(self) -> tuple[list[pa.Array], np.ndarray]:
        chunks = self.load()
        return chunks, np.cumsum([0] + [len(c) for c in chunks])

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_chunks"}

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> str:
        chunks, starts = self._chunks
        row = int(self.rows[i])
        k = int(np.searchsorted(starts, row, side="right")) - 1
        return str(chunks[k][row - int(starts[k])].as_py())

    def subset(self, indices: Sequence[int] | np.ndarray) -> ArrowDocuments:
        indices = np.asarray(indices, dtype=np.int64)
        return ArrowDocuments(
            self.load, self.rows[indices], [self.ids[i] for i in indices], self.nbytes[indices]
        )


def _text_column(chunks: list[pa.Array], field_name: str, where: str, key: str) -> np.ndarray:
    """UTF-8 sizes of a string column's rows; a missing, non-string or null value is an error
    naming `where` and the row."""
    start = 0
    sizes = []
    for chunk in chunks:
        if not (pa.types.is_string(chunk.type) or pa.types.is_large_string(chunk.type)):
            raise ConfigError(
                f"{key}.text_field: column {field_name!r} of {where} is {chunk.type}, not a string"
            )
        if chunk.null_count:
            row = start + int(np.flatnonzero(chunk.is_null().to_numpy(zero_copy_only=False))[0])
            raise ConfigError(f"{key}.text_field: {where} row {row}: {field_name!r} is null")
        sizes.append(pc.binary_length(chunk).to_numpy(zero_copy_only=False))
        start += len(chunk)
    return np.concatenate(sizes).astype(np.int64) if sizes else np.zeros(0, np.int64)


def _parquet_column(files: tuple[str, ...], field_name: str) -> list[pa.Array]:
    chunks = []
    for path in files:
        with paths.open_read(path) as f:  # pyarrow's own GCS client would not share epath's setup
            chunks += pq.read_table(f, columns=[field_name]).column(0).chunks
    return chunks


def _parquet(files: list[str], field_name: str, key: str) -> ArrowDocuments:
    """One document per row of `field_name` in each Parquet file; id = path:row."""
    ids, sizes = [], []
    for path in files:
        try:
            with paths.open_read(path) as f:
                schema = pq.read_schema(f)
        except (pa.ArrowException, OSError) as err:
            raise ConfigError(f"{key}.paths: {path}: not a readable Parquet file: {err}") from None
        if field_name not in schema.names:
            raise ConfigError(
                f"{key}.text_field: {path} has no column {field_name!r} (columns: "
                f"{', '.join(schema.names)})"
            )
        chunks = _parquet_column((path,), field_name)
        sizes.append(_text_column(chunks, field_name, path, key))
        ids += [f"{path}:{row}" for row in range(len(sizes[-1]))]
    nbytes = np.concatenate(sizes)
    load = functools.partial(_parquet_column, tuple(files), field_name)
    return ArrowDocuments(load, np.arange(len(ids), dtype=np.int64), ids, nbytes)


def _hf_column(path: str, split: str | None, field_name: str) -> list[pa.Array]:
    import datasets  # optional extra maxlm[hf]

    loaded = datasets.load_from_disk(path)
    if split is not None:
        loaded = loaded[split]
    return list(loaded.data.column(field_name).chunks)


def _hf_dataset(cfg: SourceConfig, key: str) -> ArrowDocuments:
    """A Hugging Face dataset saved with `save_to_disk` (memory-mapped Arrow); a DatasetDict
    is read at `cfg.split`. id = path/split:row."""
    try:
        import datasets
    except ImportError:
        raise ConfigError(
            f"{key}.kind: hf_dataset needs the Hugging Face datasets library: "
            "pip install 'maxlm[hf]'"
        ) from None
    if len(cfg.paths) != 1:
        raise ConfigError(f"{key}.paths: hf_dataset takes one save_to_disk directory")
    path = os.path.expanduser(cfg.paths[0])
    try:
        loaded = datasets.load_from_disk(path)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"{key}.paths: {path}: not a saved dataset: {err}") from None
    split = None
    if isinstance(loaded, datasets.DatasetDict):
        if cfg.split not in loaded:
            raise ConfigError(
                f"{key}.split: {path} has no split {cfg.split!r} (splits: {', '.join(loaded)})"
            )
        split, loaded = cfg.split, loaded[cfg.split]
    if cfg.text_field not in loaded.column_names:
        raise ConfigError(
            f"{key}.text_field: {path} has no column {cfg.text_field!r} (columns: "
            f"{', '.join(loaded.column_names)})"
        )
    chunks = list(loaded.data.column(cfg.text_field).chunks)
    nbytes = _text_column(chunks, cfg.text_field, path, key)
    ids = [f"{path}/{split or 'dataset'}:{row}" for row in range(len(nbytes))]
    load = functools.partial(_hf_column, path, split, cfg.text_field)
    return ArrowDocuments(load, np.arange(len(ids), dtype=np.int64), ids, nbytes)


@dataclass(frozen=True, eq=False)
class TokenDocuments:
    """Pre-tokenized documents: ArrayRecord shards of little-endian uint32 token ids, one
    record per document, as `python -m maxlm.data.prepare` writes them."""

    shards: tuple[str, ...]
    rows: np.ndarray
    ids: list[str]
    tokenizer_fingerprint: str
    nbytes: None = None

    @functools.cached_property
    def _source(self) -> grain.sources.ArrayRecordDataSource:
        return grain.sources.ArrayRecordDataSource(list(self.shards))

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_source"}

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> np.ndarray:
        record = self._source[int(self.rows[i])]
        return np.frombuffer(record, dtype="<u4").astype(np.int32)

    def subset(self, indices: Sequence[int] | np.ndarray) -> TokenDocuments:
        indices = np.asarray(indices, dtype=np.int64)
        return TokenDocuments(
            self.shards, self.rows[indices], [self.ids[i] for i in indices],
            self.tokenizer_fingerprint,
        )  # fmt: skip


def read_manifest(directory: str | Path, key: str = "data.sources") -> dict[str, Any]:
    """The manifest.json `prepare` writes beside its shards; a clear error if it is not one."""
    path = Path(directory) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"{key}.paths: cannot read {path}: {err}") from None
    if manifest.get("format") != TOKENS_FORMAT:
        raise ConfigError(
            f"{key}.paths: {path} is format {manifest.get('format')!r}, not {TOKENS_FORMAT!r}"
        )
    return dict(manifest)


def _token_shards(files: list[str], key: str) -> TokenDocuments:
    """Shards matched by the globs; their manifests must name one tokenizer. id = shard:row."""
    fingerprints = {}
    counts = []
    for path in files:
        manifest = read_manifest(Path(path).parent, key)
        fingerprints[path] = manifest["tokenizer_fingerprint"]
        by_file = {shard["file"]: shard["documents"] for shard in manifest["shards"]}
        if Path(path).name not in by_file:
            raise ConfigError(f"{key}.paths: {path} is not listed in its directory's {MANIFEST}")
        counts.append(int(by_file[Path(path).name]))
    if len(set(fingerprints.values())) > 1:
        raise ConfigError(
            f"{key}.paths: the shards were tokenized with different tokenizers: "
            + ", ".join(f"{p} ({f[:12]})" for p, f in fingerprints.items())
        )
    ids = [f"{path}:{row}" for path, n in zip(files, counts, strict=True) for row in range(n)]
    return TokenDocuments(
        tuple(files), np.arange(len(ids), dtype=np.int64), ids, next(iter(fingerprints.values()))
    )


def _glob_all(patterns: list[str], key: str) -> list[str]:
    found: set[str] = set()
    for pattern in patterns:
        matches = paths.glob(pattern)
        if not matches:
            raise ConfigError(f"{key}.paths: no files match {pattern!r}")
        found.update(matches)
    return sorted(found)


def _per_file(files: list[str], ids: list[str]) -> FileDocuments:
    n = len(files)
    return FileDocuments(
        files=files,
        file_index=np.arange(n, dtype=np.int64),
        offset=np.zeros(n, dtype=np.int64),
        nbytes=np.array([paths.size(f) for f in files], dtype=np.int64),
        ids=ids,
    )


def _per_line(files: list[str]) -> FileDocuments:
    """One document per non-blank line (without its newline); id = path:lineno (1-based)."""
    file_index, offset, nbytes, ids = [], [], [], []
    for k, path in enumerate(files):
        start = 0
        with paths.open_read(path) as f:
            for lineno, line in enumerate(f, start=1):
                if line.strip():
                    file_index.append(k)
                    offset.append(start)
                    nbytes.append(len(line.rstrip(b"\r\n")))
                    ids.append(f"{path}:{lineno}")
                start += len(line)
    return FileDocuments(
        files=files,
        file_index=np.array(file_index, dtype=np.int64),
        offset=np.array(offset, dtype=np.int64),
        nbytes=np.array(nbytes, dtype=np.int64),
        ids=ids,
    )


def _json_lines(files: list[str], text_field: str, key: str) -> FileDocuments:
    """One document per JSON record; every record is checked now, so a bad one is an error
    naming its file and line rather than a crash hours into training."""
    docs = _per_line(files)
    lines = dataclasses.replace(docs, text_field=None)
    for i, doc_id in enumerate(docs.ids):
        try:
            _field_text(json.loads(lines[i]), text_field)
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ConfigError(f"{key}.text_field: record {doc_id}: {err}") from None
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
