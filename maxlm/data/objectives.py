"""Pretraining objectives as per-document numpy transforms: fill-in-the-middle, prefix LM, T5
span corruption and the UL2 mixture of denoisers.

Every transform takes int32 token ids and a `np.random.Generator` and draws its random numbers
in a fixed order, so its output is a pure function of (ids, generator state). FIM rewrites a
document that is then trained as a plain causal LM; the denoisers turn a chunk into an `Example`
whose inputs are partly bidirectional (`prefix_len`) and whose loss covers only the targets.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: arrays have no truth value
class Example:
    """One training example laid out for a decoder-only model."""

    sequence: np.ndarray  # int32 [n], n >= 2: the model reads sequence[:-1], predicts sequence[1:]
    loss_mask: np.ndarray  # int32 [n-1]: 1 where predicting sequence[i+1] counts in the loss
    prefix_len: int  # input positions [0, prefix_len) attend bidirectionally (0 = fully causal)

    def __post_init__(self) -> None:
        if len(self.sequence) < 2 or self.loss_mask.shape != (len(self.sequence) - 1,):
            raise ValueError(
                f"Example needs len(sequence) >= 2 and len(loss_mask) == len(sequence) - 1, got "
                f"{len(self.sequence)} and {len(self.loss_mask)}"
            )
        if not 0 <= self.prefix_len < len(self.sequence):
            raise ValueError(
                f"prefix_len {self.prefix_len} not in [0, {len(self.sequence)}) (the sequence)"
            )


def _prefix_example(prefix: np.ndarray, targets: np.ndarray) -> Example:
    """Bidirectional `prefix`, then causal `targets`; the loss covers exactly the targets."""
    sequence = np.concatenate([prefix, targets]).astype(np.int32)
    # Position i predicts sequence[i + 1], so the last prefix position predicts the first target.
    loss_mask = (np.arange(len(sequence) - 1) >= len(prefix) - 1).astype(np.int32)
    return Example(sequence=sequence, loss_mask=loss_mask, prefix_len=len(prefix))


def _mode(mode_id: int | None) -> np.ndarray:
    """The mode token as a 0- or 1-token array."""
    return np.array([] if mode_id is None else [mode_id], np.int32)


def _check_chunk(ids: np.ndarray, what: str) -> np.ndarray:
    """The chunk as 1-D int32; a denoiser needs at least 2 tokens to split."""
    ids = np.asarray(ids, np.int32)
    if ids.ndim != 1:
        raise ValueError(f"{what} needs a 1-D chunk, got shape {ids.shape}")
    if len(ids) < 2:
        raise ValueError(f"{what} needs a chunk of at least 2 tokens, got {len(ids)}")
    return ids


@dataclasses.dataclass(frozen=True, kw_only=True)
class FillInTheMiddle:
    """Token-level FIM (Bavarian et al. 2022) in StarCoder's format; the result stays causal LM.

    PSM: [PRE] prefix [SUF] suffix [MID] middle. SPM (the paper's variant): [PRE] [SUF] suffix
    [MID] prefix middle. The caller adds BOS/EOS around the result.
    """

    rate: float  # fraction of documents rearranged
    spm_rate: float  # fraction of rearranged documents in SPM order (the rest are PSM)
    prefix_id: int
    middle_id: int
    suffix_id: int

    def __post_init__(self) -> None:
        for name in ("rate", "spm_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"FillInTheMiddle.{name} must be in [0, 1], got {self}")

    def __call__(self, ids: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """The document, rearranged with probability `rate`; documents under 2 tokens (nothing
        to cut) are returned as they are without drawing from `rng`."""
        ids = np.asarray(ids, np.int32)
        if len(ids) < 2 or rng.random() >= self.rate:
            return ids
        # Cut points as in StarCoder's Megatron-LM: uniform over [0, n], so parts may be empty.
        lo, hi = np.sort(rng.integers(0, len(ids) + 1, size=2))
        prefix, middle, suffix = ids[:lo], ids[lo:hi], ids[hi:]
        pre, mid, suf = (
            np.array([t], np.int32) for t in (self.prefix_id, self.middle_id, self.suffix_id)
        )
        if rng.random() < self.spm_rate:
            parts = [pre, suf, suffix, mid, prefix, middle]
        else:
            parts = [pre, prefix, suf, suffix, mid, middle]
        return np.concatenate(parts)


@dataclasses.dataclass(frozen=True, kw_only=True)
class PrefixLM:
    """Prefix LM: a uniform split into a bidirectional prefix and a causal suffix to predict."""

    mode_id: int | None = None  # a mode token ([S] in UL2) opens the prefix

    def __call__(self, ids: np.ndarray, rng: np.random.Generator) -> Example:
        """[mode]? + chunk, split so that both chunk parts are non-empty; loss on the suffix."""
        ids = _check_chunk(ids, "PrefixLM")
        split = int(rng.integers(1, len(ids)))
        return _prefix_example(np.concatenate([_mode(self.mode_id), ids[:split]]), ids[split:])

    def max_chunk(self, seq_len: int) -> int:
        """The longest chunk whose example's inputs (sequence[:-1]) fit in `seq_len`."""
        max_len = seq_len + 1 - len(_mode(self.mode_id))
        if max_len < 2:
            raise ValueError(f"PrefixLM: seq_len {seq_len} leaves no room for 2 tokens")
        return max_len


def _random_segmentation(num_items: int, num_segments: int, rng: np.random.Generator) -> np.ndarray:
    """T5's `_random_segmentation`: lengths of a uniform split into non-empty segments."""
    first_in_segment = np.zeros(num_items, np.int64)
    first_in_segment[1:] = rng.permutation(np.arange(num_items - 1) < num_segments - 1)
    return np.bincount(np.cumsum(first_in_segment), minlength=num_segments)


def _spans_to_sentinels(ids: np.ndarray, mask: np.ndarray, sentinels: np.ndarray) -> np.ndarray:
    """T5's `noise_span_to_unique_sentinel`: each run of masked tokens becomes its own sentinel."""
    previous = np.concatenate([[False], mask[:-1]])
    first = mask & ~previous
    # Before the first span the index is -1; `first` is False there, so the value is unused.
    out = np.where(first, sentinels[np.cumsum(first) - 1], ids)
    return out[~(mask & previous)]


@dataclasses.dataclass(frozen=True, kw_only=True)
class SpanCorruption:
    """T5 span corruption as a prefix-LM example: [mode]? + inputs (bidirectional) + targets.

    inputs = the chunk with its k-th noise span replaced by sentinel_ids[k]; targets = each span's
    sentinel followed by the span's tokens (T5's `random_spans_noise_mask` and sentinel ops).
    """

    noise_density: float  # fraction of the chunk's tokens that are noise
    mean_span_length: float  # average noise span length, in tokens
    sentinel_ids: Sequence[int]  # the k-th noise span is marked by sentinel_ids[k]
    mode_id: int | None = None  # a mode token ([R] or [X] in UL2) opens the inputs

    def __post_init__(self) -> None:
        if not 0.0 < self.noise_density < 1.0:
            raise ValueError(f"noise_density must be in (0, 1), got {self.noise_density}")
        if self.mean_span_length < 1.0:
            raise ValueError(f"mean_span_length must be >= 1, got {self.mean_span_length}")
        if not self.sentinel_ids:
            raise ValueError("SpanCorruption needs at least one sentinel id")
        object.__setattr__(self, "sentinel_ids", tuple(int(s) for s in self.sentinel_ids))

    def counts(self, length: int) -> tuple[int, int]:
        """(noise tokens, noise spans) of a chunk of `length` tokens, by T5's rules; `round`
        sends ties to even, as `tf.round` does."""
        num_noise = min(max(round(length * self.noise_density), 1), length - 1)
        num_spans = max(1, round(num_noise / self.mean_span_length))
        # T5 fails when there are fewer non-noise tokens than spans; cap so all spans are non-empty.
        return num_noise, min(num_spans, length - num_noise)

    def noise_mask(self, length: int, rng: np.random.Generator) -> np.ndarray:
        """T5's `random_spans_noise_mask`: bool [length], spans alternating from non-noise."""
        num_noise, num_spans = self.counts(length)
        noise_lengths = _random_segmentation(num_noise, num_spans, rng)
        nonnoise_lengths = _random_segmentation(length - num_noise, num_spans, rng)
        span_lengths = np.stack([nonnoise_lengths, noise_lengths], axis=1).ravel()
        return np.repeat(np.tile([False, True], num_spans), span_lengths)

    def __call__(self, ids: np.ndarray, rng: np.random.Generator) -> Example:
        """The chunk as [mode]? + inputs + targets; loss on the targets."""
        ids = _check_chunk(ids, "SpanCorruption")
        num_noise, num_spans = self.counts(len(ids))
        if num_spans > len(self.sentinel_ids):
            raise ValueError(
                f"a chunk of {len(ids)} tokens has {num_spans} noise spans ({num_noise} noise "
                f"tokens) but there are only {len(self.sentinel_ids)} sentinel ids"
            )
        mask = self.noise_mask(len(ids), rng)
        sentinels = np.asarray(self.sentinel_ids, np.int32)
        inputs = _spans_to_sentinels(ids, mask, sentinels)
        targets = _spans_to_sentinels(ids, ~mask, sentinels)
        return _prefix_example(np.concatenate([_mode(self.mode_id), inputs]), targets)

    def max_chunk(self, seq_len: int) -> int:
        """The longest chunk whose example's inputs fit in `seq_len` and whose spans all have a
        sentinel id (so no chunk of this length raises)."""
        budget = seq_len + 1 - len(_mode(self.mode_id))

        def fits(length: int) -> bool:
            num_spans = self.counts(length)[1]
            return length + 2 * num_spans <= budget and num_spans <= len(self.sentinel_ids)

        if not fits(2):
            raise ValueError(f"SpanCorruption: seq_len {seq_len} leaves no room for 2 tokens")
        # Noise spans never decrease with length, so `fits` holds exactly up to the answer.
        lo, hi = 2, budget  # invariant: fits(lo), and the answer is in [lo, hi]
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
        return lo


Denoiser = PrefixLM | SpanCorruption


class UL2:
    """UL2's mixture of denoisers (Tay et al. 2022): each chunk goes to one denoiser, picked by
    rate; each denoiser carries its own mode token ([R], [S] or [X])."""

    def __init__(self, denoisers: Sequence[tuple[float, Denoiser]]) -> None:
        rates = np.array([rate for rate, _ in denoisers], np.float64)
        if not len(rates) or (rates < 0).any() or rates.sum() <= 0:
            raise ValueError(f"UL2 needs non-negative rates with a positive sum, got {rates}")
        self.probabilities = rates / rates.sum()
        self.denoisers = tuple(denoiser for _, denoiser in denoisers)

    def __call__(self, ids: np.ndarray, rng: np.random.Generator) -> Example:
        """The chunk through one denoiser, drawn by rate, with the same generator."""
        choice = rng.choice(len(self.denoisers), p=self.probabilities)
        return self.denoisers[choice](ids, rng)

    def max_chunk(self, seq_len: int) -> int:
        """The chunk length every denoiser fits, so chunking does not depend on the draw."""
        return min(denoiser.max_chunk(seq_len) for denoiser in self.denoisers)


def chunks(ids: np.ndarray, max_len: int) -> list[np.ndarray]:
    """`ids` as consecutive int32 chunks of `max_len` tokens, the last one shorter when `max_len`
    does not divide the length. Nothing is dropped: the denoisers need >= 2 tokens, so callers
    skip (and count) a final chunk of 1 token."""
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    ids = np.asarray(ids, np.int32)
    return [ids[start : start + max_len] for start in range(0, len(ids), max_len)]
