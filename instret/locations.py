"""Where a command's files are, found with a stat and nothing heavier (no torch, no FAISS), so
that a wrong path is told at once: index folders, the --out of `instret index`, encoder files,
image folders.

A run folder of `instret train` stands for its index (RUN_DIR/index) and its encoder
(RUN_DIR/encoder.pt) wherever one is expected; an index folder stands for the encoder it was
built with."""

from __future__ import annotations

import os
from pathlib import Path

from instret.errors import InstretError

ENCODER = "encoder.pt"
RUN_INDEX = "index"  # a run folder's own index: RUN_DIR/index


def is_index(path: Path) -> bool:
    return (path / "CURRENT").exists()


def is_run_folder(path: Path) -> bool:
    return (path / "config.json").is_file() and ((path / ENCODER).exists() or (path / "checkpoint.pt").exists())


def read_current(index_dir: Path) -> str | None:
    """The name of the index's committed generation (gen-NNNN); None for a folder without one."""
    try:
        name = (index_dir / "CURRENT").read_text().strip()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise InstretError(f"{index_dir}/CURRENT: unreadable ({e.strerror})") from None
    if not name.startswith("gen-") or not (index_dir / name).is_dir():
        raise InstretError(f"{index_dir}: CURRENT names {name!r}, which is not a generation here; the index is damaged")
    return name


def index_folder(path: str | Path) -> Path:
    """The index at `path`: an index folder, or a run folder, whose index is RUN_DIR/index."""
    path = Path(path)
    if path.is_file():
        raise InstretError(_not_an_index(path))
    if not path.is_dir():
        raise InstretError(f"{path}: no such index folder")
    if not is_index(path) and is_index(path / RUN_INDEX):
        return path / RUN_INDEX
    return path


def _not_an_index(path: Path) -> str:
    """What a file given as an index is, and the folder to give instead."""
    what = {ENCODER: "an encoder file", "checkpoint.pt": "a training checkpoint", "config.json": "a run's settings"}
    text = f"{path}: {what.get(path.name, 'a file')}, not an index"
    for folder in (path.parent, path.parent.parent):  # RUN_DIR/encoder.pt, INDEX/gen-0001/encoder.pt
        if is_index(folder) or is_index(folder / RUN_INDEX):
            return f"{text}; pass its folder: --index {folder}"
    return f"{text}; --index takes the folder `instret index --out` wrote (or the run folder of `instret train`)"


def index_output(path: str | Path) -> Path:
    """Where `instret index --out PATH` writes: an index folder, an empty folder or a new path;
    a run folder means its own index, RUN_DIR/index. Never a folder of someone's other files."""
    path = Path(path)
    if path.is_dir() and not is_index(path) and not (path / ".lock").exists() and is_run_folder(path):
        path = path / RUN_INDEX
    if path.exists() and not path.is_dir():
        raise InstretError(f"--out {path}: exists and is not a folder")
    if path.is_dir() and any(path.iterdir()) and not any((path / n).exists() for n in ("CURRENT", ".lock")):
        raise InstretError(f"--out {path}: a folder that is neither empty nor an instret index; choose another --out")
    return path


def encoder_file(path: str | Path) -> Path:
    """The encoder.pt that `path` names: the file itself, a run folder's, or the one an index
    folder's current generation was built with."""
    path = Path(path)
    if path.is_dir():
        if (path / ENCODER).is_file():
            return path / ENCODER
        index = index_folder(path)
        current = read_current(index)
        if current is not None:
            return index / current / ENCODER
        raise InstretError(f"{path}: no {ENCODER} here (give an encoder file, a run folder or an index folder)")
    if not path.is_file():
        raise InstretError(f"{path}: no such encoder file")
    return path


def image_folder(path: str | Path, option: str = "") -> Path:
    path = Path(path)
    if not path.is_dir():
        what = "not a folder" if path.exists() else "no such folder"
        raise InstretError(f"{option + ' ' if option else ''}{path}: {what}")
    return path


def existing(path: str | Path) -> Path:
    """A file or folder that is there (a query image, or a folder of them)."""
    if not os.path.lexists(path):
        raise InstretError(f"{path}: no such file or folder")
    return Path(path)
