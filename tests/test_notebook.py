"""notebooks/maxlm_demo.ipynb: committed without outputs, and executed top to bottom in a Jupyter
kernel (the demo config, a few steps, offline) with the outputs it promises."""

import json
import re
import sys
import time
from pathlib import Path

import nbformat
import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "maxlm_demo.ipynb"
STEPS = 12
CELL_TIMEOUT_S = 600  # one cell; training, compilation included, takes about 30 s here


def test_notebook_is_committed_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code, "the notebook has no code cells"
    for i, cell in enumerate(code):
        assert cell.outputs == [], f"code cell {i} has outputs: clear them before committing"
        assert cell.execution_count is None, f"code cell {i} has an execution count"
    assert nb.metadata.kernelspec.name == "python3"


def outputs_of(cell) -> tuple[str, int]:
    """A code cell's printed text (stdout, stderr, text/plain results) and its PNG count."""
    text, pngs = [], 0
    for out in cell.get("outputs", []):
        if out.output_type == "stream":
            text.append(out.text)
        elif out.output_type in ("display_data", "execute_result"):
            pngs += "image/png" in out.data
            text.append(out.data.get("text/plain", "") + "\n")
    return "".join(text), pngs


@pytest.mark.slow
def test_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
    from nbclient import NotebookClient

    run_dir = tmp_path / "run"
    # the kernel inherits this environment: one CPU device as on a laptop (not conftest's 8), and
    # conftest's faster compile setting
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("XLA_FLAGS", "--xla_backend_optimization_level=0")
    monkeypatch.setenv("MAXLM_NOTEBOOK_STEPS", str(STEPS))
    monkeypatch.setenv("MAXLM_NOTEBOOK_RUN_DIR", str(run_dir))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # jupyter_client starts kernel spec "python3" (argv "python -m ipykernel_launcher") with
    # sys.executable: this interpreter, with maxlm installed
    client = NotebookClient(
        nb, kernel_name="python3", timeout=CELL_TIMEOUT_S, resources={"metadata": {"path": REPO}}
    )
    start = time.monotonic()
    client.execute()  # raises CellExecutionError, with the cell and its traceback, on an error
    print(f"notebook executed in {time.monotonic() - start:.1f} s")

    outputs = [outputs_of(cell) for cell in nb.cells if cell.cell_type == "code"]
    text = "".join(t for t, _ in outputs)

    # the install cell does nothing outside Colab
    assert outputs[0] == ("", 0), outputs[0]
    assert "google.colab" not in sys.modules
    # the backend line
    assert re.search(r"^backend: CPU, 1 device\(s\) of kind 'cpu'$", text, re.M), text[-3000:]
    # training ran STEPS steps and learned
    assert f"done: {STEPS} steps" in text
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    match = re.search(r"train loss ([\d.]+) at step 1 -> ([\d.]+) at step (\d+)", text)
    assert match, text[-3000:]
    first, last, step = float(match[1]), float(match[2]), int(match[3])
    assert step == STEPS and last < first - 1.0, (first, last)
    # two images: the inline loss curve and plot_runs' dashboard
    assert sum(p for _, p in outputs) == 2, [p for _, p in outputs]
    # a continuation of each prompt, not empty
    found = re.findall(r"^--- continuation of .+: (\d+) characters$", text, re.M)
    lengths = [int(n) for n in found]
    assert len(lengths) == 2 and all(n > 0 for n in lengths), text[-3000:]
