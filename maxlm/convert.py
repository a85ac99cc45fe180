"""`python -m maxlm.convert`: Hugging Face LLaMA checkpoints <-> maxlm, one tensor at a time.

maxlm's parameters mirror LlamaForCausalLM's names, and its RoPE uses Hugging Face's
rotate-half layout, so Hugging Face weights convert by transposing and reshaping: the table
`LAYOUT` says how. Meta's original checkpoints (params.json, consolidated.NN.pth) use the
interleaved RoPE layout; `MetaFolder` reads them into Hugging Face's names and layout, with
`rope_permute` reordering the q/k projections.

A converted model is a directory `maxlm.checkpoint.open_model` reads and `checkpoint.init_from`
accepts: `state/` (orbax, the parameters), `config.yaml` (the model section and tokenizer),
the tokenizer file, and `hf/` (the source's config and tokenizer side files, so the way back
restores them). Reading safetensors needs no PyTorch.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import safetensors
import safetensors.numpy
import yaml

from maxlm import cli, state as state_lib
from maxlm.checkpoint import CONFIG_FILE, open_model, tokenizer_filename
from maxlm.config import ConfigError, ModelConfig, RopeScalingConfig
from maxlm.data.tokenizer import Tokenizer, read_tokenizer

HF_SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")  # the first one present is used
# model.* keys that are choices of a training run, not properties of the weights
TRAINING_CHOICES = {"preset", "dropout", "init_std", "param_dtype", "dtype", "scan_layers", "remat",
                    "attention"}  # fmt: skip
DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


class ConversionError(ValueError):
    """The input is not a convertible LLaMA checkpoint; the message names the file or tensor."""


@dataclasses.dataclass(frozen=True)
class Weight:
    """One maxlm parameter and its Hugging Face tensor: `hf` has `{i}` for per-layer tensors
    (stacked on maxlm's leading layer axis); `inputs` is the number of leading input axes of
    a maxlm kernel (a torch Linear stores (out, in): transposed and flattened), 0 for tables
    and norm scales, which are copied."""

    path: tuple[str, ...]
    hf: str
    inputs: int

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.hf


def _layer(*path: str, inputs: int) -> Weight:
    """A decoder-layer weight: HF's name is the maxlm path with `.weight` for its last part."""
    return Weight(("layers", *path), "model.layers.{i}." + ".".join(path[:-1]) + ".weight", inputs)


LAYOUT = (
    Weight(("embed_tokens", "embedding"), "model.embed_tokens.weight", 0),
    _layer("input_layernorm", "scale", inputs=0),
    _layer("self_attn", "q_proj", "kernel", inputs=1),
    _layer("self_attn", "k_proj", "kernel", inputs=1),
    _layer("self_attn", "v_proj", "kernel", inputs=1),
    _layer("self_attn", "o_proj", "kernel", inputs=2),
    _layer("post_attention_layernorm", "scale", inputs=0),
    _layer("mlp", "gate_proj", "kernel", inputs=1),
    _layer("mlp", "up_proj", "kernel", inputs=1),
    _layer("mlp", "down_proj", "kernel", inputs=1),
    Weight(("norm", "scale"), "model.norm.weight", 0),
    Weight(("lm_head", "kernel"), "lm_head.weight", 1),
)
# tensors some checkpoints carry that hold nothing to convert (recomputed from the config)
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def to_hf(kernel: np.ndarray, inputs: int) -> np.ndarray:
    """A maxlm kernel (in axes..., out axes...) as a torch Linear weight (out, in)."""
    if inputs == 0:
        return kernel
    fan_in = math.prod(kernel.shape[:inputs])
    return np.ascontiguousarray(kernel.reshape(fan_in, -1).T)


def from_hf(weight: np.ndarray, shape: tuple[int, ...], inputs: int) -> np.ndarray:
    """A torch Linear weight (out, in), or a table / scale, as the maxlm array of `shape`."""
    return weight.reshape(shape) if inputs == 0 else weight.T.reshape(shape)


def rope_permute(weight: np.ndarray, num_heads: int, *, to_half: bool = True) -> np.ndarray:
    """Reorder a q/k projection (heads*head_dim, in) between Meta's interleaved RoPE layout
    (pairs (2j, 2j+1)) and Hugging Face's rotate-half layout (pairs (j, j + head_dim/2))."""
    out_dim, fan_in = weight.shape
    head_dim = out_dim // num_heads
    if to_half:
        per_head = weight.reshape(num_heads, head_dim // 2, 2, fan_in).swapaxes(1, 2)
    else:
        per_head = weight.reshape(num_heads, 2, head_dim // 2, fan_in).swapaxes(1, 2)
    return np.ascontiguousarray(per_head.reshape(out_dim, fan_in))


# --------------------------------------------------------------------------- Hugging Face configs


def model_config_from_hf(hf: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """maxlm's ModelConfig for a Hugging Face LLaMA config.json (transformers 4.x or 5.x)."""
    architectures = hf.get("architectures") or []
    if hf.get("model_type") != "llama" or (
        architectures and "LlamaForCausalLM" not in architectures
    ):
        raise ConversionError(
            f"{source}: model_type {hf.get('model_type')!r}, architectures {architectures}: "
            "only LLaMA (LlamaForCausalLM) checkpoints convert"
        )
    for key, expected in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
        if hf.get(key, expected) != expected:
            raise ConversionError(
                f"{source}: {key} = {hf[key]!r}; maxlm's LLaMA has {key} = {expected!r}"
            )
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    try:
        return ModelConfig(
            vocab_size=hf["vocab_size"],
            d_model=hf["hidden_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=None if head_dim * heads == hf["hidden_size"] else head_dim,
            mlp_dim=hf["intermediate_size"],
            rope_theta=theta,
            rope_scaling=RopeScalingConfig(**_rope_scaling_from_hf(rope, source)),
            norm_eps=hf.get("rms_norm_eps", 1e-6),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        )
    except KeyError as err:
        raise ConversionError(f"{source}: missing key {err}") from None


def _rope_scaling_from_hf(rope: dict[str, Any], source: str) -> dict[str, Any]:
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        return {"kind": "none"}
    if kind == "linear":
        return {"kind": "linear", "factor": rope["factor"]}
    if kind == "llama3":
        return {
            "kind": "llama3",
            "factor": rope["factor"],
            "low_freq_factor": rope["low_freq_factor"],
            "high_freq_factor": rope["high_freq_factor"],
            "original_max_position": rope["original_max_position_embeddings"],
        }
    raise ConversionError(
        f"{source}: RoPE scaling {kind!r} is not supported (maxlm has default, linear, llama3)"
    )


def hf_config_from_model(
    cfg: ModelConfig, base: dict[str, Any] | None, *, dtype: str, max_positions: int
) -> dict[str, Any]:
    """A config.json for `cfg`: `base` (the converted source's) updated, or a fresh one. Both
    transformers 4.x (rope_theta, rope_scaling) and 5.x (rope_parameters) read it."""
    scaling = cfg.rope_scaling
    rope: dict[str, Any] = {"rope_type": "default"}
    if scaling.kind == "linear":
        rope = {"rope_type": "linear", "factor": scaling.factor}
    elif scaling.kind == "llama3":
        rope = {
            "rope_type": "llama3",
            "factor": scaling.factor,
            "low_freq_factor": scaling.low_freq_factor,
            "high_freq_factor": scaling.high_freq_factor,
            "original_max_position_embeddings": scaling.original_max_position,
        }
    config = dict(base or {"max_position_embeddings": max_positions})
    for stale in ("rope_parameters", "rope_scaling", "torch_dtype", "dtype"):
        config.pop(stale, None)
    config.update(
        architectures=["LlamaForCausalLM"],
        model_type="llama",
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.mlp_dim,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.head_size,
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
        rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta,
        rope_scaling=None if scaling.kind == "none" else rope,
        tie_word_embeddings=cfg.tie_embeddings,
        torch_dtype=dtype,
    )
    return config


# --------------------------------------------------------------------------- reading HF folders


class SafetensorsFolder:
    """The tensors of a Hugging Face folder (one model.safetensors, or shards with an index);
    every shard file is checked to exist up front."""

    def __init__(self, folder: Path) -> None:
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        elif (folder / "model.safetensors").is_file():
            with safetensors.safe_open(folder / "model.safetensors", "flax") as single:
                weight_map = dict.fromkeys(single.keys(), "model.safetensors")
        else:
            raise ConversionError(
                f"{folder}: no model.safetensors or model.safetensors.index.json (only "
                "safetensors checkpoints convert; re-save .bin ones with save_pretrained)"
            )
        for shard in self.shards(weight_map):
            if not (folder / shard).is_file():
                names = [n for n, s in weight_map.items() if s == shard]
                raise ConversionError(
                    f"{folder / shard}: shard missing (it holds {len(names)} tensors, e.g. "
                    f"{names[0]})"
                )
        self.folder = folder
        self.weight_map = weight_map

    @staticmethod
    def shards(weight_map: dict[str, str]) -> list[str]:
        return sorted(set(weight_map.values()))

    def by_shard(self) -> Iterator[tuple[str, np.ndarray]]:
        """Every (name, tensor), one shard open at a time: a shard's mapped pages are released
        before the next is read, so the source never sits in memory whole."""
        for shard in self.shards(self.weight_map):
            with safetensors.safe_open(self.folder / shard, "flax") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    # through jax: numpy alone cannot read bfloat16 safetensors
                    yield name, np.asarray(f.get_tensor(name))


def load_hf(folder: str | Path, dtype: str = "float32") -> tuple[ModelConfig, dict[str, Any]]:
    """A Hugging Face LLaMA folder's ModelConfig and parameters (a pure dict of numpy arrays in
    `dtype`, shaped like maxlm's), read tensor by tensor: one copy of the weights in memory."""
    folder = Path(folder)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ConversionError(f"{folder}: no config.json (not a Hugging Face model folder)")
    cfg = model_config_from_hf(json.loads(config_file.read_text()), str(config_file))
    tensors = SafetensorsFolder(folder)
    return cfg, params_from_hf(folder, list(tensors.weight_map), tensors.by_shard(), cfg, dtype)


def params_from_hf(
    folder: Path,
    names: list[str],
    tensors: Iterator[tuple[str, np.ndarray]],
    cfg: ModelConfig,
    dtype: str,
) -> dict[str, Any]:
    """maxlm parameters from (name, tensor) pairs in Hugging Face's names and layout; missing,
    misshapen and unknown tensors are errors naming the tensor (`names` are checked before
    any tensor is read)."""
    expected = state_lib.abstract_params(cfg)
    params: dict[str, Any] = {}
    # HF name -> (maxlm array, layer index or None, inputs)
    targets: dict[str, tuple[np.ndarray, int | None, int]] = {}
    for weight in LAYOUT:
        if weight.path[0] == "lm_head" and cfg.tie_embeddings:
            continue
        array = np.empty(_lookup(expected, weight.path).shape, DTYPES[dtype])
        _insert(params, weight.path, array)
        for i in range(cfg.num_layers) if weight.per_layer else [None]:
            targets[weight.hf.format(i=i)] = (array, i, weight.inputs)
    missing = [name for name in targets if name not in names]
    if missing:
        raise ConversionError(f"{folder}: tensor {missing[0]} is missing")
    extra = set() if not cfg.tie_embeddings else {"lm_head.weight"}  # tied: a stored copy
    unknown = [
        name
        for name in names
        if name not in targets and name not in extra and not name.endswith(IGNORED_SUFFIXES)
    ]
    if unknown:
        raise ConversionError(
            f"{folder}: tensor {unknown[0]} is not part of a LLaMA model of this config "
            f"({len(unknown)} such tensors; num_hidden_layers = {cfg.num_layers})"
        )
    for name, tensor in tensors:
        if name not in targets:
            continue
        array, layer, inputs = targets[name]
        shape = array.shape if layer is None else array.shape[1:]
        hf_shape = to_hf(np.empty(shape, np.int8), inputs).shape
        if tensor.shape != hf_shape:
            raise ConversionError(
                f"{folder}: tensor {name} has shape {tuple(tensor.shape)}, the config "
                f"needs {tuple(hf_shape)}"
            )
        if layer is None:
            array[...] = from_hf(tensor, shape, inputs)
        else:
            array[layer] = from_hf(tensor, shape, inputs)
    return params


# --------------------------------------------------------------------------- Meta's folders

META_NAMES = {  # Meta's llama repo name -> Hugging Face name, and the model-parallel concat axis
    "tok_embeddings.weight": ("model.embed_tokens.weight", None),  # axis from the shapes
    "norm.weight": ("model.norm.weight", -1),  # -1: replicated in every shard
    "output.weight": ("lm_head.weight", 0),
    "layers.{i}.attention.wq.weight": ("model.layers.{i}.self_attn.q_proj.weight", 0),
    "layers.{i}.attention.wk.weight": ("model.layers.{i}.self_attn.k_proj.weight", 0),
    "layers.{i}.attention.wv.weight": ("model.layers.{i}.self_attn.v_proj.weight", 0),
    "layers.{i}.attention.wo.weight": ("model.layers.{i}.self_attn.o_proj.weight", 1),
    "layers.{i}.feed_forward.w1.weight": ("model.layers.{i}.mlp.gate_proj.weight", 0),
    "layers.{i}.feed_forward.w2.weight": ("model.layers.{i}.mlp.down_proj.weight", 1),
    "layers.{i}.feed_forward.w3.weight": ("model.layers.{i}.mlp.up_proj.weight", 0),
    "layers.{i}.attention_norm.weight": ("model.layers.{i}.input_layernorm.weight", -1),
    "layers.{i}.ffn_norm.weight": ("model.layers.{i}.post_attention_layernorm.weight", -1),
}
META_IGNORED = ("rope.freqs",)
# LLaMA 3.1's `use_scaled_rope` constants (Meta's llama-models apply_scaling)
META_SCALED_ROPE = {"kind": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0, "original_max_position": 8192}  # fmt: skip


def model_config_from_meta(params: dict[str, Any], vocab_size: int, source: str) -> ModelConfig:
    """ModelConfig for Meta's params.json (LLaMA 1/2/3); the MLP size follows Meta's rule."""
    try:
        dim, multiple_of = params["dim"], params["multiple_of"]
        hidden = int(2 * 4 * dim / 3)
        if params.get("ffn_dim_multiplier"):
            hidden = int(params["ffn_dim_multiplier"] * hidden)
        return ModelConfig(
            vocab_size=vocab_size,
            d_model=dim,
            num_layers=params["n_layers"],
            num_heads=params["n_heads"],
            num_kv_heads=params.get("n_kv_heads") or params["n_heads"],
            mlp_dim=multiple_of * ((hidden + multiple_of - 1) // multiple_of),
            rope_theta=params.get("rope_theta", 10000.0),
            rope_scaling=RopeScalingConfig(
                **(META_SCALED_ROPE if params.get("use_scaled_rope") else {"kind": "none"})
            ),
            norm_eps=params.get("norm_eps", 1e-5),
        )
    except KeyError as err:
        raise ConversionError(f"{source}: missing key {err}") from None


class MetaFolder:
    """Meta's original checkpoint folder: params.json and consolidated.NN.pth model-parallel
    shards (read with PyTorch, memory-mapped), yielded in Hugging Face's names and layout: the
    shards concatenated and q/k rows permuted from interleaved to rotate-half RoPE."""

    def __init__(self, folder: Path) -> None:
        try:
            import torch
        except ImportError:
            raise ConversionError(
                f"{folder}: reading Meta's .pth checkpoints needs PyTorch (pip install torch); "
                "Hugging Face safetensors folders do not"
            ) from None
        self.folder = folder
        self.files = sorted(folder.glob("consolidated.*.pth"))
        self.shards = [
            torch.load(f, map_location="cpu", mmap=True, weights_only=True) for f in self.files
        ]
        params = json.loads((folder / "params.json").read_text())
        vocab = params.get("vocab_size", -1)
        if vocab <= 0:  # LLaMA 1/2 leave it to the tokenizer; the table's rows tell
            vocab = self.shards[0]["tok_embeddings.weight"].shape[0]
        self.config = model_config_from_meta(params, vocab, str(folder / "params.json"))
        self.hf_names: dict[str, str] = {}
        for name in self.shards[0]:
            if name.startswith(META_IGNORED):
                continue
            generic = ".".join("{i}" if part.isdigit() else part for part in name.split("."))
            layer = next((p for p in name.split(".") if p.isdigit()), None)
            if generic not in META_NAMES:
                raise ConversionError(f"{self.files[0]}: tensor {name} is not a LLaMA weight")
            self.hf_names[name] = META_NAMES[generic][0].format(i=layer)

    def tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        for name, hf_name in self.hf_names.items():
            generic = ".".join("{i}" if part.isdigit() else part for part in name.split("."))
            axis = META_NAMES[generic][1]
            parts = [shard[name] for shard in self.shards]
            if axis is None:  # LLaMA 1/2 split the embedding on D, LLaMA 3 on the vocabulary
                axis = 1 if parts[0].shape[1] != self.config.d_model else 0
            if axis == -1:
                parts = parts[:1]
            # float32 holds bfloat16 exactly; numpy has no bfloat16 for torch to hand over
            weight = np.concatenate([p.float().numpy() for p in parts], max(axis, 0))
            if hf_name.endswith("q_proj.weight"):
                weight = rope_permute(weight, self.config.num_heads)
            elif hf_name.endswith("k_proj.weight"):
                weight = rope_permute(weight, self.config.kv_heads)
            yield hf_name, weight


def _lookup(tree: dict[str, Any], path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def _insert(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


# --------------------------------------------------------------------------- the two directions


def hf_to_maxlm(hf_dir: str | Path, out_dir: str | Path, *, dtype: str = "float32") -> Path:
    """Convert a Hugging Face LLaMA folder, or Meta's original one, into a maxlm model
    directory (see the module doc)."""
    hf_dir, out = Path(hf_dir), Path(out_dir).absolute()
    if (out / "state").exists():
        raise ConversionError(f"{out}: already holds a converted model (state/ exists)")
    tokenizer_file = next((hf_dir / n for n in TOKENIZER_FILES if (hf_dir / n).is_file()), None)
    if (hf_dir / "params.json").is_file() and not (hf_dir / "config.json").is_file():
        meta = MetaFolder(hf_dir)
        cfg = meta.config
        params = params_from_hf(hf_dir, list(meta.hf_names.values()), meta.tensors(), cfg, dtype)
        if tokenizer_file is not None and not _is_sentencepiece(tokenizer_file):
            tokenizer_file = None  # LLaMA 3's tiktoken file: give a tokenizer.json separately
    else:
        cfg, params = load_hf(hf_dir, dtype)
    out.mkdir(parents=True, exist_ok=True)
    model = cfg.model_dump(mode="json", exclude=TRAINING_CHOICES) | {"param_dtype": dtype}
    config: dict[str, Any] = {"model": model}
    if tokenizer_file is not None:
        shutil.copyfile(tokenizer_file, out / tokenizer_file.name)
        kind = "huggingface" if tokenizer_file.suffix == ".json" else "sentencepiece"
        config["data"] = {"tokenizer": {"kind": kind, "path": str(out / tokenizer_file.name)}}
    side = out / "hf"
    side.mkdir(exist_ok=True)
    for name in HF_SIDE_FILES:
        if (hf_dir / name).is_file():
            shutil.copyfile(hf_dir / name, side / name)
    # orbax deep-copies numpy arrays by default (for async saves): a second copy of the model
    no_copy = ocp.type_handlers.create_type_handler_registry(
        (np.ndarray, ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False))
    )
    checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(type_handler_registry=no_copy))
    checkpointer.save(out / "state", {"params": params})
    (out / CONFIG_FILE).write_text(
        f"# converted from {hf_dir.absolute()} by python -m maxlm.convert\n"
        + yaml.safe_dump(config, sort_keys=False)
    )
    return out


def _is_sentencepiece(path: Path) -> bool:
    try:
        read_tokenizer(path)
    except Exception:  # sentencepiece raises RuntimeError, protobuf DecodeError...
        return False
    return True


def maxlm_to_hf(
    checkpoint: str | Path,
    out_dir: str | Path,
    *,
    dtype: str | None = None,
    max_shard_bytes: int = 5 * 2**30,
) -> Path:
    """Write the model at `checkpoint` (run dir, step dir or converted model) as a Hugging Face
    folder `LlamaForCausalLM.from_pretrained` loads: config.json, safetensors shards with an
    index, tokenizer files. `dtype` defaults to the converted source's, else float32."""
    out = Path(out_dir)
    if list(out.glob("*.safetensors")):
        raise ConversionError(f"{out}: already holds safetensors files; give an empty folder")
    saved = open_model(checkpoint)
    side = saved.directory / "hf"
    base = (
        json.loads((side / "config.json").read_text()) if (side / "config.json").is_file() else None
    )
    dtype = dtype or ((base or {}).get("torch_dtype") or (base or {}).get("dtype") or "float32")
    if dtype not in DTYPES:
        raise ConversionError(f"--dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
    cfg = saved.config.model
    params = saved.params()
    out.mkdir(parents=True, exist_ok=True)
    _write_shards(_hf_tensors(params, cfg, dtype), out, max_shard_bytes)
    config = hf_config_from_model(cfg, base, dtype=dtype, max_positions=saved.config.train.seq_len)
    try:
        tokenizer = saved.tokenizer()
    except ConfigError:  # weights without a tokenizer (e.g. converted from a folder without one)
        tokenizer = None
    if tokenizer is not None:
        if tokenizer.bos_id is not None:
            config["bos_token_id"] = tokenizer.bos_id
        if tokenizer.eos_id is not None:
            config["eos_token_id"] = tokenizer.eos_id
        _write_tokenizer(tokenizer, side, out, config)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def _hf_tensors(
    params: dict[str, Any], cfg: ModelConfig, dtype: str
) -> Iterator[tuple[str, np.ndarray]]:
    """(name, tensor) in Hugging Face's layout, produced one at a time."""
    for weight in LAYOUT:
        if weight.path[0] == "lm_head" and cfg.tie_embeddings:
            continue
        array = _lookup(params, weight.path)
        for i in range(cfg.num_layers) if weight.per_layer else [None]:
            part = np.asarray(array[i] if i is not None else array)
            name = weight.hf.format(i=i) if i is not None else weight.hf
            yield name, to_hf(part, weight.inputs).astype(DTYPES[dtype])


def _write_shards(
    tensors: Iterator[tuple[str, np.ndarray]], out: Path, max_shard_bytes: int
) -> None:
    """Safetensors shards of at most `max_shard_bytes` (a bigger tensor gets its own) and the
    index; each shard is written as soon as it is full, so only one is held in memory."""
    shard: dict[str, np.ndarray] = {}
    shard_bytes, total = 0, 0
    written: list[tuple[str, list[str]]] = []
    weight_map: dict[str, str] = {}

    def flush() -> None:
        nonlocal shard, shard_bytes
        name = f"shard-{len(written):05d}.safetensors"
        safetensors.numpy.save_file(shard, str(out / name), metadata={"format": "pt"})
        written.append((name, list(shard)))
        shard, shard_bytes = {}, 0

    for name, tensor in tensors:
        if shard and shard_bytes + tensor.nbytes > max_shard_bytes:
            flush()
        shard[name] = tensor
        shard_bytes += tensor.nbytes
        total += tensor.nbytes
    if shard:
        flush()
    for i, (temporary, names) in enumerate(written):
        final = f"model-{i + 1:05d}-of-{len(written):05d}.safetensors"
        (out / temporary).rename(out / final)
        weight_map.update(dict.fromkeys(names, final))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _write_tokenizer(tokenizer: Tokenizer, side: Path, out: Path, config: dict[str, Any]) -> None:
    """The tokenizer file under its Hugging Face name, with the source's side files (or a
    tokenizer_config.json naming the fast tokenizer class and the special tokens)."""
    name = tokenizer_filename(tokenizer)
    (out / name).write_bytes(tokenizer.data)
    copied = False
    for side_file in HF_SIDE_FILES[1:]:
        if (side / side_file).is_file():
            shutil.copyfile(side / side_file, out / side_file)
            copied = True
    if copied:
        return
    special = {}
    for key, token_id in (("bos_token", tokenizer.bos_id), ("eos_token", tokenizer.eos_id)):
        if token_id is not None:
            special[key] = tokenizer.decode([token_id])
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast"
        if name == "tokenizer.json"
        else "LlamaTokenizer",
        "model_max_length": config.get("max_position_embeddings", 2048),
        "add_bos_token": False,
        **special,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")


# --------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    parser = cli.Parser(
        prog="python -m maxlm.convert",
        description="Convert LLaMA checkpoints between Hugging Face folders and maxlm.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    to_maxlm = commands.add_parser("hf-to-maxlm", help="a Hugging Face (or Meta) folder -> maxlm")
    to_maxlm.add_argument("hf_dir", help="folder with config.json and safetensors")
    to_maxlm.add_argument("out_dir", help="the maxlm model directory to create")
    to_maxlm.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                          help="parameter dtype in maxlm (default float32)")  # fmt: skip
    to_hf = commands.add_parser("maxlm-to-hf", help="a maxlm checkpoint -> a Hugging Face folder")
    to_hf.add_argument("checkpoint", help="a run dir, <run>/checkpoints/<step> or converted model")
    to_hf.add_argument("out_dir", help="the Hugging Face folder to write")
    to_hf.add_argument("--dtype", choices=list(DTYPES), default=None,
                       help="tensor dtype (default: the source's, else float32)")  # fmt: skip
    to_hf.add_argument("--max-shard-mb", type=int, default=5120, help="safetensors shard size")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
        if args.command == "hf-to-maxlm":
            out = hf_to_maxlm(args.hf_dir, args.out_dir, dtype=args.dtype)
            print(f"wrote {out}: train from it with checkpoint.init_from={out}")
        else:
            out = maxlm_to_hf(
                args.checkpoint, args.out_dir, dtype=args.dtype,
                max_shard_bytes=args.max_shard_mb * 2**20,
            )  # fmt: skip
            print(f"wrote {out}: LlamaForCausalLM.from_pretrained({str(out)!r})")
    except (cli.UsageError, ConversionError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
