"""Offline preprocessing: clean, filter, deduplicate and tokenize every text source of a config
into ArrayRecord shards of token ids with a manifest (docs/prepare.md).

    python -m maxlm.data.prepare --config=FILE [key.sub=value ...]
"""

from __future__ import annotations

import glob
import hashlib
import itertools
import json
import multiprocessing
import os
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter

from maxlm import config as config_lib
from maxlm.config import Config, ConfigError, PrepareConfig, SourceConfig
from maxlm.data import cleaning, pipeline, sources
from maxlm.data.dedup import Deduplicator, MinHasher, exact_key
from maxlm.data.tokenizer import (
    HuggingFaceTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    load_tokenizer,
)

PLAN = "plan.json"  # cached result of cleaning, filtering and dedup: what a resumed run reuses
SHARD_OPTIONS = "group_size:1"  # one record per chunk, so a reader fetches one record alone
DROP_REASONS = (
    "unreadable",
    "empty",
    "too_short",
    *cleaning.QUALITY_FILTERS,
    "exact_duplicate",
    "near_duplicate",
)
_CHUNK = 256  # documents per worker task
_PROGRESS_SECONDS = 2.0
_SOURCE_KEYS_IGNORED = {"weight", "objective"}  # training-time settings: no effect on shards
# Bump when the meaning of the output changes, so older outputs are rebuilt.
_VERSION = "prepare-1"


# --------------------------------------------------------------------------- worker side


@dataclass(frozen=True)
class _Job:
    """What every worker needs, pickled once per process."""

    docs: sources.Documents
    cfg: PrepareConfig
    boilerplate: frozenset[int]
    tokenizer: tuple[Callable[[bytes], Tokenizer], bytes] | None  # (from_bytes, file bytes)


class _Worker:
    """A process's job and the objects built from it."""

    def __init__(self, job: _Job):
        self.job = job
        self.minhasher = MinHasher(job.cfg.dedup) if job.cfg.dedup.near else None
        self.tokenizer = job.tokenizer[0](job.tokenizer[1]) if job.tokenizer else None

    def read(self, i: int) -> str:
        text = self.job.docs[i]
        assert isinstance(text, str), "token sources are skipped before"
        return cleaning.replace_surrogates(text)

    def clean(self, i: int) -> cleaning.Cleaned:
        return cleaning.clean(self.read(i), self.job.cfg.cleaning, self.job.boilerplate)


# Multiprocessing tasks are plain functions, so each process keeps its worker here.
_worker: _Worker | None = None


def _start_worker(job: _Job | None) -> None:
    global _worker
    _worker = None if job is None else _Worker(job)


def _current() -> _Worker:
    assert _worker is not None, "task run outside a worker"
    return _worker


def _count_lines(indices: range) -> Counter[int]:
    """How many of these documents hold each boilerplate-candidate line."""
    worker, counts = _current(), Counter[int]()
    for i in indices:
        try:
            text = worker.read(i)
        except OSError:
            continue  # counted as unreadable by the scan
        counts.update(
            cleaning.boilerplate_candidates(cleaning.normalize(text, worker.job.cfg.cleaning))
        )
    return counts


@dataclass(frozen=True)
class _Scanned:
    """One document after cleaning and filtering; each piece is (rejection or None, exact-dup
    key, MinHash signature or None)."""

    unreadable: str | None
    replacement_chars: int = 0
    boilerplate_lines: int = 0
    pieces: tuple[tuple[str | None, bytes, np.ndarray | None], ...] = ()


def _scan(indices: range) -> list[_Scanned]:
    worker = _current()
    cfg = worker.job.cfg
    scanned = []
    for i in indices:
        try:
            text = worker.read(i)
        except OSError as err:
            scanned.append(_Scanned(unreadable=str(err.filename or worker.job.docs.ids[i])))
            continue
        cleaned = cleaning.clean(text, cfg.cleaning, worker.job.boilerplate)
        pieces: list[tuple[str | None, bytes, np.ndarray | None]] = []
        for piece in cleaned.pieces:
            reason = cleaning.rejection(piece, cfg.cleaning, cfg.quality)
            if reason is not None:
                pieces.append((reason, b"", None))
                continue
            signature = worker.minhasher(piece) if worker.minhasher else None
            pieces.append((None, exact_key(piece), signature))
        scanned.append(
            _Scanned(None, text.count("\ufffd"), cleaned.boilerplate_lines, tuple(pieces))
        )
    return scanned


def _tokenize(entries: list[list[int]]) -> list[bytes]:
    """Records (little-endian uint32 token ids) of the kept pieces `entries` ([doc, piece])."""
    worker = _current()
    assert worker.tokenizer is not None, "the tokenize job carries a tokenizer"
    texts, last, pieces = [], -1, []
    for doc, piece in entries:
        if doc != last:  # a split document's pieces are consecutive: clean it once
            last, pieces = doc, worker.clean(doc).pieces
        texts.append(pieces[piece])
    return [np.asarray(ids, dtype="<u4").tobytes() for ids in worker.tokenizer.encode_batch(texts)]


class _Workers:
    """Runs tasks in order: in this process for one worker, else in spawned processes started
    on first use."""

    def __init__(self, job: _Job, count: int):
        self.job, self.count = job, count
        self._pool: Any = None

    def map(self, task: Callable[[Any], Any], inputs: Iterable[Any]) -> Iterator[Any]:
        if self.count == 1:
            return map(task, inputs)
        if self._pool is None:
            # fork is unsafe once jax and grain (imported by sources) have started threads
            context = multiprocessing.get_context("spawn")
            self._pool = context.Pool(self.count, _start_worker, (self.job,))
        return iter(self._pool.imap(task, inputs))

    def __enter__(self) -> _Workers:
        if self.count == 1:
            _start_worker(self.job)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None:
            self._pool.terminate()
        _start_worker(None)


# --------------------------------------------------------------------------- parent side


class _Progress:
    """Progress lines on stderr, at most one every few seconds, and one at the end."""

    def __init__(self, label: str, total: int):
        self.label, self.total, self.done = label, total, 0
        self.start = self.last = time.monotonic()

    def advance(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last >= _PROGRESS_SECONDS or self.done == self.total:
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            print(
                f"{self.label} {self.done:,}/{self.total:,} documents ({rate:,.0f}/s)",
                file=sys.stderr,
            )


def _chunks(items: Sequence[Any], size: int = _CHUNK) -> list[Sequence[Any]]:
    return [items[start : start + size] for start in range(0, len(items), size)]


def _count_boilerplate(workers: _Workers, n_docs: int, cfg: PrepareConfig, label: str) -> list[int]:
    """Keys of the lines found in at least `boilerplate_min_documents` documents (sorted)."""
    counts = Counter[int]()
    progress = _Progress(f"{label} boilerplate", n_docs)
    chunks = _chunks(range(n_docs))
    for chunk, chunk_counts in zip(chunks, workers.map(_count_lines, chunks), strict=True):
        counts.update(chunk_counts)
        progress.advance(len(chunk))
    return sorted(k for k, n in counts.items() if n >= cfg.cleaning.boilerplate_min_documents)


def _scan_all(workers: _Workers, n_docs: int, cfg: PrepareConfig, label: str) -> dict[str, Any]:
    """Clean, filter and deduplicate every document: the counts and the kept [doc, piece]s."""
    counts = dict.fromkeys(
        ("split_oversized", "split_extra", "replacement_chars", "boilerplate_lines_removed"), 0
    )
    dropped = dict.fromkeys(DROP_REASONS, 0)
    unreadable: set[str] = set()
    keep = []
    dedup = Deduplicator(cfg.dedup)
    progress = _Progress(f"{label} clean", n_docs)
    scanned = itertools.chain.from_iterable(workers.map(_scan, _chunks(range(n_docs))))
    for doc, result in enumerate(scanned):
        progress.advance()
        if result.unreadable is not None:
            dropped["unreadable"] += 1
            unreadable.add(result.unreadable)
            continue
        counts["replacement_chars"] += result.replacement_chars
        counts["boilerplate_lines_removed"] += result.boilerplate_lines
        counts["split_oversized"] += len(result.pieces) > 1
        counts["split_extra"] += len(result.pieces) - 1
        for piece, (reason, key, signature) in enumerate(result.pieces):
            reason = reason or dedup.check(key, signature)
            if reason is None:
                keep.append([doc, piece])
            else:
                dropped[reason] += 1
    return {
        "counts": counts,
        "dropped": dropped,
        "unreadable_files": sorted(unreadable),
        "keep": keep,
    }


def _shard_path(out: Path, index: int) -> Path:
    return out / f"shard-{index:05d}.array_record"


def _write_shard(path: Path, records: Iterable[bytes]) -> dict[str, Any]:
    """Write one shard under a temporary name, then rename: a shard file is always complete."""
    tmp = path.with_name(path.name + ".tmp")
    writer = ArrayRecordWriter(str(tmp), SHARD_OPTIONS)
    documents = tokens = 0
    for record in records:
        writer.write(record)
        documents += 1
        tokens += len(record) // 4
    writer.close()
    os.replace(tmp, path)
    return {"file": path.name, "documents": documents, "tokens": tokens}


def _shard_stats(path: Path) -> dict[str, Any]:
    reader = ArrayRecordReader(str(path))
    try:
        records = reader.read_all()
    finally:
        reader.close()
    tokens = sum(len(r) for r in records) // 4
    return {"file": path.name, "documents": len(records), "tokens": tokens}


def _write_shards(
    workers: _Workers, out: Path, keep: list[list[int]], per_shard: int, label: str
) -> list[dict[str, Any]]:
    """Tokenize and write the shards not already on disk; every shard's stats, in order."""
    layout = _chunks(keep, per_shard)
    done = {k: _shard_stats(_shard_path(out, k)) for k in range(len(layout))
            if _shard_path(out, k).exists()}  # fmt: skip
    todo = [k for k in range(len(layout)) if k not in done]
    if todo:  # else start no worker processes
        tasks = [_chunks(layout[k]) for k in todo]
        progress = _Progress(f"{label} tokenize", sum(len(layout[k]) for k in todo))
        records = workers.map(_tokenize, itertools.chain.from_iterable(tasks))
        for k, shard_tasks in zip(todo, tasks, strict=True):
            chunks = itertools.islice(records, len(shard_tasks))
            done[k] = _write_shard(_shard_path(out, k), _advancing(chunks, progress))
    return [done[k] for k in range(len(layout))]


def _advancing(chunks: Iterable[list[bytes]], progress: _Progress) -> Iterator[bytes]:
    for chunk in chunks:
        yield from chunk
        progress.advance(len(chunk))


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _write_json(path: Path, value: Any) -> None:
    # Write then rename, so an interrupted run never leaves a truncated file behind.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(value, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def _remove_shards(out: Path) -> None:
    for path in out.glob("shard-*.array_record"):
        path.unlink()


def _up_to_date(manifest: Any, input_fingerprint: str, out: Path) -> bool:
    return (
        isinstance(manifest, dict)
        and manifest.get("input_fingerprint") == input_fingerprint
        and all((out / shard["file"]).exists() for shard in manifest["shards"])
    )


def _input_files(cfg: SourceConfig) -> list[str]:
    """The files behind a source's path patterns (directories walked), for their mtimes."""
    found: set[str] = set()
    for pattern in cfg.paths:
        for match in glob.glob(os.path.expanduser(pattern), recursive=True):
            if os.path.isdir(match):
                found.update(os.path.join(d, f) for d, _, files in os.walk(match) for f in files)
            else:
                found.add(match)
    return sorted(found)


def _clean_fingerprint(source: SourceConfig, docs: sources.Documents, cfg: PrepareConfig) -> str:
    """Hash of what decides the kept pieces: the source's settings, its documents' ids and
    sizes, its files' sizes and mtimes, and the cleaning, quality and dedup settings."""
    digest = hashlib.sha256(_VERSION.encode())
    settings = [
        source.model_dump(mode="json", exclude=_SOURCE_KEYS_IGNORED),
        cfg.model_dump(mode="json", include={"cleaning", "quality", "dedup"}),
    ]
    digest.update(json.dumps(settings, sort_keys=True).encode())
    for doc_id in docs.ids:
        digest.update(doc_id.encode(errors="surrogateescape") + b"\0")
    if docs.nbytes is not None:
        digest.update(np.asarray(docs.nbytes, dtype="<i8").tobytes())
    for path in _input_files(source):
        try:
            stat = os.stat(path)
        except OSError:
            continue  # vanished since listing: its documents will count as unreadable
        stamp = f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\0"
        digest.update(stamp.encode(errors="surrogateescape"))
    return digest.hexdigest()


def _check_counts(counts: dict[str, Any]) -> None:
    """Every piece (document or extra piece of a split one) is kept or dropped exactly once."""
    pieces = counts["documents_in"] + counts["split_extra"]
    accounted = counts["documents_out"] + sum(counts["dropped"].values())
    if pieces != accounted:
        raise AssertionError(
            f"counts do not add up: documents_in + split_extra = {pieces}, "
            f"documents_out + dropped = {accounted}: {counts}"
        )


def _rebuilder(tokenizer: Tokenizer) -> Callable[[bytes], Tokenizer]:
    if isinstance(tokenizer, HuggingFaceTokenizer):
        return HuggingFaceTokenizer.from_bytes
    if isinstance(tokenizer, SentencePieceTokenizer):
        return SentencePieceTokenizer.from_bytes
    raise TypeError(f"cannot ship a {type(tokenizer).__name__} to worker processes")


def _tokenizer_file(tokenizer: Tokenizer) -> str:
    return "tokenizer.json" if isinstance(tokenizer, HuggingFaceTokenizer) else "tokenizer.model"


def prepare_source(
    name: str,
    source: SourceConfig,
    docs: sources.Documents,
    tokenizer: Tokenizer,
    cfg: PrepareConfig,
) -> dict[str, Any]:
    """Prepare one source into `<cfg.output_dir>/<name>/`, reusing what an earlier run with the
    same inputs finished; returns its manifest."""
    out = Path(cfg.output_dir) / name
    label = f"[{name}]"
    clean_fingerprint = _clean_fingerprint(source, docs, cfg)
    input_fingerprint = hashlib.sha256(
        f"{clean_fingerprint} {tokenizer.fingerprint} {cfg.documents_per_shard}".encode()
    ).hexdigest()
    manifest = _read_json(out / sources.MANIFEST)
    if _up_to_date(manifest, input_fingerprint, out):
        print(f"{label} up to date: {out}", file=sys.stderr)
        return dict(manifest)
    out.mkdir(parents=True, exist_ok=True)
    # No manifest while shards are being written; temporary files are from interrupted writes.
    for path in [out / sources.MANIFEST, *out.glob("*.tmp")]:
        path.unlink(missing_ok=True)
    plan = _reusable_plan(out, clean_fingerprint, input_fingerprint)
    if plan is None and cfg.cleaning.boilerplate_min_documents:
        with _Workers(_Job(docs, cfg, frozenset(), None), cfg.num_workers) as workers:
            boilerplate = _count_boilerplate(workers, len(docs), cfg, label)
    else:
        boilerplate = plan["boilerplate"] if plan else []
    job = _Job(docs, cfg, frozenset(boilerplate), (_rebuilder(tokenizer), tokenizer.data))
    with _Workers(job, cfg.num_workers) as workers:
        if plan is None:
            plan = {
                "clean_fingerprint": clean_fingerprint,
                "input_fingerprint": input_fingerprint,
                "boilerplate": boilerplate,
                "documents_in": len(docs),
                **_scan_all(workers, len(docs), cfg, label),
            }
            _write_json(out / PLAN, plan)
        shards = _write_shards(workers, out, plan["keep"], cfg.documents_per_shard, label)
    tokenizer.save(out / _tokenizer_file(tokenizer))
    manifest = _manifest(name, tokenizer, input_fingerprint, plan, shards)
    _write_json(out / sources.MANIFEST, manifest)
    return manifest


def _reusable_plan(out: Path, clean_fingerprint: str, input_fingerprint: str) -> Any:
    """The cached plan if the same inputs made it, else None; shards that do not fit go."""
    plan = _read_json(out / PLAN)
    if plan is None or plan.get("clean_fingerprint") != clean_fingerprint:
        _remove_shards(out)
        return None
    if plan["input_fingerprint"] != input_fingerprint:  # same pieces, other tokens or layout
        _remove_shards(out)
        plan["input_fingerprint"] = input_fingerprint
        _write_json(out / PLAN, plan)
    return plan


def _manifest(
    name: str,
    tokenizer: Tokenizer,
    input_fingerprint: str,
    plan: dict[str, Any],
    shards: list[dict[str, Any]],
) -> dict[str, Any]:
    counts = {
        "documents_in": plan["documents_in"],
        **plan["counts"],
        "documents_out": sum(s["documents"] for s in shards),
        "dropped": plan["dropped"],
        "unreadable": plan["dropped"]["unreadable"],
        "tokens": sum(s["tokens"] for s in shards),
    }
    _check_counts(counts)
    return {
        "format": sources.TOKENS_FORMAT,
        "dtype": "uint32",
        "source": name,
        "tokenizer_fingerprint": tokenizer.fingerprint,
        "tokenizer_vocab_size": tokenizer.vocab_size,
        "tokenizer_file": _tokenizer_file(tokenizer),
        "input_fingerprint": input_fingerprint,
        "counts": counts,
        "unreadable_files": plan["unreadable_files"],
        "shards": shards,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def prepare(cfg: Config) -> dict[str, dict[str, Any]]:
    """Prepare every text source of `cfg.data.sources` with one tokenizer (trained on all of
    them for kind train_bpe); source name -> manifest."""
    texts = {}
    for name, source in cfg.data.sources.items():
        docs = sources.documents(source, f"data.sources.{name}")
        if docs.tokenizer_fingerprint is not None:
            print(f"[{name}] already tokenized: skipped", file=sys.stderr)
            continue
        texts[name] = docs
    if not texts:
        raise ConfigError("data.sources: no text sources to prepare")
    special = [t for s in cfg.data.sources.values() for t in pipeline.special_tokens(s.objective)]
    corpus = sources.concat(list(texts.values()))
    tokenizer = load_tokenizer(cfg.data.tokenizer, corpus, list(dict.fromkeys(special)))
    return {
        name: prepare_source(name, cfg.data.sources[name], docs, tokenizer, cfg.prepare)
        for name, docs in texts.items()
    }


def summary(manifests: dict[str, dict[str, Any]]) -> str:
    """A table of the counts, one column per source."""
    counts = [m["counts"] for m in manifests.values()]
    rows = [["", *manifests]]
    for key in counts[0]:
        if key == "dropped":
            rows += [[f"dropped: {reason}", *(f"{c['dropped'][reason]:,}" for c in counts)]
                     for reason in DROP_REASONS]  # fmt: skip
        elif key != "unreadable":  # a row of the dropped already
            rows.append([key, *(f"{c[key]:,}" for c in counts)])
    rows.append(["shards", *(f"{len(m['shards']):,}" for m in manifests.values())])
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    lines = []
    for label, *values in rows:
        cells = (v.rjust(w) for v, w in zip(values, widths[1:], strict=True))
        lines.append("  ".join([label.ljust(widths[0]), *cells]))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Prepare the sources of `--config=FILE [key.sub=value ...]`; 2 on a configuration error."""
    try:
        cfg = config_lib.parse_argv(sys.argv[1:] if argv is None else argv)
        manifests = prepare(cfg)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(summary(manifests))
    return 0


if __name__ == "__main__":
    sys.exit(main())
