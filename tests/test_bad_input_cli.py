"""Every error a user can cause is one line on stderr, exit code 2, no traceback, no file lost.

Each case runs the real command in-process in a scratch folder that holds a file of the
user's; afterwards the user's file is intact and nothing was left behind unless stated.
"""
import json
import os
import shutil

import numpy as np
import pytest

from nclab.cli import main
from nclab.experiments import config as C

UFM_TOML = (C.CONFIG_DIR / "ufm.toml").read_text()


@pytest.fixture
def scratch(tmp_path, monkeypatch):
    """A working folder with a config and a file of the user's; returns its path."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "user.txt").write_text("the user's own notes")
    (tmp_path / "ufm.toml").write_text(UFM_TOML.replace("steps = ", "steps = 200 # ").replace(
        "log_every = ", "log_every = 100 # "))
    return tmp_path


def snapshot(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def fails_cleanly(args, capsys, word):
    """The command exits 2 with one stderr line naming ``word`` and no traceback."""
    assert main([str(a) for a in args]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err and word in err, err
    return err


RUN_CASES = {
    "diverging step": (["--set", "solver.lr=1000"], "lr"),
    "huge λ": (["--set", "model.lams=[1e300, 1e300]"], "lr"),
    "nan init": (["--set", "solver.init_std=nan"], "init_std"),
    "string where a number belongs": (["--set", 'solver.lr="0.1"'], "solver.lr"),
    "bool as a string": (["--set", 'solver.metrics="no"'], "solver.metrics"),
    "name escaping runs/": (["--set", "name=../../x"], "name"),
    "absolute name": (["--set", "name=/tmp/x"], "name"),
    "device typo": (["--set", "solver.device=cdua"], "did you mean 'cuda'"),
    "device gpu": (["--set", "solver.device=gpu"], "solver.device"),
    "unknown key": (["--set", "solver.stpes=10"], "did you mean 'steps'"),
    "bad --set": (["--set", "steps"], "--set"),
    "resume and force": (["--resume", "--force"], "--resume, --force"),
    "negative steps": (["--set", "solver.steps=-1"], "solver.steps"),
    "no metrics": (["--set", "solver.metrics=false"], "solver.metrics"),
}


@pytest.mark.parametrize("extra, word", RUN_CASES.values(), ids=RUN_CASES.keys())
def test_run_bad_settings(scratch, capsys, extra, word):
    before = snapshot(scratch)
    fails_cleanly(["run", "ufm.toml", *extra], capsys, word)
    assert snapshot(scratch) == before and not (scratch / "runs").exists()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_absent_device_is_an_error(scratch, capsys):
    fails_cleanly(["run", "ufm.toml", "--set", "solver.device=cuda"], capsys, "CUDA is not available")
    fails_cleanly(["reproduce", "ufm", "--device", "cuda:0", "--out", "o"], capsys, "CUDA")
    assert not (scratch / "o").exists()


CONFIG_CASES = {
    "missing": ("nope.toml", None, "does not exist"),
    "empty": ("empty.toml", "", "missing table [model]"),
    "not TOML": ("bad.toml", "[model\nK=4", "not valid TOML"),
    "binary": ("bin.toml", "\x00\x01\x02", "not valid TOML"),
    "string K": ("k.toml", "[model]\nK='4'\nn=5\ndims=[8]\nlams=[0.1,0.1]\n", "model.K"),
    "model not a table": ("m.toml", "model = 3\n", "model must be a table"),
}


@pytest.mark.parametrize("name, text, word", CONFIG_CASES.values(), ids=CONFIG_CASES.keys())
def test_run_bad_config_files(scratch, capsys, name, text, word):
    if text is not None:
        (scratch / name).write_text(text)
    before = snapshot(scratch)
    fails_cleanly(["run", name], capsys, word)
    assert snapshot(scratch) == before


OUT_CASES = {
    "a file": ("user.txt", "is a file, not a folder"),
    "under a file": ("user.txt/sub", "is a file, so"),
    "holding the user's files": (".", "already holds results (ufm.toml, user.txt)"),
}


@pytest.mark.parametrize("out, word", OUT_CASES.values(), ids=OUT_CASES.keys())
@pytest.mark.parametrize("command", [["run", "ufm.toml"], ["reproduce", "ufm", "--iterations", "50"],
                                     ["sweep", "plain", "--points", "2", "--steps", "20"]])
def test_bad_out_folders(scratch, capsys, command, out, word):
    before = snapshot(scratch)
    fails_cleanly([*command, "--out", out], capsys, word)
    assert snapshot(scratch) == before and not (scratch / ".nclab").exists()


def test_read_only_out_fails_before_computing(scratch, capsys, monkeypatch):
    real_open = os.open

    def refuse(path, *args, **kwargs):
        if str(path).endswith("lock"):
            raise PermissionError(13, "Permission denied")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", refuse)
    monkeypatch.setattr("nclab.ufm.solve", lambda *a, **k: pytest.fail("computed before checking --out"))
    fails_cleanly(["reproduce", "ufm", "--out", "ro"], capsys, "cannot write to")


def test_force_keeps_the_users_files(scratch, capsys):
    out = scratch / "out"
    assert main(["run", "ufm.toml", "--out", str(out), "--quiet"]) == 0
    (out / "my-analysis.ipynb").write_text("{}")
    fails_cleanly(["run", "ufm.toml", "--out", out], capsys, "--force")
    assert main(["run", "ufm.toml", "--out", str(out), "--force", "--quiet"]) == 0
    assert (out / "my-analysis.ipynb").read_text() == "{}" and (out / "summary.json").is_file()


def test_users_file_with_an_output_name_is_never_overwritten(scratch, capsys):
    out = scratch / "out"
    out.mkdir()
    (out / "summary.json").write_text("mine")
    fails_cleanly(["run", "ufm.toml", "--out", out, "--force"], capsys, "not written by nclab")
    assert (out / "summary.json").read_text() == "mine"


def test_second_process_on_the_same_folder_is_refused(scratch, capsys):
    from nclab.rundir import RunDir

    with RunDir(scratch / "busy"):  # another "process" holds the folder
        fails_cleanly(["reproduce", "ufm", "--iterations", "50", "--out", scratch / "busy", "--resume"], capsys,
                      "another nclab process")


def test_resume_with_a_deleted_summary_runs_that_part_again(scratch, capsys):
    out = scratch / "r"
    assert main(["reproduce", "ufm", "--iterations", "50", "--out", str(out), "--quiet"]) == 0
    good = json.loads((out / "ufm" / "summary.json").read_text())
    (out / "ufm" / "summary.json").unlink()
    assert main(["reproduce", "ufm", "--iterations", "50", "--out", str(out), "--resume"]) == 0
    assert "running it again" in capsys.readouterr().out
    again = json.loads((out / "ufm" / "summary.json").read_text())
    assert again.pop("seconds") > 0 and again == {k: v for k, v in good.items() if k != "seconds"}


def test_resume_never_overwrites_an_output_the_user_edited(scratch, capsys):
    out = scratch / "r"
    assert main(["reproduce", "ufm", "--iterations", "50", "--out", str(out), "--quiet"]) == 0
    (out / "ufm" / "summary.json").write_text("{my edits")
    fails_cleanly(["reproduce", "ufm", "--iterations", "50", "--out", out, "--resume"], capsys, "changed since")
    assert (out / "ufm" / "summary.json").read_text() == "{my edits"


@pytest.mark.parametrize("command", [["run", "ufm.toml"], ["sweep", "plain", "--points", "2", "--steps", "20"]])
def test_run_and_sweep_resume_the_same_way_as_reproduce(scratch, capsys, command):
    out = scratch / "o"
    assert main([*command, "--out", str(out), "--quiet"]) == 0
    assert main([*command, "--out", str(out), "--resume"]) == 0
    assert "skipped (--resume)" in capsys.readouterr().out
    (out / "figure.png").unlink()
    assert main([*command, "--out", str(out), "--resume"]) == 0
    assert "running it again" in capsys.readouterr().out and (out / "figure.png").is_file()


def test_resume_under_another_name_cannot_overwrite_the_first_run(scratch, capsys):
    out = scratch / "o"
    assert main(["run", "ufm.toml", "--out", str(out), "--quiet"]) == 0
    before = (out / "config.toml").read_text()
    fails_cleanly(["run", "ufm.toml", "--out", out, "--resume", "--set", "name=other", "--set", "solver.steps=150"],
                  capsys, "belongs to part 'ufm'")
    assert (out / "config.toml").read_text() == before


REPRODUCE_CASES = {
    "unknown name": (["fig33"], "did you mean 'fig3'"),
    "--data for UFM": (["ufm", "--data", "somewhere"], "--data"),
    "--data with no name": (["--data", "somewhere"], "--data"),
    "--iterations for a network": (["fig5", "--iterations", "5"], "--iterations"),
    "--full for UFM": (["ufm", "fig3", "--full"], "--full: applies only to fig5, fig10"),
    "--full with no name": (["--full"], "--full"),
    "--full and --quick": (["fig5", "--full", "--quick"], "--quick, --full: choose one"),
    "--full on a missing folder": (["fig10", "--full", "--data", "nowhere"], "no CIFAR-10 under"),
    "zero iterations": (["ufm", "--iterations", "0"], "--iterations"),
}


@pytest.mark.parametrize("args, word", REPRODUCE_CASES.values(), ids=REPRODUCE_CASES.keys())
def test_reproduce_bad_options(scratch, capsys, args, word):
    before = snapshot(scratch)
    fails_cleanly(["reproduce", *args, "--out", "o"], capsys, word)
    assert snapshot(scratch) == before and not (scratch / "o").exists()


SWEEP_CASES = {
    "one point": (["plain", "--points", "1"], "sweep.points"),
    "one class": (["plain", "--K", "1"], "sweep.K"),
    "negative scale": (["extended", "--init-std", "-1"], "sweep.init_stds"),
    "device typo": (["plain", "--device", "gpu"], "sweep.device"),
    "init scales for plain": (["plain", "--init-std", "0.5"], "sweep.init_stds"),
    "too large": (["plain", "--n", "1000000000", "--K", "1000", "--d", "100000"], "memory"),
}


@pytest.mark.parametrize("args, word", SWEEP_CASES.values(), ids=SWEEP_CASES.keys())
def test_sweep_bad_options(scratch, capsys, args, word):
    before = snapshot(scratch)
    fails_cleanly(["sweep", *args, "--out", "o"], capsys, word)
    assert snapshot(scratch) == before


def test_sweep_with_a_too_large_step_lowers_it_to_a_checked_one(scratch, capsys):
    out = scratch / "s"
    assert main(["sweep", "extended", "--lr", "50", "--points", "3", "--steps", "400", "--init-std", "0.1",
                 "--out", str(out), "--quiet"]) == 0
    import csv

    rows = list(csv.DictReader(open(out / "sweep.csv")))
    assert all(np.isfinite(float(r["objective"])) and float(r["lr"]) < 50 for r in rows)
    fails_cleanly(["sweep", "extended", "--out", out], capsys, "already holds")
    shutil.rmtree(out)


TINY_TRAIN = ["--model", "mlp", "--epochs", "1", "--per-class", "6", "--batch-size", "16", "--eval-every", "1",
              "--measure-per-class", "3", "--threads", "1", "--quiet"]
TRAIN_CASES = {
    "bias as a string": ('bias = "no"\n', [], "train.bias"),
    "epochs as a string": ('epochs = "3"\n', [], "train.epochs"),
    "unknown key": ("epoch = 3\n", [], "did you mean 'epochs'"),
    "device typo": ("", ["--device", "cdua"], "train.device"),
    "unknown loss": ('loss = "l1"\n', [], "train.loss"),
    "resume and force": ("", ["--resume", "--force"], "--resume, --force"),
    "runs not a table": ("runs = 3\n", [], "config: runs"),
    "empty runs": ("[runs]\n", [], "config: runs"),
    "run name escaping": ('[runs."../x"]\nloss = "ce"\n', [], "run name"),
    "digits with --data": ("", ["--data", "somewhere"], "train.data"),
    "MNIST sample with --data": ('dataset = "mnist5k"\n', ["--data", "somewhere"], "mnist5k data set ships"),
    "compile as a string": ('compile = "yes"\n', [], "train.compile"),
}


@pytest.mark.parametrize("toml, flags, word", TRAIN_CASES.values(), ids=TRAIN_CASES.keys())
def test_train_bad_settings(scratch, capsys, toml, flags, word):
    (scratch / "train.toml").write_text(toml)
    before = snapshot(scratch)
    fails_cleanly(["train", "--config", "train.toml", "--out", "t", *flags], capsys, word)
    assert snapshot(scratch) == before and not (scratch / "t").exists()


def test_train_into_a_users_folder_is_refused(scratch, capsys):
    before = snapshot(scratch)
    fails_cleanly(["train", "--out", ".", *TINY_TRAIN], capsys, "already holds results")
    assert snapshot(scratch) == before


def test_failed_network_reproduce_leaves_nothing_to_block_the_corrected_command(scratch, capsys):
    fails_cleanly(["reproduce", "fig5", "--data", scratch / "nonexistent", "--out", "o"], capsys, "MNIST")
    assert not (scratch / "o").exists()


def test_kill_9_mid_run_leaves_nothing_that_blocks_a_plain_rerun(scratch):
    """A run killed before any result: the next plain run in the same folder just works."""
    import signal
    import subprocess
    import sys
    import time

    (scratch / "long.toml").write_text(UFM_TOML.replace("steps = ", "steps = 10000000 # "))
    proc = subprocess.Popen([sys.executable, "-m", "nclab", "run", "long.toml", "--out", "o", "--quiet"],
                            cwd=scratch, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (scratch / "o" / "config.toml").exists() and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert (scratch / "o" / "config.toml").exists()  # the killed run's leftovers
    assert main(["run", "ufm.toml", "--out", "o", "--quiet"]) == 0
    assert (scratch / "o" / "summary.json").is_file() and not list((scratch / "o" / ".nclab" / "tmp").glob("*"))


def _feature_file(folder, kind):
    import torch

    from nclab.frames import collapsed_configuration

    H, y, _ = collapsed_configuration(4, 8, 10, noise=0.1)
    path = folder / {"lists": "f.pt"}.get(kind, "f.npz")
    if kind == "huge label":
        np.savez(path, features=np.zeros((3, 2)), labels=np.array([0, 1, 2_000_000_000]))
    elif kind == "lists":
        torch.save({"features": H.tolist(), "labels": y.tolist()}, path)
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        np.savez(path, features=H.numpy(), labels=y.numpy())
        path.write_bytes(path.read_bytes()[:200])
    elif kind == "strings":
        np.savez(path, features=np.array([["a", "b"]] * 4), labels=np.array([0, 1, 0, 1]))
    else:  # features scaled by 1e200 or 1e-300: a correct value, not an error
        np.savez(path, features=H.numpy() * float(kind), labels=y.numpy())
    return path


@pytest.mark.parametrize("kind, word", [("huge label", "labels"), ("empty", "FILE"), ("truncated", "FILE"),
                                        ("strings", "features")])
def test_measure_bad_files(scratch, capsys, kind, word):
    path = _feature_file(scratch, kind)
    fails_cleanly(["measure", path], capsys, word)


@pytest.mark.parametrize("kind", ["1e200", "1e-300", "lists"])
def test_measure_extreme_scales_and_lists_give_the_plain_values(scratch, capsys, kind):
    import json as js

    assert main(["measure", str(_feature_file(scratch, "1")), "--json"]) == 0
    plain = js.loads(capsys.readouterr().out)
    assert main(["measure", str(_feature_file(scratch, kind)), "--json"]) == 0
    values = js.loads(capsys.readouterr().out)
    assert values.keys() == plain.keys()
    assert all(abs(values[k] - plain[k]) <= 1e-12 * max(1.0, abs(plain[k])) for k in plain), (values, plain)


@pytest.mark.parametrize("lams, word", [(["1e-320", "1"], "lams[0]"), (["-1", "1"], "lams"), (["0.1"], "lam")])
def test_theory_bad_lambdas(capsys, lams, word):
    fails_cleanly(["theory", "--K", "4", "--n", "50", "--lam", *lams], capsys, word)


def test_theory_extreme_lambdas_give_finite_values(capsys):
    assert main(["theory", "--K", "4", "--n", "50", "--lam", "1e-300", "1e-300"]) == 0
    out = capsys.readouterr().out
    assert "inf" not in out and "nan" not in out and "f* = 2.82842712e-299" in out


def test_cross_entropy_with_a_huge_step_advises_a_checked_one(scratch, capsys):
    (scratch / "ce.toml").write_text((C.CONFIG_DIR / "ufm-ce.toml").read_text())
    err = fails_cleanly(["run", "ce.toml", "--set", "solver.lr=100", "--set", "solver.steps=2000", "--out", "o"],
                        capsys, "try lr <=")
    advice = float(err.split("try lr <= ")[1].split()[0])
    assert main(["run", "ce.toml", "--set", f"solver.lr={advice}", "--set", "solver.steps=2000", "--out", "o",
                 "--quiet"]) == 0


def test_set_title_is_parsed_as_toml(scratch):
    run = C.apply_overrides(C.load(scratch / "ufm.toml"), ['title="My run"', "description=plain words"])
    assert run.title == "My run" and run.description == "plain words"
