"""Text generation with a KV cache: batched, left-padded prompts, greedy or sampled decoding.

`generate` prefills all prompts in one call, then runs one jitted decode step per new token;
`python -m maxlm.generate --checkpoint=PATH --prompt=TEXT` streams a completion to the terminal.
See docs/generate.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TextIO

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from maxlm import cli, state as state_lib
from maxlm.checkpoint import CheckpointError, open_model
from maxlm.data.tokenizer import Tokenizer
from maxlm.model import KVCache, Llama

# Prompts are left-padded, and the cache sized, to multiples of this: a few shapes compile,
# not one per prompt length.
LENGTH_MULTIPLE = 64
# The longest prompt + continuation accepted: the longest context LLaMA releases are made for;
# beyond it RoPE extrapolates and the cache outgrows any one accelerator.
MAX_LENGTH = 131_072


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the next token is chosen: greedy at temperature 0, otherwise a draw from
    softmax(logits / temperature) cut to the top_k most likely tokens (0 = no cut), then to the
    fewest most likely tokens whose probability reaches top_p (1 = no cut)."""

    temperature: float = 0.0  # 0 = greedy (argmax)
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off (nucleus sampling otherwise)

    def __post_init__(self) -> None:
        if not self.temperature >= 0:  # also rejects NaN
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")


def sample(logits: jax.Array, key: jax.Array, sampling: Sampling) -> jax.Array:
    """Token ids (B,) int32 chosen from float32 logits (B,V) as `sampling` says."""
    if sampling.temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return _draw(logits, key, _knobs(sampling))


Knobs = tuple[jax.Array, jax.Array, jax.Array]  # temperature, top_k, top_p as traced scalars


def _knobs(sampling: Sampling) -> Knobs:
    # Traced rather than static, so a new temperature or top-p does not recompile the step.
    return (
        jnp.float32(sampling.temperature),
        jnp.int32(sampling.top_k),
        jnp.float32(sampling.top_p),
    )


def _draw(logits: jax.Array, key: jax.Array, knobs: Knobs) -> jax.Array:
    """A sample at temperature > 0 after the top-k and top-p cuts (in Hugging Face's order)."""
    temperature, top_k, top_p = knobs
    logits = logits.astype(jnp.float32) / temperature
    ranked = jnp.flip(jnp.sort(logits, axis=-1), axis=-1)  # (B,V), most likely first
    rank = jnp.arange(logits.shape[-1])
    keep = (rank < top_k) | (top_k == 0)
    probs = jax.nn.softmax(jnp.where(keep, ranked, -jnp.inf), axis=-1)
    # a token stays while the more likely ones before it hold less than top_p; the first always
    # does. top_p == 1 is exactly "off", whatever the rounding of the cumulative sum.
    keep &= (jnp.cumsum(probs, axis=-1) - probs < top_p) | (top_p >= 1)
    # The kept tokens are a prefix of the ranking: keep every logit at least the last kept one
    # (ties at the cut stay, as in Hugging Face's top-k).
    cut = jnp.min(jnp.where(keep, ranked, jnp.inf), axis=-1, keepdims=True)
    return jax.random.categorical(key, jnp.where(logits >= cut, logits, -jnp.inf)).astype(jnp.int32)


def _next_token(logits: jax.Array, key: jax.Array, knobs: Knobs, greedy: bool) -> jax.Array:
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return _draw(logits, key, knobs)


@functools.partial(jax.jit, static_argnames=("graphdef", "cache_length", "greedy"))
def _prefill(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    tokens: jax.Array,
    positions: jax.Array,
    token_mask: jax.Array,
    key: jax.Array,
    knobs: Knobs,
    *,
    cache_length: int,
    greedy: bool,
) -> tuple[jax.Array, KVCache]:
    """All prompts (B,P) in one call: the first new token of each row and the filled cache."""
    model = nnx.merge(graphdef, params)
    cache = model.init_cache(tokens.shape[0], cache_length)
    logits, cache = model.decode(tokens, positions, cache, token_mask, last_only=True)
    return _next_token(logits[:, -1], jax.random.fold_in(key, 0), knobs, greedy), cache


@functools.partial(jax.jit, static_argnames=("graphdef", "greedy"), donate_argnames="cache")
def _decode_step(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    tokens: jax.Array,
    cache: KVCache,
    key: jax.Array,
    step: jax.Array,
    knobs: Knobs,
    *,
    greedy: bool,
) -> tuple[jax.Array, KVCache]:
    """Feed each row's last token (B,) and choose the next; the cache is updated in place."""
    model = nnx.merge(graphdef, params)
    # left padding: a row's next position is the number of real tokens it holds so far
    positions = jnp.sum(cache.valid, axis=1, dtype=jnp.int32)[:, None]
    logits, cache = model.decode(tokens[:, None], positions, cache)
    return _next_token(logits[:, -1], jax.random.fold_in(key, step), knobs, greedy), cache


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _check_inputs(
    prompts: list[list[int]], vocab_size: int, max_new_tokens: int, eos_id: int | None
) -> None:
    if not prompts:
        raise ValueError("prompts: need at least one prompt")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if eos_id is not None and not 0 <= eos_id < vocab_size:
        raise ValueError(f"eos_id {eos_id} is outside the vocabulary [0, {vocab_size})")
    for i, prompt in enumerate(prompts):
        if not prompt:
            raise ValueError(f"prompts[{i}] is empty; give at least one token (e.g. BOS)")
        if len(prompt) + max_new_tokens > MAX_LENGTH:
            raise ValueError(
                f"prompts[{i}]: {len(prompt)} prompt tokens + max_new_tokens {max_new_tokens} "
                f"exceed the longest supported sequence, {MAX_LENGTH} tokens"
            )
        bad = [t for t in prompt if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"prompts[{i}]: token id {bad[0]} is outside [0, {vocab_size})")


def _left_padded(prompts: list[list[int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """tokens, positions (int32) and real-token mask (bool), (B,P) with P a LENGTH_MULTIPLE."""
    width = _round_up(max(len(p) for p in prompts), LENGTH_MULTIPLE)
    tokens = np.zeros((len(prompts), width), np.int32)
    positions = np.zeros_like(tokens)
    mask = np.zeros(tokens.shape, bool)
    for row, prompt in enumerate(prompts):
        tokens[row, width - len(prompt) :] = prompt
        positions[row, width - len(prompt) :] = np.arange(len(prompt))
        mask[row, width - len(prompt) :] = True
    return tokens, positions, mask


def generate(
    model: Llama,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    sampling: Sampling = Sampling(),
    eos_id: int | None = None,
    seed: int = 0,
    on_tokens: Callable[[list[int | None]], None] | None = None,
) -> list[list[int]]:
    """The new token ids of each prompt, stopping at `eos_id` (not included) or after
    `max_new_tokens`. `on_tokens` gets each step's new id per row, None for a row that has
    finished (at this step's EOS or before), so its ids are exactly the returned ones."""
    rows = [[int(t) for t in p] for p in prompts]
    _check_inputs(rows, model.embed_tokens.embedding.shape[0], max_new_tokens, eos_id)
    tokens, positions, mask = _left_padded(rows)
    # the last new token is never fed back, so it needs no slot
    cache_length = _round_up(tokens.shape[1] + max_new_tokens - 1, LENGTH_MULTIPLE)
    graphdef, params = nnx.split(model)
    knobs, greedy, key = _knobs(sampling), sampling.temperature == 0, jax.random.key(seed)
    next_ids, cache = _prefill(
        graphdef,
        params,
        tokens,
        positions,
        mask,
        key,
        knobs,
        cache_length=cache_length,
        greedy=greedy,
    )
    new: list[list[int]] = [[] for _ in rows]
    finished = [False] * len(rows)
    for step in range(1, max_new_tokens + 1):
        pending = None
        if step < max_new_tokens:
            # dispatch the next step before reading this one's ids: the device never waits for
            # the host (a batch that has all finished wastes one step)
            pending = _decode_step(
                graphdef, params, next_ids, cache, key, jnp.int32(step), knobs, greedy=greedy
            )
        emitted: list[int | None] = []
        for row, token in enumerate(np.asarray(next_ids).tolist()):
            finished[row] = finished[row] or token == eos_id
            emitted.append(None if finished[row] else token)
            if not finished[row]:
                new[row].append(token)
        if on_tokens is not None:
            on_tokens(emitted)
        if pending is None or all(finished):
            break
        next_ids, cache = pending
    return new


def continue_texts(
    model: Llama,
    tokenizer: Tokenizer,
    texts: Sequence[str],
    *,
    max_new_tokens: int,
    add_bos: bool = True,
    sampling: Sampling = Sampling(),
) -> list[str]:
    """The continuation of each text (greedy by default), decoded: what training prints at its
    end for `eval.sample_prompts`."""
    bos = [tokenizer.bos_id] if add_bos and tokenizer.bos_id is not None else []
    prompts = [bos + ids for ids in tokenizer.encode_batch(list(texts))]
    new = generate(
        model, prompts, max_new_tokens=max_new_tokens, sampling=sampling, eos_id=tokenizer.eos_id
    )
    return [_continuation(tokenizer, p, n) for p, n in zip(prompts, new, strict=True)]


# ---------------------------------------------------------------------------- command line


def _parser() -> argparse.ArgumentParser:
    parser = cli.Parser(
        prog="python -m maxlm.generate",
        description="Generate text from a trained or converted maxlm model.",
    )
    cli.add_checkpoint_argument(parser)
    parser.add_argument("--prompt", action="append", default=[], help="Prompt text (repeatable).")
    parser.add_argument("--prompts-file", metavar="FILE", help="One prompt per line.")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="New tokens at most.")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy.")
    parser.add_argument("--top-k", type=int, default=0, help="Keep the k most likely; 0 = off.")
    parser.add_argument("--top-p", type=float, default=1.0, help="Nucleus mass; 1 = off.")
    parser.add_argument("--seed", type=int, default=0, help="Sampling seed.")
    parser.add_argument("--no-bos", action="store_true", help="Do not prepend the BOS token.")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="Config overrides, e.g. model.dtype=bfloat16.",
    )
    return parser


def _read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts_file:
        try:
            lines = Path(args.prompts_file).read_text(encoding="utf-8").splitlines()
        except OSError as err:
            raise cli.UsageError(f"--prompts-file: {err.strerror}: {args.prompts_file}") from None
        prompts += [line for line in lines if line.strip()]
    if not prompts:
        raise cli.UsageError("give at least one --prompt or a --prompts-file with prompts")
    return prompts


def _continuation(tokenizer: Tokenizer, prompt_ids: list[int], new_ids: list[int]) -> str:
    """The text `new_ids` add after the prompt, decoded in context (a tokenizer may spell a
    token differently at the start of a text, e.g. sentencepiece's leading space)."""
    before = tokenizer.decode(prompt_ids)
    after = tokenizer.decode(prompt_ids + new_ids)
    return after[len(before) :] if after.startswith(before) else tokenizer.decode(new_ids)


class _Stream:
    """Writes a completion as it grows; an incomplete UTF-8 sequence at the end (decoded as
    U+FFFD) waits for its next token, so multi-byte characters come out whole."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], out: TextIO):
        self.tokenizer, self.prompt_ids, self.out = tokenizer, prompt_ids, out
        self.new_ids: list[int] = []
        self.shown = 0  # characters of the continuation written so far

    def __call__(self, ids: list[int | None]) -> None:
        if ids[0] is not None:
            self.new_ids.append(ids[0])
            self._show(
                _continuation(self.tokenizer, self.prompt_ids, self.new_ids).rstrip("\ufffd")
            )

    def close(self) -> None:
        self._show(_continuation(self.tokenizer, self.prompt_ids, self.new_ids))
        self.out.write("\n")
        self.out.flush()

    def _show(self, text: str) -> None:
        if len(text) > self.shown:
            self.out.write(text[self.shown :])
            self.out.flush()
            self.shown = len(text)


def _run(args: argparse.Namespace) -> None:
    texts = _read_prompts(args)
    sampling = Sampling(args.temperature, args.top_k, args.top_p)
    saved = open_model(args.checkpoint, args.overrides)
    tokenizer = saved.tokenizer()
    model = state_lib.model_from_params(saved.config.model, saved.params())
    bos = [] if args.no_bos or tokenizer.bos_id is None else [tokenizer.bos_id]
    prompts = [bos + ids for ids in tokenizer.encode_batch(texts)]
    # before the prompt is echoed: a bad value is then the only output
    _check_inputs(prompts, saved.config.model.vocab_size, args.max_new_tokens, tokenizer.eos_id)
    stream = _Stream(tokenizer, prompts[0], sys.stdout) if len(texts) == 1 else None
    if stream is not None:
        sys.stdout.write(texts[0])
        sys.stdout.flush()
    start = time.perf_counter()
    new = generate(
        model,
        prompts,
        max_new_tokens=args.max_new_tokens,
        sampling=sampling,
        eos_id=tokenizer.eos_id,
        seed=args.seed,
        on_tokens=stream,
    )
    seconds = time.perf_counter() - start
    if stream is not None:
        stream.close()
    else:
        for i, (text, prompt_ids, ids) in enumerate(zip(texts, prompts, new, strict=True)):
            print(f"--- {i + 1}/{len(texts)} ---")
            print(text + _continuation(tokenizer, prompt_ids, ids), flush=True)
    count = sum(len(ids) for ids in new)
    print(f"{count} new tokens in {seconds:.2f} s, compilation included", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Generate from the command line; a bad flag, path or value exits 2 with one line."""
    try:
        _run(_parser().parse_intermixed_args(argv))
    except (
        cli.UsageError,
        ValueError,
        CheckpointError,
        OSError,
    ) as err:  # ConfigError is a ValueError
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
