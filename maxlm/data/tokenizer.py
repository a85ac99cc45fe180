"""Tokenizers: one interface over Hugging Face `tokenizers` and sentencepiece, plus a cached
byte-level BPE trained on the run's own corpus."""

from __future__ import annotations

import abc
import hashlib
import os
import tempfile
from pathlib import Path

import numpy as np
import sentencepiece
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from maxlm.config import ConfigError, TokenizerConfig
from maxlm.data.sources import Documents, stable_hash

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")  # ids 0, 1, 2 in tokenizers we train
# Training reads at most this many bytes (documents picked by id hash): the whole
# Python stdlib (31.5 MB) trains in 9-14 s on 2 cores; bigger corpora are sampled.
MAX_TRAIN_BYTES = 64_000_000

# Names that loaded tokenizer.json files use for their special tokens, most common first.
_BOS_NAMES = ("<s>", "<|begin_of_text|>", "<bos>", "<|endoftext|>")
_EOS_NAMES = ("</s>", "<|end_of_text|>", "<eos>", "<|endoftext|>")
_PAD_NAMES = ("<pad>", "<|pad|>", "[PAD]")


class Tokenizer(abc.ABC):
    """Text <-> token ids. `pad_id` fills padding, which `segment_ids == 0` masks anyway, so
    tokenizers without a pad token use 0; `fingerprint` is the sha256 of the file's bytes."""

    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    pad_id: int
    fingerprint: str

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without BOS/EOS."""
        return self.encode_batch([text])[0]

    @abc.abstractmethod
    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, without BOS/EOS."""

    @abc.abstractmethod
    def decode(self, ids: list[int]) -> str:
        """The text of `ids` (special tokens spelled out)."""


class HuggingFaceTokenizer(Tokenizer):
    """A `tokenizers` tokenizer.json file."""

    def __init__(self, path: str | Path):
        self.tokenizer = tokenizers.Tokenizer.from_file(str(path))
        # A literal "</s>" in a document is text, not the EOS token.
        self.tokenizer.encode_special_tokens = True
        self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)
        self.bos_id = self._first_id(_BOS_NAMES)
        self.eos_id = self._first_id(_EOS_NAMES)
        pad_id = self._first_id(_PAD_NAMES)
        self.pad_id = 0 if pad_id is None else pad_id
        self.fingerprint = _sha256(path)

    def _first_id(self, names: tuple[str, ...]) -> int | None:
        ids = (self.tokenizer.token_to_id(name) for name in names)
        return next((i for i in ids if i is not None), None)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        encodings = self.tokenizer.encode_batch_fast(texts, add_special_tokens=False)
        return [e.ids for e in encodings]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece .model file."""

    def __init__(self, path: str | Path):
        self.processor = sentencepiece.SentencePieceProcessor(model_file=str(path))
        self.vocab_size = self.processor.get_piece_size()
        self.bos_id = _non_negative(self.processor.bos_id())
        self.eos_id = _non_negative(self.processor.eos_id())
        self.pad_id = _non_negative(self.processor.pad_id()) or 0
        self.fingerprint = _sha256(path)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.processor.encode(list(texts))

    def decode(self, ids: list[int]) -> str:
        return self.processor.decode([int(i) for i in ids])


def load_tokenizer(cfg: TokenizerConfig, corpus: Documents) -> Tokenizer:
    """The tokenizer `cfg` names; kind train_bpe trains on `corpus` (or loads the cached one)."""
    if cfg.kind == "train_bpe":
        return HuggingFaceTokenizer(_cached_bpe(corpus, cfg.vocab_size, cfg.cache_dir))
    path = Path(os.path.expanduser(cfg.path or ""))
    if not path.is_file():
        raise ConfigError(f"data.tokenizer.path: file not found: {cfg.path}")
    if cfg.kind == "huggingface":
        return HuggingFaceTokenizer(path)
    return SentencePieceTokenizer(path)


def _cached_bpe(corpus: Documents, vocab_size: int, cache_dir: str) -> Path:
    """Path of the BPE trained on `corpus`, named by what determines it; trains on a miss."""
    key = hashlib.sha256()
    for doc_id, nbytes in zip(corpus.ids, corpus.nbytes, strict=True):
        key.update(f"{doc_id}\0{nbytes}\0".encode())
    key.update(f"{vocab_size} {tokenizers.__version__} {MAX_TRAIN_BYTES}".encode())
    path = Path(os.path.expanduser(cache_dir)) / f"bpe-{vocab_size}-{key.hexdigest()[:16]}.json"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        trained = train_bpe(corpus, vocab_size)
        # Write then rename, so a concurrent reader sees either nothing or the whole file.
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        os.close(fd)
        trained.save(tmp)
        os.replace(tmp, path)
    return path


def train_bpe(corpus: Documents, vocab_size: int) -> tokenizers.Tokenizer:
    """A byte-level BPE (`<pad>`=0, `<s>`=1, `</s>`=2) trained on up to MAX_TRAIN_BYTES of
    `corpus`, documents taken in the order of their id hash."""
    if len(corpus) == 0:
        raise ConfigError("data.source: train_bpe needs at least one document")
    order = np.argsort([stable_hash(i) for i in corpus.ids], kind="stable")
    within_cap = np.cumsum(corpus.nbytes[order]) - corpus.nbytes[order] < MAX_TRAIN_BYTES
    chosen = order[within_cap]
    tokenizer = tokenizers.Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator((corpus[i] for i in chosen), trainer, length=len(chosen))
    return tokenizer


def _sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _non_negative(token_id: int) -> int | None:
    return token_id if token_id >= 0 else None
