"""Config schema: loading, overrides, presets, validation errors, reference page."""

import subprocess
import sys
from pathlib import Path

import pytest

from maxlm import config
from maxlm.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_validate():
    cfg = config.load()
    assert cfg.train.steps == 1000
    assert cfg.mesh.shape == {"data": -1, "fsdp": 1, "tensor": 1}
    assert cfg.model.kv_heads == cfg.model.num_heads
    assert cfg.warmup_steps == 50


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  steps: 20\noptim:\n  lr: 1e-4\n  optimizer: {kind: lion}\n")
    cfg = config.load(str(path), ["train.seq_len=64", "optim.optimizer.b2=0.98", "run.dir=/tmp/x"])
    assert cfg.train.steps == 20
    assert cfg.optim.lr == pytest.approx(1e-4)  # PyYAML alone would read "1e-4" as a string
    assert cfg.optim.optimizer.kind == "lion"
    assert cfg.optim.optimizer.b2 == 0.98
    assert cfg.train.seq_len == 64
    assert cfg.run.dir == "/tmp/x"


def test_base_include(tmp_path):
    (tmp_path / "base.yaml").write_text("train: {steps: 30, seq_len: 32}\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\ntrain: {steps: 40}\n")
    cfg = config.load(str(tmp_path / "child.yaml"))
    assert (cfg.train.steps, cfg.train.seq_len) == (40, 32)


def test_preset_with_field_override():
    cfg = config.load(None, ["model.preset=tiny", "model.num_layers=2"])
    assert (cfg.model.d_model, cfg.model.num_layers, cfg.model.mlp_dim) == (256, 2, 688)


def test_every_shipped_config_loads():
    shipped = sorted((ROOT / "configs").glob("*.yaml"))
    assert shipped, "configs/ has no recipes"
    for path in shipped:
        config.load(str(path))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["trian.steps=3"], "trian: unknown key; did you mean 'train'?"),
        (["train.stpes=3"], "train.stpes: unknown key; did you mean 'train.steps'?"),
        (
            ["optim.optimizer.b3=1"],
            "optim.optimizer.b3: unknown key; did you mean 'optim.optimizer.b2'?",
        ),
        (["train.steps=abc"], "train.steps: Input should be a valid integer"),
        (["optim.lr=0"], "optim.lr: Input should be greater than 0"),
        (["optim.lr=-1e-3"], "optim.lr: Input should be greater than 0"),
        (
            ["optim.schedule.warmup_steps=2000"],
            "optim.schedule.warmup_steps: 2000 exceeds train.steps",
        ),
        (["model.num_heads=6", "model.num_kv_heads=4", "model.d_model=384"], "model.num_kv_heads:"),
        (["model.head_dim=33"], "model.head_dim: 33 must be even for RoPE"),
        (
            ["model.preset=llama2_7b"],
            "model.preset: unknown preset 'llama2_7b' (did you mean 'llama2-7b'?)",
        ),
        (["mesh.data=-1", "mesh.fsdp=-1"], "mesh: at most one axis may be -1"),
        (
            ["mesh.rules.kvheads=null"],
            "mesh.rules.kvheads: unknown logical axis; did you mean 'kv_heads'?",
        ),
        (
            ["data.tokenizer.kind=huggingface"],
            "data.tokenizer.path: tokenizer kind 'huggingface' needs a path",
        ),
        (["train.global_batch_size=6", "train.grad_accum_steps=4"], "train.grad_accum_steps:"),
        (["no_equals_sign"], "override 'no_equals_sign': expected key.sub=value"),
    ],
)
def test_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as err:
        config.load(None, overrides)
    assert str(err.value).startswith(message), str(err.value)
    assert "\n" not in str(err.value)


def test_missing_file():
    with pytest.raises(ConfigError, match=r"--config: file not found: nope\.yaml"):
        config.load("nope.yaml")


def test_cli_exit_code_and_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "maxlm.train", "--config=configs/demo.yaml", "train.stepz=3"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == "error: train.stepz: unknown key; did you mean 'train.steps'?"


def test_reference_page_is_current():
    generated = config.reference_markdown()
    committed = (ROOT / "docs" / "config.md").read_text()
    assert committed == generated, "regenerate: python -m maxlm.config --markdown > docs/config.md"
    for field in (
        "train.global_batch_size",
        "model.rope_theta",
        "optim.schedule.decay_shape",
        "optim.optimizer.eps",
        "mesh.rules",
    ):
        assert f"`{field}`" in generated


def test_resolved_config_round_trips(tmp_path):
    cfg = config.load(None, ["train.steps=7", "model.preset=tiny"])
    path = tmp_path / "resolved.yaml"
    path.write_text(cfg.to_yaml())
    assert config.load(str(path)) == cfg
