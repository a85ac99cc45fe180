"""Distributed initialization and the (data, fsdp, tensor) device mesh."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from maxlm.config import MESH_AXES, ConfigError, DistributedConfig, MeshConfig


def initialize_distributed(cfg: DistributedConfig) -> None:
    """Join the multi-process job before any device is touched (no-op for one process)."""
    configured = cfg.coordinator_address is not None or "JAX_COORDINATOR_ADDRESS" in os.environ
    on_tpu_pod = "TPU_WORKER_HOSTNAMES" in os.environ and "," in os.environ["TPU_WORKER_HOSTNAMES"]
    # JAX's own cluster detection fills in a SLURM job's coordinator, count and rank
    in_slurm_job = int(os.environ.get("SLURM_NTASKS", "1") or "1") > 1
    if cfg.enabled == "off" or (
        cfg.enabled == "auto" and not (configured or on_tpu_pod or in_slurm_job)
    ):
        return
    if jax.distributed.is_initialized():
        return
    if os.environ.get("JAX_PLATFORMS", "") == "cpu":
        # CPU collectives across processes need gloo; the backend must not be touched before init
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=cfg.coordinator_address,
        num_processes=cfg.num_processes,
        process_id=cfg.process_id,
    )


def resolve_shape(cfg: MeshConfig, device_count: int) -> tuple[int, int, int]:
    """Axis sizes with the one -1 filled in; errors name the mesh key."""
    sizes = [cfg.data, cfg.fsdp, cfg.tensor]
    fixed = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if device_count % fixed:
            raise ConfigError(
                f"mesh: fixed axes {dict(zip(MESH_AXES, sizes, strict=True))} (product {fixed}) "
                f"do not divide the {device_count} devices"
            )
        sizes[sizes.index(-1)] = device_count // fixed
    elif fixed != device_count:
        raise ConfigError(
            f"mesh: data*fsdp*tensor = {fixed} but there are {device_count} devices "
            f"({dict(zip(MESH_AXES, sizes, strict=True))})"
        )
    return sizes[0], sizes[1], sizes[2]


def make(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The global mesh over all processes' devices (or the given ones), with auto axis types."""
    devices = list(devices) if devices is not None else jax.devices()
    shape = resolve_shape(cfg, len(devices))
    if len(devices) == len(jax.devices()):
        return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)
    # a subset (tests, tools) has no physical topology to optimize for
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def data_parallel_size(mesh: Mesh) -> int:
    """How many ways the batch is split: the data and fsdp axes together."""
    return mesh.shape["data"] * mesh.shape["fsdp"]
