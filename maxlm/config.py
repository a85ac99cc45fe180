"""Typed run configuration: schema, YAML loading, dotted overrides, validation.

Every key, its default and its one-line description live here and nowhere else;
`python -m maxlm.config --markdown` renders docs/config.md from this schema.
"""

from __future__ import annotations

import difflib
import itertools
import re
import sys
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import to_jsonable_python


class ConfigError(ValueError):
    """A bad configuration: one line naming the offending key or file (exit code 2)."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


def _field(default: Any, description: str, **constraints: Any) -> Any:
    return Field(default, description=description, **constraints)


# --------------------------------------------------------------------------- run


class RunConfig(Section):
    dir: str = _field(
        "runs/default", "Run directory: resolved config, metrics, checkpoints; local or gs://."
    )
    seed: int = _field(0, "Seed for parameter init, data shuffling and dropout.")


MESH_AXES = ("data", "fsdp", "tensor")

# Weights carry (vocab, embed, q_heads, kv_heads, head_dim, mlp, layers, norm); activations carry
# act_* names so FSDP can shard weights on embed without sharding activations the same way.
DEFAULT_SHARDING_RULES: dict[str, str | list[str] | None] = {
    "vocab": "tensor",
    "embed": "fsdp",
    "q_heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "layers": None,
    "norm": None,
    "act_batch": ["data", "fsdp"],
    "act_seq": None,
    "act_embed": None,
    "act_heads": "tensor",
    "act_kv_heads": "tensor",
    "act_head_dim": None,
    "act_mlp": "tensor",
    "act_vocab": "tensor",
}


class MeshConfig(Section):
    # Axis sizes are global (all slices together), so a config keeps its meaning and its -1
    # when slices are added; dcn_* only say how each axis is split across slices.
    data: int = _field(
        -1, "Pure data-parallel axis size, all slices together (-1: all remaining devices).", ge=-1
    )
    fsdp: int = _field(
        1, "Fully-sharded data-parallel axis size, all slices together (-1: all remaining).", ge=-1
    )
    tensor: int = _field(
        1, "Tensor-parallel axis size, all slices together (-1: all remaining devices).", ge=-1
    )
    dcn_data: int = _field(
        1, "Multislice: slices the data axis spans (must divide it; the usual choice).", ge=1
    )
    dcn_fsdp: int = _field(
        1, "Multislice: slices the fsdp axis spans (its weight all-gathers then cross DCN).", ge=1
    )
    dcn_tensor: int = _field(
        1, "Multislice: slices the tensor axis spans (each layer's all-reduces cross DCN).", ge=1
    )
    rules: dict[str, str | list[str] | None] = _field(
        DEFAULT_SHARDING_RULES,
        "Logical axis name -> mesh axis (or list of axes, or null = replicated); "
        "set one entry to override it, e.g. mesh.rules.kv_heads=null.",
    )

    @field_validator("rules", mode="before")
    @classmethod
    def _override_defaults(cls, rules: Any) -> Any:
        return {**DEFAULT_SHARDING_RULES, **rules} if isinstance(rules, dict) else rules

    @model_validator(mode="after")
    def _one_auto_axis(self) -> MeshConfig:
        sizes = {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor}
        if 0 in sizes.values():
            raise ValueError(f"sizes must be positive or -1, got {sizes}")
        if list(sizes.values()).count(-1) > 1:
            raise ValueError(f"at most one axis may be -1, got {sizes}")
        for axis, slices in self.dcn_shape.items():
            if sizes[axis] != -1 and sizes[axis] % slices:
                split = f"{axis}={sizes[axis]} does not split into {slices} slices"
                raise ValueError(f"dcn_{axis}: {split}")
        for name, axes in self.rules.items():
            if name not in DEFAULT_SHARDING_RULES:
                close = difflib.get_close_matches(name, list(DEFAULT_SHARDING_RULES), n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ValueError(f"rules.{name}: unknown logical axis{hint}")
            named = [axes] if isinstance(axes, str) else list(axes or [])
            if any(axis not in MESH_AXES for axis in named):
                raise ValueError(f"rules.{name}: {axes!r} is not among mesh axes {MESH_AXES}")
        return self

    @property
    def shape(self) -> dict[str, int]:
        return {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor}

    @property
    def dcn_shape(self) -> dict[str, int]:
        """Slices along each mesh axis: the outer factor of its global size."""
        return {"data": self.dcn_data, "fsdp": self.dcn_fsdp, "tensor": self.dcn_tensor}

    @property
    def num_slices(self) -> int:
        return self.dcn_data * self.dcn_fsdp * self.dcn_tensor


class DistributedConfig(Section):
    enabled: Literal["auto", "on", "off"] = _field(
        "auto",
        "Call jax.distributed.initialize: auto = when a coordinator is configured, on a TPU "
        "pod, or in a SLURM job of several tasks.",
    )
    coordinator_address: str | None = _field(None, "host:port of process 0 (multi-process runs).")
    num_processes: int | None = _field(None, "Number of processes in the job.", ge=1)
    process_id: int | None = _field(None, "This process's index in [0, num_processes).", ge=0)


# --------------------------------------------------------------------------- model


class RopeScalingConfig(Section):
    kind: Literal["none", "linear", "llama3"] = _field(
        "none", "RoPE frequency scaling: none, linear (position interpolation) or llama3."
    )
    factor: float = _field(1.0, "Context extension factor.", gt=0)
    low_freq_factor: float = _field(1.0, "llama3 scaling: low-frequency factor.", gt=0)
    high_freq_factor: float = _field(4.0, "llama3 scaling: high-frequency factor.", gt=0)
    original_max_position: int = _field(8192, "llama3 scaling: original context length.", gt=0)

    @model_validator(mode="after")
    def _distinct_factors(self) -> RopeScalingConfig:
        if self.kind == "llama3" and self.high_freq_factor <= self.low_freq_factor:
            raise ValueError(
                f"high_freq_factor: {self.high_freq_factor} must exceed low_freq_factor "
                f"({self.low_freq_factor}) for llama3 scaling"
            )
        return self


class ModelConfig(Section):
    preset: str | None = _field(
        None, "Named shape from configs/models/ (e.g. llama2-7b); other model.* keys override it."
    )
    vocab_size: int = _field(8192, "Vocabulary size (embedding rows).", gt=0)
    d_model: int = _field(256, "Hidden size.", gt=0)
    num_layers: int = _field(4, "Number of decoder blocks.", gt=0)
    num_heads: int = _field(4, "Query heads.", gt=0)
    num_kv_heads: int | None = _field(
        None, "Key/value heads for grouped-query attention (default: num_heads)."
    )
    head_dim: int | None = _field(None, "Per-head size (default: d_model // num_heads).")
    mlp_dim: int = _field(688, "SwiGLU hidden size.", gt=0)
    rope_theta: float = _field(10000.0, "RoPE base.", gt=0)
    rope_scaling: RopeScalingConfig = _field(RopeScalingConfig(), "RoPE scaling for long context.")
    norm_eps: float = _field(1e-5, "RMSNorm epsilon.", gt=0)
    tie_embeddings: bool = _field(False, "Share the token embedding with the output head.")
    dropout: float = _field(0.0, "Dropout rate on residual branches (LLaMA uses 0).", ge=0, lt=1)
    init_std: float = _field(0.02, "Std of the normal initializer for weight matrices.", gt=0)
    param_dtype: Literal["float32", "bfloat16"] = _field("float32", "Parameter storage dtype.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = _field(
        "auto", "Compute dtype: auto = bfloat16 on TPU/GPU, float32 on CPU."
    )
    scan_layers: bool = _field(
        True, "Stack layers under lax.scan (compile time independent of depth)."
    )
    remat: Literal["none", "full", "dots_saveable", "minimal"] = _field(
        "none",
        "Activation recomputation: none, full, dots_saveable (keep all matmul outputs), "
        "minimal (keep matmul outputs without batch dims, i.e. weight matmuls).",
    )
    cpu_matmul: Literal["auto", "mkl", "openblas", "xla"] = _field(
        "auto",
        "float32/bfloat16 matmuls on a one-device CPU mesh: mkl (Intel MKL, the mkl extra; "
        "faster), openblas (as mkl, float32 products by OpenBLAS's sgemm), xla (XLA:CPU's "
        "own), auto = mkl where installed, openblas on non-Intel CPUs (README: Throughput).",
    )
    attention: Literal["xla", "cudnn", "splash"] = _field(
        "xla",
        "Attention kernel: xla (any backend), cudnn (NVIDIA GPU flash attention; bf16/fp16), "
        "splash (TPU Pallas kernel; seq_len a multiple of 128, no prefix-LM). docs/attention.md.",
    )

    @model_validator(mode="after")
    def _check_attention(self) -> ModelConfig:
        # cuDNN's fused attention takes only 16-bit inputs and head dims (8k <= 256)
        if self.attention == "cudnn" and self.dtype == "float32":
            raise ValueError("attention: cudnn needs model.dtype bfloat16, float16 or auto")
        if self.attention == "cudnn" and (self.head_size % 8 or self.head_size > 256):
            raise ValueError(
                f"attention: cudnn needs a head size that is a multiple of 8 and at most 256, "
                f"got {self.head_size}"
            )
        return self

    @model_validator(mode="after")
    def _check_shapes(self) -> ModelConfig:
        if self.num_heads % self.kv_heads:
            raise ValueError(
                f"num_kv_heads: num_heads ({self.num_heads}) must be divisible by "
                f"num_kv_heads ({self.kv_heads})"
            )
        if self.head_size % 2:
            raise ValueError(f"head_dim: {self.head_size} must be even for RoPE")
        if self.head_dim is None and self.d_model % self.num_heads:
            raise ValueError(
                f"num_heads: d_model ({self.d_model}) must be divisible by "
                f"num_heads ({self.num_heads}) "
                "unless head_dim is set"
            )
        return self

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def head_size(self) -> int:
        return self.head_dim or self.d_model // self.num_heads


# --------------------------------------------------------------------------- optimizer


class ScheduleConfig(Section):
    kind: Literal["constant", "cosine", "linear", "rsqrt", "wsd"] = _field(
        "wsd", "LR shape after warmup: constant, cosine/linear/rsqrt decay, or warmup-stable-decay."
    )
    warmup_steps: int | None = _field(None, "Linear warmup length in steps.", ge=0)
    warmup_fraction: float = _field(
        0.05, "Warmup as a fraction of train.steps (used when warmup_steps is unset).", ge=0, lt=1
    )
    min_lr_ratio: float = _field(
        0.1, "Floor of the decay, as a fraction of the peak lr.", ge=0, le=1
    )
    decay_fraction: float = _field(0.2, "wsd: fraction of training spent decaying.", gt=0, le=1)
    decay_shape: Literal["linear", "cosine", "exponential", "1-sqrt"] = _field(
        "linear", "wsd: shape of the decay phase."
    )
    unit: Literal["steps", "tokens"] = _field(
        "steps",
        "What the schedule's lengths (warmup, decay) count: steps, or tokens (differs from "
        "steps only while the batch size changes: train.batch_ramp).",
    )


class AdamWConfig(Section):
    kind: Literal["adamw"] = "adamw"
    b1: float = _field(0.9, "First-moment decay.", ge=0, lt=1)
    b2: float = _field(0.95, "Second-moment decay.", ge=0, lt=1)
    eps: float = _field(1e-8, "Denominator epsilon.", gt=0)


class AdafactorConfig(Section):
    kind: Literal["adafactor"] = "adafactor"
    decay_rate: float = _field(0.8, "Second-moment decay exponent.", gt=0)
    min_dim_size_to_factor: int = _field(
        128, "Factor second moments of dims at least this big.", gt=0
    )
    momentum: float | None = _field(
        None, "Optional first-moment decay (None: no momentum).", ge=0, lt=1
    )


class LionConfig(Section):
    kind: Literal["lion"] = "lion"
    b1: float = _field(0.9, "Interpolation factor for the update sign.", ge=0, lt=1)
    b2: float = _field(0.99, "Momentum decay.", ge=0, lt=1)


class SophiaConfig(Section):
    kind: Literal["sophia"] = "sophia"
    b1: float = _field(0.965, "Gradient EMA (momentum) decay.", ge=0, lt=1)
    b2: float = _field(0.99, "Decay of the diagonal-Hessian EMA, per estimate.", ge=0, lt=1)
    rho: float = _field(0.04, "Update clip(m / max(rho * h, eps), 1): the paper's gamma.", gt=0)
    eps: float = _field(1e-12, "Floor of rho * h in the denominator.", gt=0)
    update_hessian_every: int = _field(
        10, "Steps between Gauss-Newton-Bartlett Hessian estimates (the paper's k).", gt=0
    )


OptimizerKind = Annotated[
    AdamWConfig | AdafactorConfig | LionConfig | SophiaConfig, Field(discriminator="kind")
]


class OptimConfig(Section):
    lr: float = _field(3e-4, "Peak learning rate.", gt=0)
    schedule: ScheduleConfig = _field(ScheduleConfig(), "Learning-rate schedule.")
    optimizer: OptimizerKind = _field(AdamWConfig(), "Update rule, chosen by kind.")
    weight_decay: float = _field(
        0.1, "Decoupled weight decay, lr * wd * w per step for every optimizer (norms never).", ge=0
    )
    decay_embeddings: bool = _field(True, "Apply weight decay to the token embedding too.")
    clip_grad_norm: float | None = _field(1.0, "Clip the global gradient norm (None: off).", gt=0)

    @field_validator("optimizer", mode="before")
    @classmethod
    def _default_kind(cls, optimizer: Any) -> Any:
        if isinstance(optimizer, dict) and "kind" not in optimizer:
            return {"kind": AdamWConfig().kind, **optimizer}
        return optimizer


# --------------------------------------------------------------------------- data


class TokenizerConfig(Section):
    kind: Literal["train_bpe", "huggingface", "sentencepiece"] = _field(
        "train_bpe",
        "train_bpe: train a byte-level BPE on the train source at first use and cache it; "
        "huggingface: a tokenizer.json file; sentencepiece: a .model file.",
    )
    path: str | None = _field(None, "Tokenizer file for kind huggingface / sentencepiece.")
    vocab_size: int = _field(8192, "train_bpe: vocabulary size to train.", gt=256)
    cache_dir: str = _field("~/.cache/maxlm", "train_bpe: where trained tokenizers are cached.")

    @model_validator(mode="after")
    def _path_for_files(self) -> TokenizerConfig:
        if self.kind != "train_bpe" and not self.path:
            raise ValueError(f"path: tokenizer kind {self.kind!r} needs a path")
        return self


class CausalObjective(Section):
    kind: Literal["causal"] = "causal"


class FillInTheMiddleObjective(Section):
    kind: Literal["fim"] = "fim"
    rate: float = _field(0.5, "Share of documents cut into prefix / middle / suffix.", ge=0, le=1)
    spm_rate: float = _field(
        0.5, "Share of those laid out suffix-prefix-middle (SPM); the rest PSM.", ge=0, le=1
    )
    prefix_token: str = _field("<fim_prefix>", "Sentinel before the prefix.")
    middle_token: str = _field("<fim_middle>", "Sentinel before the middle.")
    suffix_token: str = _field("<fim_suffix>", "Sentinel before the suffix.")


class PrefixLMObjective(Section):
    kind: Literal["prefix_lm"] = "prefix_lm"


class SpanCorruptionObjective(Section):
    kind: Literal["span_corruption"] = "span_corruption"
    noise_density: float = _field(0.15, "Share of tokens corrupted.", gt=0, lt=1)
    mean_span_length: float = _field(3.0, "Mean length of a corrupted span.", ge=1)
    sentinel_format: str = _field(
        "<extra_id_{}>", "Sentinel token names; {} is the span number (0, 1, ...)."
    )
    num_sentinels: int = _field(100, "Sentinel tokens available (spans per example).", gt=0)


class DenoiserConfig(Section):
    mode: Literal["R", "S", "X"] = _field(
        "R", "R: short spans, low corruption; S: sequential (prefix LM); X: extreme."
    )
    rate: float = _field(1.0, "Relative sampling rate of this denoiser.", gt=0)
    noise_density: float = _field(0.15, "R / X: share of tokens corrupted.", gt=0, lt=1)
    mean_span_length: float = _field(3.0, "R / X: mean corrupted span length.", ge=1)


# UL2 (Tay et al. 2022): two R, one S and four X denoisers; S gets 20 %, the others share 80 %.
UL2_DENOISERS = [
    {"mode": "R", "rate": 0.8 / 6, "noise_density": 0.15, "mean_span_length": 3.0},
    {"mode": "R", "rate": 0.8 / 6, "noise_density": 0.15, "mean_span_length": 8.0},
    {"mode": "S", "rate": 0.2},
    {"mode": "X", "rate": 0.8 / 6, "noise_density": 0.5, "mean_span_length": 3.0},
    {"mode": "X", "rate": 0.8 / 6, "noise_density": 0.5, "mean_span_length": 8.0},
    {"mode": "X", "rate": 0.8 / 6, "noise_density": 0.15, "mean_span_length": 64.0},
    {"mode": "X", "rate": 0.8 / 6, "noise_density": 0.5, "mean_span_length": 64.0},
]


class UL2Objective(Section):
    kind: Literal["ul2"] = "ul2"
    denoisers: list[DenoiserConfig] = _field(
        [DenoiserConfig(**d) for d in UL2_DENOISERS],  # type: ignore[arg-type]
        "The mixture of denoisers (default: the UL2 paper's seven).",
        min_length=1,
    )
    mode_tokens: dict[str, str] = _field(
        {"R": "[R]", "S": "[S]", "X": "[X]"}, "Token prefixed to each example of a mode."
    )
    sentinel_format: str = _field(
        "<extra_id_{}>", "Sentinel token names; {} is the span number (0, 1, ...)."
    )
    num_sentinels: int = _field(100, "Sentinel tokens available (spans per example).", gt=0)

    @model_validator(mode="after")
    def _modes_named(self) -> UL2Objective:
        for mode in ("R", "S", "X"):
            if mode not in self.mode_tokens:
                raise ValueError(f"mode_tokens: no token for mode {mode!r}")
        return self


ObjectiveKind = Annotated[
    CausalObjective
    | FillInTheMiddleObjective
    | PrefixLMObjective
    | SpanCorruptionObjective
    | UL2Objective,
    Field(discriminator="kind"),
]


class SourceConfig(Section):
    kind: Literal[
        "text_files", "jsonl", "parquet", "array_record", "hf_dataset", "seqio", "python_stdlib"
    ] = _field(
        "python_stdlib",
        "text_files: files matching `paths`; jsonl / parquet: one document per record; "
        "array_record: token-id shards from `python -m maxlm.data.prepare`; hf_dataset: a "
        "Hugging Face dataset saved with save_to_disk; seqio: a registered Task or Mixture; "
        "python_stdlib: the running interpreter's .py files.",
    )
    paths: list[str] = _field(
        [], "Globs (** allowed; gs:// but not for array_record); hf_dataset: the save_to_disk dir."
    )
    document_per: Literal["file", "line"] = _field(
        "file", "text_files: a document is a whole file or a line."
    )
    text_field: str = _field(
        "text",
        "jsonl / parquet / hf_dataset / seqio: the field holding the text (jsonl: dots reach "
        "into nested objects).",
    )
    split: str = _field("train", "hf_dataset (a DatasetDict) / seqio: the split to read.")
    seqio_name: str | None = _field(None, "seqio: the Task or Mixture name.")
    seqio_modules: list[str] = _field([], "seqio: modules to import that register it.")
    weight: float = _field(1.0, "Mixture weight (share of rows) among data.sources.", gt=0)
    objective: ObjectiveKind = _field(CausalObjective(), "Pretraining objective, chosen by kind.")

    @field_validator("objective", mode="before")
    @classmethod
    def _default_kind(cls, objective: Any) -> Any:
        if isinstance(objective, dict) and "kind" not in objective:
            return {"kind": CausalObjective().kind, **objective}
        return objective

    @model_validator(mode="after")
    def _paths_for_files(self) -> SourceConfig:
        if self.kind not in ("python_stdlib", "seqio") and not self.paths:
            raise ValueError(f"paths: source kind {self.kind!r} needs at least one path")
        if self.kind == "seqio" and not self.seqio_name:
            raise ValueError("seqio_name: source kind 'seqio' needs a Task or Mixture name")
        return self


class MixtureStage(Section):
    start_step: int = _field(0, "First step (1-based) that draws with these weights.", ge=0)
    weights: dict[str, float] = _field({}, "Source name -> weight from start_step on.")


def _check_source_names(weights: dict[str, float], sources: dict[str, Any], key: str) -> None:
    """Every name a mixture weighs must be a configured source (suggesting the nearest)."""
    for name in weights:
        if name not in sources:
            close = difflib.get_close_matches(name, list(sources), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"{key}.{name}: no such source{hint}")


class DataConfig(Section):
    sources: dict[str, SourceConfig] = _field(
        {"stdlib": SourceConfig()},
        "Named sources (the names appear in metrics), mixed by their weights.",
        min_length=1,
    )
    mixture_stages: list[MixtureStage] = _field(
        [],
        "Optional weights per training stage, by start step (the first must start at 0 or 1); "
        "sources a stage leaves out get weight 0.",
    )
    tokenizer: TokenizerConfig = _field(TokenizerConfig(), "How text becomes token ids.")
    eval_fraction: float = _field(
        0.02, "Share of documents held out for evaluation (chosen by a hash of the id).", ge=0, lt=1
    )
    shuffle_window: int = _field(
        1024,
        "Document pieces (<= seq_len tokens) shuffled together before packing, so one batch "
        "mixes many documents (0: off).",
        ge=0,
    )
    packing: Literal["first_fit", "best_fit", "concat_split"] = _field(
        "first_fit",
        "How pieces fill rows: first_fit / best_fit keep pieces whole (some padding); "
        "concat_split fills every row (a piece may continue in the next row).",
    )
    add_bos: bool = _field(True, "Prepend BOS to every document.")
    add_eos: bool = _field(True, "Append EOS to every document.")
    num_workers: int = _field(
        0, "Worker processes preparing batches (grain mp_prefetch; 0: in the trainer).", ge=0
    )

    @model_validator(mode="after")
    def _stages_name_sources(self) -> DataConfig:
        starts = [stage.start_step for stage in self.mixture_stages]
        if starts and (starts[0] > 1 or starts != sorted(set(starts))):
            raise ValueError(
                f"mixture_stages: start steps {starts} must increase and begin at 0 or 1"
            )
        for k, stage in enumerate(self.mixture_stages):
            _check_source_names(stage.weights, self.sources, f"mixture_stages.{k}.weights")
            if sum(stage.weights.values()) <= 0:
                raise ValueError(f"mixture_stages.{k}.weights: need a positive total weight")
        return self

    @property
    def needs_prefix(self) -> bool:
        """Whether any source's objective makes bidirectional prefixes and loss masks."""
        return any(
            s.objective.kind in ("prefix_lm", "span_corruption", "ul2")
            for s in self.sources.values()
        )


# --------------------------------------------------------------------------- prepare


class CleaningConfig(Section):
    normalization: Literal["NFC", "NFKC", "none"] = _field(
        "NFC", "Unicode normalization form applied to every document."
    )
    strip_control_chars: bool = _field(
        True, "Remove control characters other than newline and tab."
    )
    min_chars: int = _field(
        1, "Drop documents (pieces of split ones) shorter than this after cleaning.", ge=0
    )
    max_chars: int = _field(
        1_000_000, "Split documents longer than this (at line breaks where possible).", gt=0
    )
    boilerplate_min_documents: int = _field(
        0,
        "Remove lines (>= 10 characters) found verbatim in at least this many documents, "
        "e.g. ads and navigation (0: off).",
        ge=0,
    )

    @field_validator("boilerplate_min_documents")
    @classmethod
    def _off_or_repeated(cls, value: int) -> int:
        if value == 1:
            raise ValueError("boilerplate_min_documents: 1 would remove every line; use 0 or >= 2")
        return value


class QualityConfig(Section):
    enabled: bool = _field(False, "Apply the Gopher / RefinedWeb quality filters below.")
    min_words: int = _field(50, "Fewest words a document may have.", ge=0)
    max_words: int = _field(100_000, "Most words a document may have.", gt=0)
    min_mean_word_length: float = _field(3.0, "Smallest mean word length (characters).", ge=0)
    max_mean_word_length: float = _field(10.0, "Largest mean word length (characters).", gt=0)
    max_symbol_word_ratio: float = _field(
        0.1, "Most '#' per word, and most ellipses per word.", ge=0
    )
    max_bullet_lines: float = _field(
        0.9, "Most share of non-blank lines starting with a bullet.", ge=0
    )
    max_ellipsis_lines: float = _field(
        0.3, "Most share of non-blank lines ending in an ellipsis.", ge=0
    )
    min_alpha_words: float = _field(
        0.8, "Least share of words containing an alphabetic character.", ge=0, le=1
    )
    min_stop_words: int = _field(
        2,
        "Fewest distinct English stop words (the, be, to, of, and, that, have, with); "
        "0 turns the filter off for other languages and code.",
        ge=0,
    )
    max_duplicate_lines: float = _field(0.3, "Most share of lines that repeat another.", ge=0)
    max_duplicate_line_chars: float = _field(
        0.2, "Most share of characters in repeated lines.", ge=0
    )
    max_top_ngram_chars: dict[int, float] = _field(
        {2: 0.2, 3: 0.18, 4: 0.16},
        "n -> most share of characters covered by the most frequent word n-gram.",
    )
    max_duplicate_ngram_chars: dict[int, float] = _field(
        {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10},
        "n -> most share of characters in word n-grams that occur more than once.",
    )


class DedupConfig(Section):
    exact: bool = _field(True, "Drop documents whose normalized text was seen before.")
    near: bool = _field(True, "Drop near duplicates found by MinHash LSH (datasketch).")
    threshold: float = _field(0.8, "Estimated Jaccard similarity that counts as near.", gt=0, le=1)
    num_perm: int = _field(128, "MinHash permutations.", gt=0)
    shingle_words: int = _field(5, "Words per shingle (MinHash set element).", gt=0)


class PrepareConfig(Section):
    output_dir: str = _field(
        "data/prepared", "Where `python -m maxlm.data.prepare` writes <source name>/ shards."
    )
    num_workers: int = _field(2, "Processes that clean and tokenize.", gt=0)
    documents_per_shard: int = _field(50_000, "Documents per ArrayRecord shard.", gt=0)
    cleaning: CleaningConfig = _field(CleaningConfig(), "Normalization and length limits.")
    quality: QualityConfig = _field(QualityConfig(), "Heuristic quality filters.")
    dedup: DedupConfig = _field(DedupConfig(), "Exact and near-duplicate removal.")


# --------------------------------------------------------------------------- train / eval / log


class BatchRampConfig(Section):
    start_tokens: int = _field(
        0,
        "Global batch (tokens) of the first step; it grows to train.global_batch_size x seq_len "
        "in whole micro-batches (0: no ramp).",
        ge=0,
    )
    ramp_steps: int = _field(0, "Steps over which the batch grows linearly to its end.", ge=0)
    ramp_tokens: int = _field(
        0, "Or: tokens over which the batch grows (instead of ramp_steps).", ge=0
    )
    increment_tokens: int = _field(
        0, "The batch grows in steps of this many tokens (0: one micro-batch).", ge=0
    )
    follow_noise_scale: bool = _field(
        False,
        "Also grow the batch by one increment whenever the measured gradient noise scale "
        "(train.noise_scale) exceeds it; never shrinks.",
    )

    @property
    def enabled(self) -> bool:
        return self.start_tokens > 0

    @model_validator(mode="after")
    def _one_length(self) -> BatchRampConfig:
        if self.ramp_steps and self.ramp_tokens:
            raise ValueError("ramp_tokens: give ramp_steps or ramp_tokens, not both")
        if self.enabled and not (self.ramp_steps or self.ramp_tokens or self.follow_noise_scale):
            raise ValueError(
                "ramp_steps: a batch ramp needs ramp_steps, ramp_tokens or follow_noise_scale"
            )
        return self


class NoiseScaleConfig(Section):
    every_steps: int = _field(
        0,
        "Measure the gradient noise scale B_simple every N steps from the micro-batch and "
        "accumulated gradient norms (0: off; needs 2+ micro-batches per step).",
        ge=0,
    )
    ema_decay: float = _field(
        0.95, "Exponential smoothing of |G|^2 and tr(Sigma) across measurements.", ge=0, lt=1
    )


class TrainConfig(Section):
    steps: int = _field(1000, "Optimizer steps to train.", gt=0)
    global_batch_size: int = _field(8, "Sequences per optimizer step, over all devices.", gt=0)
    seq_len: int = _field(256, "Tokens per sequence (packed).", gt=0)
    grad_accum_steps: int = _field(1, "Micro-batches accumulated per optimizer step.", gt=0)
    z_loss: float = _field(0.0, "Weight of the z-loss (log Z)^2 on the logits (0: off).", ge=0)
    loss_chunk: int = _field(
        128,
        "Sequence positions per chunk of the fused output head and loss (the largest divisor "
        "of seq_len not above it is used); 0: a plain head, which materializes the "
        "B x T x vocab logits.",
        ge=0,
    )
    batch_ramp: BatchRampConfig = _field(
        BatchRampConfig(), "Batch-size warmup: fixed micro-batch, growing micro-batch count."
    )
    noise_scale: NoiseScaleConfig = _field(
        NoiseScaleConfig(), "Gradient noise scale / critical batch size measurement."
    )

    @property
    def micro_batch_size(self) -> int:
        """Sequences per micro-batch (the compiled batch shape), over all devices."""
        return self.global_batch_size // self.grad_accum_steps

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch_size * self.seq_len

    @property
    def loss_chunk_size(self) -> int:
        """The fused head's chunk: the largest divisor of seq_len up to loss_chunk (0: off)."""
        if not self.loss_chunk:
            return 0
        return max(
            c for c in range(1, min(self.loss_chunk, self.seq_len) + 1) if self.seq_len % c == 0
        )


class EvalConfig(Section):
    every_steps: int = _field(
        200, "Evaluate on held-out data every N steps (0: only at the end).", ge=0
    )
    batches: int = _field(8, "Held-out batches per evaluation.", gt=0)
    sample_prompts: list[str] = _field(
        [], "Prompts to continue (greedy) at the end of training, printed and in summary.json."
    )
    sample_tokens: int = _field(48, "New tokens per sample prompt.", gt=0)


class CheckpointConfig(Section):
    every_steps: int = _field(
        1000, "Save a checkpoint every N steps and at the last step (0: never).", ge=0
    )
    keep: int = _field(3, "Keep the newest N checkpoints.", gt=0)
    keep_every_steps: int = _field(
        0, "Also keep every checkpoint whose step is a multiple of this, forever (0: none).", ge=0
    )
    async_save: bool = _field(True, "Write checkpoints in the background while training goes on.")
    init_from: str | None = _field(
        None,
        "A checkpoint step directory (<run>/checkpoints/<step>) whose parameters start a new "
        "run with a fresh optimizer and schedule (continual pretraining); ignored on resume.",
    )
    branch_from: str | None = _field(
        None,
        "A checkpoint step directory (<run>/checkpoints/<step>) whose whole state (parameters, "
        "optimizer, step, data position) this new run continues from under its own config, "
        "e.g. a WSD decay branched from a stable-stage step; ignored on resume.",
    )
    new_token_init: Literal["mean", "subtokens"] = _field(
        "mean",
        "init_from into a larger model.vocab_size: new embedding / output-head rows start as the "
        "mean of the old rows, or (subtokens) of the rows of each new token's pieces under the "
        "checkpoint's tokenizer.",
    )
    preemption_grace_s: float = _field(
        300.0,
        "On SIGTERM / SIGINT: finish the step, save, wait for the commit, exit 0; give up on the "
        "save after this many seconds.",
        gt=0,
    )


class StabilityConfig(Section):
    spike_factor: float = _field(
        3.0, "A loss above this multiple of its running mean is a spike (0: off).", ge=0
    )
    spike_zscore: float = _field(
        6.0,
        "A loss this many running standard deviations above the mean is a spike (0: off).",
        ge=0,
    )
    window: int = _field(100, "Steps of loss history behind the running statistics.", gt=1)
    min_history: int = _field(20, "Steps of history before spikes are looked for.", gt=1)
    skip_batches: int = _field(
        100, "Batches skipped after restoring the last good checkpoint on a spike.", ge=0
    )
    max_recoveries: int = _field(
        5,
        "Stop the run when more recoveries (spikes or non-finite steps) than this fall within "
        "recovery_window_steps.",
        ge=0,
    )
    recovery_window_steps: int = _field(1000, "The window of max_recoveries, in steps.", gt=0)


class WandbConfig(Section):
    enabled: bool = _field(False, "Also log metrics to Weights & Biases (the `wandb` extra).")
    project: str = _field("maxlm", "W&B project.")
    entity: str | None = _field(None, "W&B team or user (default: your default entity).")
    name: str | None = _field(None, "Run name (default: the run directory's name).")
    group: str | None = _field(None, "Group several runs (e.g. a sweep) in the W&B UI.")
    tags: list[str] = _field([], "Tags shown in the W&B UI.")
    mode: Literal["online", "offline"] = _field(
        "online", "offline writes under <run.dir>/wandb for a later `wandb sync` (no account)."
    )


class MetricsConfig(Section):
    log_every_steps: int = _field(10, "Write and print metrics every N steps.", gt=0)
    tensorboard: bool = _field(True, "Also write TensorBoard event files to the run directory.")
    wandb: WandbConfig = _field(WandbConfig(), "Weights & Biases logging (off by default).")
    progress: Literal["auto", "bar", "lines"] = _field(
        "auto",
        "bar: a live progress bar with ETA, updated every step; lines: a progress line every "
        "log_every_steps (logs, CI, pods); auto: the bar when stdout is a terminal.",
    )


class ProfileConfig(Section):
    steps: int = _field(0, "Capture a jax.profiler trace of this many steps (0: off).", ge=0)
    start_step: int = _field(5, "First profiled step (after compilation and warm-up).", gt=0)
    dir: str | None = _field(
        None, "Where the trace goes (default <run.dir>/profile; open it with TensorBoard)."
    )
    perfetto: bool = _field(
        True, "Also write a Perfetto trace (perfetto_trace.json.gz, for ui.perfetto.dev)."
    )


class StageConfig(Section):
    name: str = _field("stage", "Shown in logs and metrics (e.g. warmup, stable, long_context).")
    steps: int = _field(0, "Length in optimizer steps (or give tokens).", ge=0)
    tokens: int = _field(
        0, "Length in tokens, rounded up to whole steps of this stage's batch.", ge=0
    )
    lr: Literal["warmup", "stable", "decay"] = _field(
        "stable",
        "This stage's part of the schedule: warmup (0 to optim.lr), stable (optim.lr) or decay "
        "(optim.lr to optim.schedule.min_lr_ratio x it, shaped by optim.schedule.decay_shape).",
    )
    seq_len: int | None = _field(None, "Sequence length (default: train.seq_len).", gt=0)
    global_batch_size: int | None = _field(
        None, "Sequences per step (default: train.global_batch_size).", gt=0
    )
    rope_theta: float | None = _field(None, "RoPE base (default: model.rope_theta).", gt=0)
    mixture: dict[str, float] = _field(
        {}, "Source name -> weight in this stage (default: data.sources' weights)."
    )

    @model_validator(mode="after")
    def _one_length(self) -> StageConfig:
        if bool(self.steps) == bool(self.tokens):
            raise ValueError("steps: give a stage's length as steps or tokens (exactly one)")
        return self

    def num_steps(self, train: TrainConfig) -> int:
        if self.steps:
            return self.steps
        tokens_per_step = (self.global_batch_size or train.global_batch_size) * (
            self.seq_len or train.seq_len
        )
        return -(-self.tokens // tokens_per_step)


class Config(Section):
    run: RunConfig = _field(RunConfig(), "Run directory and seed.")
    mesh: MeshConfig = _field(MeshConfig(), "Device mesh axis sizes.")
    distributed: DistributedConfig = _field(DistributedConfig(), "Multi-process initialization.")
    model: ModelConfig = _field(ModelConfig(), "LLaMA architecture.")
    optim: OptimConfig = _field(OptimConfig(), "Optimizer, schedule, clipping, weight decay.")
    data: DataConfig = _field(DataConfig(), "Training and held-out data.")
    train: TrainConfig = _field(TrainConfig(), "Steps, batch and sequence shape.")
    eval: EvalConfig = _field(EvalConfig(), "Periodic held-out evaluation.")
    checkpoint: CheckpointConfig = _field(CheckpointConfig(), "Saving and resuming.")
    stability: StabilityConfig = _field(
        StabilityConfig(), "Loss-spike and NaN detection, restore-and-skip."
    )
    prepare: PrepareConfig = _field(PrepareConfig(), "Offline cleaning, dedup and tokenization.")
    metrics: MetricsConfig = _field(MetricsConfig(), "Logging.")
    profile: ProfileConfig = _field(ProfileConfig(), "jax.profiler trace of a few steps.")
    stages: list[StageConfig] = _field(
        [],
        "Training stages in order (e.g. warmup, stable, long-context, anneal), each with its "
        "length, part of the lr schedule, sequence length, batch, RoPE base and mixture; "
        "train.steps defaults to their total. docs/recipes.md.",
    )

    @model_validator(mode="before")
    @classmethod
    def _steps_from_stages(cls, data: Any) -> Any:
        """train.steps left out of a staged config is the stages' total."""
        if not (isinstance(data, dict) and data.get("stages")):
            return data
        train = dict(data.get("train") or {})
        if "steps" in train:
            return data
        try:
            train_cfg = TrainConfig(**{k: v for k, v in train.items() if k != "steps"})
            total = sum(StageConfig(**s).num_steps(train_cfg) for s in data["stages"])
        except (ValidationError, TypeError, ValueError):
            return data  # the field validators name the problem
        return {**data, "train": {**train, "steps": total}}

    @model_validator(mode="after")
    def _check_stages(self) -> Config:
        if not self.stages:
            return self
        total = sum(stage.num_steps(self.train) for stage in self.stages)
        if total != self.train.steps:
            raise ValueError(
                f"train.steps: {self.train.steps}, but the stages add up to {total} steps "
                "(leave train.steps out to use their total)"
            )
        if self.train.batch_ramp.enabled:
            raise ValueError(
                "train.batch_ramp: not combined with stages; give each stage its "
                "global_batch_size instead"
            )
        if self.data.mixture_stages:
            raise ValueError("data.mixture_stages: with stages, give each stage its mixture")
        for k, stage in enumerate(self.stages):
            _check_source_names(stage.mixture, self.data.sources, f"stages.{k}.mixture")
            if stage.mixture and sum(stage.mixture.values()) <= 0:
                raise ValueError(f"stages.{k}.mixture: need a positive total weight")
            rows = stage.global_batch_size or self.train.global_batch_size
            if rows % self.train.grad_accum_steps:
                raise ValueError(
                    f"stages.{k}.global_batch_size: {rows} is not divisible by "
                    f"train.grad_accum_steps ({self.train.grad_accum_steps})"
                )
        pieces = [stage.lr for stage in self.stages]
        if any(a == b == "decay" for a, b in itertools.pairwise(pieces)):
            raise ValueError("stages: two decay stages in a row; join them into one")
        return self

    @model_validator(mode="after")
    def _check_cross_section(self) -> Config:
        warmup = self.optim.schedule.warmup_steps
        if warmup is not None and warmup > self.train.steps:
            raise ValueError(
                f"optim.schedule.warmup_steps: {warmup} exceeds train.steps ({self.train.steps})"
            )
        schedule = self.optim.schedule
        if schedule.kind == "wsd":
            decay_start = self.train.steps - round(schedule.decay_fraction * self.train.steps)
            if decay_start < self.warmup_steps:
                raise ValueError(
                    f"optim.schedule.decay_fraction: the decay would start at step {decay_start}, "
                    f"before warmup ends at step {self.warmup_steps}"
                )
            if schedule.decay_shape == "exponential" and schedule.min_lr_ratio == 0:
                raise ValueError(
                    "optim.schedule.min_lr_ratio: exponential decay needs a floor above 0"
                )
        self._check_batch_ramp()
        if self.train.global_batch_size % self.train.grad_accum_steps:
            raise ValueError(
                f"train.grad_accum_steps: train.global_batch_size ({self.train.global_batch_size}) "
                f"must be divisible by "
                f"train.grad_accum_steps ({self.train.grad_accum_steps})"
            )
        return self

    def _check_batch_ramp(self) -> None:
        ramp, train = self.train.batch_ramp, self.train
        micro_tokens = train.micro_batch_size * train.seq_len
        if train.noise_scale.every_steps and train.grad_accum_steps < 2:
            raise ValueError(
                "train.noise_scale.every_steps: measuring the noise scale needs two batch sizes, "
                "i.e. train.grad_accum_steps >= 2 (the micro-batch and the whole batch)"
            )
        if ramp.follow_noise_scale and not train.noise_scale.every_steps:
            raise ValueError(
                "train.batch_ramp.follow_noise_scale: needs train.noise_scale.every_steps > 0"
            )
        if not ramp.enabled:
            return
        if self.optim.optimizer.kind == "sophia":
            raise ValueError(
                "train.batch_ramp: not available with optim.optimizer.kind sophia (its Hessian "
                "estimate runs inside the fixed-batch step)"
            )
        for key in ("start_tokens", "increment_tokens"):
            value = getattr(ramp, key)
            if value % micro_tokens:
                raise ValueError(
                    f"train.batch_ramp.{key}: {value} is not a whole number of micro-batches of "
                    f"{micro_tokens} tokens (train.global_batch_size / train.grad_accum_steps "
                    f"x train.seq_len)"
                )
        if ramp.start_tokens > train.tokens_per_step:
            raise ValueError(
                f"train.batch_ramp.start_tokens: {ramp.start_tokens} exceeds the final batch "
                f"of {train.tokens_per_step} tokens (train.global_batch_size x train.seq_len)"
            )

    @property
    def warmup_steps(self) -> int:
        warmup = self.optim.schedule.warmup_steps
        if warmup is None:
            warmup = int(self.optim.schedule.warmup_fraction * self.train.steps)
        return warmup

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# --------------------------------------------------------------------------- loading

PACKAGED_CONFIGS = "maxlm.configs"


def preset_names() -> list[str]:
    folder = resources.files(f"{PACKAGED_CONFIGS}.models")
    return sorted(
        p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml")
    )


def _preset(name: str) -> dict[str, Any]:
    if name not in preset_names():
        close = difflib.get_close_matches(name, preset_names(), n=1)
        hint = (
            f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(preset_names())})"
        )
        raise ConfigError(f"model.preset: unknown preset {name!r}{hint}")
    text = resources.files(f"{PACKAGED_CONFIGS}.models").joinpath(f"{name}.yaml").read_text()
    return dict(yaml.safe_load(text) or {})


def _resolve_path(path: str) -> Path:
    """A config path as given, else under the packaged configs/ (for non-editable installs)."""
    candidate = Path(path)
    if candidate.exists():
        return candidate
    if path.startswith("configs/"):
        packaged = Path(str(resources.files(PACKAGED_CONFIGS))) / path.removeprefix("configs/")
        if packaged.exists():
            return packaged
    raise ConfigError(f"--config: file not found: {path}")


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> Any:
    """Load YAML with omegaconf (floats like 1e-4 stay floats), following `base:` includes."""
    if path.resolve() in seen:
        raise ConfigError(f"{path}: circular base include")
    try:
        node = OmegaConf.load(path)
    except (OmegaConfBaseException, yaml.YAMLError, OSError) as err:
        raise ConfigError(f"{path}: cannot read YAML: {str(err).splitlines()[0]}") from err
    base = node.pop("base", None) if isinstance(node, DictConfig) else None
    if base is None:
        return node
    base_path = _resolve_path(str(path.parent / base) if not Path(base).is_absolute() else base)
    return OmegaConf.merge(_read_yaml(base_path, (*seen, path.resolve())), node)


def _apply_preset(raw: dict[str, Any]) -> dict[str, Any]:
    model = raw.get("model") or {}
    if isinstance(model, dict) and model.get("preset"):
        raw["model"] = {**_preset(model["preset"]), **model}
    return raw


def load(config_path: str | None = None, overrides: Sequence[str] = ()) -> Config:
    """YAML file (optional) + `a.b=value` overrides -> validated, frozen Config."""
    node = _read_yaml(_resolve_path(config_path)) if config_path else OmegaConf.create({})
    return _with_overrides(node, overrides, str(config_path))


def loads(text: str, overrides: Sequence[str] = (), where: str = "config") -> Config:
    """A resolved config's YAML text (a run's config.yaml, read from anywhere) + overrides."""
    try:
        node = OmegaConf.create(text)
    except (OmegaConfBaseException, yaml.YAMLError) as err:
        raise ConfigError(f"{where}: cannot read YAML: {str(err).splitlines()[0]}") from err
    return _with_overrides(node, overrides, where)


def _with_overrides(node: Any, overrides: Sequence[str], where: str) -> Config:
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key.sub=value")
        key, value = item.split("=", 1)
        try:  # update, not merge: a key may index into a list (stages.2.seq_len=8192)
            parsed = OmegaConf.from_dotlist([f"value={value}"])["value"]
            OmegaConf.update(node, key, parsed, merge=True)
        except OmegaConfBaseException as err:
            raise ConfigError(f"override {item!r}: {str(err).splitlines()[0]}") from err
    raw = OmegaConf.to_container(node, resolve=True)
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping of sections at the top level")
    return from_dict({str(key): value for key, value in raw.items()})


def from_dict(raw: dict[str, Any]) -> Config:
    """Validate a plain nested dict; errors become one-line ConfigErrors naming the key."""
    try:
        return Config.model_validate(_apply_preset(dict(raw)))
    except ValidationError as err:
        raise ConfigError(_describe(err)) from None


def _submodels(annotation: Any) -> tuple[type[BaseModel] | None, list[type[BaseModel]]]:
    """The section class of a field, or the members of its tagged union."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, []
    if _container_item(annotation) is not None:
        return None, []
    if getattr(annotation, "__metadata__", None):
        annotation = annotation.__origin__
    members = [a for a in getattr(annotation, "__args__", ()) if isinstance(a, type)]
    return None, [m for m in members if issubclass(m, BaseModel) and "kind" in m.model_fields]


def _container_item(annotation: Any) -> Any:
    """The value type of a dict[str, X] or list[X] annotation, else None."""
    origin = getattr(annotation, "__origin__", None)
    args: tuple[Any, ...] = getattr(annotation, "__args__", ())
    if origin in (dict, list):
        return args[-1]
    return None


def _walk(loc: Sequence[Any]) -> tuple[type[BaseModel] | None, list[str], str | None]:
    """Follow a pydantic error location through the schema, skipping union tags and
    descending into dict / list items (their key or index joins the path)."""
    model: type[BaseModel] | None = Config
    members: list[type[BaseModel]] = []
    item: Any = None
    path: list[str] = []
    for part in loc:
        if item is not None:
            path.append(str(part))
            model, members = _submodels(item)
            item = None
            continue
        if not isinstance(part, str):
            break
        tagged = [m for m in members if m.model_fields["kind"].default == part]
        if tagged:
            model, members = tagged[0], []
            continue
        if model is None or part not in model.model_fields:
            return model, path, part
        path.append(part)
        annotation = model.model_fields[part].annotation
        item = _container_item(annotation)
        model, members = _submodels(annotation)
    return model, path, None


def _describe(err: ValidationError) -> str:
    first = err.errors()[0]
    model, path, unknown = _walk(first["loc"])
    if first["type"] == "extra_forbidden" and unknown is not None:
        valid = list(model.model_fields) if model is not None else []
        close = difflib.get_close_matches(unknown, valid, n=1, cutoff=0.5)
        hint = f"; did you mean {'.'.join([*path, close[0]])!r}?" if close else ""
        return f"{'.'.join([*path, unknown])}: unknown key{hint}"
    message = first["msg"].removeprefix("Value error, ")
    named = re.match(r"([a-z_][a-z_0-9.]*): ", message)
    if named:
        # validators name their key first: relative to their section, or from the top
        absolute = named.group(1).split(".")[0] in Config.model_fields
        key = named.group(1) if absolute else ".".join([*path, named.group(1)])
        return f"{key}: {message[named.end() :]}"
    if first["type"] != "value_error" and "input" in first:
        message += f" (got {first['input']!r})"
    return f"{'.'.join(path) or 'config'}: {message}"


def parse_argv(argv: Sequence[str]) -> Config:
    """`--config=path.yaml key.sub=value ...` -> Config."""
    config_path = None
    overrides = []
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg.startswith("--config="):
            config_path = arg.split("=", 1)[1]
        elif arg == "--config" and args:
            config_path = args.pop(0)
        elif arg.startswith("--"):
            raise ConfigError(
                f"{arg}: unknown flag (use --config=FILE and key.sub=value overrides)"
            )
        else:
            overrides.append(arg)
    return load(config_path, overrides)


# --------------------------------------------------------------------------- reference page


def reference_markdown() -> str:
    """docs/config.md: every key, its type, default and description."""
    lines = [
        "# Configuration reference",
        "",
        "Generated from `maxlm/config.py` by `python -m maxlm.config --markdown > docs/config.md`;",
        "a test keeps it current. Override any key on the command line as `section.key=value`.",
        "",
    ]
    _section_markdown(Config, "", lines)
    return "\n".join(lines) + "\n"


def _type_name(annotation: Any) -> str:
    if getattr(annotation, "__origin__", None) is Literal:
        return " \\| ".join(repr(a) for a in annotation.__args__)
    text = getattr(annotation, "__name__", None) if isinstance(annotation, type) else None
    text = re.sub(r"\b(?:[a-z_]\w*\.)+(?=[A-Z])", "", text or str(annotation))  # module paths
    return text.replace("|", "\\|")


def _default_text(value: Any) -> str:
    value = to_jsonable_python(value)
    text = yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=10**6)
    return text.strip().removesuffix("...").strip()


def _section_markdown(
    model: type[BaseModel], prefix: str, lines: list[str], title: str | None = None
) -> None:
    scalars = []
    nested = []
    items = []  # (key, description, model) of models inside dicts / lists
    for name, field in model.model_fields.items():
        section, members = _submodels(field.annotation)
        if section is not None:
            nested.append((name, field, [section]))
        elif members:
            nested.append((name, field, members))
        elif not (title and name == "kind"):
            scalars.append((name, field))
        item, _ = _submodels(_container_item(field.annotation))
        if item is not None:
            placeholder = "<name>" if field.annotation.__origin__ is dict else "<i>"  # type: ignore[union-attr]
            items.append((f"{name}.{placeholder}", item))
    if scalars:
        heading = title or f"`{prefix.rstrip('.')}`"
        lines += [f"## {heading}", ""]
        lines += ["| key | type | default | description |", "|---|---|---|---|"]
        for name, field in scalars:
            default = _default_text(field.default)
            kind = _type_name(field.annotation)
            lines.append(f"| `{prefix}{name}` | {kind} | `{default}` | {field.description} |")
        lines.append("")
    for key, item in items:
        _section_markdown(item, f"{prefix}{key}.", lines)
    for name, field, members in nested:
        if len(members) == 1:
            _section_markdown(members[0], f"{prefix}{name}.", lines)
            continue
        kinds = ", ".join(f"`{m.model_fields['kind'].default}`" for m in members)
        lines += [
            f"## `{prefix}{name}`",
            "",
            f"{field.description} Choose with "
            f"`{prefix}{name}.kind`: {kinds}; each kind's keys follow.",
            "",
        ]
        for member in members:
            tag = member.model_fields["kind"].default
            _section_markdown(
                member, f"{prefix}{name}.", lines, f"`{prefix}{name}` with kind `{tag}`"
            )


def main(argv: Sequence[str]) -> None:
    """`--markdown` prints the reference page; otherwise the resolved config of argv."""
    if list(argv) == ["--markdown"]:
        print(reference_markdown(), end="")
        return
    try:
        print(parse_argv(argv).to_yaml(), end="")
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main(sys.argv[1:])
