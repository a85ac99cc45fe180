"""A run's data: its named sources split into train / held-out, one tokenizer checked against
every pre-tokenized source and the model, and the mixture weights per stage."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from maxlm.config import Config, ConfigError, DataConfig
from maxlm.data import pipeline, sources as sources_lib
from maxlm.data.tokenizer import Tokenizer, load_tokenizer


@dataclasses.dataclass(frozen=True)
class RunData:
    """Train and held-out sides of every source (in config order) and the tokenizer."""

    train: list[pipeline.Source]
    held_out: list[pipeline.Source]
    tokenizer: Tokenizer

    @property
    def names(self) -> list[str]:
        return [source.name for source in self.train]


def load(cfg: Config) -> RunData:
    """Read every source, split off held-out documents, load (or train) the tokenizer and check
    it fits the model and the pre-tokenized sources: all before any compilation."""
    data = cfg.data
    splits = {}
    for name, source_cfg in data.sources.items():
        docs = sources_lib.documents(source_cfg, f"data.sources.{name}")
        splits[name] = sources_lib.split(docs, data.eval_fraction)
    text = [train for train, _ in splits.values() if train.nbytes is not None]
    corpus = sources_lib.concat(text) if text else next(iter(splits.values()))[0]
    special = [t for s in data.sources.values() for t in pipeline.special_tokens(s.objective)]
    tokenizer = load_tokenizer(data.tokenizer, corpus, list(dict.fromkeys(special)))
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(
            f"model.vocab_size: {cfg.model.vocab_size} is smaller than the tokenizer's "
            f"{tokenizer.vocab_size} tokens"
        )
    for name, (train, _) in splits.items():
        made_with = train.tokenizer_fingerprint
        if made_with is not None and made_with != tokenizer.fingerprint:
            raise ConfigError(
                f"data.sources.{name}: its documents were tokenized with tokenizer "
                f"{made_with[:12]}, but data.tokenizer is {tokenizer.fingerprint[:12]}"
            )
    train_sources, held_out = [], []
    for name, (train, evaluation) in splits.items():
        key = f"data.sources.{name}.objective"
        objective = pipeline.build_objective(data.sources[name].objective, tokenizer, key)
        train_sources.append(pipeline.Source(name, train, objective))
        held_out.append(pipeline.Source(name, evaluation, objective))
    return RunData(train_sources, held_out, tokenizer)


def stages(
    data: DataConfig, rows_per_step: int, rows_before: Callable[[int], int] | None = None
) -> list[tuple[int, list[float]]]:
    """The mixture as (first row, weight per source): one stage of the sources' weights, or
    `data.mixture_stages` with their start steps turned into rows of this process
    (`rows_before(step)` where the batch size changes, else `rows_per_step` a step)."""
    names = list(data.sources)
    if not data.mixture_stages:
        return [(0, [data.sources[name].weight for name in names])]
    before = rows_before or (lambda step: (step - 1) * rows_per_step)
    return [
        (before(max(stage.start_step, 1)), [stage.weights.get(n, 0.0) for n in names])
        for stage in data.mixture_stages
    ]
