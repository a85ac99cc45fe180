"""Tokenizers: trained BPE round trip and cache, loading tokenizer.json and sentencepiece files."""

import pytest
import sentencepiece

from maxlm.config import ConfigError, SourceConfig, TokenizerConfig
from maxlm.data import tokenizer as tokenizer_module
from maxlm.data.sources import documents
from maxlm.data.tokenizer import load_tokenizer

TEXTS = [
    "def add(x, y):\n    return x + y  # sum\n",
    "naïve café — 日本語のテキスト 🙂 ∑x²",
    "  leading and trailing spaces \t\n\n",
    "",
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    for i in range(12):
        body = "".join(f"def f{i}_{j}(x):\n    return x * {j} + {i}\n\n" for j in range(20))
        (root / f"mod{i}.py").write_text(body + "# naïve café 日本語\n", encoding="utf-8")
    return documents(SourceConfig(kind="text_files", paths=[str(root / "*.py")]))


def bpe_config(cache_dir, vocab_size=300):
    return TokenizerConfig(kind="train_bpe", vocab_size=vocab_size, cache_dir=str(cache_dir))


def test_train_bpe_round_trip_and_special_ids(corpus, tmp_path):
    tok = load_tokenizer(bpe_config(tmp_path), corpus)
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert tok.vocab_size == 300
    for text in TEXTS:
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode_batch(TEXTS) == [tok.encode(t) for t in TEXTS]
    # Special-token names inside a document are plain text.
    assert not {0, 1, 2} & set(tok.encode("<s> </s> <pad>"))
    assert len(tok.encode("return x")) < len("return x")  # merges were learned


def test_cache_hit_loads_without_training(corpus, tmp_path, monkeypatch):
    first = load_tokenizer(bpe_config(tmp_path), corpus)

    def no_training(*args, **kwargs):
        raise AssertionError("trained again despite a cached tokenizer")

    monkeypatch.setattr(tokenizer_module, "train_bpe", no_training)
    second = load_tokenizer(bpe_config(tmp_path), corpus)
    assert second.fingerprint == first.fingerprint
    assert [p.suffix for p in tmp_path.iterdir()] == [".json"]  # no temporary file left behind


def test_cache_key_depends_on_vocab_and_documents(corpus, tmp_path):
    load_tokenizer(bpe_config(tmp_path), corpus)
    load_tokenizer(bpe_config(tmp_path, vocab_size=320), corpus)
    load_tokenizer(bpe_config(tmp_path), corpus.subset(range(len(corpus) - 1)))
    assert len(list(tmp_path.glob("*.json"))) == 3


def test_load_tokenizer_json(corpus, tmp_path):
    trained = load_tokenizer(bpe_config(tmp_path), corpus)
    (path,) = tmp_path.glob("*.json")
    loaded = load_tokenizer(TokenizerConfig(kind="huggingface", path=str(path)), corpus)
    assert loaded.fingerprint == trained.fingerprint
    assert (loaded.bos_id, loaded.eos_id, loaded.pad_id) == (1, 2, 0)
    assert loaded.encode(TEXTS[1]) == trained.encode(TEXTS[1])


def test_load_sentencepiece(corpus, tmp_path):
    text_file = tmp_path / "corpus.txt"
    text_file.write_text("\n".join(corpus[i] for i in range(len(corpus))), encoding="utf-8")
    sentencepiece.SentencePieceTrainer.train(
        input=str(text_file), model_prefix=str(tmp_path / "sp"), vocab_size=120,
        model_type="bpe", minloglevel=2,
    )  # fmt: skip
    tok = load_tokenizer(
        TokenizerConfig(kind="sentencepiece", path=str(tmp_path / "sp.model")), corpus
    )
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 0)  # sentencepiece defaults, no pad
    assert tok.vocab_size == 120
    assert len(tok.fingerprint) == 64
    ids = tok.encode("def f(x): return x")
    assert tok.decode(ids) == "def f(x): return x"
    assert tok.encode_batch(["a b", "def"]) == [tok.encode("a b"), tok.encode("def")]


def test_missing_tokenizer_file(corpus, tmp_path):
    cfg = TokenizerConfig(kind="huggingface", path=str(tmp_path / "nope.json"))
    with pytest.raises(ConfigError, match=r"data\.tokenizer\.path.*nope\.json"):
        load_tokenizer(cfg, corpus)
