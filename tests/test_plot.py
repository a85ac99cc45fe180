"""maxlm.plot: the dashboard of a real 4-step run draws exactly its metrics.jsonl; overlays;
the noise-scale panel; gaps and non-finite values in synthesized records; the CLI's errors.

The drawn data are read back from the Figure that `dashboard` returns, so no test compares
pixels with a golden image (matplotlib versions differ in antialiasing)."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from matplotlib.axes import Axes
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure
from matplotlib.image import imread
from training import overrides, read_jsonl

from maxlm import config, plot
from maxlm.train import train

TITLES = ["loss", "learning rate", "batch size", "grad norm", "throughput", "MFU"]
NOISE = "gradient noise scale"


@pytest.fixture(scope="module")
def run_dir(corpus, tmp_path_factory) -> Path:
    """4 steps of the tiny model, every step logged, evaluated once (at the end)."""
    run_dir = tmp_path_factory.mktemp("plot") / "run"
    cfg = config.load(
        None,
        overrides(
            corpus,
            run_dir,
            "train.steps=4",
            "metrics.log_every_steps=1",
            "metrics.tensorboard=false",
            "eval.every_steps=0",
            "eval.batches=1",
            "checkpoint.every_steps=0",
        ),
    )
    train(cfg)
    return run_dir


def write_metrics(run_dir: Path, records: list[dict]) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run_dir


def panel(fig: Figure, title: str) -> Axes:
    (ax,) = [ax for ax in fig.axes if ax.get_title() == title]
    return ax


def lines(ax: Axes, label: str) -> tuple[np.ndarray, np.ndarray]:
    (line,) = [line for line in ax.get_lines() if line.get_label() == label]
    return np.asarray(line.get_xdata()), np.asarray(line.get_ydata())


# --------------------------------------------------------------------------- a real run


@pytest.mark.slow
def test_every_panel_draws_the_logged_values_against_tokens_seen(run_dir):
    records, (evaluation,) = read_jsonl(run_dir)
    fig = plot.dashboard(plot.load_runs([run_dir]))
    assert [ax.get_title() for ax in fig.axes] == TITLES
    seen = [r["tokens_seen"] for r in records]
    keys = {"loss": "loss_avg", "learning rate": "lr", "batch size": "batch_tokens"}
    keys |= {"grad norm": "grad_norm", "throughput": "tokens_per_s", "MFU": "mfu"}
    for title, key in keys.items():
        x, y = lines(panel(fig, title), "run")
        np.testing.assert_array_equal(x, seen)
        np.testing.assert_array_equal(y, [r[key] for r in records])
        assert panel(fig, title).get_xlabel() == "tokens seen"
    x, y = lines(panel(fig, "loss"), "run eval_loss")
    assert (x.tolist(), y.tolist()) == ([evaluation["tokens_seen"]], [evaluation["eval_loss"]])
    assert panel(fig, "grad norm").get_yscale() == "log"
    assert panel(fig, "loss").get_yscale() == "linear"


@pytest.mark.slow
def test_png_has_the_figure_size_a_line_in_every_panel_and_renders_the_same_twice(run_dir):
    path = plot.plot_runs([run_dir])
    assert path == run_dir / "dashboard.png"
    image = imread(path)
    assert image.shape == (3 * 320, 1200, 4)  # 3 rows of 6.0 x 3.2 inch panel pairs, 100 dpi
    fig = plot.dashboard(plot.load_runs([run_dir]))
    fig.canvas.draw()
    line_colour = to_rgb("C0")
    for ax in fig.axes:
        box = ax.get_window_extent()  # pixels from the bottom left
        region = image[960 - int(box.y1) : 960 - int(box.y0), int(box.x0) : int(box.x1), :3]
        # the run's line crosses the panel: more pixels of its colour than half the width
        inked = (np.abs(region - line_colour).max(axis=-1) < 0.05).sum()
        assert inked > region.shape[1] / 2, ax.get_title()
    out = run_dir.parent / "again" / "d.png"
    assert plot.plot_runs([run_dir], out) == out
    np.testing.assert_array_equal(imread(out), image)


@pytest.mark.slow
def test_two_runs_overlay_one_line_each_labelled_by_their_dirs(run_dir, tmp_path):
    first = shutil.copytree(run_dir, tmp_path / "a" / "run")
    second = tmp_path / "b" / "run"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    write_metrics(second, [{**r, "loss_avg": r["loss_avg"] + 1} for r in records])
    runs = plot.load_runs([first, second])
    assert [run.label for run in runs] == ["a/run", "b/run"]
    fig = plot.dashboard(runs)
    for ax in fig.axes:
        runs_lines = [line for line in ax.get_lines() if "eval" not in str(line.get_label())]
        assert [line.get_label() for line in runs_lines] == ["a/run", "b/run"], ax.get_title()
        assert runs_lines[0].get_color() != runs_lines[1].get_color()
    legend = [text.get_text() for text in panel(fig, "loss").get_legend().get_texts()]
    assert legend == ["a/run", "a/run eval_loss", "b/run", "b/run eval_loss"]
    _, shifted = lines(panel(fig, "loss"), "b/run")
    np.testing.assert_allclose(shifted, [r["loss_avg"] + 1 for r in records])


# --------------------------------------------------------------------------- synthesized records


def test_noise_scale_panel_only_when_measured_with_its_positive_values_on_a_log_scale(tmp_path):
    values = ["nan", 1000.0, "inf", 2000.0, -50.0]
    records = [
        {"step": s, "loss_avg": 5.0, "tokens_seen": 100.0 * s, "critical_batch_tokens": v}
        for s, v in enumerate(values, start=1)
    ]
    fig = plot.dashboard(plot.load_runs([write_metrics(tmp_path / "noisy", records)]))
    assert [ax.get_title() for ax in fig.axes] == [*TITLES, NOISE]
    x, y = lines(panel(fig, NOISE), "noisy")
    assert (x.tolist(), y.tolist()) == ([200.0, 400.0], [1000.0, 2000.0])
    assert panel(fig, NOISE).get_yscale() == "log"
    for r in records:
        del r["critical_batch_tokens"]
    fig = plot.dashboard(plot.load_runs([write_metrics(tmp_path / "quiet", records)]))
    assert [ax.get_title() for ax in fig.axes] == TITLES


def test_gaps_non_finite_values_unknown_keys_and_an_eval_between_logged_steps(tmp_path):
    records = [
        {"step": 2, "loss_avg": 5.0, "grad_norm": 1.0, "tokens": 90.0, "tokens_seen": 200.0},
        {"step": 3, "eval_loss": 4.5, "eval_loss/web": 4.8, "goodput/badput_s": 1.5},
        {"step": 4, "loss_avg": 4.0, "grad_norm": "nan", "tokens": 95.0, "tokens_seen": 400.0},
    ]
    fig = plot.dashboard(plot.load_runs([write_metrics(tmp_path / "run", records)]))
    loss = panel(fig, "loss")
    assert lines(loss, "run eval_loss")[0].tolist() == [300.0]  # by step, between 2 and 4
    assert lines(loss, "run eval_loss/web")[1].tolist() == [4.8]
    assert lines(panel(fig, "grad norm"), "run")[1].tolist() == [1.0]
    assert lines(panel(fig, "batch size"), "run")[1].tolist() == [90.0, 95.0]  # tokens read
    assert [t.get_text() for t in panel(fig, "MFU").texts] == ["no mfu logged"]


def test_steps_are_the_x_axis_when_a_run_has_no_tokens_seen(tmp_path):
    with_tokens = write_metrics(tmp_path / "new", [{"step": 1, "loss_avg": 3.0, "tokens_seen": 9}])
    without = write_metrics(tmp_path / "old", [{"step": 5, "loss_avg": 2.0}])
    fig = plot.dashboard(plot.load_runs([with_tokens, without]))
    assert panel(fig, "loss").get_xlabel() == "step"
    assert lines(panel(fig, "loss"), "old")[0].tolist() == [5]


def test_labels_tell_equal_names_apart(tmp_path):
    dirs = [tmp_path / "a" / "run", tmp_path / "b" / "run", tmp_path / "c"]
    assert plot.labels(dirs) == ["a/run", "b/run", "c"]
    assert plot.labels([dirs[0], dirs[0]]) == ["run", "run (2)"]


# --------------------------------------------------------------------------- CLI


def test_cli_prints_the_path_it_wrote(tmp_path, capsys):
    run_dir = write_metrics(tmp_path / "run", [{"step": 1, "loss_avg": 3.0, "tokens_seen": 9}])
    out = tmp_path / "plots" / "d.png"
    assert plot.main([str(run_dir), "--out", str(out)]) == 0
    assert capsys.readouterr().out == f"{out}\n"
    assert imread(out).shape == (960, 1200, 4)


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "error: no such run directory: {dir}"),
        ("empty", "error: no metrics.jsonl in {dir}"),
        ("bad json", "error: {dir}/metrics.jsonl:2: not JSON (Expecting value)"),
        ("not an object", "error: {dir}/metrics.jsonl:1: not a JSON object"),
        ("pdf", "error: {dir}/d.pdf: the dashboard is a PNG; name it *.png"),
        ("no args", "error: the following arguments are required: RUN_DIR"),
    ],
)
def test_cli_errors_are_one_line_and_exit_2(tmp_path, capsys, case, message):
    run_dir = tmp_path / "run"
    argv = [str(run_dir)]
    if case != "missing":
        run_dir.mkdir()
    if case == "bad json":
        (run_dir / "metrics.jsonl").write_text('{"step": 1}\n{"step": \n')
    if case == "not an object":
        (run_dir / "metrics.jsonl").write_text("[1, 2]\n")
    if case == "pdf":
        write_metrics(run_dir, [{"step": 1}])
        argv += ["--out", str(run_dir / "d.pdf")]
    if case == "no args":
        argv = []
    assert plot.main(argv) == 2
    assert capsys.readouterr().err == message.format(dir=run_dir) + "\n"
