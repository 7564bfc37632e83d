"""Network figures (Fig 5 / Fig 10 layout): both sizes, labelled axes, finite data, readable
fonts, no overlapping tick labels, and a redraw from the saved tables."""
import json
import math

import matplotlib.pyplot as plt
import pytest
from matplotlib.lines import Line2D
from PIL import Image

from nclab import figstyle
from nclab.nets.measure import METRIC_COLUMNS
from nclab.nets.plots import PANELS, figure, plot_runs, redraw
from nclab.rundir import RunDir

LEVELS = ["stem", "layer1", "layer2", "layer3", "layer4", "penultimate"]


def fake_rows(epochs=(0, 5, 10, 15, 20, 25, 30, 100, 150, 200), ncc: bool = False) -> list[dict]:
    """Metric rows shaped like metrics.csv, with a NaN, an inf and a zero mixed in."""
    rows = []
    for e in epochs:
        t = 1 + e
        for split in ("train", "test"):
            rows += [dict(epoch=e, split=split, layer="network", metric="accuracy", value=1 - 0.5 / t),
                     dict(epoch=e, split=split, layer="network", metric="objective", value=1 / t)]
            if ncc:
                rows.append(dict(epoch=e, split=split, layer="penultimate", metric="ncc_accuracy", value=1 - 0.4 / t))
        for i, level in enumerate(LEVELS):
            rows += [dict(epoch=e, split="train", layer=level, metric="nc1", value=(10 - i) / t),
                     dict(epoch=e, split="test", layer=level, metric="nc1", value=(12 - i) / t ** 0.5),
                     dict(epoch=e, split="train", layer=level, metric="nc2_etf", value=1 / (i + t))]
        for m in ("nc3_of", "nc3_duality_of", "nc3_etf", "nc3_duality_etf"):
            rows.append(dict(epoch=e, split="train", layer="penultimate", metric=m, value=2 / t))
    rows.append(dict(epoch=1, split="train", layer="penultimate", metric="nc1", value=math.nan))
    rows.append(dict(epoch=2, split="train", layer="penultimate", metric="nc2_etf", value=math.inf))
    rows.append(dict(epoch=3, split="train", layer="penultimate", metric="nc3_of", value=0.0))
    return rows


RUNS = {"mse_nobias": fake_rows(), "ce_bias": fake_rows(ncc=True)}
FRAMES = {"mse_nobias": "of", "ce_bias": "etf"}


@pytest.mark.parametrize("size", figstyle.SIZES)
@pytest.mark.parametrize("n_runs", [1, 2])
def test_figure_layout_labels_finite_fonts(size, n_runs):
    runs = dict(list(RUNS.items())[:n_runs])
    with plt.rc_context(figstyle.rc(size)):
        fig = figure(runs, size, titles={r: r for r in runs}, nc3_frames=FRAMES)
        try:
            assert len(fig.axes) == PANELS * n_runs
            for ax in fig.axes:
                assert ax.get_xlabel() and ax.get_ylabel(), ax
                assert ax.lines, ax
                for line in ax.get_lines():
                    assert isinstance(line, Line2D)
                    ys = [float(v) for v in line.get_ydata()]
                    assert all(math.isfinite(v) for v in ys)
                    if ax.get_yscale() == "log":
                        assert all(v > 0 for v in ys)
            assert figstyle.overlapping_tick_labels(fig) == []
            assert figstyle.smallest_font_pt(fig) >= figstyle.MIN_FONT_PT
            assert fig.get_figwidth() == pytest.approx(figstyle.WIDTH_IN[size])
        finally:
            plt.close(fig)


def test_accuracy_panel_shows_ncc_when_present():
    with plt.rc_context(figstyle.rc("full")):
        fig = figure(RUNS, "full", nc3_frames=FRAMES)
        try:
            labels = [[t.get_text() for t in ax.get_legend().get_texts()] for ax in fig.axes
                      if ax.get_ylabel() == "accuracy"]
            assert labels[0] == ["train", "held-out"] and "NCC train" in labels[1] and "NCC held-out" in labels[1]
        finally:
            plt.close(fig)


def test_held_out_lines_in_nc1_and_depth_panels():
    with plt.rc_context(figstyle.rc("full")):
        fig = figure({"mse_nobias": RUNS["mse_nobias"]}, "full", nc3_frames=FRAMES)
        try:
            nc1_panel, depth_panel = ([t.get_text() for t in ax.get_legend().get_texts()] for ax in fig.axes
                                      if ax.get_ylabel() == "NC1")
            assert nc1_panel == ["train", "held-out"]
            assert depth_panel == ["epoch 0", "epoch 200", "held-out"]
        finally:
            plt.close(fig)


def _open(path):
    rd = RunDir(path, mode="new")
    rd.open()
    rd.begin_part("figures", {})
    return rd


def test_plot_runs_files_and_png_width(tmp_path):
    rd = _open(tmp_path / "out")
    try:
        paths = plot_runs(RUNS, "figure", rd.folder(), nc3_frames=FRAMES)
    finally:
        rd.complete_part("figures")
        rd.close()
    assert sorted(p.name for p in paths) == ["figure-column.pdf", "figure-column.png", "figure.pdf", "figure.png"]
    for size, name in (("full", "figure.png"), ("column", "figure-column.png")):
        width = Image.open(tmp_path / "out" / name).size[0]
        assert width == pytest.approx(figstyle.WIDTH_IN[size] * figstyle.PNG_DPI, abs=2)


def test_redraw_round_trip(tmp_path):
    out = tmp_path / "exp"
    rd = _open(out)
    try:
        folder = rd.folder()
        folder.write_csv("metrics.csv", [{"run": r, **row} for r, rows in RUNS.items() for row in rows],
                         ["run", *METRIC_COLUMNS])
        cfg = dict(dataset="mnist", model="resnet18", width=1.0, loss="mse", bias=False, epochs=200,
                   batch_size=128, momentum=0.9)
        summary = {"experiment": "fig5", "data_source": "MNIST", "real_data": True,
                   "runs": {"mse_nobias": {"config": cfg, "sgd_lr": 0.01, "sgd_weight_decay": 2.5e-3,
                                           "final_epoch": 200, "nc3_frame": "of"},
                            "ce_bias": {"config": cfg | {"loss": "ce", "bias": True}, "sgd_lr": 0.01,
                                        "sgd_weight_decay": 5e-4, "final_epoch": 200, "nc3_frame": "etf"}}}
        folder.write_json("summary.json", summary)
        first = redraw(out, folder)
        names = {"figure.pdf", "figure.png", "figure-column.pdf", "figure-column.png", "caption.md"}
        assert {p.name for p in first} == names
        for name in names:
            (out / name).unlink()
        second = redraw(out, folder)
        assert {p.name for p in second} == names and all(p.is_file() for p in second)
    finally:
        rd.complete_part("figures")
        rd.close()
    caption = (out / "caption.md").read_text()
    for text in ("mnist", "resnet18", "width 1", "without classifier bias", "with classifier bias",
                 "lr 0.01", "weight decay 0.0025", "weight decay 0.0005", "200 epochs", "batch size 128",
                 "collapse grows through training", "NC1 decreases with depth"):
        assert text in caption, text


def test_redraw_single_train_run(tmp_path):
    out = tmp_path / "run"
    rd = _open(out)
    try:
        folder = rd.folder()
        folder.write_csv("metrics.csv", RUNS["mse_nobias"], METRIC_COLUMNS)
        folder.write_json("summary.json", {"config": {"dataset": "digits", "loss": "mse", "bias": False},
                                           "nc3_frame": "of", "data_source": "digits", "real_data": False})
        paths = redraw(out, folder)
    finally:
        rd.complete_part("figures")
        rd.close()
    assert all(p.is_file() for p in paths) and len(paths) == 5
    assert "no bias" in json.dumps((out / "caption.md").read_text()) or "without" in (out / "caption.md").read_text()


def test_train_run_figures_redrawn_from_its_tables(tmp_path):
    """A real (tiny) `nclab train` folder: both sizes and the caption; redraw brings them back."""
    from tests.test_nets_train import TINY
    from nclab.nets.settings import TrainSettings
    from nclab.nets.training import settings_record, train

    settings = TrainSettings(**(TINY | {"epochs": 2, "eval_every": 1}))
    out = tmp_path / "run"
    train(settings, out, quiet=True)
    names = {"figure.pdf", "figure.png", "figure-column.pdf", "figure-column.png", "caption.md"}
    assert names <= {p.name for p in out.iterdir()}
    for name in names:
        (out / name).unlink()
    with RunDir(out, mode="resume") as rd:
        rd.begin_part("train", settings_record(settings), again=True)
        paths = redraw(out, rd.folder())
        rd.complete_part("train")
    assert {p.name for p in paths} == names and all(p.is_file() for p in paths)
