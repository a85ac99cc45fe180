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


# ------------------------------------------------------------- training CLI, vocabulary extension

ENGLISH = [
    f"the {a} {b} walks over the {c} river and reads a book about {a}"
    for a in ("quick", "lazy", "happy", "small", "bright", "old")
    for b in ("fox", "dog", "cat", "bird", "horse")
    for c in ("wide", "long", "cold", "blue", "quiet", "deep", "green")
]
CHINESE_WORDS = [
    "中国",
    "人民",
    "北京",
    "上海",
    "学习",
    "语言",
    "模型",
    "数据",
    "训练",
    "今天",
    "天气",
]
CHINESE = [
    f"{a}的{b}和{c}都很好，我们在{b}{a}"
    for a in CHINESE_WORDS
    for b in CHINESE_WORDS
    for c in CHINESE_WORDS[:3]
]
ENGLISH_TEXT = "the quick fox walks over the cold river"
CHINESE_TEXT = "今天北京的天气很好，我们在学习语言模型"


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def train_sentencepiece(tmp_path, name, lines, vocab_size, **options):
    text = write_lines(tmp_path / f"{name}.txt", lines)
    sentencepiece.SentencePieceTrainer.train(
        input=str(text), model_prefix=str(tmp_path / name), vocab_size=vocab_size,
        character_coverage=1.0, normalization_rule_name="identity", minloglevel=2, **options,
    )  # fmt: skip
    return tmp_path / f"{name}.model"


@pytest.fixture(scope="module")
def sp_models(tmp_path_factory):
    """A base trained on English only (bytes for anything else) and a Chinese domain model."""
    root = tmp_path_factory.mktemp("sp")
    base = train_sentencepiece(root, "base", ENGLISH, 400, model_type="bpe", byte_fallback=True)
    domain = train_sentencepiece(root, "domain", CHINESE, 120, model_type="unigram")
    return base, domain


def test_train_cli_bpe_and_unigram(tmp_path, capsys, corpus):
    write_lines(tmp_path / "a.txt", ENGLISH)
    write_lines(tmp_path / "b.txt", CHINESE)
    glob = str(tmp_path / "*.txt")
    for kind, out, vocab in (("bpe", "tok.json", 400), ("unigram", "tok.model", 450)):
        argv = ["train", "--input", glob, "--kind", kind, "--vocab-size", str(vocab)]
        argv += ["--out", str(tmp_path / out), "--document-per", "line"]
        assert tokenizer_module.main(argv) == 0
        printed = capsys.readouterr().out
        assert f"vocab size: {vocab}" in printed and "tokens per character" in printed
        file_kind = "huggingface" if kind == "bpe" else "sentencepiece"
        tok = load_tokenizer(TokenizerConfig(kind=file_kind, path=str(tmp_path / out)), corpus)
        assert tok.vocab_size == vocab
        assert f"fingerprint: {tok.fingerprint}" in printed
        for text in (ENGLISH_TEXT, CHINESE_TEXT, "x\n  y 42"):
            assert tok.decode(tok.encode(text)) == text
        assert len(tok.encode(ENGLISH_TEXT)) < len(ENGLISH_TEXT) * 0.8  # pieces were learned
    unigram = load_tokenizer(
        TokenizerConfig(kind="sentencepiece", path=str(tmp_path / "tok.model")), corpus
    )
    assert (unigram.pad_id, unigram.bos_id, unigram.eos_id) == (0, 1, 2)


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--input", "NOWHERE/*.txt", "--vocab-size", "300"], "--input"),
        (["--input", "TMP/*.txt", "--vocab-size", "10"], "--vocab-size"),
        (["--input", "TMP/*.txt", "--vocab-size", "999999", "--kind", "unigram"], "--vocab-size"),
    ],
)
def test_train_cli_errors_name_the_flag(tmp_path, capsys, argv, flag):
    write_lines(tmp_path / "a.txt", ENGLISH[:20])
    argv = [a.replace("TMP", str(tmp_path)) for a in argv]
    assert tokenizer_module.main(["train", *argv, "--out", str(tmp_path / "t")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {flag}:") and err.count("\n") == 1
    assert not (tmp_path / "t").exists()


def test_extend_sentencepiece_keeps_old_ids_and_compresses_domain(sp_models):
    base_path, domain_path = sp_models
    base = tokenizer_module.read_tokenizer(base_path)
    domain = tokenizer_module.read_tokenizer(domain_path)
    extended, new_ids = tokenizer_module.extend_vocabulary(base, domain, max_new=None)
    old, new = base.processor, extended.processor
    assert [new.id_to_piece(i) for i in range(base.vocab_size)] == [
        old.id_to_piece(i) for i in range(base.vocab_size)
    ]
    assert new_ids == list(range(base.vocab_size, extended.vocab_size)) and new_ids
    new_pieces = {new.id_to_piece(i) for i in new_ids}
    assert {"中", "国", "，"} <= new_pieces and not new_pieces & {
        old.id_to_piece(i) for i in range(base.vocab_size)
    }
    assert (extended.bos_id, extended.eos_id) == (base.bos_id, base.eos_id)
    # English (old pieces only) encodes exactly as before; Chinese now uses the new pieces.
    assert extended.encode(ENGLISH_TEXT) == base.encode(ENGLISH_TEXT)
    before = tokenizer_module.tokens_per_char(base, [CHINESE_TEXT])
    after = tokenizer_module.tokens_per_char(extended, [CHINESE_TEXT])
    assert before >= 2.5 and after <= 1.0  # 3 UTF-8 byte pieces per character -> <= 1 piece
    for text in (ENGLISH_TEXT, CHINESE_TEXT, f"{ENGLISH_TEXT} {CHINESE_TEXT}"):
        assert extended.decode(extended.encode(text)) == text
    limited, limited_ids = tokenizer_module.extend_vocabulary(base, domain, max_new=5)
    assert limited_ids == new_ids[:5]
    assert [limited.processor.id_to_piece(i) for i in limited_ids] == [
        new.id_to_piece(i) for i in new_ids[:5]
    ]


def test_extend_cli_writes_loadable_model(sp_models, tmp_path, capsys, corpus):
    base_path, domain_path = sp_models
    sample = write_lines(tmp_path / "sample.txt", [CHINESE_TEXT] * 3)
    out = tmp_path / "extended.model"
    argv = ["extend", "--base", str(base_path), "--domain", str(domain_path)]
    assert tokenizer_module.main([*argv, "--out", str(out), "--sample", str(sample)]) == 0
    printed = capsys.readouterr().out
    assert "new ids: 400.." in printed and "% fewer" in printed
    tok = load_tokenizer(TokenizerConfig(kind="sentencepiece", path=str(out)), corpus)
    assert tok.vocab_size > 400
    assert tok.decode(tok.encode(CHINESE_TEXT)) == CHINESE_TEXT
    assert tokenizer_module.main([*argv, "--out", str(out), "--max-new", "-1"]) == 2
    assert capsys.readouterr().err.startswith("error: --max-new:")


def test_extend_tokenizer_json_bpe(tmp_path):
    english = documents(
        SourceConfig(kind="text_files", paths=[str(write_lines(tmp_path / "en.txt", ENGLISH))])
    )
    chinese = documents(
        SourceConfig(kind="text_files", paths=[str(write_lines(tmp_path / "zh.txt", CHINESE))])
    )
    base = tokenizer_module.HuggingFaceTokenizer.from_bytes(
        tokenizer_module.train_bpe(english, 300).to_str().encode()
    )
    domain = tokenizer_module.HuggingFaceTokenizer.from_bytes(
        tokenizer_module.train_bpe(chinese, 320).to_str().encode()
    )
    extended, new_ids = tokenizer_module.extend_vocabulary(base, domain, max_new=None)
    assert new_ids == list(range(300, extended.vocab_size)) and new_ids
    old, new = base.tokenizer, extended.tokenizer
    assert [new.id_to_token(i) for i in range(300)] == [old.id_to_token(i) for i in range(300)]
    assert extended.encode(ENGLISH_TEXT) == base.encode(ENGLISH_TEXT)
    before = tokenizer_module.tokens_per_char(base, [CHINESE_TEXT])
    assert tokenizer_module.tokens_per_char(extended, [CHINESE_TEXT]) < before * 0.8
    for text in (ENGLISH_TEXT, CHINESE_TEXT):
        assert extended.decode(extended.encode(text)) == text
