"""Vocabulary extension for continual pretraining: a checkpoint's embedding and output head grown
to a larger `model.vocab_size`, old rows kept bit for bit, new rows initialized to the mean of
the old rows or to the mean of each new token's sub-tokens under the old tokenizer.

Mean initialization keeps the new tokens' output probabilities near the average's, so the model
starts out predicting old text as before (Hewitt 2021, "Initializing New Word Embeddings for
Pretrained Language Models"); sub-token means start each new token where the old model
represented its text. docs/continual.md has the recipe.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import sentencepiece
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec

from maxlm import checkpoint, paths
from maxlm.config import ConfigError
from maxlm.data.tokenizer import (
    HuggingFaceTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    read_tokenizer,
    sp_pb2,
)

Init = Literal["mean", "subtokens"]
# the parameters with a vocabulary axis: (module, leaf) -> that axis
VOCAB_AXES = {("embed_tokens", "embedding"): 0, ("lm_head", "kernel"): 1}
_MAP_BATCH = 256  # new rows averaged at once: bounds the gathered [rows, pieces, embed] block


def resize_vocab(
    params: dict[str, Any],
    new_vocab_size: int,
    *,
    init: Init = "mean",
    keep: int | None = None,
    subtokens: Sequence[Sequence[int]] | None = None,
) -> dict[str, Any]:
    """`params` (a pure dict) with `new_vocab_size` rows in the embedding and the untied output
    head: the first `keep` rows (default: all the old ones) as they are, each further row the mean
    of the first `keep` ("mean"), or with init "subtokens" the mean of the rows `subtokens[k]`
    lists for row keep+k (an empty list: the mean of all). Jittable; means in float32."""
    old_rows = params["embed_tokens"]["embedding"].shape[0]
    keep = old_rows if keep is None else keep
    if not 0 < keep <= old_rows or new_vocab_size < keep:
        raise ValueError(f"keep={keep}: need 0 < keep <= {old_rows} rows and <= {new_vocab_size}")
    added = new_vocab_size - keep
    if init == "subtokens":
        if subtokens is None or len(subtokens) != added:
            raise ValueError(f"init='subtokens' needs one id list per new row ({added})")
        tables = _subtoken_tables(subtokens, keep)
    elif init == "mean":
        tables = None
    else:
        raise ValueError(f"init: {init!r} is neither 'mean' nor 'subtokens'")
    out = dict(params)
    for (module, leaf), axis in VOCAB_AXES.items():
        if module in params:
            matrix = params[module][leaf]
            out[module] = {**params[module], leaf: _grow(matrix, axis, keep, added, tables)}
    return out


def _subtoken_tables(
    subtokens: Sequence[Sequence[int]], keep: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids [n, L], weights [n, L], has [n]): row k averages ids[k] with weights 1/len, padded
    with id 0 at weight 0; `has` is False for rows that take the mean of all instead."""
    width = max((len(ids) for ids in subtokens), default=0) or 1
    ids = np.zeros((len(subtokens), width), np.int32)
    weights = np.zeros((len(subtokens), width), np.float32)
    for k, row in enumerate(subtokens):
        if any(not 0 <= i < keep for i in row):
            raise ValueError(f"subtokens[{k}]: ids {list(row)} outside the {keep} kept rows")
        ids[k, : len(row)] = row
        weights[k, : len(row)] = 1.0 / max(len(row), 1)
    return ids, weights, np.array([len(row) > 0 for row in subtokens])


def _grow(
    matrix: Any,
    axis: int,
    keep: int,
    added: int,
    tables: tuple[np.ndarray, np.ndarray, np.ndarray] | None,
) -> jax.Array:
    rows = jnp.moveaxis(jnp.asarray(matrix), axis, 0)[:keep]  # (V, D) for either layout
    if added == 0:
        return jnp.moveaxis(rows, 0, axis)
    mean = jnp.mean(rows.astype(jnp.float32), axis=0)
    if tables is None:
        new = jnp.broadcast_to(mean, (added, rows.shape[1]))
    else:
        ids, weights, has = tables

        def average(args: tuple[jax.Array, jax.Array]) -> jax.Array:
            row_ids, row_weights = args  # elementwise, not a matmul: float32 on every backend
            return jnp.sum(row_weights[:, None] * rows[row_ids].astype(jnp.float32), axis=0)

        pieces = jax.lax.map(
            average, (jnp.asarray(ids), jnp.asarray(weights)), batch_size=_MAP_BATCH
        )
        new = jnp.where(jnp.asarray(has)[:, None], pieces, mean)
    return jnp.moveaxis(jnp.concatenate([rows, new.astype(rows.dtype)]), 0, axis)


# ---------------------------------------------------------------------------- sub-tokens


def subtoken_ids(old: Tokenizer, new: Tokenizer, ids: Iterable[int]) -> list[list[int]]:
    """For each id of `new`: the ids of its token's text under `old` (its sub-tokens); [] for an
    id past `new`'s vocabulary (a padding row). Byte-level BPE tokens are split by the old BPE
    model itself, so a token holding part of a UTF-8 character splits too."""
    split = _splitter(old, new)
    return [split(i) if i < new.vocab_size else [] for i in ids]


def _splitter(old: Tokenizer, new: Tokenizer) -> Callable[[int], list[int]]:
    def as_text(i: int) -> list[int]:
        return old.encode(new.decode([i]))

    if isinstance(old, HuggingFaceTokenizer) and isinstance(new, HuggingFaceTokenizer):
        added = new.tokenizer.get_added_tokens_decoder()
        model = old.tokenizer.model

        def hugging_face(i: int) -> list[int]:
            token = new.tokenizer.id_to_token(i)
            if token is None or i in added:  # added tokens are matched in raw text
                return as_text(i)
            try:  # the token string is in the models' shared alphabet (byte-level: bytes)
                return [t.id for t in model.tokenize(token)]
            except Exception:  # a model that cannot split the string: go through text
                return as_text(i)

        return hugging_face
    if isinstance(old, SentencePieceTokenizer) and isinstance(new, SentencePieceTokenizer):
        # the piece as written ('▁' = a space), without the dummy prefix of a text's first word
        proto = sp_pb2.ModelProto()
        proto.ParseFromString(old.data)
        proto.normalizer_spec.add_dummy_prefix = False
        proto.normalizer_spec.remove_extra_whitespaces = False
        processor = sentencepiece.SentencePieceProcessor(model_proto=proto.SerializeToString())

        def sentencepiece_piece(i: int) -> list[int]:
            return list(processor.encode(new.processor.id_to_piece(i).replace("\u2581", " ")))

        return sentencepiece_piece
    return as_text


def _piece(tokenizer: Tokenizer, i: int) -> str | None:
    if isinstance(tokenizer, HuggingFaceTokenizer):
        return tokenizer.tokenizer.id_to_token(i)
    if isinstance(tokenizer, SentencePieceTokenizer):
        return str(tokenizer.processor.id_to_piece(i))
    return tokenizer.decode([i])


def _check_extends(old: Tokenizer, new: Tokenizer, directory: epath.Path) -> None:
    """A ConfigError unless `new` gives every id of `old` the same token (an extension)."""
    for i in range(old.vocab_size):
        if i >= new.vocab_size or _piece(old, i) != _piece(new, i):
            mine = _piece(new, i) if i < new.vocab_size else None
            raise ConfigError(
                f"data.tokenizer: this run's tokenizer ({new.vocab_size} tokens) neither is nor "
                f"extends the one saved beside {directory} ({old.vocab_size} tokens): id {i} is "
                f"{mine!r} here, {_piece(old, i)!r} there; use that tokenizer file or one made "
                "from it by `python -m maxlm.data.tokenizer extend`"
            )


# ---------------------------------------------------------------------------- checkpoint.init_from


def saved_tokenizer(directory: epath.Path) -> Tokenizer | None:
    """The tokenizer file beside a checkpoint step directory: a converted model's own, or its
    run's (<run.dir>/tokenizer.*, two levels up), as `checkpoint.open_model` finds them."""
    home = directory if (directory / checkpoint.CONFIG_FILE).is_file() else directory.parent.parent
    for name in ("tokenizer.json", "tokenizer.model"):
        if (home / name).is_file():
            return read_tokenizer(home / name)
    return None


def saved_vocab_rows(directory: epath.Path) -> int | None:
    """Rows of the embedding saved in the step directory `directory` (orbax metadata, nothing
    read); None if the metadata does not say."""
    try:
        tree = ocp.PyTreeCheckpointer().metadata(directory / "state").item_metadata
        return int(tree["params"]["embed_tokens"]["embedding"].shape[0])
    except Exception:  # not a checkpoint: load_params names the problem
        return None


def _fitting(sharding: Any, shape: tuple[int, ...]) -> Any:
    """`sharding` with the mesh axes dropped from dimensions they do not divide (the old
    vocabulary's row count need not divide like the new one)."""
    if not isinstance(sharding, NamedSharding):
        return sharding
    spec = list(sharding.spec) + [None] * (len(shape) - len(sharding.spec))
    for k, (dim, axes) in enumerate(zip(shape, spec, strict=True)):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        if dim % int(np.prod([sharding.mesh.shape[n] for n in names], dtype=np.int64)):
            spec[k] = None
    return NamedSharding(sharding.mesh, PartitionSpec(*spec))


def init_from(
    path: str | epath.PathLike,
    abstract_params: dict[str, Any],
    shardings: dict[str, Any],
    *,
    tokenizer: Tokenizer,
    new_token_init: Init = "mean",
    log: Callable[[str], None] = print,
) -> Any:
    """`checkpoint.init_from`'s parameters, placed with `shardings`; a smaller saved vocabulary
    grows to this model's (`resize_vocab`), new token ids of `tokenizer` (an extension of the
    saved tokenizer) initialized by `new_token_init`. The old checkpoint is read sharded and
    resized under jit into the target shardings: no full host copy of a matrix ever exists."""
    directory = paths.resolve(path)
    old_rows = saved_vocab_rows(directory)
    new_rows = int(abstract_params["embed_tokens"]["embedding"].shape[0])
    if old_rows is None:
        return checkpoint.load_params(directory, abstract_params, shardings)
    if new_rows < old_rows:
        raise ConfigError(
            f"model.vocab_size: {new_rows} is smaller than the {old_rows} embedding rows of "
            f"{directory}; continual pretraining can grow a vocabulary, never shrink it: set "
            f"model.vocab_size >= {old_rows}"
        )
    old_tokenizer = saved_tokenizer(directory)
    keep = old_rows
    if old_tokenizer is not None and old_tokenizer.fingerprint != tokenizer.fingerprint:
        _check_extends(old_tokenizer, tokenizer, directory)
        if tokenizer.vocab_size > old_tokenizer.vocab_size:  # new ids may land on padding rows
            keep = min(old_rows, old_tokenizer.vocab_size)
    if keep == new_rows:
        return checkpoint.load_params(directory, abstract_params, shardings)
    subtokens = None
    if new_token_init == "subtokens":
        if old_tokenizer is None:
            raise ConfigError(
                f"checkpoint.new_token_init: subtokens needs the checkpoint's tokenizer file, but "
                f"there is no tokenizer.json / tokenizer.model beside {directory}; use mean"
            )
        subtokens = subtoken_ids(old_tokenizer, tokenizer, range(keep, new_rows))
    old_abstract, old_shardings = _saved_shapes(abstract_params, shardings, old_rows)
    old = checkpoint.load_params(directory, old_abstract, old_shardings)
    grow = functools.partial(
        resize_vocab, new_vocab_size=new_rows, init=new_token_init, keep=keep, subtokens=subtokens
    )
    params = jax.jit(grow, out_shardings=shardings)(old)
    tokens = max(min(tokenizer.vocab_size, new_rows) - keep, 0)
    how = "the mean of the old rows"
    if subtokens is not None:
        fallback = sum(1 for ids in subtokens[:tokens] if not ids)
        how = f"the mean of their sub-tokens' rows ({fallback} tokens without any: the old mean)"
    where = "the embedding" + (" and the output head" if "lm_head" in abstract_params else "")
    log(
        f"vocabulary: {old_rows} -> {new_rows} rows; {new_rows - keep} rows initialized "
        f"(from row {keep}: {tokens} new tokens, {new_rows - keep - tokens} padding) to {how}, "
        f"in {where}"
    )
    return params


def _saved_shapes(
    abstract: dict[str, Any], shardings: dict[str, Any], rows: int
) -> tuple[Any, Any]:
    """The abstract parameters and shardings with the vocabulary axes at the saved `rows`."""
    abstract, shardings = dict(abstract), dict(shardings)
    for (module, leaf), axis in VOCAB_AXES.items():
        if module not in abstract:
            continue
        target = abstract[module][leaf]
        shape = tuple(rows if k == axis else d for k, d in enumerate(target.shape))
        abstract[module] = {**abstract[module], leaf: jax.ShapeDtypeStruct(shape, target.dtype)}
        sharding = _fitting(shardings[module][leaf], shape)
        shardings[module] = {**shardings[module], leaf: sharding}
    return abstract, shardings
