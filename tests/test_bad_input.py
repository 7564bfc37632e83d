"""Every bad input raises a clear ValueError/TypeError; nothing returns NaN silently."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from nclab import ClassStats, _validate, cli, measure
from nclab.io import load_features
from nclab.metrics import nc1, nc2_weights

finite = st.floats(-1e3, 1e3, allow_nan=False)


def _good(K=3, d=4, n=3):
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(K), n)
    return rng.standard_normal((K * n, d)) + 3 * np.eye(K, d)[y], y, rng.standard_normal((K, d))


def _check(call):
    """Either a finite result or a clear error; never a NaN."""
    try:
        out = call()
    except (ValueError, TypeError) as exc:
        assert str(exc) and len(str(exc).splitlines()) == 1
        return
    assert all(math.isfinite(v) for v in out.values())


@settings(max_examples=60, deadline=None)
@given(arrays(np.float64, st.tuples(st.integers(1, 8), st.integers(1, 5)), elements=finite),
       st.lists(st.integers(-2, 4), min_size=1, max_size=8))
def test_random_inputs_never_return_nan(H, labels):
    _check(lambda: measure(H, np.array(labels)))


@settings(max_examples=40, deadline=None)
@given(st.sampled_from([np.nan, np.inf, -np.inf]), st.integers(0, 8), st.sampled_from(["H", "W", "b"]))
def test_non_finite_values_are_named(bad, where, which):
    H, y, W = _good()
    b = np.zeros(3)
    target = {"H": H, "W": W, "b": b}[which]
    target.flat[where % target.size] = bad
    with pytest.raises(ValueError, match={"H": "features", "W": "weights", "b": "bias"}[which]):
        measure(H, y, W, b)


@pytest.mark.parametrize("kwargs, match", [
    (dict(labels=np.array([0, 1, 2] * 3, dtype=float)), "labels: expected integer"),
    (dict(labels=np.array([0, 1, 3] * 3)), "class"),           # class 2 has no samples
    (dict(labels=np.array([0, 1, -1] * 3)), "labels: values"),
    (dict(labels=np.array([0, 1, 2] * 2)), "must match"),
    (dict(labels=np.zeros(9, dtype=int)), "at least 2 classes"),
    (dict(weights=np.zeros((2, 4))), "weights: expected shape"),
    (dict(weights=np.zeros((3, 5))), "weights: expected shape"),
    (dict(bias=np.zeros(4)), "bias: expected shape"),
    (dict(features=np.zeros((9, 4, 1))), "features: expected a 2-D"),
    (dict(features="abc"), "features: expected a numpy"),
    (dict(features=np.array([[True]] * 9)), "features: expected real"),
    (dict(preset="nope"), "preset"),
    (dict(weights=np.zeros((3, 4))), "undefined"),             # zero weights
])
def test_specific_bad_inputs(kwargs, match):
    H, y, W = _good()
    args = dict(features=H, labels=y, weights=W, bias=None) | kwargs
    with pytest.raises((ValueError, TypeError), match=match):
        measure(**args)


def test_bias_without_weights_and_zero_weight_frames():
    H, y, _ = _good()
    with pytest.raises(ValueError, match="bias: given without weights"):
        measure(H, y, bias=np.zeros(3))
    with pytest.raises(ValueError, match="undefined"):
        nc2_weights(np.zeros((3, 4)))
    with pytest.raises(ValueError, match="frame"):
        nc2_weights(np.ones((3, 4)), frame="square")


def test_torch_inputs_validated_too():
    H, y, W = _good()
    with pytest.raises(TypeError, match="labels"):
        measure(torch.tensor(H), torch.tensor(y, dtype=torch.float32))


# ----------------------------------------------------------------- rtol, K <= N, memory
BAD_RTOL = [2, 1, 1.0, 0, 0.0, -1e-10, 1e-20, math.nan, math.inf, -math.inf, "1e-10", True, None]


@pytest.mark.parametrize("rtol", BAD_RTOL)
@pytest.mark.parametrize("where", ["measure", "nc1", "ClassStats.metrics"])
def test_rtol_must_lie_between_eps_and_one(rtol, where):
    H, y, W = _good()
    call = {"measure": lambda: measure(H, y, W, rtol=rtol),
            "nc1": lambda: nc1(H, y, rtol=rtol),
            "ClassStats.metrics": lambda: ClassStats(3, 4).update(H, y).metrics(W, rtol=rtol)}[where]
    with pytest.raises((ValueError, TypeError)) as exc:
        call()
    assert str(exc.value).startswith("rtol: ") and len(str(exc.value).splitlines()) == 1


@pytest.mark.parametrize("rtol", [1e-15, 1e-10, 1e-3, 0.5])
def test_rtol_in_range_is_used(rtol):
    H, y, W = _good()
    assert measure(H, y, W, rtol=rtol)["nc1"] == pytest.approx(ClassStats(3, 4).update(H, y).metrics(rtol=rtol)["nc1"])


def _no_big_bincount(monkeypatch, limit):
    """Make torch.bincount fail loudly if asked for more than ``limit`` counts."""
    real = torch.bincount

    def bincount(x, weights=None, minlength=0):
        assert minlength <= limit, f"bincount(minlength={minlength}) allocated before the check"
        return real(x, weights, minlength)

    monkeypatch.setattr(torch, "bincount", bincount)


@pytest.mark.parametrize("labels, num_classes, match", [
    ([0, 1, 2_000_000_000], None, r"^labels: the largest label 2000000000 means K = 2000000001 classes"),
    ([0, 1, 3], None, r"^labels: the largest label 3 .* only N = 3 samples"),
    ([0, 1, 1], 2_000_000_000, r"^num_classes: 2000000000 classes need at least"),
    ([0, 1, 1], 4, r"^num_classes: 4 classes need at least 4 samples"),
    ([0, 1, 1], True, r"^num_classes: expected a positive integer"),
    ([0, 1, 1], 2.0, r"^num_classes: expected a positive integer"),
    ([0, 1, -2_000_000_000], None, r"^labels: values must lie in"),
])
def test_k_above_n_is_rejected_before_allocating(monkeypatch, labels, num_classes, match):
    _no_big_bincount(monkeypatch, 3)
    with pytest.raises(ValueError, match=match):
        measure(np.ones((3, 2)), np.array(labels), num_classes=num_classes)


def test_k_work_that_cannot_fit_is_rejected_with_an_estimate(monkeypatch):
    monkeypatch.setattr(_validate, "total_memory", lambda device=None: 2**20)
    K = 200  # the tiles of the K x K quantities alone: 96 K² bytes = 3.7 MiB > 1 MiB
    with pytest.raises(ValueError, match=r"^labels: the metrics of K = 200 classes in d = 2 need about 0.00\d+ GiB "
                       r".* 0.000977 GiB"):
        measure(np.random.default_rng(0).standard_normal((K, 2)), np.arange(K))
    with pytest.raises(ValueError, match="^labels: the metrics of K = 200"):
        nc2_weights(np.ones((K, 2)))


def test_features_without_columns():
    with pytest.raises(ValueError, match="^features: has 0 columns"):
        measure(np.zeros((3, 0)), np.array([0, 1, 1]))


# ----------------------------------------------------------------- feature files
def _write(path, kind, payload):
    if kind == "pt":
        torch.save(payload, path)
    elif kind == "npz":
        np.savez(path, **payload)
    else:
        path.write_bytes(payload)


def _good_npz_bytes(tmp_path):
    p = tmp_path / "good.npz"
    np.savez(p, features=np.ones((3, 2)), labels=np.arange(3))
    return p.read_bytes()


@pytest.mark.parametrize("name, kind, payload, match", [
    ("empty.npz", "raw", b"", r"^FILE: .*empty\.npz is empty \(0 bytes\)$"),
    ("empty.pt", "raw", b"", r"^FILE: .*empty\.pt is empty \(0 bytes\)$"),
    ("garbage.pt", "raw", b"hello world\n" * 3, r"^FILE: could not read .* as a torch file \(\w+"),
    ("garbage.npz", "raw", b"hello world\n" * 3, r"^FILE: could not read .* as \.npz \(\w+"),
    ("trunc.npz", "truncated", None, r"^FILE: could not read .* as \.npz \(BadZipFile"),
    ("list.pt", "pt", [1, 2], r"^FILE: .* must hold a dict .* not a list$"),
    ("tensor.pt", "pt", torch.ones(3), r"^FILE: .* must hold a dict .* not a Tensor$"),
    ("ragged.pt", "pt", {"features": [[1.0, 2.0], [3.0]], "labels": [0, 1]},
     r"^FILE: key 'features' of ragged\.pt is not a numeric array \(ValueError: .*inhomogeneous"),
    ("strings.pt", "pt", {"features": torch.ones(2, 2), "labels": ["a", "b"]},
     r"^FILE: key 'labels' of strings\.pt is not a numeric array \(it holds list of dtype <U1\)"),
    ("none.pt", "pt", {"features": torch.ones(2, 2), "labels": None},
     r"^FILE: key 'labels' of none\.pt is not a numeric array \(it holds NoneType of dtype object\)"),
    ("objects.pt", "pt", {"features": torch.ones(2, 2), "labels": [0, 1], "weights": [[1.0, 2.0], [3.0, None]]},
     r"^FILE: key 'weights' of objects\.pt is not a numeric array .*dtype object"),
    ("strings.npz", "npz", {"features": np.ones((2, 2)), "labels": np.array(["a", "b"])},
     r"^FILE: key 'labels' of strings\.npz is not a numeric array"),
    ("objects.npz", "npz", {"features": np.array([[1, 2], [3]], dtype=object), "labels": np.arange(2)},
     r"^FILE: could not read .* as \.npz \(ValueError: Object arrays cannot be loaded"),
    ("nolabels.pt", "pt", {"features": torch.ones(2, 2), 1: 2}, r"^FILE: .* lacks key\(s\) \['labels'\]; it has \['1', 'features'\]"),
])
def test_bad_feature_files_give_one_line_errors(tmp_path, name, kind, payload, match):
    path = tmp_path / name
    if kind == "truncated":
        path.write_bytes(_good_npz_bytes(tmp_path)[:100])
    else:
        _write(path, kind, payload)
    with pytest.raises(ValueError, match=match) as exc:
        load_features(path)
    assert len(str(exc.value).splitlines()) == 1 and len(str(exc.value)) < 400


def test_cli_reports_a_bad_file_in_one_line(tmp_path, capsys):
    path = tmp_path / "ragged.pt"
    torch.save({"features": [[1.0, 2.0], [3.0]], "labels": [0, 1]}, path)
    assert cli.main(["measure", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("nclab measure: error: FILE: key 'features'") and len(err.splitlines()) == 1


@pytest.mark.parametrize("entries, dtypes", [
    ({"features": [[1.0, 2.0], [3.0, 4.0], [0.5, 1.0]], "labels": [0, 1, 1]}, ("float64", "int64")),
    ({"features": torch.ones(3, 2, dtype=torch.bfloat16), "labels": torch.tensor([0, 1, 1])}, ("float32", "int64")),
    ({"features": torch.ones(3, 2, requires_grad=True), "labels": torch.tensor([0, 1, 1], dtype=torch.int32)},
     ("float32", "int32")),
])
def test_feature_files_with_lists_or_tensors_become_numpy_arrays(tmp_path, entries, dtypes):
    path = tmp_path / "f.pt"
    torch.save(entries, path)
    data = load_features(path)
    assert all(type(v) is np.ndarray for v in data.values())
    assert (str(data["features"].dtype), str(data["labels"].dtype)) == dtypes
    assert data["labels"].max() == 1  # what the CLI prints needs arrays, not lists


@pytest.mark.parametrize("features, error, match", [
    (np.array([["a", "b"]] * 9), TypeError, r"^features: numpy dtype <U1 is not numeric"),
    (np.full((9, 2), np.datetime64("2020-01-01")), TypeError, r"^features: numpy dtype datetime64"),
    (np.zeros((9, 2), dtype=np.uint64), TypeError, r"^features: expected real numbers"),
])
def test_non_numeric_numpy_dtypes_are_named(features, error, match):
    with pytest.raises(error, match=match):
        measure(features, np.repeat(np.arange(3), 3))


def test_big_endian_arrays_are_read():
    H, y, W = _good()
    assert measure(H.astype(">f8"), y.astype(">i8"), W.astype(">f4")) == measure(H, y, W.astype(np.float32))
