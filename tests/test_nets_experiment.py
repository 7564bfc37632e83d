"""The network experiments (quick mode), their outputs, report entry, and the train command."""
import json

import pytest

from nclab.cli import main
from nclab.nets.experiment import experiment_configs, report_markdown, run_network_experiment
from nclab.nets.measure import read_metrics_csv


@pytest.fixture(scope="module")
def fig5_quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("fig5")
    return out, run_network_experiment("fig5", out, quick=True, quiet=True)


def test_fig5_quick_outputs(fig5_quick):
    out, summary = fig5_quick
    for f in ("config.toml", "metrics.csv", "summary.json", "figure.png", "figure.pdf"):
        assert (out / f).is_file(), f
    assert set(summary["runs"]) == {"mse_nobias", "ce_bias"}
    assert summary["real_data"] is False and "digits" in summary["data_source"]
    assert json.loads((out / "summary.json").read_text())["experiment"] == "fig5"
    mse = summary["runs"]["mse_nobias"]["config"]
    assert mse["loss"] == "mse" and mse["bias"] is False
    assert summary["runs"]["ce_bias"]["config"]["bias"] is True
    # lr / weight decay: None in the settings (the paper's), the values SGD used in the summary
    assert "lr" not in mse and summary["runs"]["mse_nobias"]["sgd_lr"] == pytest.approx(0.01)
    assert summary["runs"]["ce_bias"]["sgd_weight_decay"] == pytest.approx(5e-4)
    header = (out / "metrics.csv").read_text().splitlines()[0]
    assert header == "run,epoch,split,layer,metric,value"
    md = report_markdown(summary, "fig5")
    assert "fig5/figure.png" in md and "| penultimate |" in md and "digits" in md
    # NC3 per run: orthogonal frame for MSE without bias, simplex ETF with bias / CE
    mse_part, ce_part = md.split("**cross-entropy, bias**")
    assert "NC3 (OF)" in mse_part and "NC3 (ETF)" not in mse_part
    assert "NC3 (ETF)" in ce_part and "NC3 (OF)" not in ce_part
    pen = summary["runs"]["mse_nobias"]["final"]["train"]["penultimate"]
    assert f"{pen['nc3_of']:.3g} |" in mse_part
    assert "train (measured subsample, eval mode)" in md
    assert summary["runs"]["mse_nobias"]["nc3_frame"] == "of" and summary["runs"]["ce_bias"]["nc3_frame"] == "etf"


def test_existing_out_dir_needs_resume_or_force(fig5_quick, tmp_path):
    out, summary = fig5_quick
    with pytest.raises(ValueError, match="already holds results.*--resume or --force"):
        run_network_experiment("fig5", out, quick=True, quiet=True)
    config = (out / "config.toml").read_bytes()
    with pytest.raises(ValueError, match="different settings"):  # not quick: another width
        run_network_experiment("fig5", out, quiet=True, resume=True)
    assert (out / "config.toml").read_bytes() == config  # written only after the check
    again = run_network_experiment("fig5", out, quick=True, quiet=True, resume=True)
    assert again["runs"]["ce_bias"]["final"] == summary["runs"]["ce_bias"]["final"]
    run_network_experiment("fig10", tmp_path, quick=True, quiet=True, epochs=2)
    forced = run_network_experiment("fig10", tmp_path, quick=True, quiet=True, epochs=1, force=True)
    assert forced["runs"]["mse_nobias"]["final_epoch"] == 1  # a resume would have kept epoch 2
    assert max(r["epoch"] for r in read_metrics_csv(tmp_path / "mse_nobias" / "metrics.csv")) == 1


def test_config_reruns(fig5_quick, tmp_path):
    out, summary = fig5_quick
    assert main(["train", "--config", str(out / "config.toml"), "--out", str(tmp_path / "again"), "--quiet"]) == 0
    for run in ("mse_nobias", "ce_bias"):
        a = read_metrics_csv(out / run / "metrics.csv")
        b = read_metrics_csv(tmp_path / "again" / run / "metrics.csv")
        assert a == b


def test_experiment_configs():
    real = experiment_configs("fig10", data="/some/where")
    assert real["mse_nobias"].dataset == "cifar10" and real["mse_nobias"].width == 1.0
    fig5 = experiment_configs("fig5", data="/d", epochs=7)
    assert fig5["ce_bias"].dataset == "mnist" and fig5["ce_bias"].epochs == 7
    # MSE in the UFM scaling with the torch.nn.MSELoss-equivalent step and decay (K = 10)
    assert fig5["mse_nobias"].sgd_lr == pytest.approx(0.01)
    assert fig5["mse_nobias"].sgd_weight_decay == pytest.approx(2.5e-3)
    assert fig5["ce_bias"].sgd_lr == pytest.approx(0.05) and fig5["ce_bias"].sgd_weight_decay == pytest.approx(5e-4)
    with pytest.raises(ValueError, match="name"):
        experiment_configs("fig6")


def test_train_command(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--out", str(out), "--width", "0.0625", "--epochs", "1", "--per-class", "10",
            "--measure-per-class", "5", "--loss", "ce", "--bias", "--threads", "1", "--quiet"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "penultimate" in text and "accuracy" in text
    assert (out / "figure.png").is_file() and (out / "config.toml").is_file()
    assert main(args) == 2  # never overwrites
    assert "--resume" in capsys.readouterr().err
    assert main(args + ["--resume"]) == 0


@pytest.mark.parametrize("args, word", [(["--loss", "l1"], "loss"), (["--epochs", "0"], "epochs"),
                                        (["--dataset", "mnist", "--data", "/nonexistent"], "train-images-idx3"),
                                        (["--model", "mlp", "--stem", "imagenet"], "stem")])
def test_train_command_errors(tmp_path, capsys, args, word):
    assert main(["train", "--out", str(tmp_path / "x"), *args]) == 2
    err = capsys.readouterr().err
    assert word in err and err.count("\n") == 1


@pytest.mark.slow
def test_default_digits_reproduction_shows_depthwise_collapse(tmp_path):
    summary = run_network_experiment("fig5", tmp_path, quiet=True)
    assert summary["wall_time_s"] < 600
    for run in summary["runs"].values():
        nc1 = [run["final"]["train"][lv]["nc1"] for lv in ("layer1", "layer2", "layer3", "penultimate")]
        assert nc1 == sorted(nc1, reverse=True), nc1
        assert run["final"]["train"]["network"]["accuracy"] > 0.99


def test_train_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "classifier bias (default False)" in text and "--force" in text
