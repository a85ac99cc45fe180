"""maxlm.vocab: a checkpoint's vocabulary grown for continual pretraining. Old rows stay bit for
bit, new rows start at the mean of the old rows or of their sub-tokens' rows; init_from reads a
smaller saved vocabulary sharded and grows it; a run continues from a tiny trained model."""

import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
import sentencepiece
from training import MODEL_VOCAB, TOKENIZER_VOCAB, overrides, read_jsonl

from maxlm import config, mesh as mesh_lib, state as state_lib, vocab
from maxlm.checkpoint import open_model
from maxlm.config import ConfigError, MeshConfig, ModelConfig, SourceConfig
from maxlm.data import tokenizer as tokenizer_module
from maxlm.data.sources import documents
from maxlm.data.tokenizer import HuggingFaceTokenizer, read_tokenizer
from maxlm.train import train

SMALL = ModelConfig(vocab_size=40, d_model=16, num_layers=1, num_heads=2, mlp_dim=32)
INSTRUMENTS = ["xylophonist", "glockenspiel", "marimba", "vibraphone", "celesta", "timpani"]
VERBS = ["tunes", "plays", "polishes", "carries"]


def random_params(model: ModelConfig, seed: int = 0):
    rng = np.random.default_rng(seed)
    abstract = state_lib.abstract_params(model)
    return jax.tree.map(lambda a: rng.normal(size=a.shape).astype(a.dtype), abstract)


def bits(x) -> np.ndarray:
    """The raw bits of an array: equal bits, not merely equal values (nor -0.0 == 0.0)."""
    x = np.asarray(x)
    return x.view({2: np.uint16, 4: np.uint32}[x.dtype.itemsize])


def rows(params, leaf: str) -> np.ndarray:
    """A vocabulary matrix as (V, D): the embedding as stored, the output head transposed."""
    if leaf == "embed_tokens":
        return np.asarray(params["embed_tokens"]["embedding"])
    return np.asarray(params["lm_head"]["kernel"]).T


def domain_lines(count: int = 200) -> list[str]:
    return [
        f"the {INSTRUMENTS[i % 6]} {VERBS[i % 4]} the {INSTRUMENTS[(i * 7 + 1) % 6]}"
        for i in range(count)
    ]


def train_domain_bpe(tmp_path, vocab_size: int = 360) -> HuggingFaceTokenizer:
    (tmp_path / "domain.txt").write_text("\n".join(domain_lines()) + "\n")
    docs = documents(
        SourceConfig(kind="text_files", paths=[str(tmp_path / "domain.txt")], document_per="line")
    )
    trained = tokenizer_module.train_bpe(docs, vocab_size)
    return HuggingFaceTokenizer.from_bytes(trained.to_str().encode())


@pytest.fixture(scope="module")
def tokenizers(corpus, tmp_path_factory):
    """(base, extended): the tiny runs' BPE on the code-like corpus, plus a domain BPE's tokens."""
    root = tmp_path_factory.mktemp("tokenizers")
    docs = documents(SourceConfig(kind="text_files", paths=[corpus["glob"]], document_per="line"))
    base = HuggingFaceTokenizer.from_bytes(
        tokenizer_module.train_bpe(docs, TOKENIZER_VOCAB).to_str().encode()
    )
    extended, new_ids = tokenizer_module.extend_vocabulary(base, train_domain_bpe(root))
    assert new_ids == list(range(base.vocab_size, extended.vocab_size)) and len(new_ids) > 20
    return base, extended


# --------------------------------------------------------------------------- resize_vocab


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_mean_init_keeps_old_rows_bit_for_bit_and_averages_them(dtype):
    old = random_params(SMALL.model_copy(update={"param_dtype": dtype}))
    new = vocab.resize_vocab(old, 56)
    tolerance = 1e-6 if dtype == "float32" else 1e-2
    for leaf in ("embed_tokens", "lm_head"):
        before, after = rows(old, leaf), rows(new, leaf)
        assert after.shape == (56, 16) and after.dtype == before.dtype
        np.testing.assert_array_equal(bits(after[:40]), bits(before))
        mean = before.astype(np.float64).mean(axis=0)
        for row in after[40:]:
            np.testing.assert_allclose(row.astype(np.float64), mean, rtol=tolerance, atol=1e-7)
    unchanged = {k: v for k, v in new.items() if k not in ("embed_tokens", "lm_head")}
    assert jax.tree.all(jax.tree.map(lambda a, b: np.array_equal(bits(a), bits(b)), unchanged,
                                     {k: old[k] for k in unchanged}))  # fmt: skip


def test_tied_embeddings_grow_once_and_the_model_runs():
    tied = SMALL.model_copy(update={"tie_embeddings": True})
    old = random_params(tied)
    assert "lm_head" not in old
    new = vocab.resize_vocab(old, 48, init="subtokens", subtokens=[[3, 5]] + [[]] * 7)
    assert "lm_head" not in new
    grown = rows(new, "embed_tokens")
    np.testing.assert_array_equal(bits(grown[:40]), bits(rows(old, "embed_tokens")))
    np.testing.assert_allclose(grown[40], rows(old, "embed_tokens")[[3, 5]].mean(axis=0), rtol=1e-6)
    model = state_lib.model_from_params(tied.model_copy(update={"vocab_size": 48}), new)
    tokens = jnp.array([[1, 40, 47, 2]], jnp.int32)
    logits = model(tokens, jnp.ones_like(tokens), jnp.arange(4, dtype=jnp.int32)[None])
    assert logits.shape == (1, 4, 48) and bool(jnp.all(jnp.isfinite(logits)))


def test_resize_rejects_bad_arguments():
    old = random_params(SMALL)
    with pytest.raises(ValueError, match="keep"):
        vocab.resize_vocab(old, 30)
    with pytest.raises(ValueError, match="one id list per new row"):
        vocab.resize_vocab(old, 44, init="subtokens", subtokens=[[1]])
    with pytest.raises(ValueError, match="outside the 40 kept rows"):
        vocab.resize_vocab(old, 41, init="subtokens", subtokens=[[40]])


def test_subtoken_init_averages_the_old_tokenizers_pieces(tokenizers):
    base, extended = tokenizers
    token_id = extended.token_id("\u0120xylophonist")  # byte-level BPE spells a space as Ġ
    assert token_id is not None and token_id >= base.vocab_size
    pieces = base.encode(" xylophonist")
    assert len(pieces) > 1
    assert vocab.subtoken_ids(base, extended, [token_id]) == [pieces]
    assert vocab.subtoken_ids(base, extended, [extended.vocab_size + 3]) == [[]]  # padding

    model = SMALL.model_copy(update={"vocab_size": MODEL_VOCAB})
    old = random_params(model)
    size = extended.vocab_size + 5  # 5 padding rows past the tokenizer
    new_ids = range(base.vocab_size, size)
    subtokens = vocab.subtoken_ids(base, extended, new_ids)
    new = vocab.resize_vocab(old, size, init="subtokens", keep=base.vocab_size, subtokens=subtokens)
    for leaf in ("embed_tokens", "lm_head"):
        before, after = rows(old, leaf), rows(new, leaf)
        np.testing.assert_array_equal(bits(after[: base.vocab_size]), bits(before[:300]))
        expected = before[pieces].astype(np.float64).mean(axis=0)
        np.testing.assert_allclose(after[token_id], expected, rtol=1e-5, atol=1e-7)
        mean = before[: base.vocab_size].astype(np.float64).mean(axis=0)
        np.testing.assert_allclose(after[-1], mean, rtol=1e-5, atol=1e-7)  # padding: the mean
    for new_id, ids in zip(new_ids, subtokens, strict=True):
        if new_id < extended.vocab_size:
            assert ids and base.decode(ids) == extended.decode([new_id])


def test_sentencepiece_pieces_split_as_written(tmp_path):
    """A piece keeps its leading '▁' as a space and gets no dummy prefix when it has none."""
    texts = {
        "base": [f"the {a} {b} walks over the river" for a in ("quick", "lazy", "old")
                 for b in ("fox", "dog", "cat", "bird")] * 10,
        "domain": domain_lines(),
    }  # fmt: skip
    for name, size, kind in (("base", 320, "bpe"), ("domain", 36, "unigram")):
        (tmp_path / f"{name}.txt").write_text("\n".join(texts[name]) + "\n")
        sentencepiece.SentencePieceTrainer.train(
            input=str(tmp_path / f"{name}.txt"), model_prefix=str(tmp_path / name),
            vocab_size=size, model_type=kind, byte_fallback=name == "base",
            character_coverage=1.0, normalization_rule_name="identity", minloglevel=2,
        )  # fmt: skip
    base = read_tokenizer(tmp_path / "base.model")
    extended, new_ids = tokenizer_module.extend_vocabulary(
        base, read_tokenizer(tmp_path / "domain.model")
    )
    assert len(new_ids) > 10
    starts = 0
    for new_id, ids in zip(new_ids, vocab.subtoken_ids(base, extended, new_ids), strict=True):
        piece = extended.processor.id_to_piece(new_id)
        assert ids and all(i < base.vocab_size for i in ids)
        spelled = "".join(base.processor.id_to_piece(i) for i in ids)
        if all(not base.processor.is_byte(i) for i in ids):
            assert spelled == piece
        starts += piece.startswith("\u2581")
    assert 0 < starts < len(new_ids), "pieces with and without a leading '▁'"


# --------------------------------------------------------------------------- init_from


def save_model(directory, params, tokenizer=None):
    """A converted model's directory: state/ with {"params": ...}, config.yaml, the tokenizer."""
    directory.mkdir(parents=True)
    ocp.PyTreeCheckpointer().save(directory / "state", {"params": params})
    (directory / "config.yaml").write_text("model: {}\n")  # only found, never read here
    if tokenizer is not None:
        tokenizer.save(directory / "tokenizer.json")
    return directory


def blueprint_of(cfg: config.Config):
    """Shapes and shardings of `cfg`'s state (no memory; the optimizer does not matter)."""
    return state_lib.blueprint(cfg, optax.sgd(0.1), mesh_lib.make(cfg.mesh))


def blueprint(vocab_size: int, mesh_cfg: MeshConfig):
    model = SMALL.model_copy(update={"vocab_size": vocab_size})
    return blueprint_of(config.Config(model=model, mesh=mesh_cfg))


def test_init_from_grows_a_sharded_checkpoint(tokenizers, tmp_path):
    """301 saved rows (300 tokens and a padding row that vocab (tensor=2) cannot split) grow to
    the extended tokenizer's rows on a (2, 2, 2) mesh: the padding row becomes a new token."""
    base, extended = tokenizers
    old = random_params(SMALL.model_copy(update={"vocab_size": 301}))
    path = save_model(tmp_path / "model", old, base)
    size = -(-extended.vocab_size // 8) * 8
    blue = blueprint(size, MeshConfig(data=2, fsdp=2, tensor=2))
    messages = []
    params = vocab.init_from(
        path, blue.abstract.params, blue.shardings.params,
        tokenizer=extended, new_token_init="subtokens", log=messages.append,
    )  # fmt: skip
    for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(blue.shardings.params),
                         strict=True):  # fmt: skip
        assert got.sharding == want
    for leaf in ("embed_tokens", "lm_head"):
        before, after = rows(old, leaf), rows(params, leaf)
        assert after.shape == (size, 16)
        np.testing.assert_array_equal(bits(after[:300]), bits(before[:300]))
        pieces = vocab.subtoken_ids(base, extended, [300])[0]  # lands on the old padding row
        np.testing.assert_allclose(after[300], before[pieces].mean(axis=0), rtol=1e-5, atol=1e-7)
    assert messages == [
        f"vocabulary: 301 -> {size} rows; {size - 300} rows initialized (from row 300: "
        f"{extended.vocab_size - 300} new tokens, {size - extended.vocab_size} padding) to the "
        "mean of their sub-tokens' rows (0 tokens without any: the old mean), in the embedding and "
        "the output head"
    ]


def test_init_from_same_vocabulary_loads_as_before(tokenizers, tmp_path):
    base, _ = tokenizers
    old = random_params(SMALL.model_copy(update={"vocab_size": MODEL_VOCAB}))
    path = save_model(tmp_path / "model", old, base)
    blue = blueprint(MODEL_VOCAB, MeshConfig())
    messages = []
    params = vocab.init_from(path, blue.abstract.params, blue.shardings.params, tokenizer=base,
                             log=messages.append)  # fmt: skip
    assert messages == []
    for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(old), strict=True):
        np.testing.assert_array_equal(bits(got), bits(want))


def test_init_from_errors_name_the_key(tokenizers, tmp_path):
    base, extended = tokenizers
    old = random_params(SMALL.model_copy(update={"vocab_size": MODEL_VOCAB}))
    with_tokenizer = save_model(tmp_path / "a", old, base)
    without = save_model(tmp_path / "b", old)
    smaller = blueprint(304, MeshConfig())
    with pytest.raises(ConfigError, match=r"model\.vocab_size: 304 is smaller than the 320"):
        vocab.init_from(with_tokenizer, smaller.abstract.params, smaller.shardings.params,
                        tokenizer=base)  # fmt: skip
    bigger = blueprint(384, MeshConfig())
    with pytest.raises(ConfigError, match=r"checkpoint\.new_token_init: subtokens needs"):
        vocab.init_from(without, bigger.abstract.params, bigger.shardings.params,
                        tokenizer=extended, new_token_init="subtokens")  # fmt: skip
    other = train_domain_bpe(tmp_path)  # not an extension of base
    with pytest.raises(ConfigError, match=r"data\.tokenizer: .* neither is nor extends"):
        vocab.init_from(with_tokenizer, bigger.abstract.params, bigger.shardings.params,
                        tokenizer=other)  # fmt: skip


# --------------------------------------------------------------------------- end to end


def loss_and_logits(model_cfg: ModelConfig, params, encoded: list[list[int]]):
    """Mean next-token loss over the token rows `encoded` (padded) and the logits."""
    length = max(len(ids) for ids in encoded)
    tokens = np.zeros((len(encoded), length), np.int32)
    segments = np.zeros_like(tokens)
    for k, ids in enumerate(encoded):
        tokens[k, : len(ids)], segments[k, : len(ids)] = ids, 1
    positions = np.broadcast_to(np.arange(length, dtype=np.int32), tokens.shape)
    model = state_lib.model_from_params(model_cfg, params)
    logits = np.asarray(model(jnp.asarray(tokens), jnp.asarray(segments), jnp.asarray(positions)))
    logp = jax.nn.log_softmax(logits[:, :-1].astype(np.float32), axis=-1)
    picked = np.take_along_axis(np.asarray(logp), tokens[:, 1:, None], axis=-1)[..., 0]
    mask = segments[:, 1:] == 1
    return float(-(picked * mask).sum() / mask.sum()), logits


@pytest.mark.slow
def test_continual_run_with_an_extended_vocabulary(corpus, tmp_path, capsys):
    """Run 1 trains 20 steps; run 2 starts from it with the tokenizer extended by a domain BPE and
    model.vocab_size 320 -> 384: on old text it predicts as run 1 did, and it trains on."""
    run1 = config.load(None, overrides(
        corpus, tmp_path / "run1", "train.steps=20", "checkpoint.every_steps=20",
        "eval.every_steps=0", "metrics.log_every_steps=1", "metrics.tensorboard=false",
    ))  # fmt: skip
    train(run1)
    base = read_tokenizer(tmp_path / "run1" / "tokenizer.json")
    extended, _ = tokenizer_module.extend_vocabulary(base, train_domain_bpe(tmp_path))
    extended.save(tmp_path / "extended.json")
    lines = Path(corpus["glob"].replace("*", "part0")).read_text().splitlines()[:16]
    encoded = [[base.bos_id, *base.encode(line)] for line in lines]  # old text, old ids

    init_from = tmp_path / "run1" / "checkpoints" / "20"
    run2 = config.load(None, overrides(
        corpus, tmp_path / "run2", "train.steps=6", "eval.every_steps=0",
        "metrics.log_every_steps=1", "metrics.tensorboard=false", "model.vocab_size=384",
        "data.tokenizer.kind=huggingface", f"data.tokenizer.path={tmp_path / 'extended.json'}",
        f"checkpoint.init_from={init_from}", "checkpoint.new_token_init=subtokens",
    ))  # fmt: skip
    old_params = open_model(init_from).params()
    old_loss, old_logits = loss_and_logits(run1.model, old_params, encoded)
    assert old_loss < math.log(TOKENIZER_VOCAB) - 1.0, "run 1 learnt something"
    blue = blueprint_of(run2)
    losses = {}
    for init in ("mean", "subtokens"):
        new_params = vocab.init_from(
            init_from, blue.abstract.params, blue.shardings.params,
            tokenizer=extended, new_token_init=init, log=lambda _: None,
        )  # fmt: skip
        losses[init], new_logits = loss_and_logits(run2.model, new_params, encoded)
        # the old tokens' logits are the old model's; only the softmax gains the new tokens
        np.testing.assert_allclose(new_logits[..., :300], old_logits[..., :300], atol=1e-5)
    # a mean row's logit is the mean old logit, so by Jensen the 84 new rows add at most
    # 84/300 of the old tokens' probability mass (Hewitt 2021); the old padding rows' mass goes
    assert old_loss - 0.01 < losses["mean"] <= old_loss + math.log1p(84 / 300), (old_loss, losses)
    # sub-token rows copy frequent pieces' output rows: more mass on new tokens at first
    assert losses["subtokens"] < math.log(384) - 2.0, (old_loss, losses)

    summary = train(run2)
    out = capsys.readouterr().out
    new_tokens = extended.vocab_size - 300
    logged = (
        f"vocabulary: 320 -> 384 rows; 84 rows initialized (from row 300: {new_tokens} new "
        f"tokens, {84 - new_tokens} padding) to the mean of their sub-tokens' rows"
    )
    assert logged in out
    records, _ = read_jsonl(tmp_path / "run2")
    first_records, _ = read_jsonl(tmp_path / "run1")
    assert records[0]["loss"] < first_records[0]["loss"] - 0.5, "it starts from run 1's weights"
    assert all(math.isfinite(r["loss"]) for r in records)
    assert records[-1]["loss"] < records[0]["loss"], "and it trains on"
    assert summary["eval_loss"] < math.log(TOKENIZER_VOCAB) - 1.0
