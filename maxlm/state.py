"""Train state, its abstract shape and shardings (no memory), and sharded initialization."""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from maxlm import sharding
from maxlm.config import Config, ModelConfig
from maxlm.model import Constrain, Llama


class TrainState(flax.struct.PyTreeNode):
    """Arrays in a live state; ShapeDtypeStructs or NamedShardings in a Blueprint."""

    step: Any
    params: Any
    opt_state: Any


class Blueprint(NamedTuple):
    """Everything known before any parameter exists: structure, shapes and shardings."""

    graphdef: nnx.GraphDef
    abstract: TrainState
    shardings: TrainState


def build_model(cfg: ModelConfig, seed: int, constrain: Constrain | None = None) -> Llama:
    return Llama(cfg, rngs=nnx.Rngs(params=seed), constrain=constrain)


def split_params(model: Llama) -> tuple[nnx.GraphDef, Any]:
    """The model's static structure and its parameters as a plain nested dict (HF-like names)."""
    graphdef, params = nnx.split(model, nnx.Param)
    return graphdef, nnx.to_pure_dict(params)


def abstract_params(cfg: ModelConfig) -> Any:
    """Shapes and dtypes of the parameters (a pure dict), without allocating them."""
    return split_params(nnx.eval_shape(lambda: build_model(cfg, 0)))[1]


def model_from_params(cfg: ModelConfig, params: Any, constrain: Constrain | None = None) -> Llama:
    """A Llama holding `params` (a pure dict as `split_params` gives)."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: build_model(cfg, 0, constrain)), nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


def logical_names(model: Llama) -> Any:
    """PartitionSpecs of logical axis names, shaped like `split_params(model)[1]`."""
    return nnx.to_pure_dict(nnx.get_partition_spec(nnx.state(model, nnx.Param)))


def blueprint(cfg: Config, optimizer: optax.GradientTransformation, mesh: Mesh) -> Blueprint:
    """Shapes and shardings of the whole train state via eval_shape: nothing is allocated."""
    constrain = sharding.ActivationSharding.create(mesh, cfg.mesh.rules)
    abstract_model = nnx.eval_shape(lambda: build_model(cfg.model, cfg.run.seed, constrain))
    graphdef, abstract_params = split_params(abstract_model)
    params_shardings = sharding.param_shardings(
        logical_names(abstract_model), abstract_params, mesh, cfg.mesh.rules
    )
    abstract_opt_state = jax.eval_shape(optimizer.init, abstract_params)
    abstract = TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32),
        params=abstract_params,
        opt_state=abstract_opt_state,
    )
    shardings = TrainState(
        step=sharding.replicated(mesh),
        params=params_shardings,
        opt_state=sharding.like_params(abstract_opt_state, abstract_params, params_shardings, mesh),
    )
    return Blueprint(graphdef, abstract, shardings)


def init(cfg: Config, optimizer: optax.GradientTransformation, blue: Blueprint) -> TrainState:
    """Create parameters and optimizer state directly in their shards (no full host copy)."""

    def create() -> TrainState:
        _, params = split_params(build_model(cfg.model, cfg.run.seed))
        return TrainState(
            step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params)
        )

    return jax.jit(create, out_shardings=blue.shardings)()


def count_params(abstract_params: Any) -> int:
    return sum(int(x.size) for x in jax.tree_util.tree_leaves(abstract_params))


def bytes_per_device(abstract: Any, shardings: Any) -> int:
    """Bytes one device holds for a sharded tree (largest shard per leaf)."""
    total = 0
    for leaf, shard in zip(
        jax.tree_util.tree_leaves(abstract), jax.tree_util.tree_leaves(shardings), strict=True
    ):
        shard_shape = shard.shard_shape(leaf.shape)
        size = 1
        for dim in shard_shape:
            size *= dim
        total += size * jnp.dtype(leaf.dtype).itemsize
    return total
