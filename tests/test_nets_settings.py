"""TrainSettings: strict, frozen, every default once; the resolved lr / weight decay; the train flags."""
import dataclasses
from pathlib import Path

import pytest
import torch

from nclab.cli import build_parser, main
from nclab.nets.settings import TrainSettings
from nclab.settings import PAPER, SettingsError


def test_defaults_are_the_papers_and_round_trip():
    s = TrainSettings()
    assert (s.epochs, s.batch_size, s.momentum, s.lr_step, s.lr_gamma) == (
        PAPER["net_epochs"], PAPER["net_batch_size"], PAPER["net_momentum"], PAPER["net_lr_step"],
        PAPER["net_lr_gamma"])
    assert s.lr is None and s.weight_decay is None
    for t in (s, TrainSettings(dataset="mnist", loss="ce", bias=True, lr=0.1, data="x", threads=2)):
        assert TrainSettings.from_dict(t.to_dict()) == t
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.lr = 0.1


def test_resolved_lr_and_weight_decay_never_written_back():
    K = PAPER["net_classes"]
    mse, ce, torch_mse = TrainSettings(loss="mse"), TrainSettings(loss="ce"), TrainSettings(loss="mse_torch")
    assert mse.sgd_lr == pytest.approx(PAPER["net_lr"] * 2 / K) == pytest.approx(0.01)
    assert mse.sgd_weight_decay == pytest.approx(PAPER["net_weight_decay"] * K / 2) == pytest.approx(2.5e-3)
    for s in (ce, torch_mse):
        assert (s.sgd_lr, s.sgd_weight_decay) == (PAPER["net_lr"], PAPER["net_weight_decay"])
    assert mse.lr is None and mse.to_dict().get("lr") is None  # None stays None
    given = TrainSettings(lr=0.3, weight_decay=0.0)
    assert given.resolved() == {"sgd_lr": 0.3, "sgd_weight_decay": 0.0}


@pytest.mark.parametrize("bad, words", [
    ({"bias": "no"}, "train.bias: must be true or false"),
    ({"device": "cdua"}, "did you mean 'cuda'"),
    ({"device": "gpu"}, "train.device"),
    ({"lr": "0.1"}, "train.lr: must be a number"),
    ({"epochs": 2.0}, "train.epochs: must be an integer"),
    ({"epochs": True}, "train.epochs: must be an integer"),
    ({"width": float("nan")}, "train.width"),
    ({"loss": "mse2"}, "did you mean 'mse"),
    ({"dataset": "mnits"}, "did you mean 'mnist'"),
    ({"model": "resnet"}, "train.model"),
    ({"stem": "big"}, "train.stem"),
    ({"model": "mlp", "stem": "imagenet"}, "only resnet18 has a stem"),
    ({"batch_size": 1}, "train.batch_size"),
    ({"momentum": 1.5}, "train.momentum"),
    ({"weight_decay": -1}, "train.weight_decay"),
    ({"per_class": 1}, "train.per_class"),
    ({"threads": 0}, "train.threads"),
])
def test_bad_settings_are_errors(bad, words):
    with pytest.raises(SettingsError, match=words.replace("(", r"\(")):
        TrainSettings(**bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_absent_is_an_error():
    with pytest.raises(SettingsError, match="CUDA is not available"):
        TrainSettings(device="cuda")


def test_unknown_key_suggests_and_data_is_absolute():
    with pytest.raises(SettingsError, match="did you mean 'weight_decay'"):
        TrainSettings.from_dict({"weight_decy": 1e-3})
    assert TrainSettings(dataset="mnist", data="rel/dir").data == str(Path("rel/dir").absolute())


def test_every_train_flag_comes_from_a_setting_with_help():
    train = next(a for a in build_parser()._subparsers._group_actions[0].choices.items() if a[0] == "train")[1]
    flags = {a.dest: a for a in train._actions}
    for name in TrainSettings.field_names():
        assert name in flags and flags[name].help == TrainSettings.help(name).replace("%", "%%"), name
    assert "--no-bias" in flags["bias"].option_strings and "--no-bf16" in flags["bf16"].option_strings
    assert flags["epochs"].type is int and flags["lr"].type is float and flags["device"].type is str


def test_train_flag_errors_are_one_line(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "x"), "--device", "cdua"]) == 2
    err = capsys.readouterr().err
    assert "did you mean 'cuda'" in err and err.count("\n") == 1
    assert not (tmp_path / "x").exists()


def test_nets_train_is_the_function_whatever_was_imported_first():
    import nclab.nets
    import nclab.nets.training  # noqa: F401  (the module that defines it)

    assert callable(nclab.nets.train) and nclab.nets.train is nclab.nets.training.train


def test_compile_is_off_by_default_and_may_change_on_resume():
    s = TrainSettings()
    assert s.compile is False and TrainSettings.from_dict(s.replace(compile=True).to_dict()).compile is True
    assert s.replace(compile=True, threads=1).differences(s) == []  # how it runs, not what it computes
    assert s.replace(dataset="mnist5k").differences(s) == ["dataset"]
