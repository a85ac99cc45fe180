"""Tokenizers: one interface over Hugging Face `tokenizers` and sentencepiece, a cached
byte-level BPE trained on the run's own corpus, and vocabulary extension for continual
pretraining. CLI: `python -m maxlm.data.tokenizer train|extend --help`."""

from __future__ import annotations

import abc
import argparse
import hashlib
import io
import json
import os
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import sentencepiece
import tokenizers
from sentencepiece import sentencepiece_model_pb2
from tokenizers import decoders, models, pre_tokenizers, trainers

from maxlm import cli, paths
from maxlm.config import ConfigError, SourceConfig, TokenizerConfig
from maxlm.data.sources import Documents, documents, stable_hash

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")  # ids 0, 1, 2 in tokenizers we train
# Training reads at most this many bytes (documents picked by id hash): the whole
# Python stdlib (31.5 MB) trains in 9-14 s on 2 cores; bigger corpora are sampled.
MAX_TRAIN_BYTES = 64_000_000

# Generated protobuf classes, which mypy cannot see.
sp_pb2: Any = sentencepiece_model_pb2

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
    data: bytes  # the file's bytes: `save` writes them, `fingerprint` hashes them

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the tokenizer file (atomically: readers see nothing or the whole file; a
        remote object is replaced whole anyway)."""
        if paths.is_remote(path):
            paths.resolve(path).write_bytes(self.data)
        else:
            _write_atomic(Path(path), self.data)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without BOS/EOS."""
        return self.encode_batch([text])[0]

    @abc.abstractmethod
    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, without BOS/EOS."""

    @abc.abstractmethod
    def decode(self, ids: list[int]) -> str:
        """The text of `ids` (special tokens spelled out)."""

    @abc.abstractmethod
    def token_id(self, piece: str) -> int | None:
        """The id of the vocabulary entry `piece` (e.g. a sentinel), or None if absent."""


class HuggingFaceTokenizer(Tokenizer):
    """A `tokenizers` tokenizer.json file."""

    def __init__(self, path: str | Path):
        self._load(Path(path).read_bytes())

    @classmethod
    def from_bytes(cls, data: bytes) -> HuggingFaceTokenizer:
        """The tokenizer whose tokenizer.json holds `data`."""
        self = cls.__new__(cls)
        self._load(data)
        return self

    def _load(self, data: bytes) -> None:
        self.data = data
        self.tokenizer = tokenizers.Tokenizer.from_str(data.decode("utf-8"))
        # A literal "</s>" in a document is text, not the EOS token.
        self.tokenizer.encode_special_tokens = True
        self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)
        self.bos_id = self._first_id(_BOS_NAMES)
        self.eos_id = self._first_id(_EOS_NAMES)
        pad_id = self._first_id(_PAD_NAMES)
        self.pad_id = 0 if pad_id is None else pad_id
        self.fingerprint = hashlib.sha256(data).hexdigest()

    def _first_id(self, names: tuple[str, ...]) -> int | None:
        ids = (self.tokenizer.token_to_id(name) for name in names)
        return next((i for i in ids if i is not None), None)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        encodings = self.tokenizer.encode_batch_fast(texts, add_special_tokens=False)
        return [e.ids for e in encodings]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def token_id(self, piece: str) -> int | None:
        return self.tokenizer.token_to_id(piece)


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece .model file."""

    def __init__(self, path: str | Path):
        self._load(Path(path).read_bytes())

    @classmethod
    def from_bytes(cls, data: bytes) -> SentencePieceTokenizer:
        """The tokenizer whose serialized `ModelProto` is `data`."""
        self = cls.__new__(cls)
        self._load(data)
        return self

    def _load(self, data: bytes) -> None:
        self.data = data
        self.processor = sentencepiece.SentencePieceProcessor(model_proto=data)
        self.vocab_size = self.processor.get_piece_size()
        self.bos_id = _non_negative(self.processor.bos_id())
        self.eos_id = _non_negative(self.processor.eos_id())
        self.pad_id = _non_negative(self.processor.pad_id()) or 0
        self.fingerprint = hashlib.sha256(data).hexdigest()

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.processor.encode(list(texts))

    def decode(self, ids: list[int]) -> str:
        return self.processor.decode([int(i) for i in ids])

    def token_id(self, piece: str) -> int | None:
        token_id = self.processor.piece_to_id(piece)
        return token_id if self.processor.id_to_piece(token_id) == piece else None


def load_tokenizer(
    cfg: TokenizerConfig, corpus: Documents, special_tokens: Sequence[str] = ()
) -> Tokenizer:
    """The tokenizer `cfg` names; kind train_bpe trains on `corpus` (or loads the cached one),
    reserving `special_tokens` (e.g. the objectives' sentinels) after `SPECIAL_TOKENS`."""
    if cfg.kind == "train_bpe":
        return HuggingFaceTokenizer(
            _cached_bpe(corpus, cfg.vocab_size, cfg.cache_dir, tuple(special_tokens))
        )
    path = Path(os.path.expanduser(cfg.path or ""))
    if not path.is_file():
        raise ConfigError(f"data.tokenizer.path: file not found: {cfg.path}")
    if cfg.kind == "huggingface":
        return HuggingFaceTokenizer(path)
    return SentencePieceTokenizer(path)


def _cached_bpe(
    corpus: Documents, vocab_size: int, cache_dir: str, special_tokens: tuple[str, ...] = ()
) -> Path:
    """Path of the BPE trained on `corpus`, named by what determines it; trains on a miss."""
    key = hashlib.sha256()
    for doc_id, nbytes in zip(corpus.ids, _text_sizes(corpus), strict=True):
        key.update(f"{doc_id}\0{nbytes}\0".encode())
    key.update(f"{vocab_size} {tokenizers.__version__} {MAX_TRAIN_BYTES}".encode())
    if special_tokens:  # keeps the names of caches made before extra specials existed
        key.update("\0".join(special_tokens).encode())
    path = Path(os.path.expanduser(cache_dir)) / f"bpe-{vocab_size}-{key.hexdigest()[:16]}.json"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        trained = train_bpe(corpus, vocab_size, special_tokens)
        _write_atomic(path, trained.to_str().encode("utf-8"))
    return path


def train_bpe(
    corpus: Documents, vocab_size: int, special_tokens: Sequence[str] = ()
) -> tokenizers.Tokenizer:
    """A byte-level BPE (`<pad>`=0, `<s>`=1, `</s>`=2, then `special_tokens`) trained on up to
    MAX_TRAIN_BYTES of `corpus`, documents taken in the order of their id hash."""
    chosen = _training_sample(corpus)
    tokenizer = tokenizers.Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(dict.fromkeys([*SPECIAL_TOKENS, *special_tokens])),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_texts(corpus, chosen), trainer, length=len(chosen))
    return tokenizer


def _text_sizes(corpus: Documents) -> np.ndarray:
    if corpus.nbytes is None:
        raise ConfigError(
            "data.tokenizer.kind: a tokenizer cannot be trained on pre-tokenized documents; "
            "name the tokenizer file they were made with"
        )
    return corpus.nbytes


def _texts(corpus: Documents, indices: np.ndarray) -> Iterator[str]:
    """The texts at `indices` of a text source (`_text_sizes` rejects token sources); an
    unreadable one is named and left out (prepare counts it; training reads it again)."""
    for i in indices:
        try:
            text = corpus[int(i)]
        except OSError as err:
            print(f"tokenizer training skips {corpus.ids[int(i)]}: {err}", file=sys.stderr)
            continue
        assert isinstance(text, str), "a text source yields strings"
        yield text


def _training_sample(corpus: Documents) -> np.ndarray:
    """Indices of the documents training reads: up to MAX_TRAIN_BYTES, in id-hash order."""
    if len(corpus) == 0:
        raise ConfigError("data.sources: tokenizer training needs at least one document")
    sizes = _text_sizes(corpus)
    order = np.argsort([stable_hash(i) for i in corpus.ids], kind="stable")
    within_cap = np.cumsum(sizes[order]) - sizes[order] < MAX_TRAIN_BYTES
    return order[within_cap]


def _write_atomic(path: Path, data: bytes) -> None:
    # Write then rename, so a concurrent reader sees either nothing or the whole file.
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _non_negative(token_id: int) -> int | None:
    return token_id if token_id >= 0 else None


def train_unigram(corpus: Documents, vocab_size: int) -> bytes:
    """A sentencepiece unigram model (`<pad>`=0, `<s>`=1, `</s>`=2, `<unk>`=3), serialized,
    trained LLaMA-style: identity normalization, byte fallback, digits split."""
    chosen = _training_sample(corpus)
    # sentencepiece trains on sentences and skips long ones, so feed it the lines.
    lines = (line for text in _texts(corpus, chosen) for line in text.splitlines() if line.strip())
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=lines, model_writer=model, vocab_size=vocab_size,
        model_type="unigram", pad_id=0, bos_id=1, eos_id=2, unk_id=3,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        byte_fallback=True, split_digits=True, character_coverage=0.9995,
        max_sentence_length=1 << 16, minloglevel=2,
    )  # fmt: skip
    return model.getvalue()


def tokens_per_char(tokenizer: Tokenizer, texts: Sequence[str]) -> float:
    """Tokens per character of `texts` (lower is better compression)."""
    chars = sum(len(t) for t in texts)
    return sum(len(ids) for ids in tokenizer.encode_batch(list(texts))) / max(chars, 1)


def read_tokenizer(path: str | os.PathLike[str]) -> Tokenizer:
    """A tokenizer.json (JSON) or sentencepiece .model (protobuf) file, local or remote, told
    apart by content."""
    data = paths.resolve(path).read_bytes()
    if data.lstrip()[:1] == b"{":
        return HuggingFaceTokenizer.from_bytes(data)
    return SentencePieceTokenizer.from_bytes(data)


def extend_vocabulary(
    base: Tokenizer, domain: Tokenizer, *, max_new: int | None = None
) -> tuple[Tokenizer, list[int]]:
    """`base` plus the pieces of `domain` it lacks (at most `max_new`, domain order), given ids
    after the base vocabulary; every old id keeps its piece. Both sentencepiece, or both
    tokenizer.json BPE. Returns the extended tokenizer and the new ids."""
    if isinstance(base, SentencePieceTokenizer) and isinstance(domain, SentencePieceTokenizer):
        data = _extend_sentencepiece(base.data, domain.data, max_new)
        extended: Tokenizer = SentencePieceTokenizer.from_bytes(data)
    elif isinstance(base, HuggingFaceTokenizer) and isinstance(domain, HuggingFaceTokenizer):
        extended = HuggingFaceTokenizer.from_bytes(_extend_bpe_json(base, domain, max_new))
    else:
        raise ValueError("--domain: base and domain must both be sentencepiece or tokenizer.json")
    return extended, list(range(base.vocab_size, extended.vocab_size))


_SP = sp_pb2.ModelProto.SentencePiece


def _extend_sentencepiece(base_data: bytes, domain_data: bytes, max_new: int | None) -> bytes:
    """The Chinese-LLaMA recipe: append the domain's normal pieces missing from the base."""
    base, domain = sp_pb2.ModelProto(), sp_pb2.ModelProto()
    base.ParseFromString(base_data)
    domain.ParseFromString(domain_data)
    existing = {p.piece for p in base.pieces}
    # A BPE base merges by score: new pieces rank below every old one (domain order kept), so
    # text made of old pieces merges as before. A unigram base takes the domain's log-probs.
    is_bpe = base.trainer_spec.model_type == sp_pb2.TrainerSpec.BPE
    floor = min((p.score for p in base.pieces if p.type == _SP.NORMAL), default=0.0)
    added = 0
    for piece in domain.pieces:
        if max_new is not None and added >= max_new:
            break
        if piece.type not in (_SP.NORMAL, _SP.USER_DEFINED) or piece.piece in existing:
            continue
        new = base.pieces.add()
        new.piece, new.type = piece.piece, piece.type
        new.score = floor - 1.0 - added if is_bpe else piece.score
        existing.add(piece.piece)
        added += 1
    base.trainer_spec.vocab_size = len(base.pieces)
    return base.SerializeToString()


def _extend_bpe_json(
    base: HuggingFaceTokenizer, domain: HuggingFaceTokenizer, max_new: int | None
) -> bytes:
    """Append the domain BPE's missing tokens (ids after the base's, added tokens included)
    and the merges that build them, after the base's merges."""
    spec, dom = json.loads(base.data), json.loads(domain.data)
    if spec["model"]["type"] != "BPE" or dom["model"]["type"] != "BPE":
        raise ValueError("--base/--domain: tokenizer.json extension needs BPE models")
    vocab: dict[str, int] = spec["model"]["vocab"]
    next_id = base.vocab_size
    specials = {t["content"] for t in dom.get("added_tokens", [])}
    new_tokens = [t for t, _ in sorted(dom["model"]["vocab"].items(), key=lambda kv: kv[1])]
    new_tokens = [t for t in new_tokens if t not in vocab and t not in specials]
    for token in new_tokens[:max_new]:
        vocab[token] = next_id
        next_id += 1
    merges = spec["model"]["merges"]
    known = {_merge_pair(m) for m in merges}
    for merge in dom["model"]["merges"]:
        left, right = _merge_pair(merge)
        if (left, right) not in known and {left, right, left + right} <= vocab.keys():
            merges.append(merge)
            known.add((left, right))
    return json.dumps(spec, ensure_ascii=False).encode("utf-8")


def _merge_pair(merge: str | list[str]) -> tuple[str, str]:
    left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
    return left, right


# ---------------------------------------------------------------------------- command line


def _train_command(args: argparse.Namespace) -> None:
    minimum = 256 + len(SPECIAL_TOKENS) + 1  # byte alphabet (bpe) / byte fallback (unigram)
    if args.vocab_size < minimum:
        raise cli.UsageError(f"--vocab-size: must be at least {minimum}, got {args.vocab_size}")
    try:
        corpus = documents(
            SourceConfig(kind="text_files", paths=args.input, document_per=args.document_per)
        )
    except ConfigError as err:
        raise cli.UsageError(f"--input: {str(err).split(': ', 1)[-1]}") from None
    if len(corpus) == 0:
        raise cli.UsageError("--input: the files hold no documents")
    if args.kind == "bpe":
        tokenizer: Tokenizer = HuggingFaceTokenizer.from_bytes(
            train_bpe(corpus, args.vocab_size).to_str().encode("utf-8")
        )
    else:
        try:
            tokenizer = SentencePieceTokenizer.from_bytes(train_unigram(corpus, args.vocab_size))
        except RuntimeError as err:  # e.g. "Vocabulary size too high" for a small corpus
            raise cli.UsageError(f"--vocab-size: {str(err).strip().splitlines()[-1]}") from None
    tokenizer.save(args.out)
    sample = list(_texts(corpus, _training_sample(corpus)))
    print(f"wrote {args.out}")
    print(f"vocab size: {tokenizer.vocab_size}")
    print(f"fingerprint: {tokenizer.fingerprint}")
    print(f"tokens per character (training text): {tokens_per_char(tokenizer, sample):.4f}")


def _extend_command(args: argparse.Namespace) -> None:
    if args.max_new is not None and args.max_new < 0:
        raise cli.UsageError(f"--max-new: must be >= 0, got {args.max_new}")
    for flag, path in (("--base", args.base), ("--domain", args.domain)):
        if not Path(path).is_file():
            raise cli.UsageError(f"{flag}: file not found: {path}")
    base, domain = read_tokenizer(args.base), read_tokenizer(args.domain)
    try:
        extended, new_ids = extend_vocabulary(base, domain, max_new=args.max_new)
    except ValueError as err:
        raise cli.UsageError(str(err)) from None
    extended.save(args.out)
    span = f"{new_ids[0]}..{new_ids[-1]}" if new_ids else "none"
    print(f"wrote {args.out}")
    print(
        f"vocab size: {base.vocab_size} -> {extended.vocab_size} ({len(new_ids)} new ids: {span})"
    )
    print(f"fingerprint: {extended.fingerprint}")
    if args.sample:
        try:
            corpus = documents(SourceConfig(kind="text_files", paths=args.sample))
        except ConfigError as err:
            raise cli.UsageError(f"--sample: {str(err).split(': ', 1)[-1]}") from None
        texts = list(_texts(corpus, _training_sample(corpus)))
        before, after = tokens_per_char(base, texts), tokens_per_char(extended, texts)
        drop = 100 * (1 - after / before) if before else 0.0
        print(f"tokens per character (sample): {before:.4f} -> {after:.4f} ({drop:.1f}% fewer)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m maxlm.data.tokenizer", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="Train a tokenizer on text files.")
    train.add_argument(
        "--input",
        action="append",
        required=True,
        metavar="GLOB",
        help="Text files to train on (repeatable; ** allowed).",
    )
    train.add_argument(
        "--kind",
        choices=("bpe", "unigram"),
        default="bpe",
        help="bpe: byte-level BPE (tokenizer.json); unigram: sentencepiece (.model).",
    )
    train.add_argument("--vocab-size", type=int, required=True, help="Vocabulary size.")
    train.add_argument("--out", required=True, help="Where to write the tokenizer file.")
    train.add_argument(
        "--document-per",
        choices=("file", "line"),
        default="file",
        help="A training document is a whole file or one line.",
    )
    train.set_defaults(run=_train_command)
    extend = commands.add_parser("extend", help="Add a domain tokenizer's pieces to a base.")
    extend.add_argument("--base", required=True, help="Base .model or tokenizer.json.")
    extend.add_argument("--domain", required=True, help="Domain tokenizer, same format.")
    extend.add_argument("--out", required=True, help="Where to write the extended tokenizer.")
    extend.add_argument("--max-new", type=int, default=None, help="Add at most N pieces.")
    extend.add_argument(
        "--sample",
        action="append",
        metavar="GLOB",
        help="Domain text to report tokens/char on (repeatable).",
    )
    extend.set_defaults(run=_extend_command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `train` or `extend` command; a bad flag exits 2 with one line naming it."""
    args = _parser().parse_args(argv)
    try:
        args.run(args)
    except cli.UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
