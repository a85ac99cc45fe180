"""Synthetic packed batches: for benchmarks and tests that must not depend on a corpus."""

from __future__ import annotations

import numpy as np


def packed_batch(
    batch_size: int, seq_len: int, vocab_size: int, seed: int, max_documents: int = 3
) -> dict[str, np.ndarray]:
    """Random tokens packed as up to `max_documents` documents per row, then padding."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, vocab_size, (batch_size, seq_len + 1), dtype=np.int32)
    segment_ids = np.zeros((batch_size, seq_len), np.int32)
    positions = np.zeros((batch_size, seq_len), np.int32)
    for row in range(batch_size):
        cuts = np.sort(rng.choice(np.arange(1, seq_len + 1), max_documents, replace=False))
        start = 0
        for segment, end in enumerate(cuts, start=1):
            segment_ids[row, start:end] = segment
            positions[row, start:end] = np.arange(end - start)
            start = end
    return {
        "tokens": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "segment_ids": segment_ids,
        "positions": positions,
    }
