"""EleutherAI lm-evaluation-harness on maxlm checkpoints: the model type "maxlm".

    python -m maxlm.harness --model_args checkpoint=runs/x --tasks hellaswag --batch_size 32

runs lm_eval's command line with this adapter registered (lm_eval finds third-party models only
once their module is imported) and `--model maxlm` as the default. From Python, import this
module, then `lm_eval.simple_evaluate(model="maxlm", model_args="checkpoint=runs/x", ...)`.

Requests are tokenized as lm_eval's HFLM tokenizes them (context and continuation encoded
together and split, trailing spaces of the context moved to the continuation, BOS first when the
model was trained with one), sorted by length and scored `batch_size` at a time by the jitted
`maxlm.evaluate.Scorer`, whose padded shapes come from a few length buckets.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import optax
from lm_eval.api.instance import Instance
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import (
    handle_stop_sequences,
    normalize_gen_kwargs,
    postprocess_generated_text,
)
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from maxlm import mesh as mesh_lib, sharding as sharding_lib, state as state_lib
from maxlm.checkpoint import open_model
from maxlm.evaluate import Scorer
from maxlm.generate import Sampling, generate

DEFAULT_BATCH_SIZE = 16
DEFAULT_MAX_GEN_TOKS = 256  # as HFLM
_IGNORED_ARGS = ("device", "max_batch_size")  # lm_eval passes them to every model


@register_model("maxlm")
class MaxLM(TemplateLM):
    """A maxlm checkpoint as an lm_eval model: loglikelihood, loglikelihood_rolling and
    generate_until on the config's device mesh (one process)."""

    def __init__(
        self,
        checkpoint: str,
        batch_size: int | str | None = None,
        max_length: int | str | None = None,
        dtype: str | None = None,
        add_bos_token: bool | None = None,
        max_gen_toks: int | str = DEFAULT_MAX_GEN_TOKS,
        seed: int | str = 1234,
        **kwargs: Any,
    ):
        """`checkpoint`: what `maxlm.checkpoint.open_model` accepts. `max_length`: context in
        tokens (default the config's train.seq_len); `dtype`: compute dtype (model.dtype);
        `add_bos_token`: default the config's data.add_bos. Dotted keys (`mesh.fsdp=2`) override
        the saved config."""
        super().__init__()
        unknown = [key for key in kwargs if "." not in key and key not in _IGNORED_ARGS]
        if unknown:
            raise ValueError(f"maxlm model_args: unknown argument(s) {unknown}")
        overrides = [f"{key}={_config_value(value)}" for key, value in kwargs.items() if "." in key]
        if dtype is not None:
            overrides.append(f"model.dtype={dtype}")
        saved = open_model(checkpoint, overrides)
        cfg = saved.config
        self.tok = saved.tokenizer()
        eos = self.tok.eos_id if self.tok.eos_id is not None else self.tok.bos_id
        if eos is None:
            raise ValueError(f"{checkpoint}: the tokenizer has neither an EOS nor a BOS token")
        self._eot_id = eos
        self.add_bos = cfg.data.add_bos if add_bos_token is None else _flag(add_bos_token)
        self._max_length = int(max_length) if max_length else cfg.train.seq_len
        self._max_gen_toks = int(max_gen_toks)
        self._seed = int(seed)
        mesh = mesh_lib.make(cfg.mesh)
        blue = state_lib.blueprint(cfg, optax.identity(), mesh)  # no optimizer: parameters only
        params = saved.params(blue.shardings.params)
        constrain = sharding_lib.ActivationSharding.create(mesh, cfg.mesh.rules)
        self.model = state_lib.model_from_params(cfg.model, params, constrain)
        # rows shard over the data-parallel devices, so a batch fills every one of them
        parallel = mesh_lib.data_parallel_size(mesh)
        rows = -(-_batch_size(batch_size) // parallel) * parallel
        self.scorer = Scorer(
            self.model,
            batch_size=rows,
            max_length=self._max_length,
            sharding=sharding_lib.batch_sharding(mesh, cfg.mesh.rules),
        )

    @property
    def eot_token_id(self) -> int:
        return self._eot_id

    @property
    def prefix_token_id(self) -> int:
        """What an empty context and every rolling window's first token condition on."""
        return self.tok.bos_id if self.tok.bos_id is not None else self._eot_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self.scorer.batch_size

    def tok_encode(
        self, string: str, add_special_tokens: bool | None = None, **kwargs: Any
    ) -> list[int]:
        """Token ids of `string`, BOS first when `add_special_tokens` (None: as trained)."""
        bos = self.add_bos if add_special_tokens is None else add_special_tokens
        prefix = [self.tok.bos_id] if bos and self.tok.bos_id is not None else []
        return prefix + self.tok.encode(string)

    def _loglikelihood_tokens(
        self,
        requests: list[tuple[tuple[str, str] | None, list[int], list[int]]],
        disable_tqdm: bool = False,
        **kwargs: Any,
    ) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), whether greedy decoding gives it) per
        (key, context ids, continuation ids); the context is cut from the left to fit."""
        sequences = []
        for _, context, continuation in requests:
            if not continuation or len(continuation) > self.max_length:
                raise ValueError(
                    f"a continuation of {len(continuation)} tokens: needs 1 to max_length "
                    f"({self.max_length})"
                )
            sequences.append((context + continuation)[-(self.max_length + 1) :])
        scored = self._score(sequences, "loglikelihood", disable_tqdm)
        answers = []
        for (key, _, continuation), (logp, greedy) in zip(requests, scored, strict=True):
            n = len(continuation)
            answer = (float(logp[-n:].sum()), bool(greedy[-n:].all()))
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
            answers.append(answer)
        return answers

    def loglikelihood_rolling(
        self, requests: list[Instance], disable_tqdm: bool = False
    ) -> list[float]:
        """log p(document): the sum over disjoint windows of up to max_length tokens, the first
        conditioned on `prefix_token_id`, each next one on the token before it (as HFLM)."""
        windows, owners, lengths = [], [], []
        for index, request in enumerate(requests):
            tokens = self.tok_encode(request.args[0], add_special_tokens=False)
            pairs = get_rolling_token_windows(
                token_list=tokens,
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            )
            for context, target in map(make_disjoint_window, pairs):
                windows.append(context + target)
                owners.append(index)
                lengths.append(len(target))
        totals = [0.0] * len(requests)
        scored = self._score(windows, "loglikelihood_rolling", disable_tqdm)
        for owner, n, (logp, _) in zip(owners, lengths, scored, strict=True):
            totals[owner] += float(logp[-n:].sum())
        for request, value in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, value)
        return totals

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        """Continuations decoded greedily or sampled per the request's gen_kwargs (temperature,
        top_k, top_p), up to max_gen_toks tokens or EOS, cut at the first `until` string."""
        results = [""] * len(requests)
        groups: dict[str, list[int]] = {}  # requests of equal gen_kwargs decode together
        for index, request in enumerate(requests):
            key = json.dumps(request.args[1], sort_keys=True, default=str)
            groups.setdefault(key, []).append(index)
        progress = tqdm(total=len(requests), desc="generate_until", disable=disable_tqdm)
        for group, indices in enumerate(groups.values()):
            contexts = [requests[i].args[0] for i in indices]
            texts = self._generate(contexts, requests[indices[0]].args[1], seed=self._seed + group)
            for i, text in zip(indices, texts, strict=True):
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
                results[i] = text
            progress.update(len(indices))
        progress.close()
        return results

    def _generate(self, contexts: list[str], gen_kwargs: dict[str, Any], seed: int) -> list[str]:
        """The continuations of `contexts` under one set of gen_kwargs, longest prompts first."""
        kwargs = dict(normalize_gen_kwargs(gen_kwargs, self.max_gen_toks))
        until = handle_stop_sequences(kwargs.pop("until", None), self.tok.decode([self._eot_id]))
        max_new = int(kwargs.pop("max_gen_toks"))
        if max_new >= self.max_length:
            raise ValueError(f"max_gen_toks {max_new} leaves no room in {self.max_length}")
        sampling = Sampling(
            temperature=float(kwargs.get("temperature") or 0.0),
            top_k=int(kwargs.get("top_k") or 0),
            top_p=float(kwargs.get("top_p") or 1.0),
        )
        # left-truncated so that the prompt and max_new new tokens fit max_length
        prompts = [
            (self.tok_encode(context) or [self.prefix_token_id])[-(self.max_length - max_new) :]
            for context in contexts
        ]
        texts = [""] * len(contexts)
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        for chunk, batch in enumerate(_chunks(order, self.batch_size)):
            watch = _StopStrings(len(batch), until, self.tok.decode)
            with contextlib.suppress(_Stopped):
                generate(
                    self.model,
                    [prompts[i] for i in batch],
                    max_new_tokens=max_new,
                    sampling=sampling,
                    eos_id=self._eot_id,
                    seed=seed * 1000 + chunk,
                    on_tokens=watch,
                )
            for i, ids in zip(batch, watch.ids, strict=True):
                texts[i] = postprocess_generated_text(self.tok.decode(ids), until, None)
        return texts

    def _score(
        self, sequences: list[list[int]], desc: str, disable_tqdm: bool
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """The scorer's results for `sequences`, run longest first (rows of a batch pad alike)."""
        order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
        results: list[Any] = [None] * len(sequences)
        for batch in tqdm(list(_chunks(order, self.batch_size)), desc=desc, disable=disable_tqdm):
            for i, result in zip(batch, self.scorer([sequences[i] for i in batch]), strict=True):
                results[i] = result
        return results


class _Stopped(Exception):
    """Ends a `generate` call early: every row has ended."""


class _StopStrings:
    """`generate`'s on_tokens callback: collects each row's new ids and stops the generation
    once every row has ended, at EOS or at a text holding a stop string (as HFLM stops)."""

    def __init__(self, rows: int, until: list[str], decode: Callable[[list[int]], str]):
        self.ids: list[list[int]] = [[] for _ in range(rows)]
        self.ended = [False] * rows
        self.until = [stop for stop in until if stop]
        self.decode = decode

    def __call__(self, emitted: list[int | None]) -> None:
        for row, token in enumerate(emitted):
            if token is None:
                self.ended[row] = True
            elif not self.ended[row]:
                self.ids[row].append(token)
                text = self.decode(self.ids[row])
                self.ended[row] = any(stop in text for stop in self.until)
        if all(self.ended):
            raise _Stopped


def _chunks(items: list[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _batch_size(value: int | str | None) -> int:
    """lm_eval's batch_size: a number; "auto" (no memory probing here) and None: the default."""
    if value is None or str(value).startswith("auto"):
        return DEFAULT_BATCH_SIZE
    return int(value)


def _flag(value: bool | str) -> bool:
    return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")


def _config_value(value: Any) -> str:
    """lm_eval turns "true" / "3" into Python values; the config parses YAML strings."""
    return str(value).lower() if isinstance(value, bool) else str(value)


_SUBCOMMANDS = ("run", "ls", "validate")


def main(argv: Sequence[str] | None = None) -> int:
    """lm_eval's command line (`lm-eval --help`) with the "maxlm" model registered and
    `--model maxlm` unless another is named."""
    from lm_eval.__main__ import cli_evaluate

    args = list(sys.argv[1:] if argv is None else argv)
    command = args[:1] if args[:1] and args[0] in _SUBCOMMANDS else []
    rest = args[len(command) :]
    named = any(a in ("--model", "-M") or a.startswith("--model=") for a in rest)
    if command in ([], ["run"]) and not named:
        rest = ["--model", "maxlm", *rest]
    sys.argv = ["lm-eval", *command, *rest]  # lm_eval's parser reads sys.argv
    cli_evaluate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
