"""Grain pipeline: documents -> token ids -> objective -> pieces -> packed rows -> mixed batches.

Every batch is a dict of int32 arrays of shape (batch, seq_len):
  tokens       model inputs
  targets      the next token of the same document (never across a document boundary)
  segment_ids  1, 2, 3, ... per packed piece within a row; 0 marks padding (mask it)
  positions    the token's position in its document (or in its objective's example)
  loss_mask    (prefix-LM objectives) 1 where the target counts in the loss
  prefix       (prefix-LM objectives) 1 on input tokens of a bidirectional prefix
  source       (mixtures) the index of the source the row came from
A document longer than seq_len becomes consecutive pieces of at most seq_len tokens; a
continuation piece keeps counting positions from its offset in the document (so RoPE sees true
positions), although it cannot attend to the earlier pieces. No token is dropped or repeated
within an epoch: first-/best-fit packing pads instead of truncating, and concat-then-split
continues a piece in the next row (with its positions) instead of padding. Prefix-LM objectives
(prefix_lm, span_corruption, ul2) cut documents into chunks that fit one row after the transform.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
from collections.abc import Sequence
from typing import Any

import grain
import jax
import numpy as np
from absl import flags

from maxlm.config import Config, ConfigError, ObjectiveKind
from maxlm.data import objectives as objectives_lib
from maxlm.data.sources import Documents
from maxlm.data.tokenizer import Tokenizer

Batch = dict[str, np.ndarray]
_PACKED = ("tokens", "targets", "positions")  # fields the packer lays out; it adds segment ids
_PREFIX = ("loss_mask", "prefix")
# None: plain causal LM; FIM rearranges documents and stays causal; the rest make examples
Objective = (
    objectives_lib.FillInTheMiddle
    | objectives_lib.PrefixLM
    | objectives_lib.SpanCorruption
    | objectives_lib.UL2
    | None
)


@dataclasses.dataclass(frozen=True)
class Layout:
    """How every source's documents become rows: shared by training and evaluation."""

    tokenizer: Tokenizer
    seq_len: int
    add_bos: bool
    add_eos: bool
    shuffle_window: int = 0
    packing: str = "first_fit"
    prefix_fields: bool = False  # emit loss_mask / prefix (some source's objective needs them)
    process_index: int = 0
    process_count: int = 1

    def __post_init__(self) -> None:
        if self.add_bos and self.tokenizer.bos_id is None:
            raise ConfigError("data.add_bos: the tokenizer has no BOS token")
        if self.add_eos and self.tokenizer.eos_id is None:
            raise ConfigError("data.add_eos: the tokenizer has no EOS token")

    @classmethod
    def of_run(cls, cfg: Config, tokenizer: Tokenizer) -> Layout:
        """The layout a run's config gives this process (training and `maxlm.eval` alike)."""
        return cls(
            tokenizer=tokenizer,
            seq_len=cfg.train.seq_len,
            add_bos=cfg.data.add_bos,
            add_eos=cfg.data.add_eos,
            shuffle_window=cfg.data.shuffle_window,
            packing=cfg.data.packing,
            prefix_fields=cfg.data.needs_prefix,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )

    @property
    def fields(self) -> tuple[str, ...]:
        return _PACKED + (_PREFIX if self.prefix_fields else ())


@dataclasses.dataclass(frozen=True)
class Source:
    """One named source of a run: its documents and its objective (None: causal LM)."""

    name: str
    docs: Documents
    objective: Objective = None


def build_objective(cfg: ObjectiveKind, tokenizer: Tokenizer, key: str) -> Objective:
    """The transform an objective config names, with its special tokens looked up in the
    tokenizer (a missing one is an error naming `key`)."""

    def token(name: str, field: str) -> int:
        token_id = tokenizer.token_id(name)
        if token_id is None:
            raise ConfigError(
                f"{key}.{field}: the tokenizer has no token {name!r} (train_bpe tokenizers "
                "reserve the objectives' tokens; add it to a tokenizer file you bring)"
            )
        return token_id

    if cfg.kind == "causal":
        return None
    if cfg.kind == "fim":
        return objectives_lib.FillInTheMiddle(
            rate=cfg.rate,
            spm_rate=cfg.spm_rate,
            prefix_id=token(cfg.prefix_token, "prefix_token"),
            middle_id=token(cfg.middle_token, "middle_token"),
            suffix_id=token(cfg.suffix_token, "suffix_token"),
        )
    if cfg.kind == "prefix_lm":
        return objectives_lib.PrefixLM()
    sentinels = [
        token(cfg.sentinel_format.format(k), "sentinel_format") for k in range(cfg.num_sentinels)
    ]
    if cfg.kind == "span_corruption":
        return objectives_lib.SpanCorruption(
            noise_density=cfg.noise_density,
            mean_span_length=cfg.mean_span_length,
            sentinel_ids=sentinels,
        )
    denoisers: list[tuple[float, objectives_lib.PrefixLM | objectives_lib.SpanCorruption]] = []
    for d in cfg.denoisers:
        mode_id = token(cfg.mode_tokens[d.mode], f"mode_tokens.{d.mode}")
        if d.mode == "S":
            denoisers.append((d.rate, objectives_lib.PrefixLM(mode_id=mode_id)))
        else:
            denoisers.append(
                (
                    d.rate,
                    objectives_lib.SpanCorruption(
                        noise_density=d.noise_density,
                        mean_span_length=d.mean_span_length,
                        sentinel_ids=sentinels,
                        mode_id=mode_id,
                    ),
                )
            )
    return objectives_lib.UL2(denoisers)


def special_tokens(cfg: ObjectiveKind) -> list[str]:
    """The vocabulary entries an objective needs (a trained tokenizer reserves them)."""
    if cfg.kind == "fim":
        return [cfg.prefix_token, cfg.middle_token, cfg.suffix_token]
    if cfg.kind in ("span_corruption", "ul2"):
        names = [cfg.sentinel_format.format(k) for k in range(cfg.num_sentinels)]
        if cfg.kind == "ul2":
            names += [cfg.mode_tokens[mode] for mode in ("R", "S", "X")]
        return names
    return []


def train_dataset(
    sources: Sequence[Source],
    layout: Layout,
    *,
    batch_size: int,
    seed: int,
    stages: Sequence[tuple[int, Sequence[float]]] | None = None,
    num_workers: int = 0,
) -> grain.IterDataset:
    """Endless batches of `batch_size` rows of this process's share, reshuffled every epoch.
    Rows of several sources are mixed by `stages`: (first row, weight per source) from that
    row on (default: equal weights). `iter()` of it has `get_state()` / `set_state()`."""
    rows = []
    for index, source in enumerate(sources):
        source_rows = packed_rows(
            source.docs,
            layout,
            objective=source.objective,
            num_bins=batch_size,
            shuffle_seed=_source_seed(seed, index),
            source_index=index if len(sources) > 1 else None,
        )
        if num_workers:
            _use_default_absl_flags()
            # per source, so mixing (and its stage boundaries) stays in this process, exact
            source_rows = source_rows.mp_prefetch(
                grain.MultiprocessingOptions(num_workers=num_workers)
            )
        rows.append(source_rows)
    if len(rows) == 1:
        mixed = rows[0]
    else:
        mixed = StagedMixIterDataset(rows, stages or [(0, [1.0] * len(rows))])
    return mixed.batch(batch_size, drop_remainder=True)


def _use_default_absl_flags() -> None:
    """grain's worker processes read absl flags, which raise unless parsed; a program that does
    not parse absl flags itself (ours) runs with their defaults."""
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


# Documents read ahead, on a thread per core up to grain's default 16 (more threads only contend
# for the cores and the GIL that training needs), each thread 32 ahead
_READ_THREADS = min(16, os.cpu_count() or 1)
STREAM_READ = grain.ReadOptions(num_threads=_READ_THREADS, prefetch_buffer_size=32 * _READ_THREADS)
# Reading ahead for a few sampled batches: grain's default (500 documents on 16 threads) would
# tokenize hundreds of documents that are never used, each time a held-out sample is drawn
SAMPLE_READ = grain.ReadOptions(num_threads=2, prefetch_buffer_size=16)


def eval_batches(
    source: Source,
    layout: Layout,
    *,
    batch_size: int,
    num_batches: int,
    seed: int | None = None,
) -> list[Batch]:
    """The first `num_batches` packed batches of `source` (repeated when too few): in order,
    or sampled across documents with a fixed `seed`; the same every call."""
    rows = packed_rows(
        source.docs, layout, objective=source.objective, num_bins=batch_size, shuffle_seed=seed,
        read_options=SAMPLE_READ,
    )  # fmt: skip
    batches = iter(rows.batch(batch_size, drop_remainder=True))
    return [next(batches) for _ in range(num_batches)]


def _source_seed(seed: int, index: int) -> int:
    # source 0 keeps the run seed, so a one-source run shuffles as before mixtures existed
    return seed if index == 0 else int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def packed_rows(
    docs: Documents,
    layout: Layout,
    *,
    num_bins: int,
    shuffle_seed: int | None,
    objective: Objective = None,
    num_epochs: int | None = None,
    source_index: int | None = None,
    read_options: grain.ReadOptions | None = None,
) -> grain.IterDataset:
    """Packed rows of shape (seq_len,): this process's `document_stream`, tokenized (by
    `read_options`' threads, ahead of need; default grain's), through the objective, split into
    pieces, shuffled within windows of `layout.shuffle_window` pieces (when > 1 and seeded), and
    packed `num_bins` rows at a time."""
    ds = document_stream(
        docs,
        shuffle_seed=shuffle_seed,
        num_epochs=num_epochs,
        process_index=layout.process_index,
        process_count=layout.process_count,
    )
    make_pieces = functools.partial(_pieces, layout=layout, objective=objective)
    # seeded per element by grain, so the transform does not depend on how the stream is read
    pieces = ds.random_map(make_pieces, seed=0 if shuffle_seed is None else shuffle_seed)
    flat = grain.experimental.FlatMapIterDataset(
        pieces.to_iter_dataset(read_options or STREAM_READ), _Flatten()
    )
    if shuffle_seed is not None and layout.shuffle_window > 1:
        # consecutive pieces of one long document would otherwise fill a whole batch
        flat = grain.experimental.WindowShuffleIterDataset(
            flat, window_size=layout.shuffle_window, seed=_shuffle_seed(shuffle_seed + 1)
        )
    packed = _pack(flat, layout, num_bins=num_bins)
    return packed.map(functools.partial(_select_fields, layout=layout, source=source_index))


def document_stream(
    docs: Documents,
    *,
    shuffle_seed: int | None,
    num_epochs: int | None = None,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.MapDataset:
    """Documents of `docs`, shuffled anew each epoch (unless `shuffle_seed` is None), repeated
    `num_epochs` times (None: forever); this process takes every `process_count`-th one."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    if len(docs) < process_count:
        raise ConfigError(
            f"data.sources: a source with {len(docs)} document(s) (train or held-out side) "
            f"cannot feed {process_count} process(es); add documents or change "
            "data.eval_fraction"
        )
    ds = grain.MapDataset.source(docs)
    if shuffle_seed is not None:
        ds = ds.shuffle(seed=_shuffle_seed(shuffle_seed))
    # Shuffle before repeat: grain reshuffles epoch e with seed + e. Sharding after both
    # spreads every epoch over all processes, each document to exactly one of them.
    return ds.repeat(num_epochs)[process_index::process_count]


def _shuffle_seed(seed: int) -> int:
    """A 32-bit shuffle seed unrelated to seed + 1's: grain seeds epoch e with seed + e, so
    raw seeds 0 and 1 would share all but one epoch's order."""
    return int(np.random.SeedSequence(seed).generate_state(1)[0])


def _token_ids(document: str | np.ndarray, tokenizer: Tokenizer) -> np.ndarray:
    if isinstance(document, str):
        return np.asarray(tokenizer.encode(document), dtype=np.int32)
    return np.asarray(document, dtype=np.int32)


def _pieces(
    document: str | np.ndarray, rng: np.random.Generator, *, layout: Layout, objective: Objective
) -> list[Batch]:
    """The pieces (<= seq_len tokens each) one document becomes."""
    tokenizer = layout.tokenizer
    content = _token_ids(document, tokenizer)
    if isinstance(objective, objectives_lib.FillInTheMiddle):
        content = objective(content, rng)
    bos = [tokenizer.bos_id] if layout.add_bos else []
    eos = [tokenizer.eos_id] if layout.add_eos else []
    ids = np.concatenate([np.asarray(bos, np.int32), content, np.asarray(eos, np.int32)])
    if objective is None or isinstance(objective, objectives_lib.FillInTheMiddle):
        return _causal_pieces(ids, layout)
    return [
        _example_piece(objective(chunk, rng), layout)
        for chunk in objectives_lib.chunks(ids, objective.max_chunk(layout.seq_len))
        if len(chunk) >= 2
    ]


def _causal_pieces(ids: np.ndarray, layout: Layout) -> list[Batch]:
    """(input, target) pairs of one document, cut into pieces of at most seq_len."""
    inputs, targets = ids[:-1], ids[1:]
    seq_len = layout.seq_len
    pieces = []
    for start in range(0, len(inputs), seq_len):
        piece = {
            "tokens": inputs[start : start + seq_len],
            "targets": targets[start : start + seq_len],
            "positions": np.arange(start, min(start + seq_len, len(inputs)), dtype=np.int32),
        }
        if layout.prefix_fields:
            n = len(piece["tokens"])
            piece["loss_mask"] = np.ones(n, np.int32)
            piece["prefix"] = np.zeros(n, np.int32)
        pieces.append(piece)
    return pieces


def _example_piece(example: objectives_lib.Example, layout: Layout) -> Batch:
    """One objective example as a piece: it fits one row by construction (max_chunk)."""
    n = len(example.sequence) - 1
    if n > layout.seq_len:
        raise AssertionError(f"objective example of {n} inputs exceeds seq_len {layout.seq_len}")
    return {
        "tokens": example.sequence[:-1],
        "targets": example.sequence[1:],
        "positions": np.arange(n, dtype=np.int32),
        "loss_mask": np.asarray(example.loss_mask, np.int32),
        "prefix": (np.arange(n) < example.prefix_len).astype(np.int32),
    }


class _Flatten(grain.experimental.FlatMapTransform):
    """Emits each piece of a document's list of pieces (grain has no flatten of its own)."""

    max_fan_out = sys.maxsize  # unused by FlatMapIterDataset

    def flat_map(self, element: Sequence[Batch]) -> Sequence[Batch]:
        return element


def _pack(pieces: grain.IterDataset, layout: Layout, *, num_bins: int) -> grain.IterDataset:
    """Pack pieces (each <= seq_len) into rows: first-fit / best-fit over `num_bins` open rows
    (pieces stay whole, some padding), or concat-then-split (no padding; a piece may continue
    in the next row, its positions continuing)."""
    lengths = dict.fromkeys(layout.fields, layout.seq_len)
    if layout.packing == "concat_split":
        return grain.experimental.ConcatThenSplitIterDataset(pieces, length_struct=lengths)
    packer = {
        "first_fit": grain.experimental.FirstFitPackIterDataset,
        "best_fit": grain.experimental.BestFitPackIterDataset,
    }[layout.packing]
    padding = dict.fromkeys(layout.fields, 0)
    padding.update(tokens=layout.tokenizer.pad_id, targets=layout.tokenizer.pad_id)
    return packer(
        pieces,
        length_struct=lengths,
        num_packing_bins=num_bins,
        shuffle_bins=False,
        padding_struct=padding,
    )


def _select_fields(row: Batch, *, layout: Layout, source: int | None) -> Batch:
    selected = {key: row[key] for key in layout.fields}
    selected["segment_ids"] = row["tokens_segment_ids"]
    if source is not None:
        selected["source"] = np.full(layout.seq_len, source, np.int32)
    return selected


class StagedMixIterDataset(grain.IterDataset):
    """Rows drawn from several row streams by weight, the weights changing at given rows.

    grain's `mix` has fixed weights; stages (e.g. more replay data while annealing) need them
    to change mid-stream, exactly at a step boundary, and resume there.
    """

    def __init__(
        self, parents: Sequence[grain.IterDataset], stages: Sequence[tuple[int, Sequence[float]]]
    ) -> None:
        super().__init__(list(parents))
        if [start for start, _ in stages] != sorted({start for start, _ in stages}):
            raise ValueError(f"stage start rows must increase: {[s for s, _ in stages]}")
        if stages[0][0] != 0:
            raise ValueError(f"the first stage must start at row 0, not {stages[0][0]}")
        for start, weights in stages:
            if len(weights) != len(parents) or min(weights) < 0 or sum(weights) <= 0:
                raise ValueError(f"stage at row {start}: bad weights {list(weights)}")
        self._stages = [(int(start), [float(w) for w in weights]) for start, weights in stages]

    def __iter__(self) -> _StagedMixIterator:
        return _StagedMixIterator([iter(p) for p in self.parents], self._stages)


class _StagedMixIterator(grain.DatasetIterator):
    """Deterministic weighted interleave: each row goes to the source furthest behind its
    share of the current stage (so shares are exact up to one row); state = position and
    per-source counts within the stage, plus every source's own state."""

    def __init__(
        self, parents: list[grain.DatasetIterator], stages: list[tuple[int, list[float]]]
    ) -> None:
        super().__init__(parents)
        self._stages = stages
        self._row = 0
        self._counts = [0] * len(parents)

    def _stage(self) -> tuple[int, list[float]]:
        return [stage for stage in self._stages if stage[0] <= self._row][-1]

    def __next__(self) -> Any:
        start, weights = self._stage()
        if self._row == start:
            self._counts = [0] * len(weights)
        total = sum(weights)
        drawn = self._row - start + 1
        deficits = [drawn * w / total - c for w, c in zip(weights, self._counts, strict=True)]
        choice = int(np.argmax(deficits))
        row = next(self._parents[choice])
        self._counts[choice] += 1
        self._row += 1
        return row

    def get_state(self) -> dict[str, Any]:
        return {
            "row": self._row,
            "counts": list(self._counts),
            "sources": [parent.get_state() for parent in self._parents],
        }

    def set_state(self, state: dict[str, Any]) -> None:
        if len(state["sources"]) != len(self._parents):
            raise ValueError(
                f"the saved data state has {len(state['sources'])} sources, this run "
                f"{len(self._parents)}: the data.sources of a resumed run must not change"
            )
        for parent, parent_state in zip(self._parents, state["sources"], strict=True):
            parent.set_state(parent_state)
        self._row = int(state["row"])
        self._counts = [int(c) for c in state["counts"]]


def unigram_entropy(docs: Documents, tokenizer: Tokenizer, max_docs: int = 2000) -> float:
    """Entropy (nats/token) of the unigram distribution of the first `max_docs` documents'
    tokens: the loss of a model that ignores context, the baseline to beat."""
    picked = [docs[i] for i in range(min(max_docs, len(docs)))]
    texts = [d for d in picked if isinstance(d, str)]  # tokenized in one parallel batch
    ids = np.concatenate(
        [np.asarray(t, np.int64) for t in tokenizer.encode_batch(texts)]
        + [np.asarray(d, np.int64) for d in picked if not isinstance(d, str)]
    )
    counts = np.bincount(ids)
    p = counts[counts > 0] / ids.size
    return float(-(p * np.log(p)).sum())
