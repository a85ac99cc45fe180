"""Orbax checkpoints of the train state and the data iterator: save every N steps, resume.

A step's checkpoint holds the sharded TrainState and each process's grain iterator state, so a
restarted run continues with the very next batch. Orbax commits each step atomically.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from maxlm.config import CheckpointConfig, ConfigError
from maxlm.state import Blueprint, TrainState


class _IteratorSnapshot:
    """The iterator's position when save() was called: the live iterator moves on while orbax
    writes in the background. grain's handler stores a non-dataset item's bytes as they are."""

    def __init__(self, iterator: Any) -> None:
        self._state = json.dumps(iterator.get_state()).encode()

    def get_state(self) -> bytes:
        return self._state


class Checkpointer:
    """A run directory's checkpoints: `<run.dir>/checkpoints/<step>/{state,data}`."""

    def __init__(self, cfg: CheckpointConfig, run_dir: Path) -> None:
        self.every_steps = cfg.every_steps
        self.directory = (run_dir / "checkpoints").absolute()
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=cfg.keep, enable_async_checkpointing=cfg.async_save, create=True
            ),
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def due(self, step: int, last_step: int) -> bool:
        return self.every_steps > 0 and (step % self.every_steps == 0 or step == last_step)

    def save(self, step: int, state: TrainState, iterator: Any, progress: dict[str, Any]) -> None:
        """Start writing step `step` (asynchronously); errors of an earlier save surface here.
        `progress` is small JSON kept beside the state (tokens seen, tokenizer fingerprint)."""
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=grain.checkpoint.CheckpointSave(_IteratorSnapshot(iterator)),
                progress=ocp.args.JsonSave(progress),
            ),
        )

    def progress(self, step: int) -> dict[str, Any]:
        """The small JSON saved with `step`, read alone (before restoring anything else)."""
        restored = self._manager.restore(
            step, args=ocp.args.Composite(progress=ocp.args.JsonRestore())
        )
        return dict(restored["progress"])

    def check_layout(self, step: int, layout: dict[str, Any]) -> None:
        """Stop with an error naming the config key when `step` was saved with another data
        layout (config key -> value): the data iterator's state would not fit, and grain
        would fail with a bare IndexError or KeyError."""
        saved = self.progress(step).get("layout", {})
        for key, value in layout.items():
            if key in saved and saved[key] != value:
                raise ConfigError(
                    f"{key}: the checkpoint of step {step} in {self.directory} was written with "
                    f"{saved[key]!r}, this run has {value!r}; resume with the same value (or "
                    "start a new run.dir)"
                )

    def restore(
        self, step: int, blueprint: Blueprint, iterator: Any
    ) -> tuple[TrainState, dict[str, Any]]:
        """The state of `step` placed with the blueprint's shardings, and its progress JSON;
        `iterator` is rewound to the batch after that step."""
        target = jax.tree.map(
            lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
            blueprint.abstract,
            blueprint.shardings,
        )
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target),
                data=grain.checkpoint.CheckpointRestore(iterator),
                progress=ocp.args.JsonRestore(),
            ),
        )
        state: TrainState = restored["state"]
        return state, dict(restored["progress"])

    def close(self) -> None:
        """Wait for pending writes to commit."""
        self._manager.wait_until_finished()
        self._manager.close()
