"""Grain pipeline: documents -> token ids -> (input, target) pieces -> packed, fixed-shape batches.

Every batch is a dict of int32 arrays of shape (batch, seq_len):
  tokens       model inputs
  targets      the next token of the same document (never across a document boundary)
  segment_ids  1, 2, 3, ... per packed piece within a row; 0 marks padding (mask it)
  positions    the token's position in its document
A document longer than seq_len becomes consecutive pieces of at most seq_len tokens; a
continuation piece keeps counting positions from its offset in the document (so RoPE sees true
positions), although it cannot attend to the earlier pieces. No token is dropped or repeated
within an epoch: first-/best-fit packing pads instead of truncating, and concat-then-split
continues a piece in the next row (with its positions) instead of padding.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Sequence

import grain
import numpy as np

from maxlm.data.sources import Documents
from maxlm.data.tokenizer import Tokenizer

Batch = dict[str, np.ndarray]
_PACKED = ("tokens", "targets", "positions")  # fields the packer lays out; it adds segment ids


def train_dataset(
    docs: Documents,
    tokenizer: Tokenizer,
    *,
    seq_len: int,
    batch_size: int,
    seed: int,
    add_bos: bool,
    add_eos: bool,
    shuffle_window: int = 0,
    packing: str = "first_fit",
    process_index: int = 0,
    process_count: int = 1,
) -> grain.IterDataset:
    """Endless packed batches of this process's share (`batch_size` rows each), reshuffled
    every epoch; `iter()` of it has `get_state()` / `set_state()` for exact resume."""
    rows = packed_rows(
        docs,
        tokenizer,
        seq_len=seq_len,
        num_bins=batch_size,
        shuffle_seed=seed,
        shuffle_window=shuffle_window,
        packing=packing,
        add_bos=add_bos,
        add_eos=add_eos,
        process_index=process_index,
        process_count=process_count,
    )
    return rows.batch(batch_size, drop_remainder=True)


def eval_batches(
    docs: Documents,
    tokenizer: Tokenizer,
    *,
    seq_len: int,
    batch_size: int,
    num_batches: int,
    add_bos: bool,
    add_eos: bool,
    seed: int | None = None,
    shuffle_window: int = 0,
    packing: str = "first_fit",
    process_index: int = 0,
    process_count: int = 1,
) -> list[Batch]:
    """The first `num_batches` packed batches of `docs` (repeated when too few): in order, or
    sampled across documents with a fixed `seed` and `shuffle_window`; the same every call."""
    rows = packed_rows(
        docs,
        tokenizer,
        seq_len=seq_len,
        num_bins=batch_size,
        shuffle_seed=seed,
        shuffle_window=shuffle_window,
        packing=packing,
        add_bos=add_bos,
        add_eos=add_eos,
        process_index=process_index,
        process_count=process_count,
    )
    batches = iter(rows.batch(batch_size, drop_remainder=True))
    return [next(batches) for _ in range(num_batches)]


def packed_rows(
    docs: Documents,
    tokenizer: Tokenizer,
    *,
    seq_len: int,
    num_bins: int,
    shuffle_seed: int | None,
    add_bos: bool,
    add_eos: bool,
    shuffle_window: int = 0,
    packing: str = "first_fit",
    process_index: int = 0,
    process_count: int = 1,
    num_epochs: int | None = None,
) -> grain.IterDataset:
    """Packed rows of shape (seq_len,): this process's `document_stream`, tokenized, split
    into pieces, shuffled within windows of `shuffle_window` pieces (when > 1 and seeded),
    and first-fit packed into `num_bins` rows at a time."""
    if add_bos and tokenizer.bos_id is None:
        raise ValueError("data.add_bos: the tokenizer has no BOS token")
    if add_eos and tokenizer.eos_id is None:
        raise ValueError("data.add_eos: the tokenizer has no EOS token")
    ds = document_stream(
        docs,
        shuffle_seed=shuffle_seed,
        num_epochs=num_epochs,
        process_index=process_index,
        process_count=process_count,
    )
    pieces = ds.map(
        functools.partial(
            _pieces, tokenizer=tokenizer, seq_len=seq_len, add_bos=add_bos, add_eos=add_eos
        )
    )
    flat = grain.experimental.FlatMapIterDataset(pieces.to_iter_dataset(), _Flatten())
    if shuffle_seed is not None and shuffle_window > 1:
        # consecutive pieces of one long document would otherwise fill a whole batch
        flat = grain.experimental.WindowShuffleIterDataset(
            flat, window_size=shuffle_window, seed=_shuffle_seed(shuffle_seed + 1)
        )
    packed = _pack(flat, packing, seq_len=seq_len, num_bins=num_bins, pad_id=tokenizer.pad_id)
    return packed.map(_select_fields)


def document_stream(
    docs: Documents,
    *,
    shuffle_seed: int | None,
    num_epochs: int | None = None,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.MapDataset:
    """Texts of `docs`, shuffled anew each epoch (unless `shuffle_seed` is None), repeated
    `num_epochs` times (None: forever); this process takes every `process_count`-th one."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    if len(docs) < process_count:
        raise ValueError(f"{len(docs)} document(s) cannot feed {process_count} process(es)")
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


def _pieces(
    text: str, *, tokenizer: Tokenizer, seq_len: int, add_bos: bool, add_eos: bool
) -> list[Batch]:
    """(input, target) pairs of one document, cut into pieces of at most seq_len."""
    bos = [tokenizer.bos_id] if add_bos else []
    eos = [tokenizer.eos_id] if add_eos else []
    ids = np.asarray(bos + tokenizer.encode(text) + eos, dtype=np.int32)
    inputs, targets = ids[:-1], ids[1:]
    return [
        {
            "tokens": inputs[start : start + seq_len],
            "targets": targets[start : start + seq_len],
            "positions": np.arange(start, min(start + seq_len, len(inputs)), dtype=np.int32),
        }
        for start in range(0, len(inputs), seq_len)
    ]


class _Flatten(grain.experimental.FlatMapTransform):
    """Emits each piece of a document's list of pieces (grain has no flatten of its own)."""

    max_fan_out = sys.maxsize  # unused by FlatMapIterDataset

    def flat_map(self, element: Sequence[Batch]) -> Sequence[Batch]:
        return element


def _pack(
    pieces: grain.IterDataset, packing: str, *, seq_len: int, num_bins: int, pad_id: int
) -> grain.IterDataset:
    """Pack pieces (each <= seq_len) into rows: first-fit / best-fit over `num_bins` open rows
    (pieces stay whole, some padding), or concat-then-split (no padding; a piece may continue
    in the next row, its positions continuing)."""
    lengths = dict.fromkeys(_PACKED, seq_len)
    if packing == "concat_split":
        return grain.experimental.ConcatThenSplitIterDataset(pieces, length_struct=lengths)
    packer = {
        "first_fit": grain.experimental.FirstFitPackIterDataset,
        "best_fit": grain.experimental.BestFitPackIterDataset,
    }[packing]
    return packer(
        pieces,
        length_struct=lengths,
        num_packing_bins=num_bins,
        shuffle_bins=False,
        padding_struct={"tokens": pad_id, "targets": pad_id, "positions": 0},
    )


def _select_fields(row: Batch) -> Batch:
    return {
        "tokens": row["tokens"],
        "targets": row["targets"],
        "segment_ids": row["tokens_segment_ids"],
        "positions": row["positions"],
    }


def unigram_entropy(docs: Documents, tokenizer: Tokenizer, max_docs: int = 2000) -> float:
    """Entropy (nats/token) of the unigram distribution of the first `max_docs` documents'
    tokens: the loss of a model that ignores context, the baseline to beat."""
    texts = [docs[i] for i in range(min(max_docs, len(docs)))]
    ids = np.concatenate([np.asarray(t, dtype=np.int64) for t in tokenizer.encode_batch(texts)])
    counts = np.bincount(ids)
    p = counts[counts > 0] / ids.size
    return float(-(p * np.log(p)).sum())
