"""Data: sources, split, packed batches (shapes, masks, exact token accounting, resume,
sharding, epochs) and global arrays."""

import collections
import copy
import json
import random

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from maxlm.config import ConfigError, SourceConfig, TokenizerConfig
from maxlm.data import objectives
from maxlm.data.global_batch import to_global
from maxlm.data.pipeline import (
    Layout,
    Source,
    document_stream,
    eval_batches,
    packed_rows,
    train_dataset,
    unigram_entropy,
)
from maxlm.data.sources import documents, split
from maxlm.data.tokenizer import load_tokenizer

SEQ_LEN = 32
PACKINGS = ["first_fit", "best_fit", "concat_split"]
WORDS = ["def", "return", "self", "x", "=", "+", "(", ")", ":", "if", "else", "café", "日本"]


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    """40 files of 1 to 120 random words; file 7 is long (many seq_len pieces)."""
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    for i in range(40):
        n = 400 if i == 7 else rng.randint(1, 120)
        text = " ".join(rng.choice(WORDS) for _ in range(n))
        (root / f"doc{i:02d}.txt").write_text(text, encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def docs(corpus_dir):
    return documents(SourceConfig(kind="text_files", paths=[str(corpus_dir / "*.txt")]))


@pytest.fixture(scope="module")
def tok(docs, tmp_path_factory):
    cfg = TokenizerConfig(vocab_size=300, cache_dir=str(tmp_path_factory.mktemp("cache")))
    return load_tokenizer(cfg, docs)


def doc_targets(docs, tok):
    """Targets of every document, tokenized directly: (BOS + ids + EOS)[1:]."""
    return [[*tok.encode(docs[i]), tok.eos_id] for i in range(len(docs))]


def target_counts(rows):
    counts = collections.Counter()
    for row in rows:
        counts.update(row["targets"][row["segment_ids"] > 0].tolist())
    return counts


def layout(tok, **kwargs):
    return Layout(tokenizer=tok, seq_len=SEQ_LEN, add_bos=True, add_eos=True, **kwargs)


def rows_of(docs, tok, num_bins=4, shuffle_seed=0, num_epochs=1, **layout_kwargs):
    rows = packed_rows(
        docs, layout(tok, **layout_kwargs), num_bins=num_bins, shuffle_seed=shuffle_seed,
        num_epochs=num_epochs,
    )  # fmt: skip
    return list(rows)


# --------------------------------------------------------------------------- sources


def test_text_files_globs_are_sorted_and_deduplicated(tmp_path):
    (tmp_path / "sub" / "deep").mkdir(parents=True)
    for name in ["b.txt", "a.txt", "sub/c.txt", "sub/deep/d.txt"]:
        (tmp_path / name).write_text(name)
    cfg = SourceConfig(
        kind="text_files", paths=[str(tmp_path / "**" / "*.txt"), str(tmp_path / "a.txt")]
    )
    docs = documents(cfg)
    names = ["a.txt", "b.txt", "sub/c.txt", "sub/deep/d.txt"]
    assert docs.ids == [str(tmp_path / n) for n in names]
    assert [docs[i] for i in range(len(docs))] == names


def test_documents_per_line(tmp_path):
    (tmp_path / "lines.txt").write_bytes(b"first\n\n  \nsecond\r\nthird")
    cfg = SourceConfig(kind="text_files", paths=[str(tmp_path / "*.txt")], document_per="line")
    docs = documents(cfg)
    assert [docs[i] for i in range(len(docs))] == ["first", "second", "third"]
    assert docs.ids == [f"{tmp_path / 'lines.txt'}:{n}" for n in (1, 4, 5)]


def test_jsonl_records_with_plain_and_nested_fields(tmp_path):
    records = [{"text": "héllo", "meta": {"body": "one"}}, {"text": "a\nb", "meta": {"body": "2"}}]
    path = tmp_path / "part.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n", encoding="utf-8")
    docs = documents(SourceConfig(kind="jsonl", paths=[str(path)]))
    assert [docs[i] for i in range(len(docs))] == ["héllo", "a\nb"]
    assert docs.ids == [f"{path}:1", f"{path}:2"]
    nested = documents(SourceConfig(kind="jsonl", paths=[str(path)], text_field="meta.body"))
    assert [nested[i] for i in range(len(nested))] == ["one", "2"]
    assert nested.subset([1])[0] == "2"  # the field survives the train/eval split


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ('{"text": "ok"', "Expecting"),
        ('{"body": "no text"}', "no field 'text'"),
        ('{"text": 7}', "field 'text' is int, not a string"),
    ],
)
def test_bad_jsonl_record_names_file_and_line(tmp_path, line, problem):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n' + line + "\n")
    with pytest.raises(ConfigError, match=r"data\.sources\.text_field: record .*bad\.jsonl:2: .*"):
        documents(SourceConfig(kind="jsonl", paths=[str(path)]))
    with pytest.raises(ConfigError) as err:
        documents(SourceConfig(kind="jsonl", paths=[str(path)]))
    assert problem in str(err.value)


def test_glob_matching_nothing_is_a_config_error(tmp_path):
    (tmp_path / "a.txt").write_text("a")
    cfg = SourceConfig(kind="text_files", paths=[str(tmp_path / "a.txt"), str(tmp_path / "*.md")])
    with pytest.raises(ConfigError, match=r"data\.sources\.paths.*\*\.md"):
        documents(cfg)


def test_invalid_utf8_is_replaced(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"ok \xff\xfe end")
    docs = documents(SourceConfig(kind="text_files", paths=[str(tmp_path / "bad.txt")]))
    assert docs[0] == "ok \ufffd\ufffd end"


def test_python_stdlib_source():
    docs = documents(SourceConfig(kind="python_stdlib"))
    assert len(docs) > 500
    assert "os.py" in docs.ids
    assert not [i for i in docs.ids if "site-packages" in i or "dist-packages" in i]
    assert docs.ids == sorted(docs.ids)
    assert "import" in docs[docs.ids.index("os.py")]


def test_split_is_deterministic_disjoint_and_never_empty(docs):
    train, held = split(docs, 0.2)
    again_train, again_held = split(docs, 0.2)
    assert (train.ids, held.ids) == (again_train.ids, again_held.ids)
    assert sorted(train.ids + held.ids) == sorted(docs.ids)
    assert 0 < len(held) < len(docs) // 2
    _, tiny_held = split(docs, 1e-12)  # the hash picks none: the smallest hash is moved
    assert len(tiny_held) == 1
    all_train, no_held = split(docs, 0.0)
    assert (len(all_train), len(no_held)) == (len(docs), 0)
    with pytest.raises(ConfigError, match=r"data\.eval_fraction"):
        split(docs.subset([0]), 0.1)


# --------------------------------------------------------------------------- batches


@pytest.mark.parametrize("packing", PACKINGS)
def test_batches_have_fixed_shapes_and_consistent_masks(docs, tok, packing):
    ds = train_dataset([Source("docs", docs)], layout(tok, packing=packing), batch_size=4, seed=0)
    it = iter(ds)
    for _ in range(20):
        batch = next(it)
        assert sorted(batch) == ["positions", "segment_ids", "targets", "tokens"]
        for value in batch.values():
            assert value.shape == (4, SEQ_LEN) and value.dtype == np.int32
        for r in range(4):
            row = {key: value[r] for key, value in batch.items()}
            check_row(row, tok, whole_pieces=packing != "concat_split")
            if packing == "concat_split":
                assert (row["segment_ids"] > 0).all(), "concat-then-split rows have no padding"


def check_row(row, tok, whole_pieces=True):
    tokens, targets, seg, pos = (row[k] for k in ("tokens", "targets", "segment_ids", "positions"))
    real = seg > 0
    n = int(real.sum())
    assert real[:n].all() and not real[n:].any(), "padding only at the tail"
    assert (tokens[n:] == tok.pad_id).all() and (pos[n:] == 0).all()
    assert (np.diff(seg[:n]) >= 0).all() and (np.diff(seg[:n]) <= 1).all()
    starts = np.flatnonzero(np.diff(seg[:n], prepend=0))
    if whole_pieces:
        assert (pos[starts] % SEQ_LEN == 0).all(), "a piece starts at a multiple of seq_len"
    same = (seg[1:] == seg[:-1]) & real[1:]
    assert (targets[:-1][same] == tokens[1:][same]).all(), "targets are the next inputs"
    assert (np.diff(pos)[same] == 1).all(), "positions count up within a piece"


def test_missing_bos_token_is_a_clear_error(docs, tok):
    no_bos = copy.copy(tok)
    no_bos.bos_id = None
    with pytest.raises(ValueError, match=r"data\.add_bos"):
        rows_of(docs, no_bos)


@pytest.mark.parametrize("packing", PACKINGS)
@pytest.mark.parametrize("shuffle_window", [0, 16])
def test_one_epoch_has_every_token_exactly_once(docs, tok, shuffle_window, packing):
    expected = collections.Counter(t for ids in doc_targets(docs, tok) for t in ids)
    rows = rows_of(docs, tok, shuffle_window=shuffle_window, packing=packing)
    assert target_counts(rows) == expected


def test_shuffle_window_reorders_pieces_across_documents(docs, tok):
    plain = rows_of(docs, tok)
    mixed = rows_of(docs, tok, shuffle_window=16)
    # same pieces, other rows: consecutive pieces of a long document no longer sit together
    assert target_counts(mixed) == target_counts(plain)
    assert any(
        not np.array_equal(a["targets"], b["targets"]) for a, b in zip(plain, mixed, strict=False)
    )
    starts = [int(r["positions"][0]) for r in mixed]
    assert starts != sorted(starts) and len(set(starts)) > 1


def test_long_document_is_split_not_truncated(docs, tok):
    (targets,) = doc_targets(docs.subset([7]), tok)
    assert len(targets) > 3 * SEQ_LEN
    rows = rows_of(docs.subset([7]), tok)
    assert len(rows) == -(-len(targets) // SEQ_LEN)
    pairs = sorted(
        (p, t)
        for row in rows
        for p, t, s in zip(row["positions"], row["targets"], row["segment_ids"], strict=True)
        if s
    )
    assert [p for p, _ in pairs] == list(range(len(targets)))
    assert [t for _, t in pairs] == targets


@pytest.mark.parametrize("shuffle_window", [0, 8])
def test_iterator_state_restores_exactly(docs, tok, shuffle_window):
    ds = train_dataset(
        [Source("docs", docs)], layout(tok, shuffle_window=shuffle_window), batch_size=4, seed=3
    )
    assert_resumes_exactly(ds, skip=7, check=5)


def assert_resumes_exactly(ds, skip, check):
    """Read `skip` batches, save the state as a checkpoint would (JSON), read `check` more; a
    fresh iterator given that state yields the same `check` batches."""
    it = iter(ds)
    for _ in range(skip):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    expected = [next(it) for _ in range(check)]
    close(it)
    resumed = iter(ds)
    resumed.set_state(state)
    for want in expected:
        got = next(resumed)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])
    close(resumed)


def close(iterator):
    if hasattr(iterator, "close"):  # worker processes
        iterator.close()


def test_process_shards_cover_documents_exactly_once(docs, tok):
    expected = target_counts(rows_of(docs, tok))
    shards = [rows_of(docs, tok, process_index=i, process_count=2) for i in range(2)]
    assert target_counts(shards[0]) + target_counts(shards[1]) == expected
    texts = [list(document_stream(docs, shuffle_seed=0, num_epochs=1, process_index=i,
                                  process_count=2)) for i in range(2)]  # fmt: skip
    assert sorted(texts[0] + texts[1]) == sorted(docs[i] for i in range(len(docs)))
    assert abs(len(texts[0]) - len(texts[1])) <= 1


def test_each_epoch_is_a_new_permutation(docs):
    n = len(docs)
    stream = document_stream(docs, shuffle_seed=0)
    epochs = [[stream[e * n + i] for i in range(n)] for e in range(3)]
    everything = sorted(docs[i] for i in range(n))
    assert all(sorted(epoch) == everything for epoch in epochs)
    assert len({tuple(epoch) for epoch in epochs}) == 3
    next_seed = document_stream(docs, shuffle_seed=1)
    assert [next_seed[i] for i in range(n)] != epochs[1], "seed s+1 must not replay epoch 1 of s"


@pytest.mark.parametrize(("seed", "shuffle_window"), [(None, 0), (0, 8)])
def test_eval_batches_are_deterministic_and_repeat_few_docs(docs, tok, seed, shuffle_window):
    def batches(d):
        return eval_batches(
            Source("docs", d), layout(tok, shuffle_window=shuffle_window), batch_size=2,
            num_batches=6, seed=seed,
        )  # fmt: skip

    first, second = batches(docs), batches(docs)
    assert len(first) == 6
    for a, b in zip(first, second, strict=True):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    few = batches(docs.subset([0, 1]))
    assert len(few) == 6 and all(b["tokens"].shape == (2, SEQ_LEN) for b in few)


def test_unigram_entropy(docs, tok):
    ids = np.concatenate([tok.encode(docs[i]) for i in range(len(docs))])
    p = np.bincount(ids) / ids.size
    p = p[p > 0]
    assert unigram_entropy(docs, tok) == pytest.approx(-(p * np.log(p)).sum())
    assert 0 < unigram_entropy(docs, tok, max_docs=3) < np.log(tok.vocab_size)


# --------------------------------------------------------------------------- global arrays


def test_to_global_on_eight_devices():
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    sharding = NamedSharding(mesh, P("data"))
    batch = {"tokens": np.arange(16 * 4, dtype=np.int32).reshape(16, 4)}
    out = to_global(batch, sharding)
    assert out["tokens"].shape == (16, 4) and out["tokens"].sharding == sharding
    np.testing.assert_array_equal(np.asarray(out["tokens"]), batch["tokens"])
    with pytest.raises(ValueError, match=r"batch\['targets'\]: local shape \(6, 4\)"):
        to_global({"targets": np.zeros((6, 4), np.int32)}, sharding)


# --------------------------------------------------------------------------- objectives


def segments(rows, *keys):
    """Every packed segment of `rows` as a dict of its fields' values."""
    for row in rows:
        for seg in np.unique(row["segment_ids"][row["segment_ids"] > 0]):
            where = row["segment_ids"] == seg
            yield {key: row[key][where] for key in keys}


def doc_ids(docs, tok):
    return [np.asarray([tok.bos_id, *tok.encode(docs[i]), tok.eos_id]) for i in range(len(docs))]


def test_prefix_lm_rows_carry_exact_loss_mask_and_prefix(docs, tok):
    objective = objectives.PrefixLM()
    rows = list(
        packed_rows(docs, layout(tok, prefix_fields=True), objective=objective, num_bins=4,
                    shuffle_seed=0, num_epochs=1)
    )  # fmt: skip
    assert sorted(rows[0]) == ["loss_mask", "positions", "prefix", "segment_ids", "targets",
                               "tokens"]  # fmt: skip
    seen = collections.Counter()
    for seg in segments(rows, "tokens", "targets", "loss_mask", "prefix", "positions"):
        prefix_len = int(seg["prefix"].sum())
        n = len(seg["tokens"])
        assert 1 <= prefix_len < n + 1 and (seg["prefix"][:prefix_len] == 1).all()
        np.testing.assert_array_equal(seg["loss_mask"], np.arange(n) >= prefix_len - 1)
        np.testing.assert_array_equal(seg["positions"], np.arange(n))
        seen.update([int(seg["tokens"][0]), *seg["targets"].tolist()])
    # every chunk of <= seq_len + 1 tokens is one example; one-token chunks cannot be examples
    chunk = objective.max_chunk(SEQ_LEN)
    expected = collections.Counter()
    for ids in doc_ids(docs, tok):
        for piece in objectives.chunks(ids, chunk):
            if len(piece) >= 2:
                expected.update(piece.tolist())
    assert seen == expected


def test_span_corruption_rows_score_only_the_targets(docs, tok):
    sentinels = list(range(tok.vocab_size - 20, tok.vocab_size))
    objective = objectives.SpanCorruption(
        noise_density=0.15, mean_span_length=3.0, sentinel_ids=sentinels
    )
    rows = list(
        packed_rows(docs, layout(tok, prefix_fields=True), objective=objective, num_bins=4,
                    shuffle_seed=0, num_epochs=1)
    )  # fmt: skip
    for seg in segments(rows, "tokens", "targets", "loss_mask", "prefix"):
        prefix_len = int(seg["prefix"].sum())
        scored = seg["targets"][seg["loss_mask"] == 1]
        assert scored[0] == sentinels[0], "targets start with the first sentinel"
        assert seg["tokens"][:prefix_len].tolist().count(sentinels[0]) == 1
        assert len(scored) == len(seg["tokens"]) - prefix_len + 1


def test_fim_rearranges_every_document_and_stays_causal(docs, tok):
    fim_ids = (tok.vocab_size - 3, tok.vocab_size - 2, tok.vocab_size - 1)
    objective = objectives.FillInTheMiddle(
        rate=1.0, spm_rate=0.5, prefix_id=fim_ids[0], middle_id=fim_ids[1], suffix_id=fim_ids[2]
    )
    rows = list(packed_rows(docs, layout(tok), objective=objective, num_bins=4, shuffle_seed=0,
                            num_epochs=1))  # fmt: skip
    assert sorted(rows[0]) == ["positions", "segment_ids", "targets", "tokens"]
    expected = collections.Counter(t for ids in doc_targets(docs, tok) for t in ids)
    long_enough = sum(len(tok.encode(docs[i])) >= 2 for i in range(len(docs)))
    expected.update({i: long_enough for i in fim_ids})
    assert target_counts(rows) == expected


def test_causal_rows_in_a_prefix_run_score_everything(docs, tok):
    rows = rows_of(docs, tok, prefix_fields=True)
    for row in rows:
        real = row["segment_ids"] > 0
        assert (row["loss_mask"] == real).all() and not row["prefix"].any()


# --------------------------------------------------------------------------- mixtures


def mixed(docs, tok, stages, seed=0, num_workers=0, batch_size=4):
    halves = [docs.subset(range(0, 20)), docs.subset(range(20, 40))]
    ds = train_dataset(
        [Source("a", halves[0]), Source("b", halves[1])], layout(tok), batch_size=batch_size,
        seed=seed, stages=stages, num_workers=num_workers,
    )  # fmt: skip
    return ds


def test_mixture_shares_are_exact_and_stages_switch_at_their_row(docs, tok):
    it = iter(mixed(docs, tok, [(0, [3.0, 1.0]), (40, [0.0, 1.0])]))
    rows = np.concatenate([next(it)["source"][:, 0] for _ in range(20)])  # 80 rows
    assert (rows[:40] == 0).sum() == 30 and (rows[:40] == 1).sum() == 10
    assert (rows[40:] == 1).all()
    for r in range(1, 41):  # never further than one row from the exact share
        assert abs((rows[:r] == 0).sum() - 0.75 * r) <= 1


def test_mixture_state_restores_mid_stage(docs, tok):
    ds = mixed(docs, tok, [(0, [1.0, 1.0]), (24, [1.0, 3.0])])
    assert_resumes_exactly(ds, skip=5, check=6)  # crosses the stage boundary at row 24


def test_worker_processes_resume_exactly(docs, tok):
    assert_resumes_exactly(mixed(docs, tok, [(0, [1.0, 1.0])], num_workers=2), skip=3, check=4)
