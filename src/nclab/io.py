"""File input/output: atomic writes and reading feature files."""
from __future__ import annotations

import contextlib
import csv
import io
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, tmp_dir: str | os.PathLike | None = None, before_rename=None):
    """Yield a temporary path; rename it onto ``path`` only on success (a reader sees the old
    file or the new one, never a part).

    The temporary file lies in ``tmp_dir`` (default: beside ``path``, whose folder is then
    created), on the same file system, and gets the usual permissions (0666 less the
    umask) and an fsync before the rename. ``before_rename()``, when given, runs just
    before the rename (e.g. to record the file in a manifest first).
    """
    path = Path(path)
    if tmp_dir is None:
        path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=tmp_dir or path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp makes 0600 files; give the usual permissions
        with open(tmp, "rb") as f:  # on disk before the rename, so a crash leaves old or new
            os.fsync(f.fileno())
        if before_rename is not None:
            before_rename()
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def one_line(text: str, limit: int = 300) -> str:
    """``text`` on one line (whitespace runs become one space), cut to ``limit`` characters."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def umask() -> int:
    """This process's file-creation mask (read without changing it for longer than a call)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def csv_text(rows: list[dict], fieldnames: list[str] | None = None) -> str:
    """CSV text of dict rows; floats with repr (round-trip exact)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fieldnames or list(rows[0]), lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: (repr(float(v)) if isinstance(v, (float, np.floating)) else v) for k, v in r.items()})
    return buf.getvalue()


def read_toml(path, name: str = "CONFIG") -> dict:
    """Parse a TOML file; a one-line ValueError naming ``name`` when missing or invalid."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{name}: {path} does not exist")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{name}: {path} is not valid TOML ({exc})") from None


def toml_text(obj: dict) -> str:
    """TOML text of a dict (tomli-w, imported here: reading must not need it)."""
    import tomli_w

    return tomli_w.dumps(obj)


FEATURE_KEYS = ("features", "labels", "weights", "bias")


def load_features(path) -> dict[str, np.ndarray]:
    """Read ``features`` (N, d), ``labels`` (N,), optional ``weights``, ``bias`` from .npz or .pt.

    Every entry is returned as a numpy array of numbers (bool, integer, float or complex;
    torch tensors and Python lists are converted here, bfloat16 to float32). Raises
    ValueError with a one-line message for a missing, empty or unreadable file, an unknown
    suffix, a .pt that is not a dict, missing keys, or an entry that is not a numeric array
    (ragged lists, strings, objects); shapes and values are checked by :func:`nclab.measure`.
    """
    path = Path(path)

    def reason(exc: BaseException) -> str:
        text = one_line(str(exc), 200)  # however long the library's message
        return f"{type(exc).__name__}: {text}" if text else type(exc).__name__

    def numeric(key: str, value) -> np.ndarray:
        torch = sys.modules.get("torch")
        if torch is not None and isinstance(value, torch.Tensor):
            value = value.detach().cpu()
            value = value.float() if value.dtype == torch.bfloat16 else value  # numpy has no bfloat16
        try:
            arr = np.asarray(value)
        except (ValueError, TypeError, RuntimeError) as exc:  # ragged lists, unsupported dtypes
            raise ValueError(f"FILE: key {key!r} of {path.name} is not a numeric array ({reason(exc)})") from None
        if arr.dtype.kind not in "biufc":
            raise ValueError(f"FILE: key {key!r} of {path.name} is not a numeric array (it holds "
                             f"{type(value).__name__} of dtype {arr.dtype}); save numbers, e.g. a tensor or ndarray")
        return arr

    if not path.is_file():
        raise ValueError(f"FILE: {path} does not exist")
    if path.stat().st_size == 0:
        raise ValueError(f"FILE: {path} is empty (0 bytes)")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as z:
                data = {k: z[k] for k in z.files}
        except Exception as exc:  # zipfile/pickle errors differ by numpy version
            raise ValueError(f"FILE: could not read {path} as .npz ({reason(exc)})") from None
    elif suffix in (".pt", ".pth"):
        import torch

        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ValueError(f"FILE: could not read {path} as a torch file ({reason(exc)})") from None
        if not isinstance(obj, dict):
            raise ValueError(f"FILE: {path} must hold a dict with keys {FEATURE_KEYS[:2]}, "
                             f"not a {type(obj).__name__}")
        data = dict(obj)
    else:
        raise ValueError(f"FILE: expected a .npz or .pt file, got {path.name}")
    missing = [k for k in ("features", "labels") if k not in data]
    if missing:
        raise ValueError(f"FILE: {path.name} lacks key(s) {missing}; it has {sorted(map(str, data))}")
    return {k: numeric(k, data[k]) for k in FEATURE_KEYS if k in data}
