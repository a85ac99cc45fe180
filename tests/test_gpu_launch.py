"""docs/gpu.md: its two-process launch commands run as written (on CPU, gloo collectives) and its
XLA flag block parses in the installed jaxlib.

The commands are read from the fenced block between the `two-process-cpu` marker comments; only
the coordinator port and run.dir are replaced (a free port, a temporary directory).
"""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import portpicker
import pytest

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "gpu.md"
DOC_ADDRESS = "127.0.0.1:12355"
DOC_RUN_DIR = "run.dir=runs/two-process"
STEPS = 6  # train.steps in the documented commands
TIMEOUT_S = 300  # for the pair; about 60 s here, compiling and reading the stdlib included


def fenced_block(marker: str) -> str:
    """The body of the first fenced code block after `<!-- marker...-->` in docs/gpu.md."""
    text = DOC.read_text()
    match = re.search(rf"<!-- {marker}\b.*?-->\n```\w*\n(.*?)\n```\n<!-- /{marker} -->", text, re.S)
    assert match, f"docs/gpu.md has no block between <!-- {marker} --> and <!-- /{marker} -->"
    return match[1]


def commands(block: str) -> list[str]:
    """The shell commands of a block: comment lines dropped, backslash continuations joined."""
    lines = [line for line in block.splitlines() if not line.lstrip().startswith("#")]
    return [cmd.strip() for cmd in "\n".join(lines).replace("\\\n", " ").splitlines() if cmd]


def test_documented_xla_flags_parse():
    """XLA aborts on an unknown flag ('Unknown flag in XLA_FLAGS') and on an illegal value; the
    CPU jaxlib parses the GPU flags too (one flag table for all backends)."""
    block = fenced_block("xla-flags")
    shown = subprocess.run(
        ["bash", "-c", f'{block}\nprintf %s "$XLA_FLAGS"'], capture_output=True, text=True
    )
    assert shown.returncode == 0, shown.stderr
    flags = shown.stdout.split()
    assert len(flags) >= 10 and all(f.startswith("--xla_gpu_") for f in flags), flags
    result = subprocess.run(
        [sys.executable, "-c", "import jax; jax.numpy.zeros(1).block_until_ready()"],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": " ".join(flags)},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.slow
def test_documented_two_process_cpu_launch(tmp_path):
    pair = commands(fenced_block("two-process-cpu"))
    assert len(pair) == 2, pair
    address = f"127.0.0.1:{portpicker.pick_unused_port()}"
    run_dir = tmp_path / "run"
    procs = []
    for i, cmd in enumerate(pair):
        assert cmd.count(DOC_ADDRESS) == 1 and cmd.count(DOC_RUN_DIR) == 1, cmd
        assert f"distributed.process_id={i}" in cmd, cmd
        cmd = cmd.replace(DOC_ADDRESS, address).replace(DOC_RUN_DIR, f"run.dir={run_dir}")
        procs.append(
            subprocess.Popen(
                ["bash", "-c", cmd],
                cwd=REPO,
                # files, not pipes: a full pipe would stall a process mid-collective
                stdout=(tmp_path / f"process{i}.out").open("w"),
                stderr=(tmp_path / f"process{i}.err").open("w"),
            )
        )
    start = time.monotonic()
    try:
        for proc in procs:
            proc.wait(timeout=max(1.0, TIMEOUT_S - (time.monotonic() - start)))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    print(f"two-process launch took {time.monotonic() - start:.1f} s")
    for i, proc in enumerate(procs):
        err = (tmp_path / f"process{i}.err").read_text()
        assert proc.returncode == 0, f"process {i} exited {proc.returncode}:\n{err[-3000:]}"

    out = (tmp_path / "process0.out").read_text()
    assert "mesh {'data': 4, 'fsdp': 1, 'tensor': 1} over 4 cpu devices, 2 process(es)" in out, out
    assert f"done: {STEPS} steps" in out, out[-3000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == STEPS
    assert summary["tokens_seen"] == records[-1]["tokens_seen"]
    data = run_dir / "checkpoints" / str(STEPS) / "data"
    assert sorted(p.name for p in data.glob("process_*")) == [
        "process_0-of-2.json",
        "process_1-of-2.json",
    ]
