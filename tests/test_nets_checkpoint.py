"""Checkpoints: plain data loaded with weights_only=True; bad files give one clean line, never code."""
import os
import pickle
import shutil

import pytest
import torch

from nclab.cli import main
from nclab.nets import checkpoint
from nclab.nets.settings import TrainSettings
from nclab.nets.training import train

TINY = dict(model="mlp", epochs=2, per_class=6, batch_size=16, eval_every=1, measure_per_class=3, threads=1)
NOT_OURS = r"is not an nclab checkpoint \(.*\); remove it or use --force / a new --out"


class Payload:
    """Unpickling this object runs ``os.system(command)`` (what a crafted checkpoint could do)."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    train(TrainSettings(**TINY), out, quiet=True, figure=False, stop_after=1)
    return out


def _one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text
    return text


def test_checkpoint_is_plain_data(run):
    ck = torch.load(run / checkpoint.CHECKPOINT, weights_only=True)
    assert ck["format"] == checkpoint.FORMAT and ck["epoch"] == 1
    assert TrainSettings.from_dict(ck["settings"]) == TrainSettings(**TINY)
    assert all(type(r) is dict and type(r["value"]) is float for r in ck["rows"])
    assert ck["rng"]["torch"].dtype == torch.uint8


@pytest.mark.parametrize("inside", [False, True])
def test_crafted_checkpoint_runs_no_code(tmp_path, run, inside):
    marker = tmp_path / "pwned"
    payload = Payload(f"touch {marker}")
    path = tmp_path / "checkpoint.pt"
    if inside:  # the payload hidden in an otherwise valid checkpoint
        ck = torch.load(run / checkpoint.CHECKPOINT, weights_only=True)
        ck["rows"].append(payload)
        torch.save(ck, path)
    else:
        torch.save(payload, path)
    with pytest.raises(ValueError, match=NOT_OURS) as exc:
        checkpoint.load(path)
    assert str(path) in _one_line(exc)
    assert not marker.exists()
    # the file really is dangerous to an unsafe loader: this is what weights_only=True prevents
    torch.load(path, weights_only=False)
    assert marker.exists()


def copy_of(run, out):
    """A copy of an nclab run folder (its manifest too): a checkpoint swapped in there is resumed."""
    shutil.copytree(run, out)
    return out


def test_crafted_checkpoint_through_resume_and_cli(tmp_path, run, capsys):
    marker = tmp_path / "pwned"
    out = copy_of(run, tmp_path / "run")
    torch.save({"settings": {}, "model": Payload(f"touch {marker}")}, out / checkpoint.CHECKPOINT)
    with pytest.raises(ValueError, match=NOT_OURS):
        train(TrainSettings(**TINY), out, quiet=True, resume=True)
    argv = ["train", "--out", str(out), "--model", "mlp", "--epochs", "1", "--per-class", "6", "--batch-size", "16",
            "--eval-every", "1", "--measure-per-class", "3", "--threads", "1", "--resume", "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "is not an nclab checkpoint" in err and err.count("\n") == 1
    assert not marker.exists()


def test_checkpoint_in_a_folder_nclab_did_not_write_is_never_loaded(tmp_path):
    marker = tmp_path / "pwned"
    out = tmp_path / "theirs"
    out.mkdir()
    torch.save({"settings": {}, "model": Payload(f"touch {marker}")}, out / checkpoint.CHECKPOINT)
    with pytest.raises(ValueError, match="holds no nclab run to resume"):
        train(TrainSettings(**TINY), out, quiet=True, resume=True)
    assert not marker.exists() and (out / checkpoint.CHECKPOINT).exists()


def _write(path, kind, run):
    good = (run / checkpoint.CHECKPOINT).read_bytes()
    if kind == "truncated":
        path.write_bytes(good[: len(good) // 2])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("not a checkpoint\n")
    elif kind == "foreign dict":
        torch.save({"state_dict": {"w": torch.zeros(2)}, "epoch": 3}, path)
    elif kind == "tensor":
        torch.save(torch.zeros(3), path)
    elif kind == "plain pickle":
        path.write_bytes(pickle.dumps({"settings": {}}))
    elif kind == "wrong types":
        ck = torch.load(run / checkpoint.CHECKPOINT, weights_only=True)
        torch.save(ck | {"epoch": "1", "rows": [{"epoch": 1}]}, path)
    elif kind == "bad settings":
        ck = torch.load(run / checkpoint.CHECKPOINT, weights_only=True)
        torch.save(ck | {"settings": ck["settings"] | {"loss": "l1"}}, path)


@pytest.mark.parametrize("kind", ["truncated", "empty", "text", "foreign dict", "tensor", "plain pickle",
                                  "wrong types", "bad settings"])
def test_bad_checkpoints_give_one_clean_line(tmp_path, run, kind):
    out = copy_of(run, tmp_path / "run")
    _write(out / checkpoint.CHECKPOINT, kind, run)
    with pytest.raises(ValueError, match=NOT_OURS) as exc:
        train(TrainSettings(**TINY), out, quiet=True, resume=True)
    assert str(out / checkpoint.CHECKPOINT) in _one_line(exc)


def test_state_of_another_model_is_not_resumed(tmp_path, run):
    """A checkpoint whose settings match but whose model state does not fit: a clean line too."""
    out = copy_of(run, tmp_path / "run")
    ck = torch.load(run / checkpoint.CHECKPOINT, weights_only=True)
    ck["model"] = {"weight": torch.zeros(2)}
    torch.save(ck, out / checkpoint.CHECKPOINT)
    with pytest.raises(ValueError, match=NOT_OURS) as exc:
        train(TrainSettings(**TINY), out, quiet=True, resume=True)
    assert "does not fit" in _one_line(exc)


def test_resume_may_change_device_and_epochs_only(tmp_path, run):
    ck = checkpoint.load(run / checkpoint.CHECKPOINT)
    checkpoint.check_same_settings("x", ck, TrainSettings(**(TINY | {"epochs": 5, "threads": 2, "bf16": False})))
    # lr None and the paper's value written out are the same training
    checkpoint.check_same_settings("x", ck, TrainSettings(**(TINY | {"lr": TrainSettings(**TINY).sgd_lr})))
    with pytest.raises(ValueError, match=r"different settings \(weight_decay, seed\)"):
        checkpoint.check_same_settings("x", ck, TrainSettings(**(TINY | {"seed": 1, "weight_decay": 0.1})))


def test_checkpoint_written_before_the_format_key_still_resumes(tmp_path, run):
    """Earlier checkpoints: no "format", the settings under "config"; plain data all the same."""
    ck = torch.load(run / checkpoint.CHECKPOINT, weights_only=True)
    old = {("config" if k == "settings" else k): v for k, v in ck.items() if k != "format"}
    torch.save(old, tmp_path / checkpoint.CHECKPOINT)
    loaded = checkpoint.load(tmp_path / checkpoint.CHECKPOINT)
    assert loaded["settings"] == ck["settings"] and loaded["epoch"] == 1
    checkpoint.check_same_settings(tmp_path / checkpoint.CHECKPOINT, loaded, TrainSettings(**TINY))
