"""Held-out evaluation: loss (nats/token), perplexity and bits per byte, per source and overall,
in training's periodic eval and from a checkpoint; and the per-token scorer the
lm-evaluation-harness adapter (`maxlm.harness`) shares.

CLI: `python -m maxlm.eval --checkpoint=PATH [--batches=N|all] [--output=FILE.json] [key=value]`.

Bits per byte = total nats / ln 2 / total UTF-8 bytes of the scored target tokens, the bytes
counted per token from a table built from the tokenizer (`token_bytes`), so models with different
tokenizers compare on the same text.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from tokenizers import pre_tokenizers

from maxlm import cli, mesh as mesh_lib, sharding as sharding_lib, state as state_lib, train_step
from maxlm.checkpoint import CheckpointError, open_model
from maxlm.config import Config, ConfigError, TokenizerConfig
from maxlm.data import global_batch, mixture, pipeline
from maxlm.data.tokenizer import HuggingFaceTokenizer, SentencePieceTokenizer, Tokenizer
from maxlm.model import Llama

Batch = dict[str, Any]

# fixed, not run.seed: held-out batches stay comparable across runs with different seeds
HELD_OUT_SAMPLE_SEED = 0
_BYTE_PIECE = "<0x"  # sentencepiece byte-fallback pieces are spelled <0x00> .. <0xFF>

# ---------------------------------------------------------------------------- bytes per token


def token_bytes(tokenizer: Tokenizer, size: int | None = None) -> np.ndarray:
    """UTF-8 bytes each token id stands for (int32 [size], default the tokenizer's vocabulary;
    ids past it count 0). Special and control tokens (BOS, EOS, pad, sentinels, unknown) are 0;
    byte-level BPE tokens their bytes; sentencepiece-style pieces their text with '▁' as one
    space byte and byte-fallback pieces <0xNN> as one byte."""
    if isinstance(tokenizer, HuggingFaceTokenizer):
        counts = _hugging_face_bytes(tokenizer)
    elif isinstance(tokenizer, SentencePieceTokenizer):
        counts = _sentencepiece_bytes(tokenizer)
    else:
        raise TypeError(f"no byte table for tokenizer type {type(tokenizer).__name__}")
    table = np.zeros(max(size or 0, len(counts)), np.int32)
    table[: len(counts)] = counts
    return table


def _hugging_face_bytes(tokenizer: HuggingFaceTokenizer) -> list[int]:
    spec = json.loads(tokenizer.data)
    inner = tokenizer.tokenizer
    byte_level = _has_byte_level(spec.get("decoder")) or _has_byte_level(spec.get("pre_tokenizer"))
    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    added = inner.get_added_tokens_decoder()
    counts = []
    for token_id in range(tokenizer.vocab_size):
        token = inner.id_to_token(token_id)
        if token is None or (token_id in added and added[token_id].special):
            counts.append(0)
        elif token_id in added:  # a plain added word is matched in the raw text as written
            counts.append(len(added[token_id].content.encode()))
        elif byte_level and set(token) <= alphabet:  # each character of the alphabet is a byte
            counts.append(len(token))
        else:
            counts.append(_piece_bytes(token))
    return counts


def _has_byte_level(component: dict[str, Any] | None) -> bool:
    """Whether a tokenizer.json decoder / pre-tokenizer is ByteLevel or a sequence holding one."""
    if not component:
        return False
    parts = component.get("decoders") or component.get("pretokenizers") or [component]
    return any(part.get("type") == "ByteLevel" for part in parts)


def _piece_bytes(piece: str) -> int:
    """A sentencepiece-style piece: <0xNN> is one byte, '▁' a space."""
    if piece.startswith(_BYTE_PIECE) and piece.endswith(">") and len(piece) == 6:
        return 1
    return len(piece.replace("▁", " ").encode())


def _sentencepiece_bytes(tokenizer: SentencePieceTokenizer) -> list[int]:
    processor = tokenizer.processor
    counts = []
    for token_id in range(tokenizer.vocab_size):
        if processor.IsControl(token_id) or processor.IsUnknown(token_id):
            counts.append(0)  # an unknown token's text is lost: it cannot be counted
        elif processor.IsByte(token_id):
            counts.append(1)
        else:
            counts.append(_piece_bytes(processor.IdToPiece(token_id)))
    return counts


# ---------------------------------------------------------------------------- held-out data


@dataclasses.dataclass(frozen=True)
class HeldOut:
    """Fixed held-out batches (global arrays) of every source, and the UTF-8 bytes of the target
    tokens they score, counted once."""

    batches: dict[str, list[Batch]]
    bytes: dict[str, int]


def load_held_out(
    sources: Sequence[pipeline.Source],
    layout: pipeline.Layout,
    *,
    batch_size: int,
    num_batches: int | None,
    sharding: NamedSharding,
    byte_table: np.ndarray,
) -> HeldOut:
    """Each source's first `num_batches` held-out batches of `batch_size` rows of this process,
    sampled with HELD_OUT_SAMPLE_SEED as training evaluates, or with `num_batches` None every
    held-out document once; placed with `sharding`."""
    count = _byte_counter(byte_table)
    batches, nbytes = {}, {}
    for source in sources:
        if num_batches is None:
            host = _every_document(source, layout, batch_size)
        else:
            host = pipeline.eval_batches(
                source, layout, batch_size=batch_size, num_batches=num_batches,
                seed=HELD_OUT_SAMPLE_SEED,
            )  # fmt: skip
        batches[source.name] = [global_batch.to_global(batch, sharding) for batch in host]
        nbytes[source.name] = sum(int(count(batch)) for batch in batches[source.name])
    return HeldOut(batches, nbytes)


def _scored(batch: Batch) -> jax.Array:
    """Where a target counts in the loss: real tokens (segment id 0 is padding) that a prefix-LM
    objective's loss mask keeps; as `maxlm.loss.loss_sums` selects them."""
    real = batch["segment_ids"] != 0
    return real & (batch["loss_mask"] != 0) if "loss_mask" in batch else real


def _byte_counter(byte_table: np.ndarray) -> Callable[[Batch], jax.Array]:
    """jit(batch) -> UTF-8 bytes of its scored targets, summed over all processes' rows."""
    table = jnp.asarray(byte_table, jnp.int32)

    def count(batch: Batch) -> jax.Array:
        return jnp.sum(jnp.where(_scored(batch), table[batch["targets"]], 0))

    return jax.jit(count)


def _every_document(source: pipeline.Source, layout: pipeline.Layout, rows: int) -> list[Batch]:
    """This process's held-out documents once, packed into batches of `rows` rows; the last
    padded, and as many batches on every process (the eval step is collective)."""
    packed = pipeline.packed_rows(
        source.docs, layout, objective=source.objective, num_bins=rows,
        shuffle_seed=HELD_OUT_SAMPLE_SEED, num_epochs=1,
    )  # fmt: skip
    batches = [_pad_rows(batch, rows) for batch in packed.batch(rows, drop_remainder=False)]
    count = len(batches)
    if jax.process_count() > 1:
        count = int(np.max(multihost_utils.process_allgather(np.int32(count))))
    empty = {key: np.zeros_like(value) for key, value in batches[0].items()}
    return batches + [empty] * (count - len(batches))


def _pad_rows(batch: Batch, rows: int) -> Batch:
    """Add all-padding rows (segment id 0 everywhere) up to `rows`."""
    return {
        key: np.pad(value, [(0, rows - len(value))] + [(0, 0)] * (value.ndim - 1))
        for key, value in batch.items()
    }


# ---------------------------------------------------------------------------- scores


@dataclasses.dataclass(frozen=True)
class Score:
    """Summed cross-entropy (nats) over scored target tokens, and their count and UTF-8 bytes."""

    nats: float
    tokens: float
    bytes: float

    @property
    def loss(self) -> float:
        """Nats per token."""
        return self.nats / max(self.tokens, 1.0)

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.loss, 50.0))

    @property
    def bits_per_byte(self) -> float:
        return self.nats / math.log(2) / self.bytes if self.bytes else math.nan

    def __add__(self, other: Score) -> Score:
        return Score(self.nats + other.nats, self.tokens + other.tokens, self.bytes + other.bytes)

    def to_json(self) -> dict[str, float]:
        return {
            "tokens": round(self.tokens),  # counts, summed exactly
            "bytes": round(self.bytes),
            "loss": self.loss,
            "perplexity": self.perplexity,
            "bits_per_byte": self.bits_per_byte,
        }


def score(eval_step: Any, params: Any, data: HeldOut) -> dict[str, Score]:
    """Each source's Score under `params`; `eval_step(params, batch)` gives LossSums
    (`maxlm.train_step.make_eval_step`)."""
    scores = {}
    for name, batches in data.batches.items():
        nats, tokens = 0.0, 0.0
        for batch in batches:
            sums = jax.device_get(eval_step(params, batch))
            nats += float(sums.cross_entropy)
            tokens += float(sums.tokens)
        scores[name] = Score(nats, tokens, float(data.bytes[name]))
    return scores


def total(scores: dict[str, Score]) -> Score:
    """All sources together (each token weighs the same, whatever its source)."""
    return sum(scores.values(), start=Score(0.0, 0.0, 0.0))


def evaluate(eval_step: Any, params: Any, data: HeldOut) -> dict[str, float]:
    """Training's eval metrics: `eval_loss` (nats/token), `eval_perplexity`, `eval_bpb` (bits
    per byte) and `eval_tokens` over every source, and with several sources `eval_loss/<name>`
    and `eval_bpb/<name>`."""
    scores = score(eval_step, params, data)
    overall = total(scores)
    result = {
        "eval_loss": overall.loss,
        "eval_perplexity": overall.perplexity,
        "eval_bpb": overall.bits_per_byte,
        "eval_tokens": overall.tokens,
    }
    if len(scores) > 1:
        for name, part in scores.items():
            result[f"eval_loss/{name}"] = part.loss
            result[f"eval_bpb/{name}"] = part.bits_per_byte
    return result


# ---------------------------------------------------------------------------- token scoring


def target_logprobs(model: Llama, batch: Batch) -> tuple[jax.Array, jax.Array]:
    """log p(target) [B,T] (float32) after each input token, and whether the target is the
    model's argmax there; 0 and True on padding (segment id 0)."""
    logits = model(batch["tokens"], batch["segment_ids"], batch["positions"])
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]
    real = batch["segment_ids"] != 0
    greedy = jnp.argmax(logits, axis=-1) == batch["targets"]
    return jnp.where(real, picked, 0.0), greedy | ~real


def bucket_length(length: int, max_length: int, smallest: int = 16) -> int:
    """The padded length of a row of `length` inputs: the next power of two (at least
    `smallest`), at most `max_length`; so a few shapes compile, not one per request."""
    return min(max(smallest, 1 << (length - 1).bit_length()), max_length)


class Scorer:
    """Per-token log-probs of whole token sequences under a model, `batch_size` rows at a time
    (padded with empty rows) and lengths padded to `bucket_length`."""

    def __init__(
        self,
        model: Llama,
        *,
        batch_size: int,
        max_length: int,
        sharding: NamedSharding | None = None,
    ):
        graphdef, state = nnx.split(model)
        self._state = state
        self.batch_size = batch_size
        self.max_length = max_length
        self._sharding = sharding
        self._score = jax.jit(
            lambda state, batch: target_logprobs(nnx.merge(graphdef, state), batch)
        )

    def __call__(self, sequences: Sequence[Sequence[int]]) -> list[tuple[np.ndarray, np.ndarray]]:
        """For each sequence t_0 .. t_n (2 to max_length + 1 tokens): log p(t_i | t_<i) and
        whether t_i is the argmax, for i = 1 .. n (arrays of n)."""
        results = []
        for start in range(0, len(sequences), self.batch_size):
            chunk = sequences[start : start + self.batch_size]
            lengths = [len(sequence) - 1 for sequence in chunk]
            if min(lengths) < 1 or max(lengths) > self.max_length:
                raise ValueError(
                    f"sequences must hold 2 to {self.max_length + 1} tokens, got "
                    f"{min(lengths) + 1} to {max(lengths) + 1}"
                )
            width = bucket_length(max(lengths), self.max_length)
            batch = {
                key: np.zeros((self.batch_size, width), np.int32)
                for key in ("tokens", "targets", "segment_ids", "positions")
            }
            for row, (sequence, n) in enumerate(zip(chunk, lengths, strict=True)):
                batch["tokens"][row, :n] = sequence[:-1]
                batch["targets"][row, :n] = sequence[1:]
                batch["segment_ids"][row, :n] = 1
                batch["positions"][row, :n] = np.arange(n)
            placed = jax.device_put(batch, self._sharding) if self._sharding else batch
            logp, greedy = jax.device_get(self._score(self._state, placed))
            results += [(logp[row, :n], greedy[row, :n]) for row, n in enumerate(lengths)]
        return results


# ---------------------------------------------------------------------------- from a checkpoint


@dataclasses.dataclass(frozen=True)
class Report:
    """The held-out scores of one checkpoint, per source."""

    checkpoint: Path
    scores: dict[str, Score]
    batches: int | Literal["all"]  # per source; "all": every held-out document once

    def to_json(self) -> dict[str, Any]:
        step = self.checkpoint.name
        return {
            "checkpoint": str(self.checkpoint),
            "step": int(step) if step.isdigit() else None,
            "batches": self.batches,
            "sources": {name: part.to_json() for name, part in self.scores.items()},
            "overall": total(self.scores).to_json(),
        }

    def table(self) -> str:
        rows = list(self.scores.items())
        if len(rows) > 1:
            rows.append(("all", total(self.scores)))
        width = max(len("source"), *(len(name) for name, _ in rows))
        lines = [
            f"{'source':<{width}}  {'tokens':>12}  {'bytes':>13}  {'loss':>8}  "
            f"{'perplexity':>10}  {'bits/byte':>9}"
        ]
        for name, part in rows:
            lines.append(
                f"{name:<{width}}  {part.tokens:>12,.0f}  {part.bytes:>13,.0f}  {part.loss:>8.4f}  "
                f"{part.perplexity:>10.3f}  {part.bits_per_byte:>9.4f}"
            )
        return "\n".join(lines)


def evaluate_checkpoint(
    path: str | Path, overrides: Sequence[str] = (), *, batches: int | Literal["all"] | None = None
) -> Report:
    """Score the model at `path` (what `open_model` accepts) on its config's held-out data,
    split and sampled exactly as training evaluates; `batches` per source: None for the
    config's eval.batches, a number, or "all" for every held-out document once."""
    if batches is not None and batches != "all" and (not isinstance(batches, int) or batches < 1):
        raise ConfigError(f"--batches: a positive number or 'all', got {batches!r}")
    saved = open_model(path, overrides)
    cfg = _with_saved_tokenizer(saved.config, saved.tokenizer_file)
    mesh_lib.initialize_distributed(cfg.distributed)
    mesh = mesh_lib.make(cfg.mesh)
    rows = cfg.train.global_batch_size
    if rows % mesh_lib.data_parallel_size(mesh) or rows % jax.process_count():
        raise ConfigError(
            f"train.global_batch_size: {rows} rows per held-out batch do not split over the "
            f"mesh's data*fsdp = {mesh_lib.data_parallel_size(mesh)} devices and "
            f"{jax.process_count()} process(es); override it (a different held-out sample) or "
            "the mesh"
        )
    data = mixture.load(cfg)
    blue = state_lib.blueprint(cfg, optax.identity(), mesh)  # no optimizer: parameters only
    params = saved.params(blue.shardings.params)
    batch_sharding = sharding_lib.batch_sharding(mesh, cfg.mesh.rules)
    eval_step = train_step.make_eval_step(
        blue.graphdef,
        params_shardings=blue.shardings.params,
        batch_sharding=batch_sharding,
        keys=tuple(k for k in train_step.batch_keys(cfg) if k != train_step.SOURCE_KEY),
    )
    data_held_out = load_held_out(
        data.held_out,
        pipeline.Layout.of_run(cfg, data.tokenizer),
        batch_size=rows // jax.process_count(),
        num_batches=None if batches == "all" else batches or cfg.eval.batches,
        sharding=batch_sharding,
        byte_table=token_bytes(data.tokenizer, cfg.model.vocab_size),
    )
    scores = score(eval_step, params, data_held_out)
    return Report(saved.directory, scores, batches or cfg.eval.batches)


def _with_saved_tokenizer(cfg: Config, tokenizer_file: Path | None) -> Config:
    """The config reading the tokenizer file saved beside the checkpoint: the very tokenizer the
    model was trained with, and no BPE retrained when its cache is gone."""
    if tokenizer_file is None:
        return cfg
    if tokenizer_file.suffix == ".json":
        tokenizer = TokenizerConfig(kind="huggingface", path=str(tokenizer_file))
    else:
        tokenizer = TokenizerConfig(kind="sentencepiece", path=str(tokenizer_file))
    return cfg.model_copy(update={"data": cfg.data.model_copy(update={"tokenizer": tokenizer})})


def _parser() -> argparse.ArgumentParser:
    parser = cli.Parser(
        prog="python -m maxlm.eval",
        description="Held-out loss, perplexity and bits per byte of a checkpoint, per source.",
    )
    cli.add_checkpoint_argument(parser)
    parser.add_argument(
        "--batches",
        metavar="N|all",
        help="Held-out batches per source (default: the config's eval.batches, as training "
        "evaluates), or 'all': every held-out document once.",
    )
    parser.add_argument("--output", metavar="FILE", help="Also write the scores to this JSON file.")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="Config overrides on the saved config, e.g. data.sources.web.paths=[...] or "
        "mesh.fsdp=8.",
    )
    return parser


def _batches_flag(text: str | None) -> int | Literal["all"] | None:
    if text is None:
        return None
    if text == "all":
        return "all"
    try:
        return int(text)
    except ValueError:
        raise cli.UsageError(f"--batches: a positive number or 'all', got {text!r}") from None


def main(argv: Sequence[str] | None = None) -> int:
    """Evaluate a checkpoint, print the table (and write --output); a bad flag, path, config
    or checkpoint exits 2 with one line."""
    try:
        args = _parser().parse_intermixed_args(sys.argv[1:] if argv is None else argv)
        report = evaluate_checkpoint(
            args.checkpoint, args.overrides, batches=_batches_flag(args.batches)
        )
    except (cli.UsageError, ConfigError, CheckpointError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if jax.process_index() == 0:
        print(f"checkpoint {report.checkpoint}")
        print(report.table(), flush=True)
        if args.output:
            output = Path(args.output)
            output.parent.mkdir(parents=True, exist_ok=True)
            output.write_text(json.dumps(report.to_json(), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
