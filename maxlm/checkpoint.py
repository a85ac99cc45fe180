"""Orbax checkpoints of the train state and the data iterator: save every N steps, verify, resume.

A step's checkpoint holds the sharded TrainState, each process's grain iterator state, a small
progress JSON (tokens seen, tokenizer, data layout, resolved config) and a checksum per state
leaf. Orbax commits each step atomically but checks no integrity (a flipped byte restores
silently), so restoring verifies the checksums and walks back past damaged steps, moving each
to `checkpoints-quarantine/`; a directory with checkpoints none of which restores is an error,
never a silent fresh start.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import signal
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import grain
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from maxlm import config as config_lib, paths, state as state_lib
from maxlm.config import CheckpointConfig, Config, ConfigError
from maxlm.data import sources
from maxlm.data.tokenizer import HuggingFaceTokenizer, Tokenizer, load_tokenizer, read_tokenizer
from maxlm.state import Blueprint, TrainState

CONFIG_FILE = "config.yaml"  # a run's resolved config, beside its checkpoints/


class CheckpointError(RuntimeError):
    """A checkpoint could not be written, or none could be read; the message names the path."""


class _IteratorSnapshot:
    """The iterator's position when save() was called: the live iterator moves on while orbax
    writes in the background. grain's handler stores a non-dataset item's bytes as they are."""

    def __init__(self, iterator: Any) -> None:
        self._state = json.dumps(iterator.get_state()).encode()

    def get_state(self) -> bytes:
        return self._state


def _leaf_checksum(x: jax.Array) -> jax.Array:
    """A position-weighted sum of the leaf's bits mod 2**32: any changed element changes it
    (the weights are odd), and integer addition makes it independent of the sharding."""
    width = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
    bits = jax.lax.bitcast_convert_type(x, width).astype(jnp.uint32).reshape(-1)
    weights = jnp.arange(bits.size, dtype=jnp.uint32) * jnp.uint32(2654435761) | jnp.uint32(1)
    return jnp.sum(bits * weights, dtype=jnp.uint32)


_checksums = jax.jit(lambda tree: jax.tree.map(_leaf_checksum, tree))


def state_checksums(state: TrainState) -> dict[str, int]:
    """One checksum per leaf, keyed by its path; computed on device over the global arrays, so
    the same on any mesh and any number of processes."""
    sums = jax.device_get(_checksums(state))
    return {
        jax.tree_util.keystr(path): int(value)
        for path, value in jax.tree_util.tree_flatten_with_path(sums)[0]
    }


def state_hash(state: TrainState) -> str:
    """One hash of the whole state (its leaf checksums): equal states, equal hashes."""
    return hashlib.sha256(json.dumps(state_checksums(state), sort_keys=True).encode()).hexdigest()


class Checkpointer:
    """A run directory's checkpoints: `<run.dir>/checkpoints/<step>/{state,data,progress,...}`."""

    def __init__(self, cfg: CheckpointConfig, run_dir: epath.Path) -> None:
        """`run_dir`: local or remote (`gs://`; orbax writes it through epath and tensorstore)."""
        self.every_steps = cfg.every_steps
        self.directory = run_dir / "checkpoints"
        self.quarantine = run_dir / "checkpoints-quarantine"
        self._saving: int | None = None  # the step of the newest save started
        try:
            self._manager = ocp.CheckpointManager(
                self.directory,
                options=ocp.CheckpointManagerOptions(
                    max_to_keep=cfg.keep,
                    keep_period=cfg.keep_every_steps or None,
                    enable_async_checkpointing=cfg.async_save,
                    create=True,
                ),
            )
        except OSError as err:
            raise CheckpointError(f"checkpoint: cannot use {self.directory}: {err}") from None

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def due(self, step: int, last_step: int) -> bool:
        return self.every_steps > 0 and (step % self.every_steps == 0 or step == last_step)

    def save(self, step: int, state: TrainState, iterator: Any, progress: dict[str, Any]) -> None:
        """Start writing step `step` (asynchronously); errors of an earlier save surface here.
        `progress` is small JSON kept beside the state (tokens seen, tokenizer, config...)."""
        checksums = state_checksums(state)
        self._saving = step
        try:
            self._manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state),
                    data=grain.checkpoint.CheckpointSave(_IteratorSnapshot(iterator)),
                    progress=ocp.args.JsonSave(progress),
                    checksums=ocp.args.JsonSave(checksums),
                ),
            )
        except Exception as err:  # orbax and tensorstore raise many types for a failed write
            raise self._write_error(step, err) from err

    def check_for_errors(self, step: int) -> None:
        """Raise now if a background save failed (called every step: never notice late)."""
        try:
            self._manager.check_for_errors()
        except Exception as err:
            raise self._write_error(step, err) from err

    def _write_error(self, step: int, err: BaseException) -> CheckpointError:
        return CheckpointError(
            f"checkpoint: writing step {self._saving} to {self.directory} failed (noticed at "
            f"step {step}): {type(err).__name__}: {err}; the checkpoints already committed are "
            "intact"
        )

    def progress(self, step: int) -> dict[str, Any]:
        """The small JSON saved with `step`, read alone (before restoring anything else)."""
        restored = self._manager.restore(
            step, args=ocp.args.Composite(progress=ocp.args.JsonRestore())
        )
        return dict(restored["progress"])

    def restore(
        self, step: int, blueprint: Blueprint, iterator: Any
    ) -> tuple[TrainState, dict[str, Any]]:
        """The state of `step` placed with the blueprint's shardings, and its progress JSON;
        `iterator` is rewound to the batch after that step. The state's checksums are verified
        (a mismatch raises CheckpointError naming the leaf)."""
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
                checksums=ocp.args.JsonRestore(),
            ),
        )
        state: TrainState = restored["state"]
        expected = dict(restored["checksums"])
        for path, value in state_checksums(state).items():
            if expected.get(path) != value:
                raise CheckpointError(
                    f"checksum mismatch in {path}: saved {expected.get(path)}, read {value}"
                )
        return state, dict(restored["progress"])

    def restore_latest(
        self,
        blueprint: Blueprint,
        iterator_for: Callable[[int], Any],
        check: Callable[[int, dict[str, Any]], None] = lambda step, progress: None,
        log: Callable[[str], None] = print,
    ) -> tuple[int, TrainState, dict[str, Any]] | None:
        """The newest checkpoint that restores and verifies, as (step, state, progress), or None
        for an empty directory; its data position goes into `iterator_for(step)` (a fresh
        iterator of that step's stage). Damaged steps are logged and quarantined on the way
        back; `check(step, progress)` may refuse a step with a ConfigError (not damage)."""
        steps = self.all_steps()
        if not steps:
            return None
        for step in reversed(steps):
            try:
                check(step, self.progress(step))
                state, progress = self.restore(step, blueprint, iterator_for(step))
                return step, state, progress
            except ConfigError:
                raise
            except Exception as err:  # truncated files, missing metadata, bad checksums...
                reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                log(f"checkpoint {step} in {self.directory} cannot be restored ({reason}); "
                    f"moving it to {self.quarantine}")  # fmt: skip
                self._quarantine(step)
        raise CheckpointError(
            f"checkpoint: none of the checkpoints in {self.directory} (steps {steps}) could be "
            f"restored; they are in {self.quarantine}. Not starting from scratch over a run "
            "that existed: fix or move them, or use a new run.dir"
        )

    def _quarantine(self, step: int) -> None:
        if jax.process_index() == 0:
            self.quarantine.mkdir(parents=True, exist_ok=True)
            target = self.quarantine / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
            paths.move(self.directory / str(step), target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"maxlm quarantine {step}")
        self._manager.reload()

    def wait(self) -> None:
        """Block until every started save has committed."""
        self._manager.wait_until_finished()

    def close(self, timeout_s: float | None = None) -> None:
        """Wait for pending writes to commit (at most `timeout_s`: a preemption's grace)."""
        if timeout_s is None:
            try:
                self._manager.wait_until_finished()
            except Exception as err:  # the last save failed after the loop's last check
                raise self._write_error(-1, err) from err
            self._manager.close()
            return
        waiter = threading.Thread(target=self._manager.wait_until_finished, daemon=True)
        waiter.start()
        waiter.join(timeout_s)
        if waiter.is_alive():
            raise CheckpointError(
                f"checkpoint: the save to {self.directory} did not commit within "
                f"checkpoint.preemption_grace_s={timeout_s:g} s"
            )
        self.check_for_errors(-1)
        self._manager.close()


class PreemptionWatch:
    """SIGTERM / SIGINT ask the run to save and stop after the current step. One process: a
    Python signal handler. Several (after jax.distributed.initialize): JAX's preemption sync
    point, so every process stops at the same step; a Python handler would disable it."""

    def __init__(self) -> None:
        self._requested = False
        self._previous: dict[int, Any] = {}
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._request)

    def _request(self, signum: int, frame: Any) -> None:
        self._requested = True

    def reached(self, step: int) -> bool:
        """Whether to save at `step` and stop."""
        if jax.process_count() > 1:
            return bool(multihost_utils.reached_preemption_sync_point(step))
        return self._requested

    def close(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}


def load_params(path: str | epath.PathLike, abstract_params: Any, shardings: Any) -> Any:
    """The parameters of the checkpoint step directory `path` (init_from, a converted model;
    local or `gs://`), placed with `shardings`; the optimizer state there is not read."""
    directory = paths.resolve(path)
    if not (directory / "state").is_dir():
        raise ConfigError(
            f"checkpoint.init_from: {directory} is not a checkpoint step directory (it has no "
            "state/; give <run.dir>/checkpoints/<step>)"
        )
    target = jax.tree.map(
        lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
        abstract_params,
        shardings,
    )
    restore_args = jax.tree.map(
        lambda leaf: ocp.ArrayRestoreArgs(sharding=leaf.sharding, dtype=leaf.dtype), target
    )
    try:
        restored = ocp.PyTreeCheckpointer().restore(
            directory / "state",
            args=ocp.args.PyTreeRestore(
                item={"params": target},
                restore_args={"params": restore_args},
                partial_restore=True,
            ),
        )
    except (ValueError, KeyError) as err:
        raise ConfigError(
            f"checkpoint.init_from: the parameters in {directory} do not fit this model: {err}"
        ) from None
    return restored["params"]


def tokenizer_filename(tokenizer: Tokenizer) -> str:
    """The name a run or a converted model gives its tokenizer file (Hugging Face's names)."""
    return "tokenizer.json" if isinstance(tokenizer, HuggingFaceTokenizer) else "tokenizer.model"


@dataclasses.dataclass(frozen=True)
class SavedModel:
    """A model to run: the step directory holding `state/`, the config it was trained (or
    converted) with, and the tokenizer file saved beside it, if any."""

    directory: epath.Path
    config: Config
    tokenizer_file: epath.Path | None

    def tokenizer(self) -> Tokenizer:
        """The saved tokenizer file, else the one the config names (a trained BPE is cached)."""
        if self.tokenizer_file is not None:
            return read_tokenizer(self.tokenizer_file)
        data = self.config.data
        if data.tokenizer.kind == "train_bpe":
            raise ConfigError(
                f"data.tokenizer: {self.directory} has no tokenizer file beside it and its "
                "tokenizer was trained at run time; give one with data.tokenizer.kind/path"
            )
        return load_tokenizer(data.tokenizer, sources.concat([]))

    def params(self, shardings: Any = None) -> Any:
        """The parameters as a pure dict: on one device, or placed with `shardings`."""
        abstract = state_lib.abstract_params(self.config.model)
        if shardings is None:
            device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
            shardings = jax.tree.map(lambda _: device, abstract)
        return load_params(self.directory, abstract, shardings)


def open_model(path: str | epath.PathLike, overrides: Sequence[str] = ()) -> SavedModel:
    """The model at `path`: a run directory (its newest checkpoint), a checkpoint step directory
    `<run.dir>/checkpoints/<step>`, or a converted model (`python -m maxlm.convert`).
    `overrides` (`model.dtype=bfloat16`, ...) apply to the saved config."""
    path = paths.resolve(path)
    if (path / "checkpoints").is_dir():
        steps = sorted(int(p.name) for p in (path / "checkpoints").iterdir() if p.name.isdigit())
        if not steps:
            raise ConfigError(f"checkpoint: {path / 'checkpoints'} holds no checkpoint")
        path = path / "checkpoints" / str(steps[-1])
    if not (path / "state").is_dir():
        raise ConfigError(
            f"checkpoint: {path} is neither a run directory, a checkpoint step directory nor a "
            "converted model (none has a state/ folder there)"
        )
    home = path if (path / CONFIG_FILE).is_file() else path.parent.parent
    config_file = home / CONFIG_FILE
    if not config_file.is_file():
        raise ConfigError(f"checkpoint: no {CONFIG_FILE} in {path} or {home}")
    tokenizers = [home / name for name in ("tokenizer.json", "tokenizer.model")]
    return SavedModel(
        directory=path,
        config=config_lib.loads(config_file.read_text(), overrides, str(config_file)),
        tokenizer_file=next((f for f in tokenizers if f.is_file()), None),
    )
