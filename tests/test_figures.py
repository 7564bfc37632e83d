"""Every kind of figure at both sizes: layout, labels, finite data, no overlapping ticks, fonts
>= 7 pt, files and PNG widths; `nclab plot` redraws from saved tables. No pixel baselines."""
from __future__ import annotations

import json

import matplotlib.image as mpimg
import numpy as np
import pytest

from nclab import figstyle
from nclab.cli import main
from nclab.rundir import RunDir, RunDirError

FILES = ("figure.pdf", "figure.png", "figure-column.pdf", "figure-column.png")


@pytest.fixture
def checked(monkeypatch):
    """Wrap figstyle.save: every figure drawn is checked before it is saved; returns the checks' log."""
    log = []
    original = figstyle.save

    def save(draw, folder, stem="figure", sizes=figstyle.SIZES, formats=("pdf", "png")):
        def checked_draw(size):
            fig = draw(size)
            log.append((size, _check(fig)))
            return fig
        return original(checked_draw, folder, stem, sizes=sizes, formats=formats)

    monkeypatch.setattr(figstyle, "save", save)
    return log


def _check(fig) -> int:
    axes = fig.axes
    for ax in axes:
        assert ax.get_xlabel() and ax.get_ylabel(), ax
        for line in ax.get_lines():
            x = np.asarray(line.get_xdata(), float)
            y = np.asarray(line.get_ydata(), float)
            assert np.isfinite(x).all() and np.isfinite(y).all(), (ax.get_ylabel(), line.get_label())
            if ax.get_yscale() == "log" and line.get_gid() != "ref" and y.size:
                assert (y > 0).all()
    assert figstyle.overlapping_tick_labels(fig) == []
    assert figstyle.smallest_font_pt(fig) >= figstyle.MIN_FONT_PT
    return len(axes)


def _files(folder):
    for name in FILES:
        assert (folder / name).is_file() and (folder / name).stat().st_size > 0, name
    for name, width in (("figure.png", figstyle.WIDTH_IN["full"]), ("figure-column.png", figstyle.WIDTH_IN["column"])):
        w = mpimg.imread(folder / name).shape[1]
        assert abs(w - width * figstyle.PNG_DPI) <= 4, (name, w)


@pytest.fixture(scope="module")
def ufm_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("figs") / "r"
    assert main(["reproduce", "fig3", "fig4", "ufm-unregularized", "ufm-ce", "--iterations", "400",
                 "--out", str(out), "--quiet"]) == 0
    return out


@pytest.mark.parametrize("name, panels, restarts", [
    ("fig3", 5, 1), ("fig4", 5, 4), ("ufm-unregularized", 5, 1), ("ufm-ce", 4, 1)])
def test_ufm_figures(ufm_runs, checked, name, panels, restarts):
    d = ufm_runs / name
    _files(d)
    s = json.loads((d / "summary.json").read_text())
    caption = (d / "caption.md").read_text()
    assert s["verdict_line"] in caption and "K=" in caption and "λ=" in caption
    table = np.genfromtxt(d / "restarts.csv", delimiter=",", names=True)
    assert len(np.unique(table["restart"])) == restarts
    # redraw this folder's figures from its tables under the checks, and count panels
    from nclab.experiments.runner import draw_ufm
    with RunDir(ufm_runs, mode="resume") as rd, rd.redraw(name):
        draw_ufm(rd.folder(name))
    assert sorted(size for size, _ in checked) == ["column", "full"]
    assert all(n == panels for _, n in checked)


def _capture(monkeypatch, maker: str) -> dict:
    """{size: figure} of every figure that nclab.plots.<maker>(size, ...) makes while the test runs."""
    from nclab import plots

    made, original = {}, getattr(plots, maker)

    def keep(size, *args, **kw):
        made[size] = fig = original(size, *args, **kw)
        return fig

    monkeypatch.setattr(plots, maker, keep)
    return made


def test_ufm_figure_shows_every_restart_and_f_star_as_text(ufm_runs, monkeypatch):
    made = _capture(monkeypatch, "ufm_figure")
    from nclab.experiments.runner import draw_ufm
    for name in ("fig4", "ufm-unregularized"):
        with RunDir(ufm_runs, mode="resume") as rd, rd.redraw(name):
            draw_ufm(rd.folder(name), formats=("png",))
        fig = made["full"]
        objective = fig.axes[0]
        if name == "fig4":  # four restarts thin + the best, and the f* line
            assert len(objective.get_lines()) == 4 + 1 + 1
        else:  # f* = 0: said in the legend, no log line
            labels = objective.get_legend_handles_labels()[1]
            assert any("f* = 0" in t for t in labels)
            assert all(l.get_gid() != "ref" for l in objective.get_lines())
        assert fig._suptitle.get_text().count("\n") >= 2  # title, setting, verdict


@pytest.mark.parametrize("kind, extra", [("plain", []), ("extended", ["--init-std", "0.01", "0.5"])])
def test_sweep_figures(tmp_path, checked, kind, extra):
    out = tmp_path / kind
    assert main(["sweep", kind, "--points", "6", "--steps", "300", "--out", str(out), "--quiet", *extra]) == 0
    _files(out)
    assert sorted(size for size, _ in checked) == ["column", "full"] and all(n == 4 for _, n in checked)
    rows = np.genfromtxt(out / "sweep.csv", delimiter=",", names=True)
    assert "converged" in rows.dtype.names


def test_sweep_figure_marks_unconverged_and_shares_x(tmp_path, monkeypatch):
    made = _capture(monkeypatch, "sweep_figure")
    assert main(["sweep", "extended", "--points", "5", "--steps", "200", "--init-std", "0.01",
                 "--out", str(tmp_path / "e"), "--quiet"]) == 0
    fig = made["full"]
    assert len({ax.get_xlim() for ax in fig.axes}) == 1
    texts = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "not converged" in texts and any("c_crit" in t for t in texts) and "theory" in texts
    hollow = [l for ax in fig.axes for l in ax.get_lines() if l.get_markerfacecolor() == "none"]
    assert hollow


def test_plot_round_trip_and_errors(ufm_runs, tmp_path, capsys):
    for name in FILES + ("caption.md",):
        (ufm_runs / "fig3" / name).unlink()
    assert main(["plot", str(ufm_runs / "fig3" / ".."), "--size", "full", "--format", "svg"]) == 0
    assert (ufm_runs / "fig3" / "figure.svg").is_file() and not (ufm_runs / "fig3" / "figure.png").exists()
    assert main(["plot", str(ufm_runs)]) == 0
    for name in FILES + ("caption.md",):
        assert (ufm_runs / "fig3" / name).is_file(), name
    capsys.readouterr()
    assert main(["plot", str(tmp_path / "missing")]) == 2
    assert main(["plot", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "no such folder" in err[0] and "not an nclab run" in err[1]


def test_rundir_redraw_writes_as_an_existing_part(tmp_path):
    with RunDir(tmp_path / "r") as rd:
        assert rd.begin_part("p", {"a": 1})
        rd.write_text("f.txt", "one")
        rd.complete_part("p")
    with RunDir(tmp_path / "r", mode="resume") as rd:
        with pytest.raises(RunDirError):  # another owner: the plain write is refused
            rd.write_text("f.txt", "two")
        with rd.redraw("p"):
            rd.write_text("f.txt", "two")
            rd.write_text("g.txt", "new")
        assert rd.manifest["files"]["g.txt"]["part"] == "p" and rd.part("p")["complete"]
        with pytest.raises(RunDirError), rd.redraw("nope"):
            pass
    assert (tmp_path / "r" / "f.txt").read_text() == "two"


def test_plot_redraws_a_train_run_through_the_network_code(tmp_path):
    from tests.test_nets_train import TINY
    from nclab.nets.settings import TrainSettings
    from nclab.nets.training import train

    out = tmp_path / "run"
    train(TrainSettings(**(TINY | {"epochs": 2, "eval_every": 1})), out, quiet=True)
    for name in ("figure.png", "figure-column.png"):
        (out / name).unlink()
    assert main(["plot", str(out)]) == 0
    assert (out / "figure.png").is_file() and (out / "figure-column.png").is_file()
