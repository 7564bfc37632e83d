"""Long runs say how long they will take, measured from their first steps."""
import pytest

from nclab import eta
from nclab.cli import main
from nclab.experiments import config as C


def test_expected_time_and_the_notice(capsys):
    assert eta.expected_seconds(10, 1000, 2.0) == pytest.approx(200.0)
    assert not eta.notice_if_long("run", 10, 1000, 2.0, "iterations")  # 200 s: quiet
    assert eta.notice_if_long("run", 10, 1000, 7.2, "iterations")  # 720 s
    err = capsys.readouterr().err
    assert "about 12 min" in err and "first 10 of 1000 iterations" in err and len(err.splitlines()) == 1
    assert eta.notice_if_long("run", 1, 200, 40.0, "epochs")
    assert "about 2.2 h" in capsys.readouterr().err


@pytest.mark.parametrize("limit, expected", [(1e-3, 1), (1e9, 0)])
def test_a_ufm_run_announces_its_length_from_its_first_steps(tmp_path, monkeypatch, capsys, limit, expected):
    monkeypatch.setattr(eta, "LONG_RUN_S", limit)
    cfg = tmp_path / "c.toml"
    cfg.write_text((C.CONFIG_DIR / "ufm.toml").read_text())
    assert main(["run", str(cfg), "--set", "solver.steps=300", "--out", str(tmp_path / "o")]) == 0
    assert capsys.readouterr().err.count("will take about") == expected


def test_training_announces_its_length_after_the_first_epoch(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(eta, "LONG_RUN_S", 1e-3)
    argv = ["train", "--out", str(tmp_path / "t"), "--model", "mlp", "--epochs", "2", "--per-class", "6",
            "--batch-size", "16", "--eval-every", "1", "--measure-per-class", "3", "--threads", "1"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert err.count("will take about") == 1 and "first 1 of 2 epochs" in err
