"""Objectives: golden outputs for fixed seeds, and invariants and rates over many seeds.

Golden values are the outputs of numpy's default Generator (PCG64) for the seeds named. If the
stream or an objective changes on purpose, re-derive them by hand from the draws the comments
list (e.g. `rng = np.random.default_rng(2); rng.random(); rng.integers(0, 11, size=2)`), check
them against the rules in maxlm/data/objectives.py, and paste the new arrays.
"""

import math

import numpy as np
import pytest

from maxlm.data.objectives import (
    UL2,
    Example,
    FillInTheMiddle,
    PrefixLM,
    SpanCorruption,
    chunks,
)

PRE, MID, SUF = 0, 1, 2  # FIM sentinels
R, S, X = 3, 4, 5  # UL2 mode tokens
SENTINELS = list(range(100, 164))
DOC = np.arange(10, 20, dtype=np.int32)


def _random_docs(count: int, low: int, high: int, seed: int = 0) -> list[np.ndarray]:
    """`count` documents of [low, high) content tokens, disjoint from every special id."""
    rng = np.random.default_rng(seed)
    return [rng.integers(1000, 2000, rng.integers(low, high), dtype=np.int32) for _ in range(count)]


def _within_sigmas(count: int, trials: int, p: float, sigmas: float = 4.0) -> bool:
    """Whether a binomial count is within `sigmas` standard deviations of its mean."""
    return abs(count - trials * p) <= sigmas * math.sqrt(trials * p * (1 - p))


# Fill in the middle


def _fim(rate: float = 0.5, spm_rate: float = 0.5) -> FillInTheMiddle:
    return FillInTheMiddle(
        rate=rate, spm_rate=spm_rate, prefix_id=PRE, middle_id=MID, suffix_id=SUF
    )


def _undo_fim(out: np.ndarray) -> np.ndarray:
    """The document back from a PSM or SPM output."""
    suf, mid = int(np.flatnonzero(out == SUF)[0]), int(np.flatnonzero(out == MID)[0])
    if suf == 1:  # SPM: [PRE] [SUF] suffix [MID] prefix middle
        return np.concatenate([out[mid + 1 :], out[2:mid]])
    return np.concatenate([out[1:suf], out[mid + 1 :], out[suf + 1 : mid]])  # PSM


@pytest.mark.parametrize(
    "seed, expected",
    [
        # random() = 0.637 < rate; cuts integers(0, 11, 2) = [5, 2]; random() = 0.041 < spm: SPM.
        (0, [PRE, SUF, 15, 16, 17, 18, 19, MID, 10, 11, 12, 13, 14]),
        # random() = 0.262; cuts [1, 3]; random() = 0.814 >= spm_rate: PSM.
        (2, [PRE, 10, SUF, 13, 14, 15, 16, 17, 18, 19, MID, 11, 12]),
        # random() = 0.943 >= rate: unchanged.
        (4, list(range(10, 20))),
    ],
)
def test_fim_golden(seed, expected):
    out = _fim(rate=0.7, spm_rate=0.5)(DOC, np.random.default_rng(seed))
    assert out.dtype == np.int32
    np.testing.assert_array_equal(out, expected)


def test_fim_invariants_and_rates():
    fim, docs = _fim(rate=0.5, spm_rate=0.3), _random_docs(2000, 2, 60)
    transformed = spm_layout = 0
    expected_spm_layout = 0.0
    for seed, doc in enumerate(docs):
        out = fim(doc, np.random.default_rng(seed))
        np.testing.assert_array_equal(out, fim(doc, np.random.default_rng(seed)))
        if len(out) == len(doc):
            np.testing.assert_array_equal(out, doc)
            continue
        transformed += 1
        assert out.dtype == np.int32 and out[0] == PRE
        assert [(out == t).sum() for t in (PRE, MID, SUF)] == [1, 1, 1]
        np.testing.assert_array_equal(np.sort(out[out >= 1000]), np.sort(doc))
        np.testing.assert_array_equal(_undo_fim(out), doc)
        # PSM with an empty prefix (both cuts uniform over [0, n], the lower one at 0) reads
        # exactly like SPM, so the SPM layout shows up a little more often than spm_rate.
        empty_prefix = 1 - (len(doc) / (len(doc) + 1)) ** 2
        expected_spm_layout += 0.3 + 0.7 * empty_prefix
        spm_layout += int(out[1] == SUF)
    assert _within_sigmas(transformed, len(docs), 0.5)
    assert _within_sigmas(spm_layout, transformed, expected_spm_layout / transformed)


def test_fim_cut_points_uniform():
    # Both cuts uniform over [0, n]: the middle is empty with probability 1 / (n + 1).
    fim, n, trials = _fim(rate=1.0, spm_rate=0.0), 4, 2000
    outs = [fim(DOC[:n], np.random.default_rng(seed)) for seed in range(trials)]
    empty_middle = sum(int(out[-1] == MID) for out in outs)
    assert _within_sigmas(empty_middle, trials, 1 / (n + 1))


def test_fim_short_documents_pass_through():
    rng = np.random.default_rng(0)
    state = rng.bit_generator.state
    for doc in (np.zeros(0, np.int32), np.array([42], np.int32)):
        np.testing.assert_array_equal(_fim(rate=1.0)(doc, rng), doc)
    assert rng.bit_generator.state == state  # nothing drawn


def test_fim_rejects_bad_rates():
    with pytest.raises(ValueError, match="spm_rate"):
        _fim(spm_rate=1.5)


# Prefix LM


def test_prefix_lm_golden():
    # rng = default_rng(1): integers(1, 6) = 3, so the prefix is [S, 10, 11, 12].
    ex = PrefixLM(mode_id=S)(np.arange(10, 16), np.random.default_rng(1))
    np.testing.assert_array_equal(ex.sequence, [S, 10, 11, 12, 13, 14, 15])
    np.testing.assert_array_equal(ex.loss_mask, [0, 0, 0, 1, 1, 1])
    assert ex.prefix_len == 4
    assert ex.sequence.dtype == ex.loss_mask.dtype == np.int32


@pytest.mark.parametrize("mode_id", [None, S])
def test_prefix_lm_invariants(mode_id):
    lm, mode = PrefixLM(mode_id=mode_id), [] if mode_id is None else [mode_id]
    for seed, doc in enumerate(_random_docs(300, 2, 40)):
        ex = lm(doc, np.random.default_rng(seed))
        np.testing.assert_array_equal(ex.sequence, mode + list(doc))
        split = ex.prefix_len - len(mode)
        assert 1 <= split <= len(doc) - 1
        np.testing.assert_array_equal(ex.sequence[1:][ex.loss_mask == 1], doc[split:])
        assert ex.loss_mask[: ex.prefix_len - 1].sum() == 0


def test_prefix_lm_split_uniform():
    lm, doc, trials = PrefixLM(), np.arange(10, 15), 2000
    splits = np.array([lm(doc, np.random.default_rng(seed)).prefix_len for seed in range(trials)])
    for split in range(1, len(doc)):
        assert _within_sigmas(int((splits == split).sum()), trials, 1 / (len(doc) - 1))


@pytest.mark.parametrize("mode_id", [None, S])
def test_prefix_lm_max_chunk(mode_id):
    lm = PrefixLM(mode_id=mode_id)
    for seq_len in (2, 3, 16, 1024):
        length = lm.max_chunk(seq_len)
        doc = DOC.repeat(200)[: length + 1]
        assert len(lm(doc[:length], np.random.default_rng(0)).sequence) == seq_len + 1
        assert len(lm(doc, np.random.default_rng(0)).sequence) == seq_len + 2


def test_prefix_lm_errors():
    with pytest.raises(ValueError, match="at least 2 tokens, got 1"):
        PrefixLM()(np.array([7]), np.random.default_rng(0))
    with pytest.raises(ValueError, match="seq_len 1"):
        PrefixLM(mode_id=S).max_chunk(1)


# Span corruption


def _span_corruption(
    noise_density: float, mean_span_length: float, mode_id: int | None, sentinels=SENTINELS
) -> SpanCorruption:
    return SpanCorruption(
        noise_density=noise_density,
        mean_span_length=mean_span_length,
        sentinel_ids=sentinels,
        mode_id=mode_id,
    )


def _decode(ex: Example, mode_len: int) -> np.ndarray:
    """The chunk back: each sentinel in the inputs replaced by its span from the targets."""
    inputs, targets = ex.sequence[mode_len : ex.prefix_len], ex.sequence[ex.prefix_len :]
    starts = np.flatnonzero(targets < 1000)  # sentinels; content ids are >= 1000
    spans = dict(zip(targets[starts].tolist(), np.split(targets, starts[1:]), strict=True))
    return np.concatenate([spans[t][1:] if t in spans else [t] for t in inputs.tolist()])


def test_span_corruption_golden():
    # rng = default_rng(0); 20 tokens: 6 noise in 3 spans. Noise lengths: permutation(arange(5)
    # < 2) = [F F F T T] -> [4, 1, 1]; non-noise: permutation(arange(13) < 2) puts the cuts
    # after 5 and 9 items -> [5, 4, 5]; so the spans are 15-18, 23 and 29.
    sc = SpanCorruption(noise_density=0.3, mean_span_length=2, sentinel_ids=SENTINELS, mode_id=X)
    ex = sc(np.arange(10, 30), np.random.default_rng(0))
    inputs = [X, 10, 11, 12, 13, 14, 100, 19, 20, 21, 22, 101, 24, 25, 26, 27, 28, 102]
    targets = [100, 15, 16, 17, 18, 101, 23, 102, 29]
    np.testing.assert_array_equal(ex.sequence, inputs + targets)
    assert ex.prefix_len == len(inputs)
    np.testing.assert_array_equal(ex.loss_mask, [0] * (len(inputs) - 1) + [1] * len(targets))
    assert ex.sequence.dtype == ex.loss_mask.dtype == np.int32


@pytest.mark.parametrize(
    "length, noise_density, mean_span_length, expected",
    [
        (20, 0.3, 2.0, (6, 3)),
        (50, 0.15, 3.0, (8, 3)),  # 7.5 -> 8 noise tokens; 8 / 3 = 2.67 -> 3 spans
        (13, 0.5, 2.0, (6, 3)),  # 6.5 -> 6: ties round to even, as tf.round does
        (2, 0.15, 3.0, (1, 1)),  # at least one noise token
        (3, 0.9, 3.0, (2, 1)),  # at least one non-noise token
        (10, 0.9, 1.0, (9, 1)),  # 9 spans capped by the 1 non-noise token (T5 fails here)
    ],
)
def test_span_corruption_counts(length, noise_density, mean_span_length, expected):
    assert _span_corruption(noise_density, mean_span_length, None).counts(length) == expected


@pytest.mark.parametrize(
    "noise_density, mean_span_length, mode_id",
    [(0.15, 3.0, R), (0.5, 3.0, X), (0.5, 1.0, None), (0.9, 1.0, None), (0.15, 32.0, X)],
)
def test_span_corruption_invariants(noise_density, mean_span_length, mode_id):
    sc = _span_corruption(noise_density, mean_span_length, mode_id)
    mode_len = 0 if mode_id is None else 1
    for seed, doc in enumerate(_random_docs(200, 2, 120)):
        ex = sc(doc, np.random.default_rng(seed))
        num_noise, num_spans = sc.counts(len(doc))
        targets = ex.sequence[ex.prefix_len :]
        assert mode_len == 0 or ex.sequence[0] == mode_id
        assert len(ex.sequence) == mode_len + len(doc) + 2 * num_spans
        np.testing.assert_array_equal(targets[targets < 1000], SENTINELS[:num_spans])
        assert (targets >= 1000).sum() == num_noise
        np.testing.assert_array_equal(ex.sequence[1:][ex.loss_mask == 1], targets)
        assert ex.loss_mask[: ex.prefix_len - 1].sum() == 0
        np.testing.assert_array_equal(_decode(ex, mode_len), doc)


def test_span_corruption_statistics():
    # Over long chunks the noise fraction and the mean span length approach the settings, and
    # every position but the first (T5 starts with non-noise) is sometimes noise.
    sc = _span_corruption(0.15, 3.0, None)
    noise = spans = tokens = 0
    hits = np.zeros(60)
    for seed, doc in enumerate(_random_docs(1000, 60, 400)):
        mask = sc.noise_mask(len(doc), np.random.default_rng(seed))
        noise, tokens = noise + mask.sum(), tokens + len(mask)
        spans += (mask[1:] & ~mask[:-1]).sum()
        hits += mask[:60]
    assert abs(noise / tokens - 0.15) < 0.005
    assert abs(noise / spans - 3.0) < 0.1
    assert hits[0] == 0 and (hits[1:] > 0).all()


@pytest.mark.parametrize(
    "noise_density, mean_span_length, num_sentinels, mode_id",
    [(0.15, 3.0, 64, R), (0.5, 3.0, 64, X), (0.5, 1.0, 64, None), (0.5, 3.0, 4, X)],
)
def test_span_corruption_max_chunk_exact(noise_density, mean_span_length, num_sentinels, mode_id):
    sc = _span_corruption(noise_density, mean_span_length, mode_id, SENTINELS[:num_sentinels])
    doc = np.arange(1000, 2000, dtype=np.int32)
    for seq_len in range(5, 200):
        length = sc.max_chunk(seq_len)
        assert len(sc(doc[:length], np.random.default_rng(0)).sequence) <= seq_len + 1
        try:
            longer = len(sc(doc[: length + 1], np.random.default_rng(0)).sequence)
        except ValueError:  # out of sentinel ids
            assert sc.counts(length + 1)[1] > num_sentinels
        else:
            assert longer > seq_len + 1


def test_span_corruption_errors():
    sc = SpanCorruption(noise_density=0.5, mean_span_length=3.0, sentinel_ids=[100, 101])
    with pytest.raises(ValueError, match=r"7 noise spans .* only 2 sentinel ids"):
        sc(np.arange(1000, 1040), np.random.default_rng(0))
    with pytest.raises(ValueError, match="got 1"):
        sc(np.array([1000]), np.random.default_rng(0))
    with pytest.raises(ValueError, match="seq_len 2"):
        _span_corruption(0.5, 3.0, X, sentinels=[100]).max_chunk(2)
    with pytest.raises(ValueError, match="noise_density"):
        SpanCorruption(noise_density=1.0, mean_span_length=3.0, sentinel_ids=[100])
    with pytest.raises(ValueError, match="mean_span_length"):
        SpanCorruption(noise_density=0.5, mean_span_length=0.5, sentinel_ids=[100])


# UL2


def _ul2() -> UL2:
    return UL2(
        [
            (2.0, _span_corruption(0.15, 3.0, R)),
            (1.0, PrefixLM(mode_id=S)),
            (1.0, _span_corruption(0.5, 4.0, X)),
        ]
    )


@pytest.mark.parametrize(
    "seed, expected, prefix_len",
    [
        # choice(3, p=[.5, .25, .25]) = 0 (R); 16 tokens: 2 noise in 1 span, which T5 puts last.
        (2, [R, *range(10, 24), 100, 100, 24, 25], 16),
        # choice = 1 (S); integers(1, 16) = 12.
        (1, [S, *range(10, 26)], 13),
        # choice = 2 (X); 8 noise tokens in 2 spans: non-noise [3, 5], noise [4, 4].
        (
            4,
            [X, 10, 11, 12, 100, *range(17, 22), 101, 100, *range(13, 17), 101, *range(22, 26)],
            11,
        ),
    ],
)
def test_ul2_golden(seed, expected, prefix_len):
    ex = _ul2()(np.arange(10, 26), np.random.default_rng(seed))
    np.testing.assert_array_equal(ex.sequence, expected)
    assert ex.prefix_len == prefix_len


def test_ul2_mode_rates_and_same_rng():
    ul2, trials = _ul2(), 2000
    modes = []
    for seed, doc in enumerate(_random_docs(trials, 2, 100)):
        ex = ul2(doc, np.random.default_rng(seed))
        rng = np.random.default_rng(seed)
        chosen = ul2.denoisers[rng.choice(3, p=[0.5, 0.25, 0.25])]
        np.testing.assert_array_equal(ex.sequence, chosen(doc, rng).sequence)
        modes.append(int(ex.sequence[0]))
    for mode, rate in ((R, 0.5), (S, 0.25), (X, 0.25)):
        assert _within_sigmas(modes.count(mode), trials, rate)


def test_ul2_max_chunk_is_min():
    ul2 = _ul2()
    for seq_len in (8, 64, 2048):
        per_denoiser = [d.max_chunk(seq_len) for d in ul2.denoisers]
        assert ul2.max_chunk(seq_len) == min(per_denoiser)
    assert [d.max_chunk(64) for d in ul2.denoisers] == [58, 64, 52]


def test_ul2_rejects_bad_rates():
    with pytest.raises(ValueError, match="rates"):
        UL2([(0.0, PrefixLM())])


# Chunks and Example


def test_chunks():
    ids = np.arange(11, dtype=np.int64)
    parts = chunks(ids, 5)
    assert [len(p) for p in parts] == [5, 5, 1]  # the 1-token tail is kept for the caller to skip
    assert all(p.dtype == np.int32 for p in parts)
    np.testing.assert_array_equal(np.concatenate(parts), ids)
    assert [len(p) for p in chunks(ids[:10], 5)] == [5, 5]
    assert chunks(ids[:0], 5) == []
    with pytest.raises(ValueError, match="max_len"):
        chunks(ids, 0)


def test_example_validates_shapes():
    with pytest.raises(ValueError, match="loss_mask"):
        Example(sequence=np.arange(4), loss_mask=np.ones(4, np.int32), prefix_len=0)
    with pytest.raises(ValueError, match="prefix_len"):
        Example(sequence=np.arange(4), loss_mask=np.ones(3, np.int32), prefix_len=4)
