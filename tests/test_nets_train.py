"""Training: loss scaling, determinism, resume = uninterrupted, 2-process gloo = 1 process."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from nclab.nets.distributed import GlobalBatchNorm, convert_batchnorm
from nclab.nets.losses import sample_losses
from nclab.nets.loop import Trainer
from nclab.nets.measure import read_metrics_csv, warn_budget
from nclab.nets.settings import TrainSettings
from nclab.nets.training import train

TINY = dict(width=0.0625, epochs=3, per_class=12, batch_size=32, eval_every=2, measure_per_class=6,
            lr_step=2, lr=0.01, weight_decay=2.5e-3, threads=1)


def test_mse_scaling_matches_torch_mseloss():
    torch.manual_seed(0)
    f, y = torch.randn(6, 10), torch.randint(0, 10, (6,))
    Y = nn.functional.one_hot(y, 10).float()
    ufm = sample_losses(f, y, "mse").mean()  # 1/(2N) ||F - Y||^2
    assert float(ufm) == pytest.approx(float(((f - Y) ** 2).sum() / 12))
    assert float(nn.MSELoss()(f, Y)) == pytest.approx(float(ufm) * 2 / 10)  # MSELoss = (2/K) * ours
    assert float(sample_losses(f, y, "mse_torch").mean()) == pytest.approx(float(nn.MSELoss()(f, Y)))
    assert float(sample_losses(f, y, "ce").mean()) == pytest.approx(float(nn.functional.cross_entropy(f, y)))


def test_global_batchnorm_is_batchnorm_without_process_group():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3))
    ref = nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3))
    ref.load_state_dict(net.state_dict())
    convert_batchnorm(net)
    assert isinstance(net[1], GlobalBatchNorm)
    x = torch.randn(4, 2, 5, 5)
    torch.testing.assert_close(net(x), ref(x))
    torch.testing.assert_close(net[1].running_var, ref[1].running_var)


def test_mse_step_equals_mse_torch_with_rescaled_lr_and_decay(tmp_path):
    """SGD on "mse" with (lr, wd) = SGD on "mse_torch" with (lr·K/2, wd·2/K): same weights."""
    K, lr, wd = 10, 0.01, 2.5e-3
    base = TINY | {"momentum": 0.9}
    a = Trainer(TrainSettings(**(base | {"loss": "mse", "lr": lr, "weight_decay": wd})), tmp_path / "a", quiet=True)
    b = Trainer(TrainSettings(**(base | {"loss": "mse_torch", "lr": lr * K / 2, "weight_decay": wd * 2 / K})),
                tmp_path / "b", quiet=True)
    start = {k: v.clone() for k, v in a.model.state_dict().items()}
    for epoch in (1, 2):  # 2 x 3 SGD steps
        a.train_epoch(epoch)
        b.train_epoch(epoch)
    wa, wb = a.model.state_dict(), b.model.state_dict()
    assert (wa["fc.weight"] - start["fc.weight"]).abs().max() > 1e-3  # the steps moved the weights
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-6)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_global_batchnorm_global_path_equals_batchnorm(momentum):
    """The all-reduce path with one process (identity reduce) is nn.BatchNorm in training mode."""
    torch.manual_seed(0)
    ref = nn.BatchNorm2d(3, momentum=momentum)
    bn = GlobalBatchNorm(3, momentum=momentum)
    nn.init.normal_(ref.weight)
    nn.init.normal_(ref.bias)
    bn.load_state_dict(ref.state_dict())
    for _ in range(3):
        x = torch.randn(4, 3, 5, 5) * 2 + 1
        torch.testing.assert_close(bn.normalise(x, lambda t: t), ref(x))
    torch.testing.assert_close(bn.running_mean, ref.running_mean)
    torch.testing.assert_close(bn.running_var, ref.running_var)
    assert int(bn.num_batches_tracked) == 3


def test_mlp_incomplete_last_batch_is_dropped(tmp_path):
    """50 samples in batches of 7: the last batch of 1 would crash BatchNorm1d in training."""
    cfg = TrainSettings(**(TINY | {"model": "mlp", "per_class": 5, "batch_size": 7, "epochs": 1,
                                 "measure_per_class": 3}))
    tr = Trainer(cfg, tmp_path, quiet=True)
    calls = []
    tr.ddp.register_forward_pre_hook(lambda m, inp: calls.append(len(inp[0])))
    running = tr.train_epoch(1)
    assert calls == [7] * 7 and 0 <= running["running_accuracy"] <= 1


def test_config_checks():
    with pytest.raises(ValueError, match="stem"):
        TrainSettings(model="mlp", stem="imagenet")
    with pytest.raises(ValueError, match="batch_size"):
        TrainSettings(batch_size=1)
    assert TrainSettings(dataset="mnist", data="rel/dir").data == str(Path("rel/dir").absolute())


def test_budget_warning_is_one_line(tmp_path, capsys):
    warn_budget({"metric_pass_over_epoch": 0.1, "measured_per_class": 5, "epoch_time_s": 3.0}, tmp_path)
    assert capsys.readouterr().err == ""
    warn_budget({"metric_pass_over_epoch": 0.9, "measured_per_class": 5, "epoch_time_s": 0.1}, tmp_path)
    assert capsys.readouterr().err == ""  # a smoke run's tiny epochs: overheads, no warning
    warn_budget({"metric_pass_over_epoch": 0.3, "measured_per_class": 5, "epoch_time_s": 3.0}, tmp_path)
    err = capsys.readouterr().err
    assert "0.30 of a training epoch" in err and "--measure-per-class" in err and err.count("\n") == 1


def _rows(path):
    return [r for r in read_metrics_csv(path)]


def test_same_seed_same_result_and_outputs(tmp_path):
    cfg = TrainSettings(**TINY)
    assert not torch.are_deterministic_algorithms_enabled()
    s1 = train(cfg, tmp_path / "a", quiet=True, figure=False)
    assert not torch.are_deterministic_algorithms_enabled()  # restored after the run
    train(cfg, tmp_path / "b", quiet=True, figure=False)
    assert _rows(tmp_path / "a" / "metrics.csv") == _rows(tmp_path / "b" / "metrics.csv")
    for f in ("config.toml", "metrics.csv", "summary.json", "checkpoint.pt"):
        assert (tmp_path / "a" / f).is_file()
    assert s1["final_epoch"] == 3
    assert s1["levels"] == ["stem", "layer1", "layer2", "layer3", "penultimate"]
    assert {"nc1", "nc1_trace", "cdnv", "nc2_etf", "nc2_of", "nc3_etf", "nc4"} <= set(s1["final"]["train"]["penultimate"])
    assert "nc3_etf" not in s1["final"]["train"]["layer1"]
    assert {"loss", "objective", "accuracy"} <= set(s1["final"]["test"]["network"])
    assert s1["data"] == {"name": "digits", "train_size": 120, "test_size": 360, "image_shape": [1, 8, 8]}
    with pytest.raises(ValueError, match="--resume"):
        train(cfg, tmp_path / "a", quiet=True)
    forced = train(TrainSettings(**(TINY | {"epochs": 1})), tmp_path / "a", quiet=True, force=True, figure=False)
    assert forced["final_epoch"] == 1 and max(r["epoch"] for r in _rows(tmp_path / "a" / "metrics.csv")) == 1


def test_resume_equals_uninterrupted(tmp_path):
    cfg = TrainSettings(**TINY)
    full = train(cfg, tmp_path / "full", quiet=True, figure=False)
    part = train(cfg, tmp_path / "cut", quiet=True, stop_after=1, figure=False)
    assert part["epochs_done"] == 1 and not (tmp_path / "cut" / "summary.json").exists()
    resumed = train(cfg, tmp_path / "cut", quiet=True, resume=True, figure=False)
    assert _rows(tmp_path / "full" / "metrics.csv") == _rows(tmp_path / "cut" / "metrics.csv")
    assert resumed["final"] == full["final"]
    a = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    other = TrainSettings(**(TINY | {"lr": 0.02}))
    with pytest.raises(ValueError, match="lr"):
        train(other, tmp_path / "cut", quiet=True, resume=True)


def test_divergence_and_bad_config(tmp_path):
    with pytest.raises(ValueError, match="diverged"):
        train(TrainSettings(**(TINY | {"lr": 1e6, "epochs": 1})), tmp_path / "x", quiet=True)
    for bad, word in (({"loss": "l1"}, "loss"), ({"epochs": 0}, "epochs"), ({"width": -1.0}, "width")):
        with pytest.raises(ValueError, match=word):
            TrainSettings(**bad)
    with pytest.raises(ValueError, match="unknown key"):
        TrainSettings.from_dict({"epochz": 3})


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_equal_one(tmp_path):
    """torchrun --nproc-per-node 2 -m nclab train: same metrics as one process."""
    args = ["--width", "0.0625", "--epochs", "2", "--per-class", "12", "--batch-size", "32", "--eval-every", "1",
            "--measure-per-class", "6", "--lr", "0.002", "--quiet"]
    # a small step: float differences of ~1e-7 (summation order) grow fast in chaotic early training
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1] / "src"), OMP_NUM_THREADS="1")
    one = subprocess.run([sys.executable, "-m", "nclab", "train", "--out", str(tmp_path / "one"), *args],
                         env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--master-port", str(_free_port()), "-m", "nclab", "train",
                          "--out", str(tmp_path / "two"), *args], env=env, capture_output=True, text=True,
                         timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    r1, r2 = _rows(tmp_path / "one" / "metrics.csv"), _rows(tmp_path / "two" / "metrics.csv")
    assert [(r["epoch"], r["split"], r["layer"], r["metric"]) for r in r1] == \
        [(r["epoch"], r["split"], r["layer"], r["metric"]) for r in r2]
    for a, b in zip(r1, r2):
        assert b["value"] == pytest.approx(a["value"], rel=1e-4, abs=1e-7), a
    import json
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["processes"] == 2
