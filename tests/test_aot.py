"""maxlm.aot: the real train step compiled for a TPU slice on this CPU machine (libtpu, no TPU)."""

import dataclasses
import json
import os

import pytest
from jax.experimental import mesh_utils

from maxlm import aot, config, mesh as mesh_lib

try:
    import libtpu  # noqa: F401
except ImportError:
    if os.environ.get("CI"):  # CI installs the tpu extra: there this test must run
        raise
    pytest.skip('libtpu is not installed: pip install "maxlm[tpu]"', allow_module_level=True)

# tiny, narrower: compiling the train step for TPU on 2 CPU cores takes seconds per compile
TINY = {
    "model": {"preset": "tiny", "d_model": 128, "mlp_dim": 256, "vocab_size": 1024},
    "mesh": {"data": 1, "fsdp": -1},
    "train": {"global_batch_size": 8, "seq_len": 256},
}


@pytest.fixture(scope="module")
def report():
    return aot.compile_report(config.from_dict(TINY), aot.resolve_target("v5e:2x2"))


def test_tiny_model_fits_a_v5e_slice(report):
    assert (report.devices, report.device_kind, report.mesh) == (
        4,
        "TPU v5 lite",
        {"data": 1, "fsdp": 4, "tensor": 1},
    )
    assert report.cfg.model.dtype == "bfloat16"  # auto resolves as on TPU, not as on this CPU
    memory = report.memory
    for key in ("arguments", "outputs", "temporaries", "generated_code"):
        assert memory[key] > 0, key
    # the state is donated: its new version is written over the old one
    assert memory["aliased"] >= report.state_bytes["params"] + report.state_bytes["optimizer"]
    assert memory["arguments"] >= sum(report.state_bytes.values())
    assert 0 < memory["total"] < report.hbm_bytes
    assert report.fits and report.verdict().startswith("FITS")
    sizes = [size for size, _, _ in report.largest_state]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] > 0
    assert report.largest_buffers  # XLA's memory-usage report was found and read
    table = report.table()
    assert "FITS" in table and "largest HBM buffers" in table and "XLA, whole step" in table


def test_xla_flops_match_the_estimate(report):
    flops = report.flops
    # XLA counts the scanned layers' loop body once; the whole step is several times that.
    assert flops["xla_step"] > 1.5 * flops["xla_counted"]
    # Without remat XLA counts the matmuls the estimate counts, plus elementwise work (norms,
    # softmax, AdamW): measured 1.045 for this narrow model, 1.02 for the tiny preset.
    assert 0.97 < flops["ratio"] < 1.1


def test_too_little_hbm_does_not_fit(report):
    generation = dataclasses.replace(report.target.generation, hbm_gib=0.01)
    small = dataclasses.replace(
        report, target=dataclasses.replace(report.target, generation=generation)
    )
    assert not small.fits
    verdict = small.verdict()
    assert verdict.startswith("DOES NOT FIT") and "temporaries" in verdict
    assert report.largest_state[0][1] in verdict
    assert small.to_json()["fits"] is False


def test_compiler_out_of_memory_exits_1(tmp_path, capsys):
    output = tmp_path / "aot.json"
    argv = [
        "--topology=v5e-4",
        f"--json={output}",
        "--no-flops",
        "model.preset=tiny",
        "mesh.data=1",
        "mesh.fsdp=-1",
        "train.global_batch_size=1024",
        "train.seq_len=4096",
    ]
    assert aot.main(argv) == 1
    out = capsys.readouterr().out
    assert "DOES NOT FIT: RESOURCE_EXHAUSTED" in out and "largest state arrays" in out
    saved = json.loads(output.read_text())
    assert saved["fits"] is False and saved["libtpu_topology"] == "v5e:2x2"


def test_accelerator_types_map_to_topologies():
    expected = {
        "v5p-8": "v5p:2x2x1",  # v4/v5p count TensorCores: 8 cores = 4 chips
        "v4-16": "v4:2x2x2",
        "v5e-16": "v5e:4x4",  # v5e/v6e count chips
        "v5litepod-4": "v5e:2x2",
        "v6e-8": "v6e:2x4",
        "v5e-1": "v5e:1x1",
        "v5e:4x8": "v5e:4x8",
        "v5:2x2x4": "v5p:2x2x4",
    }
    assert {name: aot.resolve_target(name).topology for name in expected} == expected
    assert aot.resolve_target("v5e-1").chips_per_host_bounds == (1, 1, 1)
    assert aot.resolve_target("v5p-16").chips_per_host_bounds == (2, 2, 1)


@pytest.mark.parametrize("name", ["v5p-12", "v7-8", "v5e:2x2x1", "tpu", "v5e-3"])
def test_unknown_topology_is_one_line_exit_2(capsys, name):
    assert aot.main([f"--topology={name}", "model.preset=tiny"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: --topology: unknown TPU slice {name!r}")
    assert "\n" not in err and "v5p-N" in err and "v5e:4x4" in err


def test_missing_libtpu_says_how_to_install(monkeypatch, capsys):
    monkeypatch.setattr(aot, "libtpu_installed", lambda: False)
    assert aot.main(["--topology=v5e-4", "model.preset=tiny"]) == 2
    assert (
        capsys.readouterr().err
        == 'error: compiling for TPU needs libtpu: pip install "maxlm[tpu]"\n'
    )


def test_mesh_that_does_not_divide_the_slice_exits_2(capsys):
    assert aot.main(["--topology=v5e-4", "model.preset=tiny", "mesh.data=1", "mesh.fsdp=3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: mesh: data*fsdp*tensor = 3 but there are 4 devices")


# Multislice: two v5e:2x2 slices joined over DCN (8 chips); compiling takes ~10 s each here.
def two_slices(**mesh: int) -> aot.Report:
    cfg = config.from_dict({**TINY, "mesh": mesh})
    return aot.compile_report(cfg, aot.resolve_target("v5e:2x2", num_slices=2), flops=False)


def test_hybrid_mesh_matches_jax_on_two_slices():
    devices = aot.topology_devices(aot.resolve_target("v5e:2x2", num_slices=2))
    mesh = mesh_lib.make(config.MeshConfig(data=4, fsdp=2, dcn_data=2), devices)
    expected = mesh_utils.create_hybrid_device_mesh(
        (2, 2, 1), (2, 1, 1), devices, allow_split_physical_axes=True
    )
    assert (mesh.devices == expected).all()
    slices = [[d.slice_index for d in row.flat] for row in mesh.devices]
    assert slices == [[0, 0], [0, 0], [1, 1], [1, 1]]  # first half of data in slice 0
    with pytest.warns(UserWarning, match="mesh.dcn_tensor=2: every layer's"):
        mesh_lib.make(config.MeshConfig(data=2, fsdp=2, tensor=2, dcn_tensor=2), devices)


def test_data_parallel_across_slices_only_all_reduces_gradients():
    report = two_slices(data=2, fsdp=-1, dcn_data=2)
    assert report.mesh == {"data": 2, "fsdp": 4, "tensor": 1} and report.fits
    summary = report.collectives
    assert summary is not None and summary.crossing and not summary.unexpected
    assert {(row.kind, row.axes) for row in summary.crossing} == {("all-reduce", ("data",))}
    assert summary.within["all-gather"] > 0  # FSDP gathers stay inside each slice
    table = report.table()
    assert "across slices (DCN)   all-reduce over data: " in table and "WARNING" not in table
    saved = report.to_json()["collectives"]
    assert [row["expected"] for row in saved["crossing_slices"]] == [True]


def test_fsdp_across_slices_is_reported():
    report = two_slices(data=1, fsdp=-1, dcn_fsdp=2)
    summary = report.collectives
    assert summary is not None
    gathers = [row for row in summary.unexpected if row.kind == "all-gather"]
    assert gathers and gathers[0].axes == ("fsdp",) and gathers[0].loop_bytes > 0
    assert "WARNING: all-gather over fsdp crosses slices" in report.table()


def test_slices_without_dcn_config_exit_2(capsys):
    argv = ["--topology=v5e-4", "--num-slices=2", "--no-flops", "model.preset=tiny"]
    assert aot.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: mesh: dcn_data*dcn_fsdp*dcn_tensor = 1 but the devices are in 2")
    assert "mesh.dcn_data=2" in err
