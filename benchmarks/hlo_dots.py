"""Which matmuls of maxlm's compiled CPU train step run in YNNPACK or MKL, and in which dtypes.

    python benchmarks/hlo_dots.py small model.dtype=bfloat16

XLA:CPU runs a dot fast only inside a YNNPACK fusion (row-major operands, contracted axis of
the left operand last, f32 x f32 -> f32 or bf16 x bf16 -> f32); any other dot runs on XLA's
generic path, and bf16 dots may be upcast to f32 first. With the `mkl` extra, the layers' and
the head's products are MKL custom calls instead (`maxlm/mkl.py`). Prints one line per product
of the optimized HLO: where it runs, output and operand types, and the jax op it came from.
"""

from __future__ import annotations

import collections
import re
import sys
from pathlib import Path


def dots(hlo: str) -> list[tuple[str, str, list[str], str]]:
    """(ynn|generic|mkl, output type, operand types, op name) for every product in `hlo`."""
    computations: dict[str, list[str]] = {}
    current = None
    for line in hlo.splitlines():
        header = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$", line)
        if header and not line.startswith(" "):
            current = header.group(1)
            computations[current] = []
        elif current:
            computations[current].append(line)
    in_ynn = {
        call.group(1)
        for lines in computations.values()
        for line in lines
        if "__ynn_fusion" in line and (call := re.search(r"calls=%?([\w.\-]+)", line))
    }
    types = dict(re.findall(r"%([\w.\-]+) = (\w+\[[\d,]*\])", hlo))
    found = []
    for name, lines in computations.items():
        for line in lines:
            dot = re.search(r"= (\w+\[[\d,]*\])\S* dot\(%([\w.\-]+), %([\w.\-]+)\)", line)
            mkl = re.search(
                r"= (\w+\[[\d,]*\])\S* custom-call\(%([\w.\-]+), %([\w.\-]+)(?:, %[\w.\-]+)?\).*"
                r'custom_call_target="maxlm_mkl_gemm',
                line,
            )
            if dot or mkl:
                op = re.search(r'op_name="([^"]+)"', line)
                where = "mkl" if mkl else "ynn" if name in in_ynn else "generic"
                dot = dot or mkl
                operands = [types.get(dot.group(2), "?"), types.get(dot.group(3), "?")]
                found.append((where, dot.group(1), operands, op.group(1) if op else ""))
    return found


def main() -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from train_throughput import build_shape

    _, built, _, _ = build_shape(sys.argv[1], sys.argv[2:])
    found = dots(built.train.as_text())
    for where, out, operands, op in found:
        print(f"{where:8s} {out:22s} <- {' x '.join(operands):44s} {op[-60:]}")
    print(dict(collections.Counter(where for where, *_ in found)))


if __name__ == "__main__":
    main()
