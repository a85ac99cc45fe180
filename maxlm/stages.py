"""Multi-stage training: the run's stages as step ranges, each with its own resolved config
(sequence length, batch, RoPE base) and data mixture; `optim.staged_schedule` joins their lr.

A run without `stages:` is one stage holding the whole config, so the loop has one path.
"""

from __future__ import annotations

import bisect
import dataclasses

import numpy as np

from maxlm.config import Config


@dataclasses.dataclass(frozen=True)
class Stage:
    """Steps first..last (1-based, inclusive) trained under `cfg`."""

    index: int
    name: str
    first: int
    last: int
    cfg: Config
    weights: list[float]  # per data source, in config order

    @property
    def seed(self) -> int:
        """Data shuffling seed: the run seed for the first stage, a derived one after."""
        seed = self.cfg.run.seed
        if self.index == 0:
            return seed
        return int(np.random.SeedSequence([seed, 1000 + self.index]).generate_state(1)[0])


def plan(cfg: Config) -> list[Stage]:
    """The stages of a run (one stage of the whole run without `stages:`)."""
    names = list(cfg.data.sources)
    if not cfg.stages:
        weights = [cfg.data.sources[name].weight for name in names]
        return [Stage(0, "train", 1, cfg.train.steps, cfg, weights)]
    stages, first = [], 1
    for index, stage in enumerate(cfg.stages):
        steps = stage.num_steps(cfg.train)
        train = cfg.train.model_copy(
            update={
                "seq_len": stage.seq_len or cfg.train.seq_len,
                "global_batch_size": stage.global_batch_size or cfg.train.global_batch_size,
            }
        )
        model = cfg.model.model_copy(
            update={"rope_theta": stage.rope_theta or cfg.model.rope_theta}
        )
        resolved = cfg.model_copy(update={"train": train, "model": model})
        weights = [
            stage.mixture.get(name, 0.0) if stage.mixture else cfg.data.sources[name].weight
            for name in names
        ]
        stages.append(Stage(index, stage.name, first, first + steps - 1, resolved, weights))
        first += steps
    return stages


def stage_of(stages: list[Stage], step: int) -> Stage:
    """The stage that trains 1-based step `step` (the last one past the end)."""
    index = bisect.bisect_left([stage.last for stage in stages], step)
    return stages[min(index, len(stages) - 1)]
