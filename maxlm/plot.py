"""PNG dashboards of training runs from their metrics.jsonl: `python -m maxlm.plot RUN_DIR ...`.

Several runs are overlaid, one colour each. Figures are built without pyplot (no display, no
global backend switch), so a notebook that imports this module keeps its own backend.
"""

from __future__ import annotations

import json
import math
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import PercentFormatter

from maxlm import cli

PANEL_INCHES = (6.0, 3.2)  # (width, height) of one panel; two panels per row
DPI = 100
EVAL_MARKERS = "os^vDP*X"  # eval_loss, then eval_loss/<source> in sorted order


class PlotError(ValueError):
    """A run directory without readable metrics, or an output path that is not a PNG."""


@dataclass(frozen=True)
class Run:
    """A run's label and its metrics records, each reduced to its finite numbers."""

    label: str
    records: list[dict[str, float]]


class Panel(NamedTuple):
    title: str
    key: str
    ylabel: str
    log_y: bool = False
    percent: bool = False


LOSS_PANEL = Panel("loss", "loss_avg", "loss (nats/token)")
PANELS = [
    LOSS_PANEL,
    Panel("learning rate", "lr", "lr"),
    Panel("batch size", "batch_tokens", "tokens per step"),
    Panel("grad norm", "grad_norm", "global L2 norm", log_y=True),
    Panel("throughput", "tokens_per_s", "tokens/s"),
    Panel("MFU", "mfu", "of peak", percent=True),
]
NOISE_PANEL = Panel(
    "gradient noise scale", "critical_batch_tokens", "critical batch (tokens)", log_y=True
)


def read_metrics(path: Path) -> list[dict[str, float]]:
    """The records of a metrics.jsonl, keeping finite numbers only (non-finite values are
    logged as strings like "nan"); a line that is not a JSON object is a PlotError."""
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise PlotError(f"{path}:{number}: not JSON ({err.msg})") from None
        if not isinstance(record, dict):
            raise PlotError(f"{path}:{number}: not a JSON object")
        records.append({k: float(v) for k, v in record.items() if _finite(v)})
    return records


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def labels(run_dirs: Sequence[Path]) -> list[str]:
    """Each run dir's name, with as many parent dirs as it takes to tell equal names apart (the
    same dir given twice is numbered)."""
    parts = [p.resolve().parts for p in run_dirs]
    seen: Counter[str] = Counter()
    found = []
    for p in parts:
        others = [q for q in parts if q != p]
        depth = 1
        while depth < len(p) and any(q[-depth:] == p[-depth:] for q in others):
            depth += 1
        label = "/".join(p[-depth:])
        seen[label] += 1
        found.append(label if seen[label] == 1 else f"{label} ({seen[label]})")
    return found


def load_runs(run_dirs: Sequence[str | Path]) -> list[Run]:
    """The runs of `run_dirs`, labelled by `labels`; a missing dir or metrics.jsonl is a
    PlotError."""
    dirs = [Path(d) for d in run_dirs]
    runs = []
    for run_dir, label in zip(dirs, labels(dirs), strict=True):
        if not run_dir.is_dir():
            raise PlotError(f"no such run directory: {run_dir}")
        path = run_dir / "metrics.jsonl"
        if not path.is_file():
            raise PlotError(f"no metrics.jsonl in {run_dir}")
        runs.append(Run(label, read_metrics(path)))
    return runs


def x_key(runs: Sequence[Run]) -> str:
    """Tokens seen when every run (with records) logged them, else steps: one x axis for all."""
    if all(any("tokens_seen" in r for r in run.records) for run in runs if run.records):
        return "tokens_seen"
    return "step"


def series(run: Run, key: str, x: str) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) of the records with `key`; a record without `x` (an evaluation at a step that was
    not logged) takes it interpolated by step between the logged records."""
    logged = [r for r in run.records if x in r and "step" in r]
    steps, at = [r["step"] for r in logged], [r[x] for r in logged]
    xs, ys = [], []
    for r in run.records:
        if key in r and x in r:
            xs.append(r[x])
        elif key in r and logged and "step" in r:
            xs.append(float(np.interp(r["step"], steps, at)))
        else:
            continue
        ys.append(r[key])
    return np.asarray(xs), np.asarray(ys)


def batch_key(run: Run) -> str:
    """Batch slots per step (`batch_tokens`), or the tokens read when a run lacks them."""
    return "batch_tokens" if any("batch_tokens" in r for r in run.records) else "tokens"


def dashboard(runs: Sequence[Run]) -> Figure:
    """The dashboard of `runs`: one panel per `PANELS` entry (eval losses as markers on the
    loss panel), and the noise scale when any run measured it. Lines carry their run's label."""
    measured = any(NOISE_PANEL.key in r for run in runs for r in run.records)
    panels = [*PANELS, NOISE_PANEL] if measured else PANELS
    rows = -(-len(panels) // 2)
    fig = Figure(
        figsize=(2 * PANEL_INCHES[0], rows * PANEL_INCHES[1]), dpi=DPI, layout="constrained"
    )
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, 2, squeeze=False).ravel()
    for extra in axes[len(panels) :]:
        extra.remove()
    x = x_key(runs)
    for ax, panel in zip(axes, panels, strict=False):
        ax.set(title=panel.title, ylabel=panel.ylabel, xlabel=x.replace("_", " "))
        ax.grid(alpha=0.3)
        points = 0
        for i, run in enumerate(runs):
            colour = f"C{i % 10}"
            if panel is LOSS_PANEL:
                points += _draw_loss(ax, run, x, colour)
                continue
            xs, ys = series(run, batch_key(run) if panel.key == "batch_tokens" else panel.key, x)
            if panel.log_y:  # a noise-scale estimate can be negative: not a batch size
                xs, ys = xs[ys > 0], ys[ys > 0]
            ax.plot(xs, ys, color=colour, label=run.label)
            points += xs.size
        if not points:
            ax.text(0.5, 0.5, f"no {panel.key} logged", ha="center", transform=ax.transAxes)
        elif panel.log_y:
            ax.set_yscale("log")
        if panel.percent:
            ax.yaxis.set_major_formatter(PercentFormatter(xmax=1))
    axes[0].legend(fontsize="small")
    fig.suptitle(", ".join(run.label for run in runs))
    return fig


def _draw_loss(ax: Axes, run: Run, x: str, colour: str) -> int:
    """Train loss (the mean since the previous logged step) as a line, evaluations as markers:
    `eval_loss` filled, each `eval_loss/<source>` hollow, one shape per key; the points drawn."""
    xs, ys = series(run, "loss_avg", x)
    ax.plot(xs, ys, color=colour, label=run.label)
    points = xs.size
    sources = sorted({k for r in run.records for k in r if k.startswith("eval_loss/")})
    for i, key in enumerate(["eval_loss", *sources]):
        xs, ys = series(run, key, x)
        if xs.size:
            face = colour if key == "eval_loss" else "none"
            marker = EVAL_MARKERS[i % len(EVAL_MARKERS)]
            ax.plot(xs, ys, marker, color=colour, mfc=face, label=f"{run.label} {key}")
            points += xs.size
    return points


def plot_runs(run_dirs: Sequence[str | Path], out: str | Path | None = None) -> Path:
    """Render the dashboard of `run_dirs` (overlaid) to a PNG; its path (default:
    <first run dir>/dashboard.png)."""
    if not run_dirs:
        raise PlotError("no run directories to plot")
    path = Path(out) if out is not None else Path(run_dirs[0]) / "dashboard.png"
    if path.suffix.lower() != ".png":
        raise PlotError(f"{path}: the dashboard is a PNG; name it *.png")
    fig = dashboard(load_runs(run_dirs))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """Write the dashboard and print its path; 2 for a bad argument or run dir (one line)."""
    parser = cli.Parser(
        prog="python -m maxlm.plot",
        description="A PNG dashboard of one or more runs' metrics.jsonl, overlaid: loss, lr, "
        "batch size, grad norm, tokens/s, MFU and the noise scale (docs/observability.md).",
    )
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="Run directories.")
    parser.add_argument("--out", metavar="FILE", help="Output PNG (default: in the first run).")
    try:
        args = parser.parse_args(sys.argv[1:] if argv is None else argv)
        path = plot_runs(args.run_dirs, args.out)
    except (cli.UsageError, PlotError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
