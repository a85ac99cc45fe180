"""Logical axis names -> mesh axes: the whole parallelism policy, applied in one place.

The rules themselves are data (`mesh.rules` in the config, defaults in
`maxlm.config.DEFAULT_SHARDING_RULES`); this module turns them into shardings.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from maxlm.config import ConfigError

Rules = Mapping[str, str | Sequence[str] | None]

BATCH_AXES = ("act_batch", "act_seq")


def partition_spec(names: Sequence[str | None], rules: Rules) -> PartitionSpec:
    """Map logical names to mesh axes; a mesh axis may shard only one dimension."""
    used: set[str] = set()
    spec: list[str | tuple[str, ...] | None] = []
    for name in names:
        axes = rules.get(name) if name is not None else None
        if name is not None and name not in rules:
            raise ConfigError(f"mesh.rules: no rule for logical axis {name!r}")
        if axes is None:
            spec.append(None)
            continue
        axes = (axes,) if isinstance(axes, str) else tuple(axes)
        if used & set(axes):
            raise ConfigError(
                f"mesh.rules: mesh axes {sorted(used & set(axes))} shard two dimensions of {names}"
            )
        used |= set(axes)
        spec.append(axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*spec)


def _axis_size(mesh: Mesh, entry: str | tuple[str, ...] | None) -> int:
    if entry is None:
        return 1
    axes = (entry,) if isinstance(entry, str) else entry
    size = 1
    for axis in axes:
        size *= mesh.shape[axis]
    return size


def param_shardings(logical: Any, abstract_params: Any, mesh: Mesh, rules: Rules) -> Any:
    """NamedShardings for a tree of parameters; a dimension that cannot split evenly is an error."""

    def one(path: Any, names: PartitionSpec, leaf: jax.ShapeDtypeStruct) -> NamedSharding:
        spec = partition_spec(tuple(names), rules)
        for dim, name, entry in zip(leaf.shape, names, spec, strict=True):
            size = _axis_size(mesh, entry)
            if dim % size:
                raise ConfigError(
                    f"mesh.rules.{name}: parameter {jax.tree_util.keystr(path)} dimension {dim} "
                    f"is not divisible by mesh axes {entry} (size {size}); change the mesh or "
                    f"set mesh.rules.{name}=null"
                )
        return NamedSharding(mesh, spec)

    return jax.tree_util.tree_map_with_path(
        one, logical, abstract_params, is_leaf=lambda x: isinstance(x, PartitionSpec)
    )


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, rules: Rules) -> NamedSharding:
    """Token batches [B, T]: B over the data-parallel axes."""
    return NamedSharding(mesh, partition_spec(BATCH_AXES, rules))


def like_params(tree: Any, abstract_params: Any, params_shardings: Any, mesh: Mesh) -> Any:
    """Shardings for an optimizer state: a leaf whose path ends like a parameter's, with its shape,
    shares that parameter's sharding; the rest (counts, factored moments) is replicated."""
    flat_params = jax.tree_util.tree_flatten_with_path(abstract_params)[0]
    flat_shardings = jax.tree_util.tree_leaves(params_shardings)
    by_path = {
        tuple(path): (leaf.shape, sharding)
        for (path, leaf), sharding in zip(flat_params, flat_shardings, strict=True)
    }

    def one(path: Any, leaf: jax.ShapeDtypeStruct) -> NamedSharding:
        keys = tuple(path)
        for start in range(len(keys)):
            shape, sharding = by_path.get(keys[start:], (None, None))
            if sharding is not None and shape == leaf.shape:
                return sharding
        return replicated(mesh)

    return jax.tree_util.tree_map_with_path(one, tree)


@dataclasses.dataclass(frozen=True)
class ActivationSharding:
    """The model's activation-sharding callback: constrain a tensor by its logical names."""

    mesh: Mesh
    rules: tuple[tuple[str, str | tuple[str, ...] | None], ...]

    @classmethod
    def create(cls, mesh: Mesh, rules: Rules) -> ActivationSharding:
        frozen = tuple(
            (name, axes if axes is None or isinstance(axes, str) else tuple(axes))
            for name, axes in rules.items()
        )
        return cls(mesh, frozen)

    def __call__(self, x: jax.Array, names: tuple[str | None, ...]) -> jax.Array:
        spec = partition_spec(names, dict(self.rules))
        # an activation dimension that does not split evenly (e.g. 1 kv head) stays whole
        even = [
            e if dim % _axis_size(self.mesh, e) == 0 else None
            for dim, e in zip(x.shape, spec, strict=True)
        ]
        return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, PartitionSpec(*even)))


def target_platform(constrain: object) -> str:
    """Where a model built with this `constrain` callback runs: its mesh's platform (so an
    ahead-of-time compile for TPU from a CPU host says "tpu"), else the default backend."""
    if isinstance(constrain, ActivationSharding):
        return str(constrain.mesh.devices.flat[0].platform)
    return jax.default_backend()


def target_devices(constrain: object) -> int:
    """How many devices a model built with this `constrain` callback runs on (one without a
    mesh: its arrays then live on the default device)."""
    if isinstance(constrain, ActivationSharding):
        return int(constrain.mesh.devices.size)
    return 1
