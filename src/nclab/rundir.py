"""One run folder: the whole life of a result folder that nclab writes.

Every command that writes results (``reproduce``, ``run``, ``sweep``, ``train``) goes
through a :class:`RunDir`, which

* **creates** the folder, refusing one that already holds files unless ``mode`` is
  ``"resume"`` (continue an nclab run there) or ``"force"`` (start over);
* **locks** it (``fcntl.flock`` on ``.nclab/lock``): a second process on the same folder
  gets a clear error at once; the kernel drops the lock when a process dies, even by
  ``kill -9``, so no stale lock is ever left;
* **writes atomically**: a file is written under ``.nclab/tmp/``, flushed to disk and
  renamed onto its name, so a file is either absent, old or complete. Temporary files of
  a killed process are removed by the next process that takes the lock;
* keeps a **manifest** (``.nclab/manifest.json``) of every file and folder it wrote, so
  ``--force`` removes exactly those and never a file of the user's, and a file of the
  user's is never overwritten (writing onto one is an error);
* records **parts** (one experiment, one training run) with their settings and marks
  them complete; ``resume`` skips complete parts whose settings match and refuses parts
  recorded with other settings (naming the differences);
* leaves **nothing behind** when an error ends a run before any result was kept: the
  files it created are removed, and so is the folder if it created it.

Names never escape the folder: every relative path is checked to stay inside it. Files
get the user's usual permissions (0666 less the umask), folders mkdir's default.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

from nclab.io import atomic_path, csv_text

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None

MODES = ("new", "resume", "force")
META = ".nclab"
MANIFEST_FORMAT = 2


class RunDirError(ValueError):
    """A result folder cannot be used as asked; the message names the option and the fix."""


class RunDir:
    """A result folder owned by this process (see the module docstring).

    Use as a context manager::

        with RunDir(path, mode="new", option="--out") as rd:
            if rd.begin_part("fig4", settings):     # False: complete with these settings
                rd.write_text("fig4/summary.json", ...)
                rd.complete_part("fig4")

    ``option`` is the command-line option that chose ``path``, used in messages.
    """

    def __init__(self, path, *, mode: str = "new", option: str = "--out"):
        if mode not in MODES:
            raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
        self.root = Path(path).expanduser().absolute()
        self.mode, self.option = mode, option
        self._lock_fd: int | None = None
        self._created_root = self._created_meta = False
        self._new_ancestors: list[Path] = []
        self._created: list[tuple[str | None, str]] = []  # (part, file or folder/) this process created
        self._current: str | None = None  # the part being written
        self._new_parts: set[str] = set()  # parts first recorded by this process
        self._kept: set[str | None] = set()  # parts with a result worth keeping (None: the folder as a whole)
        self.manifest: dict = {}

    # ------------------------------------------------------------------ life cycle
    def __enter__(self) -> "RunDir":
        self.open()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(failed=exc_type is not None)

    def open(self) -> None:
        """Check, create and lock the folder; clean a killed process's temporary files."""
        self._check_location()
        self._created_root = not self.root.exists()
        self._new_ancestors = [p for p in self.root.parents if not p.exists()]  # e.g. runs/, removed if unused
        self._created_meta = not (self.root / META).exists()
        for _ in range(10):  # a failed process may remove .nclab between our open and our lock: retry
            try:
                (self.root / META / "tmp").mkdir(parents=True, exist_ok=True)
                fd = os.open(self.root / META / "lock", os.O_RDWR | os.O_CREAT, 0o666)
            except OSError as exc:
                raise RunDirError(f"{self.option}: cannot write to {self.root} ({exc.strerror}); "
                                  "choose a folder you can write to") from None
            self._lock(fd)
            if self._holds_current_lock_file():
                break
            os.close(fd)
            self._lock_fd = None
        shutil.rmtree(self.root / META / "tmp", ignore_errors=True)  # a killed process's leftovers
        (self.root / META / "tmp").mkdir(exist_ok=True)
        self.manifest = self._read_manifest()
        try:
            self._apply_mode()
        except BaseException:
            self.close(failed=True)
            raise

    def close(self, *, failed: bool = False) -> None:
        """Release the lock. After a failure, remove what this process created for parts that
        kept no result (and, when nothing at all was kept, the folder it created)."""
        if self._lock_fd is None:
            return
        if failed:
            self._undo()
        shutil.rmtree(self.root / META / "tmp", ignore_errors=True)
        if failed and not self._kept and self._created_meta:
            shutil.rmtree(self.root / META, ignore_errors=True)
            if self._created_root:
                with contextlib.suppress(OSError):
                    for folder in [self.root, *self._new_ancestors]:
                        folder.rmdir()  # only when empty: never a file of the user's
        os.close(self._lock_fd)
        self._lock_fd = None

    def _check_location(self) -> None:
        if self.root.exists() and not self.root.is_dir():
            raise RunDirError(f"{self.option}: {self.root} is a file, not a folder; give a folder path")
        for parent in self.root.parents:
            if parent.exists():
                if not parent.is_dir():
                    raise RunDirError(f"{self.option}: {parent} is a file, so {self.root} cannot be a folder; "
                                      "give another path")
                break

    def _lock(self, fd: int) -> None:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise RunDirError(f"{self.option}: {self.root} is being written by another nclab process "
                                  f"(pid {holder}); wait for it to finish or choose another {self.option}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._lock_fd = fd

    def _holds_current_lock_file(self) -> bool:
        try:
            return os.path.samestat(os.fstat(self._lock_fd), os.stat(self.root / META / "lock"))
        except FileNotFoundError:
            return False

    def _apply_mode(self) -> None:
        ours = self.has_results()
        user = self.user_entries()
        if self.mode == "new" and (ours or user):
            shown = ", ".join(sorted(user)[:3]) if user and not ours else "an earlier nclab run"
            raise RunDirError(f"{self.option}: {self.root} already holds results ({shown}); choose a new "
                              f"{self.option}, or pass --resume or --force: --resume continues the nclab run "
                              "there, --force replaces nclab's earlier results (your own files are kept)")
        if self.mode == "new" and self._has_our_files():
            self._remove_ours()  # a killed run's leftovers, with no result in them
        if self.mode == "resume" and user and not self.manifest["files"]:
            raise RunDirError(f"{self.option}: {self.root} holds no nclab run to resume (it has "
                              f"{', '.join(sorted(user)[:3])}); choose another {self.option}")
        if self.mode == "force":
            self._remove_ours()

    # ------------------------------------------------------------------ what is there
    def has_results(self) -> bool:
        """Whether an earlier run kept a result here: a complete part, or a part with a kept
        result such as a checkpoint (files of a part that was killed before either are
        leftovers, which a new run removes)."""
        parts = self.manifest.get("parts", {}).values()
        if any(p["complete"] or p.get("kept") for p in parts):
            return True
        return not parts and self._has_our_files()

    def _has_our_files(self) -> bool:
        return any((self.root / rel).is_file() for rel in self.manifest["files"])

    def user_entries(self) -> list[str]:
        """Top-level entries that nclab did not write (the user's files and folders)."""
        ours = {Path(rel).parts[0] for rel in [*self.manifest["files"], *self.manifest.get("dirs", [])]}
        return [p.name for p in self.root.iterdir() if p.name != META and p.name not in ours]

    def path(self, rel: str | os.PathLike) -> Path:
        """The absolute path of ``rel``, which must stay inside the folder."""
        rel = Path(rel)
        target = (self.root / rel).resolve()
        root = self.root.resolve()
        if rel.is_absolute() or target == root or root not in target.parents or META in rel.parts:
            raise RunDirError(f"name: {str(rel)!r} would write outside {self.root}; use a plain relative name")
        return self.root / rel

    def folder(self, prefix: str = "") -> "Folder":
        """Where a part writes: ``prefix`` inside this folder ("" for the folder itself)."""
        return Folder(self, prefix)

    # ------------------------------------------------------------------ parts
    def part(self, name: str) -> dict | None:
        """The record of part ``name`` ({"settings": ..., "complete": bool}) or None."""
        return self.manifest.get("parts", {}).get(name)

    def begin_part(self, name: str, settings: dict, *, again: bool = False) -> bool:
        """Start part ``name``; False when it is complete with the same ``settings`` (skip it),
        unless ``again`` (then it is marked incomplete and runs again, e.g. to continue from
        a checkpoint with more epochs, or because its outputs were found damaged).

        A part recorded with other settings is an error (under ``resume``, the only mode
        in which earlier parts exist), naming the settings that differ.
        """
        settings = json.loads(json.dumps(settings))  # the plain form the manifest stores
        old = self.part(name)
        if old is not None and old["settings"] != settings:
            diff = ", ".join(_differences(old["settings"], settings)[:4])
            raise RunDirError(f"--resume: {name} in {self.root} was run with different settings ({diff}); resume "
                              f"with the same settings, pass --force to start over, or choose another {self.option}")
        if old is not None and old["complete"] and not again:
            return False
        if old is not None and old["complete"]:
            old["complete"] = False
            self._write_manifest()
        if old is None:
            self.manifest.setdefault("parts", {})[name] = {"settings": settings, "complete": False}
            self._new_parts.add(name)
            self._write_manifest()
        self._current = name
        return True

    def complete_part(self, name: str) -> None:
        """Mark part ``name`` complete: a result kept even if a later part fails."""
        self.manifest["parts"][name]["complete"] = True
        self._write_manifest()
        self.keep(name)
        self._current = None

    def keep(self, part: str | None = None) -> None:
        """Declare that ``part`` (default: the current one) holds a result worth keeping, e.g. a
        checkpoint: a failure later leaves its files for ``--resume``."""
        part = part or self._current
        self._kept.update({part, None})
        record = self.manifest.get("parts", {}).get(part)
        if record is not None and not record.get("kept"):
            record["kept"] = True
            self._write_manifest()

    @contextlib.contextmanager
    def redraw(self, part: str):
        """Write as the existing part ``part`` without re-checking its settings or marking it
        incomplete (``nclab plot`` redrawing a finished run's figures from its tables): files it
        writes are owned by ``part``, as if the part had written them."""
        if self.part(part) is None:
            raise RunDirError(f"{self.root}: no part {part!r} in this run folder")
        previous, self._current = self._current, part
        try:
            yield self
        finally:
            self._current = previous

    # ------------------------------------------------------------------ writing
    @contextlib.contextmanager
    def atomic(self, rel):
        """Yield a temporary path; on success it is renamed onto ``rel``, recorded in the manifest
        (owner part, size, mtime) first. Writing onto a file that nclab did not write, that was
        changed since, or that another part of the run owns is an error."""
        if self._lock_fd is None:
            raise RuntimeError(f"{self.root}: the run folder is not open for writing (only rank 0 writes)")
        target = self.path(rel)
        key = target.relative_to(self.root).as_posix()
        self._check_writable(target, key)
        self._make_parents(target)
        existed = target.exists()

        def record():
            self.manifest["files"][key] = {"part": self._current}
            self._write_manifest()

        with atomic_path(target, tmp_dir=self.root / META / "tmp", before_rename=record) as tmp:
            yield tmp
        self.manifest["files"][key] |= _stamp(target)
        self._write_manifest()
        if not existed:
            self._created.append((self._current, key))

    def _check_writable(self, target: Path, key: str) -> None:
        entry = self.manifest["files"].get(key)
        if target.exists() and (entry is None or not _unchanged(target, entry)):
            raise RunDirError(f"{self.option}: {target} exists and was not written by nclab (or was changed "
                              f"since); move it away or choose another {self.option}")
        owner = None if entry is None else entry.get("part")
        if entry is not None and owner != self._current and owner in self.manifest["parts"]:
            raise RunDirError(f"{self.option}: {target} belongs to part {owner!r} of the run in {self.root}, "
                              f"not to {self._current!r}; use the same settings and name, pass --force to start "
                              f"over, or choose another {self.option}")

    def write_text(self, rel, text: str) -> Path:
        with self.atomic(rel) as tmp:
            tmp.write_text(text, encoding="utf-8")
        return self.path(rel)

    def write_json(self, rel, obj) -> Path:
        return self.write_text(rel, json.dumps(obj, indent=2, allow_nan=True) + "\n")

    def write_csv(self, rel, rows: list[dict], fieldnames: list[str] | None = None) -> Path:
        return self.write_text(rel, csv_text(rows, fieldnames))

    # ------------------------------------------------------------------ internals
    def _make_parents(self, target: Path) -> None:
        missing = []
        parent = target.parent
        while parent != self.root and not parent.exists():
            missing.append(parent)
            parent = parent.parent
        for folder in reversed(missing):
            folder.mkdir()
            key = folder.relative_to(self.root).as_posix()
            self.manifest.setdefault("dirs", []).append(key)
            self._created.append((self._current, key + "/"))
        if missing:
            self._write_manifest()

    def _read_manifest(self) -> dict:
        path = self.root / META / "manifest.json"
        if not path.is_file():
            return _empty_manifest()
        try:
            data = json.loads(path.read_text())
            if data.get("format") != MANIFEST_FORMAT or not isinstance(data.get("files"), dict):
                raise ValueError("unknown format")
            for rel in list(data["files"]) + data.get("dirs", []):
                self._inside(rel)
        except (ValueError, OSError, AttributeError, TypeError) as exc:
            raise RunDirError(f"{self.option}: {path} is unreadable ({exc}); nclab cannot tell its files from "
                              f"yours there, so move the folder away or choose another {self.option}") from None
        return data

    def _inside(self, rel: str) -> None:
        """ValueError unless ``rel`` names a path inside the folder with no symbolic link on the way."""
        self.path(rel)
        here = self.root
        for part in Path(rel).parts[:-1]:
            here = here / part
            if here.is_symlink():
                raise ValueError(f"{rel!r} passes through the symbolic link {here}")

    def _write_manifest(self) -> None:
        with atomic_path(self.root / META / "manifest.json", tmp_dir=self.root / META / "tmp") as tmp:
            tmp.write_text(json.dumps(self.manifest, indent=1) + "\n")

    def _remove_ours(self) -> None:
        """--force: delete the files of the manifest that are as nclab left them (a file changed
        since is the user's now and stays), then the folders it made that are empty."""
        for rel, entry in self.manifest["files"].items():
            path = self.root / rel
            if path.is_file() and not path.is_symlink() and _unchanged(path, entry):
                path.unlink()
        for rel in sorted(self.manifest.get("dirs", []), key=len, reverse=True):
            with contextlib.suppress(OSError):
                (self.root / rel).rmdir()
        self.manifest = _empty_manifest()
        self._write_manifest()

    def _undo(self) -> None:
        """Remove what this process created for parts without a kept result (newest first)."""
        undone = set()
        for part, key in reversed(self._created):
            if part in self._kept:
                continue
            undone.add(key)
            with contextlib.suppress(OSError):
                if key.endswith("/"):
                    (self.root / key).rmdir()
                else:
                    (self.root / key).unlink()
        self.manifest["files"] = {f: e for f, e in self.manifest["files"].items() if f not in undone}
        self.manifest["dirs"] = [d for d in self.manifest.get("dirs", []) if d + "/" not in undone]
        parts = self.manifest.get("parts", {})
        for name in self._new_parts - self._kept:
            parts.pop(name, None)
        if not (self._created_meta and not self._kept):
            with contextlib.suppress(OSError):
                self._write_manifest()


def _empty_manifest() -> dict:
    return {"format": MANIFEST_FORMAT, "files": {}, "dirs": [], "parts": {}}


def _stamp(path: Path) -> dict:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _unchanged(path: Path, entry: dict) -> bool:
    """Whether ``path`` is still the file nclab recorded (same size and modification time;
    an entry without a stamp, from a process killed just after the rename, counts as ours)."""
    if "size" not in entry:
        return True
    st = path.stat()
    return st.st_size == entry["size"] and st.st_mtime_ns == entry["mtime_ns"]


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """``key: old → new`` for every leaf that differs between two nested dicts."""
    out = []
    for key in sorted(set(old) | set(new), key=str):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} → {b!r}")
    return out


class Folder:
    """A folder inside a :class:`RunDir` where one part writes: the same writing methods,
    with names relative to ``prefix`` ("" is the run folder itself)."""

    def __init__(self, rundir: RunDir, prefix: str = ""):
        if prefix:
            rundir.path(prefix)  # raises unless the prefix stays inside the run folder
        self.rundir, self.prefix = rundir, prefix.strip("/")

    def rel(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def path(self, name: str = "") -> Path:
        return self.rundir.path(self.rel(name)) if name else self.rundir.root / self.prefix

    def sub(self, name: str) -> "Folder":
        return Folder(self.rundir, self.rel(name))

    def atomic(self, name: str):
        return self.rundir.atomic(self.rel(name))

    def write_text(self, name: str, text: str) -> Path:
        return self.rundir.write_text(self.rel(name), text)

    def write_json(self, name: str, obj) -> Path:
        return self.rundir.write_json(self.rel(name), obj)

    def write_csv(self, name: str, rows: list[dict], fieldnames: list[str] | None = None) -> Path:
        return self.rundir.write_csv(self.rel(name), rows, fieldnames)

    def keep(self) -> None:
        """A result worth keeping was written here (e.g. a checkpoint): see :meth:`RunDir.keep`."""
        self.rundir.keep()
