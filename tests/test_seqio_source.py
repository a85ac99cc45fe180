"""seqio sources: tiny Tasks and Mixtures registered here, read as text or as token ids."""

import hashlib
import io
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

seqio = pytest.importorskip("seqio")

import sentencepiece as spm  # noqa: E402
import tensorflow as tf  # noqa: E402

from maxlm.config import ConfigError, SourceConfig  # noqa: E402
from maxlm.data.seqio_source import seqio_documents  # noqa: E402

LINES = ["the first line", "naïve café ✓", "a third, longer line of text"]
KEY = "data.sources.web"

Register = Callable[..., str]


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 48-piece SentencePiece model trained on a few hundred English lines."""
    corpus = [f"line {i}: the first, a third, a longer line of text" for i in range(300)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=model, vocab_size=48, minloglevel=2
    )
    path = tmp_path_factory.mktemp("sp") / "tok.model"
    path.write_bytes(model.getvalue())
    return path


@pytest.fixture
def register(tmp_path: Path) -> Iterator[Register]:
    """Registers a Task reading `lines` from a file (one example per line), and removes it after
    the test: the registry is global, so names must also be unique."""
    names = []

    def add(name: str, lines: list[str], features: dict, preprocessors: list) -> str:
        path = tmp_path / f"{name}.txt"
        path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        seqio.TaskRegistry.add(
            name,
            source=seqio.TextLineDataSource({"train": str(path)}),
            preprocessors=[_as_text, *preprocessors],
            output_features=features,
        )
        names.append(name)
        return name

    yield add
    for name in names:
        seqio.TaskRegistry.remove(name)


def _as_text(dataset: tf.data.Dataset) -> tf.data.Dataset:
    return dataset.map(lambda line: {"text": line})


TEXT = {
    "text": seqio.Feature(seqio.PassThroughVocabulary(0), add_eos=False, dtype=tf.string, rank=0)
}


def _source(name: str, **kwargs: object) -> SourceConfig:
    return SourceConfig(kind="seqio", seqio_name=name, **kwargs)


def test_text_task(register: Register) -> None:
    name = register("maxlm_test_text", LINES, TEXT, [])
    docs = seqio_documents(_source(name), KEY)
    assert [docs[i] for i in range(len(docs))] == LINES
    assert docs.ids == [f"{name}/train/{i}" for i in range(3)]
    assert docs.nbytes.dtype == np.int64
    assert docs.nbytes.tolist() == [14, 16, 28]  # UTF-8: "ï" and "é" take 2 bytes, "✓" 3
    assert docs.tokenizer_fingerprint is None
    part = docs.subset([2, 0])
    assert (len(part), part[0], part[1]) == (2, LINES[2], LINES[0])
    assert part.ids == [docs.ids[2], docs.ids[0]]
    assert part.nbytes.tolist() == [28, 14]


def test_tokenized_task(register: Register, sp_model: Path) -> None:
    vocab = seqio.SentencePieceVocabulary(str(sp_model))
    preprocessors = [seqio.preprocessors.tokenize, seqio.preprocessors.append_eos]
    lines = LINES[::2]  # ASCII: every character is in the tiny model
    name = register("maxlm_test_tokens", lines, {"text": seqio.Feature(vocab)}, preprocessors)
    docs = seqio_documents(_source(name), KEY)
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    expected = [[*sp.encode(line), sp.eos_id()] for line in lines]  # seqio appends EOS; kept
    assert [docs[i].dtype for i in range(len(docs))] == [np.int32, np.int32]
    assert [docs[i].tolist() for i in range(len(docs))] == expected
    assert docs.nbytes.tolist() == [4 * len(ids) for ids in expected]
    assert docs.tokenizer_fingerprint == hashlib.sha256(sp_model.read_bytes()).hexdigest()
    assert docs.subset([1]).tokenizer_fingerprint == docs.tokenizer_fingerprint
    assert docs.subset([1])[0].tolist() == expected[1]
    # The untokenized copy that seqio keeps is a text feature of the same Task.
    pretokenized = seqio_documents(_source(name, text_field="text_pretokenized"), KEY)
    assert [pretokenized[i] for i in range(2)] == lines


def test_mixture_reads_every_task_once(register: Register) -> None:
    # Unequal sizes: seqio's own mixture sampler would stop when the short Task runs out.
    short = register("maxlm_test_mix_a", ["a0"], TEXT, [])
    long = register("maxlm_test_mix_b", ["b0", "b1", "b2"], TEXT, [])
    seqio.MixtureRegistry.add("maxlm_test_mix", [(long, 1.0), (short, 5.0)])
    try:
        docs = seqio_documents(_source("maxlm_test_mix"), KEY)
    finally:
        seqio.MixtureRegistry.remove("maxlm_test_mix")
    assert [docs[i] for i in range(len(docs))] == ["a0", "b0", "b1", "b2"]  # Tasks by name
    assert docs.ids == [f"maxlm_test_mix/train/{i}" for i in range(4)]


def test_modules_register_tasks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "lines.txt"
    data.write_text("from a module\n")
    (tmp_path / "maxlm_test_tasks.py").write_text(
        textwrap.dedent(f"""
        import seqio, tensorflow as tf
        seqio.TaskRegistry.add(
            "maxlm_test_from_module",
            source=seqio.TextLineDataSource({{"train": {str(data)!r}}}),
            preprocessors=[lambda ds: ds.map(lambda line: {{"text": line}})],
            output_features={{}},
        )
        """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        cfg = _source("maxlm_test_from_module", seqio_modules=["maxlm_test_tasks"])
        assert seqio_documents(cfg, KEY)[0] == "from a module"
    finally:
        seqio.TaskRegistry.remove("maxlm_test_from_module")
        sys.modules.pop("maxlm_test_tasks", None)


def test_failing_module_import(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "maxlm_test_broken.py").write_text("raise RuntimeError('no bucket access')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = _source("anything", seqio_modules=["maxlm_test_broken"])
    with pytest.raises(
        ConfigError,
        match=r"data\.sources\.web\.seqio_modules: .*'maxlm_test_broken'.*no bucket access",
    ):
        seqio_documents(cfg, KEY)
    cfg = _source("anything", seqio_modules=["maxlm_test_no_such_module"])
    with pytest.raises(ConfigError, match=r"seqio_modules: .*'maxlm_test_no_such_module'"):
        seqio_documents(cfg, KEY)


def test_unknown_name_suggests_close_ones(register: Register) -> None:
    register("maxlm_test_lookup_text", LINES, TEXT, [])
    with pytest.raises(
        ConfigError,
        match=r"data\.sources\.web\.seqio_name: .*'maxlm_test_lookup_txt' .*did you mean "
        r"'maxlm_test_lookup_text'",
    ):
        seqio_documents(_source("maxlm_test_lookup_txt"), KEY)


def test_missing_feature_and_split(register: Register) -> None:
    name = register("maxlm_test_missing", LINES, TEXT, [])
    with pytest.raises(
        ConfigError, match=r"web\.text_field: .*no feature 'body' \(features: text\)"
    ):
        seqio_documents(_source(name, text_field="body"), KEY)
    with pytest.raises(ConfigError, match=r"web\.split: .*no split 'validation' \(splits: train\)"):
        seqio_documents(_source(name, split="validation"), KEY)


def test_token_ids_need_a_sentencepiece_vocabulary(register: Register) -> None:
    def code_points(dataset: tf.data.Dataset) -> tf.data.Dataset:
        return dataset.map(lambda ex: {"text": tf.strings.unicode_decode(ex["text"], "UTF-8")})

    features = {"text": seqio.Feature(seqio.PassThroughVocabulary(0x110000), add_eos=False)}
    name = register("maxlm_test_passthrough", LINES, features, [code_points])
    with pytest.raises(ConfigError, match="PassThroughVocabulary; only SentencePiece"):
        seqio_documents(_source(name), KEY)
