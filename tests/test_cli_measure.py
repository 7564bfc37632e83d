"""`nclab measure FILE`: readable table, --json, one-line errors with exit status 2."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from nclab import collapsed_configuration, measure
from nclab.cli import main


@pytest.fixture
def feature_file(tmp_path):
    H, y, W = collapsed_configuration(4, 10, 20, noise=0.1, seed=0)
    path = tmp_path / "feats.npz"
    np.savez(path, features=H.numpy(), labels=y.numpy(), weights=W.numpy(), bias=np.zeros(4))
    return path, measure(H, y, W, np.zeros(4))


def test_json_output_equals_library(feature_file, capsys):
    path, ref = feature_file
    assert main(["measure", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == ref


def test_table_output_and_pt_files(feature_file, tmp_path, capsys):
    path, ref = feature_file
    with np.load(path) as z:
        torch.save({k: torch.from_numpy(z[k]) for k in z.files}, tmp_path / "f.pt")
    assert main(["measure", str(tmp_path / "f.pt")]) == 0
    out = capsys.readouterr().out
    assert "N=80, d=10, K=4" in out
    for k in ref:
        assert k in out


def test_example_and_make_example(tmp_path, capsys):
    assert main(["measure", "--example"]) == 0
    assert "nc1" in capsys.readouterr().out
    assert main(["make-example", str(tmp_path / "ex.npz"), "--K", "3", "--d", "5"]) == 0
    assert main(["measure", str(tmp_path / "ex.npz"), "--json"]) == 0


@pytest.mark.parametrize("content, message", [
    (dict(features=np.zeros((4, 2))), "lacks key"),
    (dict(features=np.ones((4, 2)), labels=np.array([0, 1, 2])), "must match"),
    (dict(features=np.ones((4, 2)), labels=np.array([0, 1, 5, 0]), ), "class"),
    (dict(features=np.full((4, 2), np.nan), labels=np.array([0, 1, 0, 1])), "NaN"),
    (dict(features=np.ones((4, 2)), labels=np.array([0, 1, 0, 1]), weights=np.ones((3, 2))), "weights"),
])
def test_bad_files_give_one_line_errors(tmp_path, capsys, content, message):
    path = tmp_path / "bad.npz"
    np.savez(path, **content)
    assert main(["measure", str(path)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_missing_and_wrong_files(tmp_path, capsys):
    assert main(["measure", str(tmp_path / "none.npz")]) == 2
    (tmp_path / "x.txt").write_text("hi")
    assert main(["measure", str(tmp_path / "x.txt")]) == 2
    (tmp_path / "broken.npz").write_bytes(b"not a zip")
    assert main(["measure", str(tmp_path / "broken.npz")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and ".npz or .pt" in err and "could not read" in err


def test_console_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "nclab", "measure", "--example", "--json"],
                         capture_output=True, text=True, check=True).stdout
    assert json.loads(out)["nc4"] == 0.0


def test_options_of_the_further_metrics(feature_file, tmp_path, capsys):
    path, _ = feature_file
    with np.load(path) as z:
        want = measure(z["features"], z["labels"], z["weights"], z["bias"], cdnv_exponent=1.0, riesz_s=2.0,
                       classes=[2, 0, 1], nc4_rows=30, tile_memory=2**20)
    argv = ["measure", str(path), "--json", "--cdnv-exponent", "1", "--riesz-s", "2", "--classes", "2", "0", "1",
            "--nc4-rows", "30", "--tile-memory", str(2**-10)]
    assert main(argv) == 0
    got = json.loads(capsys.readouterr().out)
    assert got == pytest.approx(want, rel=1e-12) and "cdnv_q1" in got and got["nc4_rows"] == 30
    assert main(["measure", str(path), "--top-classes", "3"]) == 0
    assert "classes 3" in capsys.readouterr().out


def test_per_class_csv(feature_file, tmp_path, capsys):
    import csv

    import nclab

    path, _ = feature_file
    out = tmp_path / "per_class.csv"
    assert main(["measure", str(path), "--per-class", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    with np.load(path) as z:
        want = nclab.per_class(z["features"], z["labels"], z["weights"], z["bias"])
    assert [int(r["class"]) for r in rows] == [0, 1, 2, 3]
    for key, values in want.items():
        assert [float(r[key]) for r in rows] == pytest.approx(list(values), rel=1e-15), key
    # an existing file is never overwritten
    before = out.read_bytes()
    assert main(["measure", str(path), "--per-class", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err and out.read_bytes() == before


@pytest.mark.parametrize("extra, message", [
    (["--classes", "0", "9"], "--classes: the labels must be distinct and lie in 0..3"),
    (["--classes", "0", "1", "--top-classes", "2"], "--classes: give --classes or --top-classes, not both"),
    (["--top-classes", "1"], "classes: the number of most frequent classes must lie in 2..4"),
    (["--nc4-rows", "0"], "--nc4-rows: expected a positive integer"),
    (["--cdnv-exponent", "-1"], "--cdnv-exponent: expected a positive finite number"),
    (["--riesz-s", "0"], "--riesz-s: expected a positive finite number"),
    (["--tile-memory", "0"], "--tile-memory: expected GiB between 0.001 and 1048576"),
    (["--tile-memory", "1e300"], "--tile-memory: expected GiB between 0.001 and 1048576"),
    (["--top-classes", "9"], "--top-classes: the number of most frequent classes must lie in 2..4"),
    (["--per-class", "x.txt"], "--per-class: give a path ending in .csv"),
])
def test_bad_options_are_one_line_errors(feature_file, capsys, extra, message):
    path, _ = feature_file
    assert main(["measure", str(path), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_per_class_csv_of_a_subset(feature_file, tmp_path):
    import csv

    import nclab

    path, _ = feature_file
    out = tmp_path / "sub.csv"
    assert main(["measure", str(path), "--classes", "3", "1", "--per-class", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert [int(r["class"]) for r in rows] == [3, 1]
    with np.load(path) as z:
        want = nclab.per_class(z["features"], z["labels"], z["weights"], z["bias"], classes=[3, 1])
    assert [float(r["mean_norm"]) for r in rows] == pytest.approx(list(want["mean_norm"]), rel=1e-15)
