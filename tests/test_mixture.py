"""A run's data: sources and tokenizer checked before training, objective tokens reserved,
stage weights, and tokens per source following the weights."""

import json
import random

import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordWriter

from maxlm import config
from maxlm.config import ConfigError
from maxlm.data import mixture, pipeline
from maxlm.data.sources import MANIFEST, TOKENS_FORMAT

WORDS = ["alpha", "beta", "gamma", "delta", "reads", "writes", "(x)", "+", "1", "2"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Two text sources of different document lengths: 'short' lines and 'long' files."""
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    (root / "short.txt").write_text(
        "\n".join(" ".join(rng.choices(WORDS, k=rng.randint(3, 8))) for _ in range(200))
    )
    for i in range(30):
        (root / f"long{i}.md").write_text(" ".join(rng.choices(WORDS, k=rng.randint(40, 90))))
    return {"root": root, "cache": str(tmp_path_factory.mktemp("tokenizers"))}


def cfg_of(corpus, *extra):
    root = corpus["root"]
    return config.load(
        None,
        [
            "data.sources.short.kind=text_files",
            f"data.sources.short.paths=[{root / 'short.txt'}]",
            "data.sources.short.document_per=line",
            "data.sources.long.kind=text_files",
            f"data.sources.long.paths=[{root / '*.md'}]",
            "data.tokenizer.vocab_size=300",
            f"data.tokenizer.cache_dir={corpus['cache']}",
            "model.vocab_size=320",
            "data.eval_fraction=0.1",
            *extra,
        ],
    )


def test_sources_are_split_and_named_in_config_order(corpus):
    data = mixture.load(cfg_of(corpus))
    assert data.names == ["short", "long"]
    assert len(data.train[0].docs) + len(data.held_out[0].docs) == 200
    assert len(data.train[1].docs) + len(data.held_out[1].docs) == 30
    assert all(source.objective is None for source in data.train)


def test_objective_tokens_are_reserved_in_a_trained_tokenizer(corpus):
    cfg = cfg_of(
        corpus,
        "data.sources.short.objective.kind=fim",
        "data.sources.long.objective.kind=span_corruption",
        "data.sources.long.objective.num_sentinels=4",
    )
    data = mixture.load(cfg)
    tok = data.tokenizer
    names = ["<fim_prefix>", "<fim_middle>", "<fim_suffix>"]
    names += [f"<extra_id_{k}>" for k in range(4)]
    assert [tok.token_id(n) for n in names] == list(range(3, 10))  # after <pad>, <s>, </s>
    assert data.train[0].objective.prefix_id == 3
    assert list(data.train[1].objective.sentinel_ids) == [6, 7, 8, 9]
    # a literal sentinel in a document is text, not the token
    assert 6 not in tok.encode("<extra_id_0>")


def test_objective_token_missing_from_a_tokenizer_file_is_named(corpus, tmp_path):
    plain = mixture.load(cfg_of(corpus)).tokenizer
    plain.save(tmp_path / "tokenizer.json")
    cfg = cfg_of(
        corpus,
        "data.tokenizer.kind=huggingface",
        f"data.tokenizer.path={tmp_path / 'tokenizer.json'}",
        "data.sources.long.objective.kind=ul2",
    )
    missing = r"data\.sources\.long\.objective\.sentinel_format: the tokenizer has no token "
    with pytest.raises(ConfigError, match=missing + "'<extra_id_0>'"):
        mixture.load(cfg)


def test_pre_tokenized_source_of_another_tokenizer_stops_before_training(corpus, tmp_path):
    shard = tmp_path / "tokens" / "shard-00000.array_record"
    shard.parent.mkdir()
    writer = ArrayRecordWriter(str(shard), "group_size:1")
    for ids in ([5, 6, 7], [8, 9]):
        writer.write(np.asarray(ids, "<u4").tobytes())
    writer.close()
    listed = [{"file": shard.name, "documents": 2, "tokens": 5}]
    manifest = {"format": TOKENS_FORMAT, "tokenizer_fingerprint": "0" * 64, "shards": listed}
    (shard.parent / MANIFEST).write_text(json.dumps(manifest))
    cfg = cfg_of(
        corpus,
        "data.sources.tokens.kind=array_record",
        f"data.sources.tokens.paths=[{shard}]",
    )
    with pytest.raises(ConfigError, match=r"data\.sources\.tokens: .* tokenizer 000000000000, "
                                          r"but data\.tokenizer is [0-9a-f]{12}"):  # fmt: skip
        mixture.load(cfg)


def test_stages_become_rows_of_this_process(corpus):
    cfg = cfg_of(
        corpus,
        "data.mixture_stages=[{start_step: 1, weights: {short: 3}},"
        " {start_step: 11, weights: {short: 1, long: 1}}]",
    )
    assert mixture.stages(cfg.data, rows_per_step=4) == [(0, [3.0, 0.0]), (40, [1.0, 1.0])]
    plain = cfg_of(corpus, "data.sources.long.weight=0.25")
    assert mixture.stages(plain.data, rows_per_step=4) == [(0, [1.0, 0.25])]


def test_bad_stages_are_config_errors(corpus):
    with pytest.raises(ConfigError, match=r"data\.mixture_stages\.0\.weights\.shrot: no such "
                                          r"source; did you mean 'short'\?"):  # fmt: skip
        cfg_of(corpus, "data.mixture_stages=[{start_step: 0, weights: {shrot: 1}}]")
    with pytest.raises(ConfigError, match=r"data\.mixture_stages: start steps \[5\] must"):
        cfg_of(corpus, "data.mixture_stages=[{start_step: 5, weights: {short: 1}}]")


def test_tokens_per_source_follow_the_weights(corpus):
    """70 % / 30 % of rows; with concat_split packing every row is full, so the tokens read
    per source match the weights exactly up to the one-row rounding of the interleave."""
    cfg = cfg_of(
        corpus, "data.sources.short.weight=0.7", "data.sources.long.weight=0.3",
        "data.packing=concat_split",
    )  # fmt: skip
    data = mixture.load(cfg)
    layout = pipeline.Layout(data.tokenizer, seq_len=32, add_bos=True, add_eos=True,
                             packing="concat_split")  # fmt: skip
    stages = mixture.stages(cfg.data, 8)
    batches = iter(pipeline.train_dataset(data.train, layout, batch_size=8, seed=0, stages=stages))
    tokens = np.zeros(2)
    for _ in range(50):
        batch = next(batches)
        np.add.at(tokens, batch["source"].ravel(), (batch["segment_ids"] > 0).ravel())
    assert tokens.sum() == 50 * 8 * 32
    assert abs(tokens[0] / tokens.sum() - 0.7) <= 32 / tokens.sum()
