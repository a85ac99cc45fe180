"""Accelerators by name: peak dense bf16 FLOP/s and HBM per chip, for estimates before a run."""

from __future__ import annotations

import dataclasses

from maxlm.cli import UsageError

# Dense bf16 peak FLOP/s per chip, from the vendors' published specifications, by the
# `device_kind` that JAX reports (matched by prefix, so "NVIDIA H100 80GB HBM3" is an H100).
PUBLISHED_PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,  # v5e
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,  # v6e (Trillium)
    "TPU v6e": 918e12,
    "NVIDIA H200": 989e12,
    "NVIDIA H100 PCIe": 756e12,
    "NVIDIA H100": 989e12,
    "NVIDIA A100": 312e12,
    "NVIDIA L4": 121e12,
    "Tesla T4": 65e12,  # fp16 tensor cores (no bf16): Colab's free GPU
}


@dataclasses.dataclass(frozen=True)
class Hardware:
    """One chip as sold: its device kind (a PUBLISHED_PEAK_FLOPS key), HBM and platform."""

    name: str
    device_kind: str
    hbm_gib: float
    platform: str  # "tpu" or "gpu": decides model.dtype=auto and the matmul layouts
    note: str = ""

    @property
    def peak_flops(self) -> float:
        return PUBLISHED_PEAK_FLOPS[self.device_kind]

    @property
    def hbm_bytes(self) -> int:
        return int(self.hbm_gib * 2**30)


HARDWARE = {
    hw.name: hw
    for hw in (
        Hardware("v4", "TPU v4", 32, "tpu"),
        Hardware("v5e", "TPU v5e", 16, "tpu"),
        Hardware("v5p", "TPU v5p", 95, "tpu"),
        Hardware("v6e", "TPU v6e", 32, "tpu"),
        Hardware("a100", "NVIDIA A100", 80, "gpu", "the 80 GB part (the 40 GB one has half)"),
        Hardware("h100", "NVIDIA H100", 80, "gpu", "SXM; the PCIe card peaks at 756 TFLOP/s"),
        Hardware("h200", "NVIDIA H200", 141, "gpu"),
    )
}
ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "trillium": "v6e", "a100-80gb": "a100"}


def lookup(name: str) -> Hardware:
    """A preset by name (case-insensitive; v5litepod, trillium and a100-80gb are aliases)."""
    key = name.lower()
    hardware = HARDWARE.get(ALIASES.get(key, key))
    if hardware is None:
        raise UsageError(f"--hardware: unknown accelerator {name!r}; known: {', '.join(HARDWARE)}")
    return hardware
