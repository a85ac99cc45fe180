"""Multislice on CPU: the hybrid (DCN x ICI) device layout on fake slices, mesh.dcn_* validation,
and reading collectives out of compiled HLO text. tests/test_aot.py compiles for two TPU slices."""

import jax
import numpy as np
import pytest

from maxlm import collectives, config, mesh as mesh_lib
from maxlm.config import ConfigError, MeshConfig


def fake_slices(count: int) -> list[list[jax.Device]]:
    """The 8 CPU devices cut into `count` slices of consecutive devices."""
    devices = jax.devices()
    size = len(devices) // count
    return [devices[i * size : (i + 1) * size] for i in range(count)]


@pytest.mark.parametrize(
    ("shape", "dcn"),
    [
        ((4, 2, 1), (2, 1, 1)),
        ((2, 4, 1), (1, 2, 1)),
        ((2, 2, 2), (2, 1, 2)),
        ((1, 2, 4), (1, 1, 2)),
    ],
)
def test_hybrid_layout_puts_slices_outermost(shape, dcn):
    slices = fake_slices(int(np.prod(dcn)))
    grid = mesh_lib.hybrid_devices(shape, dcn, slices)
    assert grid.shape == shape and sorted(d.id for d in grid.flat) == list(range(8))
    ici = np.array(shape) // np.array(dcn)
    for coords in np.ndindex(*shape):
        # the slice part of each coordinate is its outer (DCN) part
        expected = slices[np.ravel_multi_index(tuple(np.array(coords) // ici), dcn)]
        assert grid[coords] in expected, coords


def test_data_across_two_slices_keeps_each_half_in_one_slice():
    first, second = fake_slices(2)
    grid = mesh_lib.hybrid_devices((4, 2, 1), (2, 1, 1), [first, second])
    assert set(grid[:2].flat) == set(first) and set(grid[2:].flat) == set(second)
    mesh = jax.sharding.Mesh(grid, config.MESH_AXES)
    assert dict(mesh.shape) == {"data": 4, "fsdp": 2, "tensor": 1}


def test_slices_that_do_not_make_the_mesh_are_an_error():
    with pytest.raises(ConfigError, match=r"mesh: 3 slices of \[2, 2, 4\] devices"):
        devices = jax.devices()
        mesh_lib.hybrid_devices((8, 1, 1), (2, 1, 1), [devices[:2], devices[2:4], devices[4:]])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["mesh.data=3", "mesh.dcn_data=2"], "mesh.dcn_data: data=3 does not split into 2 slices"),
        (["mesh.fsdp=4", "mesh.dcn_fsdp=3"], "mesh.dcn_fsdp: fsdp=4 does not split into 3 slices"),
        (["mesh.dcn_tensor=0"], "mesh.dcn_tensor: Input should be greater than or equal to 1"),
    ],
)
def test_dcn_config_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        config.load(None, overrides)


def test_dcn_sizes_divide_the_global_axes():
    cfg = MeshConfig(data=-1, fsdp=2, dcn_data=2)
    assert (cfg.num_slices, cfg.dcn_shape) == (2, {"data": 2, "fsdp": 1, "tensor": 1})
    assert mesh_lib.resolve_shape(cfg, 8) == (4, 2, 1)  # global sizes: 2 x (2, 2, 1) per slice
    with pytest.raises(ConfigError, match=r"mesh\.dcn_data: data=2 does not split into 4 slices"):
        mesh_lib.resolve_shape(MeshConfig(data=-1, fsdp=4, dcn_data=4), 8)


def test_cpu_devices_are_one_slice():
    assert [len(group) for group in mesh_lib.group_by_slice(jax.devices())] == [8]
    with pytest.raises(ConfigError, match=r"= 2 but the devices are in 1 slice\(s\); devices"):
        mesh_lib.make(MeshConfig(data=-1, dcn_data=2))


def test_replica_groups_explicit_and_iota():
    assert collectives.replica_groups("{{0,1,2,3},{4,5,6,7}}") == ((0, 1, 2, 3), (4, 5, 6, 7))
    assert collectives.replica_groups("{{0,4},{1,5}}") == ((0, 4), (1, 5))
    assert collectives.replica_groups("{}") == ()  # everyone
    assert collectives.replica_groups("[2,4]<=[8]") == ((0, 1, 2, 3), (4, 5, 6, 7))
    # iota(4, 2) transposed: groups of stride 2
    assert collectives.replica_groups("[2,4]<=[4,2]T(1,0)") == ((0, 2, 4, 6), (1, 3, 5, 7))
    assert collectives.replica_groups("[4,2]<=[2,2,2]T(0,2,1)") == ((0, 2), (1, 3), (4, 6), (5, 7))


SLICES = [[100000, 100001, 100002, 100003], [200000, 200001, 200002, 200003]]


def test_megascale_groups_explicit_and_compact():
    explicit = "{{100000,200000},{100001,200001}}"
    assert collectives.megascale_groups(explicit, SLICES) == ((100000, 200000), (100001, 200001))
    # libtpu's short form: slices 1 and 2 (numbered from 1), devices 0 to 3 of each
    assert collectives.megascale_groups('"{1,2}x{0:3}"', SLICES) == tuple(
        (100000 + k, 200000 + k) for k in range(4)
    )


# Shaped like the TPU compiler's output for two slices (libtpu 0.0.42), trimmed.
HLO = """\
HloModule jit_step, is_scheduled=true, num_partitions=4

%fused_reduce (param_0: f32[32,1024]) -> f32[32,1024] {
  %all-reduce.181 = f32[32,1024]{1,0:T(8,128)} all-reduce(%param_0), channel_id=16, \
replica_groups=[2,2]<=[4], use_global_device_ids=true, to_apply=%add.clone
}

%body (p: (s32[], f32[32,1024])) -> (s32[], f32[32,1024]) {
  %all-gather.206 = bf16[1,128,256]{2,1,0:T(8,128)(2,1)} all-gather(%param_0.2293), \
channel_id=81, replica_groups={{0,1,2,3}}, dimensions={1}, use_global_device_ids=true
  %all-gather.208 = bf16[1,128,256]{2,1,0:T(8,128)(2,1)S(1)} all-gather(%param_0.2296), \
channel_id=81, replica_groups={{0,1,2,3}}, dimensions={1}, use_global_device_ids=true
  %fusion.554 = f32[32,1024]{1,0} fusion(%fusion.553), kind=kCustom, calls=%fused_reduce
  %send.56 = (bf16[1,16,4,32]{3,1,2,0:T(8,128)(2,1)}, u32[], token[]) send(%copy.450, \
%after-all.56), channel_id=14, is_host_transfer=true, frontend_attributes={\
_xla_host_transfer_handler_name="xla_megascale_runtime",\
_xla_host_transfer_rendezvous="all-gather.176_0",\
_xla_megascale_target={{100000,200000},{100001,200001},{100002,200002},{100003,200003}},\
_xla_megascale_transfer_type="ALL_GATHER"}
}

ENTRY %main.51_spmd (param: f32[32,1024]) -> f32[32,1024] {
  %while.130 = (s32[], f32[32,1024]) while(%tuple.284), condition=%cond, body=%body
  %collective-permute.3 = f32[8]{0} collective-permute(%a), channel_id=7, \
source_target_pairs={{0,1},{1,0}}
  %send.13 = (bf16[36,8,128]{2,1,0:T(8,128)(2,1)}, u32[], token[]) send(%bitcast.1338, \
%after-all.13), channel_id=4, is_host_transfer=true, frontend_attributes={\
_xla_host_transfer_handler_name="xla_megascale_runtime",\
_xla_host_transfer_rendezvous="all-reduce.119_0",_xla_megascale_reduce_operation="SUM",\
_xla_megascale_target="{1,2}x{0:3}",_xla_megascale_transfer_type="ALL_REDUCE"}
  %recv.13 = (bf16[36,8,128]{2,1,0:T(8,128)(2,1)}, u32[], token[]) recv(%after-all.13), \
channel_id=3, is_host_transfer=true, frontend_attributes={\
_xla_host_transfer_handler_name="xla_megascale_runtime",\
_xla_host_transfer_rendezvous="all-reduce.119_0",_xla_megascale_reduce_operation="SUM",\
_xla_megascale_target="{1,2}x{0:3}",_xla_megascale_transfer_type="ALL_REDUCE"}
}
"""


def test_parse_finds_each_collective_once():
    found = {op.name: op for op in collectives.parse(HLO, SLICES)}
    # all-gather.208 is an async piece of all-gather.206 (same channel); recv.13 pairs send.13
    assert sorted(found) == [
        "all-gather.176_0",
        "all-gather.206",
        "all-reduce.119_0",
        "all-reduce.181",
        "collective-permute.3",
    ]
    gather = found["all-gather.206"]
    assert (gather.kind, gather.groups, gather.bytes, gather.dcn) == (
        "all-gather",
        ((0, 1, 2, 3),),
        128 * 256 * 2,
        False,
    )
    assert gather.in_loop and found["all-reduce.181"].in_loop  # the latter through a fusion
    assert found["all-reduce.181"].groups == ((0, 1), (2, 3))
    assert found["collective-permute.3"].groups == ((0, 1), (1, 0))
    across = found["all-reduce.119_0"]
    assert (across.kind, across.dcn, across.in_loop, across.bytes) == (
        "all-reduce",
        True,
        False,
        36 * 8 * 128 * 2,  # what one chip sends; the u32 and token beside it are not data
    )
    assert across.groups == tuple((100000 + k, 200000 + k) for k in range(4))
    fsdp = found["all-gather.176_0"]
    assert (fsdp.kind, fsdp.dcn, fsdp.in_loop, len(fsdp.groups)) == ("all-gather", True, True, 4)
