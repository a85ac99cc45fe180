"""Documents from a registered seqio Task or Mixture, read once into host memory.

seqio and TensorFlow are imported only here (`pip install 'maxlm[seqio]'`), so runs with other
sources never load them. Materializing suits small and medium corpora; big ones should be written
to ArrayRecord shards with `python -m maxlm.data.prepare`, which are read lazily.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from maxlm.config import ConfigError, SourceConfig


@dataclass(frozen=True, eq=False)
class SeqioDocuments:
    """Random-access documents (a grain data source): `docs[i]` is a str, or the int32 token ids
    exactly as the feature holds them (an EOS the Task appended stays); `tokenizer_fingerprint`
    is the sha256 of the SentencePiece model that made the ids (None for text)."""

    docs: list[str | np.ndarray]
    ids: list[str]
    nbytes: np.ndarray  # int64: UTF-8 bytes of a text, 4 per token id
    tokenizer_fingerprint: str | None

    def __len__(self) -> int:
        return len(self.docs)

    def __getitem__(self, i: int) -> str | np.ndarray:
        return self.docs[i]

    def subset(self, indices: Sequence[int] | np.ndarray) -> SeqioDocuments:
        """The documents at `indices`, in that order."""
        indices = np.asarray(indices, dtype=np.int64)
        return SeqioDocuments(
            docs=[self.docs[i] for i in indices],
            ids=[self.ids[i] for i in indices],
            nbytes=self.nbytes[indices],
            tokenizer_fingerprint=self.tokenizer_fingerprint,
        )


def seqio_documents(cfg: SourceConfig, key: str = "data.sources") -> SeqioDocuments:
    """Every example of `cfg.split` of the Task or Mixture `cfg.seqio_name`, in a fixed order;
    the document is its `cfg.text_field` feature; id = name/split/index. Errors name `key`."""
    seqio = _import_seqio(key)
    for module in cfg.seqio_modules:
        try:
            importlib.import_module(module)
        except Exception as err:  # a registering module can fail in any way; name it
            raise ConfigError(
                f"{key}.seqio_modules: cannot import {module!r}: {type(err).__name__}: {err}"
            ) from err
    name = str(cfg.seqio_name)
    provider = _lookup(seqio, name, key)
    # Each Task is read on its own: a Mixture's sampler stops at its first exhausted Task, so
    # reading through it would drop documents; maxlm mixes sources by their own weights.
    tasks = [task for task in seqio.get_subtasks(provider) if cfg.split in task.splits]
    if not tasks:
        raise ConfigError(
            f"{key}.split: {name} has no split {cfg.split!r} "
            f"(splits: {', '.join(sorted(provider.splits))})"
        )
    docs: list[str | np.ndarray] = []
    nbytes = []  # of the raw UTF-8 bytes, before any bad ones are replaced
    fingerprints = set()
    for task in tasks:
        dataset = task.get_dataset(
            sequence_length=None, split=cfg.split, shuffle=False, use_cached=False, num_epochs=1
        )
        is_text = _is_text_feature(dataset.element_spec, task.name, cfg.text_field, key)
        fingerprints.add(None if is_text else _fingerprint(seqio, task, cfg.text_field, key))
        for example in dataset.as_numpy_iterator():
            value = example[cfg.text_field]
            nbytes.append(len(value) if is_text else 4 * len(value))
            docs.append(
                value.decode("utf-8", errors="replace") if is_text else value.astype(np.int32)
            )
    if len(fingerprints) > 1:
        raise ConfigError(
            f"{key}.text_field: the Tasks of {name} disagree on {cfg.text_field!r} (text in some, "
            "or token ids from different vocabularies)"
        )
    return SeqioDocuments(
        docs=docs,
        ids=[f"{name}/{cfg.split}/{i}" for i in range(len(docs))],
        nbytes=np.array(nbytes, dtype=np.int64),
        tokenizer_fingerprint=fingerprints.pop(),
    )


def _import_seqio(key: str) -> Any:
    try:
        import seqio
        import tensorflow as tf
    except ImportError:
        raise ConfigError(
            f"{key}.kind: seqio needs the seqio library: pip install 'maxlm[seqio]'"
        ) from None
    # tf.data only runs on the host; a TensorFlow that saw the GPUs would reserve their memory.
    tf.config.set_visible_devices([], "GPU")
    return seqio


def _lookup(seqio: Any, name: str, key: str) -> Any:
    """The Task or Mixture `name`; an unknown name lists the closest registered ones."""
    known = set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names())
    if name not in known:
        close = difflib.get_close_matches(name, known, n=3)
        hint = f"did you mean {', '.join(map(repr, close))}?" if close else f"{len(known)} known"
        raise ConfigError(
            f"{key}.seqio_name: no seqio Task or Mixture {name!r} ({hint}; seqio_modules must "
            "import the module that registers it)"
        )
    return seqio.get_mixture_or_task(name)


def _is_text_feature(spec: dict[str, Any], task: str, field: str, key: str) -> bool:
    """Whether the feature holds a string (else a 1-D integer sequence of token ids)."""
    if field not in spec:
        raise ConfigError(
            f"{key}.text_field: Task {task!r} has no feature {field!r} "
            f"(features: {', '.join(sorted(spec))})"
        )
    dtype, rank = spec[field].dtype, spec[field].shape.rank
    if dtype.name == "string" and rank == 0:
        return True
    if dtype.is_integer and rank == 1:
        return False
    raise ConfigError(
        f"{key}.text_field: feature {field!r} of Task {task!r} is {dtype.name} of rank {rank}, "
        "not a string or a sequence of token ids"
    )


def _fingerprint(seqio: Any, task: Any, field: str, key: str) -> str:
    """sha256 of the SentencePiece model that tokenized `field`, for comparison with the
    trainer's tokenizer (the sha256 of its .model file)."""
    where = f"{key}.text_field: the token ids in {field!r} of Task {task.name!r}"
    if field not in task.output_features:
        raise ConfigError(f"{where} are no output feature, so their vocabulary is unknown")
    vocabulary = task.output_features[field].vocabulary
    if not isinstance(vocabulary, seqio.SentencePieceVocabulary):
        raise ConfigError(
            f"{where} come from a {type(vocabulary).__name__}; only SentencePiece vocabularies "
            "can be checked against data.tokenizer"
        )
    # sp_model is the model seqio tokenizes with: its file, plus any extra_ids seqio appended.
    return hashlib.sha256(vocabulary.sp_model).hexdigest()
