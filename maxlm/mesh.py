"""Distributed initialization and the (data, fsdp, tensor) device mesh, over one or several
TPU slices (multislice: slices joined by the data-center network, DCN)."""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

from maxlm.config import MESH_AXES, ConfigError, DistributedConfig, MeshConfig


def initialize_distributed(cfg: DistributedConfig) -> None:
    """Join the multi-process job before any device is touched (no-op for one process)."""
    configured = cfg.coordinator_address is not None or "JAX_COORDINATOR_ADDRESS" in os.environ
    on_tpu_pod = "TPU_WORKER_HOSTNAMES" in os.environ and "," in os.environ["TPU_WORKER_HOSTNAMES"]
    # several slices of one host each list one worker; the TPU runtime names the DCN coordinator
    on_tpu_pod |= "MEGASCALE_COORDINATOR_ADDRESS" in os.environ
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
    """Global axis sizes with the one -1 filled in; errors name the mesh key."""
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
    for axis, size in zip(MESH_AXES, sizes, strict=True):
        slices = cfg.dcn_shape[axis]
        if size % slices:
            raise ConfigError(f"mesh.dcn_{axis}: {axis}={size} does not split into {slices} slices")
    return sizes[0], sizes[1], sizes[2]


def slice_index(device: jax.Device) -> int:
    """The TPU slice a device belongs to; devices without one (CPU, GPU) are all in slice 0."""
    return int(getattr(device, "slice_index", 0))


def group_by_slice(devices: Sequence[jax.Device]) -> list[list[jax.Device]]:
    """The devices of each slice, in slice order (each list in the given order)."""
    slices: dict[int, list[jax.Device]] = {}
    for device in devices:
        slices.setdefault(slice_index(device), []).append(device)
    return [slices[index] for index in sorted(slices)]


def hybrid_devices(
    shape: Sequence[int], dcn: Sequence[int], slices: Sequence[Sequence[jax.Device]]
) -> np.ndarray:
    """The device grid of a multislice mesh: along each axis the slice index is the outer part of
    the coordinate, so only collectives over an axis with dcn > 1 cross slices. Each slice is laid
    out by its own torus; the layout of `mesh_utils.create_hybrid_device_mesh`, with the slices
    given, so fake slices of CPU devices test it."""
    ici = [size // parts for size, parts in zip(shape, dcn, strict=True)]
    if len(slices) != math.prod(dcn) or any(len(group) != math.prod(ici) for group in slices):
        raise ConfigError(
            f"mesh: {len(slices)} slices of {[len(group) for group in slices]} devices do not "
            f"make a {list(shape)} mesh split {list(dcn)} across slices"
        )
    per_slice = np.stack(
        [
            mesh_utils.create_device_mesh(ici, group, allow_split_physical_axes=True)
            for group in slices
        ]
    )
    # (dcn_d, dcn_f, dcn_t, ici_d, ici_f, ici_t) -> (dcn_d, ici_d, dcn_f, ici_f, dcn_t, ici_t)
    grid = per_slice.reshape(*dcn, *ici).transpose(0, 3, 1, 4, 2, 5)
    return grid.reshape(shape)


def make(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The global mesh over all processes' devices (or the given ones), with auto axis types;
    over several slices, the hybrid mesh of `hybrid_devices`."""
    devices = list(devices) if devices is not None else jax.devices()
    shape = resolve_shape(cfg, len(devices))
    axis_types = (AxisType.Auto,) * 3
    slices = group_by_slice(devices)
    if len(slices) != cfg.num_slices:
        hint = ""
        if cfg.num_slices == 1:
            hint = f"; data-parallel across them: mesh.dcn_data={len(slices)}"
        elif len(slices) == 1:
            hint = "; devices without a slice_index (CPU, GPU) are one slice"
        raise ConfigError(
            f"mesh: dcn_data*dcn_fsdp*dcn_tensor = {cfg.num_slices} but the devices are in "
            f"{len(slices)} slice(s){hint}"
        )
    if cfg.dcn_tensor > 1:
        warnings.warn(
            f"mesh.dcn_tensor={cfg.dcn_tensor}: every layer's tensor-parallel all-reduces cross "
            "the data-center network; mesh.dcn_data is the usual choice",
            stacklevel=2,
        )
    if len(slices) > 1:
        dcn = tuple(cfg.dcn_shape[axis] for axis in MESH_AXES)
        return Mesh(hybrid_devices(shape, dcn, slices), MESH_AXES, axis_types=axis_types)
    if len(devices) == len(jax.devices()):
        return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)
    # a subset (tests, tools) has no physical topology to optimize for
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=axis_types)


def data_parallel_size(mesh: Mesh) -> int:
    """How many ways the batch is split: the data and fsdp axes together."""
    return mesh.shape["data"] * mesh.shape["fsdp"]
