"""The network experiments (quick mode), their outputs, report entry, and the train command."""
import json

import pytest

from nclab.cli import main
from nclab.nets.experiment import (CPU_PER_CLASS, CPU_SCALE, GPU_IMAGES_PER_S, experiment_configs, gpu_estimate,
                                   report_markdown, run_network_experiment)
from nclab.nets.measure import read_metrics_csv
from nclab.settings import PAPER


@pytest.fixture(scope="module")
def fig5_quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("fig5")
    return out, run_network_experiment("fig5", out, quick=True, quiet=True)


def test_fig5_quick_outputs(fig5_quick):
    out, summary = fig5_quick
    for f in ("config.toml", "metrics.csv", "summary.json", "figure.png", "figure.pdf"):
        assert (out / f).is_file(), f
    assert set(summary["runs"]) == {"mse_nobias", "ce_bias"}
    assert summary["real_data"] is True and summary["paper_data"] is True and "MNIST sample" in summary["data_source"]
    assert summary["data"] == {"name": "mnist5k", "train_size": 200, "test_size": 1000, "image_shape": [1, 32, 32]}
    assert json.loads((out / "summary.json").read_text())["data"] == summary["data"]
    assert json.loads((out / "mse_nobias" / "summary.json").read_text())["data"] == summary["data"]
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
    assert "fig5/figure.png" in md and "| penultimate |" in md and "5,000-image sample of the paper's" in md
    assert "NC1 held-out" in md and "200 training, 1000 held-out images of shape 1x32x32" in md
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
    assert forced["paper_data"] is False  # fig10 without --data: the MNIST sample stands in for CIFAR-10
    assert "stand-in for the paper's cifar10" in report_markdown(forced, "fig10")
    assert "stand-in for the paper's data" in (tmp_path / "caption.md").read_text()
    assert max(r["epoch"] for r in read_metrics_csv(tmp_path / "mse_nobias" / "metrics.csv")) == 1


def test_config_reruns(fig5_quick, tmp_path):
    out, summary = fig5_quick
    assert main(["train", "--config", str(out / "config.toml"), "--out", str(tmp_path / "again"), "--quiet"]) == 0
    for run in ("mse_nobias", "ce_bias"):
        a = read_metrics_csv(out / run / "metrics.csv")
        b = read_metrics_csv(tmp_path / "again" / run / "metrics.csv")
        assert a == b


def test_experiment_configs():
    default = experiment_configs("fig5")["mse_nobias"]
    assert default.dataset == "mnist5k" and default.data is None and default.width < 1 and default.per_class is None
    assert (default.lr_step, default.lr_gamma, default.batch_size, default.momentum) == (
        PAPER["net_lr_step"], PAPER["net_lr_gamma"], PAPER["net_batch_size"], PAPER["net_momentum"])
    assert default.epochs == CPU_SCALE["epochs"] < PAPER["net_epochs"]
    cpu = experiment_configs("fig10", data="/some/where")["mse_nobias"]  # --data alone: the CPU scale
    assert cpu.dataset == "cifar10" and cpu.width == default.width and cpu.per_class == CPU_PER_CLASS
    real = experiment_configs("fig10", data="/some/where", full=True)["mse_nobias"]  # --full: the paper's
    assert real.dataset == "cifar10" and real.width == 1.0 and real.stem == "small" and real.per_class is None
    assert (real.epochs, real.lr_step) == (PAPER["net_epochs"], PAPER["net_lr_step"])
    sample = experiment_configs("fig5", full=True)["ce_bias"]
    assert sample.dataset == "mnist5k" and sample.width == 1.0 and sample.epochs == PAPER["net_epochs"]
    with pytest.raises(ValueError, match="--quick, --full"):
        experiment_configs("fig5", quick=True, full=True)
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
    assert "penultimate" in text and "accuracy" in text and "held-out" in text and "ncc_accuracy" in text
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


def test_gpu_estimate_states_its_source():
    runs = experiment_configs("fig5", data="/d", full=True)
    line = gpu_estimate("fig5", runs)
    minutes = 2 * PAPER["net_epochs"] * 60000 / GPU_IMAGES_PER_S * (1 + 0.15 / 5) / 60  # eval_every 5
    assert f"about {minutes:.0f} min" in line and "60,000 images" in line and "assumed" in line
    assert "benchmarks/train.py" in line
    assert "4,000 images" in gpu_estimate("fig5", experiment_configs("fig5", full=True))


@pytest.mark.slow
def test_default_reproduction_shows_collapse_in_time_and_depth(tmp_path):
    """The CPU default of fig5 (no --data): the paper's claims on the MNIST sample within 10 minutes."""
    summary = run_network_experiment("fig5", tmp_path, quiet=True)
    assert summary["wall_time_s"] < 600 and summary["data"]["name"] == "mnist5k"
    rows = read_metrics_csv(tmp_path / "metrics.csv")
    for name, run in summary["runs"].items():
        final = run["final"]["train"]
        nc1 = [final[lv]["nc1"] for lv in ("stem", "layer1", "layer2", "layer3", "penultimate")]
        assert nc1 == sorted(nc1, reverse=True), (name, nc1)
        assert final["network"]["accuracy"] == 1.0, name
        pen = {m: [r["value"] for r in rows if r["run"] == name and r["split"] == "train"
                   and r["layer"] == "penultimate" and r["metric"] == m] for m in ("nc1", "nc2_etf")}
        for m, values in pen.items():  # falling through training: the last below the first and the middle
            assert values[-1] < values[len(values) // 2] < values[0], (name, m, values)


def test_train_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "classifier bias (default False)" in text and "--force" in text


def test_fig10_quick_on_a_cifar_folder_end_to_end(tmp_path):
    """A tiny CIFAR-10 folder in the real format (python pickles): nclab reproduce fig10 --quick --data."""
    from tests.test_nets_data import make_cifar

    make_cifar(tmp_path / "data", n=40)  # 5 x 40 training images: 20 per class, as --quick takes
    out = tmp_path / "out"
    assert main(["reproduce", "fig10", "--quick", "--data", str(tmp_path / "data"), "--out", str(out),
                 "--quiet"]) == 0
    summary = json.loads((out / "fig10" / "summary.json").read_text())
    assert summary["experiment"] == "fig10" and summary["real_data"] is True
    assert summary["data"] == {"name": "cifar10", "train_size": 200, "test_size": 40, "image_shape": [3, 32, 32]}
    run = summary["runs"]["mse_nobias"]
    assert run["config"]["dataset"] == "cifar10" and run["final_epoch"] == 4
    rows = read_metrics_csv(out / "fig10" / "metrics.csv")
    assert {r["split"] for r in rows} == {"train", "test"} and {r["run"] for r in rows} == {"mse_nobias"}
    levels = {r["layer"] for r in rows if r["split"] == "test" and r["metric"] == "nc1"}
    assert levels == {"stem", "layer1", "layer2", "layer3", "penultimate"}
    for name in ("figure.png", "figure.pdf", "figure-column.png", "caption.md", "mse_nobias/checkpoint.pt"):
        assert (out / "fig10" / name).is_file(), name
    report = (out / "report.md").read_text()
    assert "## fig10" in report and "— real data." in report and "NC1 held-out" in report
