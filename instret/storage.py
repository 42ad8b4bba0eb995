"""Files that matter: atomic writes (a reader sees the old file or the new one, never half of
either) and safe loads of instret's own torch files (weights_only, checked, one-line errors)."""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

from instret.errors import InstretError


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise _cannot_write(path, e) from None
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(e, OSError):  # a full disk, most often
            raise _cannot_write(path, e) from None
        raise
    _fsync_dir(path.parent)


def _cannot_write(path: Path, e: OSError) -> InstretError:
    return InstretError(f"{path}: cannot write ({e.strerror}); the previous version is kept")


def remove_stale_temps(folder: str | Path) -> None:
    """Delete the temporary files of atomic writes that a killed process left in folder."""
    for tmp in Path(folder).glob(".*.tmp"):
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_torch_save(obj, path: str | Path) -> None:
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; not every filesystem allows it.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_torch_file(path: str | Path, kind: str, required: tuple[str, ...], max_version: int) -> dict:
    """torch.load with weights_only=True (no code runs), then check it is an instret `kind` file."""
    import torch

    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise InstretError(f"{path}: not a readable {kind} file ({type(e).__name__})") from None
    if not isinstance(blob, dict) or any(k not in blob for k in required):
        raise InstretError(f"{path}: not an instret {kind} file")
    if blob.get("format_version", 0) > max_version:
        raise InstretError(
            f"{path}: {kind} format version {blob['format_version']} is newer than this instret reads ({max_version})"
        )
    return blob
