"""Peak host memory and time of `python -m maxlm.convert` both ways, on a random LLaMA of a few
hundred MB written as bfloat16 safetensors shards (no PyTorch involved).

    python benchmarks/convert.py [--d-model 1024 --layers 12 --vocab 32000]

Each conversion runs in a fresh process; its peak RSS is compared with the same process's RSS
after importing everything (the baseline), so the table shows what the weights cost.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import ml_dtypes
import numpy as np
import safetensors.numpy

MEASURE = """
import resource, sys, time
from maxlm import convert
baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
if sys.argv[1] == "hf-to-maxlm":
    convert.hf_to_maxlm(sys.argv[2], sys.argv[3], dtype=sys.argv[4])
else:
    convert.maxlm_to_hf(sys.argv[2], sys.argv[3], dtype=sys.argv[4], max_shard_bytes=200 * 2**20)
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(baseline, peak, seconds)
"""


def write_random_llama(folder: Path, d_model: int, layers: int, vocab: int) -> int:
    """A LLaMA folder of random bfloat16 weights in 200 MB shards; returns its bytes."""
    heads, mlp = d_model // 64, int(d_model * 8 / 3 // 256 + 1) * 256
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab,
        "hidden_size": d_model, "intermediate_size": mlp, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": heads, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    }  # fmt: skip
    shapes = {"model.embed_tokens.weight": (vocab, d_model), "model.norm.weight": (d_model,)}
    for i in range(layers):
        prefix = f"model.layers.{i}."
        shapes |= {
            prefix + "input_layernorm.weight": (d_model,),
            prefix + "post_attention_layernorm.weight": (d_model,),
            **{prefix + f"self_attn.{p}_proj.weight": (d_model, d_model) for p in "qkvo"},
            prefix + "mlp.gate_proj.weight": (mlp, d_model),
            prefix + "mlp.up_proj.weight": (mlp, d_model),
            prefix + "mlp.down_proj.weight": (d_model, mlp),
        }
    shapes["lm_head.weight"] = (vocab, d_model)
    rng = np.random.default_rng(0)
    weight_map, shard, shard_bytes, total = {}, {}, 0, 0
    for name, shape in shapes.items():
        shard[name] = rng.standard_normal(shape, np.float32).astype(ml_dtypes.bfloat16)
        shard_bytes += shard[name].nbytes
        if shard_bytes > 200 * 2**20 or name == "lm_head.weight":
            file = f"model-{len(set(weight_map.values())) + 1:05d}.safetensors"
            safetensors.numpy.save_file(shard, str(folder / file), metadata={"format": "pt"})
            weight_map |= dict.fromkeys(shard, file)
            total += shard_bytes
            shard, shard_bytes = {}, 0
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "config.json").write_text(json.dumps(config))
    return total


def measure(*args: str) -> tuple[float, float, float]:
    """(baseline MiB, peak MiB, seconds) of one conversion in a fresh process."""
    out = subprocess.run(
        [sys.executable, "-c", MEASURE, *args], check=True, capture_output=True, text=True
    ).stdout.split()
    baseline, peak, seconds = int(out[-3]), int(out[-2]), float(out[-1])
    return baseline / 1024, peak / 1024, seconds  # ru_maxrss is in KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-model", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=32000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "hf").mkdir()
        source_bytes = write_random_llama(root / "hf", args.d_model, args.layers, args.vocab)
        params = source_bytes // 2
        print(f"random LLaMA: {params / 1e6:.0f}M parameters, {source_bytes / 2**20:.0f} MiB "
              f"as bfloat16 safetensors\n")  # fmt: skip
        rows = []
        for direction, src, dst, dtype, weights in (
            ("hf-to-maxlm", "hf", "maxlm32", "float32", 4 * params),
            ("hf-to-maxlm", "hf", "maxlm16", "bfloat16", 2 * params),
            ("maxlm-to-hf", "maxlm32", "back", "bfloat16", 4 * params),
        ):
            baseline, peak, seconds = measure(direction, str(root / src), str(root / dst), dtype)
            rows.append((f"{direction} ({dtype})", weights / 2**20, baseline, peak, seconds))
        header = f"{'conversion':<26} {'weights MiB':>11} {'base MiB':>9} {'peak MiB':>9} "
        print(header + f"{'peak-base':>10} {'/weights':>9} {'seconds':>8}")
        for name, weights, baseline, peak, seconds in rows:
            extra = peak - baseline
            print(f"{name:<26} {weights:>11.0f} {baseline:>9.0f} {peak:>9.0f} "
                  f"{extra:>10.0f} {extra / weights:>9.2f} {seconds:>8.1f}")  # fmt: skip
    print("\nweights: the converted copy (maxlm dtype), which maxlm-to-hf restores first")


if __name__ == "__main__":
    main()
