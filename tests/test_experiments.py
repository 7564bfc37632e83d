"""`nclab reproduce`, `nclab run`, `nclab sweep`: files, fields, round trips, bad configs."""
import csv
import json

import matplotlib.image as mpimg
import numpy as np
import pytest

from nclab.cli import main
from nclab.experiments import config as C

LEVEL_FIELDS = ("nc1", "nc1_trace", "nc2_etf", "nc2_of", "nc3")


@pytest.fixture(scope="module")
def fig3_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("repro")
    assert main(["reproduce", "fig3", "--iterations", "2000", "--out", str(out), "--quiet"]) == 0
    return out


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_reproduce_writes_every_documented_file(fig3_run):
    d = fig3_run / "fig3"
    for name in ("config.toml", "metrics.csv", "summary.json", "figure.png", "figure.pdf"):
        assert (d / name).is_file() and (d / name).stat().st_size > 0, name
    rows = read_csv(d / "metrics.csv")
    assert rows[0]["iteration"] == "0" and rows[-1]["iteration"] == "2000"
    for col in ("objective", "gap") + tuple(f"{lv}.{m}" for lv in ("H1", "H2") for m in LEVEL_FIELDS):
        assert col in rows[0], col
    s = json.loads((d / "summary.json").read_text())
    assert s["objective"] == pytest.approx(float(rows[-1]["objective"]), rel=1e-15)
    assert s["objective_optimal"] == pytest.approx(0.10773572, abs=1e-8)
    for level in ("H1", "H2"):
        assert set(LEVEL_FIELDS) - {"nc1_trace"} <= set(s["levels"][level])
    assert C.load(d / "config.toml").solver.steps == 2000
    assert s["verdict"] in ("optimal", "stationary", "not_converged") and s["verdict_line"].startswith(
        s["verdict"].replace("_", " "))
    assert s["zero_singular_values"] == [] and s["stationary_value"] is not None


def test_figure_is_a_readable_png(fig3_run):
    img = mpimg.imread(fig3_run / "fig3" / "figure.png")
    assert img.ndim == 3 and img.shape[0] > 300 and img.shape[1] > 1200
    assert img[..., :3].std() > 0.05  # not blank


def test_config_round_trip_reproduces_numbers_exactly(fig3_run, tmp_path):
    assert main(["run", str(fig3_run / "fig3" / "config.toml"), "--out", str(tmp_path / "again"), "--quiet"]) == 0
    assert (tmp_path / "again" / "metrics.csv").read_text() == (fig3_run / "fig3" / "metrics.csv").read_text()


def test_report_lists_experiments_and_quick_reproduce_covers_all(tmp_path):
    assert main(["reproduce", "--quick", "--out", str(tmp_path), "--quiet"]) == 0
    text = (tmp_path / "report.md").read_text()
    assert text.count("Smoke run (--quick)") == len(C.builtin_names()) + 1 and "**Verdict: " in text
    for name in C.builtin_names():
        assert f"## {name}:" in text and f"({name}/figure.png)" in text
        assert (tmp_path / name / "summary.json").is_file()
    assert "| final objective |" in text


def test_existing_results_are_not_overwritten_and_resume_skips(fig3_run, capsys):
    before = (fig3_run / "fig3" / "metrics.csv").read_text()
    assert main(["reproduce", "fig3", "--iterations", "2000", "--out", str(fig3_run)]) == 2
    assert "already holds results" in capsys.readouterr().err
    assert main(["reproduce", "fig3", "--iterations", "2000", "--out", str(fig3_run), "--resume"]) == 0
    assert "skipped" in capsys.readouterr().out
    assert (fig3_run / "fig3" / "metrics.csv").read_text() == before


@pytest.mark.parametrize("text, message", [
    ("[model]\nK = 4\nn = 5\ndims = [8]\nlams = [0.1, 0.1]\ncolour = 1\n", "model: unknown key 'colour'"),
    ("[model]\nK = 4\nn = 5\ndims = [8]\nlams = [0.1, -0.1]\n", "model.lams: must be >= 0"),
    ("[model]\nK = 'four'\nn = 5\ndims = [8]\nlams = [0.1, 0.1]\n", "model.K: must be an integer"),
    ("[model]\nK = 4\nn = 5\ndims = [8]\nlams = [0.1, 0.1]\n[solver]\nsteps = 'many'\n", "solver.steps"),
    ("[model]\nK = 4\nn = 5\ndims = [8]\nlams = [0.1]\n", "lams: expected 2"),
    ("[model]\nK = 4\nn = 5\nlams = [0.1, 0.1]\n", "missing required key model.dims"),
    ("[model\nK = 4\n", "not valid TOML"),
    ("[model]\nK = 4\nn = 5\ndims = [8]\nlams = [0.1, 0.1]\n[solver]\nlr = 0\n", "solver.lr"),
])
def test_bad_config_gives_one_line_error_and_writes_nothing(tmp_path, capsys, text, message):
    cfg = tmp_path / "bad.toml"
    cfg.write_text(text)
    out = tmp_path / "out"
    assert main(["run", str(cfg), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_set_overrides_and_unknown_names(tmp_path, capsys):
    cfg = C.apply_overrides(C.builtin("ufm"), ["solver.steps=300", "model.lams=[0.01, 0.02]"])
    assert cfg.solver.steps == 300 and cfg.model.lams == (0.01, 0.02)
    with pytest.raises(ValueError, match="--set"):
        C.apply_overrides(cfg, ["steps"])
    assert main(["reproduce", "fig99", "--out", str(tmp_path / "x")]) == 2
    assert "unknown experiment" in capsys.readouterr().err


def test_sweeps_write_csv_and_figure(tmp_path):
    assert main(["sweep", "plain", "--points", "4", "--steps", "300", "--out", str(tmp_path / "p"), "--quiet"]) == 0
    rows = read_csv(tmp_path / "p" / "sweep.csv")
    assert len(rows) == 4 and {"c", "objective", "f_star", "H1.nc1"} <= set(rows[0])
    c = np.array([float(r["c"]) for r in rows])
    f_star = np.array([float(r["f_star"]) for r in rows])
    assert np.allclose(f_star, np.where(c <= 1, c - c ** 2 / 2, 0.5))
    assert main(["sweep", "extended", "--points", "3", "--steps", "200", "--init-std", "0.1", "1",
                 "--out", str(tmp_path / "e"), "--quiet"]) == 0
    assert len(read_csv(tmp_path / "e" / "sweep.csv")) == 6
    assert mpimg.imread(tmp_path / "e" / "figure.png").shape[0] > 200


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_failed_reproduce_leaves_no_folder(tmp_path, capsys):
    out = tmp_path / "never"
    assert main(["reproduce", "ufm", "--device", "cuda", "--out", str(out), "--quiet"]) == 2
    assert "CUDA" in capsys.readouterr().err and not out.exists()


def test_run_of_the_stuck_imbalanced_example_is_labelled_stationary(tmp_path):
    """Class sizes (5, 20, 60, 115), all λ = 0.005, init std 0.1: the smallest class ends at zero."""
    cfg = tmp_path / "stuck.toml"
    cfg.write_text('name = "stuck"\n[model]\nK = 4\nn = [5, 20, 60, 115]\ndims = [20, 20]\n'
                   'lams = [0.005, 0.005, 0.005]\n[solver]\nsteps = 15000\nlog_every = 500\n')
    assert main(["run", str(cfg), "--out", str(tmp_path / "o"), "--quiet"]) == 0
    s = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert s["verdict"] == "stationary" and [z["class"] for z in s["zero_singular_values"]] == [0]
    assert s["objective"] == pytest.approx(s["stationary_value"], rel=1e-4)
    assert s["stationary_value"] > s["objective_optimal"]



def test_ufm_commands_never_import_the_network_code(tmp_path):
    """The registry imports the network code only when a network experiment runs."""
    import subprocess
    import sys

    script = ("import sys; from nclab.cli import main; "
              f"assert main(['reproduce', 'ufm', '--iterations', '20', '--out', {str(tmp_path / 'o')!r}, '--quiet']) == 0; "
              "print(sorted(m for m in sys.modules if m.startswith('nclab.nets.') and m != 'nclab.nets.settings' "
              "and m != 'nclab.nets.cli'))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_full_applies_to_network_experiments_and_states_the_gpu_estimate():
    from nclab.experiments import registry

    opts = registry.Options(full=True, data="/d")
    (fig5,) = registry.select(["fig5"], opts, {"full": True, "data": True})
    notice = fig5.notice(fig5.settings(opts), opts)
    assert "--full" in notice and "H100" in notice and "assumed" in notice and "60,000 images" in notice
    assert fig5.notice(fig5.settings(registry.Options()), registry.Options()) is None
    with pytest.raises(ValueError, match="--full: applies only to fig5, fig10"):
        registry.select(["ufm"], opts, {"full": True})
